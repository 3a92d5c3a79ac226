"""Every DiT file layout the pack reads, loaded as core MODELs in a real ComfyUI, against the pack's own DiT on the
same file (itself checked against diffusers 0.42.1 and the reference decoders in tests/models).

Core's model returns a denoised latent in FLUX.2 channel order for sigma = 1 - t; ours a velocity in token order:
v = (denoised - x) / sigma after reordering (docs/spec.md §C1.4-§C1.6).
"""

from __future__ import annotations

import sys

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from ideogram4_gguf.models.dit_loader import load_dit_branches
from ideogram4_gguf.models.latents import flux2_to_token_order, samples_to_tokens
from safetensors.torch import load_file, save_file

from .harness import ROOT, run_ok

sys.path.insert(0, str(ROOT / "tests" / "models"))
import dit_files  # noqa: E402
from dit_reference import official_state_dict, tiny_diffusers_dit  # noqa: E402

# Tiny, but with head_dim 128 so that the published RoPE sections apply to files that carry no metadata.
SHAPE = dict(attention_head_dim=128, num_attention_heads=2, intermediate_size=256, num_layers=1)
SIGMA, SEED, TEXT_TOKENS, GRID = 0.7, 23, 3, 2


def _pair(seed):
    return (official_state_dict(tiny_diffusers_dit(seed, **SHAPE)),
            official_state_dict(tiny_diffusers_dit(seed + 1, **SHAPE)))


def write_sd_cpp_pair(folder, names):
    cond, uncond = _pair(61)
    dit_files.write_gguf(folder / names[0], {"": cond}, Q.Q8_0)
    dit_files.write_gguf(folder / names[1], {"": uncond}, Q.Q8_0)


def write_comfy_fp8_pair(folder, names):
    cond, uncond = _pair(63)
    for name, state, prefix in ((names[0], cond, "model.diffusion_model."), (names[1], uncond, "")):
        saved, _ = dit_files.fp8_state(state, "tensor")
        save_file({(prefix + k if k != "scaled_fp8" else k): v for k, v in saved.items()}, folder / name)


def write_official_fp8_pair(folder, names):
    cond, uncond = _pair(65)
    for name, state in zip(names, (cond, uncond)):
        saved, _ = dit_files.fp8_state(state, "row")
        save_file(saved, folder / name)


def write_bf16_split_pair(folder, names):
    for name, seed in zip(names, (67, 68)):
        model = tiny_diffusers_dit(seed, **SHAPE)
        save_file({k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}, folder / name)


LAYOUTS = {"sd.cpp Q8_0 GGUF pair": write_sd_cpp_pair, "ComfyUI fp8_scaled pair": write_comfy_fp8_pair,
           "official fp8 (per-row scale) pair": write_official_fp8_pair,
           "bf16 diffusers split-name pair": write_bf16_split_pair}


def forward_graph(cond_name, uncond_name, label):
    loader = {"class_type": "IG4CoreModelLoader", "inputs": {"dit_name": cond_name, "uncond_name": uncond_name,
                                                             "compute_dtype": "fp32"}}
    probe = {"class_type": "IG4TestModelForward", "inputs": {"label": "", "seed": SEED, "grid": GRID}}
    return {"load": loader,
            "cond": {**probe, "inputs": {**probe["inputs"], "model": ["load", 0], "label": f"{label}_cond",
                                         "text_tokens": TEXT_TOKENS}},
            "uncond": {**probe, "inputs": {**probe["inputs"], "model": ["load", 1], "label": f"{label}_uncond",
                                           "text_tokens": 0}}}


def probe_inputs(channels, features):
    """The probe's seeded inputs (probe_pack IG4TestModelForward): x in core's layout, then the text features."""
    generator = torch.Generator().manual_seed(SEED)
    x = torch.randn(1, channels, GRID, GRID, generator=generator)
    return x, torch.randn(1, TEXT_TOKENS, features, generator=generator)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_core_model_equals_the_packs_dit_for_every_layout(comfy, tmp_path, layout):
    label = layout.split()[0].replace(".", "") + str(sorted(LAYOUTS).index(layout))
    names = (f"ideogram4-{label}-cond.{'gguf' if 'GGUF' in layout else 'safetensors'}",
             f"ideogram4-{label}-uncond.{'gguf' if 'GGUF' in layout else 'safetensors'}")
    LAYOUTS[layout](tmp_path, names)
    folder = comfy.base_dir / "models" / "diffusion_models"
    for name in names:
        (folder / name).symlink_to(tmp_path / name)
    try:
        run_ok(comfy, forward_graph(*names, label))
    finally:
        for name in names:
            (folder / name).unlink()
    cond, uncond, _ = load_dit_branches(tmp_path / names[0], tmp_path / names[1], compute_dtype=torch.float32)
    x, features = probe_inputs(cond.config.in_channels, cond.config.llm_features_dim)
    tokens, grid = samples_to_tokens(flux2_to_token_order(x))
    t = torch.tensor([1.0 - SIGMA])
    expected = {"cond": cond(tokens, t, cond.project_text(features[0]), grid), "uncond": uncond(tokens, t, None, grid)}
    for branch, want in expected.items():
        denoised = load_file(comfy.base_dir / "output" / f"{label}_{branch}.safetensors")["tensor"]
        got, _ = samples_to_tokens(flux2_to_token_order((denoised - x) / SIGMA))
        error = ((got - want).norm() / want.norm()).item()
        print(f"{layout} {branch}: core MODEL vs the pack's DiT, relative difference {error:.1e}")
        assert want.abs().max() > 0.1 and error < 1e-5, (layout, branch, error)
