"""Which framework an array comes from, without importing any framework.

A framework that is not imported yet cannot have produced an array, so ``sys.modules`` is enough.
"""
from __future__ import annotations

import sys


def input_kind(x) -> str:
    """'jax', 'torch-cuda', 'torch-cpu' or 'numpy' (NumPy arrays and anything else array-like)."""
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.Array):  # concrete arrays and tracers
        return "jax"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch-cuda" if x.device.type != "cpu" else "torch-cpu"
    return "numpy"


def framework_of(x) -> str:
    """'jax', 'torch' or 'numpy'."""
    kind = input_kind(x)
    return "torch" if kind.startswith("torch") else kind


def is_tracer(value) -> bool:
    """Whether ``value`` is a jax tracer (an array or option inside ``jit``, ``grad``, ``vmap``)."""
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(value, jax.core.Tracer)


def is_torch(value) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)
