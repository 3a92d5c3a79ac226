"""Ideogram 4's text encoder: the text decoder of Qwen3-VL-8B, read at 13 depths.

Text-only Qwen3-VL is a plain Qwen3 decoder: its interleaved MRoPE gives every axis the same position for text
tokens, which is ordinary 1D RoPE (docs/spec.md §4.1, checked against transformers). The encoder runs the token
embedding and the decoder layers up to the deepest tap, records the outputs of layers 0, 3, ..., 33 and 35 (35
*before* the final norm, which Ideogram never applies) and interleaves them per token:
feature index = hidden_unit * 13 + tap_index, a (tokens, 53248) float32 matrix for the 8B model.

Linears are whatever the loader puts in (`nn.Linear`, or the quantized / fp8 layers of `ops`); this file only
holds the maths. `decode` (all layers + final norm + a KV cache) serves local prompt upsampling.
"""

from __future__ import annotations

import gc
import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# Outputs of these decoder layers (0-based) are the text features (official, diffusers, ComfyUI agree).
TAP_LAYERS = (0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 35)


@dataclass(frozen=True)
class Qwen3TextConfig:
    """Sizes of the Qwen3 text decoder. Defaults: Qwen3-VL-8B-Instruct (docs/spec.md §4.1)."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_layers: int = 36
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 5_000_000.0
    rms_norm_eps: float = 1e-6
    tap_layers: tuple[int, ...] = field(default=TAP_LAYERS)

    @property
    def feature_dim(self) -> int:
        return self.hidden_size * len(self.tap_layers)

    @property
    def layers_for_taps(self) -> int:
        return max(self.tap_layers) + 1

    @classmethod
    def from_hf_config(cls, config: dict) -> Qwen3TextConfig:
        """From a transformers `config.json` (a Qwen3-VL config with `text_config`, or a Qwen3 text config)."""
        text = config.get("text_config", config)
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        theta = rope.get("rope_theta", text.get("rope_theta", cls.rope_theta))
        return cls(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_layers=text["num_hidden_layers"],
            num_heads=text["num_attention_heads"],
            num_kv_heads=text.get("num_key_value_heads", text["num_attention_heads"]),
            head_dim=text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
            rope_theta=float(theta),
            rms_norm_eps=float(text.get("rms_norm_eps", cls.rms_norm_eps)),
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same op order as transformers' Qwen3 RMSNorm: normalise in fp32, round to the activation dtype,
        # then scale. Scaling in fp32 before rounding gives different bf16 bits.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


FP16_MAX = 65504.0  # largest finite float16


def _saturate(x: torch.Tensor) -> torch.Tensor:
    """fp16 only: keep a branch output finite (an inf would turn the row into NaN at the next norm)."""
    return x.clamp(-FP16_MAX, FP16_MAX) if x.dtype == torch.float16 else x


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin (n, head_dim) of rotate-half RoPE for integer `positions`, angles in fp32."""
    # inv_freq is built on the CPU like transformers' buffer: a GPU pow can differ in the last bit.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of every layer for the tokens seen so far (generation only)."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    @property
    def length(self) -> int:
        return next(iter(self.keys.values())).shape[2] if self.keys else 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if layer in self.keys:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Qwen3Attention(nn.Module):
    def __init__(self, config: Qwen3TextConfig, layer_index: int, dtype=None, device=None):
        super().__init__()
        c, kw = config, dict(bias=False, dtype=dtype, device=device)
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, **kw)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, **kw)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, **kw)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, **kw)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype, device)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype, device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None):
        b, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, n, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.keys[self.layer_index].shape[2] if self.layer_index in cache.keys else 0
            k, v = cache.append(self.layer_index, k, v)
        # GQA: query head h reads kv head h // group (transformers' repeat_kv order).
        group = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        if past == 0 or n == 1:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=n > 1)
        else:  # a chunk after cached tokens: causal mask offset by the cache length
            mask = torch.ones(n, past + n, dtype=torch.bool, device=x.device).tril(diagonal=past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class Qwen3MLP(nn.Module):
    def __init__(self, config: Qwen3TextConfig, dtype=None, device=None):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, **kw)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, **kw)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_saturate(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3TextConfig, layer_index: int, dtype=None, device=None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.self_attn = Qwen3Attention(config, layer_index, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.mlp = Qwen3MLP(config, dtype, device)

    def forward(self, h: torch.Tensor, cos, sin, cache: KVCache | None = None) -> torch.Tensor:
        # h is in the compute dtype, except in fp16 mode where the residual stream is float32 (Qwen's outlier
        # activations exceed fp16's range); the norms then hand the branches fp16 inputs. No-op casts otherwise.
        dtype = self.input_layernorm.weight.dtype
        h = h + _saturate(self.self_attn(self.input_layernorm(h).to(dtype), cos, sin, cache)).to(h.dtype)
        return h + _saturate(self.mlp(self.post_attention_layernorm(h).to(dtype))).to(h.dtype)


class Qwen3TextEncoder(nn.Module):
    """Token ids -> `text_taps` (tokens, 13 * hidden) float32.

    `num_layers`: decoder layers to build (default: as many as the taps need, 36 for the 8B model).
    `final_norm`: also build the final RMSNorm (only prompt upsampling uses it).
    The embedding table may live on another device than the layers (e.g. the CPU): rows are looked up there
    and only the (tokens, hidden) activations move.
    """

    def __init__(
        self,
        config: Qwen3TextConfig,
        num_layers: int | None = None,
        final_norm: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device=None,
    ):
        super().__init__()
        self.config = config
        num_layers = config.layers_for_taps if num_layers is None else num_layers
        if num_layers < config.layers_for_taps:
            raise ValueError(f"{num_layers} layers cannot reach tap layer {max(config.tap_layers)}")
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(config, i, dtype, device) for i in range(num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device) if final_norm else None

    @property
    def device(self) -> torch.device:
        return self.layers[0].input_layernorm.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """bf16, fp16 or fp32; follows `.to(dtype)` (the stored-form layers of `ops` follow it too)."""
        return self.layers[0].input_layernorm.weight.dtype

    @property
    def residual_dtype(self) -> torch.dtype:
        return torch.float32 if self.compute_dtype == torch.float16 else self.compute_dtype

    def embed(self, input_ids) -> torch.Tensor:
        """(1, n, hidden) activations in the residual dtype, on the layers' device."""
        table = next(itertools.chain(self.embed_tokens.parameters(), self.embed_tokens.buffers()))
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1).to(table.device)
        h = self.embed_tokens(ids)
        return h.to(device=self.device, dtype=self.residual_dtype).unsqueeze(0)

    def _rope(self, start: int, n: int):
        positions = torch.arange(start, start + n, device=self.device)
        return rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, self.compute_dtype)

    @torch.no_grad()
    def forward(self, input_ids) -> torch.Tensor:
        h = self.embed(input_ids)
        n, hidden, taps = h.shape[1], self.config.hidden_size, self.config.tap_layers
        if n == 0:
            raise ValueError("no tokens to encode")
        cos, sin = self._rope(0, n)
        # Written tap by tap into (n, hidden, taps): the interleaved layout is then a free reshape, and no
        # stack of 13 compute-dtype copies is ever held. Values are those of stacking then upcasting.
        text_taps = torch.empty(n, hidden, len(taps), dtype=torch.float32, device=self.device)
        slot = {layer: i for i, layer in enumerate(taps)}
        for index, layer in enumerate(self.layers[: max(taps) + 1]):
            h = layer(h, cos, sin)
            if index in slot:
                text_taps[:, :, slot[index]] = h[0]
        return text_taps.reshape(n, hidden * len(taps))

    @torch.no_grad()
    def decode(self, input_ids, cache: KVCache) -> torch.Tensor:
        """Final-normed hidden states (n, hidden) of new tokens after those in `cache` (which it extends)."""
        if self.norm is None:
            raise RuntimeError("this encoder was built without the final norm; load it for generation")
        h = self.embed(input_ids)
        cos, sin = self._rope(cache.length, h.shape[1])
        for layer in self.layers:
            h = layer(h, cos, sin, cache)
        return self.norm(h)[0]


def unload_text_encoder(encoder: nn.Module) -> None:
    """Free the encoder's memory now, even while callers still hold a reference to the module.

    Every parameter and buffer is moved to the meta device (no storage); the module cannot run afterwards.
    """
    encoder.to(device="meta")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
