"""The backend registry: (loss, backend) -> implementation, and the automatic choice.

Backends are adapter modules (``fastloss._jax``, ``fastloss._numba``, ``fastloss._triton``) that are
imported the first time a call needs them, never at ``import fastloss`` time. Each one exposes
``LOSSES`` (loss name -> callable(x, other, opts)), ``value_and_grad(name, x, other, opts)`` and
``unavailable_reason()`` (None when it can run here, else a sentence saying why not).

Rules (docs/contract.md, "Backends and dispatch"):
- an explicit ``backend=`` (or ``FASTLOSS_BACKEND``) is used as asked; if it cannot run, its error
  is raised, never swallowed;
- ``backend=None`` picks from the input's type: jax -> "jax", NumPy -> "numba", torch CUDA ->
  "triton", torch CPU -> "numba". NumPy input may fall back to "jax" when numba is not installed:
  both compute the same fp32 math, so the numbers do not change.
"""
from __future__ import annotations

import importlib
import os
import sys

from ._validation import BACKENDS, check_backend

_MODULES = {"jax": "fastloss._jax", "numba": "fastloss._numba", "triton": "fastloss._triton"}
_FALLBACKS = {"numpy": ("numba", "jax")}


def _module(backend: str):
    return importlib.import_module(_MODULES[backend])


def input_kind(x) -> str:
    """'jax', 'torch-cuda', 'torch-cpu' or 'numpy', without importing any framework.

    A framework that is not imported yet cannot have produced ``x``, so ``sys.modules`` is enough.
    """
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.Array):  # concrete arrays and tracers
        return "jax"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch-cuda" if x.device.type != "cpu" else "torch-cpu"
    return "numpy"


def framework_of(x) -> str:
    """'jax', 'torch' or 'numpy' (NumPy arrays and anything else array-like)."""
    kind = input_kind(x)
    return "torch" if kind.startswith("torch") else kind


def unavailable_reason(backend: str):
    """None if ``backend`` can run here, else why not. Imports the backend (call time only)."""
    try:
        mod = _module(backend)
    except ImportError as exc:
        if (exc.name or "").startswith("fastloss"):
            raise  # our own packaging is broken: that is a bug to see, not a missing backend
        return f"it needs the package {exc.name!r}, which is not installed (pip install 'fastloss[{backend}]')"
    return mod.unavailable_reason()


def available_backends() -> dict:
    """{"jax": None | "why not", "numba": ..., "triton": ...}."""
    return {b: unavailable_reason(b) for b in BACKENDS}


def _raise_unavailable(backend: str, reason: str):
    raise RuntimeError(f"fastloss backend {backend!r} cannot run here: {reason}")


def explicit(backend):
    """The backend asked for by ``backend=`` or ``FASTLOSS_BACKEND``, or None."""
    return check_backend(backend) or check_backend(os.environ.get("FASTLOSS_BACKEND") or None,
                                                   arg="FASTLOSS_BACKEND")


def resolve(backend, x) -> str:
    """The backend name to use for input ``x``."""
    backend = check_backend(backend)
    if backend is None:
        env = os.environ.get("FASTLOSS_BACKEND") or None
        backend = check_backend(env, arg="FASTLOSS_BACKEND")
    if backend is not None:
        reason = unavailable_reason(backend)
        if reason is not None:
            _raise_unavailable(backend, reason)
        return backend
    kind = input_kind(x)
    if kind == "jax":
        candidates = ("jax",)
    elif kind == "torch-cuda":
        candidates = ("triton",)
    elif kind == "torch-cpu":
        candidates = ("numba",)
    else:
        candidates = _FALLBACKS["numpy"]
    reasons = []
    for cand in candidates:
        reason = unavailable_reason(cand)
        if reason is None:
            return cand
        reasons.append(f"{cand}: {reason}")
    raise RuntimeError(f"no fastloss backend can handle {kind} input here ({'; '.join(reasons)})")


def resolve_torch(backend, x) -> str:
    """The backend for torch input. While Dynamo traces (``torch.compile``) nothing is imported or
    probed: the name is the one asked for, or the default for the tensor's device, and the custom op
    checks that it can run when it runs. Eagerly, as ``resolve``."""
    import torch
    if not torch.compiler.is_compiling():
        return resolve(backend, x)
    backend = check_backend(backend) or check_backend(os.environ.get("FASTLOSS_BACKEND") or None,
                                                      arg="FASTLOSS_BACKEND")
    return backend or ("numba" if x.device.type == "cpu" else "triton")


def get(loss: str, backend: str):
    """The implementation registered for (loss, backend)."""
    return _module(backend).LOSSES[loss]


def get_value_and_grad(backend: str):
    return _module(backend).value_and_grad
