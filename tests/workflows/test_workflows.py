"""The shipped workflows (workflows/*.json) against the pack's node schemas, and run on the tiny demo models.

The schemas come from the nodes' own `define_schema()` through the comfy_api stand-in (tests/nodes/
fake_comfy_api.py); tests/comfyui/test_real_comfyui.py checks the same files against a live ComfyUI.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ideogram4_gguf
from ideogram4_gguf.nodes import NODES
from ideogram4_gguf.prompts.caption import canonicalize, minify, validate_caption

from .tiny_run import LORA_INPUTS, MODEL_FILE_INPUTS, NO_FILE, for_tiny_models, run_prompt
from .ui_to_api import (CONTROL_VALUES, CORE_NODES, UI_ONLY, convert, is_widget, kept_nodes, ordered_inputs,
                        pack_object_info, widget_slots, widget_values)

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"
# Workflows sampling with the pack's own Ideogram4 Sampler, and the core-graph one (core MODELs, SamplerCustomAdvanced).
SAMPLER_WORKFLOWS = ["ideogram4_q4k_text_to_image", "ideogram4_q4k_json_prompt", "ideogram4_q4k_low_vram",
                     "ideogram4_q4k_lora", "ideogram4_q4k_upsample"]
CORE_GRAPH = "ideogram4_q4k_core_graph"
SHIPPED = SAMPLER_WORKFLOWS + [CORE_GRAPH]
# API-format copies (for scripting) -> the UI workflow they are the conversion of. In a subfolder, so ComfyUI's
# template browser (which lists workflows/*.json) does not offer them.
API_COPIES = {"api/ideogram4_q4k_text_to_image.json": "ideogram4_q4k_text_to_image.json"}

PACK_ID, CORE_ID = "ideogram4-gguf", "comfy-core"
# What each workflow is for (the choices docs/workflows.md describes).
SETTINGS = {
    "ideogram4_q4k_text_to_image": {("IG4Loader", "memory_mode"): "auto",
                                    ("IG4TextEncode", "text_encoder"): "qwen3vl_8b_fp8_scaled.safetensors"},
    "ideogram4_q4k_json_prompt": {("IG4Loader", "memory_mode"): "auto",
                                  ("IG4TextEncode", "text_encoder"): "qwen3vl_8b_fp8_scaled.safetensors"},
    "ideogram4_q4k_low_vram": {("IG4Loader", "memory_mode"): "stream_uncond",
                               ("IG4TextEncode", "text_encoder"): "Qwen3-VL-8B-Instruct-Q4_K_M.gguf",
                               ("IG4VAEDecode", "tiled"): "auto"},
    "ideogram4_q4k_lora": {("IG4Loader", "memory_mode"): "auto",
                           ("IG4TextEncode", "text_encoder"): "qwen3vl_8b_fp8_scaled.safetensors",
                           ("IG4LoraLoader", "strength"): 1.0, ("IG4LoraLoader", "branch"): "auto"},
    "ideogram4_q4k_upsample": {("IG4Loader", "memory_mode"): "auto",
                               ("IG4PromptUpsample", "text_encoder"): "Qwen3-VL-8B-Instruct-Q4_K_M.gguf",
                               ("IG4PromptUpsample", "lm_head"): "(from the text encoder)",
                               ("IG4PromptUpsample", "width"): 1024, ("IG4PromptUpsample", "height"): 1024,
                               ("IG4TextEncode", "text_encoder"): "Qwen3-VL-8B-Instruct-Q4_K_M.gguf"},
    CORE_GRAPH: {("IG4CoreModelLoader", "dit_name"): "ideogram4-q4_k.gguf",
                 ("IG4CoreModelLoader", "compute_dtype"): "auto",
                 ("IG4TextEncode", "text_encoder"): "qwen3vl_8b_fp8_scaled.safetensors",
                 ("IG4EmptyLatent", "width"): 1024, ("IG4EmptyLatent", "height"): 1024,
                 ("IG4OfficialSigmas", "steps"): 20, ("IG4OfficialSigmas", "mu"): 0.0,
                 ("IG4OfficialSigmas", "std"): 1.75, ("IG4OfficialSigmas", "terminal"): "official",
                 ("IG4OfficialGuider", "guidance"): 7.0, ("IG4OfficialGuider", "polish_steps"): 2,
                 ("IG4OfficialGuider", "polish_guidance"): 3.0, ("KSamplerSelect", "sampler_name"): "euler",
                 ("IG4VAEDecode", "vae_name"): "flux2-vae.safetensors"},
}
COMMON_SETTINGS = {("IG4PresetSampler", "width"): 1024, ("IG4PresetSampler", "height"): 1024,
                   ("IG4PresetSampler", "preset"): "default", ("IG4Loader", "dit_name"): "ideogram4-q4_k.gguf",
                   ("IG4VAEDecode", "vae_name"): "flux2-vae.safetensors"}
# The nodes each kind of workflow must run.
PIPELINE = {"sampler": {"IG4Loader", "IG4TextEncode", "IG4PresetSampler", "IG4VAEDecode", "SaveImage"},
            "core": {"IG4CoreModelLoader", "IG4TextEncode", "IG4OfficialGuider", "IG4OfficialSigmas",
                     "IG4OfficialNoise", "IG4EmptyLatent", "KSamplerSelect", "SamplerCustomAdvanced", "IG4VAEDecode",
                     "SaveImage"}}
HF_RESOLVE = re.compile(r"^https://huggingface\.co/[\w.-]+/[\w.-]+/resolve/main/(?:[\w.-]+/)*(?P<name>[\w.-]+)$")


def load(name) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def object_info():
    return pack_object_info()


@pytest.fixture(params=SHIPPED)
def workflow(request):
    return request.param, load(request.param)


def nodes_by_type(workflow: dict) -> dict[str, dict]:
    return {n["type"]: n for n in workflow["nodes"]}


def test_the_shipped_set_and_thumbnails():
    assert sorted(p.stem for p in WORKFLOWS.glob("*.json")) == sorted(SHIPPED)
    for name in SHIPPED:
        thumbnail = WORKFLOWS / f"{name}.jpg"
        assert thumbnail.stat().st_size < 100_000, f"{thumbnail.name} is over 100 KB"
        with Image.open(thumbnail) as image:
            assert image.format == "JPEG" and min(image.size) >= 256
            assert np.asarray(image.convert("L")).std() > 10  # a picture, not a blank
    for copy_name in API_COPIES:
        assert (WORKFLOWS / copy_name).is_file()


def test_top_level_format(workflow):
    _, wf = workflow
    assert wf["version"] == 0.4
    assert str(uuid.UUID(wf["id"])) == wf["id"]
    assert isinstance(wf["revision"], int) and wf["groups"] == [] and isinstance(wf["config"], dict)
    assert set(wf["extra"]["ds"]) == {"scale", "offset"} and wf["extra"]["frontendVersion"]
    node_ids = [n["id"] for n in wf["nodes"]]
    link_ids = [link[0] for link in wf["links"]]
    assert len(set(node_ids)) == len(node_ids) and len(set(link_ids)) == len(link_ids)
    assert wf["last_node_id"] >= max(node_ids) and wf["last_link_id"] >= max(link_ids)
    assert all(len(link) == 6 for link in wf["links"])


def test_nodes_exist_and_carry_their_properties(workflow, object_info):
    _, wf = workflow
    pack_ids = {n.define_schema().node_id for n in NODES}
    for node in wf["nodes"]:
        kind, props = node["type"], node["properties"]
        if kind in UI_ONLY:
            continue
        assert kind in object_info, f"unknown node type {kind}"
        assert props["Node name for S&R"] == kind
        if kind in pack_ids:
            assert (props["cnr_id"], props["ver"]) == (PACK_ID, ideogram4_gguf.__version__)
        else:
            assert kind in CORE_NODES and props["cnr_id"] == CORE_ID and re.fullmatch(r"\d+\.\d+\.\d+", props["ver"])


def test_sockets_and_widgets_follow_the_schemas(workflow, object_info):
    """The per-node `inputs` / `outputs` entries are what the frontend writes for these schemas: every input is
    listed (a widget input with its `widget` name), outputs in schema order, optional sockets with shape 7."""
    _, wf = workflow
    for node in kept_nodes(wf):
        info = object_info[node["type"]]
        expected = {name: (spec[0], is_widget(spec), required) for name, spec, required in ordered_inputs(info)}
        entries = {e["name"]: e for e in node["inputs"]}
        assert set(entries) == set(expected), node["type"]
        for name, (kind, widget, required) in expected.items():
            entry = entries[name]
            assert entry["type"] == kind, f"{node['type']}.{name}"
            assert (entry.get("widget") == {"name": name}) == widget, f"{node['type']}.{name}"
            assert (entry.get("shape") == 7) == (not required and not widget), f"{node['type']}.{name}"
        assert [o["type"] for o in node["outputs"]] == info["output"], node["type"]


def check_widget_value(node, name, spec, value):
    where = f"node {node['id']} {node['type']}.{name} = {value!r}"
    kind, options = spec[0], spec[1] if len(spec) > 1 else {}
    if (node["type"], name) in LORA_INPUTS:
        assert isinstance(value, str) and value.endswith(".safetensors"), where
    elif (node["type"], name) in MODEL_FILE_INPUTS and value != NO_FILE:
        listed = {(m["name"], m["directory"]) for m in node["properties"].get("models", [])}
        assert (value, MODEL_FILE_INPUTS[node["type"], name]) in listed, f"{where}: not in properties.models"
    elif kind == "COMBO":
        assert value in options["options"], where
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
        assert options.get("min", value) <= value <= options.get("max", value), where
        assert (value - options.get("min", 0)) % options.get("step", 1) == 0, where
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        assert options.get("min", value) <= value <= options.get("max", value), where
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where
    elif kind == "STRING":
        assert isinstance(value, str), where


def test_widget_values_fit(workflow, object_info):
    _, wf = workflow
    for node in kept_nodes(wf):
        info = object_info[node["type"]]
        slots = widget_slots(info)
        assert len(node["widgets_values"]) == len(slots), node["type"]
        for (name, spec), value in zip(slots, node["widgets_values"]):
            if spec is CONTROL_VALUES:
                # a new image each run; the upsampler keeps its caption (docs/workflows.md)
                expected = "fixed" if node["type"] == "IG4PromptUpsample" else "randomize"
                assert value == expected, f"{node['type']}.{name}: control {value!r}"
            else:
                check_widget_value(node, name, spec, value)
    for note in (n for n in wf["nodes"] if n["type"] in UI_ONLY):
        assert len(note["widgets_values"]) == 1 and note["widgets_values"][0].strip()


def test_links_type_check(workflow, object_info):
    _, wf = workflow
    nodes = {n["id"]: n for n in wf["nodes"]}
    for link_id, origin_id, origin_slot, target_id, target_slot, kind in wf["links"]:
        origin, target = nodes[origin_id], nodes[target_id]
        out = origin["outputs"][origin_slot]
        assert out["type"] == kind == object_info[origin["type"]]["output"][origin_slot]
        assert link_id in out["links"]
        entry = target["inputs"][target_slot]
        assert entry["link"] == link_id
        specs = {name: spec for name, spec, _ in ordered_inputs(object_info[target["type"]])}
        assert specs[entry["name"]][0] == entry["type"] == kind, f"link {link_id} into {target['type']}.{entry['name']}"
    linked = {(t, s) for _, _, _, t, s, _ in wf["links"]}
    for node in wf["nodes"]:  # no entry points at a link that is not in the list
        for slot, entry in enumerate(node.get("inputs", [])):
            assert (entry.get("link") is not None) == ((node["id"], slot) in linked)


def test_every_required_input_is_linked_or_set(workflow, object_info):
    name, wf = workflow
    prompt = convert(wf, object_info)
    assert {p["class_type"] for p in prompt.values()} >= PIPELINE["core" if name == CORE_GRAPH else "sampler"]
    for node_id, entry in prompt.items():
        info = object_info[entry["class_type"]]
        missing = [name for name, _, required in ordered_inputs(info) if required and name not in entry["inputs"]]
        assert not missing, f"node {node_id} {entry['class_type']} lacks {missing}"


def test_model_downloads_are_listed(workflow, object_info):
    _, wf = workflow
    for node in kept_nodes(wf):
        for (kind, name), directory in MODEL_FILE_INPUTS.items():
            if node["type"] != kind:
                continue
            value = widget_values(node, object_info[kind])[name]
            if value == NO_FILE:
                continue
            [entry] = [m for m in node["properties"]["models"] if m["name"] == value]
            assert entry["directory"] == directory
            match = HF_RESOLVE.match(entry["url"])
            assert match and match["name"] == value, entry["url"]


def test_settings_per_workflow(workflow, object_info):
    name, wf = workflow
    prompt = convert(wf, object_info)
    by_class = {p["class_type"]: p["inputs"] for p in prompt.values()}
    expected = SETTINGS[name] if name == CORE_GRAPH else {**COMMON_SETTINGS, **SETTINGS[name]}
    for (kind, input_name), value in expected.items():
        assert by_class[kind][input_name] == value, f"{name}: {kind}.{input_name}"
    kind, seed_input = ("IG4OfficialNoise", "noise_seed") if name == CORE_GRAPH else ("IG4PresetSampler", "seed")
    seed = widget_values(nodes_by_type(wf)[kind], object_info[kind])[seed_input]
    assert by_class[kind][seed_input] == seed and seed > 0  # the control value never reaches the API
    assert "randomize" not in json.dumps(prompt)


def test_core_graph_has_a_bypassed_lora_on_the_conditional_model(object_info):
    """The LoRA loader sits between our core MODEL loader and the guider, bypassed (mode 4): the queued prompt
    skips it and wires the loader's conditional MODEL straight into the guider."""
    wf = load(CORE_GRAPH)
    nodes = nodes_by_type(wf)
    lora, loader, guider = nodes["LoraLoaderModelOnly"], nodes["IG4CoreModelLoader"], nodes["IG4OfficialGuider"]
    assert lora["mode"] == 4
    links = {link[0]: link for link in wf["links"]}
    into_guider = {e["name"]: links[e["link"]] for e in guider["inputs"] if e.get("link") is not None}
    assert into_guider["model"][1] == lora["id"] and into_guider["model_uncond"][1:3] == [loader["id"], 1]
    [lora_in] = [links[e["link"]] for e in lora["inputs"] if e["name"] == "model"]
    assert lora_in[1:3] == [loader["id"], 0]
    prompt = convert(wf, object_info)
    assert "LoraLoaderModelOnly" not in {p["class_type"] for p in prompt.values()}
    assert prompt[str(guider["id"])]["inputs"]["model"] == [str(loader["id"]), 0]


def test_example_prompts_are_minified_captions(object_info):
    for name in ("ideogram4_q4k_text_to_image", "ideogram4_q4k_low_vram"):
        encode = nodes_by_type(load(name))["IG4TextEncode"]
        prompt = widget_values(encode, object_info["IG4TextEncode"])["prompt"]
        caption = json.loads(prompt)
        assert validate_caption(caption) == [], name
        assert prompt == minify(canonicalize(caption)), name


@pytest.mark.parametrize("name, source_type", [("ideogram4_q4k_json_prompt", "IG4JsonPrompt"),
                                                ("ideogram4_q4k_upsample", "IG4PromptUpsample")])
def test_caption_nodes_feed_the_encoder_through_its_prompt_widget(name, source_type, object_info):
    """The JSON Prompt's (or Prompt Upsample's) STRING output goes into Qwen3-VL Encode's multiline `prompt` widget
    turned into a socket: the frontend (1.47) writes it as the widget's input entry with a link, and keeps the
    widget's value slot."""
    wf = load(name)
    nodes = nodes_by_type(wf)
    encode, source = nodes["IG4TextEncode"], nodes[source_type]
    [entry] = [e for e in encode["inputs"] if e["name"] == "prompt"]
    assert entry["widget"] == {"name": "prompt"} and entry["type"] == "STRING"
    link = next(link for link in wf["links"] if link[0] == entry["link"])
    assert link[1:3] == [source["id"], 0] and link[5] == "STRING"
    assert len(encode["widgets_values"]) == len(widget_slots(object_info["IG4TextEncode"]))
    prompt = convert(wf, object_info)
    assert prompt[str(encode["id"])]["inputs"]["prompt"] == [str(source["id"]), 0]


@pytest.mark.parametrize("copy_name", sorted(API_COPIES))
def test_api_copy_is_the_conversion_of_the_ui_workflow(copy_name, object_info):
    """(When written, the copy was also checked equal to the ComfyUI frontend 1.47.10's own graphToPrompt().)"""
    api = json.loads((WORKFLOWS / copy_name).read_text(encoding="utf-8"))
    ui = json.loads((WORKFLOWS / API_COPIES[copy_name]).read_text(encoding="utf-8"))
    assert api == convert(ui, object_info)


@pytest.mark.parametrize("name", SAMPLER_WORKFLOWS)
def test_workflow_runs_on_the_tiny_models(name, object_info, demo_models, demo_lora, tmp_path):
    """The pack's nodes outside ComfyUI (the core-graph workflow needs core's sampler: tests/comfyui runs it)."""
    wf = load(name)
    files = {"diffusion_models": demo_models.dit, "text_encoders": demo_models.text_encoder, "vae": demo_models.vae,
             "loras": demo_lora}
    prompt = for_tiny_models(convert(wf, object_info), {k: str(v) for k, v in files.items()})
    outputs, saved = run_prompt(prompt, tmp_path)
    assert len(saved) == 1
    with Image.open(saved[0]) as png:
        pixels = np.asarray(png)
    assert pixels.shape == (256, 256, 3) and pixels.std() > 1
    by_class = {e["class_type"]: outputs[i] for i, e in prompt.items()}
    image = by_class["IG4VAEDecode"][0]
    assert image.shape == (1, 256, 256, 3) and torch.isfinite(image).all()
    conditioning = by_class["IG4TextEncode"][0]
    assert validate_caption(conditioning.prompt) == [], name  # every shipped prompt is a clean caption
    if "IG4JsonPrompt" in by_class:
        caption = json.loads(by_class["IG4JsonPrompt"][0])
        assert conditioning.prompt == by_class["IG4JsonPrompt"][0]
        texts = [e.get("text") for e in caption["compositional_deconstruction"]["elements"]]
        assert texts == ["BLUE NOTE NIGHTS", None, "FRIDAY 9 PM"]
    if "IG4PromptUpsample" in by_class:  # the upsampled caption reaches the encoder, the quoted title kept
        assert conditioning.prompt == by_class["IG4PromptUpsample"][0] and "NORTH COAST" in conditioning.prompt
