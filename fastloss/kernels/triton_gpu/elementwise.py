"""Elementwise Triton kernels (sigmoid CE, squared error, Huber, sigmoid focal): one program per block
of elements, a per-block partial sum when only the total is needed (summed on the device in float64)."""
from __future__ import annotations

import triton
import triton.language as tl

from .common import widen


@triton.jit
def sigmoid_ce_kernel(X, T, OUT, PARTIAL, GX, GT, PARAMS, n, BLOCK: tl.constexpr, WANT_OUT: tl.constexpr,
                      WANT_GX: tl.constexpr, WANT_GT: tl.constexpr, ACC_F64: tl.constexpr):
    """Elementwise BCE from logits; per-program partial sum; PARAMS =
    ``params.SigmoidCEParams`` [ε, scale]."""
    pid = tl.program_id(0).to(tl.int64)
    eps = tl.load(PARAMS)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = widen(tl.load(X + offs, mask=mask, other=0.0), ACC_F64)
    t = widen(tl.load(T + offs, mask=mask, other=0.0), ACC_F64) * (1.0 - eps) + 0.5 * eps
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
    """Elementwise (p - t)^2; per-program partial sum; gradients ±2 (p - t) scale, PARAMS =
    ``params.SquaredErrorParams`` [scale]."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    d = widen(tl.load(P + offs, mask=mask, other=0.0), ACC_F64) - widen(tl.load(T + offs, mask=mask, other=0.0),
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
    """Elementwise binary focal loss from logits; per-program partial sum; PARAMS =
    ``params.SigmoidFocalParams`` [γ, α, balance, ε, scale]. The math and its bounded gradient
    factors: kernels.numba_cpu.elementwise.sigmoid_focal.
    u^γ is exp2(γ log2 u) (u = 0 gives 0, or 1 for γ = 0)."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    gamma = tl.load(PARAMS)
    alpha = tl.load(PARAMS + 1)
    balance = tl.load(PARAMS + 2)
    eps = tl.load(PARAMS + 3)
    x = widen(tl.load(X + offs, mask=mask, other=0.0), ACC_F64)
    t = widen(tl.load(T + offs, mask=mask, other=0.0), ACC_F64) * (1.0 - eps) + 0.5 * eps
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
    sum; gradients ±c scale; PARAMS =
    ``params.HuberParams`` [δ, scale]. The clip is two selects, so a NaN d stays NaN."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    delta = tl.load(PARAMS)
    d = widen(tl.load(P + offs, mask=mask, other=0.0), ACC_F64) - widen(tl.load(T + offs, mask=mask, other=0.0),
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
