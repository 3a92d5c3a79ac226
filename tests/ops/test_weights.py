"""WeightSource over GGUF / safetensors / shards / folders: the same names give the same layers."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from gguf import quants
from safetensors.torch import save_file
from torch import nn

from ideogram4_gguf.errors import GGUFFormatError, ModelFileError
from ideogram4_gguf.ops import Fp8Linear, GGUFSource, QuantLinear, open_weights

from gguf_files import write_gguf

from .conftest import random_blocks
from .test_linear import e4m3


@pytest.fixture
def dense(torch_gen):
    return {
        "blk.proj.weight": torch.randn(16, 64, generator=torch_gen),
        "blk.proj.bias": torch.randn(16, generator=torch_gen),
        "blk.norm.weight": torch.randn(64, generator=torch_gen),
    }


def test_gguf_source(tmp_path, rng, dense):
    packed = random_blocks(Q.Q8_0, 16, 64, rng)
    path = write_gguf(tmp_path / "m.gguf", {
        "cond.blk.proj.weight": (Q.Q8_0, packed),
        "cond.blk.proj.bias": dense["blk.proj.bias"].numpy(),
        "cond.blk.norm.weight": (Q.F16, dense["blk.norm.weight"].numpy().astype(np.float16)),
        "uncond.blk.norm.weight": dense["blk.norm.weight"].numpy(),
    })
    source = open_weights(path)
    assert isinstance(source, GGUFSource) and source.metadata["general.architecture"] == "ideogram4"
    cond = source.with_prefix("cond.")
    assert sorted(cond.keys()) == ["blk.norm.weight", "blk.proj.bias", "blk.proj.weight"]
    assert cond.storage("blk.proj.weight") == "Q8_0" and cond.shape("blk.proj.weight") == (16, 64)
    layer = cond.linear("blk.proj", torch.float32)
    assert isinstance(layer, QuantLinear)
    weight = torch.from_numpy(quants.dequantize(packed, Q.Q8_0))
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), F.linear(x, weight, dense["blk.proj.bias"]))
    assert torch.equal(cond.tensor("blk.proj.weight"), weight)
    assert cond.tensor("blk.norm.weight").dtype == torch.float16  # stored dtype by default
    assert torch.equal(cond.tensor("blk.norm.weight", torch.float32),
                       dense["blk.norm.weight"].half().float())
    renamed = cond.renamed(lambda n: n.replace("blk.", "block.") if "norm" in n else None)
    assert renamed.keys() == ["block.norm.weight"]
    with pytest.raises(ModelFileError, match="'blk.missing.weight' is missing"):
        cond.linear("blk.missing")


def test_safetensors_single_sharded_and_folder(tmp_path, dense):
    save_file(dense, tmp_path / "single.safetensors")
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    names = sorted(dense)
    save_file({n: dense[n] for n in names[:1]}, shard_dir / "model-00001-of-00002.safetensors")
    save_file({n: dense[n] for n in names[1:]}, shard_dir / "model-00002-of-00002.safetensors")
    index = {"weight_map": {n: f"model-0000{1 if i == 0 else 2}-of-00002.safetensors" for i, n in enumerate(names)}}
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    x = torch.randn(2, 64)
    expected = F.linear(x, dense["blk.proj.weight"], dense["blk.proj.bias"])
    for path in (tmp_path / "single.safetensors", shard_dir / "model.safetensors.index.json", shard_dir):
        source = open_weights(path)
        assert sorted(source.keys()) == names
        layer = source.linear("blk.proj", torch.float32)
        assert type(layer) is nn.Linear and torch.equal(layer(x), expected)
        assert source.storage("blk.norm.weight") == "F32"


def test_fp8_weights_with_row_scale_and_comfy_scalar_scale(tmp_path, torch_gen):
    weight = torch.randn(8, 32, generator=torch_gen) * 0.1
    fp8, row_scale = e4m3(weight)
    save_file({"a.weight": fp8, "a.weight_scale": row_scale, "a.bias": torch.randn(8, generator=torch_gen),
               "b.weight": fp8.clone(), "b.scale_weight": torch.tensor(0.25)}, tmp_path / "fp8.safetensors")
    source = open_weights(tmp_path / "fp8.safetensors")
    assert source.storage("a.weight") == "F8_E4M3"
    a = source.linear("a", torch.bfloat16)
    assert isinstance(a, Fp8Linear)
    official = fp8.to(torch.bfloat16) * row_scale.to(torch.bfloat16)[:, None]
    assert torch.equal(a.weight.dequantize(), official)
    assert torch.equal(source.tensor("a.weight", torch.bfloat16), official)
    assert torch.equal(source.tensor("b.weight", torch.float32), fp8.float() * 0.25)
    assert torch.equal(source.linear("b", torch.float32).weight.dequantize(), fp8.float() * 0.25)


def test_bad_inputs(tmp_path, dense):
    with pytest.raises(ModelFileError, match="not found"):
        open_weights(tmp_path / "nope.safetensors")
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(ModelFileError, match="pickle"):
        open_weights(tmp_path / "model.ckpt")
    (tmp_path / "junk.bin2").write_bytes(b"hello world, not a model")
    with pytest.raises(ModelFileError, match="neither a GGUF nor a safetensors"):
        open_weights(tmp_path / "junk.bin2")
    (tmp_path / "fake.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad json}")
    with pytest.raises(ModelFileError, match="not a readable safetensors"):
        open_weights(tmp_path / "fake.safetensors")
    (tmp_path / "fake.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(GGUFFormatError):
        open_weights(tmp_path / "fake.gguf")
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    (shard_dir / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(ModelFileError, match="shard"):
        open_weights(shard_dir)
    save_file(dense, tmp_path / "one.safetensors")
    save_file(dense, tmp_path / "two.safetensors")
    with pytest.raises(ModelFileError, match="also appears|in both"):
        open_weights([tmp_path / "one.safetensors", tmp_path / "two.safetensors"])
