"""What the JAX adapter's modules share: the static description of a call, the options as traced
values, NumPy in and out, and the shard_map typing of results the type system cannot derive."""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from .._frameworks import is_torch
from .._reduction import check_label_range
from ..kernels import jax_xla as K


class Call(NamedTuple):
    """The static part of a call (a jit static argument; hashable): the loss, its static options as
    (name, value) pairs, the reduction, and the provider of its kernel ("auto", "xla", "numba",
    "pallas", or "auto-gpu": automatic where Numba cannot run inside XLA)."""
    spec: object
    statics: tuple
    reduction: str
    provider: str

    @property
    def kwargs(self):
        return dict(self.statics)


def check_not_torch(x, arg):
    if is_torch(x):
        raise TypeError(f"the 'jax' backend takes jax or NumPy arrays; `{arg}` is a torch.Tensor. "
                        f"Use backend='numba' (CPU) or 'triton' (CUDA) for torch tensors.")


def x64_context(*arrays):
    """(context, numpy_in): x64 for float64 NumPy input (jax would silently demote it to float32)."""
    numpy_in = not isinstance(arrays[0], jax.Array)
    if numpy_in and any(a is not None and np.asarray(a).dtype == np.float64 for a in arrays):
        return jax.enable_x64(True), numpy_in
    return contextlib.nullcontext(), numpy_in


def numpy_out(value, numpy_in):
    """NumPy results for NumPy input."""
    if not numpy_in:
        return value
    return jax.tree_util.tree_map(np.asarray, value)


_VALID = {  # Option.rule -> whether a value is in range (a traced value cannot raise)
    "positive": lambda v: (v > 0) & jnp.isfinite(v),
    "non_negative": lambda v: (v >= 0) & jnp.isfinite(v),
    "unit": lambda v: (v >= 0) & (v <= 1),
    "binary": lambda v: (v == 0) | (v == 1),
}


def option_value(value, option, acc):
    """An option as an array in the accumulation dtype. A traced value outside its range makes the
    loss NaN (as a traced out-of-range label does); Python and concrete values were checked eagerly
    already, so for them the select is a no-op."""
    v = jnp.asarray(value, dtype=acc)
    return jnp.where(_VALID[option.rule](v), v, jnp.nan)


def guarded_params(values, scale, weights=None):
    """(params, poison): the option pack (``jax_xla.pack_params``) of a call whose options are
    ``values`` (from ``option_value``: NaN when out of range), and what the caller adds to its loss.
    When an option is NaN the whole call is invalid: the pack's scale is NaN (it multiplies every
    kernel's gradient and the mean) and so is ``poison`` (else 0), for "sum" and "none". Per-option NaN propagation is not enough: an option a call does not use (the
    focal loss's α without class balancing, the distillation β of a KL) never reaches the
    arithmetic, and Huber's clip selects pass d through a NaN δ (0.5 x MSE). ``poison`` is added, not
    selected, so that the gradient stays the (NaN) kernel gradient rather than a select's zero."""
    zero = jnp.zeros((), scale.dtype)
    if values:
        bad = jnp.any(jnp.isnan(jnp.stack(values)))
        nan = jnp.full((), jnp.nan, scale.dtype)
        scale, zero = jnp.where(bad, nan, scale), jnp.where(bad, nan, zero)
    return K.pack_params(values, scale, weights), zero


def scale_of(params, spec):
    """The scale (d total / d row) in ``spec``'s option pack."""
    return K.unpack_params(params, len(spec.options)).scale


def is_zero(t):
    return type(t) is SymbolicZero


def varying_like(out, args):
    """``out`` declared to vary over every ``shard_map`` mesh axis that one of ``args`` varies over
    (a no-op outside ``shard_map``): for results the type system cannot derive (an FFI call's
    outputs, a scan carry that starts from zeros)."""
    axes = frozenset().union(*(jax.typeof(a).manual_axis_type.varying for a in args))
    missing = tuple(sorted(axes - jax.typeof(out).manual_axis_type.varying))
    return jax.lax.pcast(out, missing, to="varying") if missing else out


def check_labels_eagerly(labels, n_cls, ignore_index):
    """ValueError for an out-of-range label on eager calls; under jit (a tracer) the kernel's NaN
    row is the answer, because a traced value cannot raise."""
    if not isinstance(labels, jax.core.Tracer):
        check_label_range(np.asarray(labels), n_cls, ignore_index)
