"""FLUX.2 VAE decoder: the decode half of diffusers' `AutoencoderKLFlux2` and of BFL's flux2 `AutoEncoder`.

Architecture (docs/spec.md §5.4, full size): post_quant_conv 1x1 (32 -> 32) -> conv_in 3x3 (32 -> 512) ->
mid block (ResBlock, single-head attention over all H/8 x W/8 positions, ResBlock) -> 4 up levels, lowest
resolution first (512, 512, 256, 128 channels), each `layers_per_block + 1` ResBlocks and, for all but the last,
nearest x2 + conv3x3 -> GroupNorm -> SiLU -> conv_out 3x3 (128 -> 3). GroupNorm: 32 groups, eps 1e-6.
The shape (channels, levels, blocks, latent channels) is read from the weights, so tiny test models load too.

Module names are diffusers' (a diffusers state dict loads as is); BFL/ComfyUI names (`flux2-vae.safetensors`)
are mapped by `_bfl_to_diffusers` beside the loader. Encoder tensors are never read.

Memory: the decoder's peak is at full resolution, where one 256-channel activation is 2 GiB at 2048x2048 in bf16.
What keeps it down (numbers in docs/PERF.md):
- layers run from one flat loop, SiLU and residual adds are in place, so only the tensors a step needs are alive;
- GroupNorm -> SiLU -> conv3x3 and nearest-upsample -> conv3x3 run over row bands when a tensor is large, so the
  normalised (or upsampled) copy of a large activation never exists in full; GroupNorm statistics are still
  computed over the whole tensor (band-wise, merged), so the result equals the unbanded decoder up to rounding;
- the mid-block attention never materialises the full score matrix: queries are chunked whenever the scores of a
  math-backend SDPA call would exceed `max_score_bytes`;
- tiled decode when even that does not fit: the low-resolution head (mid-block attention included) runs whole,
  the high-resolution tail in overlapping tiles, blended linearly, normalised with image-wide GroupNorm
  statistics gathered in a first pass. `plan_decode` picks the cheapest mode that fits the free memory.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import pathlib
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelFileError, quote
from .latents import (
    LatentBatchNorm,
    LatentNorm,
    as_latent_tokens,
    compare_batch_norm,
    denormalize_tokens,
    image_to_comfy,
    tokens_to_vae_latent,
)

logger = logging.getLogger(__name__)

GROUP_NORM_EPS = 1e-6
# Largest float32 working copy of one row band (GroupNorm -> SiLU, upsample) before a conv. None = whole tensors.
DEFAULT_BAND_BYTES = 64 << 20
# Largest attention score block of one SDPA call, counted as float32 scores + softmax output (8 bytes/element).
DEFAULT_MAX_SCORE_BYTES = 128 << 20
# Tiling (output pixels): default tile when forced, smallest tile worth a more global head, search step; overlap
# = tile / 4, as diffusers' tile_overlap_factor 0.25.
DEFAULT_TILE_PX = 512
MIN_TILE_PX = 512
TILE_STEP_PX = 64
OVERLAP_FRACTION = 4
# What a VAE with a given latent channel count most likely is, for error messages.
_KNOWN_VAES = {4: "an SD 1.x / SDXL VAE", 16: "a FLUX.1 / SD3 VAE", 32: "the FLUX.2 VAE", 48: "a Wan 2.2 VAE"}


@dataclass(frozen=True)
class Flux2VAEConfig:
    latent_channels: int = 32
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # highest resolution first, as diffusers
    layers_per_block: int = 2
    norm_num_groups: int = 32
    out_channels: int = 3

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


# ---- memory-lean building blocks --------------------------------------------------------------------------------


def _band_rows(tensor_rows: int, row_bytes: int, band_bytes: int | None) -> int:
    """Rows per band so that one band's float32 copy stays under band_bytes (all rows when it already does)."""
    if band_bytes is None or row_bytes * tensor_rows <= band_bytes:
        return tensor_rows
    return max(1, band_bytes // row_bytes)


def _moments(x: torch.Tensor, groups: int, rows: int, region=None):
    """GroupNorm moments (count, mean, M2) in float32, shape (B, G, 1, 1, 1), read one row band at a time.

    `region` = (r0, r1, c0, c1) restricts them to a rectangle (None when it is empty). Band moments are merged
    with Chan's parallel formula, so no float32 copy of x is ever whole."""
    r0, r1, c0, c1 = region or (0, x.shape[2], 0, x.shape[3])
    if r1 <= r0 or c1 <= c0:
        return None
    moments = None
    for lo in range(r0, r1, rows):
        band = x[:, :, lo : min(lo + rows, r1), c0:c1].float().unflatten(1, (groups, x.shape[1] // groups))
        var, mean = torch.var_mean(band, dim=(2, 3, 4), correction=0, keepdim=True)
        count = band[0, 0].numel()
        moments = _merge_moments(moments, (count, mean, var * count))
    return moments


def _merge_moments(a, b):
    if a is None or b is None:
        return b if a is None else a
    count = a[0] + b[0]
    delta = b[1] - a[1]
    return count, a[1] + delta * (b[0] / count), a[2] + b[2] + delta.square() * (a[0] * b[0] / count)


class SharedGroupNorm:
    """GroupNorm statistics shared by all tiles of a tiled decode (two passes).

    Pass 1 ("record") decodes every tile with its own statistics and accumulates, per GroupNorm call, the moments
    of the tile's share of a partition of the image (`core`, fractions of the tile). Pass 2 ("apply") normalises
    every tile with those merged, image-wide statistics, so tiles do not drift apart in brightness or contrast;
    what remains is the error of the pass-1 estimate and the tile borders (docs/vae.md)."""

    def __init__(self):
        self.moments: list = []
        self.applying = False
        self.core = (0.0, 1.0, 0.0, 1.0)
        self._call = 0

    def start_tile(self, core=(0.0, 1.0, 0.0, 1.0)) -> None:
        self.core, self._call = core, 0

    def start_applying(self) -> None:
        self.applying = True

    def statistics(self, x: torch.Tensor, groups: int, eps: float, rows: int):
        index, self._call = self._call, self._call + 1
        if self.applying:
            count, mean, m2 = self.moments[index]
            return mean, torch.rsqrt(m2 / count + eps)
        height, width = x.shape[2], x.shape[3]
        fy0, fy1, fx0, fx1 = self.core
        region = (round(fy0 * height), round(fy1 * height), round(fx0 * width), round(fx1 * width))
        core = _moments(x, groups, rows, region)
        if index == len(self.moments):
            self.moments.append(core)
        else:
            self.moments[index] = _merge_moments(self.moments[index], core)
        count, mean, m2 = _moments(x, groups, rows)
        return mean, torch.rsqrt(m2 / count + eps)


def _norm_rows(x, norm: nn.GroupNorm, rows: int, shared: SharedGroupNorm | None, silu: bool):
    """A function (lo, hi) -> [SiLU](GroupNorm(x))[:, :, lo:hi] in x's dtype."""
    groups = norm.num_groups
    if shared is None and rows >= x.shape[2]:
        # Whole tensor, own statistics: the native kernel (one pass, fp32 statistics) and an in-place SiLU.
        def whole(lo, hi):
            normed = F.group_norm(x, groups, norm.weight, norm.bias, norm.eps)
            return F.silu(normed, inplace=True) if silu else normed

        return whole
    if shared is not None:
        mean, rstd = shared.statistics(x, groups, norm.eps, rows)
    else:
        count, mean, m2 = _moments(x, groups, rows)
        rstd = torch.rsqrt(m2 / count + norm.eps)
    # Per-channel affine form y = x * scale + shift (as the native kernel): one pass over each band.
    per_group = x.shape[1] // groups
    scale = rstd.flatten(1).repeat_interleave(per_group, dim=1) * norm.weight.float()
    shift = norm.bias.float() - mean.flatten(1).repeat_interleave(per_group, dim=1) * scale
    scale, shift = scale[:, :, None, None], shift[:, :, None, None]

    def rows_of(lo: int, hi: int) -> torch.Tensor:
        # A new float32 tensor (never a view of x); bf16 is rounded once, at the end.
        band = torch.addcmul(shift, x[:, :, lo:hi], scale)
        return (F.silu(band, inplace=True) if silu else band).to(x.dtype)

    return rows_of


def _upsample_source(x: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    """A function (lo, hi) -> nearest-x2-upsampled(x)[:, :, lo:hi] that upsamples only the rows it needs."""

    def rows_of(lo: int, hi: int) -> torch.Tensor:
        first = lo // 2
        upsampled = F.interpolate(x[:, :, first : (hi + 1) // 2], scale_factor=2.0, mode="nearest")
        return upsampled[:, :, lo - 2 * first : hi - 2 * first]

    return rows_of


def _conv3x3_rows(conv: nn.Conv2d, source: Callable[[int, int], torch.Tensor], height: int, rows: int) -> torch.Tensor:
    """conv(input) for a 3x3, padding-1 conv whose input rows come from `source`, one row band at a time.

    Each band reads one halo row on each side; its first/last output rows (computed against conv zero-padding
    instead of the halo) are dropped, except at the image border where zero-padding is the true input."""
    if rows >= height:
        return conv(source(0, height))
    out = None
    for r0 in range(0, height, rows):
        r1 = min(height, r0 + rows)
        lo, hi = max(r0 - 1, 0), min(r1 + 1, height)
        band = conv(source(lo, hi))
        if out is None:
            out = band.new_empty(band.shape[0], band.shape[1], height, band.shape[3])
        out[:, :, r0:r1] = band[:, :, r0 - lo : r1 - lo]
        del band
    return out


def mid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_score_bytes: int | None) -> torch.Tensor:
    """Single-head softmax attention over (B, N, C) without ever holding more than max_score_bytes of scores.

    Head dim 512 rules out FlashAttention and SDPA's CPU/math paths build the whole N x N score matrix
    (1 GiB at 1024x1024, 16 GiB at 2048x2048), so queries are chunked whenever the full matrix would be large."""
    batch, tokens, _ = q.shape
    chunk = tokens if max_score_bytes is None else max(1, max_score_bytes // (batch * tokens * 8))
    if chunk >= tokens:
        return F.scaled_dot_product_attention(q, k, v)
    out = torch.empty_like(q)
    for start in range(0, tokens, chunk):
        out[:, start : start + chunk] = F.scaled_dot_product_attention(q[:, start : start + chunk], k, v)
    return out


@dataclass(frozen=True)
class _Budget:
    band_bytes: int | None
    max_score_bytes: int | None
    shared_norm: SharedGroupNorm | None = None


# ---- the network (diffusers module names) ----------------------------------------------------------------------


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> GroupNorm -> SiLU -> conv3x3, plus the input (1x1 conv when widths differ)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=GROUP_NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=GROUP_NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, budget: _Budget) -> torch.Tensor:
        batch, channels, height, width = x.shape
        rows = _band_rows(height, batch * channels * width * 4, budget.band_bytes)
        h = _conv3x3_rows(self.conv1, _norm_rows(x, self.norm1, rows, budget.shared_norm, silu=True), height, rows)
        rows = _band_rows(height, batch * h.shape[1] * width * 4, budget.band_bytes)
        h = _conv3x3_rows(self.conv2, _norm_rows(h, self.norm2, rows, budget.shared_norm, silu=True), height, rows)
        if self.conv_shortcut is None:
            return h.add_(x)
        rows = _band_rows(height, batch * channels * width * 4, budget.band_bytes)
        for r0 in range(0, height, rows):
            h[:, :, r0 : r0 + rows] += self.conv_shortcut(x[:, :, r0 : r0 + rows])
        return h


class Upsampler(nn.Module):
    """Nearest x2, then conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, budget: _Budget) -> torch.Tensor:
        batch, channels, height, width = x.shape
        rows = _band_rows(2 * height, batch * channels * 2 * width * 4, budget.band_bytes)
        return _conv3x3_rows(self.conv, _upsample_source(x), 2 * height, rows)


class MidAttention(nn.Module):
    """Single-head self-attention over all positions (diffusers `Attention`, 1 head, scale 1/sqrt(C), residual)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor, budget: _Budget) -> torch.Tensor:
        batch, channels, height, width = x.shape
        normed = _norm_rows(x, self.group_norm, height, budget.shared_norm, silu=False)(0, height)
        normed = normed.flatten(2).transpose(1, 2)
        q, k, v = self.to_q(normed), self.to_k(normed), self.to_v(normed)
        del normed
        attended = mid_attention(q, k, v, budget.max_score_bytes)
        del q, k, v
        out = self.to_out[0](attended)
        del attended
        return out.transpose(1, 2).reshape(batch, channels, height, width).add_(x)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([MidAttention(channels, groups)])

    def layers(self) -> list[nn.Module]:
        return [self.resnets[0], self.attentions[0], self.resnets[1]]


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_resnets: int, groups: int, upsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_resnets
        self.resnets = nn.ModuleList([ResnetBlock(widths[i], widths[i + 1], groups) for i in range(num_resnets)])
        self.upsamplers = nn.ModuleList([Upsampler(out_channels)] if upsample else [])

    def layers(self) -> list[nn.Module]:
        return [*self.resnets, *self.upsamplers]


class Decoder(nn.Module):
    """Runs its layers one after the other from a flat loop, so each layer's input is released as soon as that
    layer returns (a per-block forward would keep a block's input, up to 2 GiB at 2048x2048, alive all block long)."""

    def __init__(self, config: Flux2VAEConfig):
        super().__init__()
        widths = list(reversed(config.block_out_channels))  # lowest resolution first
        groups = config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups)
        self.up_blocks = nn.ModuleList(
            UpBlock(widths[max(i - 1, 0)], widths[i], config.layers_per_block + 1, groups, i < len(widths) - 1)
            for i in range(len(widths))
        )
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=GROUP_NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, budget: _Budget) -> torch.Tensor:
        return self.tail(self.head(z, budget, 0), budget, 0)

    def head(self, z: torch.Tensor, budget: _Budget, levels: int) -> torch.Tensor:
        """conv_in, the mid block (global attention) and the first `levels` up blocks."""
        x = self.conv_in(z)
        for layer in self.mid_block.layers() + [layer for block in self.up_blocks[:levels] for layer in block.layers()]:
            x = layer(x, budget)
        return x

    def tail(self, x: torch.Tensor, budget: _Budget, levels: int) -> torch.Tensor:
        """The up blocks after the first `levels`, then GroupNorm -> SiLU -> conv_out."""
        for layer in [layer for block in self.up_blocks[levels:] for layer in block.layers()]:
            x = layer(x, budget)
        batch, channels, height, width = x.shape
        rows = _band_rows(height, batch * channels * width * 4, budget.band_bytes)
        source = _norm_rows(x, self.conv_norm_out, rows, budget.shared_norm, silu=True)
        return _conv3x3_rows(self.conv_out, source, height, rows)


class Flux2VAEDecoder(nn.Module):
    """FLUX.2 VAE decoder: (B, C, H/f, W/f) de-normalised VAE latent -> (B, 3, H, W) image in about [-1, 1].

    Build with `from_file` (diffusers or BFL/ComfyUI naming) or `from_state_dict`. `latent_bn` holds the file's
    own latent batch-norm statistics (None when it has none); this pack decodes with the official constants and
    uses them only for the ComfyUI core interchange (`latents.to_comfy_flux2`)."""

    def __init__(self, config: Flux2VAEConfig):
        super().__init__()
        self.config = config
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.decoder = Decoder(config)
        self.source = "<state dict>"
        self.latent_bn: LatentBatchNorm | None = None
        self.batch_norm_comparison = None  # set by from_file: the file's bn statistics vs the official constants

    # -- construction --------------------------------------------------------------------------------------------

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        norm_num_groups: int | None = None,
    ) -> Flux2VAEDecoder:
        """Load from a .safetensors file (or a diffusers `vae/` folder / repo folder holding one).

        `norm_num_groups` cannot be read from the weights: it comes from this argument, else a diffusers
        `config.json` beside the file, else 32 (FLUX.2)."""
        file, config_json = _resolve_vae_path(path)
        if norm_num_groups is None:
            norm_num_groups = int(config_json.get("norm_num_groups", 32))
        state_dict = _read_decoder_tensors(file)
        vae = cls.from_state_dict(state_dict, dtype=dtype, device=device, norm_num_groups=norm_num_groups, source=str(file))
        vae._report_batch_norm()
        return vae

    @classmethod
    def from_state_dict(
        cls,
        state_dict: dict[str, torch.Tensor],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        norm_num_groups: int = 32,
        source: str = "<state dict>",
    ) -> Flux2VAEDecoder:
        """Build from tensors in diffusers or BFL/ComfyUI naming (optionally prefixed); encoder tensors ignored.

        Tensors already in the target dtype and device are used as they are (no copy)."""
        decoder_sd, batch_norm = _canonical_decoder_state_dict(state_dict, source)
        config = _infer_config(decoder_sd, norm_num_groups, source)
        with torch.device("meta"):
            vae = cls(config)
        expected = vae.state_dict()
        missing = sorted(set(expected) - set(decoder_sd))
        unexpected = sorted(set(decoder_sd) - set(expected))
        if missing or unexpected:
            kind = _KNOWN_VAES.get(config.latent_channels)
            hint = f" (its {config.latent_channels} latent channels suggest {kind})" if kind and config.latent_channels != 32 else ""
            raise ModelFileError(
                f"{source} is not a complete FLUX.2 VAE decoder{hint}: missing {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}. "
                "The file may be truncated or a different VAE; use flux2-vae.safetensors (ComfyUI) or the Ideogram 4 "
                "vae/ folder"
            )
        for name, tensor in decoder_sd.items():
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise ModelFileError(
                    f"{source}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)} "
                    "for a FLUX.2 VAE decoder of this size; the file is damaged or a different model"
                )
        target_dtype = dtype or next(iter(decoder_sd.values())).dtype
        vae.load_state_dict({k: v.to(device or "cpu", target_dtype) for k, v in decoder_sd.items()}, assign=True)
        vae.source = source
        if batch_norm is not None:
            vae.latent_bn = LatentBatchNorm(batch_norm[0].float(), batch_norm[1].float(), source=source)
        return vae.eval()

    def _report_batch_norm(self) -> None:
        if self.latent_bn is None or self.latent_bn.channels != 128:
            return
        comparison = compare_batch_norm(self.latent_bn)
        self.batch_norm_comparison = comparison
        if not comparison.matches():
            logger.warning(
                "%s carries latent batch-norm statistics that differ from the official Ideogram 4 constants (%s). "
                "This pack decodes its latents with the official constants; ComfyUI core's VAE Decode uses the "
                "file's statistics, which the LATENT conversion to/from core accounts for.",
                self.source,
                comparison.describe(),
            )

    # -- properties ----------------------------------------------------------------------------------------------

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def scale_factor(self) -> int:
        return self.config.scale_factor

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    def check_token_channels(self, token_channels: int) -> None:
        """Raise a ModelFileError naming the file when latents with `token_channels` cannot go through this VAE."""
        if token_channels != 4 * self.latent_channels:
            raise ModelFileError(
                f"the VAE {self.source} has {self.latent_channels} latent channels "
                f"({_KNOWN_VAES.get(self.latent_channels, 'not the FLUX.2 VAE')}), so it decodes "
                f"{4 * self.latent_channels}-channel latents, but this latent has {token_channels} channels. "
                "Ideogram 4 needs the FLUX.2 VAE (32 latent channels): pick flux2-vae.safetensors or the Ideogram 4 "
                "vae/ file"
            )

    # -- decoding ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(
        self,
        vae_latent: torch.Tensor,
        band_bytes: int | None = DEFAULT_BAND_BYTES,
        max_score_bytes: int | None = DEFAULT_MAX_SCORE_BYTES,
        shared_norm: SharedGroupNorm | None = None,
    ) -> torch.Tensor:
        """(B, C, h, w) de-normalised latent -> (B, 3, h*f, w*f) in the VAE dtype, not clamped."""
        if vae_latent.ndim != 4 or vae_latent.shape[1] != self.latent_channels:
            self.check_token_channels(4 * vae_latent.shape[1] if vae_latent.ndim == 4 else -1)
        z = self.post_quant_conv(vae_latent.to(self.device, self.dtype))
        return self.decoder(z, _Budget(band_bytes, max_score_bytes, shared_norm))

    forward = decode

    @torch.no_grad()
    def decode_tiled(
        self,
        vae_latent: torch.Tensor,
        tile_px: int = DEFAULT_TILE_PX,
        overlap_px: int | None = None,
        head_levels: int | None = None,
        group_norm: str = "shared",
        band_bytes: int | None = DEFAULT_BAND_BYTES,
        max_score_bytes: int | None = DEFAULT_MAX_SCORE_BYTES,
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Decode in overlapping tiles of about `tile_px` output pixels and blend them: float32 (B, 3, H, W).

        The head (conv_in, the mid block with its global attention, and the first `head_levels` up blocks; default
        all but the last two) runs on the whole latent, which is cheap at low resolution; only the high-resolution
        tail is tiled, with tiles cut from the head's output. group_norm "shared" (default): two passes over the
        tiles, the second normalising every tile with image-wide GroupNorm statistics gathered in the first
        (`SharedGroupNorm`). "tile": one pass, each tile with its own statistics. Linear weight ramps across
        every overlap blend the tiles (docs/vae.md gives the measured differences to the untiled decode)."""
        if group_norm not in ("shared", "tile"):
            raise ValueError(f"group_norm must be 'shared' or 'tile', not {group_norm!r}")
        levels = self.default_head_levels() if head_levels is None else head_levels
        if not 0 <= levels < len(self.config.block_out_channels):
            raise ValueError(f"head_levels must be in 0..{len(self.config.block_out_channels) - 1}, not {levels}")
        budget = _Budget(band_bytes, max_score_bytes)
        head = self.decoder.head(self.post_quant_conv(vae_latent.to(self.device, self.dtype)), budget, levels)
        f = self.scale_factor * vae_latent.shape[2] // head.shape[2]  # output pixels per head pixel
        overlap_px = tile_px // OVERLAP_FRACTION if overlap_px is None else overlap_px
        tile, overlap = max(1, tile_px // f), max(1, overlap_px // f)
        batch, _, height, width = head.shape
        spans_y, spans_x = _tile_spans(height, tile, overlap), _tile_spans(width, tile, overlap)
        tiles = [(iy, ix) for iy in range(len(spans_y)) for ix in range(len(spans_x))]
        shared = SharedGroupNorm() if group_norm == "shared" and len(tiles) > 1 else None
        passes = 2 if shared is not None else 1
        report = (lambda step: progress(step, passes * len(tiles))) if progress is not None else (lambda step: None)
        if shared is not None:
            cores_y, cores_x = _core_fractions(spans_y), _core_fractions(spans_x)
            for step, (iy, ix) in enumerate(tiles):
                (y0, y1), (x0, x1) = spans_y[iy], spans_x[ix]
                shared.start_tile(cores_y[iy] + cores_x[ix])
                self.decoder.tail(head[:, :, y0:y1, x0:x1], _Budget(band_bytes, max_score_bytes, shared), levels)
                report(step + 1)
            shared.start_applying()
        out = torch.zeros(batch, self.config.out_channels, height * f, width * f, dtype=torch.float32, device=self.device)
        weight_sum = torch.zeros(height * f, width * f, dtype=torch.float32, device=self.device)
        for step, (iy, ix) in enumerate(tiles):
            (y0, y1), (x0, x1) = spans_y[iy], spans_x[ix]
            weight = _blend_ramp(spans_y, iy, f, self.device)[:, None] * _blend_ramp(spans_x, ix, f, self.device)[None, :]
            if shared is not None:
                shared.start_tile()
            decoded = self.decoder.tail(head[:, :, y0:y1, x0:x1], _Budget(band_bytes, max_score_bytes, shared), levels)
            out[:, :, y0 * f : y1 * f, x0 * f : x1 * f].addcmul_(decoded.float(), weight)
            weight_sum[y0 * f : y1 * f, x0 * f : x1 * f] += weight
            del decoded
            report((passes - 1) * len(tiles) + step + 1)
        return out.div_(weight_sum)

    def default_head_levels(self) -> int:
        return max(0, len(self.config.block_out_channels) - 2)

    def estimate_peak_bytes(
        self,
        height: int,
        width: int,
        dtype: torch.dtype | None = None,
        batch: int = 1,
        band_bytes: int | None = DEFAULT_BAND_BYTES,
        max_score_bytes: int | None = DEFAULT_MAX_SCORE_BYTES,
        tile_px: int | None = None,
        head_levels: int | None = None,
    ) -> int:
        """Estimated peak activation bytes of decoding a height x width (pixels) image, weights excluded:
        `decode` when tile_px is None, else `decode_tiled` with that tile."""
        device = "cuda" if self.device.type == "meta" else self.device
        model = _MemoryModel(self.config, dtype or self.dtype, batch, band_bytes, max_score_bytes, device)
        if tile_px is None:
            return model.untiled(height, width).bytes
        levels = self.default_head_levels() if head_levels is None else head_levels
        return model.tiled(height, width, tile_px, levels).bytes

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


# ---- loading: files, names, config -------------------------------------------------------------------------------

_PREFIXES = ("", "vae.", "first_stage_model.")  # bare, diffusers single-file, ComfyUI checkpoint
_ATTENTION_LINEARS = ("to_q", "to_k", "to_v", "to_out.0")
# BFL / ComfyUI flux2-vae names -> diffusers names (docs/spec.md §5.5; BFL flux2 autoencoder.py,
# ComfyUI comfy/diffusers_convert.py). BFL counts up levels from the highest resolution, diffusers from the lowest.
_BFL_RENAMES = (
    (r"^decoder\.post_quant_conv\.", "post_quant_conv."),
    (r"^decoder\.mid\.block_(\d)\.", lambda m, n: f"decoder.mid_block.resnets.{int(m[1]) - 1}."),
    (r"^decoder\.mid\.attn_1\.norm\.", "decoder.mid_block.attentions.0.group_norm."),
    (r"^decoder\.mid\.attn_1\.(q|k|v)\.", lambda m, n: f"decoder.mid_block.attentions.0.to_{m[1]}."),
    (r"^decoder\.mid\.attn_1\.proj_out\.", "decoder.mid_block.attentions.0.to_out.0."),
    (r"^decoder\.up\.(\d+)\.block\.", lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.resnets."),
    (r"^decoder\.up\.(\d+)\.upsample\.", lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.upsamplers.0."),
    (r"^decoder\.norm_out\.", "decoder.conv_norm_out."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
)


def _bfl_to_diffusers(name: str, levels: int) -> str:
    for pattern, replacement in _BFL_RENAMES:
        if callable(replacement):
            name = re.sub(pattern, lambda m, r=replacement: r(m, levels), name)
        else:
            name = re.sub(pattern, replacement, name)
    return name


def _decoder_key_map(keys, source: str) -> tuple[dict[str, str], tuple[str, str] | None]:
    """File key -> diffusers decoder name for every tensor the decoder needs; plus the bn (mean, var) file keys."""
    keys = list(keys)
    key_set = set(keys)
    prefix = next((p for p in _PREFIXES if f"{p}decoder.conv_in.weight" in key_set), None)
    if prefix is None:
        raise ModelFileError(
            f"{source} holds no VAE decoder (no decoder.conv_in.weight, also looked under 'vae.' and "
            "'first_stage_model.'): it is not a VAE file. Pick flux2-vae.safetensors (ComfyUI models/vae) or the "
            "Ideogram 4 vae/diffusion_pytorch_model.safetensors"
        )
    names = [k[len(prefix) :] for k in keys if k.startswith(prefix)]
    bfl = "decoder.mid.block_1.conv1.weight" in names
    if not bfl and "decoder.mid_block.resnets.0.conv1.weight" not in names:
        raise ModelFileError(
            f"{source} has a VAE decoder but not the FLUX.2 layout (no decoder.mid_block.* or decoder.mid.* "
            "tensors); use flux2-vae.safetensors or the Ideogram 4 vae/ file"
        )
    levels = len({m[1] for n in names if (m := re.match(r"decoder\.up\.(\d+)\.", n))})
    mapping = {}
    for name in names:
        if name.startswith(("encoder.", "quant_conv.", "bn.")) or not name.startswith(("decoder.", "post_quant_conv.")):
            continue
        mapping[prefix + name] = _bfl_to_diffusers(name, levels) if bfl else name
    bn_keys = (f"{prefix}bn.running_mean", f"{prefix}bn.running_var")
    return mapping, bn_keys if all(k in key_set for k in bn_keys) else None


def _canonical_decoder_state_dict(state_dict, source):
    mapping, bn_keys = _decoder_key_map(state_dict.keys(), source)
    decoder_sd = {target: state_dict[key] for key, target in mapping.items()}
    _flatten_attention_weights(decoder_sd)
    batch_norm = (state_dict[bn_keys[0]], state_dict[bn_keys[1]]) if bn_keys else None
    return decoder_sd, batch_norm


def _flatten_attention_weights(decoder_sd: dict[str, torch.Tensor]) -> None:
    # BFL stores the attention projections as 1x1 convs (C, C, 1, 1); diffusers as Linear (C, C).
    for linear in _ATTENTION_LINEARS:
        name = f"decoder.mid_block.attentions.0.{linear}.weight"
        if name in decoder_sd and decoder_sd[name].ndim == 4:
            decoder_sd[name] = decoder_sd[name].flatten(1)


def _infer_config(decoder_sd: dict[str, torch.Tensor], norm_num_groups: int, source: str) -> Flux2VAEConfig:
    latent_channels = decoder_sd["decoder.conv_in.weight"].shape[1]
    levels = sorted({int(m[1]) for n in decoder_sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", n))})
    if not levels or levels != list(range(len(levels))):
        raise ModelFileError(f"{source}: the decoder's up blocks are missing or not numbered 0..n-1")
    widths = [decoder_sd[f"decoder.up_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in levels]
    resnets = {int(m[1]) for n in decoder_sd if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", n))}
    config = Flux2VAEConfig(
        latent_channels=latent_channels,
        block_out_channels=tuple(reversed(widths)),
        layers_per_block=len(resnets) - 1,
        norm_num_groups=norm_num_groups,
        out_channels=decoder_sd["decoder.conv_out.weight"].shape[0],
    )
    if any(width % norm_num_groups for width in config.block_out_channels):
        raise ModelFileError(
            f"{source}: GroupNorm with {norm_num_groups} groups does not divide the decoder widths "
            f"{config.block_out_channels}; pass the VAE's norm_num_groups (from its config.json)"
        )
    return config


def _resolve_vae_path(path) -> tuple[pathlib.Path, dict]:
    """A file, a diffusers vae/ folder or a repo folder holding vae/ -> (safetensors file, config.json or {})."""
    path = pathlib.Path(path)
    if path.is_dir():
        for folder in (path, path / "vae"):
            candidate = folder / "diffusion_pytorch_model.safetensors"
            if candidate.is_file():
                path = candidate
                break
        else:
            raise ModelFileError(
                f"{path} is a folder without diffusion_pytorch_model.safetensors (looked in it and in its vae/); "
                "point at the VAE .safetensors file"
            )
    if not path.is_file():
        raise ModelFileError(f"VAE file not found: {path}. Put flux2-vae.safetensors in ComfyUI/models/vae")
    if path.suffix.lower() == ".gguf":
        raise ModelFileError(f"{path}: GGUF VAEs are not supported; use flux2-vae.safetensors (about 160 MB)")
    config = {}
    config_path = path.parent / "config.json"
    if config_path.is_file():
        try:
            loaded = json.loads(config_path.read_text(encoding="utf-8"))
            if isinstance(loaded, dict) and "norm_num_groups" in loaded and "latent_channels" in loaded:
                config = loaded
        except (OSError, ValueError):
            pass  # a broken neighbouring config must not block loading a valid safetensors file
    return path, config


def check_vae_header(path) -> None:
    """That `path` (a file or vae/ folder) holds a FLUX.2 VAE decoder, from the safetensors header alone."""
    from safetensors import safe_open

    file, _ = _resolve_vae_path(path)
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            keys = list(handle.keys())
    except Exception as exc:  # safetensors raises its own error types for bad headers and truncated files
        raise ModelFileError(f"{file} is not a readable safetensors file ({type(exc).__name__}: {quote(str(exc))}); "
                             "re-download it") from exc
    _decoder_key_map(keys, str(file))


def _read_decoder_tensors(file: pathlib.Path) -> dict[str, torch.Tensor]:
    """Read only the decoder, post_quant_conv and bn tensors (never the encoder) from a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            keys = list(handle.keys())
            mapping, bn_keys = _decoder_key_map(keys, str(file))
            wanted = list(mapping) + list(bn_keys or ())
            return {key: handle.get_tensor(key) for key in wanted}
    except ModelFileError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad headers and truncated files
        raise ModelFileError(
            f"{file} is not a readable safetensors file ({type(exc).__name__}: {exc}); re-download it"
        ) from exc


# ---- tiling ---------------------------------------------------------------------------------------------------


def _tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Evenly spread tiles of `tile` covering [0, length) with at least `overlap` shared between neighbours."""
    if length <= tile:
        return [(0, length)]
    overlap = min(overlap, tile - 1)
    count = math.ceil((length - overlap) / (tile - overlap))
    starts = [round(i * (length - tile) / (count - 1)) for i in range(count)]
    return [(start, start + tile) for start in starts]


def _core_fractions(spans: list[tuple[int, int]]) -> list[tuple[float, float]]:
    """Each tile's share of a partition of the axis (cut in the middle of every overlap), as tile fractions."""
    cuts = [0] + [(previous[1] + following[0]) // 2 for previous, following in itertools.pairwise(spans)]
    cuts.append(spans[-1][1])
    return [((cuts[i] - start) / (end - start), (cuts[i + 1] - start) / (end - start)) for i, (start, end) in enumerate(spans)]


def _blend_ramp(spans: list[tuple[int, int]], index: int, scale: int, device) -> torch.Tensor:
    """Per-pixel weights of tile `index`: 1 inside, linear ramps across the overlaps with its neighbours."""
    start, end = spans[index]
    weight = torch.ones((end - start) * scale, dtype=torch.float32, device=device)
    if index > 0:
        overlap = (spans[index - 1][1] - start) * scale
        ramp = (torch.arange(overlap, dtype=torch.float32, device=device) + 0.5) / overlap
        weight[:overlap] = torch.minimum(weight[:overlap], ramp)
    if index < len(spans) - 1:
        overlap = (end - spans[index + 1][0]) * scale
        ramp = (torch.arange(overlap, 0, -1, dtype=torch.float32, device=device) - 0.5) / overlap
        weight[-overlap:] = torch.minimum(weight[-overlap:], ramp)
    return weight


# ---- memory estimate and decode planning ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PeakEstimate:
    bytes: int
    stage: str  # where the peak happens


class _MemoryModel:
    """Bytes of live activations at every step of the decoder above (weights, allocator slack and cuDNN/oneDNN
    workspaces excluded): which tensors each step keeps alive, counted from the code, not measured."""

    def __init__(self, config, dtype, batch, band_bytes, max_score_bytes, device="cuda"):
        self.config, self.batch = config, batch
        self.size = torch.empty((), dtype=dtype).element_size()
        self.band_bytes, self.max_score_bytes = band_bytes, max_score_bytes
        # oneDNN (CPU) copies a conv's input into its blocked layout: one more input-sized tensor per conv
        # (measured, docs/PERF.md); cuDNN convolves NCHW tensors in place.
        self.conv_copies = 2 if torch.device(device).type == "cpu" else 1
        self.widths = list(reversed(config.block_out_channels))

    def act(self, channels, rows, cols):
        return self.batch * channels * rows * cols * self.size

    def _conv_input(self, in_channels, out_channels, rows_total, cols, normalised=True):
        # What a 3x3 conv's normalised (or upsampled) input costs: the whole input when unbanded; otherwise one
        # band of it (float32 and dtype copies when normalised) plus the conv's band output, halo rows included.
        rows = _band_rows(rows_total, self.batch * in_channels * cols * 4, self.band_bytes)
        if rows >= rows_total:
            return self.conv_copies * self.act(in_channels, rows_total, cols)
        rows += 2
        band = self.conv_copies * self.act(in_channels, rows, cols)
        if normalised and self.size != 4:
            band += self.batch * in_channels * rows * cols * 4
        return band + self.act(out_channels, rows, cols)

    def _resnet(self, stages, name, cin, cout, rows, cols):
        x, h = self.act(cin, rows, cols), self.act(cout, rows, cols)
        stages.append((f"{name} conv1", x + self._conv_input(cin, cout, rows, cols) + h))
        stages.append((f"{name} conv2", x + 2 * h + self._conv_input(cout, cout, rows, cols)))
        if cin != cout:
            shortcut_rows = _band_rows(rows, self.batch * cin * cols * 4, self.band_bytes)
            copy = (self.conv_copies - 1) * self.act(cin, shortcut_rows, cols)
            stages.append((f"{name} shortcut", x + h + self.act(cout, shortcut_rows, cols) + copy))

    def _up_blocks(self, stages, levels, rows, cols):
        for level in levels:
            cin, cout = self.widths[max(level - 1, 0)], self.widths[level]
            for index in range(self.config.layers_per_block + 1):
                self._resnet(stages, f"up_blocks.{level}.resnets.{index}", cin if index == 0 else cout, cout, rows, cols)
            if level < len(self.widths) - 1:
                upsampled = self.act(cout, 2 * rows, 2 * cols)
                temps = self._conv_input(cout, cout, 2 * rows, 2 * cols, normalised=False)
                stages.append((f"up_blocks.{level}.upsample", self.act(cout, rows, cols) + upsampled + temps))
                rows, cols = 2 * rows, 2 * cols
        return rows, cols

    def head(self, rows, cols, levels):
        """Stages of conv_in, mid block and the first `levels` up blocks on a rows x cols latent; output shape."""
        stages, width = [], self.widths[0]
        latent = self.batch * self.config.latent_channels * rows * cols * (4 + 2 * self.size)
        stages.append(("conv_in", latent + self.act(width, rows, cols)))
        self._resnet(stages, "mid.resnets.0", width, width, rows, cols)
        tokens = rows * cols
        chunk = tokens
        if self.max_score_bytes is not None:
            chunk = min(tokens, max(1, self.max_score_bytes // (self.batch * tokens * 8)))
        stages.append(("mid.attention", 5 * self.act(width, rows, cols) + self.batch * chunk * tokens * 8))
        self._resnet(stages, "mid.resnets.1", width, width, rows, cols)
        rows, cols = self._up_blocks(stages, range(levels), rows, cols)
        return stages, (self.widths[max(levels - 1, 0)], rows, cols)

    def tail(self, rows, cols, levels):
        """Stages of the up blocks from `levels` on, conv_out and the IMAGE conversion, for a rows x cols input."""
        stages = []
        rows, cols = self._up_blocks(stages, range(levels, len(self.widths)), rows, cols)
        channels, out = self.widths[-1], self.config.out_channels
        conv_out = self._conv_input(channels, out, rows, cols)
        stages.append(("conv_out", self.act(channels, rows, cols) + conv_out + self.act(out, rows, cols)))
        # The IMAGE conversion: the decoder output, a float32 clamped copy and its BHWC copy.
        stages.append(("to IMAGE", self.act(out, rows, cols) + 2 * self.batch * out * rows * cols * 4))
        return stages

    def untiled(self, height, width) -> PeakEstimate:
        f = self.config.scale_factor
        head, (_, rows, cols) = self.head(height // f, width // f, 0)
        stage, peak = max(head + self.tail(rows, cols, 0), key=lambda item: item[1])
        return PeakEstimate(peak, stage)

    def tiled(self, height, width, tile_px, levels) -> PeakEstimate:
        f = self.config.scale_factor
        head, (channels, rows, cols) = self.head(height // f, width // f, levels)
        held = self.act(channels, rows, cols)
        step = height // rows  # output pixels per head pixel
        tile = max(1, tile_px // step)
        tail = self.tail(min(tile, rows), min(tile, cols), levels)
        # Beside each tile's tail: the head output, the float32 accumulator, weight map and tile copy.
        out = self.config.out_channels
        fixed = held + self.batch * out * height * width * 4 + height * width * 4
        fixed += self.batch * out * min(tile * step, height) * min(tile * step, width) * 4
        stages = head + [(f"tile {name}", fixed + value) for name, value in tail]
        # The final IMAGE conversion of the accumulator: two float32 copies of it.
        stages.append(("tiled to IMAGE", 3 * self.batch * out * height * width * 4 + height * width * 4))
        stage, peak = max(stages, key=lambda item: item[1])
        return PeakEstimate(peak, stage)


def estimate_decode_peak(
    config: Flux2VAEConfig,
    height: int,
    width: int,
    dtype: torch.dtype = torch.bfloat16,
    batch: int = 1,
    band_bytes: int | None = DEFAULT_BAND_BYTES,
    max_score_bytes: int | None = DEFAULT_MAX_SCORE_BYTES,
    tile_px: int | None = None,
    head_levels: int | None = None,
    device: torch.device | str = "cuda",
) -> PeakEstimate:
    """Peak activation bytes (and the step where it happens) of an untiled or, with tile_px, a tiled decode."""
    model = _MemoryModel(config, dtype, batch, band_bytes, max_score_bytes, device)
    if tile_px is None:
        return model.untiled(height, width)
    levels = max(0, len(config.block_out_channels) - 2) if head_levels is None else head_levels
    return model.tiled(height, width, tile_px, levels)


@dataclass(frozen=True)
class DecodePlan:
    tiled: bool
    tile_px: int  # 0 when not tiled
    overlap_px: int
    head_levels: int
    band_bytes: int | None
    estimated_peak_bytes: int
    free_memory_bytes: int


def available_memory_bytes(device: torch.device | str) -> int:
    """Memory a decode may use on `device`: 90 % of free CUDA memory (plus what torch holds unused), or of the
    OS's MemAvailable on the CPU (16 GiB where the OS does not say)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        held_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(0.9 * (free + held_unused))
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(0.9 * int(line.split()[1]) * 1024)
    except OSError:
        pass
    return 16 << 30


def plan_decode(
    vae: Flux2VAEDecoder,
    height: int,
    width: int,
    tiled: str = "auto",
    free_memory_bytes: int | None = None,
    tile_px: int | None = None,
    overlap_px: int | None = None,
    batch: int = 1,
) -> DecodePlan:
    """Choose whole-tensor, row-banded or tiled decoding of one height x width image.

    tiled "auto": whole tensors when they fit `free_memory_bytes` (fastest), else row bands (same result, less
    memory), else tiles; "off": never tile; "on": always tile (`tile_px`, default 512)."""
    if tiled not in ("auto", "on", "off"):
        raise ValueError(f"tiled must be 'auto', 'on' or 'off', not {tiled!r}")
    free = available_memory_bytes(vae.device) if free_memory_bytes is None else int(free_memory_bytes)
    if tiled != "on":
        for band_bytes in (None, DEFAULT_BAND_BYTES):
            peak = vae.estimate_peak_bytes(height, width, batch=batch, band_bytes=band_bytes)
            if peak <= free or (tiled == "off" and band_bytes is not None):
                return DecodePlan(False, 0, 0, 0, band_bytes, peak, free)
    if tile_px is not None or tiled == "on":
        tile, levels = tile_px or DEFAULT_TILE_PX, vae.default_head_levels()
    else:
        tile, levels = _largest_fitting_tile(vae, height, width, free, batch)
    overlap = tile // OVERLAP_FRACTION if overlap_px is None else overlap_px
    peak = vae.estimate_peak_bytes(height, width, batch=batch, tile_px=tile, head_levels=levels)
    if peak > free:
        logger.warning(
            "VAE decode of %dx%d: even %d-pixel tiles need about %.2f GiB, more than the %.2f GiB free; trying anyway",
            width, height, tile, peak / 2**30, free / 2**30,
        )
    return DecodePlan(True, tile, overlap, levels, DEFAULT_BAND_BYTES, peak, free)


def _largest_fitting_tile(vae, height, width, free, batch) -> tuple[int, int]:
    """(tile_px, head_levels): the most global head that still allows tiles of MIN_TILE_PX, with its largest tile."""
    step = max(1, min(TILE_STEP_PX, max(height, width) // 8))
    best = None
    for levels in range(vae.default_head_levels(), -1, -1):
        tile = max(height, width)
        while tile >= step:
            if vae.estimate_peak_bytes(height, width, batch=batch, tile_px=tile, head_levels=levels) <= free:
                break
            tile -= step
        if tile >= min(MIN_TILE_PX, max(height, width)):
            return tile, levels
        if tile >= step and (best is None or tile > best[0]):
            best = (tile, levels)
    return best or (step, 0)


def decode_latents(
    latent,
    vae: Flux2VAEDecoder,
    *,
    grid: tuple[int, int] | None = None,
    norm: LatentNorm | None = None,
    tiled: str = "auto",
    free_memory_bytes: int | None = None,
    tile_px: int | None = None,
    overlap_px: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Officially normalised Ideogram 4 latents -> ComfyUI IMAGE (B, H, W, 3) float32 in [0, 1].

    latent: our LATENT dict, its (B, 128, gh, gw) samples, or (B, gh*gw, 128) tokens with `grid`.
    norm: the de-normalisation constants (default: the official ones; tiny test models pass their own).
    Images are decoded one at a time; `progress(done, total)` counts tiles over the whole batch."""
    tokens, (grid_h, grid_w) = as_latent_tokens(latent, grid)
    vae.check_token_channels(tokens.shape[-1])
    vae_latent = tokens_to_vae_latent(denormalize_tokens(tokens.to(vae.device), norm), grid_h, grid_w)
    f = vae.scale_factor
    height, width = vae_latent.shape[2] * f, vae_latent.shape[3] * f
    plan = plan_decode(vae, height, width, tiled, free_memory_bytes, tile_px, overlap_px)
    count = vae_latent.shape[0]
    images = []
    for index in range(count):
        one = vae_latent[index : index + 1].to(vae.dtype)
        if plan.tiled:
            report = None
            if progress is not None:
                report = lambda done, per_image, base=index: progress(base * per_image + done, count * per_image)
            decoded = vae.decode_tiled(
                one, plan.tile_px, plan.overlap_px, plan.head_levels, band_bytes=plan.band_bytes, progress=report
            )
        else:
            decoded = vae.decode(one, plan.band_bytes)
            if progress is not None:
                progress(index + 1, count)
        images.append(image_to_comfy(decoded))
        del decoded
    return torch.cat(images)
