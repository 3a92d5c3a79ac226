"""Quantize and dequantize rows of float32 weights into GGUF storage types; the table of supported types.

    quantize(x, "Q4_K")            float32 (rows, n) -> uint8 (rows, n // 256 * 144), byte-identical to ggml's
                                   `ggml_quantize_chunk(..., imatrix=NULL)`
    dequantize(data, "Q4_K", n)    -> float32 (rows, n), bit-identical to `gguf.quants.dequantize`

Types: Q4_K, Q5_K, Q6_K (kquants.py), Q8_0, Q4_0 and the pass-through float types F16, BF16, F32. The plumbing
(validation, splitting into kernel-sized chunks, a thread pool over chunks) is written once here; numpy releases
the GIL inside its loops, so two threads run the encoders on two cores.
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGMLQuantizationType

from .blocks import F32, QuantType, to_f16
from .errors import QuantToolError
from .kquants import Q4_K, Q5_K, Q6_K


class Q8_0(QuantType):
    """34 bytes per 32 weights: d f16 | qs int8[32]; w = d * q. Reference: quantize_row_q8_0_ref."""

    name = "Q8_0"
    block_size = 32
    type_size = 34
    chunk_blocks = 1 << 14  # 512 k weights: a handful of 2 MB temporaries per thread

    def quantize_blocks(self, blocks):
        with np.errstate(all="ignore"):
            d = np.abs(blocks).max(axis=1) / F32(127)
            inverse = np.where(d != 0, F32(1) / d, F32(0))  # x * (1/d), not x / d: the reference's rounding
            q = _round_half_away(blocks * inverse[:, None]).astype(np.int8)
        out = np.empty((blocks.shape[0], self.type_size), np.uint8)
        out[:, 0:2] = to_f16(d).view(np.uint8).reshape(-1, 2)
        out[:, 2:] = q.view(np.uint8)
        return out

    def dequantize_blocks(self, data):
        d = data[:, 0:2].copy().view(np.float16).astype(F32)
        return d * data[:, 2:].view(np.int8).astype(F32)


class Q4_0(QuantType):
    """18 bytes per 32 weights: d f16 | qs[16] (element j low nibble, j + 16 high); w = d * (q - 8)."""

    name = "Q4_0"
    block_size = 32
    type_size = 18
    chunk_blocks = 1 << 14

    def quantize_blocks(self, blocks):
        nb = blocks.shape[0]
        with np.errstate(all="ignore"):
            first_max = np.argmax(np.abs(blocks), axis=1)  # the signed value of largest |x|, first occurrence
            d = blocks[np.arange(nb), first_max] / F32(-8)
            inverse = np.where(d != 0, F32(1) / d, F32(0))
            # uint8_t q = MIN(15, (int8_t)(x * id + 8.5f)). For blocks of subnormal values id overflows to inf and
            # the float -> int conversion is out of range: x86 gives INT32_MIN (low byte 0), reproduced here.
            v = blocks * inverse[:, None] + F32(8.5)
            in_range = np.abs(v) < F32(2**31)
            as_int = np.where(in_range, np.trunc(np.where(in_range, v, F32(0))), F32(0)).astype(np.int64)
            q = np.minimum((as_int & 0xFF).astype(np.uint8).view(np.int8), 15).view(np.uint8)
        out = np.empty((nb, self.type_size), np.uint8)
        out[:, 0:2] = to_f16(d).view(np.uint8).reshape(-1, 2)
        out[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
        return out

    def dequantize_blocks(self, data):
        d = data[:, 0:2].copy().view(np.float16).astype(F32)
        qs = data[:, 2:]
        q = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.int8) - np.int8(8)
        return d * q.astype(F32)


def _round_half_away(v):
    """C roundf(): round half away from zero, exact for every float32 (v + 0.5 would round 0.49999997 up)."""
    magnitude = np.abs(v)
    whole = np.floor(magnitude)
    whole += (magnitude - whole) >= F32(0.5)
    return np.copysign(whole, v)


class _FloatType(QuantType):
    """Pass-through storage: one element per 'block'."""

    is_quantized = False
    block_size = 1
    dtype = None

    def dequantize_blocks(self, data):
        return data.copy().view(self.dtype).astype(F32).reshape(-1, 1)


class F32Type(_FloatType):
    name = "F32"
    type_size = 4
    dtype = np.float32

    def quantize_blocks(self, blocks):
        return np.ascontiguousarray(blocks, dtype=F32).view(np.uint8).reshape(-1, 4)


class F16Type(_FloatType):
    name = "F16"
    type_size = 2
    dtype = np.float16

    def quantize_blocks(self, blocks):
        return to_f16(blocks).view(np.uint8).reshape(-1, 2)


class BF16Type(_FloatType):
    """ggml_compute_fp32_to_bf16: round to nearest even on the top 16 bits; nan kept quiet."""

    name = "BF16"
    type_size = 2

    def quantize_blocks(self, blocks):
        bits = np.ascontiguousarray(blocks, dtype=F32).view(np.uint32).reshape(-1)
        rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        halves = np.where(is_nan, (bits >> 16) | 64, rounded).astype(np.uint16)
        return halves.view(np.uint8).reshape(-1, 2)

    def dequantize_blocks(self, data):
        halves = data.copy().view(np.uint16).astype(np.uint32) << 16
        return halves.view(F32).reshape(-1, 1)


QTYPES = {
    qtype.name: qtype
    for qtype in (Q4_K(), Q5_K(), Q6_K(), Q8_0(), Q4_0(), F16Type(), BF16Type(), F32Type())
}
for _name, _qtype in QTYPES.items():
    _qtype.ggml_type = GGMLQuantizationType[_name]


def get_qtype(qtype):
    """A QTYPES entry from a name ("Q4_K"), a gguf.GGMLQuantizationType or a QuantType."""
    if isinstance(qtype, QuantType):
        return qtype
    name = qtype.name if isinstance(qtype, GGMLQuantizationType) else str(qtype).upper()
    if name not in QTYPES:
        raise QuantToolError(f"unsupported storage type {qtype!r}; quant_tools writes {', '.join(QTYPES)}")
    return QTYPES[name]


def default_threads():
    return max(1, min(os.cpu_count() or 1, 8))


_pools = {}
_pools_lock = threading.Lock()


def _pool(threads):
    with _pools_lock:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="quant_tools")
        return _pools[threads]


def _as_rows(x, name="x"):
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise QuantToolError(f"{name} must be 1-D or 2-D (rows, n), got shape {x.shape}")
    return x


def quantize(x, qtype, threads=None):
    """float32 (rows, n) -> uint8 (rows, n // block * type_size); a 1-D x counts as one row.

    Byte-identical to ggml's reference quantizer for every type. `threads`: worker threads over chunks of
    blocks (default: the CPU count, at most 8). Raises QuantToolError for a row length that is not a multiple
    of the block size, or for non-finite input.
    """
    qtype = get_qtype(qtype)
    x = _as_rows(x)
    if x.dtype != F32:
        x = x.astype(F32)
    rows, n = x.shape
    if n % qtype.block_size:
        raise QuantToolError(
            f"{qtype.name} needs a row length that is a multiple of {qtype.block_size}, got {n}; "
            "keep such tensors in F16 (recipe fallback)"
        )
    blocks = np.ascontiguousarray(x).reshape(-1, qtype.block_size)
    out = np.empty((blocks.shape[0], qtype.type_size), np.uint8)
    if qtype.is_quantized and not np.isfinite(blocks).all():
        raise QuantToolError(f"cannot quantize to {qtype.name}: the tensor holds inf or nan values")

    step = qtype.chunk_blocks
    spans = [(start, min(start + step, blocks.shape[0])) for start in range(0, blocks.shape[0], step)]

    def run(span):
        out[span[0] : span[1]] = qtype.quantize_blocks(blocks[span[0] : span[1]])

    threads = default_threads() if threads is None else max(1, int(threads))
    if threads == 1 or len(spans) == 1:
        for span in spans:
            run(span)
    else:
        for _ in _pool(threads).map(run, spans):
            pass
    return out.reshape(rows, n // qtype.block_size * qtype.type_size)


def dequantize(data, qtype, n_per_row=None):
    """uint8 (rows, row_bytes) -> float32 (rows, n). n_per_row defaults to what the row length implies."""
    qtype = get_qtype(qtype)
    data = _as_rows(np.asarray(data), "data")
    if data.dtype != np.uint8:
        data = np.ascontiguousarray(data).view(np.uint8).reshape(data.shape[0], -1)
    rows, nbytes = data.shape
    if nbytes % qtype.type_size:
        raise QuantToolError(f"{qtype.name} rows must be a multiple of {qtype.type_size} bytes, got {nbytes}")
    n = nbytes // qtype.type_size * qtype.block_size
    if n_per_row is not None and n_per_row != n:
        raise QuantToolError(f"{nbytes} bytes of {qtype.name} hold {n} values per row, not {n_per_row}")
    blocks = np.ascontiguousarray(data).reshape(-1, qtype.type_size)
    with np.errstate(all="ignore"):  # corrupt bytes may hold inf/nan scales: decode them like gguf-py does
        return qtype.dequantize_blocks(blocks).reshape(rows, n)


def row_bytes(qtype, n_per_row):
    return get_qtype(qtype).row_bytes(n_per_row)
