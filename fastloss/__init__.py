"""fastloss: fused, numerically careful loss functions for JAX, NumPy/Numba and PyTorch/Triton.

Importing this package imports NumPy only; jax, numba, triton, torch and keras are imported by the
first call that needs them, and no device is probed before then.
"""
from ._dispatch import available_backends
from ._numpy.buffers import empty_cache
from .losses import (
    distillation_loss,
    huber,
    linear_cross_entropy,
    mean_squared_error,
    sigmoid_cross_entropy,
    sigmoid_focal_loss,
    softmax_cross_entropy,
    softmax_focal_loss,
    sparse_softmax_cross_entropy,
    sparse_softmax_cross_entropy_,
    value_and_grad,
)

__version__ = "0.1.0"
__all__ = [
    "available_backends",
    "distillation_loss",
    "empty_cache",
    "huber",
    "linear_cross_entropy",
    "mean_squared_error",
    "sigmoid_cross_entropy",
    "sigmoid_focal_loss",
    "softmax_cross_entropy",
    "softmax_focal_loss",
    "sparse_softmax_cross_entropy",
    "sparse_softmax_cross_entropy_",
    "value_and_grad",
]
