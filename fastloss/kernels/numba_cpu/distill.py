"""Knowledge distillation: a divergence between the tempered teacher and student distributions, plus an
optional hard-label cross-entropy, loss and gradients of both logits arrays from one kernel call.

``distill_rows(s, s_stride, t, t_stride, c, y, loss, gs, gt, opts, div, ign, has_labels, want_gs, want_gt,
n_workers)``: ``s`` and ``t`` are flat 1-D arrays whose row i starts at ``i * stride`` and has ``c``
elements; ``y`` holds int64 labels (a 1-element dummy without labels); ``gs``/``gt`` are (N, C)
C-contiguous and written only when wanted; ``opts`` = ``options.DistillOptions`` (T, α, β, scale) in the accumulation dtype;
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

Passes per row, all but the first from cache (two rows of 32000 fp32 plus the scratch rows are
under 1 MiB, inside an L2): the max of both rows (the one read from memory); one pass for the exps,
their sums and Σ P Δ, from which the KL divergences follow (the JSD needs log M per element: a pass
of its own); the student's gradient in place in its scratch row, then one non-temporal store of it.
The hard-label CE needs the student's softmax at T = 1: a third exp per element when T != 1, the
tempered one itself when T == 1. Fusing the passes took 4096x32000 fp32 with labels (T = 3) from
~195 ms to the times in docs/performance.md.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .approx import fexp2, flog1p_01
from .base import JIT, LOG2E, _as, _padded, _u
from .halfio import _load, _store
from .intrinsics import _VEC_BYTES, _address, _nt_axpbyc, _prefer_wide_vectors, _store_fence
from .rowstats import STAT_BLOCK, _axpb, _block_factor, _block_max, _fill, _finite_or_zero, _move_shift

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
def _to_row_shift(e, bstat, c, m, k2, zero):
    """Rescale _online_stats' exps, each relative to its block's shift, to the row's final shift m:
    afterwards e_j = 2^((x_j - m) k2) for every j (one multiply per element, in cache)."""
    _prefer_wide_vectors()
    nb = (c + STAT_BLOCK - 1) // STAT_BLOCK
    for blk in range(nb):
        f = _block_factor(bstat, blk, m, k2, zero)
        if f != _as(1, zero):
            for j in range(_u(blk * STAT_BLOCK), _u(min(blk * STAT_BLOCK + STAT_BLOCK, c))):
                e[j] = e[j] * f


@njit(**JIT)
def _online_block(xr, b, c, k2, scratch, bstat, m, s, seen, zero):
    """One block of a block-online softmax sum (rowstats._online_stats, one block at a time): the
    block's max brings it into L1, the running sum is rescaled when the shift grows, the block's exps
    go to ``scratch`` and its shift and sum to ``bstat[:, b]``. Returns the new (m, s, seen)."""
    _prefer_wide_vectors()
    blo = b * STAT_BLOCK
    bhi = min(blo + STAT_BLOCK, c)
    bm = _finite_or_zero(_as(_block_max(xr, blo, bhi), zero), zero)
    m, s, _ = _move_shift(bm, m, s, zero, seen, zero, k2, zero)
    acc = zero
    for j in range(_u(blo), _u(bhi)):
        e = fexp2((_load(xr[j]) - m) * k2)
        scratch[j] = e
        acc += e
    bstat[0, b] = m
    bstat[1, b] = acc
    return m, s + acc, True


@njit(**JIT)
def _row_exps(xr, c, k2, e, bstat, zero):
    """(m, Σ e) with e_j = 2^((x_j - m) k2) over the row: block-online (the block's max brings it from
    memory into L1 and its exps are computed from there, so the memory stream overlaps the exps), then
    every block moved to the row's final shift. (Streaming the student and teacher rows side by side,
    block by block, measured slower than one row after the other: 190 vs 175 ms, alternating runs.)"""
    m = zero
    s = zero
    seen = False
    for b in range((c + STAT_BLOCK - 1) // STAT_BLOCK):
        m, s, seen = _online_block(xr, b, c, k2, e, bstat, m, s, seen, zero)
    _to_row_shift(e, bstat, c, m, k2, zero)
    return m, s


@njit(**JIT)
def _pow_small(e, n):
    """e^n for n in {2, 3, 4} (n is loop-invariant where this is called: LLVM unswitches the loop)."""
    q = e * e
    if n == 3:
        return q * e
    if n == 4:
        return q * q
    return q


@njit(**JIT)
def _int_power(out, e, c, n, zero):
    """out = e^n for n in {2, 3, 4}, one pass: the T = 1 exps from the tempered ones at an integer
    temperature, 2^((x - m) k2 T) = (2^((x - m) k2))^T, instead of a third exp per element (relative
    error ~n times the exp's 2 ulp; an underflow to 0 only where the exact value is below 2^-126).
    Returns the sum."""
    _prefer_wide_vectors()
    acc = zero
    for j in range(_u(0), _u(c)):
        v = _pow_small(e[j], n)
        out[j] = v
        acc += v
    return acc


@njit(**JIT)
def _weighted_delta(e, sr, ms, tr, mt, c, es, e1, n, zero):
    """(Σ e_j Δ_j, Σ e1_j) with Δ_j = (t_j - mt) - (s_j - ms), terms with e_j == 0 selected out, and,
    when n > 0, e1 = es^n formed in the same pass (_int_power; Σ e1 is 0 when n == 0). A pass over
    cached rows: accumulated in the exp loop instead, Σ e Δ slowed that loop by more than this pass
    costs; the power rides here rather than in a pass of its own (0.28 vs 0.35 ns per element, one
    cached row)."""
    _prefer_wide_vectors()
    acc = zero
    acc1 = zero
    if n == 0:
        for j in range(_u(0), _u(c)):
            acc += _pick(e[j], e[j] * ((_load(tr[j]) - mt) - (_load(sr[j]) - ms)), zero)
        return acc, acc1
    for j in range(_u(0), _u(c)):
        acc += _pick(e[j], e[j] * ((_load(tr[j]) - mt) - (_load(sr[j]) - ms)), zero)
        v = _pow_small(es[j], n)
        e1[j] = v
        acc1 += v
    return acc, acc1


@njit(**JIT)
def _log_mix(lm, sr, ms, tr, mt, c, inv_t, log_ss, log_st, beta, zero):
    """lm_j = log M_j = log(β P_t,j + (1-β) P_s,j) as a logaddexp of a = log β + lt_j and
    b = log(1-β) + ls_j: max(a, b) + log1p(exp(min - max)), one exp and one polynomial log1p per
    element, both vectorised (libm's log is a scalar call: 3x the whole forward-KL kernel). -inf where
    both probabilities are 0 (masked classes; β = 0 or 1 leaves one side)."""
    _prefer_wide_vectors()
    one = _as(1, zero)
    lb = np.log(beta)
    l1b = np.log(one - beta)
    k = _as(LOG2E, zero)
    ninf = _as(-np.inf, zero)
    for j in range(_u(0), _u(c)):
        a = (_load(tr[j]) - mt) * inv_t - log_st + lb
        b = (_load(sr[j]) - ms) * inv_t - log_ss + l1b
        hi = a if a > b else b
        lo = b if a > b else a
        r = hi + flog1p_01(fexp2((lo - hi) * k))
        lm[j] = r if hi != ninf else hi


@njit(**JIT)
def _kl_mix_sum(pe, inv_sp, xp, mp, log_sp, lm, inv_t, zero):
    """Σ_j P_j (l_j - lm_j) with l_j = (xp_j - mp) / T - log S_p."""
    _prefer_wide_vectors()
    acc = zero
    for j in range(_u(0), _u(pe.shape[0])):
        r = (_load(xp[j]) - mp) * inv_t - log_sp - lm[j]
        acc += _pick(pe[j], pe[j] * r, zero)
    return acc * inv_sp


@njit(**JIT)
def _distill_row(sr, tr, yi, loss, gsr, gtr, i, sc, bs, dp, div, has_labels, want_gs, want_gt):
    _prefer_wide_vectors()
    temp, alpha, beta, scale, inv_t, k2 = dp
    zero = inv_t - inv_t
    one = _as(1, zero)
    c = sr.shape[0]
    es, et, e1, lm = sc[0], sc[1], sc[2], sc[3]
    # exps and sums, block-online: the one read of each row from memory overlaps the exps; later
    # passes find the rows in cache. With labels at T != 1 the hard-label CE needs the student's
    # exps at T = 1 as well (a third exp per element); at T = 1 they are the tempered ones (e1 is es).
    ms, ss = _row_exps(sr, c, k2, es, bs[0], zero)
    mt, st = _row_exps(tr, c, k2, et, bs[1], zero)
    tempered_ce = has_labels and inv_t != one
    # T = 2, 3, 4: the T = 1 exps are powers of the tempered ones, formed in the divergence's pass
    int_t = temp == _as(2, zero) or temp == _as(3, zero) or temp == _as(4, zero)
    n_pow = int(temp) if tempered_ce and int_t else 0
    s1 = ss
    if tempered_ce and n_pow == 0:
        _, s1 = _row_exps(sr, c, _as(LOG2E, zero), e1, bs[2], zero)  # same shift: the max of s
    elif not tempered_ce:
        e1 = es
    log_ss = np.log(ss)
    log_st = np.log(st)
    inv_ss = one / ss
    inv_st = one / st
    # KL(P_t || P_s) = Σ P_t (Δ / T) + log S_s - log S_t, Δ = (t - mt) - (s - ms): Σ P_t = 1 to one
    # rounding, so the sum form costs ~|log S_s - log S_t| eps. (A pass of its own: accumulated in
    # the exp loop it made that loop slower than the extra pass costs.)
    if div == 0:
        wd, s1_pow = _weighted_delta(et, sr, ms, tr, mt, c, es, e1, n_pow, zero)
        d = wd * inv_t * inv_st + (log_ss - log_st)
        kl_t = d
        kl_s = zero
    elif div == 1:
        wd, s1_pow = _weighted_delta(es, sr, ms, tr, mt, c, es, e1, n_pow, zero)
        d = -wd * inv_t * inv_ss + (log_st - log_ss)
        kl_s = d
        kl_t = zero
    else:
        s1_pow = _int_power(e1, es, c, n_pow, zero) if n_pow > 0 else zero
        _log_mix(lm, sr, ms, tr, mt, c, inv_t, log_ss, log_st, beta, zero)
        kl_t = _kl_mix_sum(et[:c], inv_st, tr, mt, log_st, lm, inv_t, zero)
        kl_s = _kl_mix_sum(es[:c], inv_ss, sr, ms, log_ss, lm, inv_t, zero)
        d = beta * kl_t + (one - beta) * kl_s
    if n_pow > 0:
        s1 = s1_pow
    w = alpha if has_labels else one  # weight of the divergence term
    row = temp * temp * d * w
    if has_labels:
        row += (one - alpha) * (np.log(s1) - (_load(sr[yi]) - ms))
    ws = w * temp * scale               # d total / d (dD/dz)
    c1 = (one - alpha) * scale / s1 if has_labels else zero  # the CE's p1 factor
    # d(T² D)/dx = T dD/dz: the teacher's gradient first (it reads es, which the student's overwrites)
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
        # in place in es: the divergence's part plus (1-α) scale p1 (the label's -1 below)
        if div == 0:
            # formed and stored in one pass (the label's -1 after it: an ordinary store to one element)
            _grad_store(gsr, es, et, e1, c, inv_ss * ws, inv_st * ws, c1)
            if has_labels:
                _store_fence()  # the non-temporal stores above reach memory before this one
                gsr[yi] = _store(_load(gsr[yi]) - (one - alpha) * scale, gsr[yi])
        elif div == 1:
            dl = log_ss - log_st
            f = inv_ss * ws
            for j in range(_u(0), _u(c)):
                r = ((_load(sr[j]) - ms) - (_load(tr[j]) - mt)) * inv_t - dl - d
                e = es[j]
                es[j] = _pick(e, e * r * f, zero) + e1[j] * c1
        else:
            f = inv_ss * ws * (one - beta)
            for j in range(_u(0), _u(c)):
                r = (_load(sr[j]) - ms) * inv_t - log_ss - lm[j] - kl_s
                e = es[j]
                es[j] = _pick(e, e * r * f, zero) + e1[j] * c1
        if div != 0:
            if has_labels:
                es[yi] -= (one - alpha) * scale
            _axpb(gsr, es, 0, c, one, zero)
    loss[i] = row


def _grad_store(out, x, y, z, c, a, b, cc):
    pass


@overload(_grad_store, jit_options=JIT)
def _grad_store_ov(out, x, y, z, c, a, b, cc):
    """out = _store(x a - y b + z cc) over the row: the student's gradient, formed and written in one
    pass (non-temporal vector stores for fp32/fp64 outputs; an ordinary loop for 16-bit ones)."""
    if out.dtype == x.dtype and out.dtype in (types.float32, types.float64):
        itemsize = out.dtype.bitwidth // 8
        width = _VEC_BYTES // itemsize

        def nt_impl(out, x, y, z, c, a, b, cc):
            base = _address(out)
            j = _u(0)
            end = _u(c)
            if base % _u(itemsize) == _u(0) and end >= _u(256):
                head = ((_u(_VEC_BYTES) - base % _u(_VEC_BYTES)) % _u(_VEC_BYTES)) // _u(itemsize)
                jv = min(head, end)
                for k in range(j, jv):
                    out[k] = x[k] * a - y[k] * b + z[k] * cc
                j = jv
                while j + _u(width) <= end:
                    _nt_axpbyc(out, x, y, z, j, a, b, cc)
                    j += _u(width)
            for k in range(j, end):
                out[k] = x[k] * a - y[k] * b + z[k] * cc
        return nt_impl

    def impl(out, x, y, z, c, a, b, cc):
        for k in range(_u(0), _u(c)):
            out[k] = _store(x[k] * a - y[k] * b + z[k] * cc, out[k])
    return impl


@njit(**JIT)
def _params(opts):
    """(T, α, β, scale, 1/T, log2(e)/T) in the accumulation dtype."""
    temp, alpha, beta, scale = opts.temperature, opts.alpha, opts.beta, opts.scale
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
    bstats = np.empty((n_workers, 3, 2, _padded((c + STAT_BLOCK - 1) // STAT_BLOCK)), dtype=loss.dtype)
    bad = np.zeros(n_workers, np.bool_)
    for w in prange(n_workers):
        _prefer_wide_vectors()
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
                         i, scratch[w], bstats[w], dp, div, has_labels, want_gs, want_gt)
        _store_fence()  # this worker's non-temporal gradient stores are complete
    return bad.any()
