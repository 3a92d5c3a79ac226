"""FLUX.2 VAE decoder vs diffusers 0.42.1 `AutoencoderKLFlux2.decode` (tiny random config, fp32), loading from
diffusers- and BFL/ComfyUI-named files, the full Ideogram 4 decode path vs diffusers' `Ideogram4Pipeline`, and
the memory machinery (row bands, chunked attention, tiling, planning)."""

import itertools
import logging
import types

import pytest
import torch
from ideogram4_gguf.errors import ModelFileError
from ideogram4_gguf.models import latents as L
from ideogram4_gguf.models import vae as V
from ideogram4_gguf.models import vae_loader as VL
from ideogram4_gguf.models import vae_tiling as T
from safetensors.torch import save_file

from .vae_reference import tiny_diffusers_vae, to_bfl_state_dict

PARITY_ATOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    return tiny_diffusers_vae(seed=0)


@pytest.fixture(scope="module")
def latent():
    return torch.randn(2, 8, 12, 10, generator=torch.Generator().manual_seed(5))


def _diffusers_decode(reference, z):
    with torch.no_grad():
        return reference.decode(z).sample


def test_decode_matches_diffusers_from_diffusers_folder(reference, latent, tmp_path):
    reference.save_pretrained(tmp_path / "vae")  # config.json (norm_num_groups 8) + diffusion_pytorch_model.safetensors
    ours = VL.load_vae_decoder(tmp_path, dtype=torch.float32)  # repo root: finds vae/
    assert ours.config == V.Flux2VAEConfig(8, (32, 32), 1, 8, 3)
    expected = _diffusers_decode(reference, latent)
    got = ours.decode(latent)
    assert got.shape == expected.shape == (2, 3, 24, 20)
    assert (got - expected).abs().max().item() <= PARITY_ATOL
    # Weights identical to the reference, encoder never loaded.
    assert not any(name.startswith("encoder") for name in ours.state_dict())
    assert ours.latent_bn is not None and torch.equal(ours.latent_bn.running_var, reference.bn.running_var)


@pytest.mark.parametrize("prefix", ["", "first_stage_model.", "vae."])
def test_decode_matches_diffusers_from_bfl_named_file(reference, latent, tmp_path, prefix):
    bfl = to_bfl_state_dict(reference.state_dict(), levels=2, prefix=prefix)
    assert f"{prefix}decoder.mid.attn_1.q.weight" in bfl and bfl[f"{prefix}decoder.mid.attn_1.q.weight"].ndim == 4
    assert f"{prefix}decoder.up.1.upsample.conv.weight" in bfl and f"{prefix}decoder.post_quant_conv.weight" in bfl
    path = tmp_path / "flux2-vae.safetensors"
    save_file(bfl, str(path))
    ours = VL.load_vae_decoder(path, dtype=torch.float32, norm_num_groups=8)
    expected = _diffusers_decode(reference, latent)
    assert (ours.decode(latent) - expected).abs().max().item() <= PARITY_ATOL
    assert torch.equal(ours.latent_bn.running_mean, reference.bn.running_mean)


def test_row_bands_and_chunked_attention_equal_whole_tensors(reference, latent):
    ours = VL.vae_decoder_from_state_dict(reference.state_dict(), norm_num_groups=8)
    whole = ours.decode(latent, band_bytes=None, max_score_bytes=None)
    # 1-row bands everywhere and one query per SDPA call: every banded/chunked code path runs.
    banded = ours.decode(latent, band_bytes=1, max_score_bytes=1)
    assert (banded - whole).abs().max().item() <= PARITY_ATOL
    assert (banded - _diffusers_decode(reference, latent)).abs().max().item() <= PARITY_ATOL


def test_chunked_attention_equals_sdpa_and_softmax():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 300, 64, generator=g) for _ in range(3))
    whole = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    explicit = torch.softmax(q @ k.transpose(1, 2) / 8.0, dim=-1) @ v
    chunked = V.mid_attention(q, k, v, max_score_bytes=2 * 300 * 8 * 7)  # 7 queries per call
    assert (whole - explicit).abs().max().item() <= 1e-5
    assert (chunked - whole).abs().max().item() <= 1e-6


def test_decode_latents_matches_ideogram4_pipeline_decode_path(reference):
    """Our de-norm + patch-major unpatchify + decode + IMAGE vs `Ideogram4Pipeline.__call__`'s own decode code:
    the transformers are zero-velocity stubs, so the Euler loop leaves the given latents unchanged and the pipeline
    decodes exactly them (bn buffers read in token order, as diffusers does for Ideogram's vae/)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Ideogram4Pipeline

    class ZeroVelocity(torch.nn.Module):
        config = types.SimpleNamespace(in_channels=32)
        dtype = torch.float32
        device = torch.device("cpu")

        def forward(self, hidden_states, **_):
            return (torch.zeros_like(hidden_states),)

    def encode_prompt(prompt, grid_h, grid_w, max_sequence_length, device):
        n = max_sequence_length + grid_h * grid_w
        zeros = torch.zeros(1, n, dtype=torch.long)
        return torch.zeros(1, n, 8), torch.zeros(1, n, 3, dtype=torch.long), zeros, zeros

    pipe = Ideogram4Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=reference, text_encoder=None, tokenizer=None,
        transformer=ZeroVelocity(), unconditional_transformer=ZeroVelocity(),
    )
    pipe.encode_prompt = encode_prompt
    pipe.set_progress_bar_config(disable=True)
    gh, gw = 3, 5
    tokens = torch.randn(1, gh * gw, 32, generator=torch.Generator().manual_seed(9))
    expected = pipe(
        "x", height=gh * 4, width=gw * 4, num_inference_steps=2, guidance_scale=3.0, guidance_schedule=None,
        max_sequence_length=4, latents=tokens.clone(), output_type="pt",
    ).images.permute(0, 2, 3, 1)

    ours = VL.vae_decoder_from_state_dict(reference.state_dict(), dtype=torch.float32, norm_num_groups=8)
    norm = L.LatentNorm.from_batch_norm(ours.latent_bn)
    image = T.decode_latents(tokens, ours, grid=(gh, gw), norm=norm, tiled="off")
    assert image.shape == expected.shape == (1, 12, 20, 3) and image.dtype == torch.float32
    assert (image - expected).abs().max().item() <= PARITY_ATOL
    # Same through our LATENT dict.
    from_dict = T.decode_latents(L.tokens_to_latent_dict(tokens, gh, gw), ours, norm=norm, tiled="off")
    assert (from_dict - image).abs().max().item() <= 1e-6


def _smooth_latent(channels, height, width, seed):
    """Low-frequency random latent: 4x4 random values, bicubically upsampled."""
    coarse = torch.randn(1, channels, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)


def test_tiled_decode_close_to_untiled(reference):
    ours = VL.vae_decoder_from_state_dict(reference.state_dict(), norm_num_groups=8)
    z = _smooth_latent(8, 48, 40, seed=2)
    whole = ours.decode(z)
    scale = whole.abs().max().item()
    steps = []
    # 48-pixel tiles (24 latent pixels), 16-pixel overlaps: 3 x 2 tiles, two passes.
    tiled = T.decode_tiled(ours, z, 48, 16, progress=lambda done, total: steps.append((done, total)))
    assert steps[-1] == (12, 12) and tiled.dtype == torch.float32 and tiled.shape == whole.shape
    diff = (tiled - whole).abs()
    # Tiles still see only their own neighbourhood in the tiled up blocks (docs/vae.md: measured 0.09 / 0.009).
    assert diff.max().item() <= 0.15 * scale
    assert diff.mean().item() <= 0.015 * scale
    # Per-tile GroupNorm statistics (what ComfyUI and diffusers do) are several times further off.
    per_tile = (T.decode_tiled(ours, z, 48, 16, group_norm="tile") - whole).abs()
    assert per_tile.mean().item() > 3 * diff.mean().item()
    # One tile covering everything is the untiled decode.
    assert (T.decode_tiled(ours, z, 96, 16) - whole).abs().max().item() <= 1e-6


def test_blend_weights_partition_unity():
    spans = T._tile_spans(100, 40, 10)
    assert spans[0][0] == 0 and spans[-1][1] == 100
    assert all(b[0] < a[1] for a, b in itertools.pairwise(spans))
    total = torch.zeros(100 * 8)
    for index, (start, end) in enumerate(spans):
        total[start * 8 : end * 8] += T._blend_ramp(spans, index, 8, "cpu")
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)


def test_plan_decode_chooses_by_free_memory():
    with torch.device("meta"):
        full = V.Flux2VAEDecoder(V.Flux2VAEConfig()).to(torch.bfloat16)
    whole = T.decode_peak_bytes(full, 1024, 1024, band_bytes=None)
    banded = T.decode_peak_bytes(full, 1024, 1024)
    assert banded < whole
    plan = T.plan_decode(full, 1024, 1024, free_memory_bytes=whole)
    assert not plan.tiled and plan.band_bytes is None
    plan = T.plan_decode(full, 1024, 1024, free_memory_bytes=whole - 1)
    assert not plan.tiled and plan.band_bytes == V.DEFAULT_BAND_BYTES
    assert T.plan_decode(full, 1024, 1024, tiled="off", free_memory_bytes=1).tiled is False
    forced = T.plan_decode(full, 1024, 1024, tiled="on", free_memory_bytes=1 << 40)
    assert forced.tiled and forced.tile_px == 512 and forced.overlap_px == 128 and forced.head_levels == 2
    # The memory target: 2048x2048 in bf16 decodes within 4 GB of activations on the auto path.
    assert T.decode_peak_bytes(full, 2048, 2048) > 4 * 10**9
    plan = T.plan_decode(full, 2048, 2048, free_memory_bytes=4 * 10**9)
    assert plan.tiled and plan.estimated_peak_bytes <= 4 * 10**9 and plan.tile_px >= 1024 and plan.head_levels == 2
    # Less memory: smaller tiles, then a less global head.
    small = T.plan_decode(full, 2048, 2048, free_memory_bytes=10**9)
    assert small.estimated_peak_bytes <= 10**9 and small.head_levels < 2


def test_decode_latents_auto_tiles_when_memory_is_short():
    # Three levels (x4 upsampling), so the high-resolution tail, not the attention, dominates the memory.
    three = ("UpDecoderBlock2D",) * 3
    reference = tiny_diffusers_vae(seed=3, block_out_channels=(32, 32, 32), up_block_types=three,
                                   down_block_types=("DownEncoderBlock2D",) * 3)
    ours = VL.vae_decoder_from_state_dict(reference.state_dict(), norm_num_groups=8)
    g = torch.Generator().manual_seed(4)
    norm = L.LatentNorm(0.1 * torch.randn(32, generator=g), 1.0 + 0.5 * torch.rand(32, generator=g))
    tokens = L.normalize_tokens(L.vae_latent_to_tokens(_smooth_latent(8, 16, 16, seed=6))[0], norm)
    free = T.decode_peak_bytes(ours, 64, 64, tile_px=32)
    assert free < T.decode_peak_bytes(ours, 64, 64)
    steps = []
    tiled = T.decode_latents(tokens, ours, grid=(8, 8), norm=norm, free_memory_bytes=free,
                             progress=lambda done, total: steps.append((done, total)))
    whole = T.decode_latents(tokens, ours, grid=(8, 8), norm=norm, free_memory_bytes=100 * free)
    assert len(steps) > 2 and steps[-1][0] == steps[-1][1]
    assert tiled.shape == whole.shape == (1, 64, 64, 3)
    diff = (tiled - whole).abs()
    assert 0 < diff.max().item() <= 0.1 and diff.mean().item() <= 0.01  # IMAGE units (0..1)


def test_estimate_tracks_the_tensor_sizes():
    config = V.Flux2VAEConfig()
    at_1024 = T.estimate_decode_peak(config, 1024, 1024, torch.bfloat16, band_bytes=None)
    at_2048 = T.estimate_decode_peak(config, 2048, 2048, torch.bfloat16, band_bytes=None)
    # Unbanded, the peak is at full resolution in the 256 -> 128 ResBlock: x (256 ch) + GN copy (256) + conv1 (128)
    # = 640 channels, or x + h1 + GN copy + h2 = 256 + 3 * 128 = 640 channels; 2 bytes each.
    assert at_1024.stage.startswith("up_blocks.3.resnets.0")
    assert at_1024.bytes == 640 * 1024 * 1024 * 2
    assert at_2048.bytes == 4 * at_1024.bytes
    fp32 = T.estimate_decode_peak(config, 1024, 1024, torch.float32, band_bytes=None)
    assert fp32.bytes == 2 * at_1024.bytes


# ---- wrong files --------------------------------------------------------------------------------------------------


def test_wrong_files_raise_model_file_errors(reference, tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ModelFileError, match="not found"):
        VL.load_vae_decoder(missing)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all" + bytes(range(64)))
    with pytest.raises(ModelFileError, match="garbage.safetensors.*not a readable safetensors"):
        VL.load_vae_decoder(garbage)

    dit = tmp_path / "ideogram4_dit.safetensors"
    save_file({"layers.0.attention.qkv.weight": torch.randn(4, 4)}, str(dit))
    with pytest.raises(ModelFileError, match="ideogram4_dit.safetensors holds no VAE decoder"):
        VL.load_vae_decoder(dit)

    truncated = {k: v for k, v in reference.state_dict().items() if "up_blocks.1.resnets.1" not in k}
    cut = tmp_path / "cut.safetensors"
    save_file(truncated, str(cut))
    with pytest.raises(ModelFileError, match="cut.safetensors is not a complete FLUX.2 VAE decoder.*up_blocks.1.resnets.1"):
        VL.load_vae_decoder(cut, norm_num_groups=8)

    with pytest.raises(ModelFileError, match="GGUF"):
        gguf = tmp_path / "vae.gguf"
        gguf.write_bytes(b"GGUF")
        VL.load_vae_decoder(gguf)

    with pytest.raises(ModelFileError, match="norm_num_groups"):
        VL.vae_decoder_from_state_dict(reference.state_dict(), norm_num_groups=7)


def test_flux1_sized_vae_is_refused_with_the_file_name(tmp_path):
    flux1_like = tiny_diffusers_vae(seed=1, latent_channels=16)
    path = tmp_path / "ae.safetensors"
    save_file(flux1_like.state_dict(), str(path))
    vae = VL.load_vae_decoder(path, dtype=torch.float32, norm_num_groups=8)
    tokens = torch.randn(1, 4, 128)
    with pytest.raises(ModelFileError, match=r"ae.safetensors has 16 latent channels \(a FLUX.1 / SD3 VAE\).*128 channels"):
        T.decode_latents(tokens, vae, grid=(2, 2))


def test_flux1_layout_without_post_quant_conv_is_named(tmp_path):
    # FLUX.1's ae.safetensors: BFL names, 16 latent channels, no post_quant_conv and no bn.
    flux1_like = tiny_diffusers_vae(seed=4, latent_channels=16)
    bfl = to_bfl_state_dict(flux1_like.state_dict(), levels=2)
    bfl = {k: v for k, v in bfl.items() if "post_quant_conv" not in k and not k.startswith("bn.")}
    path = tmp_path / "ae.safetensors"
    save_file(bfl, str(path))
    with pytest.raises(ModelFileError, match=r"ae.safetensors is not a complete FLUX.2 VAE decoder \(its 16 latent "
                                             r"channels suggest a FLUX.1 / SD3 VAE\).*post_quant_conv"):
        VL.load_vae_decoder(path, norm_num_groups=8)


def test_batch_norm_statistics_report(tmp_path, caplog):
    model = tiny_diffusers_vae(seed=2, latent_channels=32)
    norm = L.load_official_latent_norm()
    path = tmp_path / "differs.safetensors"
    save_file(model.state_dict(), str(path))
    with caplog.at_level(logging.WARNING, logger=VL.__name__):
        vae = VL.load_vae_decoder(path, dtype=torch.float32, norm_num_groups=8)
    assert "differs.safetensors carries latent batch-norm statistics that differ" in caplog.text
    assert not vae.batch_norm_comparison.matches()

    # Statistics equal to the official constants (token order, as the Ideogram vae/ file presumably has): silent.
    state = model.state_dict()
    state["bn.running_mean"] = norm.shift.clone()
    state["bn.running_var"] = norm.scale.square() - 1e-4
    same = tmp_path / "official.safetensors"
    save_file(state, str(same))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=VL.__name__):
        vae = VL.load_vae_decoder(same, dtype=torch.float32, norm_num_groups=8)
    assert caplog.text == "" and vae.batch_norm_comparison.order == "token" and vae.batch_norm_comparison.matches()
