"""16-bit floats on a CPU without a Numba float16 type: loads that widen to fp32, stores that round.

Kernels receive **bfloat16 as uint16 bits and float16 as int16 bits** (a view, no copy). ``_load``
widens any element to its accumulation dtype and ``_store`` rounds an accumulation value to the
element type of the output array, both branch-free so the loops around them vectorise:

- bfloat16 is the high half of a float32: widening is a shift; the store rounds to nearest even
  by integer arithmetic and keeps NaN a quiet NaN;
- float16 goes through LLVM's ``half`` conversions (vcvtph2ps / vcvtps2ph with F16C), which round to
  nearest even, overflow to inf and keep NaN.

Both are checked against every bit pattern in tests/test_numba.py.
"""
from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import overload

from .intrinsics import _bits_from_f32, _f16_from_f32, _f32_from_bits, _f32_from_f16


def _load(v):
    return v


@overload(_load)
def _load_ov(v):
    if v == types.float32 or v == types.float64:
        return lambda v: v
    if v == types.uint16:  # bfloat16 bits: the high half of a float32
        return lambda v: _f32_from_bits(np.uint32(v) << 16)
    if v == types.int16:   # float16 bits
        return lambda v: _f32_from_f16(v)
    return None


def _store(v, like):
    return v


@overload(_store)
def _store_ov(v, like):
    """Convert an accumulation value to the element type of the output array (``like``)."""
    if like == types.float32:
        return lambda v, like: np.float32(v)
    if like == types.float64:
        return lambda v, like: np.float64(v)
    if like == types.uint16:  # bfloat16, round to nearest even, NaN stays a quiet NaN
        def store_bf16(v, like):
            b = _bits_from_f32(np.float32(v))
            r = (b + np.uint32(0x7FFF) + ((b >> 16) & np.uint32(1))) >> 16
            return np.uint16(0x7FC0) if v != v else np.uint16(r)
        return store_bf16
    if like == types.int16:  # float16, round to nearest even (overflow -> inf, NaN -> qNaN)
        return lambda v, like: _f16_from_f32(np.float32(v))
    return None
