"""Softmax cross-entropy with dense targets, q = (1-ε) t + ε/C: two entry points.

- ``dense_tiny``:   C <= plan.TINY_ROW, logits and targets back to back: groups of rows;
- ``dense_blocks``: any C: block-online statistics (rowstats), then the gradient from the scratch row.

Arguments: ``x`` and ``t`` are flat 1-D arrays whose row i starts at ``i * x_stride``
(``i * t_stride``) and has ``c`` elements; ``gx``/``gt`` are (N, C) C-contiguous and written only
when ``want_gx``/``want_gt``; ``opts`` = ``options.DenseOptions`` (1/T, ε, scale) in the accumulation dtype.

Row math, with z = x / T, m the row max, s = Σ exp(z - m), zs = z - m::

    row = Σ_c q_c (log s - zs_c)   (terms with q_c == 0 skipped: a masked -inf class with zero
                                    target stays finite)
    d row / d x = (p Σq - q) scale / T,    d row / d t = (1-ε)(log s - zs) scale

One read of the logits from memory (online statistics into a per-worker scratch row) and one read
of the targets per pass that needs them; the logits' gradient is formed in the scratch row and
written with non-temporal stores for a whole row at once.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .base import JIT, LOG2E, _as, _padded, _u
from .halfio import _load, _store
from .intrinsics import _store_fence
from .rowstats import STAT_BLOCK, TINY_GROUP, _axpb, _block_factor, _group_exp, _group_scratch, _online_stats


@njit(**JIT)
def _dense_params(opts, c):
    """(1/T, log2(e)/T, ε, ε/C, scale) in the accumulation dtype."""
    inv_t, eps, scale = opts.inv_t, opts.label_smoothing, opts.scale
    return (inv_t, inv_t * _as(LOG2E, inv_t), eps, eps / _as(c, inv_t), scale)


@njit(inline="always", **JIT)
def _masked_term(q, term, zero):
    """``term`` where the target mass q is non-zero, else 0 (a -inf logit with q = 0 gives 0, not
    0 * -inf = NaN). Written as a select on a value computed unconditionally: the form
    ``zero if q == zero else q * z`` puts the product in a branch, which LLVM does not vectorise."""
    return term if q != zero else zero


@njit(**JIT)
def _dense_loss(q_sum, log_s, qz, s):
    """Σ q (log s - zs) = q_sum log s - qz, where a row without target mass is 0 (an all-masked row
    has log s = -inf: 0 * -inf would be NaN), and a row whose logits hold NaN or +inf is NaN
    whatever its targets (s is NaN exactly then). A select, not ``+ (s - s)``: reassociation may
    cancel that sum away."""
    row = _masked_term(q_sum, q_sum * log_s, q_sum - q_sum) - qz
    return row if s == s else s


@njit(**JIT)
def _dense_row(xr, tr, loss, lse, gxr, gtr, i, sc, bm, dp, want_gx, want_gt):
    inv_t, k2, eps, eps_c, scale = dp
    zero = inv_t - inv_t
    one = _as(1, zero)
    c = xr.shape[0]
    m, s, _ = _online_stats(xr, 0, c, k2, sc, bm, False, zero)
    q_sum = zero
    qz = zero
    for j in range(_u(0), _u(c)):
        q = (one - eps) * _load(tr[j]) + eps_c
        q_sum += q
        qz += _masked_term(q, q * ((_load(xr[j]) - m) * inv_t), zero)
    log_s = np.log(s)
    loss[i] = _dense_loss(q_sum, log_s, qz, s)
    lse[i] = m * inv_t + log_s
    if want_gx:
        a = q_sum * scale * inv_t / s
        cq = (one - eps) * scale * inv_t  # q scale / T = t cq + cb
        cb = eps_c * scale * inv_t
        for blk in range((c + STAT_BLOCK - 1) // STAT_BLOCK):
            blo = blk * STAT_BLOCK
            bhi = min(blo + STAT_BLOCK, c)
            f = a * _block_factor(bm, blk, m, k2, zero)
            for j in range(_u(blo), _u(bhi)):
                sc[j] = sc[j] * f - (_load(tr[j]) * cq + cb)
        _axpb(gxr, sc, 0, c, one, zero)
    if want_gt:
        for j in range(c):
            gtr[j] = _store((one - eps) * (log_s - (_load(xr[j]) - m) * inv_t) * scale, gtr[j])


@njit(**JIT)
def _dense_group_rows(xg, tg, g0, g1, c, loss, lse, gt, sc, sh, fa, dp, want_gt):
    """Per-row sums of one group (exps already in ``sc``): loss, lse, the p factor of each element
    into ``fa``, and the targets' gradient."""
    inv_t, _, eps, eps_c, scale = dp
    zero = inv_t - inv_t
    one = _as(1, zero)
    for r in range(g1 - g0):
        i = g0 + r
        lo = r * c
        m = sh[lo]
        s = zero
        q_sum = zero
        qz = zero
        for j in range(_u(lo), _u(lo + c)):
            s += sc[j]
            q = (one - eps) * _load(tg[j]) + eps_c
            q_sum += q
            qz += _masked_term(q, q * ((_load(xg[j]) - m) * inv_t), zero)
        log_s = np.log(s)
        loss[i] = _dense_loss(q_sum, log_s, qz, s)
        lse[i] = m * inv_t + log_s
        a = q_sum * scale * inv_t / s
        for j in range(_u(lo), _u(lo + c)):
            fa[j] = a
        if want_gt:
            for j in range(c):
                gt[i, j] = _store((one - eps) * (log_s - (_load(xg[lo + j]) - m) * inv_t) * scale, gt[i, j])


@njit(**JIT)
def _dense_tiny_rows(x, t, c, loss, lse, gx, gt, r0, r1, work, dp, want_gx, want_gt):
    """Rows r0 <= i < r1 in groups of TINY_GROUP // C rows (as sparse_ce._tiny_rows); ``work`` holds
    the exps, each element's row shift and each element's p factor."""
    inv_t, k2, eps, eps_c, scale = dp
    one = _as(1, inv_t)
    rows = max(1, TINY_GROUP // c)
    gxf = gx.reshape(-1)
    cq = (one - eps) * scale * inv_t
    cb = eps_c * scale * inv_t
    sc, sh, fa = work[0], work[1], work[2]
    for g0 in range(r0, r1, rows):
        g1 = min(g0 + rows, r1)
        base = g0 * c
        span = (g1 - g0) * c
        xg = x[base:base + span]
        tg = t[base:base + span]
        _group_exp(xg, c, g1 - g0, sc, sh, k2, inv_t - inv_t)
        _dense_group_rows(xg, tg, g0, g1, c, loss, lse, gt, sc, sh, fa, dp, want_gt)
        if want_gx:
            for j in range(_u(0), _u(span)):
                gxf[base + j] = _store(sc[j] * fa[j] - (_load(tg[j]) * cq + cb), gxf[base + j])


@njit(parallel=True, **JIT)
def dense_tiny(x, t, c, loss, lse, gx, gt, opts, want_gx, want_gt, n_workers):
    """Rows of C <= plan.TINY_ROW classes, logits and targets both back to back."""
    n = loss.shape[0]
    dp = _dense_params(opts, c)
    work = _group_scratch(n_workers, c, loss.dtype)
    for w in prange(n_workers):
        _dense_tiny_rows(x, t, c, loss, lse, gx, gt, w * n // n_workers, (w + 1) * n // n_workers, work[w], dp,
                         want_gx, want_gt)


@njit(parallel=True, **JIT)
def dense_blocks(x, x_stride, t, t_stride, c, loss, lse, gx, gt, opts, want_gx, want_gt, n_workers):
    """Rows of any length, one row per worker at a time."""
    n = loss.shape[0]
    dp = _dense_params(opts, c)
    scratch = np.empty((n_workers, _padded(c)), dtype=loss.dtype)
    bstats = np.empty((n_workers, 2, _padded((c + STAT_BLOCK - 1) // STAT_BLOCK)), dtype=loss.dtype)
    for w in prange(n_workers):
        for i in range(w * n // n_workers, (w + 1) * n // n_workers):
            _dense_row(x[i * x_stride:i * x_stride + c], t[i * t_stride:i * t_stride + c], loss, lse,
                       gx[i if want_gx else 0], gt[i if want_gt else 0], i, scratch[w], bstats[w], dp,
                       want_gx, want_gt)
        _store_fence()  # this worker's non-temporal gradient stores are complete
