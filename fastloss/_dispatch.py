"""The one router: (a loss's spec, the inputs' framework and device, ``backend=``) -> the adapter that
runs the call and the kernel family it uses. Every public loss, ``value_and_grad``, the Keras losses
and the linear head come through ``call``.

Rules (docs/contract.md, "Backends and dispatch"):
- an explicit ``backend=`` (or ``FASTLOSS_BACKEND``) is used as asked; if it cannot run, its error
  is raised, never swallowed;
- ``backend=None`` picks from the input: jax arrays (or any jax tracer among the options) -> the
  JAX adapter ("auto": the Numba kernels through the XLA FFI on CPU, the Pallas kernels on NVIDIA
  GPUs, the XLA formulation elsewhere); NumPy -> "numba"; torch CPU -> "numba"; torch CUDA ->
  "triton". NumPy input falls back to the JAX adapter when numba is not installed: both compute the
  same fp32 math, so the numbers do not change.
- nothing is imported or probed before a call needs it; while torch.compile traces, nothing at all.

Routes, as (adapter, choice):
    jax input:    ("jax", "auto" | "xla" | "numba" | "pallas")  for backend None | jax | numba | triton
    torch input:  ("torch", "numba" | "triton")
    NumPy input:  ("numpy", "numba") or ("jax", "xla"), NumPy in and out
"""
from __future__ import annotations

import importlib
import os
import sys

import numpy as np

from ._frameworks import input_kind, is_tracer
from ._validation import BACKENDS, check_backend, check_scalar_loss, validate

# backend name -> the module whose import (and unavailable_reason()) says whether it can run here
_PROBES = {"jax": "fastloss._jax.losses", "numba": "fastloss._numpy.launch", "triton": "fastloss._torch.launch"}


def unavailable_reason(backend: str):
    """None if ``backend`` can run here, else why not. Imports the backend (call time only)."""
    try:
        mod = importlib.import_module(_PROBES[backend])
    except ImportError as exc:
        if (exc.name or "").startswith("fastloss"):
            raise  # our own packaging is broken: that is a bug to see, not a missing backend
        return f"it needs the package {exc.name!r}, which is not installed (pip install 'fastloss[{backend}]')"
    return mod.unavailable_reason()


def available_backends() -> dict:
    """{"jax": None | "why not", "numba": ..., "triton": ...}."""
    return {b: unavailable_reason(b) for b in BACKENDS}


def _require(backend: str):
    reason = unavailable_reason(backend)
    if reason is not None:
        raise RuntimeError(f"fastloss backend {backend!r} cannot run here: {reason}")


def explicit(backend):
    """The backend asked for by ``backend=`` or ``FASTLOSS_BACKEND``, or None."""
    return check_backend(backend) or check_backend(os.environ.get("FASTLOSS_BACKEND") or None,
                                                   arg="FASTLOSS_BACKEND")


def _torch_compiling():
    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()


def route(spec, x, opts, backend):
    """(adapter, choice) for a call of ``spec`` whose first array is ``x``; raises the error of an
    explicit backend that cannot take this input or cannot run here."""
    asked = explicit(backend)
    kind = input_kind(x)
    arg = spec.args[0]
    if kind.startswith("torch"):
        if asked == "jax":
            raise TypeError(f"the 'jax' backend takes jax or NumPy arrays; `{arg}` is a torch.Tensor. Use "
                            f"backend='numba' (CPU) or 'triton' (CUDA) for torch tensors.")
        on_cpu = kind == "torch-cpu"
        name = asked or ("numba" if on_cpu else "triton")
        if _torch_compiling():  # the custom op checks that it can run when it runs
            return "torch", name
        if x.device.type not in ("cpu", "cuda"):  # meta, mps, xpu...: no kernel of ours runs there
            raise TypeError(f"fastloss runs torch tensors on CPU (backend 'numba') or CUDA (backend 'triton'); "
                            f"`{arg}` is on device {x.device}.")
        if name == "numba" and not on_cpu:
            raise TypeError(f"the 'numba' backend runs on CPU tensors; received a tensor on {x.device}. "
                            f"Use backend='triton' for CUDA tensors.")
        if asked is None:
            reason = unavailable_reason(name)
            if reason is not None:
                raise RuntimeError(f"no fastloss backend can handle {kind} input here ({name}: {reason})")
        else:
            _require(name)
        if name == "triton" and on_cpu:
            from ._torch import launch
            launch.check_interpreter()
        return "torch", name
    if kind == "jax" or any(is_tracer(v) for v in opts.values()):
        if asked == "triton" and "pallas" not in spec.families:
            raise ValueError(f"backend='triton' for jax arrays runs the Pallas kernels, which cover "
                             f"{', '.join(sorted(_pallas_losses()))}; received a call of {spec.name}. "
                             f"Use backend=None or 'jax'.")
        from ._jax import providers
        return "jax", providers.provider(asked)
    # NumPy (and lists)
    if asked == "triton":
        _require("triton")
        raise TypeError(f"the 'triton' backend takes torch tensors (or jax arrays for the cross-entropies); "
                        f"received `{arg}` of type {type(x).__name__}.")
    if asked is not None:
        _require(asked)
        return ("numpy", "numba") if asked == "numba" else ("jax", "xla")
    reasons = []
    for cand in ("numba", "jax"):
        reason = unavailable_reason(cand)
        if reason is None:
            return ("numpy", "numba") if cand == "numba" else ("jax", "xla")
        reasons.append(f"{cand}: {reason}")
    raise RuntimeError(f"no fastloss backend can handle {kind} input here ({'; '.join(reasons)})")


def route_in_place(spec, x, opts, backend):
    """The in-place variant's route: the Triton kernel on a torch tensor, or an error that says what
    the variant takes and what to call instead."""
    if backend not in ("triton", None):
        raise ValueError(f"`backend` must be 'triton' for the in-place variant (torch tensors); received {backend!r}.")
    if input_kind(x) not in ("torch-cpu", "torch-cuda"):
        raise TypeError(f"the in-place variant takes torch tensors (it runs the Triton kernel); received "
                        f"`{spec.args[0]}` of type {type(x).__module__}.{type(x).__name__}. Use "
                        f"fastloss.{spec.name}.")
    if input_kind(x) == "torch-cpu" and unavailable_reason("triton") is not None:
        raise RuntimeError(f"the in-place variant runs the Triton kernel: CUDA tensors, or CPU tensors only "
                           f"under TRITON_INTERPRET=1 (Triton's interpreter); for CPU tensors use "
                           f"fastloss.{spec.name} (the 'numba' backend).")
    route(spec, x, opts, "triton")


def _pallas_losses():
    from ._spec import SPECS
    return [s.name for s in SPECS if "pallas" in s.families]


def call(spec, arrays, opts, backend=None, want_grad=False):
    """Run ``spec`` on ``arrays`` (its validated array arguments, in order) with ``opts``: the loss,
    or with ``want_grad`` the pair (loss, d loss / d first array) from one fused kernel call."""
    return _run(*route(spec, arrays[0], opts, backend), spec, arrays, opts, want_grad)


# --------------------------------------------------------------------- checked calls, remembered
# Eager calls on NumPy arrays and CPU tensors repeat one signature step after step: the same types,
# shapes and Python option values. Their checks and route depend on nothing else, so the checked
# options and the route are kept per signature (~50 us of a ~100 us small call on a 2-vCPU EPYC).
# Everything that looks at data (label ranges, class weight values) still runs on every call.
_PLANS = {}
_PLANS_MAX = 256
_PLAIN_VALUES = (float, int, bool, str, type(None))


def _signature(spec, x, other, given, backend, want_grad):
    """The key of a two-input call whose checks and route depend only on it, or None: NumPy arrays or
    plain torch tensors (outside torch.compile), every other argument a Python scalar, str or None."""
    tx, to = type(x), type(other)
    if tx is np.ndarray and to is np.ndarray:
        where = None
    else:
        torch = sys.modules.get("torch")
        if (torch is None or tx not in (torch.Tensor, torch.nn.Parameter) or to not in (torch.Tensor, torch.nn.Parameter)
                or torch.compiler.is_compiling()):
            return None
        where = (x.device, other.device)
    values = []
    for name, v in given.items():
        if v is x or v is other:
            continue
        if type(v) not in _PLAIN_VALUES:
            return None  # an array option (class weights), a tensor or a tracer: checked every time
        values.append((name, type(v), v))  # the type: True and 1 hash alike, but only one is valid
    return (spec.name, want_grad, backend, os.environ.get("FASTLOSS_BACKEND"), tx, x.dtype, tuple(x.shape), to,
            other.dtype, tuple(other.shape), where, tuple(values))


def checked_call(spec, arrays, given, backend=None, want_grad=False):
    """Validate a two-input call of ``spec`` (``given``: its arguments by name), route it and run it."""
    x, other = arrays
    key = _signature(spec, x, other, given, backend, want_grad)
    plan = _PLANS.get(key) if key is not None else None
    if plan is not None:
        opts, adapter, choice = plan
        return _run(adapter, choice, spec, arrays, dict(opts), want_grad)
    x2, other2, opts = validate(spec, x, other, given)
    check_scalar_loss(opts, want_grad)
    adapter, choice = route(spec, x2, opts, backend)
    # Only routes whose runnability cannot change later (Triton's interpreter reads its environment
    # variable at each call), and only when validation converted nothing (a NumPy label array next
    # to torch logits becomes a tensor on every call).
    if key is not None and choice == "numba" and x2 is x and other2 is other:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[key] = (dict(opts), adapter, choice)
    return _run(adapter, choice, spec, (x2, other2), opts, want_grad)


def _run(adapter, choice, spec, arrays, opts, want_grad):
    # Plain import statements, not importlib: torch.compile traces this function.
    if adapter == "torch":
        from . import _torch as module
    elif adapter == "jax":
        from . import _jax as module
    else:
        from . import _numpy as module
    return module.run(spec, arrays, opts, choice, want_grad)
