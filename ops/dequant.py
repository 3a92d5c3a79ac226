"""Dequantization of GGUF blocks in torch: one short function per block format, registered in a table.

Exactness: every product in these decoders is exact in float32 (an f16 scale has 11 significant bits, a
6-bit sub-scale, an 8-bit quant: at most 24 bits), so the only rounding is the final add/subtract of the
K-quant and _1 formats. The result is therefore bit-identical to `gguf.quants.dequantize` in float32 no
matter how the operations are ordered or fused (FMA included). Other dtypes: decode in float32, round once.

Speed on the CPU: the straightforward way (one torch op per step over the whole tensor) streams every
intermediate through DRAM and page-faults a fresh allocation per op. Here the tensor is decoded in chunks of
~256 k weights so the intermediates stay in cache, nibbles are split with one `stack` instead of a broadcast
shift, and mixed-dtype ops (slow, unvectorised in torch) are avoided. `bench/bench_dequant.py` measures it.
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
import warnings

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf import quants as gguf_quants

from ..errors import GGUFFormatError

QK_K = 256
CPU_CHUNK_WEIGHTS = 1 << 18  # measured sweet spot on a 2-core EPYC: the fp32 chunk (1 MiB) stays in L2
# On a GPU (the torch decoder runs there where Triton is missing, e.g. most Windows installs) chunks bound the
# float32 scratch and the nibble temporaries to ~48 MiB instead of ~6 bytes per weight: ~1.5 GB for the 245 M-weight
# text projection decoded whole, enough to push a 12 GB card over. 8 M weights is ~30 launches for that tensor.
DEVICE_CHUNK_WEIGHTS = 1 << 23

_FORMATS = {}
_FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
# IQ4_NL non-linear code book (ggml-common.h kvalues_iq4nl).
_IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def block_format(qtype, scales):
    """Register a decoder. `scales(blocks)` unpacks the per-block scale fields for the whole tensor at
    once (many tiny ops: too slow per chunk); the decorated `decode(blocks, out, *scales)` then runs per
    chunk on (n, type_size) bytes into (n, block_size) float32."""
    def register(decode):
        _FORMATS[qtype] = (scales, decode)
        return decode
    return register


def _f16(blocks, start):
    """The f16 stored at byte `start` of every block, as float32 (n, 1)."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _split_nibbles(packed, groups):
    """(n, groups*m) bytes -> (n, groups, 2, m): low nibbles first, then high nibbles, per group."""
    n = packed.shape[0]
    packed = packed.reshape(n, groups, -1)
    return torch.stack((packed & 0x0F, packed >> 4), dim=2)


def _bits(packed, count):
    """(n, nbytes) bytes -> (n, count) of 0/1: bit k of the little-endian bit string."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).reshape(packed.shape[0], -1)[:, :count]


def _k_scales(blocks):
    """Q4_K/Q5_K: d*sc and dmin*m per 32-weight sub-block, (n, 8, 1) float32 each (exact products)."""
    scales = blocks[:, 4:16]
    a, b, c = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat((a & 63, (c & 15) | ((a >> 2) & 48)), dim=1)
    m = torch.cat((b & 63, (c >> 4) | ((b >> 2) & 48)), dim=1)
    return sc.float().mul_(_f16(blocks, 0)).unsqueeze(-1), m.float().mul_(_f16(blocks, 2)).unsqueeze(-1)


def _d(offset):
    return lambda blocks: (_f16(blocks, offset),)


def _d_m(blocks):
    return _f16(blocks, 0), _f16(blocks, 2)


@block_format(Q.Q8_0, _d(0))
def _q8_0(blocks, out, d):
    out.copy_(blocks[:, 2:].view(torch.int8)).mul_(d)


@block_format(Q.Q4_0, _d(0))
def _q4_0(blocks, out, d):
    out.view(-1, 1, 2, 16).copy_(_split_nibbles(blocks[:, 2:], 1))
    out.sub_(8).mul_(d)


@block_format(Q.Q4_1, _d_m)
def _q4_1(blocks, out, d, m):
    out.view(-1, 1, 2, 16).copy_(_split_nibbles(blocks[:, 4:], 1))
    out.mul_(d).add_(m)


@block_format(Q.Q5_0, _d(0))
def _q5_0(blocks, out, d):
    out.view(-1, 1, 2, 16).copy_(_split_nibbles(blocks[:, 6:], 1))
    out.add_(_bits(blocks[:, 2:6], 32).mul_(16)).sub_(16).mul_(d)


@block_format(Q.Q5_1, _d_m)
def _q5_1(blocks, out, d, m):
    out.view(-1, 1, 2, 16).copy_(_split_nibbles(blocks[:, 8:], 1))
    out.add_(_bits(blocks[:, 4:8], 32).mul_(16)).mul_(d).add_(m)


@block_format(Q.Q4_K, _k_scales)
def _q4_k(blocks, out, scale, offset):
    n = blocks.shape[0]
    q = out.view(n, 8, 32)
    # chunk c of 32 bytes: low nibbles are sub-block 2c, high nibbles sub-block 2c+1
    q.view(n, 4, 2, 32).copy_(_split_nibbles(blocks[:, 16:], 4))
    q.mul_(scale).sub_(offset)


@block_format(Q.Q5_K, _k_scales)
def _q5_k(blocks, out, scale, offset):
    n = blocks.shape[0]
    q = out.view(n, 8, 32)
    q.view(n, 4, 2, 32).copy_(_split_nibbles(blocks[:, 48:], 4))
    # bit j of qh[l] is the fifth bit of weight l of sub-block j
    shifts = torch.arange(8, dtype=torch.uint8, device=blocks.device).view(1, 8, 1)
    high = (blocks[:, 16:48].unsqueeze(1) >> shifts) & 1
    q.add_(high.mul_(16)).mul_(scale).sub_(offset)


def _q6_k_scales(blocks):
    return (blocks[:, 192:208].view(torch.int8).float().mul_(_f16(blocks, 208)).unsqueeze(-1),)  # (n, 16, 1)


@block_format(Q.Q6_K, _q6_k_scales)
def _q6_k(blocks, out, scale):
    n = blocks.shape[0]
    q = out.view(n, 2, 4, 32)
    # per 128-weight half h: ql[64h + l] low/high nibble -> weights l / l+64, ql[64h+32+l] -> l+32 / l+96
    low = blocks[:, 0:128].reshape(n, 2, 2, 32)
    q.view(n, 2, 2, 2, 32).copy_(torch.stack((low & 0x0F, low >> 4), dim=2))
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).view(1, 1, 4, 1)
    high = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3
    q.add_(high.mul_(16)).sub_(32)
    out.view(n, 16, 16).mul_(scale)


@block_format(Q.IQ4_NL, _d(0))
def _iq4_nl(blocks, out, d):
    values = torch.tensor(_IQ4_NL_VALUES, dtype=torch.float32, device=blocks.device)
    index = _split_nibbles(blocks[:, 2:], 1).reshape(blocks.shape[0], 32).long()
    torch.index_select(values, 0, index.reshape(-1), out=out.view(-1))
    out.mul_(d)


def supported_qtypes():
    """Types with a torch decoder (fast path); other gguf-py types fall back to numpy."""
    return sorted((*_FLOAT_TYPES, *_FORMATS), key=int)


@functools.cache
def decodable(qtype) -> bool:
    """Whether `dequantize` can decode this ggml type: a torch decoder, a float type, or a gguf-py decoder (the
    integer types, F64, Q8_1, Q8_K and others have none: a file may hold them, a model cannot use them)."""
    try:
        qtype = Q(qtype)
        type_size = GGML_QUANT_SIZES[qtype][1]
    except (KeyError, ValueError):
        return False
    if qtype in _FLOAT_TYPES or qtype in _FORMATS:
        return True
    try:
        gguf_quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def block_layout(qtype) -> tuple[int, int]:
    """(weights per block, bytes per block) of a ggml type."""
    try:
        return GGML_QUANT_SIZES[Q(qtype)]
    except (KeyError, ValueError):
        raise GGUFFormatError(f"unknown ggml quantization type {qtype!r}") from None


def packed_shape(shape, qtype) -> tuple[int, ...]:
    """Torch shape of the packed bytes of a tensor whose logical shape is `shape`."""
    block_size, type_size = block_layout(qtype)
    if not shape or shape[-1] % block_size:
        raise GGUFFormatError(f"shape {tuple(shape)} cannot be stored as {Q(qtype).name}: the last dimension "
                              f"must be a multiple of {block_size}")
    return (*shape[:-1], shape[-1] // block_size * type_size)


def dequantize(raw: torch.Tensor, qtype, shape, dtype: torch.dtype = torch.float32, out=None) -> torch.Tensor:
    """Decode packed GGUF data into a dense tensor of logical `shape` and `dtype` on raw's device.

    raw: uint8 tensor of packed blocks (any shape with the right byte count), or for F32/F16/BF16 either
    that or the typed tensor. Float32 output is bit-identical to `gguf.quants.dequantize`.
    out: optional preallocated contiguous tensor (shape's size, `dtype`, raw's device) to decode into; reusing
    one saves the page faults of a fresh allocation, which cost the CPU path about as much as decoding.
    """
    block_size, type_size = block_layout(qtype)
    qtype = Q(qtype)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 or s >= 1 << 63 for s in shape):
        raise GGUFFormatError(f"shape {shape} has a dimension outside 0 .. 2^63-1")
    n_weights = math.prod(shape)
    if qtype in _FLOAT_TYPES:
        stored = _FLOAT_TYPES[qtype]
        flat = raw.reshape(-1)
        if flat.dtype != stored:
            flat = flat.contiguous().view(torch.uint8).view(stored)
        if flat.numel() != n_weights:
            raise GGUFFormatError(f"{qtype.name} data holds {flat.numel()} values, shape {shape} needs {n_weights}")
        return flat.reshape(shape).to(dtype)

    n_blocks, rem = divmod(n_weights, block_size)
    flat = raw.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.contiguous().view(torch.uint8)
    if rem or flat.numel() != n_blocks * type_size:
        raise GGUFFormatError(f"{qtype.name} data of {flat.numel()} bytes does not match shape {shape} "
                              f"({n_blocks} blocks of {type_size} bytes expected)")
    blocks = flat.contiguous().view(n_blocks, type_size)
    if qtype not in _FORMATS:
        return _numpy_fallback(blocks, qtype, shape, dtype)
    unpack_scales, decode = _FORMATS[qtype]

    if out is None:
        out = _empty((n_blocks, block_size), dtype, raw.device)
    elif out.numel() != n_weights or out.dtype != dtype or out.device != raw.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of {n_weights} elements on {raw.device}")
    out = out.view(n_blocks, block_size)
    scales = unpack_scales(blocks)
    chunk_weights = CPU_CHUNK_WEIGHTS if raw.device.type == "cpu" else DEVICE_CHUNK_WEIGHTS
    chunk = max(1, chunk_weights // block_size)
    scratch = out if dtype == torch.float32 else torch.empty(
        (min(chunk, n_blocks), block_size), dtype=torch.float32, device=raw.device)
    for start in range(0, n_blocks, chunk):
        stop = min(start + chunk, n_blocks)
        target = out[start:stop] if scratch is out else scratch[: stop - start]
        decode(blocks[start:stop], target, *(s[start:stop] for s in scales))
        if scratch is not out:
            out[start:stop].copy_(target)  # the single rounding to bf16/fp16
    return out.view(shape)


_HUGE_PAGE = 2 << 20


@functools.cache
def _madvise():
    """libc madvise on Linux (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc.madvise
    except (OSError, AttributeError):
        return None


def _empty(shape, dtype, device):
    """torch.empty, but a large CPU buffer is first advised to use transparent huge pages: first-touch page
    faults on fresh 4 KiB pages otherwise cost the CPU decode as much time as the decoding itself
    (measured: 64 MiB takes 28 ms to fault in, 10 ms with huge pages; bench/bench_dequant.py)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    madvise = _madvise() if out.device.type == "cpu" else None
    nbytes = out.numel() * out.element_size()
    if madvise is not None and nbytes >= 4 * _HUGE_PAGE:
        start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        stop = (out.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        madvise(start, stop - start, 14)  # MADV_HUGEPAGE; advisory, a failure changes nothing
    return out


_warned = set()


def _numpy_fallback(blocks, qtype, shape, dtype):
    if qtype not in _warned:
        _warned.add(qtype)
        warnings.warn(f"{qtype.name} has no torch decoder in this pack; decoding with gguf-py on the CPU "
                      "(slow). Re-quantize to Q4_K/Q5_K/Q6_K/Q8_0 for speed.", stacklevel=3)
    try:
        dense = gguf_quants.dequantize(blocks.cpu().numpy(), qtype)
    except NotImplementedError:
        raise GGUFFormatError(f"tensors of type {qtype.name} cannot be decoded (neither this pack nor gguf-py "
                              "supports it); re-quantize the file to a supported type") from None
    return torch.from_numpy(np.ascontiguousarray(dense)).reshape(shape).to(device=blocks.device, dtype=dtype)
