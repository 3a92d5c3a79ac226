"""Write one tiny DiT pair in every file layout the loader accepts, and say what each tensor decodes to.

Each writer returns the arguments for `load_dit_branches` and the "stored" state dicts: every tensor as the file
holds it, decoded to float32 by the reference decoders (gguf-py `quants.dequantize` for GGUF blocks, fp8 x scale in
float32 for fp8). A model built from those must match the loaded one exactly.
"""

from __future__ import annotations

import json

import gguf
import gguf_files
import numpy as np
import torch
from gguf_files import ggml_quantize
from gguf import GGMLQuantizationType as Q
from safetensors.torch import save_file

LINEAR_EXCLUDE = ("embed_image_indicator.weight",)
FP8_MAX = 448.0  # float8_e4m3fn


def is_linear_weight(name: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2 and name not in LINEAR_EXCLUDE


# ---------------------------------------------------------------------------------------------------------------
# Encoders (reference implementations: gguf-py for Q8_0/Q4_0, llama.cpp's C quantizer via ggml-python for Q4_K)


def quantize_q4_k(weight: np.ndarray) -> np.ndarray:
    """llama.cpp `quantize_row_q4_K_ref` through ggml-python (docs/spec.md §G4.6)."""
    return ggml_quantize(weight, Q.Q4_K)


def encode_gguf(name: str, tensor: torch.Tensor, qtype: Q) -> tuple[object, torch.Tensor]:
    """(what to hand GGUFWriter, what the stored tensor decodes to in float32) for one tensor."""
    array = tensor.detach().float().numpy()
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if qtype in (Q.F32, Q.F16) or not is_linear_weight(name, tensor) or array.shape[-1] % block:
        storage = Q.F16 if qtype == Q.F16 else Q.F32
        stored = array.astype(np.float16 if storage == Q.F16 else np.float32)
        return stored, torch.from_numpy(stored.astype(np.float32))
    packed = quantize_q4_k(array) if qtype == Q.Q4_K else gguf.quants.quantize(array, qtype)
    return (qtype, packed), torch.from_numpy(gguf.quants.dequantize(packed, qtype).astype(np.float32))


def encode_fp8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Official fp8 release recipe: per-output-row scale = max|W_r| / 448, weight = fp8(W / scale)."""
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
    return (weight / scale[:, None]).to(torch.float8_e4m3fn), scale.float()


# ---------------------------------------------------------------------------------------------------------------
# File writers


def write_gguf(path, branches: dict[str, dict[str, torch.Tensor]], qtype: Q, metadata: dict | None = None):
    """One GGUF holding every {prefix: state_dict} branch; returns the decoded {prefix: state_dict}."""
    stored, decoded = {}, {}
    for prefix, state in branches.items():
        decoded[prefix] = {}
        for name, tensor in state.items():
            stored[prefix + name], decoded[prefix][name] = encode_gguf(name, tensor, qtype)
    metadata = {k: list(v) if isinstance(v, tuple) else v for k, v in (metadata or {}).items()}
    gguf_files.write_gguf(path, stored, metadata)
    return decoded


def gguf_metadata(config) -> dict:
    """The `ideogram4.*` keys our quant_tools writes."""
    return {
        "ideogram4.hidden_size": config.hidden_size, "ideogram4.num_layers": config.num_layers,
        "ideogram4.num_heads": config.num_heads, "ideogram4.head_dim": config.head_dim,
        "ideogram4.intermediate_size": config.intermediate_size, "ideogram4.adaln_dim": config.adaln_dim,
        "ideogram4.in_channels": config.in_channels, "ideogram4.llm_features_dim": config.llm_features_dim,
        "ideogram4.rope_theta": float(config.rope_theta), "ideogram4.mrope_section": list(config.mrope_section),
    }


def fp8_state(state: dict[str, torch.Tensor], scale_style: str, rest_dtype=torch.bfloat16):
    """(tensors to save, decoded float32 state). scale_style "row": official `<name>_scale` per row;
    "tensor": ComfyUI fp8_scaled `<layer>.scale_weight` scalar plus the `scaled_fp8` marker."""
    saved, decoded = {}, {}
    for name, tensor in state.items():
        if is_linear_weight(name, tensor):
            if scale_style == "row":
                fp8, scale = encode_fp8_rows(tensor)
                saved[name], saved[name + "_scale"] = fp8, scale
                decoded[name] = fp8.float() * scale[:, None]
            else:
                scale = (tensor.abs().max() / FP8_MAX).float()
                fp8 = (tensor / scale).to(torch.float8_e4m3fn)
                saved[name], saved[name[: -len("weight")] + "scale_weight"] = fp8, scale.reshape(())
                decoded[name] = fp8.float() * scale
        else:
            saved[name] = tensor.to(rest_dtype).contiguous()
            decoded[name] = saved[name].float()
    if scale_style == "tensor":
        saved["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    return saved, decoded


def diffusers_config_json(config) -> str:
    return json.dumps({
        "_class_name": "Ideogram4Transformer2DModel", "in_channels": config.in_channels,
        "num_layers": config.num_layers, "attention_head_dim": config.head_dim,
        "num_attention_heads": config.num_heads, "intermediate_size": config.intermediate_size,
        "adaln_dim": config.adaln_dim, "llm_features_dim": config.llm_features_dim,
        "rope_theta": int(config.rope_theta), "mrope_section": list(config.mrope_section),
    })


def save_sharded(folder, tensors: dict[str, torch.Tensor], shards: int = 2):
    """diffusers-style sharded checkpoint with `diffusion_pytorch_model.safetensors.index.json`."""
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: tensors[n] for n in part}, folder / file)
        weight_map.update({n: file for n in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
