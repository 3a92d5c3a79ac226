"""quant_tools.quantize / dequantize against the references.

- Encoders: byte equality with ggml's reference quantizer (ggml-python 0.0.45 `ggml_quantize_chunk`, no
  importance matrix) on random, heavy-tailed and edge-case inputs.
- Decoders: bit equality with gguf-py 0.19 `gguf.quants.dequantize`.
- Q8_0 / Q4_0 / F16 / BF16: also byte equality with gguf-py's own `gguf.quants.quantize`.
"""

import gguf
import numpy as np
import pytest

from ideogram4_gguf.quant_tools import QuantToolError, dequantize, quantize
from ideogram4_gguf.quant_tools.quants import QTYPES

ALL_TYPES = ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "F16", "BF16", "F32"]
N = 1024  # 4 super-blocks per row


def _inputs():
    """name -> float32 (rows, N): every case the reference has a special path for."""
    rng = np.random.default_rng(1234)
    cases = {}
    cases["gaussian"] = rng.standard_normal((12, N)) * 0.02
    outliers = rng.standard_normal((12, N)) * 0.02
    outliers[:, ::97] *= 8  # outlier input columns, as in real checkpoints
    cases["gaussian_outlier_columns"] = outliers
    cases["student_t2"] = rng.standard_t(2, (12, N))
    cases["all_zero"] = np.zeros((2, N))
    const = np.empty((4, N))
    const[0], const[1], const[2], const[3] = 0.75, -0.75, 3e-3, -1e4
    cases["constant_blocks"] = const
    signed = rng.standard_normal((8, N)) * 0.1
    signed[:, 0:32] = np.abs(signed[:, 0:32])  # one all-positive sub-block per super-block
    signed[:, 32:64] = -np.abs(signed[:, 32:64])  # and one all-negative
    signed[:4, 256:512] = np.abs(signed[:4, 256:512])  # whole all-positive / all-negative super-blocks
    signed[4:, 256:512] = -np.abs(signed[4:, 256:512])
    cases["one_signed_subblocks"] = signed
    spike = rng.standard_normal((8, N)) * 0.02
    spike[np.arange(8), rng.integers(0, N, 8)] = 500.0  # one huge outlier per row
    spike[0, 5] = -3e4
    cases["single_huge_outlier"] = spike
    cases["tiny_1e-30"] = rng.standard_normal((4, N)) * 1e-30
    cases["subnormal_1e-40"] = rng.standard_normal((4, N)) * 1e-40
    cases["subnormal_1e-44"] = rng.standard_normal((4, N)) * 1e-44
    half = rng.standard_normal((4, N))
    half[:, ::2] = 0.0
    cases["half_zero"] = half
    cases["small_integers"] = rng.integers(-4, 5, (4, N)).astype(np.float64)
    return {k: v.astype(np.float32) for k, v in cases.items()}


INPUTS = _inputs()


@pytest.mark.parametrize("case", list(INPUTS))
@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_bytes_equal_ggml_reference(ggml_quantize, qtype, case):
    x = INPUTS[case]
    ours = quantize(x, qtype)
    reference = ggml_quantize(x, qtype)
    assert ours.shape == reference.shape == (x.shape[0], QTYPES[qtype].row_bytes(N))
    size = QTYPES[qtype].type_size
    differing = int((ours.reshape(-1, size) != reference.reshape(-1, size)).any(axis=1).sum())
    assert differing == 0, f"{differing} {qtype} blocks differ from ggml on {case}"


def test_q4_k_large_matrix_bytes_equal_ggml_reference(ggml_quantize):
    # several kernel chunks and both threads: 256 x 8192 Gaussian weights with 1 % outlier columns
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((256, 8192)) * 0.02).astype(np.float32)
    x[:, rng.choice(8192, 82, replace=False)] *= 8
    assert np.array_equal(quantize(x, "Q4_K", threads=2), ggml_quantize(x, "Q4_K"))


@pytest.mark.parametrize("case", ["gaussian_outlier_columns", "student_t2", "constant_blocks", "subnormal_1e-40"])
@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_decoder_equals_gguf_py(qtype, case):
    data = quantize(INPUTS[case], qtype)
    ours = dequantize(data, qtype)
    theirs = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]).astype(np.float32)
    assert ours.dtype == np.float32 and ours.shape == INPUTS[case].shape
    assert np.array_equal(ours.view(np.uint32), theirs.reshape(ours.shape).view(np.uint32))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "F16", "BF16"])
def test_bytes_equal_gguf_py_quantize(qtype):
    x = INPUTS["gaussian_outlier_columns"]
    theirs = gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype])
    assert np.array_equal(quantize(x, qtype), theirs.view(np.uint8).reshape(x.shape[0], -1))


def test_threads_do_not_change_bytes():
    x = INPUTS["student_t2"]
    for qtype in ("Q4_K", "Q6_K"):
        assert np.array_equal(quantize(x, qtype, threads=1), quantize(x, qtype, threads=3))


def test_quantization_error_matches_the_format():
    # not a byte test: the decoded error must be that of a 4/5/6/8-bit format on Gaussian weights
    x = INPUTS["gaussian"]
    rel = {q: float(np.sqrt(np.mean((dequantize(quantize(x, q), q) - x) ** 2) / np.mean(x**2))) for q in ALL_TYPES}
    assert 0.05 < rel["Q4_K"] < 0.12 and 0.02 < rel["Q5_K"] < 0.06 and 0.01 < rel["Q6_K"] < 0.03
    assert 0.002 < rel["Q8_0"] < 0.012 and rel["F16"] < 5e-4 and rel["F32"] == 0.0


def test_one_dimensional_input_is_one_row():
    x = INPUTS["gaussian"][0]
    assert np.array_equal(quantize(x, "Q4_K"), quantize(x[None], "Q4_K"))


def test_row_length_must_hold_whole_blocks():
    with pytest.raises(QuantToolError, match="multiple of 256"):
        quantize(np.ones((2, 128), np.float32), "Q4_K")


def test_non_finite_input_is_refused():
    x = INPUTS["gaussian"].copy()
    x[3, 7] = np.nan
    with pytest.raises(QuantToolError, match="inf or nan"):
        quantize(x, "Q4_K")


def test_unknown_type_is_refused():
    with pytest.raises(QuantToolError, match="unsupported storage type"):
        quantize(INPUTS["gaussian"], "Q3_K")
