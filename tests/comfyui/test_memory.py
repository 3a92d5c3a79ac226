"""Our models inside ComfyUI's own memory manager, as only a running ComfyUI shows it (CPU server: there the
device is the CPU and ComfyUI manages RAM the way it manages VRAM on a GPU).

Checked through the test-only probe pack (probe_pack/): ComfyUI's list of loaded models, our live DiT pairs and
their placements, and the calls our nodes make into `comfy.model_management` (a spy on `free_memory` and
`get_free_memory`).
"""

from __future__ import annotations

import json

import pytest

from ..workflows.tiny_run import for_tiny_models
from ..workflows.ui_to_api import convert
from .harness import SHIPPED, load, node_id_of, probe, run_ok, tiny_files, wait_for

STAND_IN = "_Empty"  # nodes/comfy_adapter.py: what our stand-in ModelPatcher holds for ComfyUI


def ours(report: dict) -> list[dict]:
    return [m for m in report["loaded"] if m["model_class"] == STAND_IN and "ideogram4_gguf" in m["model_module"]]


@pytest.fixture
def text_to_image(comfy, object_info, demo_models):
    def build(seed):
        return for_tiny_models(convert(load(SHIPPED[0]), object_info), tiny_files(demo_models), seed=seed)

    return build


def with_report(prompt: dict, after_class: str) -> tuple[dict, str]:
    """`prompt` plus a memory report that runs after its `after_class` node, inside the same prompt (ComfyUI's
    cache drops a finished workflow's outputs when another prompt runs, and with them our DiT pair)."""
    [source] = [i for i, entry in prompt.items() if entry["class_type"] == after_class]
    prompt = {**prompt, "report": {"class_type": "IG4TestMemoryReport",
                                   "inputs": {"label": "in-workflow", "after": [source, 0]}}}
    return prompt, "report"


def test_placement_is_registered_and_unload_models_releases_it(comfy, text_to_image):
    probe(comfy, "IG4TestSpyMemory")
    prompt, report_id = with_report(text_to_image(seed=4000), "IG4PresetSampler")
    report = json.loads(run_ok(comfy, prompt)["outputs"][report_id]["text"][0])
    placed = [m for m in report["ideogram4_models"] if m["placed"]]
    assert placed, report
    [registered] = ours(report)
    # ComfyUI counts exactly the bytes our placement holds on its device
    assert registered["size"] == placed[0]["device_bytes"] > 0
    assert registered["device"] == "cpu"
    # the memory hook: before placing the DiT the sampler asked ComfyUI to make room for the computed peak
    assert [call for call in report["calls"]["free_memory"] if call["device"] == "cpu" and call["bytes"] > 0], report

    # ComfyUI's "Unload Models" (POST /free unload_models) calls our offload: placement released, stand-in gone,
    # and ComfyUI's prompt worker survives it
    status, _, _ = comfy.request("/free", {"unload_models": True})
    assert status == 200
    assert wait_for(lambda: "Ideogram 4 DiT: released its cpu copies" in comfy.log()), comfy.log_tail()
    after = probe(comfy, "IG4TestMemoryReport")
    assert not ours(after) and not any(m["placed"] for m in after["ideogram4_models"]), after
    assert "Traceback" not in comfy.log(), comfy.log_tail()


def test_the_vae_decode_plans_with_comfyuis_free_memory(comfy, text_to_image):
    probe(comfy, "IG4TestSpyMemory")
    prompt, report_id = with_report(text_to_image(seed=4050), "IG4VAEDecode")
    calls = json.loads(run_ok(comfy, prompt)["outputs"][report_id]["text"][0])["calls"]
    # the decode asks ComfyUI for room for its plan's peak, then reads the free memory it tiles for
    assert len([c for c in calls["free_memory"] if c["bytes"] > 0]) >= 2, calls
    assert calls["get_free_memory"], calls


def test_free_model_and_node_cache_drops_our_models(comfy, text_to_image):
    prompt, report_id = with_report(text_to_image(seed=4100), "IG4PresetSampler")
    assert json.loads(run_ok(comfy, prompt)["outputs"][report_id]["text"][0])["ideogram4_models"]
    # "Free model and node cache" (POST /free free_memory): models unloaded and node outputs dropped, so nothing
    # keeps our DiT pair alive any more
    status, _, _ = comfy.request("/free", {"free_memory": True})
    assert status == 200
    after = wait_for(lambda: (lambda r: r if not r["ideogram4_models"] else None)(probe(comfy, "IG4TestMemoryReport")))
    assert after, "a DiT pair is still alive after /free free_memory"
    assert not ours(after)
    # and the next run loads and registers again
    prompt, report_id = with_report(text_to_image(seed=4200), "IG4PresetSampler")
    assert ours(json.loads(run_ok(comfy, prompt)["outputs"][report_id]["text"][0]))
    assert "Traceback" not in comfy.log(), comfy.log_tail()


def test_a_kept_text_encoder_is_registered_and_unloaded_by_comfyui(comfy, text_to_image):
    prompt = text_to_image(seed=4300)
    encode = node_id_of(prompt, "IG4TextEncode")
    prompt[encode]["inputs"]["keep_loaded"] = True
    prompt, report_id = with_report(prompt, "IG4TextEncode")
    report = json.loads(run_ok(comfy, prompt)["outputs"][report_id]["text"][0])
    assert report["kept_encoders"] == 1
    assert len(ours(report)) >= 1 and all(m["size"] > 0 for m in ours(report)), report
    status, _, _ = comfy.request("/free", {"unload_models": True})
    assert status == 200
    after = wait_for(lambda: (lambda r: r if r["kept_encoders"] == 0 else None)(probe(comfy, "IG4TestMemoryReport")))
    assert after and not ours(after), after
