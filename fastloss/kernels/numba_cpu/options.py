"""The Numba family's option packs: one NamedTuple per row kernel, built only by the functions
below, which the NumPy launchers (``fastloss._numpy.launch``) and the XLA FFI handlers
(``xla_ffi``) both call.

Every field is in the accumulation dtype, so a pack is typed ``SparseOptions(float32 x 5)`` (or
float64) whichever caller built it: the jitted program's handler reaches the very specialisation
the NumPy path compiled and cached. The builders also do the one derived value each kernel wants
(1/T, in the accumulation dtype, from the same rounding on both paths). The elementwise kernels
take their one to four options as named scalar arguments instead.
"""
from __future__ import annotations

from typing import NamedTuple

from numba.extending import register_jitable

from .base import _as


class SparseOptions(NamedTuple):
    """Sparse CE (``sparse_ce``, ``sparse_split``). softcap: 0 for none (then the tiny and split
    paths may run); scale: d total / d row (1/count, or 1/Σ counted label weights, for "mean")."""
    inv_t: float
    label_smoothing: float
    z_loss: float
    softcap: float
    scale: float


class DenseOptions(NamedTuple):
    """Dense-target CE (``dense_ce``)."""
    inv_t: float
    label_smoothing: float
    scale: float


class FocalOptions(NamedTuple):
    """The softmax focal loss (``focal``). ``one`` is 1, passed at run time so that LLVM cannot
    fold it (see ``focal.softmax_focal``)."""
    gamma: float
    label_smoothing: float
    alpha: float
    scale: float
    one: float


class DistillOptions(NamedTuple):
    """Distillation (``distill``)."""
    temperature: float
    alpha: float
    beta: float
    scale: float


# register_jitable: plain Python when a launcher calls them (with NumPy scalars of the
# accumulation dtype), compiled inline when a handler does.
@register_jitable
def sparse_options(temperature, label_smoothing, z_loss, softcap, scale):
    return SparseOptions(_as(1, temperature) / temperature, label_smoothing, z_loss, softcap, scale)


@register_jitable
def dense_options(temperature, label_smoothing, scale):
    return DenseOptions(_as(1, temperature) / temperature, label_smoothing, scale)


@register_jitable
def focal_options(gamma, label_smoothing, alpha, scale):
    return FocalOptions(gamma, label_smoothing, alpha, scale, _as(1, gamma))


@register_jitable
def distill_options(temperature, alpha, beta, scale):
    return DistillOptions(temperature, alpha, beta, scale)
