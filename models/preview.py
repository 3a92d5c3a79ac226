"""Fast latent preview: a linear latent -> RGB map for previews during sampling (no VAE needed).

The factors are ComfyUI's for FLUX.2 latents (comfy/latent_formats.py, class `Flux2`, `latent_rgb_factors` and
`latent_rgb_factors_bias`, ComfyUI master of 2026-07-29): one RGB row per VAE channel, applied to the unpatchified
32-channel latent normalised with the FLUX.2 VAE's bn statistics. Our latents are converted to that form first:
exactly when the VAE's bn statistics are given, otherwise by treating the official constants as those statistics
(close enough for a preview; docs/vae.md).
"""

from __future__ import annotations

import torch

from ..errors import LatentFormatError
from .latents import (
    LatentBatchNorm,
    LatentNorm,
    as_latent_tokens,
    denormalize_tokens,
    flux2_to_token_order,
    token_to_flux2_order,
    tokens_to_samples,
    tokens_to_vae_latent,
)

# Source: ComfyUI comfy/latent_formats.py, class Flux2 (FLUX.2 VAE channel ch -> R, G, B).
FLUX2_LATENT_RGB_FACTORS = (
    (0.0058, 0.0113, 0.0073),
    (0.0495, 0.0443, 0.0836),
    (-0.0099, 0.0096, 0.0644),
    (0.2144, 0.3009, 0.3652),
    (0.0166, -0.0039, -0.0054),
    (0.0157, 0.0103, -0.0160),
    (-0.0398, 0.0902, -0.0235),
    (-0.0052, 0.0095, 0.0109),
    (-0.3527, -0.2712, -0.1666),
    (-0.0301, -0.0356, -0.0180),
    (-0.0107, 0.0078, 0.0013),
    (0.0746, 0.0090, -0.0941),
    (0.0156, 0.0169, 0.0070),
    (-0.0034, -0.0040, -0.0114),
    (0.0032, 0.0181, 0.0080),
    (-0.0939, -0.0008, 0.0186),
    (0.0018, 0.0043, 0.0104),
    (0.0284, 0.0056, -0.0127),
    (-0.0024, -0.0022, -0.0030),
    (0.1207, -0.0026, 0.0065),
    (0.0128, 0.0101, 0.0142),
    (0.0137, -0.0072, -0.0007),
    (0.0095, 0.0092, -0.0059),
    (0.0000, -0.0077, -0.0049),
    (-0.0465, -0.0204, -0.0312),
    (0.0095, 0.0012, -0.0066),
    (0.0290, -0.0034, 0.0025),
    (0.0220, 0.0169, -0.0048),
    (-0.0332, -0.0457, -0.0468),
    (-0.0085, 0.0389, 0.0609),
    (-0.0076, 0.0003, -0.0043),
    (-0.0111, -0.0460, -0.0614),
)
FLUX2_LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)


def latent_preview_rgb(
    latent,
    grid: tuple[int, int] | None = None,
    batch_norm: LatentBatchNorm | None = None,
    norm: LatentNorm | None = None,
) -> torch.Tensor:
    """Our latent (LATENT dict, (B, 128, gh, gw) samples, or (B, N, 128) tokens with `grid`) -> preview image
    (B, 2gh, 2gw, 3) float32 in [0, 1], i.e. 1/8 of the output size.

    batch_norm: the FLUX.2 VAE's bn statistics for an exact conversion to the normalisation the factors expect;
    without them our officially normalised latent is used as is (only the channel order is changed)."""
    tokens, (grid_h, grid_w) = as_latent_tokens(latent, grid)
    tokens = tokens.float()
    if batch_norm is not None:
        raw = token_to_flux2_order(tokens_to_samples(denormalize_tokens(tokens, norm), grid_h, grid_w))
        mean = batch_norm.running_mean.to(raw.device, torch.float32).view(1, -1, 1, 1)
        std = batch_norm.std().to(raw.device).view(1, -1, 1, 1)
        samples = flux2_to_token_order((raw - mean) / std)
        tokens = samples.flatten(2).transpose(1, 2)
    latent32 = tokens_to_vae_latent(tokens, grid_h, grid_w)  # (B, 32, 2gh, 2gw)
    factors = torch.tensor(FLUX2_LATENT_RGB_FACTORS, dtype=torch.float32, device=latent32.device)
    bias = torch.tensor(FLUX2_LATENT_RGB_BIAS, dtype=torch.float32, device=latent32.device)
    if latent32.shape[1] != factors.shape[0]:
        raise LatentFormatError(
            f"the latent preview needs 128-channel Ideogram 4 latents, got {4 * latent32.shape[1]} channels"
        )
    rgb = torch.einsum("bchw,cr->bhwr", latent32, factors) + bias
    return rgb.add_(1.0).mul_(0.5).clamp_(0.0, 1.0)


def preview_to_uint8(preview: torch.Tensor) -> torch.Tensor:
    """(B, h, w, 3) float in [0, 1] -> uint8 on the CPU (what a PIL image or a progress preview wants)."""
    return preview.mul(255.0).round_().to("cpu", torch.uint8)
