"""Argument and input validation shared by every backend.

Everything here works on shapes and dtype *names*, so it never imports a framework: a jax array,
a torch tensor and a NumPy array are all described by ``describe(x)``.
"""
from __future__ import annotations

import math
import sys
import numbers

import numpy as np

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("jax", "numba", "triton")


_NAMES = {}  # dtype object -> name: NumPy's dtype.name property costs ~10 us, and a call asks 5 times


def dtype_name(x) -> str:
    """The dtype of ``x`` as a plain name ('float32', 'bfloat16', 'int64', 'bool', ...)."""
    dt = getattr(x, "dtype", None)
    if dt is None:
        return np.asarray(x).dtype.name
    try:
        return _NAMES[dt]
    except (KeyError, TypeError):  # TypeError: an unhashable dtype-like object
        pass
    name = getattr(dt, "name", None)
    if not isinstance(name, str):  # numpy / jax / ml_dtypes have a name; torch.float32 -> float32
        name = str(dt).replace("torch.", "")
    try:
        _NAMES[dt] = name
    except TypeError:
        pass
    return name


def shape_of(x) -> tuple:
    return tuple(int(d) for d in x.shape)


def is_integer_dtype(name: str) -> bool:
    return name.startswith("int") or name.startswith("uint")


def check_float_input(x, arg: str) -> str:
    name = dtype_name(x)
    if name not in FLOAT_DTYPES:
        raise TypeError(
            f"`{arg}` must be a floating-point array of dtype {', '.join(FLOAT_DTYPES)}; "
            f"received dtype {name}."
        )
    return name


def check_labels(labels, logits_shape: tuple) -> None:
    name = dtype_name(labels)
    if not is_integer_dtype(name):
        raise TypeError(
            f"`labels` must have an integer dtype (int32, int64, ...) holding class indices; "
            f"received dtype {name}. For probability targets use softmax_cross_entropy."
        )
    if shape_of(labels) != logits_shape[:-1]:
        raise ValueError(
            f"`labels` must have the shape of `logits` without its last (class) axis: `logits` has "
            f"shape {logits_shape}, so `labels` should have shape {logits_shape[:-1]}; received "
            f"`labels` of shape {shape_of(labels)}."
        )


def check_same_shape(a, b, name_a: str, name_b: str) -> None:
    if shape_of(a) != shape_of(b):
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same shape; received `{name_a}` of shape "
            f"{shape_of(a)} and `{name_b}` of shape {shape_of(b)}."
        )


def check_class_axis(shape: tuple, arg: str = "logits") -> None:
    if len(shape) == 0 or shape[-1] < 1:
        raise ValueError(
            f"`{arg}` must have shape (..., C) with at least one class on the last axis; "
            f"received shape {shape}."
        )


def _is_tracer(value) -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(value, jax.core.Tracer)


def _finite_float(value, arg: str):
    """A Python float from a real number or a 0-d array of any framework (a jax scalar, a NumPy
    scalar); a jax tracer (an option under ``jit``: a schedule, a learnable temperature) is
    returned as it is, to be range-checked inside the program (out of range -> NaN loss)."""
    if _is_tracer(value):
        if tuple(value.shape) != () or not _is_float_or_int(dtype_name(value)):
            raise ValueError(f"`{arg}` must be a real scalar; received a traced array of shape "
                             f"{tuple(value.shape)} and dtype {dtype_name(value)}.")
        return value
    if hasattr(value, "shape") and hasattr(value, "dtype") and tuple(value.shape) == () \
            and _is_float_or_int(dtype_name(value)):
        value = float(value)  # a concrete 0-d array: jnp.float32(2.0), np.float32(2.0), torch.tensor(2.0)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"`{arg}` must be a real number; received {value!r} of type {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{arg}` must be finite; received {value!r}.")
    return value


def _is_float_or_int(name: str) -> bool:
    return name.startswith(("float", "bfloat", "int", "uint"))


def check_temperature(value):
    t = _finite_float(value, "temperature")
    if not _is_tracer(t) and t <= 0.0:
        raise ValueError(f"`temperature` must be a finite number > 0; received {value!r}.")
    return t


def check_label_smoothing(value):
    e = _finite_float(value, "label_smoothing")
    if not _is_tracer(e) and not 0.0 <= e <= 1.0:
        raise ValueError(f"`label_smoothing` must be in [0, 1]; received {value!r}.")
    return e


def check_positive(value, arg: str):
    """A finite number > 0 (Huber's ``delta``); tracers pass through."""
    v = _finite_float(value, arg)
    if not _is_tracer(v) and v <= 0.0:
        raise ValueError(f"`{arg}` must be a finite number > 0; received {value!r}.")
    return v


def check_non_negative(value, arg: str):
    """A finite number >= 0 (the focal loss's ``gamma``); tracers pass through."""
    v = _finite_float(value, arg)
    if not _is_tracer(v) and v < 0.0:
        raise ValueError(f"`{arg}` must be a finite number >= 0; received {value!r}.")
    return v


def check_softcap(value):
    """None, or a finite Python number > 0. The softcap is a static option (it decides which kernel
    code runs), so a jax tracer is a TypeError rather than a value checked inside the program."""
    if value is None:
        return None
    if _is_tracer(value):
        raise TypeError("`softcap` must be None or a Python number > 0 (a static option of the kernels); "
                        "received a traced value.")
    return check_positive(value, "softcap")


def check_class_weight(weight, n_cls: int, arg: str = "weight") -> None:
    """None, or a float array of shape (C,) with finite values (any sign, as torch allows). The
    values are checked where that costs no device round trip: NumPy arrays, CPU tensors and
    concrete jax arrays (CUDA tensors and jax tracers are taken as they are)."""
    if weight is None:
        return
    shape, name = shape_of(weight), dtype_name(weight)
    if shape != (n_cls,) or name not in ("float16", "bfloat16", "float32", "float64"):
        raise ValueError(f"`{arg}` must be a float array of shape ({n_cls},), one value per class; received "
                         f"shape {shape} and dtype {name}.")
    if _is_tracer(weight):
        return
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(weight, torch.Tensor):
        # torch ops, not NumPy: the tensor may be a torch.func wrapper (no storage to view); and no
        # check at all while torch.compile traces (a data-dependent branch would break the graph).
        if weight.device.type != "cpu" or torch.compiler.is_compiling():
            return
        bad_mask = ~torch.isfinite(weight.detach())
        if bool(bad_mask.any()):
            k = int(torch.nonzero(bad_mask)[0, 0])
            raise ValueError(f"`{arg}` must hold finite values; received {float(weight[k])!r} at class {k}.")
        return
    values = np.asarray(weight, dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(f"`{arg}` must hold finite values; received {values[bad][0]!r} at class "
                         f"{int(np.flatnonzero(bad)[0])}.")


def check_bool(value, arg: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{arg}` must be True or False; received {value!r}.")
    return bool(value)


def check_unit_interval(value, arg: str):
    """A weight in [0, 1] (``alpha``, ``beta`` of distillation_loss); tracers pass through."""
    e = _finite_float(value, arg)
    if not _is_tracer(e) and not 0.0 <= e <= 1.0:
        raise ValueError(f"`{arg}` must be in [0, 1]; received {value!r}.")
    return e


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def check_divergence(value) -> str:
    if value not in DIVERGENCES:
        raise ValueError(f"`divergence` must be one of {DIVERGENCES}; received {value!r}.")
    return value


def check_z_loss(value):
    z = _finite_float(value, "z_loss")
    if not _is_tracer(z) and z < 0.0:
        raise ValueError(f"`z_loss` must be a finite number >= 0; received {value!r}.")
    return z


def check_ignore_index(value):
    """An int, or None for "no row is ignored" (Keras' ``ignore_class=None``)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"`ignore_index` must be an integer or None; received {value!r}.")
    return int(value)


def check_chunk_size(value):
    """None (picked from the shapes and free memory) or a positive int of rows per chunk."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`chunk_size` must be None or an integer >= 1 (rows per chunk); received {value!r}.")
    return int(value)


def check_reduction(value) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}; received {value!r}.")
    return value


def check_backend(value, arg: str = "backend"):
    if value is None:
        return None
    if value not in BACKENDS:
        raise ValueError(f"`{arg}` must be None or one of {BACKENDS}; received {value!r}.")
    return value


def label_range_error(bad_label, num_classes: int, ignore_index) -> ValueError:
    allowed = f"class indices in [0, {num_classes})"
    if ignore_index is not None:
        allowed += f" or `ignore_index` ({ignore_index})"
    return ValueError(f"`labels` must be {allowed}; received label {bad_label}.")
