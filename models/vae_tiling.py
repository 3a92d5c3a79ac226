"""Tiled VAE decoding and the decode's memory plan, over the network of `vae.py`.

- `decode_tiled`: when even a row-banded decode does not fit, the low-resolution head (mid-block attention
  included) runs whole and the high-resolution tail in overlapping tiles, blended linearly and normalised with
  image-wide GroupNorm statistics gathered in a first pass (`vae.SharedGroupNorm`);
- `estimate_decode_peak` / `decode_peak_bytes`: the peak activation bytes of a decode (`DecodePeak`), counted from
  the code step by step, not measured (numbers in docs/PERF.md);
- `plan_decode` picks the cheapest mode that fits the free memory (whole tensors, row bands, tiles) and
  `decode_latents` runs it: officially normalised Ideogram 4 latents -> ComfyUI IMAGE.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .latents import LatentNorm, as_latent_tokens, denormalize_tokens, image_to_comfy, tokens_to_vae_latent
from .vae import (
    DEFAULT_BAND_BYTES,
    DEFAULT_MAX_SCORE_BYTES,
    DecodeBudget,
    Flux2VAEConfig,
    Flux2VAEDecoder,
    SharedGroupNorm,
    band_rows,
)

logger = logging.getLogger(__name__)

# Tiling (output pixels): default tile when forced, smallest tile worth a more global head, search step; overlap
# = tile / 4, as diffusers' tile_overlap_factor 0.25.
DEFAULT_TILE_PX = 512
MIN_TILE_PX = 512
TILE_STEP_PX = 64
OVERLAP_FRACTION = 4


# ---- tiling -----------------------------------------------------------------------------------------------------


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


@torch.no_grad()
def decode_tiled(
    vae: Flux2VAEDecoder,
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
    levels = default_head_levels(vae.config) if head_levels is None else head_levels
    if not 0 <= levels < len(vae.config.block_out_channels):
        raise ValueError(f"head_levels must be in 0..{len(vae.config.block_out_channels) - 1}, not {levels}")
    budget = DecodeBudget(band_bytes, max_score_bytes)
    head = vae.decoder.head(vae.post_quant_conv(vae_latent.to(vae.device, vae.dtype)), budget, levels)
    f = vae.scale_factor * vae_latent.shape[2] // head.shape[2]  # output pixels per head pixel
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
            vae.decoder.tail(head[:, :, y0:y1, x0:x1], DecodeBudget(band_bytes, max_score_bytes, shared), levels)
            report(step + 1)
        shared.start_applying()
    out = torch.zeros(batch, vae.config.out_channels, height * f, width * f, dtype=torch.float32, device=vae.device)
    weight_sum = torch.zeros(height * f, width * f, dtype=torch.float32, device=vae.device)
    for step, (iy, ix) in enumerate(tiles):
        (y0, y1), (x0, x1) = spans_y[iy], spans_x[ix]
        weight = _blend_ramp(spans_y, iy, f, vae.device)[:, None] * _blend_ramp(spans_x, ix, f, vae.device)[None, :]
        if shared is not None:
            shared.start_tile()
        decoded = vae.decoder.tail(head[:, :, y0:y1, x0:x1], DecodeBudget(band_bytes, max_score_bytes, shared), levels)
        out[:, :, y0 * f : y1 * f, x0 * f : x1 * f].addcmul_(decoded.float(), weight)
        weight_sum[y0 * f : y1 * f, x0 * f : x1 * f] += weight
        del decoded
        report((passes - 1) * len(tiles) + step + 1)
    return out.div_(weight_sum)


def default_head_levels(config: Flux2VAEConfig) -> int:
    """Up blocks in the untiled head of a tiled decode by default: all but the last two."""
    return max(0, len(config.block_out_channels) - 2)


# ---- memory estimate and decode planning ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodePeak:
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
        rows = band_rows(rows_total, self.batch * in_channels * cols * 4, self.band_bytes)
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
            shortcut_rows = band_rows(rows, self.batch * cin * cols * 4, self.band_bytes)
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

    def untiled(self, height, width) -> DecodePeak:
        f = self.config.scale_factor
        head, (_, rows, cols) = self.head(height // f, width // f, 0)
        stage, peak = max(head + self.tail(rows, cols, 0), key=lambda item: item[1])
        return DecodePeak(peak, stage)

    def tiled(self, height, width, tile_px, levels) -> DecodePeak:
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
        return DecodePeak(peak, stage)


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
) -> DecodePeak:
    """Peak activation bytes (and the step where it happens) of an untiled or, with tile_px, a tiled decode."""
    model = _MemoryModel(config, dtype, batch, band_bytes, max_score_bytes, device)
    if tile_px is None:
        return model.untiled(height, width)
    levels = default_head_levels(config) if head_levels is None else head_levels
    return model.tiled(height, width, tile_px, levels)


def decode_peak_bytes(
    vae: Flux2VAEDecoder,
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
    device = "cuda" if vae.device.type == "meta" else vae.device
    model = _MemoryModel(vae.config, dtype or vae.dtype, batch, band_bytes, max_score_bytes, device)
    if tile_px is None:
        return model.untiled(height, width).bytes
    levels = default_head_levels(vae.config) if head_levels is None else head_levels
    return model.tiled(height, width, tile_px, levels).bytes


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
            peak = decode_peak_bytes(vae, height, width, batch=batch, band_bytes=band_bytes)
            if peak <= free or (tiled == "off" and band_bytes is not None):
                return DecodePlan(False, 0, 0, 0, band_bytes, peak, free)
    if tile_px is not None or tiled == "on":
        tile, levels = tile_px or DEFAULT_TILE_PX, default_head_levels(vae.config)
    else:
        tile, levels = _largest_fitting_tile(vae, height, width, free, batch)
    overlap = tile // OVERLAP_FRACTION if overlap_px is None else overlap_px
    peak = decode_peak_bytes(vae, height, width, batch=batch, tile_px=tile, head_levels=levels)
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
    for levels in range(default_head_levels(vae.config), -1, -1):
        tile = max(height, width)
        while tile >= step:
            if decode_peak_bytes(vae, height, width, batch=batch, tile_px=tile, head_levels=levels) <= free:
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
            decoded = decode_tiled(
                vae, one, plan.tile_px, plan.overlap_px, plan.head_levels, band_bytes=plan.band_bytes, progress=report
            )
        else:
            decoded = vae.decode(one, plan.band_bytes)
            if progress is not None:
                progress(index + 1, count)
        images.append(image_to_comfy(decoded))
        del decoded
    return torch.cat(images)