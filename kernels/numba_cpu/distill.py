"""Knowledge distillation: a divergence between the tempered teacher and student distributions, plus an
optional hard-label cross-entropy, loss and gradients of both logits arrays from one kernel call.

``distill_rows(s, s_stride, t, t_stride, c, y, loss, gs, gt, opts, div, ign, has_labels, want_gs, want_gt,
n_workers)``: ``s`` and ``t`` are flat 1-D arrays whose row i starts at ``i * stride`` and has ``c``
elements; ``y`` holds int64 labels (a 1-element dummy without labels); ``gs``/``gt`` are (N, C)
C-contiguous and written only when wanted; ``opts`` = (T, α, β, scale) in the accumulation dtype;
``div`` is ``DIVERGENCES[name]``. Returns True when a label is out of range (its row is NaN).

Row math, with zs = (s - max s) / T, ls = log P_s = zs - log Σ exp(zs) (likewise lt, P_t) and
lm = log(β P_t + (1-β) P_s)::

    forward_kl  D = Σ P_t (lt - ls)      dD/dzs = P_s - P_t          dD/dzt = P_t (lt - ls - D)
    reverse_kl  D = Σ P_s (ls - lt)      dD/dzs = P_s (ls - lt - D)  dD/dzt = P_t - P_s
    jsd         D = β KL(P_t||M) + (1-β) KL(P_s||M)
                dD/dzs = (1-β) P_s (ls - lm - KL(P_s||M)),   dD/dzt = β P_t (lt - lm - KL(P_t||M))
    row = T² D (× α, + (1-α)(lse(s) - s_y) with labels);  d/dx = T dD/dz (× α) (+ (1-α)(p1 - onehot(y)))

(the Σ M log M part of the JSD's derivative cancels). Terms with a zero probability are selected
out, so masked classes (-inf in both rows) contribute exactly 0, never 0 * -inf = NaN.

Passes per row, all but the first from cache (two rows of 32000 fp32 plus three scratch rows are
640 KiB, inside an L2): max of both rows (the one read from memory), exps and their sums, the
divergence in log space per element (no 1 - Σ P cancellation), the gradients (written once, the
student's with non-temporal stores). The hard-label CE needs the student's softmax at T = 1: a third
exp per element when T != 1, shared with the tempered one when T == 1.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .approx import fexp2
from .base import JIT, LOG2E, _as, _padded, _u
from .halfio import _load, _store
from .intrinsics import _store_fence
from .rowstats import _axpb, _block_max, _fill, _finite_or_zero

DIVERGENCES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}


@njit(**JIT)
def _pick(p, term, zero):
    """``term`` where the probability p is non-zero, else 0 (a select on a value computed
    unconditionally, so the loop around it vectorises)."""
    return term if p != zero else zero


@njit(**JIT)
def _exps(xr, c, m, k2, out, zero):
    """out = 2^((x - m) k2) over the row; returns the sum."""
    acc = zero
    for j in range(_u(0), _u(c)):
        e = fexp2((_load(xr[j]) - m) * k2)
        out[j] = e
        acc += e
    return acc


@njit(**JIT)
def _kl_sum(pe, inv_sp, xp, mp, xq, mq, inv_t, dl, zero):
    """Σ_j P_j (l_j - lq_j) with P_j = pe_j inv_sp and l_j - lq_j = ((xp_j - mp) - (xq_j - mq)) / T + dl
    (dl = log S_q - log S_p): the log-ratio is formed per element from shifted logits, exact up to one
    rounding each, and multiplied by P_j only where P_j != 0."""
    acc = zero
    for j in range(_u(0), _u(pe.shape[0])):
        r = ((_load(xp[j]) - mp) - (_load(xq[j]) - mq)) * inv_t + dl
        acc += _pick(pe[j], pe[j] * r, zero)
    return acc * inv_sp


@njit(**JIT)
def _log_mix(lm, es, et, c, ws, wt, zero):
    """lm_j = log M_j = log(wt et_j + ws es_j), with wt = β / S_t and ws = (1-β) / S_s."""
    for j in range(_u(0), _u(c)):
        lm[j] = np.log(wt * et[j] + ws * es[j])


@njit(**JIT)
def _kl_mix_sum(pe, inv_sp, xp, mp, log_sp, lm, inv_t, zero):
    """Σ_j P_j (l_j - lm_j) with l_j = (xp_j - mp) / T - log S_p."""
    acc = zero
    for j in range(_u(0), _u(pe.shape[0])):
        r = (_load(xp[j]) - mp) * inv_t - log_sp - lm[j]
        acc += _pick(pe[j], pe[j] * r, zero)
    return acc * inv_sp


@njit(**JIT)
def _distill_row(sr, tr, yi, loss, gsr, gtr, i, sc, dp, div, has_labels, want_gs, want_gt):
    temp, alpha, beta, scale, inv_t, k2 = dp
    zero = inv_t - inv_t
    one = _as(1, zero)
    c = sr.shape[0]
    es, et, e1, lm = sc[0], sc[1], sc[2], sc[3]
    ms = _finite_or_zero(_as(_block_max(sr, 0, c), zero), zero)
    mt = _finite_or_zero(_as(_block_max(tr, 0, c), zero), zero)
    ss = _exps(sr, c, ms, k2, es, zero)
    st = _exps(tr, c, mt, k2, et, zero)
    log_ss = np.log(ss)
    log_st = np.log(st)
    inv_ss = one / ss
    inv_st = one / st
    # the divergence, per element in log space
    if div == 0:
        d = _kl_sum(et[:c], inv_st, tr, mt, sr, ms, inv_t, log_ss - log_st, zero)
        kl_t = d
        kl_s = zero
    elif div == 1:
        d = _kl_sum(es[:c], inv_ss, sr, ms, tr, mt, inv_t, log_st - log_ss, zero)
        kl_s = d
        kl_t = zero
    else:
        _log_mix(lm, es, et, c, (one - beta) * inv_ss, beta * inv_st, zero)
        kl_t = _kl_mix_sum(et[:c], inv_st, tr, mt, log_st, lm, inv_t, zero)
        kl_s = _kl_mix_sum(es[:c], inv_ss, sr, ms, log_ss, lm, inv_t, zero)
        d = beta * kl_t + (one - beta) * kl_s
    s1 = ss
    if has_labels:
        # hard-label CE at T = 1 on p1 = softmax(s). With T == 1 the tempered exps are p1's (copied
        # aside only when the gradient pass is about to overwrite them), else one more exp per element.
        if inv_t != one:
            s1 = _exps(sr, c, ms, _as(LOG2E, zero), e1, zero)
        elif want_gs:
            for j in range(_u(0), _u(c)):
                e1[j] = es[j]
    w = alpha if has_labels else one  # weight of the divergence term
    row = temp * temp * d * w
    if has_labels:
        row += (one - alpha) * (np.log(s1) - (_load(sr[yi]) - ms))
    ws = w * temp * scale               # d total / d (dD/dz)
    # d(T² D)/dx = T dD/dz: the teacher's gradient (it reads es, which the student's overwrites)
    if want_gt:
        if div == 0:
            dl = log_ss - log_st
            for j in range(c):
                r = ((_load(tr[j]) - mt) - (_load(sr[j]) - ms)) * inv_t + dl - d
                gtr[j] = _store(_pick(et[j], et[j] * inv_st * r * ws, zero), gtr[j])
        elif div == 1:
            for j in range(c):
                gtr[j] = _store((et[j] * inv_st - es[j] * inv_ss) * ws, gtr[j])
        else:
            for j in range(c):
                r = (_load(tr[j]) - mt) * inv_t - log_st - lm[j] - kl_t
                gtr[j] = _store(_pick(et[j], et[j] * inv_st * r * (ws * beta), zero), gtr[j])
    if want_gs:
        # the divergence's part, in place in es (P_s is needed once per element)
        if div == 0:
            for j in range(_u(0), _u(c)):
                es[j] = es[j] * (inv_ss * ws) - et[j] * (inv_st * ws)
        elif div == 1:
            dl = log_ss - log_st
            for j in range(_u(0), _u(c)):
                r = ((_load(sr[j]) - ms) - (_load(tr[j]) - mt)) * inv_t - dl - d
                es[j] = _pick(es[j], es[j] * r * (inv_ss * ws), zero)
        else:
            for j in range(_u(0), _u(c)):
                r = (_load(sr[j]) - ms) * inv_t - log_ss - lm[j] - kl_s
                es[j] = _pick(es[j], es[j] * r * (inv_ss * ws * (one - beta)), zero)
    if has_labels and want_gs:  # + (p1 - onehot(y)) (1-α) scale
        c1 = (one - alpha) * scale / s1
        for j in range(_u(0), _u(c)):
            es[j] += e1[j] * c1
        es[yi] -= (one - alpha) * scale
    loss[i] = row
    if want_gs:
        _axpb(gsr, es, 0, c, one, zero)


@njit(**JIT)
def _params(opts):
    """(T, α, β, scale, 1/T, log2(e)/T) in the accumulation dtype."""
    temp, alpha, beta, scale = opts
    inv_t = _as(1, temp) / temp
    return (temp, alpha, beta, scale, inv_t, inv_t * _as(LOG2E, temp))


@njit(parallel=True, **JIT)
def distill_rows(s, s_stride, t, t_stride, c, y, loss, gs, gt, opts, div, ign, has_labels, want_gs, want_gt,
                 n_workers):
    """Rows of any length, one row per worker at a time."""
    n = loss.shape[0]
    dp = _params(opts)
    zero = dp[0] - dp[0]
    scratch = np.empty((n_workers, 4, _padded(c)), dtype=loss.dtype)
    bad = np.zeros(n_workers, np.bool_)
    for w in prange(n_workers):
        for i in range(w * n // n_workers, (w + 1) * n // n_workers):
            yi = y[i] if has_labels else 0
            gsr = gs[i if want_gs else 0]
            gtr = gt[i if want_gt else 0]
            if has_labels and yi == ign:
                # ignored: nothing, whatever the row holds (NaN, inf, padding)
                loss[i] = zero
                if want_gs:
                    _fill(gsr, 0, c, zero)
                if want_gt:
                    _fill(gtr, 0, c, zero)
                continue
            if has_labels and (yi < 0 or yi >= c):
                bad[w] = True
                loss[i] = zero / zero
                if want_gs:
                    _fill(gsr, 0, c, zero / zero)
                if want_gt:
                    _fill(gtr, 0, c, zero / zero)
                continue
            _distill_row(s[i * s_stride:i * s_stride + c], t[i * t_stride:i * t_stride + c], yi, loss, gsr, gtr,
                         i, scratch[w], dp, div, has_labels, want_gs, want_gt)
        _store_fence()  # this worker's non-temporal gradient stores are complete
    return bad.any()
