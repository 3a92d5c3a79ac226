"""Triton kernel definitions for triton_dequant.py (imported only when a kernel is first used).

The benchmark's variant kernels (bench/triton_variant_kernels.py) build on the helpers f16_at, q4_k_scale_min and
store.
"""

import triton
import triton.language as tl


@triton.jit
def f16_at(ptr, mask):
    # two little-endian bytes -> the f16 they encode -> float32 (exact)
    bits = tl.load(ptr, mask=mask, other=0).to(tl.int32) | (tl.load(ptr + 1, mask=mask, other=0).to(tl.int32) << 8)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def store(ptr, w, mask, OUT_BF16: tl.constexpr, BY_HAND: tl.constexpr):
    if OUT_BF16 and not BY_HAND:
        # the GPU's conversion rounds to nearest even, as torch does (one instruction per pair of weights)
        tl.store(ptr, w.to(tl.bfloat16).to(tl.int16, bitcast=True), mask=mask)
    elif OUT_BF16:
        # Triton's interpreter truncates in its float cast: there (BY_HAND) round to nearest even in integer
        # arithmetic, so the CPU tests check the same bits the GPU writes. On a GPU this would cost a third
        # of the Q4_K kernel's instructions (SASS counts in docs/PERF.md).
        bits = w.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(w != w, 0x7FC0, rounded)
        tl.store(ptr, rounded.to(tl.int16), mask=mask)
    else:
        tl.store(ptr, w.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def q4_k_scale_min(base, j, mask):
    # 6-bit scale and min of sub-block j (any shape of indices), docs/spec.md §G3.1, as float32 (exact)
    s_j = tl.load(base + 4 + j, mask=mask, other=0).to(tl.int32)
    s_j4 = tl.load(base + 8 + j, mask=mask, other=0).to(tl.int32)
    s_jm4 = tl.load(base + tl.where(j < 4, j, j - 4) + 4, mask=mask, other=0).to(tl.int32)
    sc = tl.where(j < 4, s_j & 63, (s_j4 & 15) | ((s_jm4 >> 6) << 4))
    m = tl.where(j < 4, s_j4 & 63, (s_j4 >> 4) | ((s_j >> 6) << 4))
    return sc.to(tl.float32), m.to(tl.float32)


@triton.jit
def q4_k(src, dst, n_blocks, BLOCKS: tl.constexpr, OUT_BF16: tl.constexpr, BY_HAND: tl.constexpr):
    # Laid out as the data is: (block, chunk c of 32 bytes, byte i). Byte i of chunk c holds weight c*64 + i in its
    # low nibble (sub-block 2c) and weight c*64 + 32 + i in its high nibble (sub-block 2c + 1), so the 32 bytes
    # are read as one contiguous run, each scale pair once per sub-block, and each half is stored as 32
    # contiguous outputs.
    block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)[:, None, None]
    c = tl.arange(0, 4)[None, :, None]
    i = tl.arange(0, 32)[None, None, :]
    mask = block < n_blocks
    base = src + block * 144
    d = f16_at(base, mask)
    dmin = f16_at(base + 2, mask)
    sc_low, m_low = q4_k_scale_min(base, 2 * c, mask)
    sc_high, m_high = q4_k_scale_min(base, 2 * c + 1, mask)
    byte = tl.load(base + 16 + c * 32 + i, mask=mask, other=0).to(tl.int32)
    out = dst + block * 256 + c * 64 + i
    # every product is exact in float32 (f16 x 6 bits x 4 bits), so fused or not, one rounding: the subtraction
    store(out, (d * sc_low) * (byte & 15).to(tl.float32) - dmin * m_low, mask, OUT_BF16, BY_HAND)
    store(out + 32, (d * sc_high) * (byte >> 4).to(tl.float32) - dmin * m_high, mask, OUT_BF16, BY_HAND)


@triton.jit
def q6_k(src, dst, n_blocks, BLOCKS: tl.constexpr, OUT_BF16: tl.constexpr, BY_HAND: tl.constexpr):
    block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)[:, None]
    i = tl.arange(0, 256)[None, :]
    mask = block < n_blocks
    base = src + block * 210
    d = f16_at(base + 208, mask)
    half = i // 128
    r = i % 128
    low = tl.load(base + half * 64 + r % 64, mask=mask, other=0).to(tl.int32)
    low = tl.where(r < 64, low & 15, low >> 4)
    high = tl.load(base + 128 + half * 32 + r % 32, mask=mask, other=0).to(tl.int32)
    high = (high >> ((r // 32) * 2)) & 3
    q = ((low | (high << 4)) - 32).to(tl.float32)
    sc = tl.load(base + 192 + i // 16, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    w = (d * sc) * q
    store(dst + block * 256 + i, w, mask, OUT_BF16, BY_HAND)


@triton.jit
def q8_0(src, dst, n_blocks, BLOCKS: tl.constexpr, OUT_BF16: tl.constexpr, BY_HAND: tl.constexpr):
    block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)[:, None]
    i = tl.arange(0, 32)[None, :]
    mask = block < n_blocks
    base = src + block * 34
    d = f16_at(base, mask)
    q = tl.load(base + 2 + i, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    store(dst + block * 32 + i, q * d, mask, OUT_BF16, BY_HAND)
