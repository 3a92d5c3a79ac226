"""Latent preview vs ComfyUI's Latent2RGB preview of the equivalent core FLUX.2 latent.

Reference math (ComfyUI latent_preview.py `Latent2RGBPreviewer` + comfy/latent_formats.py `Flux2`): the core
latent (FLUX.2 order ch*4 + pi*2 + pj, bn-normalised) is unpatchified so that pixel (2r+pi, 2c+pj) of channel ch
is samples[ch*4 + pi*2 + pj, r, c], then rgb = latent32 . factors + bias, shown as ((rgb + 1) / 2).clamp(0, 1).
Written here element by element, independent of the pack's reshapes."""

import pytest
import torch
from ideogram4_gguf.errors import LatentFormatError
from ideogram4_gguf.models import latents as L
from ideogram4_gguf.models import preview as P


def _comfy_latent2rgb(core_samples):
    factors = torch.tensor(P.FLUX2_LATENT_RGB_FACTORS)
    bias = torch.tensor(P.FLUX2_LATENT_RGB_BIAS)
    batch, _, gh, gw = core_samples.shape
    out = torch.empty(batch, 2 * gh, 2 * gw, 3)
    for r in range(gh):
        for c in range(gw):
            for pi in range(2):
                for pj in range(2):
                    pixel = core_samples[:, [ch * 4 + pi * 2 + pj for ch in range(32)], r, c]  # (B, 32)
                    out[:, 2 * r + pi, 2 * c + pj] = pixel @ factors + bias
    return ((out + 1) / 2).clamp(0, 1)


def test_preview_with_bn_equals_comfy_preview_of_the_core_latent():
    g = torch.Generator().manual_seed(0)
    bn = L.LatentBatchNorm(0.3 * torch.randn(128, generator=g), 2.0 + 1.5 * torch.rand(128, generator=g))
    latent = L.tokens_to_latent_dict(torch.randn(2, 12, 128, generator=g), 3, 4)
    ours = P.latent_preview_rgb(latent, batch_norm=bn)
    expected = _comfy_latent2rgb(L.to_comfy_flux2(latent, bn)["samples"])
    assert ours.shape == (2, 6, 8, 3) and ours.dtype == torch.float32
    assert (ours - expected).abs().max().item() <= 1e-5
    assert ((ours > 0) & (ours < 1)).float().mean().item() > 0.5  # mostly unsaturated: the values matter


def test_preview_without_bn_assumes_official_statistics():
    norm = L.load_official_latent_norm()
    # bn statistics equal to the official constants, stored in FLUX.2 order (what core would read).
    official_bn = L.LatentBatchNorm(
        L.token_to_flux2_order(norm.shift.view(1, -1)).view(-1),
        L.token_to_flux2_order((norm.scale.square() - 1e-4).view(1, -1)).view(-1),
    )
    tokens = torch.randn(1, 20, 128, generator=torch.Generator().manual_seed(1))
    approximate = P.latent_preview_rgb(tokens, grid=(4, 5))
    exact = P.latent_preview_rgb(tokens, grid=(4, 5), batch_norm=official_bn)
    assert (approximate - exact).abs().max().item() <= 1e-5
    assert P.preview_to_uint8(approximate).dtype == torch.uint8


def test_preview_rejects_other_latents():
    with pytest.raises(LatentFormatError, match="128-channel"):
        P.latent_preview_rgb(torch.randn(1, 4, 32), grid=(2, 2))
