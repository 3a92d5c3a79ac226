"""Latent layouts, official constants and the ComfyUI core FLUX.2 interchange.

References: the official constants (docs/spec.md §5.2 spot values, and a digest of all 256 values), the index
rule of docs/spec.md §2.9 (checked element by element), diffusers 0.42.1 `Flux2Pipeline._patchify_latents` /
`_unpatchify_latents` and its bn de-normalisation (the FLUX.2-order path ComfyUI core also follows), and diffusers'
`VaeImageProcessor.postprocess` for the IMAGE conversion."""

import hashlib

import pytest
import torch
from ideogram4_gguf.errors import LatentFormatError
from ideogram4_gguf.models import latents as L


def _random_bn(channels=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return L.LatentBatchNorm(0.3 * torch.randn(channels, generator=g), 2.0 + 1.5 * torch.rand(channels, generator=g), source="test-vae")


def test_official_constants_spot_values():
    norm = L.load_official_latent_norm()
    assert norm.shift.shape == norm.scale.shape == (128,)
    # docs/spec.md §5.2
    assert norm.shift[0].item() == pytest.approx(0.01984364, abs=1e-8)
    assert norm.shift[127].item() == pytest.approx(-0.01760592, abs=1e-8)
    assert norm.scale[0].item() == pytest.approx(1.63933691, abs=1e-7)
    assert norm.scale[127].item() == pytest.approx(1.68533454, abs=1e-7)
    assert 1.5307 <= norm.scale.min().item() and norm.scale.max().item() <= 1.9408
    assert "415abf4" in norm.source
    assert L.load_official_latent_norm() is norm  # cached


# SHA-256 of the 256 official values as little-endian float32 (LATENT_SHIFT then LATENT_SCALE), computed from the
# constants of the official latent_norm.py (ideogram-oss/ideogram4 at 415abf4) as published; any edit of
# data/ideogram4_latent_norm.json changes it.
OFFICIAL_CONSTANTS_SHA256 = "bab29253cd193eb96c77649bdcc041219407b33fb1303f2abb54fb5e783fb68c"


def test_official_constants_equal_the_published_values():
    norm = L.load_official_latent_norm()
    values = torch.cat([norm.shift, norm.scale]).numpy().astype("<f4")
    assert hashlib.sha256(values.tobytes()).hexdigest() == OFFICIAL_CONSTANTS_SHA256


def test_unpatchify_follows_the_patch_major_index_rule():
    # docs/spec.md §2.9: token (r, c) channel (pi*2 + pj)*C + ch = vae_latent[ch, 2r + pi, 2c + pj]
    gh, gw, c = 3, 4, 5
    tokens = torch.randn(2, gh * gw, 4 * c)
    z = L.tokens_to_vae_latent(tokens, gh, gw)
    assert z.shape == (2, c, 2 * gh, 2 * gw)
    for b in range(2):
        for r in range(gh):
            for col in range(gw):
                for pi in range(2):
                    for pj in range(2):
                        for ch in range(c):
                            assert z[b, ch, 2 * r + pi, 2 * col + pj] == tokens[b, r * gw + col, (pi * 2 + pj) * c + ch]
    back, grid = L.vae_latent_to_tokens(z)
    assert grid == (gh, gw) and torch.equal(back, tokens)


def test_flux2_order_matches_diffusers_flux2_patchify():
    from diffusers import Flux2Pipeline

    z = torch.randn(2, 32, 6, 10)
    flux2 = Flux2Pipeline._patchify_latents(z)  # (B, 128, 3, 5) in FLUX.2 order ch*4 + pi*2 + pj
    tokens, grid = L.vae_latent_to_tokens(z)
    ours = L.token_to_flux2_order(L.tokens_to_samples(tokens, *grid))
    assert torch.equal(ours, flux2)
    assert torch.equal(L.flux2_to_token_order(flux2), L.tokens_to_samples(tokens, *grid))
    assert torch.equal(Flux2Pipeline._unpatchify_latents(flux2), z)


def test_denormalize_is_official_affine_map_and_inverts():
    norm = L.load_official_latent_norm()
    tokens = torch.randn(1, 6, 128)
    raw = L.denormalize_tokens(tokens)
    assert torch.allclose(raw, tokens * norm.scale + norm.shift, atol=0, rtol=0)
    assert torch.allclose(L.normalize_tokens(raw), tokens, atol=1e-6)
    with pytest.raises(LatentFormatError, match="64 channels"):
        L.denormalize_tokens(torch.randn(1, 6, 64))


def test_latent_dict_round_trip_and_marker():
    tokens = torch.randn(2, 12, 128)
    latent = L.tokens_to_latent_dict(tokens, 3, 4)
    assert latent["samples"].shape == (2, 128, 3, 4) and latent["samples"].dtype == torch.float32
    assert latent[L.IDEOGRAM4_LATENT_KEY] == L.IDEOGRAM4_LATENT_VERSION and L.is_ideogram4_latent(latent)
    # samples[b, ch, r, c] is token r*gw + c
    assert torch.equal(latent["samples"][1, :, 2, 1], tokens[1, 2 * 4 + 1])
    back, grid = L.latent_dict_to_tokens(latent)
    assert grid == (3, 4) and torch.equal(back, tokens)
    with pytest.raises(LatentFormatError, match="not made by the Ideogram 4 pack"):
        L.latent_dict_to_tokens({"samples": latent["samples"]})
    with pytest.raises(LatentFormatError, match="version"):
        L.latent_dict_to_tokens({"samples": latent["samples"], L.IDEOGRAM4_LATENT_KEY: 99})
    with pytest.raises(LatentFormatError, match="samples"):
        L.latent_dict_to_tokens({"samples": tokens})


def test_to_comfy_flux2_decodes_like_core_to_the_same_raw_latent():
    from diffusers import Flux2Pipeline

    bn = _random_bn()
    gh, gw = 3, 5
    tokens = torch.randn(2, gh * gw, 128)
    ours = L.tokens_to_latent_dict(tokens, gh, gw)
    ours["noise_mask"] = torch.ones(1, 1, 4, 4)
    core = L.to_comfy_flux2(ours, bn)
    assert L.IDEOGRAM4_LATENT_KEY not in core and core["noise_mask"] is ours["noise_mask"]
    # Core/diffusers FLUX.2 decode path: samples * sqrt(var + 1e-4) + mean (FLUX.2 order), then unpatchify.
    std = torch.sqrt(bn.running_var + 1e-4).view(1, -1, 1, 1)
    core_raw = Flux2Pipeline._unpatchify_latents(core["samples"] * std + bn.running_mean.view(1, -1, 1, 1))
    our_raw = L.tokens_to_vae_latent(L.denormalize_tokens(tokens), gh, gw)
    assert (core_raw - our_raw).abs().max().item() <= 2e-6


def test_from_comfy_flux2_reads_core_latents_exactly():
    from diffusers import Flux2Pipeline

    bn = _random_bn(seed=1)
    samples = torch.randn(1, 128, 4, 2)
    core = {"samples": samples, "batch_index": [0]}
    ours = L.from_comfy_flux2(core, bn)
    assert L.is_ideogram4_latent(ours) and ours["batch_index"] == [0]
    std = torch.sqrt(bn.running_var + 1e-4).view(1, -1, 1, 1)
    core_raw = Flux2Pipeline._unpatchify_latents(samples * std + bn.running_mean.view(1, -1, 1, 1))
    tokens, grid = L.latent_dict_to_tokens(ours)
    our_raw = L.tokens_to_vae_latent(L.denormalize_tokens(tokens), *grid)
    assert (core_raw - our_raw).abs().max().item() <= 2e-6
    # Round trips both ways are exact up to float32 rounding.
    assert (L.to_comfy_flux2(ours, bn)["samples"] - samples).abs().max().item() <= 2e-6
    again = L.from_comfy_flux2(L.to_comfy_flux2(ours, bn), bn)
    assert (again["samples"] - ours["samples"]).abs().max().item() <= 2e-6
    with pytest.raises(LatentFormatError, match="already an Ideogram 4 latent"):
        L.from_comfy_flux2(ours, bn)
    with pytest.raises(LatentFormatError, match="64 channels"):
        L.from_comfy_flux2({"samples": torch.randn(1, 64, 2, 2)}, bn)


def test_compare_batch_norm_finds_the_order():
    norm = L.load_official_latent_norm()
    var = norm.scale.square() - 1e-4
    token = L.compare_batch_norm(L.LatentBatchNorm(norm.shift.clone(), var.clone()))
    assert token.order == "token" and token.matches()
    flux2 = L.compare_batch_norm(
        L.LatentBatchNorm(L.token_to_flux2_order(norm.shift.view(1, -1)).view(-1), L.token_to_flux2_order(var.view(1, -1)).view(-1))
    )
    assert flux2.order == "flux2" and flux2.matches()
    other = L.compare_batch_norm(_random_bn())
    assert not other.matches() and other.max_mean_diff > 0.1
    assert "LATENT_SHIFT" in other.describe()


def test_image_to_comfy_matches_diffusers_postprocess():
    from diffusers.image_processor import VaeImageProcessor

    x = 1.5 * torch.randn(2, 3, 8, 6)
    ours = L.image_to_comfy(x)
    reference = VaeImageProcessor(vae_scale_factor=16).postprocess(x, output_type="pt").permute(0, 2, 3, 1)
    assert ours.shape == (2, 8, 6, 3) and ours.dtype == torch.float32
    assert (ours - reference).abs().max().item() <= 1e-7
    assert torch.equal(L.image_to_comfy(x.bfloat16()), L.image_to_comfy(x.bfloat16().float()))
