"""The benchmark's other Triton kernels, timed against the ones the pack ships (loaded by triton_variants.py).

They build on the shipped kernels' helpers (ops/_triton_kernels.py) and keep their contract: arguments (src, dst,
n_blocks, BLOCKS, OUT_BF16, BY_HAND), bf16 written as its int16 bits, bit-identical to gguf-py.
"""

import triton
import triton.language as tl
from ideogram4_gguf.ops._triton_kernels import f16_at, q4_k_scale_min, store


@triton.jit
def q4_k_gather(src, dst, n_blocks, BLOCKS: tl.constexpr, OUT_BF16: tl.constexpr, BY_HAND: tl.constexpr):
    # The first Q4_K kernel, one output weight per element with its bytes gathered by index; kept only as the
    # benchmark's comparison until a GPU run picks between the two (docs/PERF.md).
    block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)[:, None]
    i = tl.arange(0, 256)[None, :]
    mask = block < n_blocks
    base = src + block * 144
    d = f16_at(base, mask)
    dmin = f16_at(base + 2, mask)
    sc, m = q4_k_scale_min(base, i // 32, mask)
    # chunk c = i // 64 of 32 bytes: low nibbles are weights 0..31 of it, high nibbles 32..63
    within = i % 64
    byte = tl.load(base + 16 + (i // 64) * 32 + within % 32, mask=mask, other=0).to(tl.int32)
    q = tl.where(within < 32, byte & 15, byte >> 4).to(tl.float32)
    w = (d * sc) * q - dmin * m
    store(dst + block * 256 + i, w, mask, OUT_BF16, BY_HAND)

