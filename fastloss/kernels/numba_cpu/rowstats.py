"""Row statistics and gradient writes shared by the cross-entropy kernels.

A row is processed while it sits in cache:

    pass 1  max                      (reads a block of the row from memory)
    pass 2  sum exp(z - m)           (block in L1; exps kept in a per-worker scratch row)
    pass 3  gradient = p * a - b     (scratch in L2, non-temporal vector stores)

which is the floor of one read of the logits and one write of the gradient. ``_online_stats`` does
passes 1-2 a block at a time (an online softmax), ``_scaled_grad`` pass 3; ``_group_exp`` does
passes 1-2 for many short rows at once. Exps are ``2^((x - m) k2)`` with ``k2 = log2(e) / T``.
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from .approx import fexp2, ftanh
from .base import JIT, _as, _padded, _u
from .halfio import _load, _store
from .intrinsics import (_VEC_BYTES, _address, _block_max_vec, _nt_axpb, _nt_axpb_capped, _nt_axpbyc,
                         _prefer_wide_vectors)

_NT_MIN = 256  # shorter spans use ordinary stores: partial-line non-temporal writes are slow


def _block_max(arr, lo, hi):
    pass


@overload(_block_max, jit_options=JIT)
def _block_max_ov(arr, lo, hi):
    """max(arr[lo:hi]) as an accumulation-dtype value, NaN ignored, -inf for an empty span."""
    if arr.dtype in (types.float32, types.float64, types.uint16, types.int16):
        return lambda arr, lo, hi: _block_max_vec(arr, lo, hi)
    return None


def _axpb(out, src, lo, hi, a, b):
    pass


@overload(_axpb, jit_options=JIT)
def _axpb_ov(out, src, lo, hi, a, b):
    """out[lo:hi] = _store(src[lo:hi] * a - b): vector non-temporal stores when out has the
    accumulation dtype (fp32/fp64), an ordinary loop for 16-bit outputs."""
    if out.dtype == src.dtype and out.dtype in (types.float32, types.float64):
        itemsize = out.dtype.bitwidth // 8
        width = _VEC_BYTES // itemsize

        def nt_impl(out, src, lo, hi, a, b):
            base = _address(out)
            j = _u(lo)
            end = _u(hi)
            if base % _u(itemsize) == _u(0) and end - j >= _u(_NT_MIN):
                # scalar head up to the first 32-byte aligned element, then whole vectors
                head = ((_u(_VEC_BYTES) - (base + j * _u(itemsize)) % _u(_VEC_BYTES)) % _u(_VEC_BYTES)) // _u(itemsize)
                jv = min(j + head, end)
                for k in range(j, jv):
                    out[k] = src[k] * a - b
                j = jv
                while j + _u(width) <= end:
                    _nt_axpb(out, src, j, a, b)
                    j += _u(width)
            for k in range(j, end):
                out[k] = src[k] * a - b
        return nt_impl

    def impl(out, src, lo, hi, a, b):
        for k in range(_u(lo), _u(hi)):
            out[k] = _store(src[k] * a - b, out[k])
    return impl


# ------------------------------------------------------------------------- row statistics
# Elements per online-max block: 1 KiB of fp32, read from memory into L1 by the block max and then
# exponentiated from there; the fastest of 128-2048 measured (docs/performance.md).
STAT_BLOCK = 256


@njit(**JIT)
def _finite_or_zero(m, zero):
    # The shift for a row/block max m: m itself when finite; 0 when m = -inf (all masked so far), so
    # (-inf) - (-inf) never makes NaN; NaN when m is +inf or NaN, so that such rows give NaN (exp2_32
    # is only defined for non-positive arguments, and +inf logits have no finite softmax anyway).
    if m == m and (m - m) != zero:
        return zero if m < zero else m - m
    return m


@njit(**JIT)
def _move_shift(bm, m, s, sz, seen, count, k2, zero):
    """The running (m, s, sz) of a block-online softmax moved to the next block's max ``bm`` when it
    must move (``count`` elements summed so far): s is rescaled by 2^((m - bm) k2) and Σ (x - m)
    shifted by (m - bm) per element."""
    # s == 0 means every earlier element was -inf (a finite one contributes 2^0 = 1): then the
    # shift may also move down, so a masked first block cannot pin m at 0 above the real max.
    # bm is NaN when the block holds +inf (_finite_or_zero): it becomes the shift, so the whole
    # row is NaN, as it is when +inf sits in the first block.
    if not seen or bm > m or s == zero or bm != bm:
        if seen:
            if s > zero:
                s *= fexp2((m - bm) * k2)
            sz += (m - bm) * count
        m = bm
    return m, s, sz


@njit(**JIT)
def _online_stats(xr, lo, hi, k2, scratch, bstat, want_sz, zero):
    """One streaming pass over xr[lo:hi]: max, Σ 2^((x - m) k2), and Σ (x - m).

    Block-online softmax: each block of STAT_BLOCK elements is brought into L1 by its max, then
    exponentiated against the running max m; when m grows the running sum is rescaled. The
    exponentials go to ``scratch[lo:hi]``, the max each block used to ``bstat[0, b]`` and the block's
    sum to ``bstat[1, b]``, so the gradient pass needs no second exp (it rescales per block).
    Returns (m, s, sz) with m already made finite.
    """
    m = zero
    s = zero
    sz = zero
    nb = (hi - lo + STAT_BLOCK - 1) // STAT_BLOCK
    for b in range(nb):
        blo = lo + b * STAT_BLOCK
        bhi = min(blo + STAT_BLOCK, hi)
        bm = _finite_or_zero(_as(_block_max(xr, blo, bhi), zero), zero)
        m, s, sz = _move_shift(bm, m, s, sz, b > 0, _as(blo - lo, zero), k2, zero)
        acc = zero
        for j in range(_u(blo), _u(bhi)):
            e = fexp2((_load(xr[j]) - m) * k2)
            scratch[j] = e
            acc += e
        s += acc
        if want_sz:
            accz = zero
            for j in range(_u(blo), _u(bhi)):
                accz += _load(xr[j]) - m
            sz += accz
        bstat[0, b] = m
        bstat[1, b] = acc
    return m, s, sz


@njit(**JIT)
def _online_stats_capped(xr, c, k2, cap, inv_cap, xs, scratch, bstat, want_sz, zero):
    """_online_stats of the softcapped row z = cap tanh(x / cap) (_capped), the cap applied block by
    block while the block sits in L1: the logits are streamed from memory once, as without a cap,
    and the capped values go to ``xs[:c]`` for the loss, the label and the gradient's 1 - tanh^2.

    A block's shift is its raw max, capped: tanh is increasing, so that is the capped block's max
    (to the approximation's rounding: an exp a few ulp above 1 is harmless), and no separate pass
    over the capped block is needed to find it. +inf caps to ``cap`` (finite), -inf stays -inf."""
    # Why fused: capping the row first in a pass of its own streams the logits from memory with
    # the tanh's arithmetic in the way, then reads the capped row back from L2 twice (max, exps).
    _prefer_wide_vectors()
    m = zero
    s = zero
    sz = zero
    nb = (c + STAT_BLOCK - 1) // STAT_BLOCK
    for b in range(nb):
        blo = b * STAT_BLOCK
        bhi = min(blo + STAT_BLOCK, c)
        bm = _finite_or_zero(_capped(_as(_block_max(xr, blo, bhi), zero), cap, inv_cap), zero)
        m, s, sz = _move_shift(bm, m, s, sz, b > 0, _as(blo, zero), k2, zero)
        # Two loops over the block in L1, not one: together their constants and unrolled lanes
        # outgrow the vector registers, and the spills cost more than the second read.
        for j in range(_u(blo), _u(bhi)):
            xs[j] = _capped(_load(xr[j]), cap, inv_cap)
        # From here the block is _online_stats' on the capped values. Written out again, not shared:
        # with the exp loop in a helper, the plain pass measured 25% slower (0.54 vs 0.43 ns per
        # element, one cached row, alternating).
        acc = zero
        for j in range(_u(blo), _u(bhi)):
            e = fexp2((xs[j] - m) * k2)
            scratch[j] = e
            acc += e
        s += acc
        if want_sz:
            accz = zero
            for j in range(_u(blo), _u(bhi)):
                accz += xs[j] - m
            sz += accz
        bstat[0, b] = m
        bstat[1, b] = acc
    return m, s, sz


@njit(**JIT)
def _block_factor(bstat, blk, m, k2, zero):
    # 2^((shift of block blk - m) k2). The block's shift exceeds m only after a downward reset,
    # when that block's scratch is all 0: factor 1.
    d = bstat[0, blk] - m
    return fexp2((d if d < zero else zero) * k2)


@njit(**JIT)
def _scaled_grad(gr, scratch, bstat, lo, hi, m, k2, a, b, w, weighted_b, xs, inv_cap):
    """gr[j] = p_j * a - b with p_j = scratch[j] * 2^((bstat[0, blk] - m) k2) / s (the 1/s is in a),
    times the options' factors of _grad_span."""
    zero = a - a
    nb = (hi - lo + STAT_BLOCK - 1) // STAT_BLOCK
    blk = 0
    while blk < nb:
        # One _axpb call per run of blocks that used the same shift (after the first few blocks of a
        # row, usually all of them): fewer loop set-ups and alignment heads in the write stream.
        end = blk + 1
        while end < nb and bstat[0, end] == bstat[0, blk]:
            end += 1
        _grad_span(gr, scratch, lo + blk * STAT_BLOCK, min(lo + end * STAT_BLOCK, hi),
                   a * _block_factor(bstat, blk, m, k2, zero), b, w, weighted_b, xs, inv_cap)
        blk = end


# --------------------------------------------------------------- options of sparse CE rows
# Class weights and the softcap change the row math of sparse cross-entropy only by per-element
# factors, so they ride on the same passes: the capped logits go to a scratch row first (they are
# what the statistics read), and the gradient store multiplies in the two factors below.

@njit(**JIT)
def _capped(v, cap, inv_cap):
    """cap tanh(v / cap) in the accumulation dtype, with -inf kept at -inf: a masked (padded) class
    must stay masked, where tanh alone would give it the logit -cap and probability mass. +inf
    becomes cap; NaN stays NaN. Every capped value (rows, block shifts, the label) comes from here,
    so they agree to the last bit."""
    return v if v == _as(-np.inf, cap) else cap * ftanh(v * inv_cap)


@njit(**JIT)
def _softcap_into(xr, xs, c, cap, inv_cap):
    """xs[:c] = _capped(x): a short row's capped logits, formed before its statistics (a block
    row's are formed inside them: _online_stats_capped)."""
    # The tanh makes this loop compute-bound: 512-bit vectors where the CPU has them
    # (docs/performance.md).
    _prefer_wide_vectors()
    for j in range(_u(0), _u(c)):
        xs[j] = _capped(_load(xr[j]), cap, inv_cap)


def _grad_span(gr, sc, lo, hi, a, b, w, weighted_b, xs, inv_cap):
    pass


@overload(_grad_span, jit_options=JIT)
def _grad_span_ov(gr, sc, lo, hi, a, b, w, weighted_b, xs, inv_cap):
    """gr[j] = (sc[j] a - b w_j) (1 - (xs_j / cap)^2) over lo <= j < hi: the gradient store of a
    sparse CE row with the options' factors, each only when on (w_j = 1 unless ``weighted_b``; the
    softcap's derivative 1 - tanh^2 unless inv_cap == 0, from the capped logits in ``xs``).

    Like _axpb: non-temporal vector stores when the gradient has the accumulation dtype (the
    read-for-ownership of a normal store would add half a read of the gradient's size to the
    memory traffic), an ordinary loop for 16-bit gradients."""
    if not (gr.dtype == sc.dtype == xs.dtype == w.dtype and gr.dtype in (types.float32, types.float64)):
        def plain_impl(gr, sc, lo, hi, a, b, w, weighted_b, xs, inv_cap):
            zero = a - a
            if inv_cap == zero and not weighted_b:
                _axpb(gr, sc, lo, hi, a, b)
            else:
                _span_scalar(gr, sc, _u(lo), _u(hi), a, b, w, weighted_b, xs, inv_cap, _as(1, zero))
        return plain_impl
    itemsize = gr.dtype.bitwidth // 8
    width = _VEC_BYTES // itemsize

    def impl(gr, sc, lo, hi, a, b, w, weighted_b, xs, inv_cap):
        zero = a - a
        one = _as(1, zero)
        if inv_cap == zero and not weighted_b:
            _axpb(gr, sc, lo, hi, a, b)
            return
        j = _u(lo)
        end = _u(hi)
        # (both options at once, rare, take the plain loop)
        if _address(gr) % _u(itemsize) == _u(0) and end - j >= _u(_NT_MIN) and not (
                weighted_b and inv_cap != zero):
            head = ((_u(_VEC_BYTES) - (_address(gr) + j * _u(itemsize)) % _u(_VEC_BYTES)) % _u(_VEC_BYTES)) \
                // _u(itemsize)
            jv = min(j + head, end)
            _span_scalar(gr, sc, j, jv, a, b, w, weighted_b, xs, inv_cap, one)
            j = jv
            if inv_cap != zero:
                while j + _u(width) <= end:
                    _nt_axpb_capped(gr, sc, xs, j, a, b, inv_cap)
                    j += _u(width)
            else:
                while j + _u(width) <= end:
                    _nt_axpbyc(gr, sc, w, sc, j, a, b, zero)
                    j += _u(width)
        _span_scalar(gr, sc, j, end, a, b, w, weighted_b, xs, inv_cap, one)
    return impl


@njit(**JIT)
def _span_scalar(gr, sc, lo, hi, a, b, w, weighted_b, xs, inv_cap, one):
    # _grad_span's element loop (vectorised by LLVM, ordinary stores): heads, tails, 16-bit outputs.
    if inv_cap == one - one:
        for j in range(lo, hi):
            gr[j] = _store(sc[j] * a - b * w[j], gr[j])
    elif not weighted_b:
        for j in range(lo, hi):
            t = _unit_floor(_load(xs[j]) * inv_cap, one)
            gr[j] = _store((sc[j] * a - b) * (one - t * t), gr[j])
    else:
        for j in range(lo, hi):
            t = _unit_floor(_load(xs[j]) * inv_cap, one)
            gr[j] = _store((sc[j] * a - b * w[j]) * (one - t * t), gr[j])


@njit(**JIT)
def _unit_floor(t, one):
    # tanh recovered as capped / cap, with a masked class's -inf taken as tanh = -1: its derivative
    # 1 - t^2 is then 0, not -inf (whose product with a zero probability would be NaN). NaN passes.
    return -one if t < -one else t


@njit(**JIT)
def _cap_factor(xs, j, inv_cap):
    """d capped / d logit at class j: 1 - tanh^2 (0 at a masked class), 1 without a softcap."""
    one = _as(1, inv_cap)
    if inv_cap == inv_cap - inv_cap:
        return one
    t = _unit_floor(_load(xs[j]) * inv_cap, one)
    return one - t * t


@njit(**JIT)
def _weighted_shift_sum(xr, w, c, m):
    """Σ_j w_j (x_j - m), a class with weight 0 adding 0 even when its logit is -inf (label
    smoothing with class weights: a masked class given weight 0 drops out of the smoothed term)."""
    zero = m - m
    acc = zero
    for j in range(_u(0), _u(c)):
        v = w[j] * (_load(xr[j]) - m)
        acc += zero if w[j] == zero else v
    return acc


@njit(**JIT)
def _sum_except(scratch, lo, hi, skip, zero):
    # Σ scratch[lo:hi] without scratch[skip] (summed directly: no subtraction, no cancellation).
    acc = zero
    for j in range(_u(lo), _u(skip)):
        acc += scratch[j]
    for j in range(_u(skip + 1), _u(hi)):
        acc += scratch[j]
    return acc


@njit(**JIT)
def _rest_sum(scratch, bstat, c, yi, m, k2, zero):
    """Σ_{j != y} 2^((x_j - m) k2) from _online_stats' block sums; the label's block is re-summed
    without the label (a subtraction would cancel exactly when p_y is close to 1)."""
    rest = zero
    nb = (c + STAT_BLOCK - 1) // STAT_BLOCK
    by = yi // STAT_BLOCK
    for blk in range(nb):
        if blk == by:
            part = _sum_except(scratch, blk * STAT_BLOCK, min(blk * STAT_BLOCK + STAT_BLOCK, c), yi, zero)
        else:
            part = bstat[1, blk]
        if part != zero:
            rest += part * _block_factor(bstat, blk, m, k2, zero)
    return rest


@njit(**JIT)
def _fill(gr, lo, hi, val):
    for j in range(_u(lo), _u(hi)):
        gr[j] = _store(val, gr[j])


# ------------------------------------------------------------------- groups of short rows
# Short rows stored back to back are processed a group at a time: per-row scalar work (max, sum, log,
# label) and flat vector loops over the whole group for the exp and the gradient. A loop over one
# 10-element row never reaches LLVM's vector body (unrolled 4 x 8 wide): its exp would run scalar.
TINY_GROUP = 1024  # elements per group: the group's x, exps, shifts and factors stay in L1


@njit(**JIT)
def _group_scratch(n_workers, c, dtype):
    # Per worker: the exps, each element's row shift and each element's gradient factor of a group.
    return np.empty((n_workers, 3, _padded(TINY_GROUP + c)), dtype=dtype)


@njit(**JIT)
def _group_exp(xg, c, rows, sc, sh, k2, zero):
    """For ``rows`` rows of ``c`` elements back to back in ``xg``: each row's shift (its max, made
    finite) into every element of ``sh``, then sc = 2^((x - sh) k2) in one vector loop over all of
    them (a 10-element row on its own never reaches LLVM's 4 x 8 wide vector body)."""
    for r in range(rows):
        lo = r * c
        # NaN ignored, as in _block_max (exp propagates it); four chains for latency
        m0 = _as(-np.inf, zero)
        m1 = m0
        m2 = m0
        m3 = m0
        j = lo
        while j + 4 <= lo + c:
            v0 = _load(xg[j])
            v1 = _load(xg[j + 1])
            v2 = _load(xg[j + 2])
            v3 = _load(xg[j + 3])
            m0 = v0 if v0 > m0 else m0
            m1 = v1 if v1 > m1 else m1
            m2 = v2 if v2 > m2 else m2
            m3 = v3 if v3 > m3 else m3
            j += 4
        while j < lo + c:
            v0 = _load(xg[j])
            m0 = v0 if v0 > m0 else m0
            j += 1
        m0 = m1 if m1 > m0 else m0
        m2 = m3 if m3 > m2 else m2
        m = _finite_or_zero(m2 if m2 > m0 else m0, zero)
        for j in range(_u(lo), _u(lo + c)):
            sh[j] = m
    for j in range(_u(0), _u(rows * c)):
        sc[j] = fexp2((_load(xg[j]) - sh[j]) * k2)
