"""Elementwise losses over flat arrays: sigmoid cross-entropy, sigmoid focal loss, squared error and
Huber.

Each parallel work item is a block of BLOCK elements that writes its loss sum to ``partial`` (the
adapter sums the partials in float64), the per-element losses to ``out`` when ``want_out``
("none"), and the gradients, already multiplied by ``scale``, when asked for. 16-bit inputs arrive
as bits (see halfio).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .approx import _coef_scalars, _sigmoid_pair, _sigmoid_parts
from .base import EXP_JIT, JIT, _as, _u
from .halfio import _load, _store
from .intrinsics import _relu_f32, _store_fence, _use_rcp_estimate
from .rowstats import _axpb

BLOCK = 4096  # elements per parallel work item; its partial sum is short enough to stay accurate


def _relu(x):
    pass


@overload(_relu)
def _relu_ov(x):
    if x == types.float32:
        return lambda x: _relu_f32(x)
    return lambda x: x if x > 0.0 else 0.0


@njit(**EXP_JIT)
def _bce(xv, tv, sp, zero):
    # max(x, 0) - x t + log1p(exp(-|x|)): never log(sigmoid), which is -inf once sigmoid underflows.
    # Compiled without ``reassoc``: the block's ``acc += v`` may not be re-associated into
    # (acc + max(x, 0)) - x t, which rounds acc to the spacing of |x| (3e4: ~2e-3) and loses the sum.
    return _relu(xv) - xv * tv + sp


@njit(inline="always", **JIT)
def _bce_pass(x, t, out, gx, lo, hi, keep, half_eps, scale, c, zero, write_out, write_gx):
    """One block of sigmoid_cross_entropy; returns the block's loss sum. Inlined at every call site
    with literal flags (and t' = t for ε = 0), so each site compiles to one loop whose stores are
    unconditional: a store under a run-time ``if`` inside the loop keeps LLVM from vectorising it."""
    acc = zero
    for j in range(lo, hi):
        xv = _load(x[j])
        tv = _load(t[j]) * keep + half_eps
        sp, sig = _sigmoid_parts(xv, c)
        v = _bce(xv, tv, sp, zero)
        acc += v
        if write_out:
            out[j] = v
        if write_gx:
            gx[j] = _store((sig - tv) * scale, gx[j])
    return acc


@njit(parallel=True, **JIT)
def sigmoid_cross_entropy(x, t, out, partial, gx, gt, eps, coef, scale, want_out, want_gx, want_gt):
    """Elementwise BCE from logits over flat arrays; per-block partial sums in ``partial``.

    loss = max(x,0) - x t' + log1p(exp(-|x|)), t' = t(1-ε) + ε/2;
    d/dx = sigmoid(x) - t' (sigmoid from the same e = exp(-|x|): 1/(1+e) or e/(1+e));
    d/dt = -(1-ε) x. Gradients are multiplied by ``scale``. ``coef`` is SIGMOID_COEF (an argument
    on purpose: see there).

    Each block runs one pass over x and t (_bce_pass), specialised per call site for the outputs
    wanted. log1p is a division-free polynomial and the sigmoid's reciprocal a refined vrcpps estimate
    (see _sigmoid_parts and _use_rcp_estimate).
    """
    n = x.shape[0]
    zero = scale - scale
    one = _as(1, zero)
    keep = one - eps
    half_eps = eps * _as(0.5, zero)
    nb = (n + BLOCK - 1) // BLOCK
    for bi in prange(nb):
        _use_rcp_estimate()  # in the prange body: that is the LLVM function holding the loop
        lo = _u(bi * BLOCK)  # unsigned: see _u
        hi = _u(min(bi * BLOCK + BLOCK, n))
        c = _coef_scalars(coef)
        if want_gx and want_out:
            acc = _bce_pass(x, t, out, gx, lo, hi, keep, half_eps, scale, c, zero, True, True)
        elif want_gx and eps == zero:  # the training step; t' = t saves an FMA per element
            acc = _bce_pass(x, t, out, gx, lo, hi, one, _as(0, zero), scale, c, zero, False, True)
        elif want_gx:
            acc = _bce_pass(x, t, out, gx, lo, hi, keep, half_eps, scale, c, zero, False, True)
        elif want_out:
            acc = _bce_pass(x, t, out, gx, lo, hi, keep, half_eps, scale, c, zero, True, False)
        else:
            acc = _bce_pass(x, t, out, gx, lo, hi, keep, half_eps, scale, c, zero, False, False)
        partial[bi] = acc
        if want_gt:
            for j in range(lo, hi):
                gt[j] = _store(-keep * _load(x[j]) * scale, gt[j])


@njit(inline="always", **JIT)
def _buffered_grads(gp, gt, buf, lo, hi, a, zero, want_gp, want_gt):
    """gp[lo:hi] = a buf and gt[lo:hi] = -a buf from a block's L1 buffer, with non-temporal stores
    (_axpb), which skip the read-for-ownership of each gradient line: one memory transfer per line
    instead of two. The fence completes them before the parallel region ends."""
    if want_gp:
        _axpb(gp[lo:hi], buf, 0, hi - lo, a, zero)
    if want_gt:
        _axpb(gt[lo:hi], buf, 0, hi - lo, -a, zero)
    _store_fence()


@njit(parallel=True, **JIT)
def squared_error(p, t, out, partial, gp, gt, scale, want_out, want_gp, want_gt):
    """Elementwise (p - t)^2 over flat arrays; per-block partial sums; gradients ±2(p - t) scale.

    One pass over p and t per block keeps d = p - t in an L1 buffer; the gradients are written from
    it with non-temporal stores (_axpb), which skip the read-for-ownership of each gradient line:
    one memory transfer per line instead of two."""
    n = p.shape[0]
    zero = scale - scale
    two = _as(2, zero)
    nb = (n + BLOCK - 1) // BLOCK
    for bi in prange(nb):
        lo = _u(bi * BLOCK)  # unsigned: see _u
        hi = _u(min(bi * BLOCK + BLOCK, n))
        dbuf = np.empty(hi - lo, dtype=partial.dtype)
        acc = zero
        for j in range(lo, hi):
            d = _load(p[j]) - _load(t[j])
            acc += d * d
            dbuf[j - lo] = d
        partial[bi] = acc
        if want_out:
            for j in range(lo, hi):
                d = dbuf[j - lo]
                out[j] = d * d
        _buffered_grads(gp, gt, dbuf, lo, hi, two * scale, zero, want_gp, want_gt)


@njit(inline="always", **JIT)
def _clamp(d, delta):
    """d clipped to [-delta, delta] by two selects: NaN stays NaN (both comparisons are false), where
    min/max forms would turn it into ±delta and hide a NaN input from the gradient."""
    return delta if d > delta else (-delta if d < -delta else d)


@njit(parallel=True, **JIT)
def huber(p, t, out, partial, gp, gt, delta, scale, want_out, want_gp, want_gt):
    """Elementwise Huber loss over flat arrays; per-block partial sums; gradients ±c scale.

    With d = p - t and c = clip(d, -δ, δ), branch-free::

        loss = c (d - c/2)      (= d²/2 for |d| <= δ, δ(|d| - δ/2) beyond)
        d loss / d p = c,       d loss / d t = -c

    As for squared_error, one pass per block keeps c in an L1 buffer and the gradients leave with
    non-temporal stores: two reads and one write per element, the MSE floor."""
    n = p.shape[0]
    zero = scale - scale
    half = _as(0.5, zero)
    nb = (n + BLOCK - 1) // BLOCK
    for bi in prange(nb):
        lo = _u(bi * BLOCK)  # unsigned: see _u
        hi = _u(min(bi * BLOCK + BLOCK, n))
        cbuf = np.empty(hi - lo, dtype=partial.dtype)
        acc = zero
        for j in range(lo, hi):
            d = _load(p[j]) - _load(t[j])
            c = _clamp(d, delta)
            acc += c * (d - half * c)
            cbuf[j - lo] = c
        partial[bi] = acc
        if want_out:
            for j in range(lo, hi):
                d = _load(p[j]) - _load(t[j])
                c = cbuf[j - lo]
                out[j] = c * (d - half * c)
        _buffered_grads(gp, gt, cbuf, lo, hi, scale, zero, want_gp, want_gt)


@njit(inline="always", **JIT)
def _power(u, gamma, k, one):
    """u^γ: by k multiplications when γ == k (a literal at each call site, so the loop unrolls and
    the element loop vectorises), by libm's pow when k < 0 (any other γ)."""
    if k < 0:
        return u ** gamma
    f = one
    for _ in range(k):
        f *= u
    return f


@njit(inline="always", **EXP_JIT)
def _focal_pass(x, t, out, gx, gt, lo, hi, keep, half_eps, gamma, k, alpha, balanced, scale, c, zero,
                write_out, write_gx, write_gt):
    """One block of sigmoid_focal; returns the block's loss sum (see sigmoid_focal for the math).
    Inlined per call site with literal flags and exponent k, as _bce_pass."""
    one = zero + _as(1, zero)
    two = one + one
    acc = zero
    for j in range(lo, hi):
        xv = _load(x[j])
        tv = _load(t[j]) * keep + half_eps
        sp, p, q, pq = _sigmoid_pair(xv, c)
        bce = _bce(xv, tv, sp, zero)
        u = tv * q + (one - tv) * p                      # 1 - p_t, from the complement q = sigmoid(-x)
        pos = u > zero                                   # u == 0 only where p or q underflowed: bce is 0 too
        if k > 0:   # integer γ: f r = u^(k-1) p q, no division (the loop's slowest instruction)
            g = _power(u, gamma, k - 1, one)
            f = g * u
            fr = g * pq
        elif k == 0:
            f = one
            fr = zero
        else:       # r = p q / u <= max(p, q): γ u^(γ-1) p q = γ f r never overflows
            f = _power(u, gamma, k, one)
            fr = f * (pq / u if pos else zero)
        w = tv * alpha + (one - tv) * (one - alpha) if balanced else one
        v = w * f * bce
        acc += v
        if write_out:
            out[j] = v
        if write_gx:
            frb = fr * bce if fr != zero else zero       # 0 at x = ±inf (p q = 0), not 0 * inf
            gx[j] = _store(w * (f * (p - tv) + gamma * (one - two * tv) * frb) * scale, gx[j])
        if write_gt:
            sb = bce / u if pos else zero
            dt = -w * f * xv
            if k != 0:  # γ = 0: no focal term (and no 0 * inf where bce / u is inf)
                dt += w * gamma * f * sb * (q - p)
            if balanced:
                dt += (two * alpha - one) * f * bce
            gt[j] = _store(dt * keep * scale, gt[j])
    return acc


@njit(parallel=True, **JIT)
def sigmoid_focal(x, t, out, partial, gx, gt, gamma, alpha, balance, eps, coef, scale, want_out, want_gx,
                  want_gt):
    """Elementwise binary focal loss from logits (Lin et al. 2017; Keras BinaryFocalCrossentropy).

    With t' = t(1-ε) + ε/2, p = sigmoid(x), q = sigmoid(-x) = 1 - p, bce the stable BCE from logits
    (as sigmoid_cross_entropy), u = 1 - p_t = t' q + (1-t') p, f = u^γ and the class-balancing
    weight w = t' α + (1-t')(1-α) when ``balance`` is 1 (w = 1 when 0)::

        loss = w f bce
        d/dx = w f [(p - t') + γ (1 - 2t') bce p q / u]          (du/dx = (1 - 2t') p q)
        d/dt = (1-ε) [(2α - 1) balance f bce + w γ f (q - p) bce / u - w f x]

    The factors p q / u and bce / u stay bounded (u is a convex combination of p and q), so γ < 1
    never overflows; where u == 0 (p or q underflowed to 0, and then bce == 0) the terms are 0,
    their limit. γ of 0 to 4 multiplies (vectorised); other γ call pow per element.
    """
    n = x.shape[0]
    zero = scale - scale
    one = _as(1, zero)
    keep = one - eps
    half_eps = eps * _as(0.5, zero)
    nb = (n + BLOCK - 1) // BLOCK
    k = -1
    for cand in range(5):
        if gamma == _as(cand, zero):
            k = cand
    balanced = balance != zero
    train = want_gx and not want_out and not want_gt  # the training step: loss sum and d/dx only
    for bi in prange(nb):
        _use_rcp_estimate()  # in the prange body: that is the LLVM function holding the loop
        lo = _u(bi * BLOCK)  # unsigned: see _u
        hi = _u(min(bi * BLOCK + BLOCK, n))
        c = _coef_scalars(coef)
        # Literal flags and exponent at each call site: one vectorised loop per common case.
        if train and k == 2 and not balanced:
            acc = _focal_pass(x, t, out, gx, gt, lo, hi, keep, half_eps, gamma, 2, alpha, False, scale, c, zero,
                              False, True, False)
        elif train and k == 2:
            acc = _focal_pass(x, t, out, gx, gt, lo, hi, keep, half_eps, gamma, 2, alpha, True, scale, c, zero,
                              False, True, False)
        elif not (want_gx or want_out or want_gt) and k == 2:
            acc = _focal_pass(x, t, out, gx, gt, lo, hi, keep, half_eps, gamma, 2, alpha, balanced, scale, c,
                              zero, False, False, False)
        elif train and k == 1:
            acc = _focal_pass(x, t, out, gx, gt, lo, hi, keep, half_eps, gamma, 1, alpha, balanced, scale, c,
                              zero, False, True, False)
        elif k >= 0:
            acc = _focal_pass(x, t, out, gx, gt, lo, hi, keep, half_eps, gamma, k, alpha, balanced, scale, c,
                              zero, want_out, want_gx, want_gt)
        else:
            acc = _focal_pass(x, t, out, gx, gt, lo, hi, keep, half_eps, gamma, -1, alpha, balanced, scale, c,
                              zero, want_out, want_gx, want_gt)
        partial[bi] = acc
