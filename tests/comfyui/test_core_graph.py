"""Our DiT files as core MODELs and the official sampler as core SIGMAS / GUIDER / NOISE, in a real ComfyUI.

References: the pack's own Ideogram4 Sampler on the same files, seed and settings (itself checked against diffusers'
`Ideogram4Pipeline`, tests/sampler), and core's own Ideogram 4 template chain (DualModelGuider + CFGOverride +
Ideogram4Scheduler) running on our MODELs and CONDITIONING.
"""

from __future__ import annotations

import json
import uuid

import pytest
import torch
from ideogram4_gguf.models.latents import flux2_to_token_order
from safetensors.torch import load_file

from .harness import probe, run_ok, tiny_files, wait_for

PROMPT = ('{"high_level_description":"A red fox on a blue poster","compositional_deconstruction":{"background":'
          '"blue","elements":[{"type":"text","text":"FOX","desc":"big white letters"}]}}')
SIZE, STEPS, SEED = 256, 3, 5150


def saved_latent(comfy, history: dict, node_id: str) -> torch.Tensor:
    [entry] = history["outputs"][node_id]["latents"]
    return load_file(comfy.base_dir / "output" / entry["subfolder"] / entry["filename"])["latent_tensor"]


def core_graph(files: dict, *, seed=SEED, terminal="official", guidance=7.0, polish_steps=1, prefix="core",
               dtype="auto") -> dict:
    """Our core MODEL loader -> Ideogram4 Sigmas / Guider / Noise -> SamplerCustomAdvanced -> SaveLatent."""
    return {
        "load": {"class_type": "IG4CoreModelLoader", "inputs": {"dit_name": files["diffusion_models"],
                                                                "uncond_name": "(none)", "compute_dtype": dtype}},
        "encode": {"class_type": "IG4TextEncode", "inputs": {
            "text_encoder": files["text_encoders"], "prompt": PROMPT, "tokenizer": "auto", "compute_dtype": "auto",
            "keep_loaded": False, "strict_json": False, "truncate": False}},
        "guider": {"class_type": "IG4OfficialGuider", "inputs": {
            "model": ["load", 0], "model_uncond": ["load", 1], "positive": ["encode", 1], "guidance": guidance,
            "polish_steps": polish_steps, "polish_guidance": 3.0, "round_t": True}},
        "sigmas": {"class_type": "IG4OfficialSigmas", "inputs": {
            "steps": STEPS, "width": SIZE, "height": SIZE, "mu": 0.5, "std": 1.75, "terminal": terminal}},
        "noise": {"class_type": "IG4OfficialNoise", "inputs": {"noise_seed": seed}},
        "latent": {"class_type": "IG4EmptyLatent", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sample": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["latent", 0]}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": prefix}},
    }


def pack_sampler_graph(files: dict, *, seed=SEED, terminal="official", prefix="pack", dtype="auto") -> dict:
    """The same image with the pack's own nodes (turbo preset: mu 0.5, std 1.75, guidance 7 with 1 polish step)."""
    return {
        "load": {"class_type": "IG4ModelLoader", "inputs": {
            "dit_name": files["diffusion_models"], "uncond_name": "(none)", "compute_dtype": dtype,
            "dequant_kernel": "auto", "memory_mode": "auto"}},
        "encode": {"class_type": "IG4TextEncode", "inputs": {
            "text_encoder": files["text_encoders"], "prompt": PROMPT, "tokenizer": "auto", "compute_dtype": "auto",
            "keep_loaded": False, "strict_json": False, "truncate": False}},
        "sample": {"class_type": "IG4Sampler", "inputs": {
            "model": ["load", 0], "conditioning": ["encode", 0], "width": SIZE, "height": SIZE, "batch_size": 1,
            "seed": seed, "preset": "turbo", "steps": STEPS, "guidance": 0.0, "polish_steps": -1,
            "polish_guidance": 0.0, "custom_schedule": False, "mu": 0.0, "std": 1.75, "terminal": terminal}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": prefix}},
    }


def write_cond_branch(two_branch, path):
    """The conditional branch of a two-branch GGUF as a stable-diffusion.cpp-style file: bare names, no metadata."""
    from gguf import GGMLQuantizationType as Q
    from gguf_files import write_gguf
    from ideogram4_gguf.ops import open_gguf

    prefix = "conditional_transformer."
    tensors = {}
    for name, tensor in open_gguf(two_branch).tensors.items():
        if name.startswith(prefix):
            raw = tensor.raw.numpy()
            quantized = tensor.qtype not in (Q.F16, Q.F32, Q.BF16)
            tensors[name[len(prefix):]] = (tensor.qtype, raw) if quantized else raw.reshape(tensor.shape)
    return write_gguf(path, tensors, arch="ideogram4")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("terminal", ["official", "one"])
def test_core_graph_reproduces_the_pack_sampler(comfy, demo_models, terminal):
    files = tiny_files(demo_models)
    ours = saved_latent(comfy, run_ok(comfy, pack_sampler_graph(files, terminal=terminal)), "save")
    core = saved_latent(comfy, run_ok(comfy, core_graph(files, terminal=terminal)), "save")
    assert core.shape == ours.shape == (1, 128, SIZE // 16, SIZE // 16)
    # core's sampler works in FLUX.2 channel order; ours saves token order
    error = relative(flux2_to_token_order(core), ours)
    print(f"core graph vs Ideogram4 Sampler ({terminal}): relative difference {error:.2e}")
    assert error < 1e-4
    # and it is a real comparison: another seed gives another latent
    other = saved_latent(comfy, run_ok(comfy, core_graph(files, seed=SEED + 1, terminal=terminal, prefix="other")),
                         "save")
    assert relative(flux2_to_token_order(other), ours) > 0.1


def test_core_graph_in_bf16_rounds_t_as_the_pack_sampler_does(comfy, demo_models):
    """bf16 on the CPU: the guider feeds the model sigma = 1 - bf16(t) (official t rounding), as Ideogram4 Sampler
    rounds t; without the rounding the two drift apart by far more than bf16 noise."""
    files = tiny_files(demo_models)
    ours = saved_latent(comfy, run_ok(comfy, pack_sampler_graph(files, dtype="bf16", prefix="pack16")), "save")
    core = flux2_to_token_order(saved_latent(comfy, run_ok(comfy, core_graph(files, dtype="bf16", prefix="core16")),
                                             "save"))
    unrounded = core_graph(files, dtype="bf16", prefix="core16raw")
    unrounded["guider"]["inputs"]["round_t"] = False
    raw = flux2_to_token_order(saved_latent(comfy, run_ok(comfy, unrounded), "save"))
    error, error_raw = relative(core, ours), relative(raw, ours)
    print(f"bf16 core graph vs Ideogram4 Sampler: {error:.2e} with t rounding, {error_raw:.2e} without")
    assert error < 2e-2 and error < error_raw


def test_polish_steps_switch_guidance_by_step_index(comfy, demo_models):
    files = tiny_files(demo_models)
    one = saved_latent(comfy, run_ok(comfy, core_graph(files, polish_steps=1, prefix="p1")), "save")
    same = saved_latent(comfy, run_ok(comfy, core_graph(files, polish_steps=1, guidance=7.0, prefix="p1b")), "save")
    two = saved_latent(comfy, run_ok(comfy, core_graph(files, polish_steps=2, prefix="p2")), "save")
    assert torch.equal(one, same)
    assert relative(two, one) > 1e-3


def test_core_template_chain_runs_on_our_models(comfy, demo_models):
    """core's own Ideogram 4 graph (Ideogram4Scheduler, CFGOverride, DualModelGuider with ConditioningZeroOut as
    the negative, EmptyFlux2LatentImage, core VAE-less SaveLatent) on our two MODELs and our CONDITIONING."""
    files = tiny_files(demo_models)
    graph = core_graph(files, prefix="template")
    graph.pop("guider"), graph.pop("sigmas"), graph.pop("noise"), graph.pop("latent")
    graph.update({
        "cfg_override": {"class_type": "CFGOverride", "inputs": {"model": ["load", 0], "cfg": 3.0,
                                                                 "start_percent": 0.7, "end_percent": 1.0}},
        "zero": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["encode", 1]}},
        "guider": {"class_type": "DualModelGuider", "inputs": {
            "model": ["cfg_override", 0], "model_negative": ["load", 1], "positive": ["encode", 1], "cfg": 7.0,
            "negative": ["zero", 0]}},
        "sigmas": {"class_type": "Ideogram4Scheduler", "inputs": {"steps": STEPS, "width": SIZE, "height": SIZE,
                                                                  "mu": 0.0, "std": 1.75}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
        "latent": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
    })
    latent = saved_latent(comfy, run_ok(comfy, graph), "save")
    assert latent.shape == (1, 128, SIZE // 16, SIZE // 16) and torch.isfinite(latent).all()
    assert latent.std() > 0.1


def test_core_graph_latent_decodes_with_the_packs_decoder(comfy, demo_models):
    files = tiny_files(demo_models)
    graph = core_graph(files, prefix="decoded")
    graph["decode"] = {"class_type": "IG4VAEDecode", "inputs": {"latent": ["sample", 0], "vae_name": files["vae"],
                                                               "tiled": "auto"}}
    graph["image"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "core_graph"}}
    history = run_ok(comfy, graph)
    [image] = history["outputs"]["image"]["images"]
    assert (comfy.base_dir / "output" / image["subfolder"] / image["filename"]).is_file()


def _refused_at_queue_time(comfy, graph, name, source, make):
    """Queue `graph` with `name` (made in diffusion_models by make(path, source), removed afterwards) as the core
    loader's file: our validate_inputs refuses it before anything runs. Returns the message."""
    target = comfy.base_dir / "models" / "diffusion_models" / name
    make(source, target)
    try:
        graph["load"]["inputs"]["dit_name"] = name
        status, response = comfy.queue(graph, uuid.uuid4().hex)
    finally:
        target.unlink()  # (the other tests list this folder)
    assert status == 400 and response["error"]["type"] == "prompt_outputs_failed_validation"
    error = response["node_errors"]["load"]["errors"][0]
    assert error["type"] == "custom_validation_failed" and error["extra_info"]["input_name"] == "dit_name"
    assert name in error["details"]
    return error["details"]


def test_a_single_branch_file_without_its_pair_is_a_clear_error(comfy, demo_models):
    graph = core_graph(tiny_files(demo_models), prefix="bad")
    message = _refused_at_queue_time(comfy, graph, "ideogram4-single-branch-test.gguf", demo_models.dit,
                                     write_cond_branch)
    assert "single DiT branch" in message and "unconditional" in message


def test_a_non_ideogram_gguf_is_a_clear_error(comfy, demo_models):
    graph = core_graph(tiny_files(demo_models), prefix="bad2")
    message = _refused_at_queue_time(comfy, graph, "not-an-ideogram-model.gguf", demo_models.text_encoder,
                                     lambda source, target: target.symlink_to(source))
    assert "not an Ideogram 4 DiT" in message and "text encoder" in message


def test_unload_models_releases_our_core_models(comfy, demo_models):
    graph = core_graph(tiny_files(demo_models), prefix="unload")
    graph["report"] = {"class_type": "IG4TestMemoryReport", "inputs": {"label": "core", "after": ["sample", 0]}}
    report = json.loads(run_ok(comfy, graph)["outputs"]["report"]["text"][0])
    ours = [m for m in report["loaded"] if m["model_class"] == "Ideogram4"]
    # both branches are loaded models of ComfyUI's own, counted at their packed size (the tiny model: ~2.2 MB each)
    assert len(ours) == 2 and all(0 < m["size"] < 4e6 for m in ours), report["loaded"]
    status, _, _ = comfy.request("/free", {"unload_models": True})
    assert status == 200
    after = wait_for(lambda: (lambda r: r if not any(m["model_class"] == "Ideogram4" for m in r["loaded"]) else None)(
        probe(comfy, "IG4TestMemoryReport")))
    assert after, "our core MODELs are still loaded after /free unload_models"
