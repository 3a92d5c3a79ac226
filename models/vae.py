"""FLUX.2 VAE decoder network: the decode half of diffusers' `AutoencoderKLFlux2` and of BFL's flux2 `AutoEncoder`.

Architecture (docs/spec.md §5.4, full size): post_quant_conv 1x1 (32 -> 32) -> conv_in 3x3 (32 -> 512) ->
mid block (ResBlock, single-head attention over all H/8 x W/8 positions, ResBlock) -> 4 up levels, lowest
resolution first (512, 512, 256, 128 channels), each `layers_per_block + 1` ResBlocks and, for all but the last,
nearest x2 + conv3x3 -> GroupNorm -> SiLU -> conv_out 3x3 (128 -> 3). GroupNorm: 32 groups, eps 1e-6.
The shape (channels, levels, blocks, latent channels) is read from the weights, so tiny test models load too.

Module names are diffusers' (a diffusers state dict loads as is); reading files and mapping BFL/ComfyUI names
(`flux2-vae.safetensors`) is `vae_loader.py`. Tiled decoding, the memory estimate and the decode plan are
`vae_tiling.py`.

Memory: the decoder's peak is at full resolution, where one 256-channel activation is 2 GiB at 2048x2048 in bf16.
What keeps it down here (numbers in docs/PERF.md):
- layers run from one flat loop, SiLU and residual adds are in place, so only the tensors a step needs are alive;
- GroupNorm -> SiLU -> conv3x3 and nearest-upsample -> conv3x3 run over row bands when a tensor is large, so the
  normalised (or upsampled) copy of a large activation never exists in full; GroupNorm statistics are still
  computed over the whole tensor (band-wise, merged), so the result equals the unbanded decoder up to rounding;
- the mid-block attention never materialises the full score matrix: queries are chunked whenever the scores of a
  math-backend SDPA call would exceed `max_score_bytes`;
- `decode(..., shared_norm=)` normalises with statistics shared by all tiles of a tiled decode (`SharedGroupNorm`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelFileError
from .latents import LatentBatchNorm

GROUP_NORM_EPS = 1e-6
# Largest float32 working copy of one row band (GroupNorm -> SiLU, upsample) before a conv. None = whole tensors.
DEFAULT_BAND_BYTES = 64 << 20
# Largest attention score block of one SDPA call, counted as float32 scores + softmax output (8 bytes/element).
DEFAULT_MAX_SCORE_BYTES = 128 << 20
# What a VAE with a given latent channel count most likely is, for error messages.
KNOWN_VAES = {4: "an SD 1.x / SDXL VAE", 16: "a FLUX.1 / SD3 VAE", 32: "the FLUX.2 VAE", 48: "a Wan 2.2 VAE"}


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


def band_rows(tensor_rows: int, row_bytes: int, band_bytes: int | None) -> int:
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
class DecodeBudget:
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

    def forward(self, x: torch.Tensor, budget: DecodeBudget) -> torch.Tensor:
        batch, channels, height, width = x.shape
        rows = band_rows(height, batch * channels * width * 4, budget.band_bytes)
        h = _conv3x3_rows(self.conv1, _norm_rows(x, self.norm1, rows, budget.shared_norm, silu=True), height, rows)
        rows = band_rows(height, batch * h.shape[1] * width * 4, budget.band_bytes)
        h = _conv3x3_rows(self.conv2, _norm_rows(h, self.norm2, rows, budget.shared_norm, silu=True), height, rows)
        if self.conv_shortcut is None:
            return h.add_(x)
        rows = band_rows(height, batch * channels * width * 4, budget.band_bytes)
        for r0 in range(0, height, rows):
            h[:, :, r0 : r0 + rows] += self.conv_shortcut(x[:, :, r0 : r0 + rows])
        return h


class Upsampler(nn.Module):
    """Nearest x2, then conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, budget: DecodeBudget) -> torch.Tensor:
        batch, channels, height, width = x.shape
        rows = band_rows(2 * height, batch * channels * 2 * width * 4, budget.band_bytes)
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

    def forward(self, x: torch.Tensor, budget: DecodeBudget) -> torch.Tensor:
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

    def forward(self, z: torch.Tensor, budget: DecodeBudget) -> torch.Tensor:
        return self.tail(self.head(z, budget, 0), budget, 0)

    def head(self, z: torch.Tensor, budget: DecodeBudget, levels: int) -> torch.Tensor:
        """conv_in, the mid block (global attention) and the first `levels` up blocks."""
        x = self.conv_in(z)
        for layer in self.mid_block.layers() + [layer for block in self.up_blocks[:levels] for layer in block.layers()]:
            x = layer(x, budget)
        return x

    def tail(self, x: torch.Tensor, budget: DecodeBudget, levels: int) -> torch.Tensor:
        """The up blocks after the first `levels`, then GroupNorm -> SiLU -> conv_out."""
        for layer in [layer for block in self.up_blocks[levels:] for layer in block.layers()]:
            x = layer(x, budget)
        batch, channels, height, width = x.shape
        rows = band_rows(height, batch * channels * width * 4, budget.band_bytes)
        source = _norm_rows(x, self.conv_norm_out, rows, budget.shared_norm, silu=True)
        return _conv3x3_rows(self.conv_out, source, height, rows)


class Flux2VAEDecoder(nn.Module):
    """FLUX.2 VAE decoder: (B, C, H/f, W/f) de-normalised VAE latent -> (B, 3, H, W) image in about [-1, 1].

    Built by `vae_loader.load_vae_decoder` (diffusers or BFL/ComfyUI naming) or `vae_decoder_from_state_dict`.
    `latent_bn` holds the file's own latent batch-norm statistics (None when it has none); this pack decodes with
    the official constants and uses them only for the ComfyUI core interchange (`latents.to_comfy_flux2`)."""

    def __init__(self, config: Flux2VAEConfig):
        super().__init__()
        self.config = config
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.decoder = Decoder(config)
        self.source = "<state dict>"
        self.latent_bn: LatentBatchNorm | None = None
        self.batch_norm_comparison = None  # set by vae_loader: the file's bn statistics vs the official constants

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
                f"({KNOWN_VAES.get(self.latent_channels, 'not the FLUX.2 VAE')}), so it decodes "
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
        return self.decoder(z, DecodeBudget(band_bytes, max_score_bytes, shared_norm))

    forward = decode

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())
