"""Argument and input validation shared by every backend.

Everything here works on shapes and dtype *names*, so it never imports a framework: a jax array,
a torch tensor and a NumPy array are all described by ``describe(x)``.
"""
from __future__ import annotations

import math
import numbers
import sys

import numpy as np

from ._frameworks import framework_of, is_tracer
from ._spec import DIVERGENCES

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


def _finite_float(value, arg: str):
    """A Python float from a real number or a 0-d array of any framework (a jax scalar, a NumPy
    scalar); a jax tracer (an option under ``jit``: a schedule, a learnable temperature) is
    returned as it is, to be range-checked inside the program (out of range -> NaN loss)."""
    if is_tracer(value):
        if tuple(value.shape) != () or not _is_float_or_int(dtype_name(value)):
            raise ValueError(f"`{arg}` must be a real scalar; received a traced array of shape "
                             f"{tuple(value.shape)} and dtype {dtype_name(value)}.")
        return value
    # Python numbers first: under torch.compile a float that changed between calls is traced as a
    # symbolic float, on which hasattr() is not supported (fullgraph failed); float() of it makes
    # the compiled graph specialise on the value (a recompile per value, as for any constant).
    if not isinstance(value, (float, int)) and hasattr(value, "shape") and hasattr(value, "dtype") \
            and tuple(value.shape) == () and _is_float_or_int(dtype_name(value)):
        value = float(value)  # a concrete 0-d array: jnp.float32(2.0), np.float32(2.0), torch.tensor(2.0)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"`{arg}` must be a real number; received {value!r} of type {type(value).__name__}.")
    value = float(value)
    if not abs(value) < math.inf:  # not math.isfinite: a comparison also guards a symbolic float
        raise ValueError(f"`{arg}` must be finite; received {value!r}.")
    return value


def _is_float_or_int(name: str) -> bool:
    return name.startswith(("float", "bfloat", "int", "uint"))


_RANGE = {  # rule -> (test of a checked Python float, what the error says is allowed)
    "positive": (lambda v: v > 0.0, "a finite number > 0"),
    "non_negative": (lambda v: v >= 0.0, "a finite number >= 0"),
    "unit": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
}


def check_option(value, option):
    """An option value (``_spec.Option``) checked against its rule: a Python float (bool for
    "binary"), or a jax tracer as it is (its range is checked inside the program: NaN loss)."""
    if option.rule == "binary":
        return check_bool(value, option.name)
    v = _finite_float(value, option.name)
    test, allowed = _RANGE[option.rule]
    if not is_tracer(v) and not test(v):
        raise ValueError(f"`{option.name}` must be {allowed}; received {value!r}.")
    return v


def check_softcap(value):
    """None, or a finite Python number > 0. The softcap is a static option (it decides which kernel
    code runs), so a jax tracer is a TypeError rather than a value checked inside the program."""
    if value is None:
        return None
    if is_tracer(value):
        raise TypeError("`softcap` must be None or a Python number > 0 (a static option of the kernels); "
                        "received a traced value.")
    v = _finite_float(value, "softcap")
    if v <= 0.0:
        raise ValueError(f"`softcap` must be a finite number > 0; received {value!r}.")
    return v


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
    if is_tracer(weight):
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


def check_divergence(value) -> str:
    if value not in DIVERGENCES:
        raise ValueError(f"`divergence` must be one of {DIVERGENCES}; received {value!r}.")
    return value


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


def check_scalar_loss(opts, want_grad):
    """value_and_grad differentiates a scalar: "none" is refused there."""
    if want_grad and opts["reduction"] == "none":
        raise ValueError("`reduction` must be 'mean' or 'sum' under value_and_grad (a scalar loss); received 'none'.")


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


# ------------------------------------------------------------------------------ whole calls
def as_array(x):
    """Lists and scalars as NumPy arrays; arrays of any framework pass through untouched."""
    return x if hasattr(x, "shape") and hasattr(x, "dtype") else np.asarray(x)


def pair(x, other, x_arg, other_arg):
    """The two inputs as arrays of one framework. NumPy arrays and lists next to torch logits become
    torch tensors on the logits' device (as torch's own losses accept only tensors, this is the one
    conversion users expect); jax and NumPy mix freely (jax reads NumPy arrays). Any other mix, or
    torch tensors on two devices, is a TypeError naming both arguments."""
    x, other = as_array(x), as_array(other)
    kx, ko = framework_of(x), framework_of(other)
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


def _check_second(spec, x, other, arg):
    """``other`` against ``x`` by what the loss takes there: labels, targets, or either."""
    integer = is_integer_dtype(dtype_name(other))
    if spec.other == "labels" or spec.other == "either" and integer:
        check_labels(other, shape_of(x))
    else:
        check_float_input(other, arg)
        check_same_shape(x, other, spec.args[0], arg)


def _per_class(value):
    return isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) >= 1


def check_options(spec, x, given):
    """The options dict of a call: every option of ``spec`` checked (from ``given``, the call's
    keyword arguments), its statics, its per-class array and the reduction."""
    opts = {}
    n_cls = shape_of(x)[-1] if spec.row_ndim else None
    if spec.class_array == "weight" and given.get("weight") is not None:
        _, weight = pair(x, given["weight"], spec.args[0], "weight")
        check_class_weight(weight, n_cls)
        opts["weight"] = weight
    for option in spec.options:
        value = given[option.name]
        if option.name == spec.class_array and _per_class(value):
            # per-class factors (Keras' list alpha): they ride in the class-weight slot of the kernels
            _, weight = pair(x, value, spec.args[0], option.name)
            check_class_weight(weight, n_cls, arg=option.name)
            opts.update({option.name: 1.0, "weight": weight})
        else:
            opts[option.name] = check_option(value, option)
    for name in spec.statics:
        check = {"ignore_index": check_ignore_index, "softcap": check_softcap, "divergence": check_divergence}[name]
        opts[name] = check(given[name])
    opts["reduction"] = check_reduction(given["reduction"])
    return opts


def validate(spec, x, other, given):
    """(x, other, opts) of a two-input loss call, checked: one framework, float first input, the
    second by ``spec.other``, then the options."""
    x_arg, other_arg = spec.args[:2]
    x, other = pair(x, other, x_arg, other_arg)
    check_float_input(x, x_arg)
    if spec.row_ndim:
        check_class_axis(shape_of(x), x_arg)
    _check_second(spec, x, other, other_arg)
    return x, other, check_options(spec, x, given)


def validate_distillation(spec, s, t, labels, given):
    """(student, teacher, labels | None, opts) of distillation_loss, checked."""
    s, t = pair(s, t, spec.args[0], spec.args[1])
    check_float_input(s, spec.args[0])
    check_float_input(t, spec.args[1])
    check_class_axis(shape_of(s), spec.args[0])
    check_same_shape(s, t, spec.args[0], spec.args[1])
    if labels is not None:
        s, labels = pair(s, labels, spec.args[0], "labels")
        check_labels(labels, shape_of(s))
    return _widened(s, t), t, labels, check_options(spec, s, given)


def cast_like(a, like):
    """``a`` (an array of ``like``'s framework) in ``like``'s dtype."""
    kind = framework_of(a)
    if kind == "torch":
        return a.to(like.dtype)
    if kind == "jax":
        return a.astype(like.dtype)
    return np.asarray(a).astype(np.asarray(like).dtype)


def _widened(s, t):
    """The student in float64 when the teacher is float64 and the student is not, as the framework
    promotes the pair (the loss and its gradient are then computed in float64; autograd, or the
    caller, casts the student's gradient back). A narrower teacher needs nothing: the kernels read it
    in its own dtype and accumulate in fp32, which gives the promoted result without a copy."""
    if dtype_name(t) != "float64" or dtype_name(s) == "float64":
        return s
    kind = framework_of(s)
    if kind == "torch":
        return s.to(t.dtype)
    if kind == "jax" or framework_of(t) == "jax":
        import jax.numpy as jnp
        wide = jnp.result_type(jnp.float64)  # float32 unless x64 is on: then nothing to widen
        return s if wide != jnp.float64 else jnp.asarray(s, wide)
    return np.asarray(s, np.float64)


def validate_linear(spec, hidden, weight, labels, bias, given):
    """(hidden, weight, labels, bias, opts, chunk_size) of linear_cross_entropy, checked."""
    h, w = pair(hidden, weight, "hidden", "weight")
    h, y = pair(h, labels, "hidden", "labels")
    check_float_input(h, "hidden")
    check_float_input(w, "weight")
    hs, ws = shape_of(h), shape_of(w)
    if len(hs) < 1 or len(ws) != 2 or hs[-1] != ws[1] or ws[0] < 1:
        raise ValueError(f"`weight` must have shape (C, H) with C >= 1 for `hidden` of shape (..., H) (as "
                         f"torch.nn.Linear stores it); received `hidden` of shape {hs} and `weight` of shape {ws}.")
    if dtype_name(h) != dtype_name(w):
        raise TypeError(f"`hidden` and `weight` must have one dtype; received {dtype_name(h)} and "
                        f"{dtype_name(w)}.")
    if not is_integer_dtype(dtype_name(y)):
        raise TypeError(f"`labels` must have an integer dtype (int32, int64, ...) holding class indices; "
                        f"received dtype {dtype_name(y)}.")
    if shape_of(y) != hs[:-1]:
        raise ValueError(f"`labels` must have the shape of `hidden` without its last axis, {hs[:-1]}; received "
                         f"shape {shape_of(y)}.")
    if bias is not None:
        _, bias = pair(h, bias, "hidden", "bias")
        check_float_input(bias, "bias")
        if shape_of(bias) != ws[:1]:
            raise ValueError(f"`bias` must have shape (C,) = {ws[:1]}; received shape {shape_of(bias)}.")
    return h, w, y, bias, check_options(spec, w, given), check_chunk_size(given["chunk_size"])
