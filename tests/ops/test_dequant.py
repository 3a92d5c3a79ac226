"""ops.dequantize against gguf-py's `gguf.quants.dequantize` (the reference decoder), bit for bit in fp32."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from ideogram4_gguf.errors import GGUFFormatError
from ideogram4_gguf.ops import dequant, dequantize

from .conftest import QUANT_TYPES, random_blocks


def reference(packed, qtype):
    return torch.from_numpy(quants.dequantize(packed, qtype).astype(np.float32))


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda q: q.name)
def test_fp32_bit_identical_to_gguf_py(qtype, rng):
    rows, cols = 12, 512
    packed = random_blocks(qtype, rows, cols, rng)
    ours = dequantize(torch.from_numpy(packed), qtype, (rows, cols))
    ref = reference(packed, qtype)
    assert ours.dtype == torch.float32 and ours.shape == (rows, cols)
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1], ids=lambda q: q.name)
def test_decodes_what_gguf_py_quantized(qtype, rng):
    """Realistic blocks (quantized Gaussian + outliers), not just random bytes."""
    weights = rng.normal(0, 0.02, size=(8, 256)).astype(np.float32)
    weights[:, rng.integers(0, 256, 3)] *= 8
    packed = quants.quantize(weights, qtype)
    ours = dequantize(torch.from_numpy(packed), qtype, weights.shape)
    assert torch.equal(ours, reference(packed, qtype))
    # and it is a quantization of the input: within a step of the 32-weight block's own range
    err = (ours - torch.from_numpy(weights)).abs().reshape(-1, 32).amax(1)
    block_max = torch.from_numpy(np.abs(weights)).reshape(-1, 32).amax(1)
    assert (err <= block_max / 7).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q8_0, Q.Q5_K, Q.Q4_0], ids=lambda q: q.name)
def test_low_precision_output_is_one_rounding_of_fp32(qtype, dtype, rng):
    packed = random_blocks(qtype, 6, 768, rng)
    ours = dequantize(torch.from_numpy(packed), qtype, (6, 768), dtype)
    assert ours.dtype == dtype
    assert torch.equal(ours, reference(packed, qtype).to(dtype))


def test_chunk_boundaries(monkeypatch, rng):
    """The CPU path decodes in chunks; a chunk size that does not divide the tensor must not matter."""
    monkeypatch.setattr(dequant, "CPU_CHUNK_WEIGHTS", 256 * 7)
    packed = random_blocks(Q.Q4_K, 9, 1024, rng)
    for dtype in (torch.float32, torch.bfloat16):
        ours = dequantize(torch.from_numpy(packed), Q.Q4_K, (9, 1024), dtype)
        assert torch.equal(ours, reference(packed, Q.Q4_K).to(dtype))


@pytest.mark.parametrize("qtype,np_dtype", [(Q.F32, np.float32), (Q.F16, np.float16)])
def test_float_types(qtype, np_dtype, rng):
    values = rng.normal(size=(5, 7)).astype(np_dtype)
    typed = dequantize(torch.from_numpy(values), qtype, (5, 7))
    as_bytes = dequantize(torch.from_numpy(values.view(np.uint8)), qtype, (5, 7))
    assert torch.equal(typed, torch.from_numpy(values.astype(np.float32)))
    assert torch.equal(as_bytes, typed)


def test_bf16_matches_gguf_py(rng):
    values = rng.normal(size=(4, 64)).astype(np.float32)
    packed = quants.quantize(values, Q.BF16)
    ours = dequantize(torch.from_numpy(packed), Q.BF16, (4, 64))
    assert torch.equal(ours, reference(packed, Q.BF16))
    assert torch.equal(ours, torch.from_numpy(values).to(torch.bfloat16).float())


def test_type_without_torch_decoder_falls_back_to_gguf_py(rng):
    packed = rng.integers(0, 256, size=(2, 2 * 110), dtype=np.uint8)  # Q3_K: 110 bytes per 256 weights
    packed[:, 108:110] = np.array([0.01], np.float16).view(np.uint8)
    packed[:, 218:220] = np.array([-0.02], np.float16).view(np.uint8)
    with pytest.warns(UserWarning, match="Q3_K"):
        ours = dequantize(torch.from_numpy(packed), Q.Q3_K, (2, 512))
    assert torch.equal(ours, reference(packed, Q.Q3_K))


def test_wrong_byte_count_is_a_clear_error(rng):
    packed = random_blocks(Q.Q4_K, 2, 256, rng)
    with pytest.raises(GGUFFormatError, match="does not match shape"):
        dequantize(torch.from_numpy(packed), Q.Q4_K, (2, 512))
    with pytest.raises(GGUFFormatError, match="multiple of 256"):
        dequant.packed_shape((4, 100), Q.Q4_K)


def test_device_chunks_bound_the_scratch_memory(monkeypatch, rng):
    # The chunk size used on a GPU, applied on the CPU where the allocator can be traced: the float32 scratch and
    # nibble temporaries stay near one chunk's worth instead of ~6 bytes per weight of the whole tensor.
    from instrument import cpu_transient_peak  # bench/instrument.py

    rows, cols = 2048, 8192  # 16.8 M weights: two device chunks
    packed = torch.from_numpy(random_blocks(Q.Q4_K, rows, cols, rng))
    out_bytes = rows * cols * 2
    extra = {}
    for name, chunk in (("device", dequant.DEVICE_CHUNK_WEIGHTS), ("whole", rows * cols)):
        monkeypatch.setattr(dequant, "CPU_CHUNK_WEIGHTS", chunk)
        out, peak = cpu_transient_peak(lambda: dequant.dequantize(packed, Q.Q4_K, (rows, cols), torch.bfloat16))
        if peak is None:
            pytest.skip("this torch build does not report allocation events")
        assert torch.equal(out, torch.from_numpy(quants.dequantize(packed.numpy(), Q.Q4_K)).to(torch.bfloat16))
        extra[name] = peak - out_bytes
    scales = rows * cols // 256 * 64  # the per-block scale and offset, unpacked once for the whole tensor
    # ~6 bytes per weight of one chunk (4 of float32 scratch, 1 of masked and shifted nibbles, 1 of their stack;
    # measured 6.0), 7 leaves room for allocator rounding
    assert extra["device"] <= dequant.DEVICE_CHUNK_WEIGHTS * 7 + scales, extra
    assert extra["whole"] > rows * cols * 5  # what chunking avoids
