"""Shared plumbing of the block quantizers: the `QuantType` base class and the reference rounding helpers.

Every encoder reproduces ggml's reference quantizer (`ggml-quants.c`, as vendored in ggml-python 0.0.45) byte
for byte, so all arithmetic is float32 and every numpy constant is an explicit `np.float32` (a Python float would
promote the whole expression to float64 and round differently).
"""

import numpy as np

F32 = np.float32

# ggml's nearest_int(): add 1.5 * 2**23 and read the low mantissa bits. Round-half-to-even for |v| < 2**22; for
# anything else (inf, nan, huge values) it returns a well-defined garbage integer that we reproduce exactly.
_MAGIC = F32(12582912.0)


def nearest_int(v):
    """int32 array equal to ggml's `nearest_int()` of every float32 in `v`, including inf and nan."""
    bits = (np.asarray(v, dtype=F32) + _MAGIC).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def to_f16(v):
    """float32 -> float16 with round-to-nearest-even (what GGML_FP32_TO_FP16 does, subnormals included).

    Values beyond the float16 range become inf, as in ggml; callers that must not lose them check first."""
    with np.errstate(over="ignore"):
        return np.asarray(v, dtype=F32).astype(np.float16)


class QuantType:
    """One GGUF storage type: `quantize_blocks` / `dequantize_blocks` over (n_blocks, block) arrays.

    Subclasses set `name`, `ggml_type`, `block_size`, `type_size` and, for the slow encoders, `chunk_blocks`
    (how many blocks one kernel call handles: big enough to amortise numpy's per-call cost, small enough that
    the working arrays stay in the CPU caches).
    """

    name = ""
    ggml_type = None
    block_size = 1
    type_size = 4
    chunk_blocks = 1 << 16
    is_quantized = True

    def quantize_blocks(self, blocks):
        raise NotImplementedError

    def dequantize_blocks(self, data):
        raise NotImplementedError

    def row_bytes(self, n_per_row):
        return n_per_row // self.block_size * self.type_size

    def __repr__(self):
        return f"<QuantType {self.name}>"
