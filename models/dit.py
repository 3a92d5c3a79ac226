"""The Ideogram 4 diffusion transformer: one class for both CFG branches.

Architecture facts (official `ideogram-oss/ideogram4` 415abf4 `modeling_ideogram4.py`, identical in diffusers
0.42.1 `transformer_ideogram4.py`): a single-stream DiT over [text rows | image rows], sandwich RMSNorm blocks with
tanh-gated AdaLN scales (no shift), QK-RMSNorm, interleaved 3-axis MRoPE, SwiGLU MLP, sinusoidal time embedding.

What differs from the reference code (all numerically neutral, see docs/deviations.md):
- the text features are projected once per image (`project_text`), not in every forward;
- the sequence holds only real rows (no padding, no masks), so attention runs without a mask and PyTorch may pick
  its flash kernel; the unconditional branch holds image rows only and has no `llm_cond_*` modules at all;
- the final layer runs on the image rows only, and the output is always float32 velocities.

The model is built on the meta device and filled by `from_weights` with whatever the weight source hands out for a
Linear (a plain `nn.Linear`, or the packed `QuantLinear` / `Fp8Linear` from `ops`), so no weight is copied here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ModelFileError
from ..quant_tools import layout

# Image tokens sit at this offset on all three RoPE axes so they never collide with text positions (official
# IMAGE_POSITION_OFFSET).
IMAGE_POSITION_OFFSET = 65536

# Largest finite float16. In fp16 mode branch outputs are clamped to it before they meet a norm (see _fp16_guard).
FP16_MAX = 65504.0

# The tensor whose presence identifies an Ideogram 4 DiT (row 0 = text/padding, row 1 = image token).
ARCH_TENSOR = layout.ARCH_TENSOR


class Ideogram4Config(layout.Ideogram4Config):
    """Shape of one branch: fields, defaults (the published model, docs/spec.md §2.1), checks and tensor table are
    quant_tools' torch-free `layout.Ideogram4Config`; this subclass only makes a config that cannot work raise the
    pack's ModelFileError."""

    Error = ModelFileError


def default_compute_dtype(device) -> torch.dtype:
    """bf16 where the GPU has fast bf16 (Ampere and newer), fp16 on older GPUs, fp32 on the CPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.float32
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    return torch.float16


# ---------------------------------------------------------------------------------------------------------------
# Rotary position embedding (interleaved 3-axis MRoPE)


def mrope_axes(config: Ideogram4Config) -> torch.Tensor:
    """Which position axis (0 = T, 1 = H, 2 = W) drives each of the head_dim/2 frequencies.

    Index rule of the reference (docs/spec.md §2.5): frequency j follows H when j % 3 == 1 and j < 3*sections[1], W when
    j % 3 == 2 and j < 3*sections[2], T otherwise. With (24, 20, 20) on head_dim 256 T gets 88 frequencies.
    """
    axes = torch.zeros(config.head_dim // 2, dtype=torch.long)
    for axis in (1, 2):
        axes[axis : 3 * config.mrope_section[axis] : 3] = axis
    return axes


def sequence_positions(text_len: int, grid: tuple[int, int]) -> torch.Tensor:
    """(text_len + gh*gw, 3) positions: text token i at (i, i, i), image token (r, c) at 65536 + (0, r, c)."""
    gh, gw = grid
    text = torch.arange(text_len).unsqueeze(1).expand(text_len, 3)
    rows = torch.arange(gh).repeat_interleave(gw)
    cols = torch.arange(gw).repeat(gh)
    image = torch.stack([torch.zeros_like(rows), rows, cols], dim=1) + IMAGE_POSITION_OFFSET
    return torch.cat([text, image], dim=0)


def rotary_cos_sin(config: Ideogram4Config, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (L, head_dim) in float32 for (L, 3) integer positions.

    Always float32: in bf16 the positions near 65536 would collapse onto a handful of values and flatten the image.
    """
    head_dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    per_axis = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (L, 3, head_dim/2)
    axes = mrope_axes(config).to(positions.device)
    angles = per_axis.gather(1, axes.expand(per_axis.shape[0], 1, -1)).squeeze(1)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


@dataclass
class RotaryTables:
    """cos/sin for one sequence layout, already in the compute dtype and on the device, built once per image.

    The conditional branch uses all rows; the unconditional branch (image rows only) uses the tail, so one table
    serves both branches.
    """

    cos: torch.Tensor  # (text_len + N, 1, head_dim): broadcasts over the heads of (B, L, H, D)
    sin: torch.Tensor
    text_len: int

    def rows(self, with_text: bool) -> tuple[torch.Tensor, torch.Tensor]:
        start = 0 if with_text else self.text_len
        return self.cos[start:], self.sin[start:]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


# ---------------------------------------------------------------------------------------------------------------
# Time embedding


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of model time, float32, sin half first (official `EmbedScalar`, input range [0, 1]).

    `t` arrives already rounded to the compute dtype when the sampler runs in parity mode; the embedding itself is
    always computed in float32, as the reference does.
    """
    scaled = 1e4 * t.to(torch.float32)
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -(math.log(1e4) / (half - 1)))
    angles = scaled.unsqueeze(-1) * freq
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        out_dtype = out_dtype or self.weight.dtype
        if x.dtype == self.weight.dtype == out_dtype:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # fp16 mode only: norms read and write the float32 residual stream, so normalise in float32.
        out = F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps)
        return _saturate_fp16(out) if out_dtype == torch.float16 else out.to(out_dtype)


class Embedding(nn.Module):
    """A bare (rows, hidden) table; only its rows are read, so no nn.Embedding machinery."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim))


def _saturate_fp16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> float16 without creating infinities (a plain cast turns |x| > 65504 into inf)."""
    return x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)


def _fp16_guard(x: torch.Tensor) -> torch.Tensor:
    """Keep an fp16 branch output finite before it meets a norm: an inf would turn the whole row into NaN."""
    if x.dtype != torch.float16:
        return x
    return torch.nan_to_num(x, nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX)


class Attention(nn.Module):
    def __init__(self, config: Ideogram4Config):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)  # rows [q | k | v], head-major
        self.o = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.norm_q = RMSNorm(config.head_dim, eps=1e-5)
        self.norm_k = RMSNorm(config.head_dim, eps=1e-5)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim).unbind(2)
        q = apply_rotary(self.norm_q(q), cos, sin)
        k = apply_rotary(self.norm_k(k), cos, sin)
        # One prompt per forward and no padding: every row attends to every row, so no mask is passed and SDPA is
        # free to choose its flash / memory-efficient kernel.
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(out.transpose(1, 2).reshape(batch, length, -1))


class FeedForward(nn.Module):
    def __init__(self, config: Ideogram4Config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # gate (SiLU)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(_fp16_guard(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    """Sandwich-norm block: h += tanh(gate) * norm2(f(norm1(h) * (1 + scale))), once for attention, once for MLP."""

    def __init__(self, config: Ideogram4Config):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm1 = RMSNorm(config.hidden_size, config.norm_eps)
        self.attention_norm2 = RMSNorm(config.hidden_size, config.norm_eps)
        self.ffn_norm1 = RMSNorm(config.hidden_size, config.norm_eps)
        self.ffn_norm2 = RMSNorm(config.hidden_size, config.norm_eps)
        self.adaln_modulation = nn.Linear(config.adaln_dim, 4 * config.hidden_size)

    def forward(self, h: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaln_modulation(c).chunk(4, dim=-1)
        gate_msa, gate_mlp = torch.tanh(gate_msa), torch.tanh(gate_mlp)
        scale_msa, scale_mlp = 1.0 + scale_msa, 1.0 + scale_mlp

        # h.dtype is the compute dtype, except in fp16 mode where the residual stream is float32: the post-norms
        # then write float32 so that the residual update itself cannot overflow.
        attn = self.attention(self.attention_norm1(h) * scale_msa, cos, sin)
        h = h + gate_msa * self.attention_norm2(_fp16_guard(attn), out_dtype=h.dtype)
        mlp = self.feed_forward(self.ffn_norm1(h) * scale_mlp)
        return h + gate_mlp * self.ffn_norm2(_fp16_guard(mlp), out_dtype=h.dtype)


class TimeEmbedding(nn.Module):
    def __init__(self, config: Ideogram4Config):
        super().__init__()
        self.mlp_in = nn.Linear(config.hidden_size, config.hidden_size)
        self.mlp_out = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        emb = timestep_embedding(t, self.mlp_in.in_features).to(dtype)
        return self.mlp_out(F.silu(self.mlp_in(emb)))


class FinalLayer(nn.Module):
    def __init__(self, config: Ideogram4Config):
        super().__init__()
        self.linear = nn.Linear(config.hidden_size, config.in_channels)
        self.adaln_modulation = nn.Linear(config.adaln_dim, config.hidden_size)

    def forward(self, h: torch.Tensor, c: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # A second SiLU on c (already SiLU'd by the model): the reference does exactly this.
        scale = 1.0 + self.adaln_modulation(F.silu(c))
        normed = F.layer_norm(h, h.shape[-1:], eps=1e-6).to(dtype)
        return self.linear(normed * scale)


# ---------------------------------------------------------------------------------------------------------------
# The model


class Ideogram4DiT(nn.Module):
    """One branch of Ideogram 4. The conditional branch is built `with_text=True`; the unconditional branch with
    `with_text=False` has no `llm_cond_*` modules and sees image rows only.

    Module names mirror the official tensor names (`layers.N.attention.qkv`, ...), so the expected tensor list is
    simply this module's parameter names (`expected_tensor_names`).
    """

    def __init__(self, config: Ideogram4Config, with_text: bool = True):
        super().__init__()
        self.config = config
        self.with_text = with_text
        self.input_proj = nn.Linear(config.in_channels, config.hidden_size)
        if with_text:
            self.llm_cond_norm = RMSNorm(config.llm_features_dim, eps=1e-6)
            self.llm_cond_proj = nn.Linear(config.llm_features_dim, config.hidden_size)
        self.t_embedding = TimeEmbedding(config)
        self.adaln_proj = nn.Linear(config.hidden_size, config.adaln_dim)
        self.embed_image_indicator = Embedding(2, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_layer = FinalLayer(config)

    # -- construction -------------------------------------------------------------------------------------------

    @classmethod
    def expected_tensor_names(cls, config: Ideogram4Config, with_text: bool = True) -> list[str]:
        with torch.device("meta"):
            return [name for name, _ in cls(config, with_text).named_parameters()]

    @classmethod
    def from_weights(
        cls,
        config: Ideogram4Config,
        weights,
        *,
        with_text: bool = True,
        compute_dtype: torch.dtype = torch.float32,
        device="cpu",
        kernel: str = "auto",
    ) -> "Ideogram4DiT":
        """Build on the meta device, then take every Linear from `weights.linear(prefix, compute_dtype, device)` and
        every other parameter from `weights.tensor(name, compute_dtype, device)`.

        `weights` is an `ops` WeightSource (GGUF, safetensors) or `ops.StateDictSource`; quantized tensors
        stay packed inside the Linear modules it returns. kernel: the dequant kernel of those ("auto", "triton",
        "torch"; see `ops.QuantLinear`).
        """
        with torch.device("meta"):
            model = cls(config, with_text)
        for name, module in list(model.named_modules()):
            if type(module) is nn.Linear:
                _set_submodule(model, name, weights.linear(name, compute_dtype, device, kernel=kernel))
        for name, param in list(model.named_parameters()):
            if param.is_meta:
                owner, _, attr = name.rpartition(".")
                value = weights.tensor(name, compute_dtype, device)
                setattr(model.get_submodule(owner), attr, nn.Parameter(value, requires_grad=False))
        return model.requires_grad_(False).eval()

    # Every plain parameter is held in the compute dtype (and packed Linears follow `.to(dtype)`), so one of them
    # tells the dtype and device even after `model.to(...)`.
    @property
    def device(self) -> torch.device:
        return self.embed_image_indicator.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.embed_image_indicator.weight.dtype

    # -- per-image preparation ----------------------------------------------------------------------------------

    @torch.no_grad()
    def project_text(self, text_features: torch.Tensor) -> torch.Tensor:
        """llm_cond_proj(llm_cond_norm(features)): (n, F) or (B, n, F) -> (.., n, hidden) in the compute dtype.

        Independent of t, so the sampler calls it once per image instead of in every step.
        """
        if not self.with_text:
            raise RuntimeError("The unconditional branch takes no text; project the text with the conditional one.")
        dtype = self.compute_dtype
        # The reference casts the features to the compute dtype before the norm; in fp16 an LLM's outlier
        # activations could exceed 65504 there, so fp16 mode normalises in float32 first.
        features = text_features.to(device=self.device, dtype=torch.float32 if dtype == torch.float16 else dtype)
        return self.llm_cond_proj(self.llm_cond_norm(features, out_dtype=dtype))

    def rotary(self, text_len: int, grid: tuple[int, int]) -> RotaryTables:
        """cos/sin for `text_len` text rows followed by the gh x gw image grid; both branches can share it."""
        cos, sin = rotary_cos_sin(self.config, sequence_positions(text_len, grid).to(self.device))
        dtype = self.compute_dtype
        return RotaryTables(cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1), text_len)

    # -- forward ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def forward(
        self,
        latent_tokens: torch.Tensor,
        t: torch.Tensor,
        projected_text: torch.Tensor | None,
        grid: tuple[int, int],
        rotary: RotaryTables | None = None,
    ) -> torch.Tensor:
        """Velocity dz/dt (model time, 0 = noise) on the image rows: (B, N, C) float32.

        latent_tokens (B, N, C) row-major over the grid; t (B,) model time (the embedding reads it in float32, so
        round it beforehand for reference parity); projected_text from `project_text` ((n, hidden), (1, n, hidden) or
        (B, n, hidden)) for the conditional branch, None for the unconditional one.
        """
        batch, num_image, _ = latent_tokens.shape
        if num_image != grid[0] * grid[1]:
            raise ValueError(f"{num_image} latent tokens do not fill a {grid[0]}x{grid[1]} grid.")
        if (projected_text is not None) != self.with_text:
            raise ValueError("The conditional branch needs projected text; the unconditional branch takes none.")
        dtype = self.compute_dtype
        indicator = self.embed_image_indicator.weight

        h = self.input_proj(latent_tokens.to(device=self.device, dtype=dtype)) + indicator[1]
        text_len = 0
        if projected_text is not None:
            text = projected_text if projected_text.dim() == 3 else projected_text.unsqueeze(0)
            text_len = text.shape[1]
            h = torch.cat([(text + indicator[0]).expand(batch, -1, -1), h], dim=1)

        t = t.reshape(-1).to(self.device).expand(batch)
        c = F.silu(self.adaln_proj(self.t_embedding(t, dtype))).unsqueeze(1)  # (B, 1, adaln_dim)

        if rotary is None:
            rotary = self.rotary(text_len, grid)
        cos, sin = rotary.rows(with_text=projected_text is not None)
        if cos.shape[0] != h.shape[1]:
            raise ValueError(f"Rotary tables cover {cos.shape[0]} rows, the sequence has {h.shape[1]}.")

        # fp16 has too little range for the residual stream (activations grow across 34 blocks); keep it in float32
        # and let only the block internals run in fp16. bf16 keeps the reference's bf16 residual.
        if dtype == torch.float16:
            h = h.float()
        for block in self.layers:
            h = block(h, c, cos, sin)

        # Text rows matter only as attention context: the final layer runs on the image rows alone.
        return self.final_layer(h[:, text_len:], c, dtype).float()


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(root.get_submodule(owner), attr, module)
