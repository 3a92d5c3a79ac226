"""K-quants: Q4_K, Q5_K, Q6_K, byte-identical to ggml's reference encoders (no importance matrix).

Source of the maths: `quantize_row_q4_K_ref`, `quantize_row_q5_K_ref`, `quantize_row_q6_K_ref`,
`make_qkx2_quants` and `make_qx_quants` in ggml's `ggml-quants.c` (the copy vendored in ggml-python 0.0.45).
Written from that specification; see docs/quant_tools.md and docs/spec.md §G4.4 for the traps.

How it is made fast without losing byte equality: the reference works on one 32-value (Q4_K/Q5_K) or 16-value
(Q6_K) sub-block at a time, with sequential sums. Here the data of thousands of sub-blocks is laid out
element-major, shape (32, S), so every reference step becomes one numpy operation across all S sub-blocks, and
`np.add.reduce(a, axis=0)` on that layout adds row after row - exactly the reference's left-to-right order (numpy
uses pairwise summation only along a contiguous axis). No expression is contracted into an FMA (numpy never
fuses two ufuncs), and every constant is float32.
"""

import numpy as np

from .blocks import F32, QuantType, nearest_int, to_f16

_ZERO = F32(0)
# Beyond this magnitude ggml's nearest_int() stops rounding and returns mantissa garbage (see blocks.nearest_int).
_RINT_SAFE = F32(4194303)


def _levels(v, lo, hi, out, safe):
    """out = clamp(nearest_int(v), lo, hi) as float32, for a float32 array v that the caller may overwrite.

    Fast path: clip then rint (identical to round-then-clamp because lo and hi are integers). The reference's
    nearest_int() is a bit trick that stops rounding beyond ±2**22; the caller says (`safe`, from the extreme
    values of v) whether any value can be out there, and then that case is reproduced exactly.
    """
    if safe:
        np.clip(v, F32(lo), F32(hi), out=out)
        np.rint(out, out=out)
    else:
        out[...] = np.clip(nearest_int(v), lo, hi)
    return out


def _within_rint_range(*extremes):
    with np.errstate(invalid="ignore"):
        return all(bool(np.abs(e).max() <= _RINT_SAFE) for e in extremes)  # False for inf and nan too


def _finite_or_zero(a):
    # The reference computes an inverse scale that can overflow to inf (sub-blocks of subnormal values); its
    # nearest_int() then maps inf * (x - min) and inf * 0 = nan to 0. A zero inverse scale gives that same 0.
    return np.where(np.isfinite(a), a, _ZERO)


def _fit_asymmetric(x, nmax, rmin, rdelta, nstep):
    """`make_qkx2_quants` for S sub-blocks at once. x: float32 (32, S), element-major.

    Weights are the Q4_K/Q5_K reference ones (av_x + |x|). Returns (scale (S,), the_min (S,), L (32, S) float32).
    """
    nmax_f = F32(nmax)
    tmp = np.empty_like(x)
    levels = np.empty_like(x)
    wl = np.empty_like(x)

    np.multiply(x, x, out=tmp)
    av_x = np.sqrt(np.add.reduce(tmp, axis=0) / F32(32))
    w = np.abs(x)
    w += av_x
    sum_w = np.add.reduce(w, axis=0)
    np.multiply(w, x, out=tmp)
    sum_x = np.add.reduce(tmp, axis=0)
    x_min = x.min(axis=0)
    x_max = x.max(axis=0)
    the_min = np.minimum(x_min, _ZERO)  # "if (min > 0) min = 0"
    flat = x_max == the_min

    def quantize_levels(iscale, minimum):
        np.subtract(x, minimum, out=tmp)
        np.multiply(tmp, iscale, out=tmp)
        # v's largest value, (x_max - min) * iscale, is about nmax + 1 by construction (iscale is finite here);
        # only its smallest can leave the rint range, when a fitted min lies far above the data minimum.
        return _levels(tmp, 0, nmax, levels, _within_rint_range((x_min - minimum) * iscale))

    def weighted_error(scale, minimum):
        # w * ((scale * L + min) - x)^2, summed left to right: the reference's exact association
        np.multiply(levels, scale, out=tmp)
        np.add(tmp, minimum, out=tmp)
        np.subtract(tmp, x, out=tmp)
        np.square(tmp, out=tmp)
        np.multiply(tmp, w, out=tmp)
        return np.add.reduce(tmp, axis=0)

    iscale = nmax_f / (x_max - the_min)
    scale = F32(1) / iscale  # the reference takes the reciprocal, not (max - min) / nmax
    best_iscale = _finite_or_zero(iscale)
    quantize_levels(best_iscale, the_min)
    best_error = weighted_error(scale, the_min)
    best_minimum = the_min.copy()

    for step in range(nstep + 1):
        # The candidate range uses the *current* min, which a winning candidate overwrites (trap: freezing it
        # at the data range changes about half of all blocks).
        iscale = _finite_or_zero((F32(rmin) + F32(rdelta) * F32(step) + nmax_f) / (x_max - the_min))
        quantize_levels(iscale, the_min)
        np.multiply(w, levels, out=wl)
        sum_l = np.add.reduce(wl, axis=0)
        np.multiply(wl, levels, out=tmp)
        sum_l2 = np.add.reduce(tmp, axis=0)
        np.multiply(wl, x, out=tmp)
        sum_xl = np.add.reduce(tmp, axis=0)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        if positive.any():
            this_min[positive] = _ZERO
            this_scale[positive] = sum_xl[positive] / sum_l2[positive]
        error = weighted_error(this_scale, this_min)
        won = (det > 0) & (error < best_error)
        if won.any():
            np.copyto(best_error, error, where=won)
            np.copyto(scale, this_scale, where=won)
            # The winning levels are rebuilt once at the end from the (iscale, min) that produced them, which is
            # cheaper than copying 32 x S levels after every win.
            np.copyto(best_iscale, iscale, where=won)
            np.copyto(best_minimum, the_min, where=won)
            np.copyto(the_min, this_min, where=won)

    quantize_levels(best_iscale, best_minimum)
    levels[:, flat] = _ZERO
    scale = np.where(flat, _ZERO, scale)
    return scale, -the_min, levels


def _pack_scale_min_6bit(ls, lm):
    """8 six-bit scales + 8 six-bit mins -> the 12 `scales` bytes of Q4_K/Q5_K. ls, lm: uint8 (nb, 8)."""
    packed = np.empty((ls.shape[0], 12), np.uint8)
    packed[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return packed


def _unpack_scale_min_6bit(packed):
    """The 12 `scales` bytes -> (sc, m), uint8 (nb, 8) each (get_scale_min_k4 for all j)."""
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = np.concatenate([a & 63, (c & 0xF) | ((a >> 6) << 4)], axis=1)
    m = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc, m


def _six_bit(values, inverse):
    # `uint8_t l = nearest_int(...)` wraps a negative integer modulo 256 before MIN(63, l): reproduced exactly.
    return np.minimum(nearest_int(inverse[:, None] * values) & 0xFF, 63).astype(np.uint8)


class _AsymmetricKQuant(QuantType):
    """Q4_K and Q5_K: 8 sub-blocks of 32, level L in 0..nmax, w = (d * sc) * L - dmin * m."""

    block_size = 256
    chunk_blocks = 1024
    nmax = 15
    rmin, rdelta, nstep = -1.0, 0.1, 20

    def _encode_header(self, blocks):
        """The 16 header bytes every asymmetric K-quant block starts with (d, dmin, packed 6-bit scales and mins),
        in a fresh output array, plus the chosen levels (nb, 8, 32)."""
        d16, dmin16, ls, lm, levels = self._encode(blocks)
        nb = blocks.shape[0]
        out = np.empty((nb, self.type_size), np.uint8)
        out[:, 0:2] = d16.view(np.uint8).reshape(nb, 2)
        out[:, 2:4] = dmin16.view(np.uint8).reshape(nb, 2)
        out[:, 4:16] = _pack_scale_min_6bit(ls, lm)
        return out, levels

    def _encode(self, blocks):
        """Shared encoder; returns (d16, dmin16, ls, lm, levels uint8 (nb, 8, 32))."""
        nb = blocks.shape[0]
        with np.errstate(all="ignore"):
            x = np.ascontiguousarray(blocks.reshape(nb * 8, 32).T)
            scale, mins, levels = _fit_asymmetric(x, self.nmax, self.rmin, self.rdelta, self.nstep)
            scale = scale.reshape(nb, 8)
            mins = mins.reshape(nb, 8)
            # running max from 0 with strict '>' == max(0, max_j)
            max_scale = np.maximum(scale.max(axis=1), _ZERO)
            max_min = np.maximum(mins.max(axis=1), _ZERO)
            inv_scale = np.where(max_scale > 0, F32(63) / max_scale, _ZERO)
            inv_min = np.where(max_min > 0, F32(63) / max_min, _ZERO)
            ls = _six_bit(scale, inv_scale)
            lm = _six_bit(mins, inv_min)
            d16 = to_f16(max_scale / F32(63))
            dmin16 = to_f16(max_min / F32(63))

            # Requantize against the stored (rounded) scales; a sub-block whose stored scale is 0 keeps the
            # levels of its fit (no effect on decoded values, but on the bytes).
            d = d16.astype(F32)[:, None] * ls.astype(F32)
            dm = dmin16.astype(F32)[:, None] * lm.astype(F32)
            values = blocks.reshape(nb, 8, 32)
            requant = np.clip(nearest_int((values + dm[..., None]) / d[..., None]), 0, self.nmax)
            fitted = levels.T.reshape(nb, 8, 32)
            levels = np.where((d == 0)[..., None], fitted, requant).astype(np.uint8)
        return d16, dmin16, ls, lm, levels

    def _decode_scales(self, data):
        d = data[:, 0:2].copy().view(np.float16).astype(F32)
        dmin = data[:, 2:4].copy().view(np.float16).astype(F32)
        sc, m = _unpack_scale_min_6bit(data[:, 4:16])
        return d * sc.astype(F32), dmin * m.astype(F32)  # (nb, 8) each: exact products


class Q4_K(_AsymmetricKQuant):
    """144 bytes per 256 weights: d f16 | dmin f16 | scales[12] | qs[128] (4-bit levels)."""

    name = "Q4_K"
    type_size = 144

    def quantize_blocks(self, blocks):
        out, levels = self._encode_header(blocks)
        nb = blocks.shape[0]
        # 4 chunks of 64 weights: low nibble = sub-block 2c, high nibble = sub-block 2c + 1
        pairs = levels.reshape(nb, 4, 2, 32)
        out[:, 16:] = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(nb, 128)
        return out

    def dequantize_blocks(self, data):
        nb = data.shape[0]
        scale, offset = self._decode_scales(data)
        qs = data[:, 16:].reshape(nb, 4, 1, 32)
        q = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(nb, 8, 32).astype(F32)
        return (scale[..., None] * q - offset[..., None]).reshape(nb, 256)


class Q5_K(_AsymmetricKQuant):
    """176 bytes per 256 weights: d | dmin | scales[12] | qh[32] (5th bits) | qs[128] (low nibbles)."""

    name = "Q5_K"
    type_size = 176
    nmax = 31
    rmin, rdelta, nstep = -0.5, 0.1, 15

    def quantize_blocks(self, blocks):
        out, levels = self._encode_header(blocks)
        nb = blocks.shape[0]
        # sub-block j's 5th bit sits in bit j of qh[l]
        high = (levels >> 4).astype(np.uint8)  # (nb, 8, 32)
        qh = np.zeros((nb, 32), np.uint8)
        for j in range(8):
            qh |= high[:, j] << j
        out[:, 16:48] = qh
        low = (levels & 0xF).reshape(nb, 4, 2, 32)
        out[:, 48:] = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(nb, 128)
        return out

    def dequantize_blocks(self, data):
        nb = data.shape[0]
        scale, offset = self._decode_scales(data)
        qh = data[:, 16:48]
        qs = data[:, 48:].reshape(nb, 4, 1, 32)
        low = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(nb, 8, 32)
        high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
        q = (low | (high << 4)).astype(F32)
        return (scale[..., None] * q - offset[..., None]).reshape(nb, 256)


def _fit_symmetric_q6(x):
    """`make_qx_quants(16, 32, x, L, rmse_type=1, NULL)` for S sub-blocks. x: float32 (16, S), element-major.

    Returns (scale (S,), L (16, S) float32 in 0..63; all-zero sub-blocks get L = 0, as in the reference).
    """
    nmax = F32(32)
    abs_x = np.abs(x)
    first_max = np.argmax(abs_x, axis=0)  # first occurrence: the reference updates on strict '>'
    cols = np.arange(x.shape[1])
    amax = abs_x[first_max, cols]
    x_min = x.min(axis=0)
    x_max = x.max(axis=0)
    signed_max = x[first_max, cols]
    zero = amax < F32(1e-15)
    signed_max = np.where(zero, F32(1), signed_max)

    w = np.multiply(x, x)
    wx = w * x  # the reference's w * x[i] * l associates as (w * x) * l
    levels = np.empty_like(x)
    tmp = np.empty_like(x)

    def quantize_levels(iscale):
        np.multiply(x, iscale, out=tmp)
        # |x| <= |signed_max| makes |v| <= 33 by construction; checked anyway, it costs two small products
        return _levels(tmp, -32, 31, levels, _within_rint_range(x_min * iscale, x_max * iscale))

    def sums(iscale):
        quantize_levels(iscale)
        np.multiply(wx, levels, out=tmp)
        sum_lx = np.add.reduce(tmp, axis=0)
        np.multiply(w, levels, out=tmp)
        np.multiply(tmp, levels, out=tmp)
        sum_l2 = np.add.reduce(tmp, axis=0)
        return sum_lx, sum_l2

    iscale = -nmax / signed_max
    best_iscale = iscale
    sum_lx, sum_l2 = sums(iscale)
    scale = np.where(sum_l2 != 0, sum_lx / sum_l2, _ZERO)
    best = scale * sum_lx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(nmax + F32(0.1) * F32(step)) / signed_max
        sum_lx, sum_l2 = sums(iscale)
        won = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        if won.any():
            scale = np.where(won, sum_lx / sum_l2, scale)
            best = np.where(won, scale * sum_lx, best)
            best_iscale = np.where(won, iscale, best_iscale)

    quantize_levels(best_iscale)
    levels += nmax
    levels[:, zero] = _ZERO
    scale = np.where(zero, _ZERO, scale)
    return scale, levels


class Q6_K(QuantType):
    """210 bytes per 256 weights: ql[128] | qh[64] | scales int8[16] | d f16 (d last); w = (d * sc) * (q - 32)."""

    name = "Q6_K"
    block_size = 256
    type_size = 210
    chunk_blocks = 1024

    def quantize_blocks(self, blocks):
        nb = blocks.shape[0]
        with np.errstate(all="ignore"):
            x = np.ascontiguousarray(blocks.reshape(nb * 16, 16).T)
            scale, levels = _fit_symmetric_q6(x)
            scale = scale.reshape(nb, 16)
            first_max = np.argmax(np.abs(scale), axis=1)
            max_scale = scale[np.arange(nb), first_max]
            empty = np.abs(max_scale) < F32(1e-15)
            iscale = F32(-128) / np.where(empty, F32(1), max_scale)
            d16 = to_f16(F32(1) / iscale)
            sc = np.minimum(nearest_int(iscale[:, None] * scale), 127).astype(np.int8)

            d = d16.astype(F32)[:, None] * sc.astype(F32)
            values = blocks.reshape(nb, 16, 16)
            requant = np.clip(nearest_int(values / d[..., None]), -32, 31) + 32
            fitted = levels.T.reshape(nb, 16, 16)
            levels = np.where((d == 0)[..., None], fitted, requant).astype(np.uint8).reshape(nb, 2, 4, 32)

        out = np.empty((nb, self.type_size), np.uint8)
        # per 128-half h: ql[64h + l] = L[l] | L[l+64] << 4, ql[64h + 32 + l] = L[l+32] | L[l+96] << 4,
        # qh[32h + l] = top 2 bits of L[l], L[l+32], L[l+64], L[l+96] at bits 0, 2, 4, 6
        low = levels & 0xF
        ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
        high = levels >> 4
        qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
        out[:, 0:128] = ql.reshape(nb, 128)
        out[:, 128:192] = qh.reshape(nb, 64)
        out[:, 192:208] = sc.view(np.uint8)
        out[:, 208:210] = d16.view(np.uint8).reshape(nb, 2)
        out[empty] = 0  # the reference memsets a block whose 16 scales are all ~0 (d = +0.0)
        return out

    def dequantize_blocks(self, data):
        nb = data.shape[0]
        ql = data[:, 0:128].reshape(nb, 2, 2, 32)
        qh = data[:, 128:192].reshape(nb, 2, 1, 32)
        sc = data[:, 192:208].copy().view(np.int8).astype(F32)
        d = data[:, 208:210].copy().view(np.float16).astype(F32)
        low = np.concatenate([ql & 0xF, ql >> 4], axis=2)  # (nb, 2, 4, 32): element groups 0, 32, 64, 96
        high = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
        q = ((low | (high << 4)).astype(np.int8) - np.int8(32)).astype(F32).reshape(nb, 16, 16)
        return ((d * sc)[..., None] * q).reshape(nb, 256)  # d: (nb, 1)
