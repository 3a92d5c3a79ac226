"""Layout detection and float32 reading of every release layout, and the refusals on bad input.

References: torch for fp8 / bf16 decoding (`fp8.float() * weight_scale[:, None]` in float32) and `torch.cat` of
diffusers' to_q/to_k/to_v rows for the fused qkv (docs/spec.md §2.2.1).
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ideogram4_gguf.quant_tools import QuantToolError
from ideogram4_gguf.quant_tools.sources import open_branches


def _args(layout):
    return {"source": layout[1], "source_uncond": layout[3] if len(layout) > 2 else None}


def _close(branches):
    for b in branches:
        b.close()


@pytest.mark.parametrize("name, naming, storage, prefix", [
    ("fp8_repo", "official fused", "F8_E4M3 x per-row scale", ""),
    ("fp8_sharded", "official fused", "F8_E4M3 x per-row scale", ""),
    ("bf16_diffusers", "diffusers split", "BF16", ""),
    ("comfy", "official fused", "F8_E4M3 x per-tensor scale", "model.diffusion_model."),
    ("fp16", "official fused", "F16", ""),
])
def test_layouts_are_detected(layouts, name, naming, storage, prefix):
    branches = open_branches(**_args(layouts[name]))
    try:
        assert [b.role for b in branches] == ["conditional", "unconditional"]
        for b in branches:
            assert len(b.tensors) == 16 + 13 * 2  # 458 at full size; 2 layers here
            assert b.naming.startswith(naming) and b.prefix == prefix
            assert any(storage in t.storage for t in b.tensors.values())
            assert b.config.hidden_size == 256 and b.config.num_layers == 2 and b.config.head_dim == 128
        text = "\n".join(line for b in branches for line in b.describe())
        assert "conditional" in text and "unconditional" in text and "config: hidden 256" in text
    finally:
        _close(branches)


def test_split_attention_is_fused_in_q_k_v_row_order(layouts, small_models):
    branches = open_branches(**_args(layouts["bf16_diffusers"]))
    try:
        _, split, _ = small_models["uncond"]
        stem = "layers.1.attention."
        expected = torch.cat([split[stem + k + ".weight"] for k in ("to_q", "to_k", "to_v")]).to(torch.bfloat16)
        qkv = branches[1].tensors[stem + "qkv.weight"]
        assert qkv.shape == (768, 256)
        assert np.array_equal(qkv.read(), expected.float().numpy())
        assert np.array_equal(qkv.read(200, 600), expected[200:600].float().numpy())  # rows spanning q, k, v
        o = branches[1].tensors[stem + "o.weight"].read()
        assert np.array_equal(o, split[stem + "to_out.0.weight"].to(torch.bfloat16).float().numpy())
    finally:
        _close(branches)


def _quantize_fp8(w, per_row):
    scale = (w.abs().amax(dim=1) if per_row else w.abs().amax()).clamp(min=1e-12) / 448.0
    q = (w / (scale[:, None] if per_row else scale)).to(torch.float8_e4m3fn)
    return q, scale


@pytest.mark.parametrize("layout, per_row", [("fp8_repo", True), ("comfy", False)])
def test_fp8_weights_read_as_fp8_times_scale(layouts, small_models, layout, per_row):
    branches = open_branches(**_args(layouts[layout]))
    try:
        fused, _, _ = small_models["cond"]
        name = "layers.0.feed_forward.w2.weight"
        q, scale = _quantize_fp8(fused[name], per_row)
        expected = q.float() * (scale[:, None] if per_row else scale)
        assert np.array_equal(branches[0].tensors[name].read(), expected.numpy())
        assert branches[0].tensors["input_proj.weight"].storage == "BF16"
    finally:
        _close(branches)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(QuantToolError, match="no such file or folder"):
        open_branches(tmp_path / "nope.safetensors", tmp_path / "nope2.safetensors")


def test_a_file_that_is_not_ideogram4_is_refused(tmp_path):
    save_file({"decoder.conv_in.weight": torch.ones(8, 4, 3, 3), "post_quant_conv.weight": torch.ones(4, 4, 1, 1)},
              str(tmp_path / "vae.safetensors"))
    with pytest.raises(QuantToolError, match="not an Ideogram 4 transformer.*embed_image_indicator"):
        open_branches(tmp_path / "vae.safetensors", single_branch="cond")


def test_one_branch_where_two_are_needed_says_how_to_pass_the_other(layouts):
    with pytest.raises(QuantToolError, match="--source-uncond.*--single-branch cond"):
        open_branches(layouts["fp16"][1])


def test_same_file_twice_is_refused(layouts):
    with pytest.raises(QuantToolError, match="same file"):
        open_branches(layouts["fp16"][1], layouts["fp16"][1])


def test_repo_without_unconditional_folder_is_refused(tmp_path, layouts):
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(layouts["fp8_repo"][1] + "/transformer", repo / "transformer")
    with pytest.raises(QuantToolError, match="unconditional_transformer/ folder"):
        open_branches(repo)
    assert open_branches(repo, single_branch="cond")[0].role == "conditional"


def _state(small_models, role="cond"):
    fused, _, _ = small_models[role]
    return {k: v.clone() for k, v in fused.items()}


def test_missing_tensor_is_named(tmp_path, small_models, layouts):
    state = _state(small_models)
    del state["layers.1.feed_forward.w3.weight"]
    save_file(state, str(tmp_path / "cond.safetensors"))
    with pytest.raises(QuantToolError, match="1 tensor\\(s\\) missing: layers.1.feed_forward.w3.weight"):
        open_branches(tmp_path / "cond.safetensors", layouts["fp16"][3])


def test_unexpected_tensor_is_named(tmp_path, small_models):
    state = _state(small_models)
    state["layers.1.extra.weight"] = torch.ones(3)
    save_file(state, str(tmp_path / "cond.safetensors"))
    with pytest.raises(QuantToolError, match="unexpected tensor\\(s\\): layers.1.extra.weight"):
        open_branches(tmp_path / "cond.safetensors", single_branch="cond")


def test_shape_that_disagrees_with_config_is_named(tmp_path, small_models):
    state = _state(small_models)
    state["layers.0.attention.o.weight"] = torch.ones(256, 255)
    save_file(state, str(tmp_path / "cond.safetensors"))
    with pytest.raises(QuantToolError, match=r"layers.0.attention.o.weight: \(256, 255\) \(expected \(256, 256\)\)"):
        open_branches(tmp_path / "cond.safetensors", single_branch="cond")


def test_config_json_that_disagrees_with_the_tensors_is_refused(tmp_path, small_models):
    fused, _, config = small_models["cond"]
    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file(fused, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 1024}))
    with pytest.raises(QuantToolError, match="disagrees with the tensor shapes.*intermediate_size: 1024 vs 512"):
        open_branches(folder, single_branch="cond")


def test_branches_with_different_configs_are_refused(tmp_path, small_models, tiny_models):
    save_file(small_models["cond"][0], str(tmp_path / "cond.safetensors"))
    save_file(tiny_models["uncond"][0], str(tmp_path / "uncond.safetensors"))
    with pytest.raises(QuantToolError, match="different configs.*hidden_size: 256 vs 512"):
        open_branches(tmp_path / "cond.safetensors", tmp_path / "uncond.safetensors")


def test_quantized_releases_that_cannot_be_read_are_refused_up_front(tmp_path, small_models):
    state = _state(small_models)
    w = state["layers.0.feed_forward.w1.weight"]
    state["layers.0.feed_forward.w1.weight"] = torch.zeros(w.shape[0], w.shape[1] // 2, dtype=torch.uint8)
    save_file(state, str(tmp_path / "int.safetensors"))
    with pytest.raises(QuantToolError, match="does not read, e.g. layers.0.feed_forward.w1.weight \\(U8\\)"):
        open_branches(tmp_path / "int.safetensors", single_branch="cond")
    state = _state(small_models)
    state["layers.0.feed_forward.w1.weight.absmax"] = torch.ones(8)
    save_file(state, str(tmp_path / "nf4.safetensors"))
    with pytest.raises(QuantToolError, match="bitsandbytes NF4"):
        open_branches(tmp_path / "nf4.safetensors", single_branch="cond")
