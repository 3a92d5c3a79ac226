"""`load_dit_branches` over every supported file layout: the same tiny model gives the same output from each.

Reference for each layout: our DiT built from the tensors as the file stores them, decoded by the reference decoders
(gguf-py `quants.dequantize`; fp8 x scale), which itself matches diffusers 0.42.1 (test_dit.py). Lossless layouts
must match exactly; quantized ones also stay within a stated distance of the float weights.
"""

import pathlib
import sys

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import dit_files  # noqa: E402
from dit_reference import TINY, official_state_dict, our_config, tiny_diffusers_dit  # noqa: E402

from ideogram4_gguf.errors import ModelFileError  # noqa: E402
from ideogram4_gguf.models.dit import Ideogram4DiT  # noqa: E402
from ideogram4_gguf.models.dit_loader import BRANCH_PREFIX_PAIRS, StateDictWeights, load_dit_branches  # noqa: E402
from ideogram4_gguf.ops import Fp8Linear, QuantLinear  # noqa: E402

GRID = (4, 5)
# Files without metadata (sd.cpp GGUFs, ComfyUI files) do not say the RoPE sections; our GGUF metadata does.
TINY_ROPE = {"mrope_section": tuple(TINY["mrope_section"])}
# A tiny model whose Linears can be Q4_K (in_features % 256 == 0): hidden 256, MLP 256.
Q4K = dict(attention_head_dim=128, num_attention_heads=2, intermediate_size=256, num_layers=1)


def _pair(seed, **overrides):
    cond = official_state_dict(tiny_diffusers_dit(seed, **overrides))
    uncond = official_state_dict(tiny_diffusers_dit(seed + 1, **overrides))
    return cond, uncond


def _velocities(cond, uncond, seed=0):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, GRID[0] * GRID[1], cond.config.in_channels, generator=gen)
    features = torch.randn(6, cond.config.llm_features_dim, generator=gen) * 3
    t = torch.tensor([0.37])
    return cond(latents, t, cond.project_text(features), GRID), uncond(latents, t, None, GRID)


def _expected(decoded_cond, decoded_uncond, config):
    cond = Ideogram4DiT.from_weights(config, StateDictWeights(decoded_cond))
    uncond = Ideogram4DiT.from_weights(config, StateDictWeights(decoded_uncond), with_text=False)
    return _velocities(cond, uncond)


def _assert_same(loaded, expected, atol=0.0):
    cond, uncond, _ = loaded
    assert not hasattr(uncond, "llm_cond_proj") and not hasattr(uncond, "llm_cond_norm")
    for got, want in zip(_velocities(cond, uncond), expected):
        assert want.abs().max() > 0.3
        torch.testing.assert_close(got, want, rtol=0, atol=atol)


def _rel(a, b):
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


def _weight_error(decoded, original):
    """Relative RMS error of all lossy-stored weights together: the format's quantization error on this model."""
    lossy = [k for k in original if not torch.equal(decoded[k], original[k])]
    err = sum((decoded[k] - original[k]).pow(2).sum() for k in lossy)
    return (err / sum(original[k].pow(2).sum() for k in lossy)).sqrt().item()


# Tiny random DiTs amplify weight error ~3-6x at the output (random gates, the t-embedding -> AdaLN chain);
# measured on seeds 41-45: Q8_0 3-7x, Q4_0 3-5x, Q4_K 2.4-5.8x.
AMPLIFICATION = 8.0


@pytest.fixture(scope="module")
def pair():
    return _pair(31)


@pytest.mark.parametrize("prefixes", BRANCH_PREFIX_PAIRS)
def test_two_branch_gguf_f32_every_prefix_pair(tmp_path, pair, prefixes):
    cond, uncond = pair
    config = our_config()
    decoded = dit_files.write_gguf(tmp_path / "two.gguf", dict(zip(prefixes, pair)), Q.F32,
                                   dit_files.gguf_metadata(config))
    loaded = load_dit_branches(tmp_path / "two.gguf", compute_dtype=torch.float32)
    assert loaded[2].layout == "two-branch file" and loaded[2].prefixes == prefixes and loaded[2].config == config
    _assert_same(loaded, _expected(decoded[prefixes[0]], decoded[prefixes[1]], config))
    # F32 is lossless: the loaded model equals the original float weights exactly
    _assert_same(loaded, _expected(cond, uncond, config))


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0, Q.Q4_0], ids=lambda q: q.name)
def test_two_branch_gguf_quantized(tmp_path, pair, qtype):
    config = our_config()
    decoded = dit_files.write_gguf(tmp_path / "q.gguf", {"cond.": pair[0], "uncond.": pair[1]}, qtype,
                                   dit_files.gguf_metadata(config))
    loaded = load_dit_branches(tmp_path / "q.gguf", compute_dtype=torch.float32)
    _assert_same(loaded, _expected(decoded["cond."], decoded["uncond."], config))
    if qtype != Q.F16:
        assert isinstance(loaded[0].layers[0].attention.qkv, QuantLinear)
        assert loaded[2].storage["cond"][qtype.name] > 0
    # and the float weights are reproduced within the format's own error
    for got, exact, decoded_branch, original in zip(_velocities(*loaded[:2]), _expected(*pair, config),
                                                    decoded.values(), pair):
        assert _rel(got, exact) <= AMPLIFICATION * _weight_error(decoded_branch, original)


def test_two_branch_gguf_q4_k_from_the_llama_cpp_quantizer(tmp_path):
    cond_sd, uncond_sd = _pair(41, **Q4K)
    config = our_config(**Q4K)
    decoded = dit_files.write_gguf(tmp_path / "q4k.gguf", {"conditional_transformer.": cond_sd,
                                                          "unconditional_transformer.": uncond_sd},
                                   Q.Q4_K, dit_files.gguf_metadata(config))
    cond, uncond, info = load_dit_branches(tmp_path / "q4k.gguf", compute_dtype=torch.float32)
    layer = cond.layers[0]
    for linear in (layer.attention.qkv, layer.attention.o, layer.feed_forward.w1, layer.feed_forward.w2):
        assert isinstance(linear, QuantLinear) and linear.storage == "Q4_K"
    # every Linear with K = 256: qkv, o, w1, w2, w3, t_embedding.mlp_in/mlp_out, adaln_proj, final_layer.linear
    assert info.storage["cond"]["Q4_K"] == 9
    assert "9 Q4_K" in info.summary() and "q4k.gguf" in info.summary()
    expected = _expected(decoded["conditional_transformer."], decoded["unconditional_transformer."], config)
    _assert_same((cond, uncond, info), expected, atol=1e-6)
    # Q4_K weights carry ~7 % RMS error here (9 % on Gaussian + outliers, docs/spec.md §G4.8)
    for got, exact, decoded_branch, original in zip(_velocities(cond, uncond), _expected(cond_sd, uncond_sd, config),
                                                    decoded.values(), (cond_sd, uncond_sd)):
        weight_error = _weight_error(decoded_branch, original)
        assert 0.05 < weight_error < 0.1
        assert _rel(got, exact) <= AMPLIFICATION * weight_error


def test_gguf_array_metadata_gives_the_rope_sections(tmp_path, pair):
    config = our_config()
    dit_files.write_gguf(tmp_path / "two.gguf", {"cond.": pair[0], "uncond.": pair[1]}, Q.F32,
                         dit_files.gguf_metadata(config))
    _, _, info = load_dit_branches(tmp_path / "two.gguf", compute_dtype=torch.float32)
    assert info.config == config and info.config.mrope_section == (4, 2, 2)


def test_pair_of_single_branch_ggufs_sd_cpp_style(tmp_path, pair):
    # stable-diffusion.cpp files: bare names, block Linears Q8_0, the rest F16, no ideogram4.* metadata
    decoded_c = dit_files.write_gguf(tmp_path / "ideogram4-Q8_0.gguf", {"": pair[0]}, Q.Q8_0)[""]
    decoded_u = dit_files.write_gguf(tmp_path / "ideogram4_uncond-Q8_0.gguf", {"": pair[1]}, Q.Q8_0)[""]
    loaded = load_dit_branches(tmp_path / "ideogram4-Q8_0.gguf", tmp_path / "ideogram4_uncond-Q8_0.gguf",
                               compute_dtype=torch.float32, config_overrides=TINY_ROPE)
    assert loaded[2].layout == "pair of single-branch files"
    _assert_same(loaded, _expected(decoded_c, decoded_u, our_config()))


@pytest.mark.parametrize("cond_sharded", [False, True])
def test_official_fp8_folder(tmp_path, pair, cond_sharded):
    config = our_config()
    decoded = []
    for folder, state, sharded in (("transformer", pair[0], cond_sharded), ("unconditional_transformer", pair[1],
                                                                             False)):
        (tmp_path / folder).mkdir()
        saved, dec = dit_files.fp8_state(state, "row")
        (tmp_path / folder / "config.json").write_text(dit_files.diffusers_config_json(config))
        if sharded:
            dit_files.save_sharded(tmp_path / folder, saved)
        else:
            save_file(saved, tmp_path / folder / "diffusion_pytorch_model.safetensors")
        decoded.append(dec)
    loaded = load_dit_branches(tmp_path, compute_dtype=torch.float32)
    assert loaded[2].layout == "official folder" and loaded[2].config == config
    assert isinstance(loaded[0].layers[0].feed_forward.w2, Fp8Linear)
    _assert_same(loaded, _expected(*decoded, config))


@pytest.mark.parametrize("cond_prefix", ["model.diffusion_model.", ""])
def test_comfyui_fp8_scaled_single_files(tmp_path, pair, cond_prefix):
    saved_c, dec_c = dit_files.fp8_state(pair[0], "tensor")
    saved_u, dec_u = dit_files.fp8_state(pair[1], "tensor")
    save_file({(cond_prefix + k if k != "scaled_fp8" else k): v for k, v in saved_c.items()},
              tmp_path / "ideogram4_fp8_scaled.safetensors")
    save_file(saved_u, tmp_path / "ideogram4_unconditional_fp8_scaled.safetensors")
    loaded = load_dit_branches(tmp_path / "ideogram4_fp8_scaled.safetensors",
                               tmp_path / "ideogram4_unconditional_fp8_scaled.safetensors",
                               compute_dtype=torch.float32, config_overrides=TINY_ROPE)
    assert loaded[2].prefixes == (cond_prefix, "")
    _assert_same(loaded, _expected(dec_c, dec_u, our_config()))


def test_bf16_diffusers_split_names(tmp_path):
    models = (tiny_diffusers_dit(51), tiny_diffusers_dit(52))
    config = our_config()
    for folder, model in zip(("transformer", "unconditional_transformer"), models):
        (tmp_path / folder).mkdir()
        state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
        assert "layers.0.attention.to_q.weight" in state and "layers.0.attention.to_out.0.weight" in state
        save_file(state, tmp_path / folder / "diffusion_pytorch_model.safetensors")
        (tmp_path / folder / "config.json").write_text(dit_files.diffusers_config_json(config))
    loaded = load_dit_branches(tmp_path, compute_dtype=torch.float32)
    rounded = [{k: v.to(torch.bfloat16).float() for k, v in official_state_dict(m).items()} for m in models]
    _assert_same(loaded, _expected(*rounded, config))
    # in bf16 compute the bf16 weights are used as stored
    cond, _, _ = load_dit_branches(tmp_path, compute_dtype=torch.bfloat16)
    assert cond.layers[0].attention.qkv.weight.dtype == torch.bfloat16


def test_load_on_cpu_then_move_keeps_weights_packed(tmp_path, pair):
    dit_files.write_gguf(tmp_path / "q.gguf", {"cond.": pair[0], "uncond.": pair[1]}, Q.Q8_0,
                         dit_files.gguf_metadata(our_config()))
    cond, uncond, _ = load_dit_branches(tmp_path / "q.gguf", device="cpu")
    assert cond.compute_dtype == torch.float32  # the CPU default
    qkv = cond.layers[0].attention.qkv
    assert qkv.packed.dtype == torch.uint8 and qkv.weight.dtype == torch.float32
    # moving / re-typing afterwards keeps the blocks packed and equals loading in that dtype directly
    cond, uncond = cond.to("cpu", torch.bfloat16), uncond.to(torch.bfloat16)
    assert cond.compute_dtype == torch.bfloat16 and cond.layers[0].attention.qkv.packed.dtype == torch.uint8
    direct = load_dit_branches(tmp_path / "q.gguf", compute_dtype=torch.bfloat16)
    for got, want in zip(_velocities(cond, uncond), _velocities(*direct[:2])):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Wrong files get clear errors


def test_another_model_is_rejected_with_what_was_found(tmp_path):
    flux = {"double_blocks.0.img_attn.qkv.weight": torch.randn(6, 2), "final_layer.linear.weight": torch.randn(2, 2)}
    save_file(flux, tmp_path / "flux.safetensors")
    with pytest.raises(ModelFileError, match=r"not an Ideogram 4 DiT.*2 tensors.*double_blocks.*FLUX"):
        load_dit_branches(tmp_path / "flux.safetensors")


def test_single_branch_where_two_are_needed(tmp_path, pair):
    dit_files.write_gguf(tmp_path / "ideogram4-Q8_0.gguf", {"": pair[0]}, Q.Q8_0)
    with pytest.raises(ModelFileError, match="single DiT branch.*unconditional"):
        load_dit_branches(tmp_path / "ideogram4-Q8_0.gguf", config_overrides=TINY_ROPE)


def test_unknown_branch_prefixes_are_listed(tmp_path, pair):
    dit_files.write_gguf(tmp_path / "odd.gguf", {"pos.": pair[0], "neg.": pair[1]}, Q.F16)
    with pytest.raises(ModelFileError, match=r"'neg\.', 'pos\.'.*conditional_transformer\."):
        load_dit_branches(tmp_path / "odd.gguf")


def test_two_branch_file_given_as_the_unconditional_one(tmp_path, pair):
    dit_files.write_gguf(tmp_path / "c.gguf", {"": pair[0]}, Q.F16)
    dit_files.write_gguf(tmp_path / "two.gguf", {"cond.": pair[0], "uncond.": pair[1]}, Q.F16)
    with pytest.raises(ModelFileError, match="holds two DiT branches"):
        load_dit_branches(tmp_path / "c.gguf", tmp_path / "two.gguf", config_overrides=TINY_ROPE)


def test_incomplete_file_names_the_missing_tensors(tmp_path, pair):
    cond = {k: v for k, v in pair[0].items() if k != "layers.1.feed_forward.w3.weight"}
    dit_files.write_gguf(tmp_path / "cut.gguf", {"cond.": cond, "uncond.": pair[1]}, Q.F16,
                         dit_files.gguf_metadata(our_config()))
    with pytest.raises(ModelFileError, match=r"cond\.\*.*1 of the .* missing.*layers\.1\.feed_forward\.w3\.weight"):
        load_dit_branches(tmp_path / "cut.gguf")


def test_branches_of_different_models_are_rejected(tmp_path, pair):
    other = official_state_dict(tiny_diffusers_dit(61, intermediate_size=64))
    dit_files.write_gguf(tmp_path / "c.gguf", {"": pair[0]}, Q.F16)
    dit_files.write_gguf(tmp_path / "u.gguf", {"": other}, Q.F16)
    with pytest.raises(ModelFileError, match="do not belong together.*intermediate_size: 48 vs 64"):
        load_dit_branches(tmp_path / "c.gguf", tmp_path / "u.gguf", config_overrides=TINY_ROPE)


def test_missing_rope_settings_point_to_config_overrides(tmp_path, pair):
    dit_files.write_gguf(tmp_path / "c.gguf", {"": pair[0]}, Q.F16)
    dit_files.write_gguf(tmp_path / "u.gguf", {"": pair[1]}, Q.F16)
    with pytest.raises(ModelFileError, match="mrope_section.*config_overrides"):
        load_dit_branches(tmp_path / "c.gguf", tmp_path / "u.gguf")


def test_metadata_contradicting_the_tensors_is_rejected(tmp_path, pair):
    metadata = {**dit_files.gguf_metadata(our_config()), "ideogram4.hidden_size": 64}
    dit_files.write_gguf(tmp_path / "bad.gguf", {"cond.": pair[0], "uncond.": pair[1]}, Q.F16, metadata)
    with pytest.raises(ModelFileError, match="hidden_size = 64 but the tensors have 32"):
        load_dit_branches(tmp_path / "bad.gguf")
