"""Triton kernels for torch tensors (CUDA, or the interpreter with TRITON_INTERPRET=1 on CPU).

Cross-entropies run one program per row with an online softmax over class blocks (any C: 32001,
262144, ...): pass 1 streams the row once for the running max m, the running sum s = Σ exp(z - m)
(rescaled when m grows) and, with label smoothing, Σ (z - m); pass 2, only when a gradient is
wanted, re-reads the row and writes the gradient (Liger-style: computed in the forward, so the
backward is a cheap rescale). Elementwise losses run one program per block and write a per-block
partial sum, summed on the device in float64.

Correct on a real GPU as well as in the interpreter: row offsets are int64 (rows * C can exceed
2^31), tails are masked, block sizes are powers of two, 16-bit inputs are loaded and widened to
fp32 (fp64 stays fp64 via ACC_F64), and the label's -(1-ε) term is folded in fp32 before the gradient
is stored in the input's dtype. Options that change the work (label smoothing, z-loss, gradient
outputs) are tl.constexpr flags, so the common case compiles without them. The per-row scale
(1/count for "mean") is read from device memory, so "mean" needs no host synchronisation.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import capped, lanes, widen


@triton.jit
def sparse_ce_kernel(X, stride_x, Y, LOSS, LSE, G, stride_g, PARAMS, W, n_cols, ignore_index,
                     BLOCK: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_ZLOSS: tl.constexpr,
                     HAS_CAP: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                     WANT_GRAD: tl.constexpr, ACC_F64: tl.constexpr):
    """One row: loss (and lse) always, gradient (scaled by scale / T) when WANT_GRAD.

    PARAMS = ``params.SparseParams`` [1/T, ε, z_loss, cap, Σ w, scale] in the accumulation dtype,
    on the device: a Python float argument would reach the kernel as fp32 (float64 inputs must
    keep float64 options), and
    scale = 1/count for "mean" is computed on the device without a host sync. W: the (C,) class
    weights (read when HAS_WEIGHT). With HAS_CAP the logits are cap tanh(x / cap) (-inf kept) and
    the gradient is multiplied by 1 - tanh².
    """
    row = tl.program_id(0).to(tl.int64)
    inv_t = tl.load(PARAMS)
    eps = tl.load(PARAMS + 1)
    z_loss = tl.load(PARAMS + 2)
    cap = tl.load(PARAMS + 3)
    x_row = X + row * stride_x
    g_row = G + row * stride_g
    y = tl.load(Y + row).to(tl.int64)
    ignored = y == ignore_index
    valid = (y >= 0) & (y < n_cols)
    y_safe = tl.where(valid, y, 0)
    # Pass 1: online max / sum (and Σ zs for smoothing), one read of the row, with zs = (x - m) / T:
    # the max is taken of the unscaled logits and the shift comes before the temperature, so a tiny
    # T cannot overflow x / T. s_rest is the sum without the label's term (see pass 2). With class
    # weights the smoothing sum is Σ w zs, re-based by the weight seen so far. Every lane of the
    # block keeps its own statistics and the lanes are combined once after the loop: a block-wide
    # max and sum per block (a reduction and a barrier each) kept the loads from streaming (the
    # same change took the Pallas kernel from 31% to 72% of an H200's copy floor).
    m = lanes(-float("inf"), BLOCK, ACC_F64)
    s = lanes(0.0, BLOCK, ACC_F64)
    s_rest = lanes(0.0, BLOCK, ACC_F64)
    sz = lanes(0.0, BLOCK, ACC_F64)
    seen = lanes(0.0, BLOCK, ACC_F64)
    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x, _ = capped(widen(tl.load(x_row + cols, mask=mask, other=-float("inf")), ACC_F64), cap, HAS_CAP, ACC_F64)
        m_new = tl.maximum(m, x)
        # A shift that is -inf (nothing but masked classes so far) becomes 0, so (-inf) - (-inf)
        # never makes NaN; +inf or NaN stays, so such rows end up NaN. The old sum is rescaled by
        # exp((m - m_safe) / T), which is exactly 0 while m is still -inf (s is 0 then: the form
        # exp(0 - m_safe) would overflow to inf for a logit below -88 T and make 0 * inf = NaN).
        m_old_safe = tl.where(m == -float("inf"), 0.0, m)
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        rescale = tl.exp((m - m_safe) * inv_t)
        e = tl.exp((x - m_safe) * inv_t)  # 0 on the masked tail (x = -inf)
        s = s * rescale + e
        if WANT_GRAD:
            s_rest = s_rest * rescale + tl.where(cols == y, 0.0, e)
        if HAS_SMOOTH:
            if HAS_WEIGHT:
                wv = widen(tl.load(W + cols, mask=mask, other=0.0), ACC_F64)
                # a class of weight 0 adds 0 even where its logit is -inf
                add = tl.where(wv == 0.0, 0.0, wv * (x - m_safe) * inv_t)
            else:
                wv = tl.where(mask, 1.0, 0.0)
                add = tl.where(mask, (x - m_safe) * inv_t, 0.0)
            sz = sz + tl.where(seen == 0.0, 0.0, seen * ((m_old_safe - m_safe) * inv_t)) + add
            seen = seen + wv
        m = m_new
    # The lanes combined: shifted to the row's max M (lanes that saw only -inf add 0; a NaN lane
    # makes its factor, so the row, NaN).
    m_lane = m
    m = tl.max(m_lane, 0)
    m = tl.where(m == -float("inf"), 0.0, m)
    f = tl.where(m_lane == -float("inf"), 0.0, tl.exp((m_lane - m) * inv_t))
    s = tl.sum(s * f, 0)
    s_rest = tl.sum(s_rest * f, 0)
    m_lane_safe = tl.where(m_lane == -float("inf"), 0.0, m_lane)
    sz = tl.sum(sz + tl.where(seen == 0.0, 0.0, seen * ((m_lane_safe - m) * inv_t)), 0)
    log_s = tl.log(s)
    lse = m * inv_t + log_s
    x_y, _ = capped(widen(tl.load(x_row + y_safe), ACC_F64), cap, HAS_CAP, ACC_F64)
    zs_y = (x_y - m) * inv_t
    loss = (1.0 - eps) * (log_s - zs_y)
    if HAS_ZLOSS:
        loss += z_loss * lse * lse
    if HAS_WEIGHT:
        w_sum = tl.load(PARAMS + 4)
        w_y = widen(tl.load(W + y_safe), ACC_F64)
        loss = tl.where(w_y == 0.0, 0.0, w_y * loss)  # weight 0: 0 even for a masked label
        if HAS_SMOOTH:
            loss += eps * (w_sum * log_s - sz) / n_cols
    elif HAS_SMOOTH:
        loss += eps * (log_s - sz / n_cols)
    loss = tl.where(ignored, 0.0, tl.where(valid, loss, float("nan")))
    tl.store(LOSS + row, loss)
    tl.store(LSE + row, lse)
    if WANT_GRAD:
        # d row/dz = (p - q) + 2 z_loss lse p, q = (1-ε) onehot(y) + ε/C; times scale / T.
        # Ignored rows: scale 0. Invalid labels: NaN. At the label, p - q is written
        # -s_rest/s + ε (1 - 1/C): p_y - 1 in fp32 cancels when the label is predicted with
        # confidence (p_y rounds to 1 and the gradient to 0, while the reference is -1e-6).
        # With class weights: p A - ε w / C, A = w_y (1-ε + 2 z_loss lse) + ε Σw / C, and at the
        # label w_y (1-ε)(p_y - 1) + ε (Σw p_y - w_y) / C + 2 z_loss w_y lse p_y.
        scale = tl.load(PARAMS + 5) * inv_t
        scale = tl.where(ignored, 0.0, tl.where(valid, scale, float("nan")))
        zc = 2.0 * z_loss * lse if HAS_ZLOSS else 0.0
        for off in range(0, n_cols, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x, th = capped(widen(tl.load(x_row + cols, mask=mask, other=-float("inf")), ACC_F64), cap, HAS_CAP, ACC_F64)
            p = tl.exp((x - m) * inv_t - log_s)
            if HAS_WEIGHT:
                wv = widen(tl.load(W + cols, mask=mask, other=0.0), ACC_F64)
                big_a = w_y * (1.0 - eps + zc) + eps * w_sum / n_cols
                at_label = w_y * (1.0 - eps) * (-s_rest / s) + eps * (w_sum * p - w_y) / n_cols + zc * w_y * p
                pq = tl.where(cols == y, at_label, p * big_a - eps * wv / n_cols)
            else:
                pq = tl.where(cols == y, eps - eps / n_cols - s_rest / s, p - eps / n_cols) + zc * p
            if HAS_CAP:
                pq = pq * (1.0 - th * th)
            # Ignored rows: exactly 0, even when their logits hold NaN or inf (0 * NaN would be NaN).
            g = tl.where(ignored, 0.0, pq * scale)
            tl.store(g_row + cols, g.to(G.dtype.element_ty), mask=mask)


@triton.jit
def dense_ce_kernel(X, stride_x, T, stride_t, LOSS, LSE, GX, stride_gx, GT, stride_gt, PARAMS, n_cols,
                    BLOCK: tl.constexpr, WANT_GX: tl.constexpr, WANT_GT: tl.constexpr, ACC_F64: tl.constexpr):
    """One row of softmax cross-entropy with dense targets, q = (1-ε) t + ε/C; terms with q = 0 skipped.
    PARAMS = ``params.DenseParams`` [1/T, ε, scale] (see sparse_ce_kernel)."""
    row = tl.program_id(0).to(tl.int64)
    inv_t = tl.load(PARAMS)
    eps = tl.load(PARAMS + 1)
    x_row = X + row * stride_x
    t_row = T + row * stride_t
    # Per-lane statistics combined once after the loop, as in sparse_ce_kernel; qz = Σ q zs is
    # re-based by the lane's target mass when its max grows.
    m = lanes(-float("inf"), BLOCK, ACC_F64)
    s = lanes(0.0, BLOCK, ACC_F64)
    q_lane = lanes(0.0, BLOCK, ACC_F64)
    qz = lanes(0.0, BLOCK, ACC_F64)
    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = widen(tl.load(x_row + cols, mask=mask, other=-float("inf")), ACC_F64)
        q = (1.0 - eps) * widen(tl.load(t_row + cols, mask=mask, other=0.0), ACC_F64) + eps / n_cols
        q = tl.where(mask, q, 0.0)
        m_new = tl.maximum(m, x)
        m_old_safe = tl.where(m == -float("inf"), 0.0, m)
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        s = s * tl.exp((m - m_safe) * inv_t) + tl.exp((x - m_safe) * inv_t)
        qz = qz + tl.where(q_lane == 0.0, 0.0, q_lane * ((m_old_safe - m_safe) * inv_t)) + \
            tl.where(q == 0.0, 0.0, q * ((x - m_safe) * inv_t))
        q_lane += q
        m = m_new
    m_lane = m
    m = tl.max(m_lane, 0)
    m = tl.where(m == -float("inf"), 0.0, m)
    s = tl.sum(s * tl.where(m_lane == -float("inf"), 0.0, tl.exp((m_lane - m) * inv_t)), 0)
    m_lane_safe = tl.where(m_lane == -float("inf"), 0.0, m_lane)
    qz = tl.sum(qz + tl.where(q_lane == 0.0, 0.0, q_lane * ((m_lane_safe - m) * inv_t)), 0)
    q_sum = tl.sum(q_lane, 0)
    log_s = tl.log(s)
    # No target mass: 0 (an all-masked row has log s = -inf); NaN or +inf logits: NaN (s is NaN).
    tl.store(LOSS + row, tl.where(q_sum == 0.0, 0.0, q_sum * log_s) - qz + (s - s))
    tl.store(LSE + row, m * inv_t + log_s)
    if WANT_GX or WANT_GT:
        scale = tl.load(PARAMS + 2)
        for off in range(0, n_cols, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < n_cols
            zs = (widen(tl.load(x_row + cols, mask=mask, other=-float("inf")), ACC_F64) - m) * inv_t
            if WANT_GX:
                q = (1.0 - eps) * widen(tl.load(t_row + cols, mask=mask, other=0.0), ACC_F64) + eps / n_cols
                p = tl.exp(zs - log_s)
                gx = (p * q_sum - q) * (scale * inv_t)
                tl.store(GX + row * stride_gx + cols, gx.to(GX.dtype.element_ty), mask=mask)
            if WANT_GT:
                gt = (1.0 - eps) * (log_s - zs) * scale
                tl.store(GT + row * stride_gt + cols, gt.to(GT.dtype.element_ty), mask=mask)
