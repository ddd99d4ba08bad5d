"""The Triton family's option packs: what each kernel reads from its ``PARAMS`` vector, one
NamedTuple per kernel, fields in the order of the vector.

The launchers (``fastloss._torch.launch``) fill a pack by name and turn it into the vector; each
kernel reads field i at ``PARAMS + i`` (its docstring names the pack). The vector lives on the
device in the accumulation dtype, so options are values: a new temperature does not recompile,
and a scale computed from a device-side count needs no host sync.
"""
from __future__ import annotations

from typing import Any, NamedTuple


class SparseParams(NamedTuple):
    """``sparse_ce_kernel``. softcap: 0 for none; weight_sum: Σ w (C unweighted)."""
    inv_t: Any
    label_smoothing: Any
    z_loss: Any
    softcap: Any
    weight_sum: Any
    scale: Any


class DenseParams(NamedTuple):
    """``dense_ce_kernel``."""
    inv_t: Any
    label_smoothing: Any
    scale: Any


class FocalParams(NamedTuple):
    """``softmax_focal_kernel``."""
    gamma: Any
    label_smoothing: Any
    alpha: Any
    scale: Any


class DistillParams(NamedTuple):
    """``distill_kernel``."""
    inv_t: Any
    temperature: Any
    alpha: Any
    beta: Any
    scale: Any


class SigmoidCEParams(NamedTuple):
    """``sigmoid_ce_kernel``."""
    label_smoothing: Any
    scale: Any


class SquaredErrorParams(NamedTuple):
    """``squared_error_kernel``."""
    scale: Any


class HuberParams(NamedTuple):
    """``huber_kernel``."""
    delta: Any
    scale: Any


class SigmoidFocalParams(NamedTuple):
    """``sigmoid_focal_kernel``. balance: 1.0 or 0.0."""
    gamma: Any
    alpha: Any
    balance: Any
    label_smoothing: Any
    scale: Any
