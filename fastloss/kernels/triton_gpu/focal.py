"""Triton kernel of the softmax focal loss (torch CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

The math and its precision choices are those of ``kernels.numba_cpu.focal``: per row, with
p = softmax(x), ℓ = lse - x, q = 1 - p (at the row's argmax, the other classes' mass, summed
directly), c = α a t' (t' the smoothed one-hot or dense target)::

    row = Σ c q^γ ℓ,   d/dx_k = p_k S - c_k (f_k + h_k),   f = q^γ, h = γ q^(γ-1) p ℓ, S = Σ c (f + h)

One program per row, four passes over class blocks: online max / sum / argmax (the one read from
memory), the other classes' mass r (log s = log1p(r)), the loss and S (targets read here), and the
gradient (the terms recomputed: a GPU has the arithmetic to spare and no per-row scratch).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import const, widen


@triton.jit
def _log1p(r):
    """log(1 + r) for r >= 0 accurate where 1 + r rounds (Goldberg's correction: the rounding of
    u = 1 + r divided back out); log s of a confident row is this, with r ~ 1e-9."""
    u = 1.0 + r
    return tl.where(u == 1.0, r, tl.log(u) * (r / (u - 1.0)))


@triton.jit
def _factors(q, p, nll, gamma, GAMMA_INT: tl.constexpr):
    """(f, h) = (q^γ, γ q^(γ-1) p ℓ); h = 0 where p ℓ = 0 (p = 0 at a masked class, ℓ = 0 at p = 1).
    GAMMA_INT: 0-3 for those integer γ (products), -1 for any other (exp/log)."""
    pl = tl.where(p == 0.0, 0.0, p * nll)
    if GAMMA_INT == 0:
        f = q * 0.0 + 1.0
        dq = q * 0.0
    elif GAMMA_INT == 1:
        f = q
        dq = q * 0.0 + 1.0
    elif GAMMA_INT == 2:
        f = q * q
        dq = 2.0 * q
    elif GAMMA_INT == 3:
        f = q * q * q
        dq = 3.0 * q * q
    else:
        pos = q > 0.0
        lq = tl.log(tl.where(pos, q, 1.0))
        f = tl.where(pos, tl.exp(gamma * lq), 0.0)
        dq = tl.where(pos, gamma * tl.exp((gamma - 1.0) * lq), 0.0)
    return f, tl.where(pl == 0.0, 0.0, dq * pl)


@triton.jit
def _weights(T, t_row, A, cols, mask, y, eps, alpha, n_cols, DENSE: tl.constexpr, HAS_ALPHA: tl.constexpr,
             ACC_F64: tl.constexpr):
    """(c, α a) of a block: c = α a ((1-ε) t + ε/C), 0 on masked lanes."""
    if DENSE:
        t = widen(tl.load(t_row + cols, mask=mask, other=0.0), ACC_F64)
    else:
        t = tl.where(cols == y, 1.0, 0.0)
    a = alpha
    if HAS_ALPHA:
        a = alpha * widen(tl.load(A + cols, mask=mask, other=0.0), ACC_F64)
    c = tl.where(mask, a * ((1.0 - eps) * t + eps / n_cols), 0.0)
    return c, a


@triton.jit
def softmax_focal_kernel(X, stride_x, T, stride_t, Y, LOSS, GX, stride_gx, GT, stride_gt, PARAMS, A, n_cols,
                         ignore_index, BLOCK: tl.constexpr, DENSE: tl.constexpr, HAS_ALPHA: tl.constexpr,
                         GAMMA_INT: tl.constexpr, LABEL_ONLY: tl.constexpr, WANT_GX: tl.constexpr,
                         WANT_GT: tl.constexpr, ACC_F64: tl.constexpr):
    """One row of the softmax focal loss. PARAMS = ``params.FocalParams``
    [γ, ε, α, scale]; A: (C,) per-class α (HAS_ALPHA);
    labels Y with ignore_index (ignored row: 0, label outside [0, C): NaN), or dense targets T.
    LABEL_ONLY (labels, ε = 0): the label's is the only term, formed from scalars (no pass 3), and
    the gradient is S (p - onehot)."""
    row = tl.program_id(0).to(tl.int64)
    gamma = tl.load(PARAMS)
    eps = tl.load(PARAMS + 1)
    alpha = tl.load(PARAMS + 2)
    scale = tl.load(PARAMS + 3)
    x_row = X + row * stride_x
    t_row = T + row * stride_t
    y = tl.full([], -1, tl.int64)
    ignored = False
    invalid = False
    if not DENSE:
        y = tl.load(Y + row).to(tl.int64)
        ignored = y == ignore_index
        invalid = ((y < 0) | (y >= n_cols)) & (y != ignore_index)
    m = const(-float("inf"), ACC_F64)
    s = const(0.0, ACC_F64)
    a_idx = tl.full([], -1, tl.int64)
    for off in range(0, n_cols, BLOCK):  # pass 1: max, sum, the first argmax
        cols = off + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = widen(tl.load(x_row + cols, mask=mask, other=-float("inf")), ACC_F64)
        bm = tl.max(x, 0)
        a_idx = tl.where(bm > m, off + tl.argmax(x, 0).to(tl.int64), a_idx)
        m_new = tl.maximum(m, bm)
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.where(mask, tl.exp(x - m_safe), 0.0), 0)
        m = m_new
    m = tl.where(m == -float("inf"), 0.0, m)
    r = const(0.0, ACC_F64)
    for off in range(0, n_cols, BLOCK):  # pass 2: the mass of every class but the argmax
        cols = off + tl.arange(0, BLOCK)
        mask = (cols < n_cols) & (cols != a_idx)
        x = widen(tl.load(x_row + cols, mask=mask, other=-float("inf")), ACC_F64)
        r += tl.sum(tl.where(mask, tl.exp(x - m), 0.0), 0)
    has_a = a_idx >= 0
    nan_row = s - s  # NaN exactly for a row holding NaN or +inf (whose online sum is NaN), else 0
    s = tl.where(has_a, 1.0 + r, s)
    log_s = tl.where(has_a, _log1p(r), tl.log(s))
    qa = r / s
    inv_s = 1.0 / s
    loss = const(0.0, ACC_F64)
    big_s = const(0.0, ACC_F64)
    if LABEL_ONLY:
        yc = tl.minimum(tl.maximum(y, 0), n_cols - 1)  # a safe index on ignored and invalid rows
        zs_y = widen(tl.load(x_row + yc), ACC_F64) - m
        p_y = tl.exp(zs_y) * inv_s
        nll_y = log_s - zs_y
        q_y = tl.where(yc == a_idx, qa, 1.0 - p_y)
        a_y = alpha
        if HAS_ALPHA:
            a_y = alpha * widen(tl.load(A + yc), ACC_F64)
        f_y, h_y = _factors(q_y, p_y, nll_y, gamma, GAMMA_INT)
        loss = tl.where(a_y == 0.0, 0.0, a_y * f_y * nll_y)
        big_s = tl.where(a_y == 0.0, 0.0, a_y * (f_y + h_y))
    if not LABEL_ONLY:
        for off in range(0, n_cols, BLOCK):  # pass 3: the loss, S, the targets' gradient
            cols = off + tl.arange(0, BLOCK)
            mask = cols < n_cols
            zs = widen(tl.load(x_row + cols, mask=mask, other=-float("inf")), ACC_F64) - m
            p = tl.exp(zs) * inv_s
            nll = log_s - zs
            q = tl.where(cols == a_idx, qa, 1.0 - p)
            c, a = _weights(T, t_row, A, cols, mask, y, eps, alpha, n_cols, DENSE, HAS_ALPHA, ACC_F64)
            f, h = _factors(q, p, nll, gamma, GAMMA_INT)
            loss += tl.sum(tl.where(c == 0.0, 0.0, c * f * nll), 0)
            big_s += tl.sum(tl.where(c == 0.0, 0.0, c * (f + h)), 0)
            if WANT_GT:
                ga = a * (1.0 - eps)
                gt = tl.where(ga == 0.0, 0.0, ga * f * nll + nan_row) * scale
                tl.store(GT + row * stride_gt + cols, gt.to(GT.dtype.element_ty), mask=mask)
    loss = loss + nan_row
    loss = tl.where(ignored, 0.0, tl.where(invalid, float("nan"), loss))
    tl.store(LOSS + row, loss)
    if WANT_GX:
        for off in range(0, n_cols, BLOCK):  # pass 4: the gradient, the terms recomputed
            cols = off + tl.arange(0, BLOCK)
            mask = cols < n_cols
            zs = widen(tl.load(x_row + cols, mask=mask, other=-float("inf")), ACC_F64) - m
            p = tl.exp(zs) * inv_s
            if LABEL_ONLY:  # p S - S at the label; -S q_y there when it is the argmax (no cancellation)
                sy = big_s * scale
                g = p * sy - tl.where(cols == y, sy, 0.0)
                g = tl.where((cols == y) & (y == a_idx), -sy * qa, g) + nan_row
            else:
                nll = log_s - zs
                q = tl.where(cols == a_idx, qa, 1.0 - p)
                c, a = _weights(T, t_row, A, cols, mask, y, eps, alpha, n_cols, DENSE, HAS_ALPHA, ACC_F64)
                f, h = _factors(q, p, nll, gamma, GAMMA_INT)
                g = (p * big_s - tl.where(c == 0.0, 0.0, c * (f + h))) * scale + nan_row
            g = tl.where(ignored, 0.0, tl.where(invalid, float("nan"), g))
            tl.store(GX + row * stride_gx + cols, g.to(GX.dtype.element_ty), mask=mask)
