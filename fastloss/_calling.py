"""How a public loss function reaches a backend: the inputs as arrays of one framework, then the
call through the dispatch layer (torch custom ops, the JAX adapter, or the registry). Shared by
every public module (``losses``, ``_focal``)."""
from __future__ import annotations

import numpy as np

from . import _dispatch
from . import _validation as V


def _as_array(x):
    # Lists and scalars are treated as NumPy input; arrays of any framework pass through untouched.
    return x if hasattr(x, "shape") and hasattr(x, "dtype") else np.asarray(x)


def _pair(x, other, x_arg, other_arg):
    """The two inputs as arrays of one framework. NumPy arrays and lists next to torch logits become
    torch tensors on the logits' device (as torch's own losses accept only tensors, this is the one
    conversion users expect); jax and NumPy mix freely (jax reads NumPy arrays). Any other mix, or
    torch tensors on two devices, is a TypeError naming both arguments."""
    x, other = _as_array(x), _as_array(other)
    kx, ko = _dispatch.framework_of(x), _dispatch.framework_of(other)
    if kx == "torch" and ko == "numpy":
        import torch
        return x, torch.as_tensor(np.asarray(other), device=x.device)
    if kx == "torch" and ko == "torch" and x.device != other.device:
        raise TypeError(f"`{x_arg}` and `{other_arg}` must be on one device; received `{x_arg}` on {x.device} "
                        f"and `{other_arg}` on {other.device}.")
    if kx != ko and "torch" in (kx, ko):
        raise TypeError(f"`{x_arg}` and `{other_arg}` must come from one framework (NumPy arrays or lists may "
                        f"go with torch `{x_arg}`); received `{x_arg}` of type {type(x).__module__}."
                        f"{type(x).__name__} and `{other_arg}` of type {type(other).__module__}.{type(other).__name__}.")
    return x, other


def _call(loss, x, other, backend, opts):
    if _dispatch.framework_of(x) == "torch":
        name = _dispatch.resolve_torch(backend, x)
        if name != "jax":  # "jax" raises its TypeError below
            from . import _torch_ops
            return _torch_ops.call(loss, x, other, opts, name)
    elif _dispatch.framework_of(x) == "jax" or any(V._is_tracer(v) for v in opts.values()):
        choice = _dispatch.explicit(backend)
        if choice in (None, "jax", "numba", "triton"):  # "triton": the Pallas kernels
            from . import _jax
            return _jax.call(loss, x, other, opts, choice)
    name = _dispatch.resolve(backend, x)
    return _dispatch.get(loss, name)(x, other, opts)


def _float_pair(x, other, x_arg, other_arg):
    """The two same-shape float inputs of an elementwise loss, checked."""
    x, other = _pair(x, other, x_arg, other_arg)
    V.check_float_input(x, x_arg)
    V.check_float_input(other, other_arg)
    V.check_same_shape(x, other, x_arg, other_arg)
    return x, other
