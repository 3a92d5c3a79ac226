"""Ideogram 4 latents: official de-normalisation, patch-major (un)patchify, our LATENT, ComfyUI FLUX.2 interchange.

One image latent, four layouts (C = VAE latent channels, 32 for FLUX.2; the DiT patch is 2x2, so a token has 4C
channels; gh, gw = H/16, W/16):

| name             | shape              | channel order                      | normalised with            |
|------------------|--------------------|------------------------------------|----------------------------|
| `latent_tokens`  | (B, gh*gw, 4C)     | token: (pi*2 + pj)*C + ch          | official LATENT_SHIFT/SCALE |
| our LATENT       | (B, 4C, gh, gw)    | token                              | official                    |
| core FLUX.2      | (B, 4C, gh, gw)    | FLUX.2: ch*4 + pi*2 + pj           | the VAE file's bn stats     |
| `vae_latent`     | (B, C, 2gh, 2gw)   | VAE channels                       | none (what the VAE decodes) |

Tokens are row-major over the grid (token k = r*gw + c); token (r, c) channel (pi*2+pj)*C + ch is
vae_latent[ch, 2r+pi, 2c+pj] (docs/spec.md §2.9).
"""

from __future__ import annotations

import functools
import json
import pathlib
from dataclasses import dataclass

import torch

from ..errors import LatentFormatError, ModelFileError

PATCH = 2
# Official de-normalisation constants shipped with the pack (their source is in the file's "description").
LATENT_NORM_PATH = pathlib.Path(__file__).resolve().parents[1] / "data" / "ideogram4_latent_norm.json"
# Marker key of the LATENT this pack produces; the value is the layout version (see docs/vae.md).
IDEOGRAM4_LATENT_KEY = "ideogram4_latent"
IDEOGRAM4_LATENT_VERSION = 1  # samples in token channel order (what Ideogram4 Sampler returns)
# Samples in FLUX.2 channel order, officially normalised: the layout ComfyUI core's sampler works in with core's
# Ideogram 4 model (comfy/ldm/ideogram4/model.py permutes to token order inside), marked by Ideogram4 Empty Latent so
# that our decode treats a core-sampled latent as the DiT's own space (docs/spec.md §C1.6).
IDEOGRAM4_CORE_LAYOUT_VERSION = 2
# bn eps of the FLUX.2 latent batch norm: BFL `AutoEncoder.bn_eps`, diffusers `batch_norm_eps`, ComfyUI `bn_eps`.
BATCH_NORM_EPS = 1e-4


@dataclass(frozen=True)
class LatentNorm:
    """Per-token-channel de-normalisation `raw = z * scale + shift`, in token channel order."""

    shift: torch.Tensor
    scale: torch.Tensor
    source: str = ""

    @property
    def channels(self) -> int:
        return self.shift.numel()

    @classmethod
    def from_batch_norm(cls, batch_norm: LatentBatchNorm) -> LatentNorm:
        """Read a VAE's bn buffers as token-order constants, as diffusers' Ideogram4Pipeline does."""
        return cls(batch_norm.running_mean.float(), batch_norm.std(), f"bn statistics of {batch_norm.source}")


@dataclass(frozen=True)
class LatentBatchNorm:
    """A VAE file's latent batch-norm statistics exactly as stored (`bn.running_mean`, `bn.running_var`).

    BFL and ComfyUI read them in FLUX.2 channel order; diffusers' Ideogram4Pipeline reads the Ideogram `vae/` copy
    in token order. The numbers themselves carry no order: whoever consumes them decides.
    """

    running_mean: torch.Tensor
    running_var: torch.Tensor
    eps: float = BATCH_NORM_EPS
    source: str = ""

    @property
    def channels(self) -> int:
        return self.running_mean.numel()

    def std(self) -> torch.Tensor:
        return torch.sqrt(self.running_var.float() + self.eps)


@functools.lru_cache(maxsize=1)
def load_official_latent_norm() -> LatentNorm:
    """The official Ideogram 4 LATENT_SHIFT / LATENT_SCALE (128 values each, token order), cached."""
    try:
        data = json.loads(LATENT_NORM_PATH.read_text(encoding="utf-8"))
        shift = torch.tensor(data["LATENT_SHIFT"], dtype=torch.float32)
        scale = torch.tensor(data["LATENT_SCALE"], dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelFileError(
            f"cannot read the official latent constants from {LATENT_NORM_PATH} ({exc}); "
            "the pack install is incomplete: reinstall it"
        ) from exc
    if shift.shape != (128,) or scale.shape != (128,):
        raise ModelFileError(f"{LATENT_NORM_PATH} must hold 128 LATENT_SHIFT and 128 LATENT_SCALE values")
    return LatentNorm(shift, scale, data.get("source", str(LATENT_NORM_PATH)))


def _check_channels(channels: int, norm_channels: int, what: str) -> None:
    if channels != norm_channels:
        raise LatentFormatError(
            f"{what} has {channels} channels but the latent constants have {norm_channels}; "
            "Ideogram 4 latents have 128 channels (4 x 32 FLUX.2 VAE channels)"
        )


def denormalize_tokens(latent_tokens: torch.Tensor, norm: LatentNorm | None = None) -> torch.Tensor:
    """Officially normalised tokens (..., 4C) -> raw VAE tokens, in float32 (`z * scale + shift`)."""
    norm = norm or load_official_latent_norm()
    _check_channels(latent_tokens.shape[-1], norm.channels, "the latent")
    scale = norm.scale.to(latent_tokens.device, torch.float32)
    shift = norm.shift.to(latent_tokens.device, torch.float32)
    return latent_tokens.float() * scale + shift


def normalize_tokens(raw_tokens: torch.Tensor, norm: LatentNorm | None = None) -> torch.Tensor:
    """Inverse of `denormalize_tokens`, in float32."""
    norm = norm or load_official_latent_norm()
    _check_channels(raw_tokens.shape[-1], norm.channels, "the latent")
    scale = norm.scale.to(raw_tokens.device, torch.float32)
    shift = norm.shift.to(raw_tokens.device, torch.float32)
    return (raw_tokens.float() - shift) / scale


def tokens_to_vae_latent(latent_tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Unpatchify in Ideogram's patch-major order: (B, gh*gw, 4C) -> (B, C, 2gh, 2gw)."""
    if latent_tokens.ndim != 3 or latent_tokens.shape[1] != grid_h * grid_w or latent_tokens.shape[2] % 4:
        raise LatentFormatError(
            f"latent tokens of shape {tuple(latent_tokens.shape)} do not fit a {grid_h}x{grid_w} grid: "
            "expected (batch, grid_h*grid_w, 4*vae_channels)"
        )
    batch, _, token_channels = latent_tokens.shape
    channels = token_channels // (PATCH * PATCH)
    x = latent_tokens.reshape(batch, grid_h, grid_w, PATCH, PATCH, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, grid_h * PATCH, grid_w * PATCH)


def vae_latent_to_tokens(vae_latent: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patchify in patch-major order: (B, C, 2gh, 2gw) -> ((B, gh*gw, 4C), (gh, gw))."""
    batch, channels, height, width = vae_latent.shape
    if height % PATCH or width % PATCH:
        raise LatentFormatError(f"a VAE latent of size {height}x{width} cannot be cut into 2x2 patches")
    grid_h, grid_w = height // PATCH, width // PATCH
    x = vae_latent.reshape(batch, channels, grid_h, PATCH, grid_w, PATCH).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(batch, grid_h * grid_w, PATCH * PATCH * channels), (grid_h, grid_w)


def tokens_to_samples(latent_tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """(B, gh*gw, 4C) -> (B, 4C, gh, gw), channel order unchanged."""
    batch, count, channels = latent_tokens.shape
    if count != grid_h * grid_w:
        raise LatentFormatError(f"{count} latent tokens do not fill a {grid_h}x{grid_w} grid")
    return latent_tokens.transpose(1, 2).reshape(batch, channels, grid_h, grid_w)


def samples_to_tokens(samples: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, 4C, gh, gw) -> ((B, gh*gw, 4C), (gh, gw)), channel order unchanged."""
    if samples.ndim != 4:
        raise LatentFormatError(f"expected latent samples (batch, channels, grid_h, grid_w), got {tuple(samples.shape)}")
    return samples.flatten(2).transpose(1, 2), (samples.shape[2], samples.shape[3])


def as_latent_tokens(latent, grid: tuple[int, int] | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Accept our LATENT dict, its (B, 4C, gh, gw) samples, or (B, N, 4C) tokens with `grid`; return tokens + grid."""
    if isinstance(latent, dict):
        return latent_dict_to_tokens(latent)
    if latent.ndim == 4:
        return samples_to_tokens(latent)
    if latent.ndim == 3 and grid is not None:
        return latent, (int(grid[0]), int(grid[1]))
    raise LatentFormatError(
        f"expected a LATENT dict, (batch, channels, grid_h, grid_w) samples or (batch, tokens, channels) tokens "
        f"with a grid; got shape {tuple(latent.shape)} and grid {grid}"
    )


def token_to_flux2_order(samples: torch.Tensor) -> torch.Tensor:
    """Permute dim 1 from token order (pi*2+pj)*C + ch to FLUX.2 order ch*4 + pi*2 + pj."""
    channels = samples.shape[1] // (PATCH * PATCH)
    return samples.unflatten(1, (PATCH * PATCH, channels)).transpose(1, 2).flatten(1, 2)


def flux2_to_token_order(samples: torch.Tensor) -> torch.Tensor:
    """Permute dim 1 from FLUX.2 order ch*4 + pi*2 + pj to token order (pi*2+pj)*C + ch."""
    channels = samples.shape[1] // (PATCH * PATCH)
    return samples.unflatten(1, (channels, PATCH * PATCH)).transpose(1, 2).flatten(1, 2)


# ---- our LATENT -------------------------------------------------------------------------------------------------


def is_ideogram4_latent(latent) -> bool:
    return isinstance(latent, dict) and latent.get(IDEOGRAM4_LATENT_KEY) is not None


def tokens_to_latent_dict(latent_tokens: torch.Tensor, grid_h: int, grid_w: int) -> dict:
    """Officially normalised tokens -> our LATENT: {"samples": (B, 4C, gh, gw) float32 token order, marker}."""
    samples = tokens_to_samples(latent_tokens, grid_h, grid_w).float().contiguous()
    return {"samples": samples, IDEOGRAM4_LATENT_KEY: IDEOGRAM4_LATENT_VERSION}


def latent_dict_to_tokens(latent: dict) -> tuple[torch.Tensor, tuple[int, int]]:
    """Our LATENT -> ((B, gh*gw, 4C) float32 tokens, (gh, gw))."""
    samples = _samples_of(latent)
    version = latent.get(IDEOGRAM4_LATENT_KEY)
    if version is None:
        raise LatentFormatError(
            "this LATENT was not made by the Ideogram 4 pack (no 'ideogram4_latent' key): a ComfyUI core latent "
            "(FLUX.2 channel order, normalised with the VAE's own statistics) must be converted first "
            "(from_comfy_flux2, or the pack's decode node, which converts automatically)"
        )
    if version == IDEOGRAM4_CORE_LAYOUT_VERSION:
        samples = flux2_to_token_order(samples)
    elif version != IDEOGRAM4_LATENT_VERSION:
        raise LatentFormatError(
            f"this LATENT has Ideogram 4 layout version {version!r}; this pack reads versions "
            f"{IDEOGRAM4_LATENT_VERSION} and {IDEOGRAM4_CORE_LAYOUT_VERSION}: update the pack or re-create the latent"
        )
    tokens, grid = samples_to_tokens(samples)
    return tokens.float(), grid


def core_layout_latent(samples_flux2: torch.Tensor) -> dict:
    """(B, 4C, gh, gw) officially normalised samples in FLUX.2 channel order -> a LATENT core's samplers take and
    our decode reads as the DiT's own space (IDEOGRAM4_CORE_LAYOUT_VERSION)."""
    if samples_flux2.ndim != 4 or samples_flux2.shape[1] % (PATCH * PATCH):
        raise LatentFormatError(f"expected (batch, 4*channels, grid_h, grid_w) samples, got {tuple(samples_flux2.shape)}")
    return {"samples": samples_flux2, IDEOGRAM4_LATENT_KEY: IDEOGRAM4_CORE_LAYOUT_VERSION}


def tokens_to_core_layout(latent_tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """(B, gh*gw, 4C) token-order tokens -> (B, 4C, gh, gw) samples in FLUX.2 channel order (core's layout)."""
    return token_to_flux2_order(tokens_to_samples(latent_tokens, grid_h, grid_w)).contiguous()


def _samples_of(latent) -> torch.Tensor:
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        raise LatentFormatError(
            "expected a LATENT dict with 'samples' of shape (batch, channels, grid_h, grid_w); got "
            f"{type(samples).__name__ if not isinstance(samples, torch.Tensor) else tuple(samples.shape)}"
        )
    return samples


# ---- ComfyUI core FLUX.2 interchange ----------------------------------------------------------------------------
# Core's FLUX.2 VAE decodes `samples * sqrt(running_var + 1e-4) + running_mean`, reading the bn buffers in FLUX.2
# channel order, then unpatchifies "(c pi pj) i j -> c (i pi) (j pj)" (comfy/ldm/models/autoencoder.py,
# BFL flux2 autoencoder.py `inv_normalize`). Both conversions below go through that raw latent, so they are exact
# up to float32 rounding of two affine maps.


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, torch.float32).view(1, -1, 1, 1)


def to_comfy_flux2(latent: dict, batch_norm: LatentBatchNorm, norm: LatentNorm | None = None) -> dict:
    """Our LATENT -> a core FLUX.2 LATENT that core's VAE Decode (with the VAE holding `batch_norm`) decodes to
    the same raw VAE latent as our decoder. Extra keys (noise_mask, batch_index, ...) are kept."""
    norm = norm or load_official_latent_norm()
    tokens, grid = latent_dict_to_tokens(latent)
    _check_channels(tokens.shape[-1], batch_norm.channels, f"the latent for {batch_norm.source or 'this VAE'}")
    raw = tokens_to_samples(denormalize_tokens(tokens, norm), *grid)
    raw = token_to_flux2_order(raw)
    samples = (raw - _expand(batch_norm.running_mean, raw)) / _expand(batch_norm.std(), raw)
    converted = {key: value for key, value in latent.items() if key != IDEOGRAM4_LATENT_KEY}
    converted["samples"] = samples.contiguous()
    return converted


def from_comfy_flux2(latent: dict, batch_norm: LatentBatchNorm, norm: LatentNorm | None = None) -> dict:
    """A core FLUX.2 LATENT (as core's VAE Decode with the VAE holding `batch_norm` reads it) -> our LATENT."""
    norm = norm or load_official_latent_norm()
    samples = _samples_of(latent).float()
    if is_ideogram4_latent(latent):
        raise LatentFormatError("this LATENT is already an Ideogram 4 latent; it needs no conversion")
    _check_channels(samples.shape[1], batch_norm.channels, "the core LATENT")
    raw = samples * _expand(batch_norm.std(), samples) + _expand(batch_norm.running_mean, samples)
    tokens, grid = samples_to_tokens(flux2_to_token_order(raw))
    converted = {key: value for key, value in latent.items() if key != "samples"}
    converted.update(tokens_to_latent_dict(normalize_tokens(tokens, norm), *grid))
    return converted


# ---- bn statistics vs the official constants ---------------------------------------------------------------------


@dataclass(frozen=True)
class BatchNormComparison:
    """How a VAE file's bn statistics relate to the official constants (max abs differences, in the best order)."""

    order: str  # "token" or "flux2": the channel order in which the file's stats are closest to the constants
    max_mean_diff: float  # max |running_mean - LATENT_SHIFT|
    max_std_diff: float  # max |sqrt(running_var + eps) - LATENT_SCALE|

    def matches(self, tolerance: float = 1e-4) -> bool:
        return max(self.max_mean_diff, self.max_std_diff) <= tolerance

    def describe(self) -> str:
        return (
            f"closest in {self.order} channel order: max |mean - LATENT_SHIFT| = {self.max_mean_diff:.3g}, "
            f"max |std - LATENT_SCALE| = {self.max_std_diff:.3g}"
        )


def compare_batch_norm(batch_norm: LatentBatchNorm, norm: LatentNorm | None = None) -> BatchNormComparison:
    """Compare stored bn statistics with the official constants in both channel orders."""
    norm = norm or load_official_latent_norm()
    _check_channels(batch_norm.channels, norm.channels, "the VAE's bn statistics")
    mean, std = batch_norm.running_mean.float().cpu(), batch_norm.std().cpu()
    results = []
    for order, shift, scale in (
        ("token", norm.shift, norm.scale),
        ("flux2", token_to_flux2_order(norm.shift.view(1, -1)).view(-1), token_to_flux2_order(norm.scale.view(1, -1)).view(-1)),
    ):
        results.append(BatchNormComparison(order, (mean - shift).abs().max().item(), (std - scale).abs().max().item()))
    return min(results, key=lambda r: r.max_mean_diff + r.max_std_diff)


# ---- IMAGE --------------------------------------------------------------------------------------------------------


def image_to_comfy(image: torch.Tensor) -> torch.Tensor:
    """Decoder output (B, 3, H, W) in [-1, 1] -> ComfyUI IMAGE (B, H, W, 3) float32 in [0, 1].

    Clamps first like the official code (clamp to [-1, 1], then (x + 1) * 127.5 for uint8)."""
    image = image.to(torch.float32, copy=True).clamp_(-1.0, 1.0)
    return image.add_(1.0).mul_(0.5).permute(0, 2, 3, 1).contiguous()
