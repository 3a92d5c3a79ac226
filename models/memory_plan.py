"""Memory modes and the memory plan of sampling: which branches each mode streams, the computed peak device memory of
one image (`SamplingPeak`) and the "auto" choice. Computed from shapes and byte counts, never measured; the
streaming itself is `residency.py`. Facts behind the plans: docs/spec.md §G8; docs/memory.md.

| mode | conditional branch | unconditional branch | device memory (full size, Q4_K, 1024², computed) |
|---|---|---|---|
| `gpu` | resident | resident | both branches (10.44 GB) + activations |
| `stream_uncond` | resident | pinned host memory, streamed | one branch (5.22 GB) + a few layers in flight + activations |
| `cpu_offload` | streamed | streamed | a few layers in flight + activations |
| `auto` | the first of the three above that fits the free device memory (on the CPU: everything resident) | | |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import Ideogram4Error, SamplingError, quote
from .dit import Ideogram4Config, Ideogram4DiT

MEMORY_MODES = ("auto", "gpu", "stream_uncond", "cpu_offload")
# Which branches each explicit mode streams.
STREAMED = {"gpu": (), "stream_uncond": ("uncond",), "cpu_offload": ("cond", "uncond")}
# Units fetched ahead of the one computing. One 149 MB Q4_K block copies in ~6 ms over PCIe 4.0 and computes in
# ~35 ms (uncond, 1024², RTX 3090, computed), so one ahead hides the copies; more only costs memory.
DEFAULT_PREFETCH = 1
# Share of the free device memory `auto` plans to use; the rest absorbs allocator fragmentation and estimate error.
AUTO_HEADROOM = 0.9


# torch.OutOfMemoryError (torch >= 2.5), else the CUDA one it replaced
TORCH_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class DeviceMemoryError(Ideogram4Error, TORCH_OUT_OF_MEMORY):
    """Out of GPU memory while sampling, with the memory modes that would fit. Still a torch OutOfMemoryError, so
    ComfyUI treats it as one (it unloads models and shows its out-of-memory tip). Here, beside the memory modes its
    message names, and not in errors.py, which stays torch-free: the command line imports errors.py before torch,
    so that `download` runs without torch."""


def check_memory_mode(mode) -> str:
    """`mode` when it is one of MEMORY_MODES; else the one SamplingError every caller raises for it."""
    if not isinstance(mode, str) or mode not in MEMORY_MODES:
        # named as the loader node and load_model name the input
        raise SamplingError(f"memory_mode {quote(mode)} is not one of {', '.join(MEMORY_MODES)}; pick one of those "
                            "(docs/memory.md).")
    return mode


def _stored_tensors(module: nn.Module):
    """Every parameter and buffer of the module and its submodules: what a placement stores or moves."""
    for owner in module.modules():
        yield from (p for p in owner._parameters.values() if p is not None)
        yield from (b for b in owner._buffers.values() if b is not None)


def module_stored_bytes(module: nn.Module, device: torch.device | None = None) -> int:
    """Bytes of every stored tensor of a branch (packed blocks, fp8 + scales, plain parameters) wherever they are, or
    only those on `device`."""
    return sum(t.numel() * t.element_size() for t in _stored_tensors(module) if device is None or t.device == device)


# ---------------------------------------------------------------------------------------------------------------
# Peak estimate and the "auto" choice (computed, not measured)


@dataclass(frozen=True)
class SamplingPeak:
    """Computed device memory of one image, by phase. All numbers are estimates from the shapes (docs/memory.md)."""

    mode: str
    width: int
    height: int
    text_tokens: int
    resident_weights: int  # stored bytes resident on the device for the whole run
    stream_window: int  # streamed units alive at once during a forward (copies in flight, computing, finishing)
    text_projection: int  # transient of project_text (features, their casts, the dense llm_cond_proj)
    denoise: int  # the busiest moment of the largest forward (activations, a dequantized weight)
    decode: int  # VAE weights + decode activations (0 when not given)

    @property
    def phases(self) -> dict[str, int]:
        base = self.resident_weights
        # Streamed blocks are in flight only while a branch runs its forward; project_text streams just the two text
        # modules (counted in text_projection when the conditional branch is streamed).
        return {
            "text_projection": base + self.text_projection,
            "denoise": base + self.stream_window + self.denoise,
            "decode": base + self.decode,
        }

    @property
    def total(self) -> int:
        return max(self.phases.values())

    def describe(self) -> str:
        phases = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in self.phases.items())
        return (f"{self.mode} {self.width}x{self.height}, {self.text_tokens} text tokens: peak {self.total / 2**30:.2f} "
                f"GiB ({self.total / 1e9:.2f} GB) computed; {phases}")


# Live activation tensors of one block at its busiest moments, in units of (rows x hidden x element size) on top
# of the residual stream h, read off dit.py's Block.forward and measured with a CPU allocation trace (fp32, hidden
# 1024, 1088 and 2432 rows: 12.25 units with h, independent of the row count; tests/models/test_residency.py keeps
# the estimate within 15 % of that trace):
# - rotating k: x, the qkv output (3), rotated q, normed k and the rotation's temporaries (x*cos, the half-rotated
#   copy, its product with sin, the sum), plus the contiguous copy rms_norm makes of the strided k view;
# - the qkv GEMM: x, the dense (dequantized) weight, the output (3);
# - the w3 GEMM: x, silu(w1 x), the dense weight, w3 x;
# - the SwiGLU product: x, silu(w1 x), w3 x and their product.
ROTATION_UNITS = 11.25
# plus a fixed allowance for small tensors (modulations, RoPE tables, latents, velocities) and library workspaces
# (cuBLAS keeps up to 32 MiB per stream).
FIXED_ALLOWANCE = 96 << 20


def _block_peak_bytes(config: Ideogram4Config, rows: int, element: int, residual_element: int,
                      dense_weights: bool) -> int:
    """Peak bytes one block allocates (residual stream included); dense_weights: the Linears expand their stored
    weights to the compute dtype in forward (quantized / fp8 storage)."""
    unit = rows * config.hidden_size * element
    ratio = config.intermediate_size / config.hidden_size
    weights = _linear_weights(config)
    transient = {name: n * element if dense_weights else 0 for name, n in weights.items()}
    moments = (
        ROTATION_UNITS * unit,
        (1 + 3) * unit + transient["qkv"],
        (1 + 2 * ratio) * unit + transient["w3"],
        (1 + 3 * ratio) * unit,
    )
    return int(rows * config.hidden_size * residual_element + max(moments))


def _linear_weights(config: Ideogram4Config) -> dict[str, int]:
    h, m, a = config.hidden_size, config.intermediate_size, config.adaln_dim
    return {"qkv": 3 * h * h, "o": h * h, "w1": m * h, "w3": m * h, "w2": h * m, "adaln_modulation": 4 * h * a}


def branch_parameters(config: Ideogram4Config, with_text: bool) -> tuple[int, int]:
    """(weights of the whole branch, weights of one block), counted on a meta-device model."""
    with torch.device("meta"):
        branch = Ideogram4DiT(config, with_text)
    total = sum(p.numel() for p in branch.parameters())
    return total, sum(p.numel() for p in branch.layers[0].parameters())


def estimate_peak_bytes(mode: str, config: Ideogram4Config, cond_bytes: int, uncond_bytes: int, width: int = 1024,
                        height: int = 1024, text_tokens: int = 512, *, compute_dtype=torch.bfloat16,
                        prefetch: int = DEFAULT_PREFETCH, vae_bytes: int = 0, vae_decode_bytes: int = 0,
                        feature_dtype=torch.float32) -> SamplingPeak:
    """Computed peak device memory of one image (batch 1) in an explicit memory mode.

    cond_bytes / uncond_bytes: stored bytes of the branches (`module_stored_bytes(branch)`; the unconditional branch
    has no llm_cond_* tensors). vae_bytes / vae_decode_bytes: the VAE's weights and decode activations
    (models/vae_tiling.py `estimate_decode_peak`), 0 to leave the decode out. The text features are assumed to arrive
    on the device in `feature_dtype`.
    """
    if mode not in STREAMED:
        raise ValueError(f"estimate_peak_bytes needs an explicit mode ({', '.join(STREAMED)}), got {mode!r}")
    element = torch.empty(0, dtype=compute_dtype).element_size()
    residual = 4 if compute_dtype == torch.float16 else element  # fp16 mode keeps the residual stream in float32
    image_rows = (width // 16) * (height // 16)
    streamed = STREAMED[mode]

    cond_weights, block_weights = branch_parameters(config, with_text=True)
    per_weight = {"cond": cond_bytes / cond_weights,
                  "uncond": uncond_bytes / branch_parameters(config, with_text=False)[0]}
    resident = sum(b for role, b in (("cond", cond_bytes), ("uncond", uncond_bytes)) if role not in streamed)
    branch_bytes = {"cond": cond_bytes, "uncond": uncond_bytes}
    windows = [min(int((prefetch + 2) * block_weights * per_weight[role]), branch_bytes[role]) for role in streamed]
    # cpu_offload: the host starts the unconditional branch's first copies while the conditional one's last
    # blocks still run, so both windows can be alive for a moment.
    window = sum(windows)

    # Stored weights smaller than the compute dtype (quantized, fp8) are expanded per Linear during forward.
    dense_weights = cond_bytes / cond_weights < element
    denoise = _block_peak_bytes(config, text_tokens + image_rows, element, residual, dense_weights)
    features = text_tokens * config.llm_features_dim
    feature_element = torch.empty(0, dtype=feature_dtype).element_size()
    projection = features * (feature_element + 2 * element)
    if dense_weights:
        projection += config.llm_features_dim * config.hidden_size * element
    if "cond" in streamed:
        projection += int(config.llm_features_dim * config.hidden_size * per_weight["cond"])
    return SamplingPeak(mode, width, height, text_tokens, resident + FIXED_ALLOWANCE, window, projection, denoise,
                        vae_bytes + vae_decode_bytes)


def resolve_memory_mode(mode: str, cond_branch, uncond_branch, device, free_bytes: int | None = None,
                        width: int = 1024, height: int = 1024, text_tokens: int = 512, **estimate_options) -> str:
    """The explicit mode for `mode`: itself, or for "auto" the first of gpu / stream_uncond / cpu_offload whose
    computed peak fits AUTO_HEADROOM of the free device memory (`free_bytes`, default: what CUDA reports free plus
    what these branches already hold on the device). On a CPU device "auto" is "gpu": everything stays resident.
    """
    check_memory_mode(mode)
    device = torch.device(device)
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "gpu"
    cond_bytes, uncond_bytes = module_stored_bytes(cond_branch), module_stored_bytes(uncond_branch)
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
        free_bytes += sum(module_stored_bytes(b, device) for b in (cond_branch, uncond_branch))
    estimate_options.setdefault("compute_dtype", cond_branch.compute_dtype)
    for candidate in ("gpu", "stream_uncond"):
        peak = estimate_peak_bytes(candidate, cond_branch.config, cond_bytes, uncond_bytes, width, height,
                                   text_tokens, **estimate_options)
        if peak.total <= AUTO_HEADROOM * free_bytes:
            return candidate
    return "cpu_offload"


__all__ = [
    "AUTO_HEADROOM",
    "DEFAULT_PREFETCH",
    "MEMORY_MODES",
    "STREAMED",
    "TORCH_OUT_OF_MEMORY",
    "DeviceMemoryError",
    "SamplingPeak",
    "branch_parameters",
    "check_memory_mode",
    "estimate_peak_bytes",
    "module_stored_bytes",
    "resolve_memory_mode",
]
