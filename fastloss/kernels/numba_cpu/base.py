"""Compiler settings and the small typing helpers every Numba kernel module uses.

Fast-math: ``FASTMATH`` allows reassociation (vectorised reductions), contraction (FMA), reciprocal
and no-signed-zero rewrites, never ``nnan``/``ninf``: NaN rows and -inf masks are part of the
contract. The exp and log1p polynomials compile with ``EXP_FLAGS`` (no ``reassoc``), so their Horner
order, and so their measured accuracy, is the one written. ``RCP_FLAGS`` is for the one division
that may assume no infinities (see ``approx._recip_core``).
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
EXP_FLAGS = {"contract", "nsz"}
RCP_FLAGS = {"contract", "nsz", "arcp", "ninf"}
# error_model="numpy": a float division by zero gives inf/NaN (IEEE) instead of raising.
JIT = dict(fastmath=FASTMATH, cache=True, nogil=True, error_model="numpy")
EXP_JIT = dict(fastmath=EXP_FLAGS, cache=True, error_model="numpy")

LOG2E = 1.4426950408889634


def _as(v, like):
    # In Python (the option builders, called by the NumPy launchers): the NumPy scalar type of like.
    return type(like)(v)


@overload(_as)
def _as_ov(v, like):
    """``v`` in the dtype of ``like``. Numba types ``float32 + 1`` and ``float32 * 0.5`` as
    float64 (NumPy's rules), which would silently turn an fp32 kernel into an fp64 one."""
    if like == types.float32:
        return lambda v, like: np.float32(v)
    if like == types.float64:
        return lambda v, like: np.float64(v)
    return None


@njit(**JIT)
def _u(i):
    """An index as uint64, for loop bounds. Numba wraps negative indices (``a[-1]``): for a signed
    loop variable that LLVM cannot prove non-negative (any ``range(lo, hi)``) it emits a select per
    element, which stops vectorisation. Keep the whole index expression unsigned (uint64 mixed with
    int64 types as float64)."""
    return np.uint64(i)


@njit(**JIT)
def _padded(n):
    """Length of a per-worker scratch row: n rounded up to 16 elements plus 16 more, so two workers'
    rows never share a 64-byte cache line (false sharing made two threads slower than one on
    10-class rows)."""
    return (n + 15) // 16 * 16 + 16
