"""Sparse softmax cross-entropy (integer labels): the row math and three whole-row entry points.

Entry points (each its own compiled kernel, chosen by ``plan.sparse_path``; the fourth, for a few
very long rows, is ``sparse_split.sparse_split``):

- ``sparse_tiny``:   C <= plan.TINY_ROW, rows back to back: groups of rows, flat vector loops;
- ``sparse_short``:  C <= plan.SHORT_ROW: plain max / exp / gradient loops over a cached row;
- ``sparse_blocks``: longer rows: block-online statistics in one streaming pass (rowstats).

Common arguments:
    x: logits as a flat 1-D array (float32, float64, bf16 bits as uint16, fp16 bits as int16):
        row i is ``x[i * row_stride : i * row_stride + c]``, so a row-strided view (``logits[:, :V]``
        of a padded vocabulary) streams without a copy.
    y: (N,) int64 labels. loss, lse: (N,) outputs in the accumulation dtype.
    g: (N, C) gradient output in x's element type (written only when ``want_grad``).
    opts: ``options.SparseOptions`` (1/T, ε, z_loss, softcap, scale) in the accumulation dtype;
        scale = d total / d row (1/count, or 1 / Σ of the counted rows' label weights, for "mean"),
        so the gradient comes out already reduced; softcap > 0 caps the logits (0: none), on the
        short and blocks paths only: the tiny and split paths take softcap = 0 and no weights
        (plan.sparse_path routes such calls).
    w: (C,) class weights in the accumulation dtype, or an empty array for none (short and blocks).
    n_workers: static partitions of the rows, one scratch row each (``numba.get_thread_id()`` would
        stop Numba caching the kernel).

Each returns the number of rows whose label is outside [0, C) and not ignore_index (their loss and
gradient are NaN). Ignored rows get loss 0 and gradient 0 whatever their logits hold.

Row math, with z = x / T, m the row max, s = Σ exp(z - m)::

    row = (1-ε)(log s - (z_y - m)) + ε(log s - mean(z - m)) + z_loss lse²,  lse = m + log s
    d row / d x_j = (p_j (1 + 2 z_loss lse) - ε/C - (1-ε)[j == y]) scale / T

With class weights w (W = Σ w), as torch weights the smoothed term::

    row = w_y [(1-ε)(lse - z_y) + z_loss lse²] + (ε/C) Σ_k w_k (lse - z_k)
    d row / d z_j = p_j [w_y (1-ε + 2 z_loss lse) + ε W / C] - w_y (1-ε)[j == y] - ε w_j / C

With a softcap c the logits are first replaced by c tanh(x / c) (-inf kept), and each gradient
element is multiplied by 1 - tanh².
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .approx import fexp2
from .base import JIT, LOG2E, _as, _padded, _u
from .halfio import _load, _store
from .intrinsics import _store_fence
from .rowstats import (STAT_BLOCK, TINY_GROUP, _block_max, _cap_factor, _fill, _finite_or_zero, _grad_span,
                       _group_exp, _group_scratch, _online_stats, _online_stats_capped, _rest_sum,
                       _scaled_grad, _softcap_into, _sum_except, _weighted_shift_sum)

_LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------- row math
@njit(**JIT)
def _row_params(opts, c):
    """(1/T, log2(e)/T, ε, z_loss, scale, C, ε scale / (C T)) from the caller's opts: what every row
    needs, computed once per call in the accumulation dtype."""
    inv_t, eps, z_loss, scale = opts.inv_t, opts.label_smoothing, opts.z_loss, opts.scale
    cf = _as(c, inv_t)
    return (inv_t, inv_t * _as(LOG2E, inv_t), eps, z_loss, scale, cf, scale * eps * inv_t / cf)


@njit(**JIT)
def _option_params(opts, w, c):
    """(cap, 1/cap, W, weighted): the softcap (0 and 0 when off) and the class weights' sum (C when
    unweighted), once per call."""
    cap = opts.softcap
    zero = cap - cap
    weighted = w.shape[0] > 0
    wsum = zero
    if weighted:
        for j in range(c):
            wsum += w[j]
    else:
        wsum = _as(c, zero)
    return cap, (_as(1, zero) / cap if cap != zero else zero), wsum, weighted


@njit(**JIT)
def _sparse_loss(x_y, m, s, sz, rp, wy, wsum, weighted):
    """Row loss from the shifted statistics (never from lse - z_y: see jax_xla._shift). ``wy`` and
    ``wsum`` are the label's class weight and Σ w (1 and C unweighted); with weights ``sz`` is
    Σ w_k (x_k - m)."""
    inv_t, _, eps, z_loss, _, cf, _ = rp
    zero = inv_t - inv_t
    one = _as(1, zero)
    log_s = np.log(s)
    lse = m * inv_t + log_s
    zs_y = (x_y - m) * inv_t
    row = (one - eps) * (log_s - zs_y)
    if z_loss != zero:  # lse² overflows fp32 for |lse| > 1.8e19, and 0 * inf is NaN
        row += z_loss * lse * lse
    if weighted:  # weight 0: the row adds 0 even when its label is masked (0 * inf)
        row = zero if wy == zero else wy * row
    if eps != zero:
        if weighted:
            row += eps * (wsum * log_s - sz * inv_t) / cf
        else:
            row += eps * (log_s - sz * inv_t / cf)
    return row, lse, log_s


@njit(**JIT)
def _p_factor(lse, rp, wy, wsum, weighted):
    """The factor of p_j in every gradient element: 1 + 2 z lse, or with class weights
    w_y (1 - ε + 2 z lse) + ε W / C."""
    inv_t, _, eps, z_loss, _, cf, _ = rp
    zero = inv_t - inv_t
    one = _as(1, zero)
    zl = (z_loss + z_loss) * lse if z_loss != zero else zero
    if weighted:
        return wy * (one - eps + zl) + eps * wsum / cf
    return one + zl


@njit(**JIT)
def _label_grad(x_y, m, log_s, rp, s_rest, s, wy, wsum, weighted):
    """The label's gradient, p_y (1 + 2 z lse) - (1 - ε + ε/C), times scale / T, written as
    (p_y - 1) + 2 z lse p_y + ε (1 - 1/C) so that p_y is never rounded next to 1; with class
    weights w_y (1-ε)(p_y - 1) + ε (W p_y - w_y) / C + 2 z w_y lse p_y.

    p_y - 1 is expm1(log p_y) when p_y <= 1/2, where it is accurate, and -s_rest / s when p_y > 1/2,
    with s_rest = Σ_{j != y} exp(z_j - m) summed directly (callers pass it, or a negative number
    when they have not computed it; see ``_confident``). expm1 alone is not enough for a confident
    label: s = 1 + s_rest is itself rounded next to 1, which costs the label's small gradient its
    relative accuracy."""
    inv_t, _, eps, z_loss, scale, cf, _ = rp
    zero = inv_t - inv_t
    one = _as(1, zero)
    log_p = (x_y - m) * inv_t - log_s  # from the shifted statistics (exact at any offset)
    pm1 = -s_rest / s if s_rest >= zero else np.expm1(log_p)
    if weighted:
        p_y = np.exp(log_p)
        g = wy * (one - eps) * pm1 + eps * (wsum * p_y - wy) / cf
        if z_loss != zero:
            g += (one + one) * z_loss * wy * (m * inv_t + log_s) * p_y
        return g * scale * inv_t
    g = pm1 + eps * (one - one / cf)
    if z_loss != zero:  # a second libm call only when needed: it shows on rows of a few classes
        g += (one + one) * z_loss * (m * inv_t + log_s) * np.exp(log_p)
    return g * scale * inv_t


@njit(**JIT)
def _confident(x_y, m, log_s, inv_t):
    """p_y > 1/2: then p_y - 1 must come from s_rest (see _label_grad)."""
    return (x_y - m) * inv_t - log_s > _as(-_LN2, inv_t)


@njit(**JIT)
def _skip_loss(yi, c, loss, lse, i, ignore_index, zero):
    """Loss and lse of a row whose label is ignore_index (loss 0) or outside [0, C) (NaN). Returns
    -1 for a row to compute, else the number of bad labels (0 or 1)."""
    if yi == ignore_index or yi < 0 or yi >= c:
        ok = yi == ignore_index
        loss[i] = zero if ok else _as(np.nan, zero)
        lse[i] = _as(np.nan, zero)
        return 0 if ok else 1
    return -1


@njit(**JIT)
def _skip_row(yi, c, loss, lse, gr, i, ignore_index, want_grad, zero):
    """_skip_loss, and the row's gradient: 0 when ignored, NaN when the label is out of range."""
    skipped = _skip_loss(yi, c, loss, lse, i, ignore_index, zero)
    if skipped >= 0 and want_grad:
        _fill(gr, 0, c, zero if skipped == 0 else _as(np.nan, zero))
    return skipped


# ------------------------------------------------------------------------------- row kernels
@njit(**JIT)
def _block_row(xr, yi, loss, lse, gr, i, sc, bm, xs, w, rp, wo, ignore_index, want_grad):
    """One row by block-online statistics: one streaming pass for the statistics, the gradient from
    the scratch row. With a softcap the statistics pass also writes the capped row to ``xs``, and
    the rest reads it from there. Returns 1 if the label is out of range (not ignore_index), else 0."""
    k2, eps = rp[1], rp[2]
    zero = k2 - k2
    c = xr.shape[0]
    skipped = _skip_row(yi, c, loss, lse, gr, i, ignore_index, want_grad, zero)
    if skipped >= 0:
        return skipped
    want_sz = eps != zero and not wo[3]
    if wo[0] != zero:
        m, s, sz = _online_stats_capped(xr, c, k2, wo[0], wo[1], xs, sc, bm, want_sz, zero)
        _block_math(xs[:c], yi, loss, lse, gr, i, sc, bm, w, rp, wo, want_grad, m, s, sz)
    else:
        m, s, sz = _online_stats(xr, 0, c, k2, sc, bm, want_sz, zero)
        _block_math(xr, yi, loss, lse, gr, i, sc, bm, w, rp, wo, want_grad, m, s, sz)
    return 0


@njit(inline="always", **JIT)
def _block_math(xr, yi, loss, lse, gr, i, sc, bm, w, rp, wo, want_grad, m, s, sz):
    # A block row after its statistics (m, s, sz): loss, lse and the gradient.
    inv_t, k2, eps, z_loss, scale, _, b_all = rp
    _, inv_cap, wsum, weighted = wo
    zero = inv_t - inv_t
    one = _as(1, zero)
    c = xr.shape[0]
    if eps != zero and weighted:
        sz = _weighted_shift_sum(xr, w, c, m)  # a second read of the row, from cache
    wy = w[yi] if weighted else one
    x_y = _load(xr[yi])
    row, lse_i, log_s = _sparse_loss(x_y, m, s, sz, rp, wy, wsum, weighted)
    loss[i] = row
    lse[i] = lse_i
    if want_grad:
        a = scale * _p_factor(lse_i, rp, wy, wsum, weighted) * inv_t / s
        _scaled_grad(gr, sc, bm, 0, c, m, k2, a, b_all, w, weighted and eps != zero, xr, inv_cap)
        # The label's term is folded in fp32 before the (possibly 16-bit) store.
        rest = _rest_sum(sc, bm, c, yi, m, k2, zero) if _confident(x_y, m, log_s, inv_t) else -one
        gy = _label_grad(x_y, m, log_s, rp, rest, s, wy, wsum, weighted) * _cap_factor(xr, yi, inv_cap)
        gr[yi] = _store(gy, gr[yi])


@njit(inline="always", **JIT)
def _short_row(xr, yi, loss, lse, gr, i, sc, xs, w, rp, wo, ignore_index, want_grad):
    """One cache-resident row (C <= plan.SHORT_ROW): max, exp-and-sum and gradient as plain loops,
    without the per-block bookkeeping. Same return value as _block_row. Inlined at the Numba level:
    passing every array as its exploded struct costs a short row more than its arithmetic."""
    zero = rp[0] - rp[0]
    c = xr.shape[0]
    skipped = _skip_row(yi, c, loss, lse, gr, i, ignore_index, want_grad, zero)
    if skipped >= 0:
        return skipped
    if wo[0] != zero:
        _softcap_into(xr, xs, c, wo[0], wo[1])
        _short_math(xs[:c], yi, loss, lse, gr, i, sc, w, rp, wo, want_grad)
    else:
        _short_math(xr, yi, loss, lse, gr, i, sc, w, rp, wo, want_grad)
    return 0


@njit(inline="always", **JIT)
def _short_math(xr, yi, loss, lse, gr, i, sc, w, rp, wo, want_grad):
    inv_t, k2, eps, z_loss, scale, _, b_all = rp
    _, inv_cap, wsum, weighted = wo
    zero = inv_t - inv_t
    one = _as(1, zero)
    c = xr.shape[0]
    m = _finite_or_zero(_as(_block_max(xr, 0, c), zero), zero)
    s = zero
    for j in range(c):
        e = fexp2((_load(xr[j]) - m) * k2)
        sc[j] = e
        s += e
    sz = zero
    if eps != zero:
        if weighted:
            sz = _weighted_shift_sum(xr, w, c, m)
        else:
            for j in range(c):
                sz += _load(xr[j]) - m
    wy = w[yi] if weighted else one
    x_y = _load(xr[yi])
    row, lse_i, log_s = _sparse_loss(x_y, m, s, sz, rp, wy, wsum, weighted)
    loss[i] = row
    lse[i] = lse_i
    if want_grad:
        a = scale * _p_factor(lse_i, rp, wy, wsum, weighted) * inv_t / s
        _grad_span(gr, sc, 0, c, a, b_all, w, weighted and eps != zero, xr, inv_cap)
        # s_rest for every row: summing a short cached row is cheaper than a libm expm1.
        rest = _sum_except(sc, 0, c, yi, zero)
        gy = _label_grad(x_y, m, log_s, rp, rest, s, wy, wsum, weighted) * _cap_factor(xr, yi, inv_cap)
        gr[yi] = _store(gy, gr[yi])


@njit(**JIT)
def _tiny_group_stats(xg, y, g0, g1, c, loss, lse, sc, sh, fa, rs, rp, ignore_index):
    """Per-row statistics of one group (rows g0 <= i < g1, exps already in ``sc``): loss, lse, each
    element's gradient factor into ``fa`` and (s_rest, s, log s) into ``rs``. Returns the number of
    out-of-range labels."""
    inv_t, _, eps, z_loss, scale, _, _ = rp
    zero = inv_t - inv_t
    one = _as(1, zero)
    bad = 0
    for r in range(g1 - g0):
        i = g0 + r
        lo = r * c
        yi = y[i]
        a = zero
        skipped = _skip_loss(yi, c, loss, lse, i, ignore_index, zero)
        if skipped >= 0:
            bad += skipped
        else:
            m = sh[lo]
            # s = s_rest + e_y: the label's gradient needs s_rest summed without e_y anyway.
            rest = _sum_except(sc, lo, lo + c, lo + yi, zero)
            s = rest + sc[lo + yi]
            sz = zero
            if eps != zero:
                for j in range(_u(lo), _u(lo + c)):
                    sz += _load(xg[j]) - m
            row, lse_i, log_s = _sparse_loss(_load(xg[lo + yi]), m, s, sz, rp, one, rp[5], False)
            loss[i] = row
            lse[i] = lse_i
            a = scale * (one + (z_loss + z_loss) * lse_i) * inv_t / s
            rs[3 * r] = rest
            rs[3 * r + 1] = s
            rs[3 * r + 2] = log_s
        for j in range(_u(lo), _u(lo + c)):
            fa[j] = a
    return bad


@njit(**JIT)
def _tiny_group_grad(xg, y, g0, g1, c, g, base, sc, sh, fa, rs, rp, ignore_index):
    """The gradient of one group: one flat vector loop p * a - b, then each row's label (or its
    ignored / invalid fill)."""
    inv_t, _, _, _, _, _, b_all = rp
    zero = inv_t - inv_t
    one = _as(1, zero)
    gf = g.reshape(-1)
    for j in range(_u(0), _u((g1 - g0) * c)):
        gf[base + j] = _store(sc[j] * fa[j] - b_all, gf[base + j])
    for r in range(g1 - g0):
        i = g0 + r
        yi = y[i]
        if yi == ignore_index or yi < 0 or yi >= c:
            _fill(g[i], 0, c, zero if yi == ignore_index else _as(np.nan, zero))
        else:
            gy = _label_grad(_load(xg[r * c + yi]), sh[r * c], rs[3 * r + 2], rp, rs[3 * r], rs[3 * r + 1],
                             one, rp[5], False)
            g[i, yi] = _store(gy, g[i, yi])


@njit(**JIT)
def _tiny_rows(x, c, y, loss, lse, g, r0, r1, work, rs, rp, ignore_index, want_grad):
    """Rows r0 <= i < r1 of back-to-back rows in groups of TINY_GROUP // C rows. ``work`` holds a
    worker's three scratch rows (exps, each element's row shift, each element's gradient factor),
    ``rs`` 3 values per row of a group. Returns the number of out-of-range labels."""
    rows = max(1, TINY_GROUP // c)
    bad = 0
    for g0 in range(r0, r1, rows):
        g1 = min(g0 + rows, r1)
        base = g0 * c
        xg = x[base:base + (g1 - g0) * c]
        _group_exp(xg, c, g1 - g0, work[0], work[1], rp[1], rp[0] - rp[0])
        bad += _tiny_group_stats(xg, y, g0, g1, c, loss, lse, work[0], work[1], work[2], rs, rp, ignore_index)
        if want_grad:
            _tiny_group_grad(xg, y, g0, g1, c, g, base, work[0], work[1], work[2], rs, rp, ignore_index)
    return bad


# ------------------------------------------------------------------------------ entry points
@njit(parallel=True, **JIT)
def sparse_tiny(x, c, y, loss, lse, g, opts, ignore_index, want_grad, n_workers):
    """Rows of C <= plan.TINY_ROW classes stored back to back (row stride == C)."""
    n = y.shape[0]
    rp = _row_params(opts, c)
    work = _group_scratch(n_workers, c, loss.dtype)
    rs = np.empty((n_workers, _padded(3 * TINY_GROUP)), dtype=loss.dtype)
    bad = 0
    for w in prange(n_workers):
        bad += _tiny_rows(x, c, y, loss, lse, g, w * n // n_workers, (w + 1) * n // n_workers, work[w], rs[w], rp,
                          ignore_index, want_grad)
    return bad


@njit(parallel=True, **JIT)
def sparse_short(x, row_stride, c, y, loss, lse, g, opts, w, ignore_index, want_grad, n_workers):
    """Rows of C <= plan.SHORT_ROW classes, any row stride."""
    n = y.shape[0]
    rp = _row_params(opts, c)
    wo = _option_params(opts, w, c)
    scratch = np.empty((n_workers, _padded(c)), dtype=loss.dtype)
    capped = np.empty((n_workers, _padded(c) if wo[0] != rp[0] - rp[0] else 1), dtype=loss.dtype)
    bad = 0
    for w_ in prange(n_workers):
        for i in range(w_ * n // n_workers, (w_ + 1) * n // n_workers):
            bad += _short_row(x[i * row_stride:i * row_stride + c], y[i], loss, lse, g[i if want_grad else 0], i,
                              scratch[w_], capped[w_], w, rp, wo, ignore_index, want_grad)
        _store_fence()  # this worker's non-temporal gradient stores are complete
    return bad


@njit(parallel=True, **JIT)
def sparse_blocks(x, row_stride, c, y, loss, lse, g, opts, w, ignore_index, want_grad, n_workers):
    """Rows of any length, one row per worker at a time, block-online statistics."""
    n = y.shape[0]
    rp = _row_params(opts, c)
    wo = _option_params(opts, w, c)
    scratch = np.empty((n_workers, _padded(c)), dtype=loss.dtype)
    capped = np.empty((n_workers, _padded(c) if wo[0] != rp[0] - rp[0] else 1), dtype=loss.dtype)
    bstats = np.empty((n_workers, 2, _padded((c + STAT_BLOCK - 1) // STAT_BLOCK)), dtype=loss.dtype)
    bad = 0
    for w_ in prange(n_workers):
        for i in range(w_ * n // n_workers, (w_ + 1) * n // n_workers):
            bad += _block_row(x[i * row_stride:i * row_stride + c], y[i], loss, lse, g[i if want_grad else 0], i,
                              scratch[w_], bstats[w_], capped[w_], w, rp, wo, ignore_index, want_grad)
        _store_fence()  # this worker's non-temporal gradient stores are complete
    return bad
