"""Tiny random Ideogram 4 transformers written in each release layout, and the ggml reference quantizer.

The tensor names come from diffusers' `Ideogram4Transformer2DModel` (the executable reference, split attention
names); the official fused layout is derived from them by row concatenation (q, k, v), as docs/spec.md §2.2.1
describes. torch is used here only to build and write the test files (quant_tools itself never imports it).
"""

import json
from pathlib import Path

import pytest


def _torch():
    return pytest.importorskip("torch", reason="torch builds the test models (quant_tools itself never imports it)")


def save_file(state, path):
    from safetensors.torch import save_file as save

    save(state, path)

# Dims chosen so that every linear but input_proj (K = in_channels = 128) and llm_cond_proj (K = 13 * 64 = 832)
# has K % 256 == 0: the q4_k recipe then exercises both Q4_K and the block-size fallback.
TINY = dict(in_channels=128, num_layers=2, attention_head_dim=256, num_attention_heads=2, intermediate_size=768,
            adaln_dim=256, llm_features_dim=13 * 64, mrope_section=(4, 2, 2))
SMALL = dict(in_channels=128, num_layers=2, attention_head_dim=128, num_attention_heads=2, intermediate_size=512,
             adaln_dim=256, llm_features_dim=13 * 64, mrope_section=(4, 2, 2))


def diffusers_state_dict(dims, seed):
    """Re-randomised diffusers Ideogram4Transformer2DModel weights (float32, split attention names) + config."""
    torch = _torch()
    from diffusers import Ideogram4Transformer2DModel

    torch.manual_seed(seed)
    model = Ideogram4Transformer2DModel(**dims)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in model.state_dict().items():
        if value.ndim == 1:
            base = 1.0 if "norm" in name else 0.0
            state[name] = base + 0.05 * torch.randn(value.shape, generator=g)
        else:
            w = 0.02 * torch.randn(value.shape, generator=g)
            w[:, :: max(1, value.shape[1] // 8)] *= 8  # a few outlier input columns, like real checkpoints
            state[name] = w
    config = {"_class_name": "Ideogram4Transformer2DModel", **dict(model.config)}
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_use")}
    return state, config


def fuse_attention(state):
    """diffusers split names -> official fused names (qkv = rows of to_q, to_k, to_v; o = to_out.0)."""
    torch = _torch()
    fused = {}
    for name, value in state.items():
        if ".attention.to_q." in name:
            stem = name.split(".attention.")[0] + ".attention."
            fused[stem + "qkv.weight"] = torch.cat(
                [state[stem + "to_q.weight"], state[stem + "to_k.weight"], state[stem + "to_v.weight"]], 0)
        elif ".attention.to_out.0." in name:
            fused[name.replace("to_out.0", "o")] = value
        elif ".attention.to_k." in name or ".attention.to_v." in name:
            continue
        else:
            fused[name] = value
    return fused


def to_fp8(state, per_row=True, scale_suffix=".weight_scale"):
    """Weight-only float8 e4m3fn with a weight scale for every 2-D weight except input_proj/embed_image_indicator."""
    torch = _torch()
    out = {}
    for name, value in state.items():
        if value.ndim == 2 and name.endswith(".weight") and not name.startswith(("input_proj", "embed_image")):
            if per_row:
                scale = value.abs().amax(dim=1).clamp(min=1e-12) / 448.0
                q = (value / scale[:, None]).to(torch.float8_e4m3fn)
            else:
                scale = value.abs().amax().clamp(min=1e-12) / 448.0
                q = (value / scale).to(torch.float8_e4m3fn)
            out[name] = q
            out[name[: -len(".weight")] + scale_suffix] = scale.float()
        else:
            out[name] = value.to(torch.bfloat16)
    return out


def write_sharded(state, folder, stem="diffusion_pytorch_model", shards=2):
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n].contiguous() for n in part}, str(folder / fname))
        weight_map.update({n: fname for n in part})
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _branch_models(dims, cond_seed, uncond_seed):
    """{"cond"|"uncond": (official fused float32 state dict, diffusers split state dict, config)} at `dims`."""
    models = {}
    for role, seed in (("cond", cond_seed), ("uncond", uncond_seed)):
        split, config = diffusers_state_dict(dims, seed)
        models[role] = (fuse_attention(split), split, config)
    return models


@pytest.fixture(scope="session")
def tiny_models():
    return _branch_models(TINY, 1, 2)


@pytest.fixture(scope="session")
def small_models():
    return _branch_models(SMALL, 3, 4)


@pytest.fixture(scope="session")
def layouts(tmp_path_factory, small_models):
    """Every supported release layout of the same SMALL model pair, as CLI arguments."""
    torch = _torch()
    root = tmp_path_factory.mktemp("layouts")
    made = {}

    # official fp8 repo: transformer/ + unconditional_transformer/, single file, fused names, per-row scales
    repo = root / "fp8_repo"
    for role, sub in (("cond", "transformer"), ("uncond", "unconditional_transformer")):
        fused, _, config = small_models[role]
        (repo / sub).mkdir(parents=True)
        save_file(to_fp8(fused), str(repo / sub / "diffusion_pytorch_model.safetensors"))
        (repo / sub / "config.json").write_text(json.dumps(config))
    made["fp8_repo"] = ["--source", str(repo)]

    # sharded official repo (index.json + 2 shards per branch)
    sharded = root / "fp8_sharded"
    for role, sub in (("cond", "transformer"), ("uncond", "unconditional_transformer")):
        fused, _, config = small_models[role]
        write_sharded(to_fp8(fused), sharded / sub)
        (sharded / sub / "config.json").write_text(json.dumps(config))
    made["fp8_sharded"] = ["--source", str(sharded)]

    # bf16 diffusers conversion: split attention names, one folder per branch passed separately
    for role, sub in (("cond", "transformer"), ("uncond", "unconditional_transformer")):
        _, split, config = small_models[role]
        folder = root / "bf16_diffusers" / sub
        folder.mkdir(parents=True)
        save_file({k: v.to(torch.bfloat16) for k, v in split.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
        (folder / "config.json").write_text(json.dumps(config))
    made["bf16_diffusers"] = ["--source", str(root / "bf16_diffusers" / "transformer"),
                              "--source-uncond", str(root / "bf16_diffusers" / "unconditional_transformer")]

    # the same bf16 weights with official fused names (one file per branch): must give the same GGUF tensors
    for role in ("cond", "uncond"):
        fused, _, _ = small_models[role]
        folder = root / "bf16_fused"
        folder.mkdir(exist_ok=True)
        save_file({k: v.to(torch.bfloat16) for k, v in fused.items()}, str(folder / f"{role}.safetensors"))
    made["bf16_fused"] = ["--source", str(root / "bf16_fused" / "cond.safetensors"),
                          "--source-uncond", str(root / "bf16_fused" / "uncond.safetensors")]

    # ComfyUI single files: model.diffusion_model. prefix, per-tensor fp8 scale, comfy bookkeeping tensors
    comfy = root / "comfy"
    comfy.mkdir()
    for role, fname in (("cond", "ideogram4_fp8_scaled.safetensors"),
                        ("uncond", "ideogram4_unconditional_fp8_scaled.safetensors")):
        fused, _, _ = small_models[role]
        state = {"model.diffusion_model." + k: v for k, v in to_fp8(fused, per_row=False).items()}
        state["model.diffusion_model.layers.0.attention.qkv.input_scale"] = torch.tensor(1.0)
        state["model.diffusion_model.scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
        save_file(state, str(comfy / fname))
    made["comfy"] = ["--source", str(comfy / "ideogram4_fp8_scaled.safetensors"),
                     "--source-uncond", str(comfy / "ideogram4_unconditional_fp8_scaled.safetensors")]

    # plain fp16 / fp32 single files without prefix or config
    for dtype, tag in ((torch.float16, "fp16"), (torch.float32, "fp32")):
        folder = root / tag
        folder.mkdir()
        for role in ("cond", "uncond"):
            fused, _, _ = small_models[role]
            save_file({k: v.to(dtype) for k, v in fused.items()}, str(folder / f"{role}.safetensors"))
        made[tag] = ["--source", str(folder / "cond.safetensors"), "--source-uncond", str(folder / "uncond.safetensors")]
    return made


# ---- the ggml reference quantizer (ggml-python 0.0.45, `ggml_quantize_chunk`, docs/spec.md §G4.6) ----

@pytest.fixture(scope="session")
def ggml_quantize():
    from gguf_files import ggml_quantize as reference

    return reference


@pytest.fixture
def repo_root():
    return Path(__file__).resolve().parents[2]
