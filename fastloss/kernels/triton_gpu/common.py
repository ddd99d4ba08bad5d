"""Triton helpers shared by the kernels: accumulator constants, lane vectors, widening loads, the
softcap's tanh."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def const(v: tl.constexpr, ACC_F64: tl.constexpr):
    """A scalar accumulator initialised to ``v`` in the accumulation dtype. (One return statement:
    Triton's compiler type-checks every return of a function, static branches included.)"""
    if ACC_F64:
        out = tl.full([], v, tl.float64)
    else:
        out = tl.full([], v, tl.float32)
    return out


@triton.jit
def lanes(v: tl.constexpr, BLOCK: tl.constexpr, ACC_F64: tl.constexpr):
    """A (BLOCK,) vector of per-lane accumulators initialised to ``v`` in the accumulation dtype."""
    if ACC_F64:
        out = tl.full([BLOCK], v, tl.float64)
    else:
        out = tl.full([BLOCK], v, tl.float32)
    return out


@triton.jit
def widen(x, ACC_F64: tl.constexpr):
    """``x`` widened to the accumulation dtype (fp32, or fp64 for fp64 input)."""
    if ACC_F64:
        out = x.to(tl.float64)
    else:
        out = x.to(tl.float32)
    return out


@triton.jit
def tanh(u, ACC_F64: tl.constexpr):
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
def capped(x, cap, HAS_CAP: tl.constexpr, ACC_F64: tl.constexpr):
    """(logits after the softcap, tanh) with -inf kept at -inf (tanh -1 there, so 1 - tanh² = 0)."""
    if HAS_CAP:
        th = tanh(x / cap, ACC_F64)
        out = tl.where(x == -float("inf"), x, cap * th)
    else:
        th = x
        out = x
    return out, th
