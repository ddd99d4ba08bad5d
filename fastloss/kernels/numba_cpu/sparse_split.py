"""Sparse cross-entropy for a few very long rows: each row split into chunks processed in parallel.

With fewer rows than 2x the threads (e.g. 8 rows of a 262144-class vocabulary), one row per worker
leaves threads idle. Here every (row, chunk) item is a unit of parallel work, in three phases:

    1. chunk statistics (max, Σ exp, Σ (z - m)) in parallel, by the same online pass as whole rows;
    2. per row, the chunks combined into the row's max, sum and loss;
    3. gradients in parallel per chunk; the exp is recomputed (the chunk's scratch is gone by then),
       which costs a second read of each chunk: the price of using every thread.

Arguments as ``sparse_ce.sparse_blocks``, plus ``n_chunks`` (> 1) from ``plan.sparse_path``.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .approx import fexp2
from .base import JIT, _as, _padded, _u
from .halfio import _load, _store
from .rowstats import STAT_BLOCK, _fill, _finite_or_zero, _online_stats
from .sparse_ce import _confident, _label_grad, _row_params, _skip_loss, _sparse_loss


@njit(**JIT)
def _chunk(k, step, c):
    lo = min(k * step, c)
    return lo, min(lo + step, c)


@njit(parallel=True, **JIT)
def _chunk_stats(x, row_stride, c, n, n_chunks, k2, want_sz, cm, cs, csz, n_workers):
    """Phase 1: (m, s, sz) of every chunk into cm, cs, csz (n, n_chunks)."""
    step = (c + n_chunks - 1) // n_chunks
    zero = k2 - k2
    scratch = np.empty((n_workers, _padded(step)), dtype=cm.dtype)
    bstats = np.empty((n_workers, 2, _padded((step + STAT_BLOCK - 1) // STAT_BLOCK)), dtype=cm.dtype)
    n_items = n * n_chunks
    for wk in prange(n_workers):
        for item in range(wk * n_items // n_workers, (wk + 1) * n_items // n_workers):
            i = item // n_chunks
            k = item - i * n_chunks
            lo, hi = _chunk(k, step, c)
            m_k, s_k, sz_k = zero, zero, zero
            if hi > lo:
                r0 = i * row_stride
                m_k, s_k, sz_k = _online_stats(x[r0 + lo:r0 + hi], 0, hi - lo, k2, scratch[wk], bstats[wk],
                                               want_sz, zero)
            cm[i, k] = m_k
            cs[i, k] = s_k
            csz[i, k] = sz_k


@njit(**JIT)
def _combine_row(x, row_stride, c, i, yi, cm, cs, csz, rp, loss, lse):
    """Phase 2 for one valid row: the row's shift m and sum s from its chunks, its loss and lse."""
    inv_t, k2 = rp[0], rp[1]
    zero = inv_t - inv_t
    n_chunks = cm.shape[1]
    step = (c + n_chunks - 1) // n_chunks
    # The shift is the max over chunks that hold a finite value (s > 0); a fully masked chunk
    # reports m = 0, which must not pin the shift above the real max.
    m = _as(-np.inf, zero)
    for k in range(n_chunks):
        m = cm[i, k] if (cs[i, k] > zero and cm[i, k] > m) else m
    m = _finite_or_zero(m, zero)
    s = zero
    sz = zero
    for k in range(n_chunks):
        lo, hi = _chunk(k, step, c)
        if hi > lo:
            s += zero if cs[i, k] == zero else cs[i, k] * fexp2((cm[i, k] - m) * k2)
            sz += csz[i, k] + (cm[i, k] - m) * _as(hi - lo, zero)
    row, lse_i, _ = _sparse_loss(_load(x[i * row_stride + yi]), m, s, sz, rp, _as(1, inv_t), rp[5], False)
    loss[i] = row
    lse[i] = lse_i
    return m, s


@njit(**JIT)
def _chunk_label_rest(xi, k, lo, hi, yi, m, cm, cs, k2, zero):
    """s_rest for a confident label in chunk k: the other chunks' sums, plus this chunk's without
    the label, recomputed."""
    rest = zero
    for kk in range(cm.shape[0]):
        if kk != k and cs[kk] != zero:
            rest += cs[kk] * fexp2((cm[kk] - m) * k2)
    for j in range(_u(lo), _u(hi)):
        e = fexp2((_load(xi[j]) - m) * k2)
        rest += e if j != yi else zero  # a select on a computed value, so the loop vectorises
    return rest


@njit(parallel=True, **JIT)
def _chunk_grads(x, row_stride, c, y, g, cm, cs, ms, ss, lse, rp, ignore_index):
    """Phase 3: every chunk's gradient, p * a - b, and the label's term where it falls."""
    inv_t, k2, _, z_loss, scale, _, b_all = rp
    zero = inv_t - inv_t
    one = _as(1, zero)
    n, n_chunks = cm.shape
    step = (c + n_chunks - 1) // n_chunks
    for w in prange(n * n_chunks):
        i = w // n_chunks
        k = w - i * n_chunks
        lo, hi = _chunk(k, step, c)
        yi = y[i]
        gr = g[i]
        if yi == ignore_index or yi < 0 or yi >= c:
            _fill(gr, lo, hi, zero if yi == ignore_index else _as(np.nan, zero))
            continue
        m = ms[i]
        a = scale * (one + (z_loss + z_loss) * lse[i]) * inv_t / ss[i]
        xi = x[i * row_stride:i * row_stride + c]
        for j in range(_u(lo), _u(hi)):
            gr[j] = _store(fexp2((_load(xi[j]) - m) * k2) * a - b_all, gr[j])
        if lo <= yi < hi:
            x_y = _load(xi[yi])
            log_s = np.log(ss[i])
            rest = -one
            if _confident(x_y, m, log_s, inv_t):
                rest = _chunk_label_rest(xi, k, lo, hi, yi, m, cm[i], cs[i], k2, zero)
            gr[yi] = _store(_label_grad(x_y, m, log_s, rp, rest, ss[i], one, rp[5], False), gr[yi])


@njit(**JIT)
def _combine_rows(x, row_stride, c, y, loss, lse, cm, cs, csz, ms, ss, rp, ignore_index):
    """Phase 2: every row's shift and sum (into ms, ss), loss and lse. Serial: few rows by construction."""
    zero = rp[0] - rp[0]
    bad = 0
    for i in range(y.shape[0]):
        yi = y[i]
        ms[i] = zero
        ss[i] = zero + 1
        skipped = _skip_loss(yi, c, loss, lse, i, ignore_index, zero)
        if skipped >= 0:
            bad += skipped
        else:
            ms[i], ss[i] = _combine_row(x, row_stride, c, i, yi, cm, cs, csz, rp, loss, lse)
    return bad


def sparse_split(x, row_stride, c, y, loss, lse, g, opts, ignore_index, want_grad, n_chunks, n_workers):
    """Few long rows, each in ``n_chunks`` chunks (see the module docstring). Python glue around
    three compiled phases: a parallel kernel calling another parallel kernel would nest parallel
    regions, which Numba runs serially."""
    n = y.shape[0]
    acc = loss.dtype.type
    rp = tuple(acc(v) for v in _row_params(opts, c))
    cm, cs, csz = (np.empty((n, n_chunks), dtype=loss.dtype) for _ in range(3))
    _chunk_stats(x, row_stride, c, n, n_chunks, rp[1], rp[2] != 0, cm, cs, csz, n_workers)
    ms = np.empty(n, dtype=loss.dtype)
    ss = np.empty(n, dtype=loss.dtype)
    bad = _combine_rows(x, row_stride, c, y, loss, lse, cm, cs, csz, ms, ss, rp, ignore_index)
    if want_grad:
        _chunk_grads(x, row_stride, c, y, g, cm, cs, ms, ss, lse, rp, ignore_index)
    return bad
