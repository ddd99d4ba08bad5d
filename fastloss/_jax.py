"""The "jax" backend: reshapes, reductions and eager checks around ``fastloss.kernels.jax_xla``.

Takes jax arrays (and tracers, so it works under ``jit``/``vmap``/``grad``) and NumPy arrays. NumPy
input gives NumPy output; float64 NumPy input is computed in float64 (x64 is switched on for the call
only), so automatic fallback to this backend never changes the numbers.
"""
from __future__ import annotations

import contextlib
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from fastloss.kernels import jax_xla as K

from . import _adapter


def unavailable_reason():
    return None  # importing this module (jax) is the only requirement


def _is_jax(x):
    return isinstance(x, jax.Array)


def _check_not_torch(x, arg):
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        raise TypeError(f"the 'jax' backend takes jax or NumPy arrays; `{arg}` is a torch.Tensor. "
                        f"Use backend='numba' (CPU) or 'triton' (CUDA) for torch tensors.")


def _context(x, other):
    """x64 for float64 NumPy input (jax would silently demote it to float32 otherwise)."""
    numpy_in = not _is_jax(x)
    if numpy_in and (np.asarray(x).dtype == np.float64 or np.asarray(other).dtype == np.float64):
        return jax.enable_x64(True), numpy_in
    return contextlib.nullcontext(), numpy_in


def _out(value, numpy_in):
    if not numpy_in:
        return value
    return jax.tree_util.tree_map(np.asarray, value)


def _reduce(values, count, reduction, lead_shape):
    return _adapter.reduce(values.reshape(-1) if reduction != "none" else values, reduction, count, lead_shape,
                           K.accurate_sum, lambda c: jnp.maximum(c, 1))


# Whole-loss functions, jitted so eager calls run as one XLA program (inlined under an outer jit).
@partial(jax.jit, static_argnames=("temperature", "label_smoothing", "ignore_index", "z_loss", "reduction"))
def _sparse(logits, labels, *, temperature, label_smoothing, ignore_index, z_loss, reduction):
    n_cls = logits.shape[-1]
    lead = logits.shape[:-1]
    x2 = logits.reshape(-1, n_cls)
    y1 = labels.reshape(-1)
    rows, _ = K.sparse_cross_entropy(x2, y1, temperature, label_smoothing, ignore_index, z_loss)
    count = jnp.sum(~K._is_ignored(y1, ignore_index))
    return _reduce(rows, count, reduction, lead)


@partial(jax.jit, static_argnames=("temperature", "label_smoothing", "reduction"))
def _dense(logits, targets, *, temperature, label_smoothing, reduction):
    n_cls = logits.shape[-1]
    lead = logits.shape[:-1]
    rows, _ = K.dense_cross_entropy(logits.reshape(-1, n_cls), targets.reshape(-1, n_cls),
                                    temperature, label_smoothing)
    return _reduce(rows, rows.shape[0], reduction, lead)


@partial(jax.jit, static_argnames=("label_smoothing", "reduction"))
def _sigmoid(logits, targets, *, label_smoothing, reduction):
    vals = K.sigmoid_cross_entropy(logits.reshape(-1), targets.reshape(-1), label_smoothing)
    return _reduce(vals, vals.shape[0], reduction, logits.shape)


@partial(jax.jit, static_argnames=("reduction",))
def _mse(predictions, targets, *, reduction):
    vals = K.squared_error(predictions.reshape(-1), targets.reshape(-1))
    return _reduce(vals, vals.shape[0], reduction, predictions.shape)


def _check_labels_eagerly(labels, n_cls, ignore_index):
    """ValueError for an out-of-range label on eager calls; under jit (a tracer) the kernel's NaN
    row is the answer, because a traced value cannot raise."""
    if not isinstance(labels, jax.core.Tracer):
        _adapter.check_label_range(np.asarray(labels), n_cls, ignore_index)


_CORES = {
    "sparse_softmax_cross_entropy": _sparse,
    "softmax_cross_entropy": _dense,
    "sigmoid_cross_entropy": _sigmoid,
    "mean_squared_error": _mse,
}


def _run(name, x, other, opts, with_grad):
    _check_not_torch(x, "logits" if name != "mean_squared_error" else "predictions")
    _check_not_torch(other, "labels/targets")
    if name == "sparse_softmax_cross_entropy":
        _check_labels_eagerly(other, x.shape[-1], opts["ignore_index"])
    ctx, numpy_in = _context(x, other)
    with ctx:
        xj, oj = jnp.asarray(x), jnp.asarray(other)
        core = partial(_CORES[name], **opts)
        if with_grad:
            return _out(jax.value_and_grad(core)(xj, oj), numpy_in)
        return _out(core(xj, oj), numpy_in)


def _loss(name):
    def call(x, other, opts):
        return _run(name, x, other, opts, with_grad=False)
    call.__name__ = name
    return call


LOSSES = _adapter.loss_table(_loss)


def value_and_grad(name, x, other, opts):
    return _run(name, x, other, opts, with_grad=True)
