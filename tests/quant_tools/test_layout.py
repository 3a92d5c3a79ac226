"""The one description of the Ideogram 4 DiT layout (quant_tools/layout.py) against docs/spec.md §2.1-§2.2.1: the
tensor table, the configuration read back from shapes and from either config.json spelling, the split -> fused names
and the QKV fusion rule (numpy here; the runtime applies the same rule with torch, tests/models/test_dit_loader.py)."""

import dataclasses

import numpy as np
import pytest

from ideogram4_gguf.quant_tools import QuantToolError
from ideogram4_gguf.quant_tools.layout import (
    CONFIG_METADATA,
    FULL_SIZE,
    FUSED_AXIS,
    QKV_PARTS,
    Ideogram4Config,
    config_from_shapes,
    config_json_hints,
    fused_shape,
    official_names,
)

TINY = Ideogram4Config(hidden_size=32, num_layers=2, num_heads=2, head_dim=16, intermediate_size=48, adaln_dim=8,
                       in_channels=32, llm_features_dim=13 * 8, mrope_section=(4, 2, 2))


def test_full_size_table_is_the_spec_table():
    shapes = FULL_SIZE.tensor_shapes()
    assert len(shapes) == 458  # docs/spec.md §2.2: 12 before the blocks, 13 per block, 4 in the final layer
    assert list(shapes)[:3] == ["input_proj.weight", "input_proj.bias", "llm_cond_norm.weight"]
    assert list(shapes)[-1] == "final_layer.adaln_modulation.bias"
    assert shapes["layers.33.attention.qkv.weight"] == (13824, 4608)
    assert shapes["llm_cond_proj.weight"] == (4608, 53248)
    uncond = FULL_SIZE.tensor_shapes(with_text=False)
    assert set(shapes) - set(uncond) == {"llm_cond_norm.weight", "llm_cond_proj.weight", "llm_cond_proj.bias"}
    assert set(CONFIG_METADATA) == set(Ideogram4Config.field_names())


@pytest.mark.parametrize("config", [FULL_SIZE, TINY], ids=["full", "tiny"])
def test_config_round_trips_through_its_shapes(config):
    shapes = config.tensor_shapes()
    hints = {"mrope_section": (list(config.mrope_section), "test hints")}
    assert config_from_shapes(shapes.get, shapes, "test", hints=hints) == config
    uncond = config.tensor_shapes(with_text=False)
    assert config_from_shapes(uncond.get, uncond, "test", hints=hints, with_text=False,
                              overrides={"llm_features_dim": config.llm_features_dim}) == config


def test_both_config_json_spellings_give_the_same_settings():
    shapes = TINY.tensor_shapes()
    diffusers = {"_class_name": "Ideogram4Transformer2DModel", "attention_head_dim": 16, "num_attention_heads": 2,
                 "adaln_dim": 8, "num_layers": 2, "intermediate_size": 48, "in_channels": 32, "llm_features_dim": 104,
                 "rope_theta": 10000, "mrope_section": [4, 2, 2]}
    official = {"emb_dim": 32, "num_heads": 2, "adanln_dim": 8, "num_layers": 2, "intermediate_size": 48,
                "in_channels": 32, "llm_features_dim": 104, "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}
    for data in (diffusers, official):
        config = config_from_shapes(shapes.get, shapes, "test", hints=config_json_hints(data, "config.json"))
        assert config == dataclasses.replace(TINY, rope_theta=10000.0)
    assert config_json_hints({"_class_name": "AutoencoderKL", "block_out_channels": [1]}, "vae.json") == {}
    with pytest.raises(QuantToolError, match="describes a 'FluxTransformer2DModel'"):
        config_json_hints({"_class_name": "FluxTransformer2DModel", "llm_features_dim": 1}, "config.json")


def test_settings_that_disagree_or_are_damaged_are_named():
    shapes = TINY.tensor_shapes()
    hints = {"intermediate_size": (64, "config.json: intermediate_size"), "mrope_section": ([4, 2, 2], "x")}
    with pytest.raises(QuantToolError, match=r"config.json: intermediate_size disagrees with the tensor shapes "
                                             r"\(intermediate_size: 64 vs 48\): it says intermediate_size = 64"):
        config_from_shapes(shapes.get, shapes, "test", hints=hints)
    with pytest.raises(QuantToolError, match=r"meta: rope_theta is 'x'; expected a finite number above 1"):
        config_from_shapes(shapes.get, shapes, "test", hints={"rope_theta": ("x", "meta: rope_theta")})
    with pytest.raises(QuantToolError, match=r"test: Inconsistent Ideogram 4 DiT config: mrope_section"):
        config_from_shapes(shapes.get, shapes, "test")  # head_dim 16 cannot take the release's (24, 20, 20)
    with pytest.raises(QuantToolError, match=r"the Ideogram 4 DiT tensors \['layers.0.attention.norm_q.weight'\]"):
        config_from_shapes(shapes.get, [n for n in shapes if "norm_q" not in n], "test")


def test_split_names_fuse_in_q_k_v_row_order():
    rng = np.random.default_rng(0)
    stem = "layers.1.attention."
    parts = {stem + p + ".weight": rng.standard_normal((32, 32)).astype(np.float32) for p in QKV_PARTS}
    stored = {**dict(reversed(list(parts.items()))), stem + "to_out.0.weight": np.zeros((32, 32)), "input_proj.bias": 0}
    names = official_names(stored, "test")
    assert names.split and names.renames() == {stem + "to_out.0.weight": stem + "o.weight"}
    assert names.single["input_proj.bias"] == "input_proj.bias"
    assert names.fused == {stem + "qkv.weight": tuple(stem + p + ".weight" for p in ("to_q", "to_k", "to_v"))}
    fused = np.concatenate([stored[p] for p in names.fused[stem + "qkv.weight"]], axis=FUSED_AXIS)
    assert fused.shape == fused_shape("qkv", [stored[p].shape for p in parts], "test")
    assert fused.shape == TINY.tensor_shapes()[stem + "qkv.weight"]
    assert np.array_equal(fused[32:64], parts[stem + "to_k.weight"])  # docs/spec.md §2.2.1: k is rows 32-63 here


@pytest.mark.parametrize("names, match", [
    (["layers.0.attention.to_q.weight", "layers.0.attention.to_v.weight"], "needs to_q, to_k and to_v; found only"),
    (["layers.0.attention.qkv.weight", *(f"layers.0.attention.{p}.weight" for p in QKV_PARTS)],
     "stored both fused"),
    (["layers.0.attention.o.weight", "layers.0.attention.to_out.0.weight"], "is stored twice"),
])
def test_incomplete_or_mixed_attention_names_are_refused(names, match):
    with pytest.raises(QuantToolError, match=match):
        official_names(names, "test")
    with pytest.raises(QuantToolError, match="must be 2-D weights of one width"):
        fused_shape("qkv", [(32, 32), (32, 16), (32, 32)], "test")
