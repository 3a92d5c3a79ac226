"""QuantLinear and Fp8Linear: forward equals F.linear with the reference-decoded weight; dtype hygiene."""

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from gguf import quants

from ideogram4_gguf.ops import Fp8Linear, QuantLinear

from .conftest import random_blocks


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.Q4_0], ids=lambda q: q.name)
def test_quant_linear_forward_fp32_exact(qtype, rng, torch_gen):
    out_features, in_features = 24, 512
    packed = random_blocks(qtype, out_features, in_features, rng)
    bias = torch.randn(out_features, generator=torch_gen)
    layer = QuantLinear(torch.from_numpy(packed), qtype, in_features, out_features, bias, torch.float32)
    x = torch.randn(3, 5, in_features, generator=torch_gen)
    weight = torch.from_numpy(quants.dequantize(packed, qtype))
    assert torch.equal(layer(x), F.linear(x, weight, bias))


def test_quant_linear_reports_compute_dtype_never_uint8(rng, torch_gen):
    packed = torch.from_numpy(random_blocks(Q.Q4_K, 16, 256, rng))
    layer = QuantLinear(packed, Q.Q4_K, 256, 16, torch.randn(16, generator=torch_gen), torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16
    assert layer.weight.shape == (16, 256) and layer.weight.device == torch.device("cpu")
    x = torch.randn(2, 256, generator=torch_gen)
    y = layer(x)  # float32 input is cast to the compute dtype
    assert y.dtype == torch.bfloat16
    weight_bf16 = torch.from_numpy(quants.dequantize(packed.numpy(), Q.Q4_K)).to(torch.bfloat16)
    assert torch.equal(y, F.linear(x.to(torch.bfloat16), weight_bf16, layer.bias))
    # .to(dtype) changes the compute dtype, never the packed bytes
    layer.to(torch.float16)
    assert layer.weight.dtype == torch.float16 and layer.bias.dtype == torch.float16
    assert layer.packed.dtype == torch.uint8 and torch.equal(layer.packed, packed)
    assert layer(x).dtype == torch.float16
    layer.float()
    assert layer.weight.dtype == torch.float32
    # packed bytes are part of the state dict, so memory accounting (ComfyUI) sees the real size
    assert layer.state_dict()["packed"].dtype == torch.uint8
    assert "Q4_K" in repr(layer)


def e4m3(weight):
    """Per-row fp8 quantization as the official release does: scale = max|row| / 448."""
    scale = weight.abs().amax(1) / 448
    return (weight / scale[:, None]).to(torch.float8_e4m3fn), scale


def test_fp8_linear_matches_official_formula(torch_gen):
    weight = torch.randn(12, 40, generator=torch_gen) * 0.05
    fp8, scale = e4m3(weight)
    bias = torch.randn(12, generator=torch_gen)
    layer = Fp8Linear(fp8, scale, bias, compute_dtype=torch.bfloat16)
    x = torch.randn(4, 40, generator=torch_gen).to(torch.bfloat16)
    official = fp8.to(torch.bfloat16) * scale.to(torch.bfloat16)[:, None]  # official Fp8Linear recipe
    assert torch.equal(layer(x), F.linear(x, official, bias.to(torch.bfloat16)))
    assert layer.weight.dtype == torch.bfloat16
    # close to the original weights (fp8 has 3 mantissa bits)
    assert (layer.weight.dequantize(torch.float32) - weight).abs().max() < 0.07 * weight.abs().max()
    layer.to(torch.float32)
    assert layer.weight_fp8.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert layer.weight.dtype == torch.float32


def test_fp8_scale_shape_checked(torch_gen):
    fp8, _ = e4m3(torch.randn(6, 8, generator=torch_gen))
    with pytest.raises(ValueError, match="weight_scale"):
        Fp8Linear(fp8, torch.ones(5))
    layer = Fp8Linear(fp8, torch.tensor(0.5), compute_dtype=torch.float32)  # per-tensor scale broadcasts
    assert torch.equal(layer.weight.dequantize(), fp8.float() * 0.5)


def test_kernel_argument_validated(rng):
    with pytest.raises(ValueError, match="kernel"):
        QuantLinear(torch.from_numpy(random_blocks(Q.Q8_0, 2, 32, rng)), Q.Q8_0, 32, 2, kernel="cuda")
