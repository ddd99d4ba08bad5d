"""The distillation Triton kernel: one program per row over both logits (math: kernels.numba_cpu.distill)."""
from __future__ import annotations

import triton
import triton.language as tl

from .common import const, widen


@triton.jit
def online(m, s, x, inv_t):
    """One block of an online softmax sum at temperature 1/inv_t: (new max, rescaled sum). Shifts
    that are -inf become 0 (no (-inf) - (-inf)); +inf or NaN stay, so such rows end up NaN."""
    m_new = tl.maximum(m, tl.max(x, 0))
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    s = s * tl.exp((m - m_safe) * inv_t) + tl.sum(tl.exp((x - m_safe) * inv_t), 0)
    return m_new, s


@triton.jit
def log_mix(lt, ls, log_b, log_1mb):
    """log(β P_t + (1-β) P_s) from log-probabilities, as a logaddexp (-inf where both are 0)."""
    a = lt + log_b
    b = ls + log_1mb
    mx = tl.maximum(a, b)
    mn = tl.minimum(a, b)
    return tl.where(mx == -float("inf"), mx, mx + tl.log(1.0 + tl.exp(mn - mx)))


@triton.jit
def distill_kernel(S, stride_s, T, stride_t, Y, LOSS, GS, stride_gs, GT, stride_gt, PARAMS, n_cols, ignore_index,
                   BLOCK: tl.constexpr, DIV: tl.constexpr, HAS_LABELS: tl.constexpr, WANT_GS: tl.constexpr,
                   WANT_GT: tl.constexpr, ACC_F64: tl.constexpr):
    """One row of distillation_loss (math: fastloss.kernels.numba_cpu.distill). PARAMS =
    ``params.DistillParams`` [1/T, T, α, β, scale]; DIV 0 forward_kl, 1 reverse_kl, 2 jsd.

    Pass 1 streams both rows once for the online max and sum of the student at T (and at 1 with
    labels) and of the teacher; pass 2 re-reads them for the divergence, summed per element in log
    space (no 1 - Σ P cancellation, exact for masked classes); pass 3, only when a gradient is
    wanted, re-reads them and writes the gradients. Passes 2-3 mostly hit L2 for rows up to ~100k.
    """
    row = tl.program_id(0).to(tl.int64)
    inv_t = tl.load(PARAMS)
    temp = tl.load(PARAMS + 1)
    alpha = tl.load(PARAMS + 2)
    beta = tl.load(PARAMS + 3)
    scale = tl.load(PARAMS + 4)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    ignored = False
    valid = True
    y = 0
    if HAS_LABELS:
        y = tl.load(Y + row).to(tl.int64)
        ignored = y == ignore_index
        valid = (y >= 0) & (y < n_cols)
    ms = const(-float("inf"), ACC_F64)
    mt = const(-float("inf"), ACC_F64)
    m1 = const(-float("inf"), ACC_F64)
    ss = const(0.0, ACC_F64)
    st = const(0.0, ACC_F64)
    s1 = const(0.0, ACC_F64)
    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < n_cols
        xs = widen(tl.load(s_row + cols, mask=mask, other=-float("inf")), ACC_F64)
        xt = widen(tl.load(t_row + cols, mask=mask, other=-float("inf")), ACC_F64)
        ms, ss = online(ms, ss, xs, inv_t)
        mt, st = online(mt, st, xt, inv_t)
        if HAS_LABELS:
            m1, s1 = online(m1, s1, xs, 1.0)
    ms = tl.where(ms == -float("inf"), 0.0, ms)
    mt = tl.where(mt == -float("inf"), 0.0, mt)
    log_ss = tl.log(ss)
    log_st = tl.log(st)
    log_b = tl.log(beta)
    log_1mb = tl.log(1.0 - beta)
    kl_t = const(0.0, ACC_F64)
    kl_s = const(0.0, ACC_F64)
    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < n_cols
        ls = (widen(tl.load(s_row + cols, mask=mask, other=-float("inf")), ACC_F64) - ms) * inv_t - log_ss
        lt = (widen(tl.load(t_row + cols, mask=mask, other=-float("inf")), ACC_F64) - mt) * inv_t - log_st
        ps = tl.exp(ls)
        pt = tl.exp(lt)
        if DIV == 0:
            kl_t += tl.sum(tl.where(pt == 0.0, 0.0, pt * (lt - ls)), 0)
        elif DIV == 1:
            kl_s += tl.sum(tl.where(ps == 0.0, 0.0, ps * (ls - lt)), 0)
        else:
            lm = log_mix(lt, ls, log_b, log_1mb)
            kl_t += tl.sum(tl.where(pt == 0.0, 0.0, pt * (lt - lm)), 0)
            kl_s += tl.sum(tl.where(ps == 0.0, 0.0, ps * (ls - lm)), 0)
    if DIV == 0:
        d = kl_t
    elif DIV == 1:
        d = kl_s
    else:
        d = beta * kl_t + (1.0 - beta) * kl_s
    w = 1.0
    if HAS_LABELS:
        w = alpha
    loss = temp * temp * d * w
    log_s1 = tl.log(s1)
    if HAS_LABELS:
        m1 = tl.where(m1 == -float("inf"), 0.0, m1)
        y_safe = tl.where(valid, y, 0)
        loss += (1.0 - alpha) * (log_s1 - (widen(tl.load(s_row + y_safe), ACC_F64) - m1))
        loss = tl.where(ignored, 0.0, tl.where(valid, loss, float("nan")))
    tl.store(LOSS + row, loss)
    if WANT_GS or WANT_GT:
        ws = w * temp * scale
        ce = (1.0 - alpha) * scale
        if HAS_LABELS:  # ignored rows: exactly 0 whatever they hold; invalid labels: NaN
            ws = tl.where(ignored, 0.0, tl.where(valid, ws, float("nan")))
            ce = tl.where(ignored, 0.0, tl.where(valid, ce, float("nan")))
        for off in range(0, n_cols, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < n_cols
            xs = widen(tl.load(s_row + cols, mask=mask, other=-float("inf")), ACC_F64)
            ls = (xs - ms) * inv_t - log_ss
            lt = (widen(tl.load(t_row + cols, mask=mask, other=-float("inf")), ACC_F64) - mt) * inv_t - log_st
            ps = tl.exp(ls)
            pt = tl.exp(lt)
            if DIV == 0:
                gs = ps - pt
                gt = tl.where(pt == 0.0, 0.0, pt * (lt - ls - d))
            elif DIV == 1:
                gs = tl.where(ps == 0.0, 0.0, ps * (ls - lt - d))
                gt = pt - ps
            else:
                lm = log_mix(lt, ls, log_b, log_1mb)
                gs = (1.0 - beta) * tl.where(ps == 0.0, 0.0, ps * (ls - lm - kl_s))
                gt = beta * tl.where(pt == 0.0, 0.0, pt * (lt - lm - kl_t))
            if WANT_GS:
                g = gs * ws
                if HAS_LABELS:
                    p1 = tl.exp(xs - m1 - log_s1)
                    g += tl.where(cols == y, p1 - 1.0, p1) * ce
                    g = tl.where(ignored, 0.0, g)
                tl.store(GS + row * stride_gs + cols, g.to(GS.dtype.element_ty), mask=mask)
            if WANT_GT:
                g = gt * ws
                if HAS_LABELS:
                    g = tl.where(ignored, 0.0, g)
                tl.store(GT + row * stride_gt + cols, g.to(GT.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------- launch helpers
