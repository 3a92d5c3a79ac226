"""What the real-ComfyUI tests share: where things are, and queueing a prompt and following it to its end."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

from .comfy_server import WebSocket

ROOT = Path(__file__).resolve().parents[2]
PACK = "ideogram4_gguf"  # the folder name under custom_nodes = module name = template category
PROBE_PACK = "ig4_test_probe"  # tests/comfyui/probe_pack, loaded beside the pack (test-only)
WORKFLOWS = ROOT / "workflows"
SHIPPED = ["ideogram4_q4k_text_to_image", "ideogram4_q4k_json_prompt", "ideogram4_q4k_low_vram",
           "ideogram4_q4k_lora", "ideogram4_q4k_core_graph", "ideogram4_q4k_upsample"]
SAMPLER_NODES = ("IG4PresetSampler", "IG4SamplerAdvanced", "IG4Sampler", "SamplerCustomAdvanced")  # the node that samples, in the pack's and the core graphs
API_COPY = "api/ideogram4_q4k_text_to_image"
MIN_VERSION = (0, 25, 0)
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")


def comfy_python() -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    venv = Path(COMFYUI_DIR).resolve().parent / "comfy_venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def tiny_files(demo_models, paths=False, lora=None) -> dict:
    files = {"diffusion_models": demo_models.dit, "text_encoders": demo_models.text_encoder, "vae": demo_models.vae}
    if lora is not None:
        files["loras"] = lora
    return files if paths else {folder: path.name for folder, path in files.items()}


def load(name) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))


def node_id_of(prompt: dict, class_type: str) -> str:
    [node_id] = [i for i, entry in prompt.items() if entry["class_type"] == class_type]
    return node_id


def run(comfy, prompt: dict, on_event=None):
    """Queue `prompt` and follow it on the websocket to its end -> (history entry, events, binary event types)."""
    client_id = uuid.uuid4().hex
    ws = WebSocket(comfy.port, client_id)
    try:
        status, response = comfy.queue(prompt, client_id)
        assert status == 200, response
        assert response["node_errors"] == {}, response["node_errors"]
        prompt_id = response["prompt_id"]
        events = ws.until(lambda e: e["type"] == "executing" and e["data"].get("node") is None
                          and e["data"].get("prompt_id") == prompt_id, on_event=lambda e: on_event and on_event(e))
        return comfy.wait_history(prompt_id), events, ws.binary_events
    finally:
        ws.close()


def run_ok(comfy, prompt: dict) -> dict:
    """Run `prompt` and insist it succeeded -> its history entry."""
    history, _, _ = run(comfy, prompt)
    assert history["status"]["status_str"] == "success", history["status"]
    return history


def status_messages(history: dict) -> dict:
    return {name: data for name, data in history["status"]["messages"]}


def probe(comfy, node_type: str) -> dict:
    """Run one node of the test-only probe pack -> its JSON report."""
    history = run_ok(comfy, {"1": {"class_type": node_type, "inputs": {"label": uuid.uuid4().hex}}})
    return json.loads(history["outputs"]["1"]["text"][0])


def wait_for(check, timeout=20.0, interval=0.5):
    """Poll `check()` until it returns a truthy value (returned) or `timeout` passes (the last value returned)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
