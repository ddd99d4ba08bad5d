"""Elementwise losses over flat arrays: sigmoid cross-entropy and squared error.

Each parallel work item is a block of BLOCK elements that writes its loss sum to ``partial`` (the
adapter sums the partials in float64), the per-element losses to ``out`` when ``want_out``
("none"), and the gradients, already multiplied by ``scale``, when asked for. 16-bit inputs arrive
as bits (see halfio).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .approx import _coef_scalars, _sigmoid_parts
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
        if want_gp:
            _axpb(gp[lo:hi], dbuf, 0, hi - lo, two * scale, zero)
        if want_gt:
            _axpb(gt[lo:hi], dbuf, 0, hi - lo, -two * scale, zero)
        _store_fence()  # the non-temporal stores are complete before the parallel region ends
