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


@triton.jit
def _const(v: tl.constexpr, ACC_F64: tl.constexpr):
    """A scalar accumulator initialised to ``v`` in the accumulation dtype. (One return statement:
    Triton's compiler type-checks every return of a function, static branches included.)"""
    if ACC_F64:
        out = tl.full([], v, tl.float64)
    else:
        out = tl.full([], v, tl.float32)
    return out


@triton.jit
def _lanes(v: tl.constexpr, BLOCK: tl.constexpr, ACC_F64: tl.constexpr):
    """A (BLOCK,) vector of per-lane accumulators initialised to ``v`` in the accumulation dtype."""
    if ACC_F64:
        out = tl.full([BLOCK], v, tl.float64)
    else:
        out = tl.full([BLOCK], v, tl.float32)
    return out


@triton.jit
def _acc(x, ACC_F64: tl.constexpr):
    """``x`` widened to the accumulation dtype (fp32, or fp64 for fp64 input)."""
    if ACC_F64:
        out = x.to(tl.float64)
    else:
        out = x.to(tl.float32)
    return out


@triton.jit
def _tanh(u, ACC_F64: tl.constexpr):
    """tanh from exp: the odd Taylor polynomial to u^9 near 0 (where (1 - e)/(1 + e) would cancel),
    (1 - e)/(1 + e) with e = exp(-2|u|) beyond. The switch is at |u| = 1/4 in fp32 (the next Taylor
    term is 1e-8 relative there) and 0.04 in fp64 (1e-16; the exp form loses at most ~12 ulp
    there). ±inf give ±1, NaN stays NaN."""
    if ACC_F64:
        switch = 0.04
    else:
        switch = 0.25
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    a2 = a * a
    small = a + a * a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0))))
    t = tl.where(a < switch, small, big)
    return tl.where(u < 0, -t, t)


@triton.jit
def _capped(x, cap, HAS_CAP: tl.constexpr, ACC_F64: tl.constexpr):
    """(logits after the softcap, tanh) with -inf kept at -inf (tanh -1 there, so 1 - tanh² = 0)."""
    if HAS_CAP:
        th = _tanh(x / cap, ACC_F64)
        out = tl.where(x == -float("inf"), x, cap * th)
    else:
        th = x
        out = x
    return out, th


@triton.jit
def sparse_ce_kernel(X, stride_x, Y, LOSS, LSE, G, stride_g, PARAMS, W, n_cols, ignore_index,
                     BLOCK: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_ZLOSS: tl.constexpr,
                     HAS_CAP: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                     WANT_GRAD: tl.constexpr, ACC_F64: tl.constexpr):
    """One row: loss (and lse) always, gradient (scaled by scale / T) when WANT_GRAD.

    PARAMS = [1/T, ε, z_loss, cap, Σ w, scale] in the accumulation dtype, on the device: a Python
    float argument would reach the kernel as fp32 (float64 inputs must keep float64 options), and
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
    m = _lanes(-float("inf"), BLOCK, ACC_F64)
    s = _lanes(0.0, BLOCK, ACC_F64)
    s_rest = _lanes(0.0, BLOCK, ACC_F64)
    sz = _lanes(0.0, BLOCK, ACC_F64)
    seen = _lanes(0.0, BLOCK, ACC_F64)
    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x, _ = _capped(_acc(tl.load(x_row + cols, mask=mask, other=-float("inf")), ACC_F64), cap, HAS_CAP, ACC_F64)
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
                wv = _acc(tl.load(W + cols, mask=mask, other=0.0), ACC_F64)
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
    x_y, _ = _capped(_acc(tl.load(x_row + y_safe), ACC_F64), cap, HAS_CAP, ACC_F64)
    zs_y = (x_y - m) * inv_t
    loss = (1.0 - eps) * (log_s - zs_y)
    if HAS_ZLOSS:
        loss += z_loss * lse * lse
    if HAS_WEIGHT:
        w_sum = tl.load(PARAMS + 4)
        w_y = _acc(tl.load(W + y_safe), ACC_F64)
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
            x, th = _capped(_acc(tl.load(x_row + cols, mask=mask, other=-float("inf")), ACC_F64), cap, HAS_CAP, ACC_F64)
            p = tl.exp((x - m) * inv_t - log_s)
            if HAS_WEIGHT:
                wv = _acc(tl.load(W + cols, mask=mask, other=0.0), ACC_F64)
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
    PARAMS = [1/T, ε, scale] (see sparse_ce_kernel)."""
    row = tl.program_id(0).to(tl.int64)
    inv_t = tl.load(PARAMS)
    eps = tl.load(PARAMS + 1)
    x_row = X + row * stride_x
    t_row = T + row * stride_t
    # Per-lane statistics combined once after the loop, as in sparse_ce_kernel; qz = Σ q zs is
    # re-based by the lane's target mass when its max grows.
    m = _lanes(-float("inf"), BLOCK, ACC_F64)
    s = _lanes(0.0, BLOCK, ACC_F64)
    q_lane = _lanes(0.0, BLOCK, ACC_F64)
    qz = _lanes(0.0, BLOCK, ACC_F64)
    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = _acc(tl.load(x_row + cols, mask=mask, other=-float("inf")), ACC_F64)
        q = (1.0 - eps) * _acc(tl.load(t_row + cols, mask=mask, other=0.0), ACC_F64) + eps / n_cols
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
            zs = (_acc(tl.load(x_row + cols, mask=mask, other=-float("inf")), ACC_F64) - m) * inv_t
            if WANT_GX:
                q = (1.0 - eps) * _acc(tl.load(t_row + cols, mask=mask, other=0.0), ACC_F64) + eps / n_cols
                p = tl.exp(zs - log_s)
                gx = (p * q_sum - q) * (scale * inv_t)
                tl.store(GX + row * stride_gx + cols, gx.to(GX.dtype.element_ty), mask=mask)
            if WANT_GT:
                gt = (1.0 - eps) * (log_s - zs) * scale
                tl.store(GT + row * stride_gt + cols, gt.to(GT.dtype.element_ty), mask=mask)


@triton.jit
def sigmoid_ce_kernel(X, T, OUT, PARTIAL, GX, GT, PARAMS, n, BLOCK: tl.constexpr, WANT_OUT: tl.constexpr,
                      WANT_GX: tl.constexpr, WANT_GT: tl.constexpr, ACC_F64: tl.constexpr):
    """Elementwise BCE from logits; per-program partial sum; PARAMS = [ε, scale]."""
    pid = tl.program_id(0).to(tl.int64)
    eps = tl.load(PARAMS)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = _acc(tl.load(X + offs, mask=mask, other=0.0), ACC_F64)
    t = _acc(tl.load(T + offs, mask=mask, other=0.0), ACC_F64) * (1.0 - eps) + 0.5 * eps
    e = tl.exp(-tl.abs(x))
    val = tl.maximum(x, 0.0) - x * t + tl.log(1.0 + e)  # log1p: 1 + e rounds only when e < ulp/2
    # log(1 + e) loses e's low bits for tiny e; the exact log1p form keeps them.
    val = tl.where(e < 1e-4, tl.maximum(x, 0.0) - x * t + e * (1.0 - 0.5 * e), val)
    val = tl.where(mask, val, 0.0)
    tl.store(PARTIAL + pid, tl.sum(val, 0))
    if WANT_OUT:
        tl.store(OUT + offs, val, mask=mask)
    scale = tl.load(PARAMS + 1)
    if WANT_GX:
        inv = 1.0 / (1.0 + e)
        sig = tl.where(x >= 0, inv, e * inv)
        tl.store(GX + offs, ((sig - t) * scale).to(GX.dtype.element_ty), mask=mask)
    if WANT_GT:
        tl.store(GT + offs, (-(1.0 - eps) * x * scale).to(GT.dtype.element_ty), mask=mask)


@triton.jit
def squared_error_kernel(P, T, OUT, PARTIAL, GP, GT, PARAMS, n, BLOCK: tl.constexpr, WANT_OUT: tl.constexpr,
                         WANT_GP: tl.constexpr, WANT_GT: tl.constexpr, ACC_F64: tl.constexpr):
    """Elementwise (p - t)^2; per-program partial sum; gradients ±2 (p - t) scale, PARAMS = [scale]."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    d = _acc(tl.load(P + offs, mask=mask, other=0.0), ACC_F64) - _acc(tl.load(T + offs, mask=mask, other=0.0),
                                                                       ACC_F64)
    tl.store(PARTIAL + pid, tl.sum(d * d, 0))
    if WANT_OUT:
        tl.store(OUT + offs, d * d, mask=mask)
    d2 = 2.0 * d * tl.load(PARAMS)
    if WANT_GP:
        tl.store(GP + offs, d2.to(GP.dtype.element_ty), mask=mask)
    if WANT_GT:
        tl.store(GT + offs, (-d2).to(GT.dtype.element_ty), mask=mask)


@triton.jit
def sigmoid_focal_kernel(X, T, OUT, PARTIAL, GX, GT, PARAMS, n, BLOCK: tl.constexpr, WANT_OUT: tl.constexpr,
                         WANT_GX: tl.constexpr, WANT_GT: tl.constexpr, ACC_F64: tl.constexpr):
    """Elementwise binary focal loss from logits; per-program partial sum; PARAMS = [γ, α, balance,
    ε, scale]. The math and its bounded gradient factors: kernels.numba_cpu.elementwise.sigmoid_focal.
    u^γ is exp2(γ log2 u) (u = 0 gives 0, or 1 for γ = 0)."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    gamma = tl.load(PARAMS)
    alpha = tl.load(PARAMS + 1)
    balance = tl.load(PARAMS + 2)
    eps = tl.load(PARAMS + 3)
    x = _acc(tl.load(X + offs, mask=mask, other=0.0), ACC_F64)
    t = _acc(tl.load(T + offs, mask=mask, other=0.0), ACC_F64) * (1.0 - eps) + 0.5 * eps
    e = tl.exp(-tl.abs(x))
    sp = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))  # log1p(e), as sigmoid_ce_kernel
    bce = tl.maximum(x, 0.0) - x * t + sp
    inv = 1.0 / (1.0 + e)
    p = tl.where(x >= 0, inv, e * inv)
    q = tl.where(x >= 0, e * inv, inv)
    u = t * q + (1.0 - t) * p
    pos = u > 0.0
    safe_u = tl.where(pos, u, 1.0)
    f = tl.where(pos, tl.exp2(gamma * tl.log2(safe_u)), tl.where(gamma == 0.0, 1.0, 0.0))
    w = 1.0 + balance * (t * alpha + (1.0 - t) * (1.0 - alpha) - 1.0)
    val = tl.where(mask, w * f * bce, 0.0)
    tl.store(PARTIAL + pid, tl.sum(val, 0))
    if WANT_OUT:
        tl.store(OUT + offs, val, mask=mask)
    scale = tl.load(PARAMS + 4)
    if WANT_GX:
        r = tl.where(pos, p * q / safe_u, 0.0)
        rb = tl.where(r == 0.0, 0.0, r * bce)  # 0 at x = ±inf (p q = 0), not 0 * inf
        gx = w * f * ((p - t) + gamma * (1.0 - 2.0 * t) * rb) * scale
        tl.store(GX + offs, gx.to(GX.dtype.element_ty), mask=mask)
    if WANT_GT:
        sb = tl.where(pos, bce / safe_u, 0.0)
        bal = tl.where(balance != 0.0, balance * (2.0 * alpha - 1.0) * f * bce, 0.0)
        dt = bal + tl.where(gamma == 0.0, 0.0, w * gamma * f * sb * (q - p)) - w * f * x
        tl.store(GT + offs, (dt * (1.0 - eps) * scale).to(GT.dtype.element_ty), mask=mask)


@triton.jit
def huber_kernel(P, T, OUT, PARTIAL, GP, GT, PARAMS, n, BLOCK: tl.constexpr, WANT_OUT: tl.constexpr,
                 WANT_GP: tl.constexpr, WANT_GT: tl.constexpr, ACC_F64: tl.constexpr):
    """Elementwise Huber loss, c (d - c/2) with d = p - t, c = clip(d, -δ, δ); per-program partial
    sum; gradients ±c scale; PARAMS = [δ, scale]. The clip is two selects, so a NaN d stays NaN."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    delta = tl.load(PARAMS)
    d = _acc(tl.load(P + offs, mask=mask, other=0.0), ACC_F64) - _acc(tl.load(T + offs, mask=mask, other=0.0),
                                                                       ACC_F64)
    c = tl.where(d > delta, delta, tl.where(d < -delta, -delta, d))
    val = c * (d - 0.5 * c)
    tl.store(PARTIAL + pid, tl.sum(val, 0))
    if WANT_OUT:
        tl.store(OUT + offs, val, mask=mask)
    gc = c * tl.load(PARAMS + 1)
    if WANT_GP:
        tl.store(GP + offs, gc.to(GP.dtype.element_ty), mask=mask)
    if WANT_GT:
        tl.store(GT + offs, (-gc).to(GT.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------- distillation
@triton.jit
def _online(m, s, x, inv_t):
    """One block of an online softmax sum at temperature 1/inv_t: (new max, rescaled sum). Shifts
    that are -inf become 0 (no (-inf) - (-inf)); +inf or NaN stay, so such rows end up NaN."""
    m_new = tl.maximum(m, tl.max(x, 0))
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    s = s * tl.exp((m - m_safe) * inv_t) + tl.sum(tl.exp((x - m_safe) * inv_t), 0)
    return m_new, s


@triton.jit
def _log_mix(lt, ls, log_b, log_1mb):
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
    """One row of distillation_loss (math: fastloss.kernels.numba_cpu.distill). PARAMS = [1/T, T, α, β,
    scale]; DIV 0 forward_kl, 1 reverse_kl, 2 jsd.

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
    ms = _const(-float("inf"), ACC_F64)
    mt = _const(-float("inf"), ACC_F64)
    m1 = _const(-float("inf"), ACC_F64)
    ss = _const(0.0, ACC_F64)
    st = _const(0.0, ACC_F64)
    s1 = _const(0.0, ACC_F64)
    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < n_cols
        xs = _acc(tl.load(s_row + cols, mask=mask, other=-float("inf")), ACC_F64)
        xt = _acc(tl.load(t_row + cols, mask=mask, other=-float("inf")), ACC_F64)
        ms, ss = _online(ms, ss, xs, inv_t)
        mt, st = _online(mt, st, xt, inv_t)
        if HAS_LABELS:
            m1, s1 = _online(m1, s1, xs, 1.0)
    ms = tl.where(ms == -float("inf"), 0.0, ms)
    mt = tl.where(mt == -float("inf"), 0.0, mt)
    log_ss = tl.log(ss)
    log_st = tl.log(st)
    log_b = tl.log(beta)
    log_1mb = tl.log(1.0 - beta)
    kl_t = _const(0.0, ACC_F64)
    kl_s = _const(0.0, ACC_F64)
    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < n_cols
        ls = (_acc(tl.load(s_row + cols, mask=mask, other=-float("inf")), ACC_F64) - ms) * inv_t - log_ss
        lt = (_acc(tl.load(t_row + cols, mask=mask, other=-float("inf")), ACC_F64) - mt) * inv_t - log_st
        ps = tl.exp(ls)
        pt = tl.exp(lt)
        if DIV == 0:
            kl_t += tl.sum(tl.where(pt == 0.0, 0.0, pt * (lt - ls)), 0)
        elif DIV == 1:
            kl_s += tl.sum(tl.where(ps == 0.0, 0.0, ps * (ls - lt)), 0)
        else:
            lm = _log_mix(lt, ls, log_b, log_1mb)
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
        loss += (1.0 - alpha) * (log_s1 - (_acc(tl.load(s_row + y_safe), ACC_F64) - m1))
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
            xs = _acc(tl.load(s_row + cols, mask=mask, other=-float("inf")), ACC_F64)
            ls = (xs - ms) * inv_t - log_ss
            lt = (_acc(tl.load(t_row + cols, mask=mask, other=-float("inf")), ACC_F64) - mt) * inv_t - log_st
            ps = tl.exp(ls)
            pt = tl.exp(lt)
            if DIV == 0:
                gs = ps - pt
                gt = tl.where(pt == 0.0, 0.0, pt * (lt - ls - d))
            elif DIV == 1:
                gs = tl.where(ps == 0.0, 0.0, ps * (ls - lt - d))
                gt = pt - ps
            else:
                lm = _log_mix(lt, ls, log_b, log_1mb)
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
# Register budget: these kernels are memory-bound, so they must keep loads in flight: at most 128
# registers per thread (two 256-thread blocks per SM at least). The sizes below hold 8 values of 16
# or 32 bits per thread (4 of fp64, which take two registers each) at 8 warps; at 4096 classes (16
# per thread) sm_90 needed up to 252 registers (tests/test_pallas.py reads them from the cubin).
def _f64(dtype):
    return str(dtype).endswith("float64")


def row_block(n_cols, interpret, dtype="float32"):
    """Power-of-two class block for the row kernels: whole small rows, else 2048 classes (1024 in
    fp64) on a GPU; 2048 in the interpreter too, where each block is one NumPy operation."""
    cap = 1024 if _f64(dtype) and not interpret else 2048
    return min(cap, max(16, triton.next_power_of_2(n_cols)))


def elem_block(dtype="float32"):
    """Elements per program of the elementwise kernels: 2 per thread at 8 warps. At 4 per thread
    ptxas spilled 8 bytes in the sigmoid focal loss's fp16 gradient for sm_80 (48 registers used,
    `ptxas -v`), and fp64 needed 143 registers; at 512 every variant stays <= 78, unspilled."""
    return 512


def distill_block(n_cols, interpret, dtype="float32"):
    """Distillation holds blocks of two rows and their log-probabilities at once: at most 2048
    classes per block (1024 in fp64 on a GPU), as the cross-entropies."""
    return row_block(n_cols, interpret, dtype)


def num_warps(block):
    return 8 if block >= 1024 else 4


_PTR = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "float64": "*fp64"}


def specializations():
    """Every (kernel, signature, constexprs, num_warps) the dispatch can launch, for ahead-of-time
    compilation checks (tests/test_triton.py compiles each for sm_80 and sm_90 without a GPU).

    Input dtypes x flag combinations at the largest class block, plus the smallest block for fp32;
    targets share the logits' dtype (the common case: a mixed pair compiles through the same code).
    """
    import itertools
    out = []
    bools = (False, True)
    for dt in ("float16", "bfloat16", "float32", "float64"):
        x, acc = _PTR[dt], "*fp64" if dt == "float64" else "*fp32"
        f64 = dt == "float64"
        big = row_block(1 << 20, False, dt)
        blocks = (big, 16) if dt == "float32" else (big,)
        # class weights and softcap: with smoothing and z-loss on (their longest code), gradient wanted
        options = [(sm, zl, False, False, g) for sm, zl, g in itertools.product(bools, bools, bools)]
        options += [(True, True, cap, wt, True) for cap, wt in ((True, False), (False, True), (True, True))]
        for block, (smooth, zl, cap, wt, grad) in itertools.product(blocks, options):
            sig = dict(X=x, stride_x="i64", Y="*i64", LOSS=acc, LSE=acc, G=x, stride_g="i64", PARAMS=acc, W=acc,
                       n_cols="i32", ignore_index="i32")
            const = dict(BLOCK=block, HAS_SMOOTH=smooth, HAS_ZLOSS=zl, HAS_CAP=cap, HAS_WEIGHT=wt, WANT_GRAD=grad,
                         ACC_F64=f64)
            out.append((sparse_ce_kernel, sig, const, num_warps(block)))
        for block, gx, gt in itertools.product(blocks, bools, bools):
            sig = dict(X=x, stride_x="i64", T=x, stride_t="i64", LOSS=acc, LSE=acc, GX=x, stride_gx="i64", GT=x,
                       stride_gt="i64", PARAMS=acc, n_cols="i32")
            out.append((dense_ce_kernel, sig, dict(BLOCK=block, WANT_GX=gx, WANT_GT=gt, ACC_F64=f64),
                        num_warps(block)))
        for kern, names in ((sigmoid_ce_kernel, ("WANT_GX", "WANT_GT")), (squared_error_kernel, ("WANT_GP", "WANT_GT")),
                            (huber_kernel, ("WANT_GP", "WANT_GT")), (sigmoid_focal_kernel, ("WANT_GX", "WANT_GT"))):
            for w_out, g1, g2 in itertools.product(bools, bools, bools):
                first = "P" if names[0] == "WANT_GP" else "X"
                grad1 = "GP" if names[0] == "WANT_GP" else "GX"
                sig = {first: x, "T": x, "OUT": acc, "PARTIAL": acc, grad1: x, "GT": x, "PARAMS": acc, "n": "i32"}
                const = {"BLOCK": elem_block(dt), "WANT_OUT": w_out, names[0]: g1, names[1]: g2, "ACC_F64": f64}
                out.append((kern, sig, const, 8))
        # distillation: every flag combination in fp32, the training case (labels, student gradient)
        # in the other dtypes (each specialisation costs ~0.7 s per architecture to compile)
        for div, labels, gs, gt in itertools.product((0, 1, 2), bools, bools, bools):
            if dt != "float32" and not (labels and gs and not gt):
                continue
            block = distill_block(1 << 20, False, dt)
            sig = dict(S=x, stride_s="i64", T=x, stride_t="i64", Y="*i64", LOSS=acc, GS=x, stride_gs="i64", GT=x,
                       stride_gt="i64", PARAMS=acc, n_cols="i32", ignore_index="i64")
            const = dict(BLOCK=block, DIV=div, HAS_LABELS=labels, WANT_GS=gs, WANT_GT=gt, ACC_F64=f64)
            out.append((distill_kernel, sig, const, num_warps(block)))
    return out
