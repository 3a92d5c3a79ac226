"""The pack inside a real, headless ComfyUI (>= 0.25) on the CPU, with the tiny demo models (server: conftest.py).

The server's base directory has custom_nodes/ideogram4_gguf linked to this checkout and models/ holding the tiny
demo files; every shipped workflow is converted to the API format with the server's own /object_info and run.
"""

from __future__ import annotations

import json
import re
import uuid

import pytest
from ideogram4_gguf.nodes import NODES
from PIL import Image

from ..workflows.tiny_run import LORA_INPUTS, MODEL_FILE_INPUTS, for_tiny_models
from ..workflows.ui_to_api import convert
from .harness import (
    API_COPY,
    PACK,
    ROOT,
    SAMPLER_NODES,
    SHIPPED,
    WORKFLOWS,
    load,
    node_id_of,
    run,
    status_messages,
    tiny_files,
)


def test_pack_imports_without_errors(comfy):
    log = comfy.log()
    assert re.search(rf"seconds: .*custom_nodes[/\\]{PACK}\s*$", log, re.MULTILINE), comfy.log_tail()
    problems = [line for line in log.splitlines()
                if PACK in line and ("IMPORT FAILED" in line or "Cannot import" in line)]
    assert not problems, "\n".join(problems)


def test_object_info_lists_the_nodes_as_their_schemas_say(object_info, demo_models, demo_lora):
    """Each node as ComfyUI reports it equals what the comfy_api stand-in records from the same define_schema
    (so the offline workflow checks in tests/workflows hold in ComfyUI too); model dropdowns list the folders."""
    listed = {"diffusion_models": [demo_models.dit.name], "text_encoders": [demo_models.text_encoder.name],
              "vae": [demo_models.vae.name], "loras": [demo_lora.name]}
    for node in NODES:
        schema = node.define_schema()
        expected, real = schema.object_info(), object_info.get(schema.node_id)
        assert real is not None, f"{schema.node_id} missing from /object_info"
        assert real["python_module"] == f"custom_nodes.{PACK}"
        for key in ("display_name", "category", "description", "output", "output_name", "output_node"):
            assert real[key] == expected[key], f"{schema.node_id}.{key}"
        for section in ("required", "optional"):
            assert real["input_order"].get(section) == expected["input_order"].get(section), schema.node_id
            for name, (kind, options) in expected["input"].get(section, {}).items():
                real_kind, real_options = real["input"][section][name]
                assert real_kind == kind, f"{schema.node_id}.{name}"
                folder = {**MODEL_FILE_INPUTS, **LORA_INPUTS,
                          ("IG4PromptUpsample", "lm_head"): "text_encoders"}.get((schema.node_id, name))
                if folder is not None:
                    choices = [o for o in real_options["options"] if o not in options["options"]]
                    assert choices == listed[folder], f"{schema.node_id}.{name}"
                    options = {k: v for k, v in options.items() if k != "options"}
                assert {k: real_options.get(k) for k in options} == options, f"{schema.node_id}.{name}"
        assert ("unique_id" in real["input"].get("hidden", {})) == bool(schema.hidden), schema.node_id


def test_workflow_templates_are_served(comfy):
    assert sorted(comfy.get("/workflow_templates")[PACK]) == sorted(SHIPPED)  # the API copy is not a template
    for name in SHIPPED:
        assert comfy.get(f"/api/workflow_templates/{PACK}/{name}.json") == load(name)
        status, body, kind = comfy.request(f"/api/workflow_templates/{PACK}/{name}.jpg")
        assert (status, kind) == (200, "image/jpeg") and body == (WORKFLOWS / f"{name}.jpg").read_bytes()


def test_the_templates_category_has_a_readable_name(comfy):
    # locales/en/main.json, merged into GET /i18n; the category key is the pack's folder name (git clone or
    # comfy-cli's install folder)
    category = comfy.get("/i18n")["en"]["templateWorkflows"]["category"]
    assert category[PACK] == "Ideogram 4 (GGUF)" and category["ideogram4-gguf"] == category[PACK]


@pytest.mark.parametrize("name", SHIPPED + [API_COPY])
def test_shipped_workflow_runs(comfy, object_info, demo_models, demo_lora, name):
    workflow = load(name)
    prompt = workflow if name == API_COPY else convert(workflow, object_info)
    # A seed per workflow: ComfyUI would otherwise serve an identical prompt from its cache without running it.
    prompt = for_tiny_models(prompt, tiny_files(demo_models, lora=demo_lora),
                             seed=1000 + (SHIPPED + [API_COPY]).index(name))
    history, events, binary = run(comfy, prompt)
    assert history["status"]["status_str"] == "success" and history["status"]["completed"], history["status"]
    classes = {entry["class_type"] for entry in prompt.values()}
    [sampler_class] = [kind for kind in SAMPLER_NODES if kind in classes]
    sampler, save = node_id_of(prompt, sampler_class), node_id_of(prompt, "SaveImage")
    progress = [e["data"] for e in events if e["type"] == "progress" and e["data"]["node"] == sampler]
    steps = 12 if sampler_class == "IG4PresetSampler" else 2  # the basic sampler runs the turbo preset as it is
    assert progress and progress[-1]["value"] == progress[-1]["max"] == steps
    assert binary and set(binary) <= {1, 4}  # live previews (PREVIEW_IMAGE, or with metadata)
    [image] = history["outputs"][save]["images"]
    path = comfy.base_dir / "output" / image["subfolder"] / image["filename"]
    with Image.open(path) as png:
        assert png.size == (256, 256)
    cached = {n for e in events if e["type"] == "execution_cached" for n in e["data"]["nodes"]}
    assert sampler not in cached and save not in cached
    encode = node_id_of(prompt, "IG4TextEncode")
    if encode not in cached:  # the API copy's prompt is the text-to-image one: ComfyUI reuses that encoding
        assert re.match(r"\d+ tokens", history["outputs"][encode]["text"][0])  # shown on the node
    if "IG4JsonPrompt" in {e["class_type"] for e in prompt.values()}:
        caption_text = history["outputs"][node_id_of(prompt, "IG4JsonPrompt")]["text"][0]
        assert caption_text.startswith("caption OK") and "BLUE NOTE NIGHTS" in caption_text
    if "IG4PromptUpsample" in {e["class_type"] for e in prompt.values()}:
        # the caption the tiny model wrote (or the fallback built from the idea), shown on the node
        shown = history["outputs"][node_id_of(prompt, "IG4PromptUpsample")]["text"][0]
        assert "NORTH COAST" in shown and "{" in shown


def test_interrupt_mid_sampling(comfy, object_info, demo_models):
    # 48 steps at 512x512: long enough that the interrupt lands mid-sampling even on a fast machine.
    prompt = for_tiny_models(convert(load(SHIPPED[0]), object_info), tiny_files(demo_models), size=512,
                             preset="quality", steps=0, seed=2000)
    sampler = node_id_of(prompt, "IG4PresetSampler")
    sent = []

    def interrupt_at_step_two(event):
        if (event["type"] == "progress" and event["data"]["node"] == sampler and event["data"]["value"] >= 2
                and not sent):
            sent.append(comfy.request("/interrupt", {"prompt_id": event["data"]["prompt_id"]}))

    history, events, _ = run(comfy, prompt, on_event=interrupt_at_step_two)
    assert sent and sent[0][0] == 200
    progress = [e["data"] for e in events if e["type"] == "progress" and e["data"]["node"] == sampler]
    assert progress[0]["max"] == 48 and progress[-1]["value"] < 48
    assert history["status"]["status_str"] == "error" and not history["status"]["completed"]
    interrupted = status_messages(history)["execution_interrupted"]
    assert interrupted["node_type"] == "IG4PresetSampler" and "execution_error" not in status_messages(history)
    assert node_id_of(prompt, "SaveImage") not in history["outputs"]


def test_a_missing_model_file_is_an_actionable_error_at_queue_time(comfy, object_info, demo_models):
    """A model listed in the folder but unreadable (a symlink whose target moved away) is refused when the prompt is
    queued, by our loader's validate_inputs, with a message that names the file and says where to put it."""
    name = "ideogram4-moved-away.gguf"
    link = comfy.base_dir / "models" / "diffusion_models" / name
    link.symlink_to(comfy.base_dir / "elsewhere" / name)
    try:
        prompt = for_tiny_models(convert(load(SHIPPED[0]), object_info), tiny_files(demo_models), seed=3000)
        loader = node_id_of(prompt, "IG4Loader")
        prompt[loader]["inputs"]["dit_name"] = name
        status, response = comfy.queue(prompt, uuid.uuid4().hex)
    finally:
        link.unlink()
    assert status == 400 and response["error"]["type"] == "prompt_outputs_failed_validation"
    error = response["node_errors"][loader]["errors"][0]
    assert error["type"] == "custom_validation_failed"
    message = error["details"]
    assert name in message and "diffusion_models" in message and "Put the file there" in message


def test_an_unknown_model_name_fails_validation(comfy, object_info, demo_models):
    name = "ideogram4-not-downloaded.gguf"
    prompt = for_tiny_models(convert(load(SHIPPED[0]), object_info), tiny_files(demo_models))
    loader = node_id_of(prompt, "IG4Loader")
    prompt[loader]["inputs"]["dit_name"] = name
    status, response = comfy.queue(prompt, uuid.uuid4().hex)
    assert status == 400 and response["error"]["type"] == "prompt_outputs_failed_validation"
    error = response["node_errors"][loader]["errors"][0]
    assert error["type"] == "custom_validation_failed" and name in error["details"]
    assert "Put the file there" in error["details"]


def test_bad_numbers_and_long_prompts_are_refused_at_queue_time(comfy, object_info, demo_models):
    """ComfyUI runs our validate_inputs when the prompt is queued: nothing loads, the node shows the reason."""
    prompt = for_tiny_models(convert(load(SHIPPED[0]), object_info), tiny_files(demo_models), seed=3100)
    sampler, encode = node_id_of(prompt, "IG4PresetSampler"), node_id_of(prompt, "IG4TextEncode")
    bad = json.loads(json.dumps(prompt))
    basic = bad[sampler]["inputs"]
    bad[sampler] = {"class_type": "IG4SamplerAdvanced", "inputs": {
        **{k: basic[k] for k in ("model", "conditioning", "width", "height", "batch_size", "seed")},
        "steps": 2, "cfg": float("nan"), "polish_steps": 1, "polish_cfg": 3.0, "mu": 0.0, "std": 1.75,
        "terminal": "official"}}
    status, response = comfy.queue(bad, uuid.uuid4().hex)
    assert status == 400
    # (ComfyUI files one copy of the message per input the check reads)
    error = response["node_errors"][sampler]["errors"][0]
    assert error["type"] == "custom_validation_failed" and "cfg must be a finite number" in error["details"]
    long = json.loads(json.dumps(prompt))
    long[encode]["inputs"]["prompt"] = "a red fox " * 700
    status, response = comfy.queue(long, uuid.uuid4().hex)
    assert status == 400
    error = response["node_errors"][encode]["errors"][0]
    assert "tokens long" in error["details"] and "truncate" in error["details"]


@pytest.mark.parametrize("path", sorted((ROOT / "tests" / "workflows" / "legacy").glob("*.json")), ids=lambda p: p.stem)
def test_workflows_saved_with_0_1_0_still_run(comfy, object_info, demo_models, path):
    """Workflows saved with the first release use the deprecated loader and sampler: ComfyUI still loads and runs
    them with every stored value meaning what it meant."""
    prompt = for_tiny_models(convert(json.loads(path.read_text(encoding="utf-8")), object_info),
                             tiny_files(demo_models), seed=5000 + len(path.stem))
    history, _, _ = run(comfy, prompt)
    assert history["status"]["status_str"] == "success", history["status"]
    assert object_info["IG4Sampler"]["deprecated"] and object_info["IG4ModelLoader"]["deprecated"]
