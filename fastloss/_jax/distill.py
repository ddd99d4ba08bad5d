"""``distillation_loss`` on jax arrays: one ``jax.custom_jvp`` function over the fused kernel (the
Numba kernel through the XLA FFI on CPU, the XLA formulation elsewhere), as the two-input losses of
``fastloss._jax.losses``: the gradients come from the forward's kernel call, the option derivatives
(T, α, β) by forward mode through the XLA formulation."""
from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .. import _reduction as R
from .._spec import DISTILLATION
from ..kernels import jax_xla as K
from .common import (check_labels_eagerly, check_not_torch, guarded_params, is_zero, numpy_out, option_value, scale_of,
                     x64_context)
from .losses import reduce_rows


class DistillCall(NamedTuple):
    """The static part of a call (a jit static argument; hashable). The traced options travel in
    ``params`` (``jax_xla.pack_params``: T, α, β and the scale)."""
    divergence: str
    ignore_index: object
    has_labels: bool
    reduction: str
    provider: str


def _distill_xla(spec, s, t, labels, params, want_s, want_t):
    return K.distillation(s, t, labels, params, spec.divergence, spec.ignore_index, spec.has_labels, want_s=want_s,
                          want_t=want_t)


@partial(jax.custom_jvp, nondiff_argnums=(0, 5, 6))
def _distill_numba(spec, s, t, labels, params, want_s, want_t):
    from . import ffi
    return ffi.distillation(s, t, labels, params, spec.divergence, spec.ignore_index, spec.has_labels,
                            want_s=want_s, want_t=want_t)


@_distill_numba.defjvp
def _distill_numba_jvp(spec, want_s, want_t, primals, tangents):
    # Second order: the XLA formulation's derivative (the same math).
    return jax.jvp(lambda a, b, c, d: _distill_xla(spec, a, b, c, d, want_s, want_t), primals, tangents)


def _distill_kernel(spec, s, t, labels, params, want_s, want_t):
    provider = spec.provider
    if provider in ("xla", "auto-gpu"):  # no Pallas distillation kernel (yet): XLA off the CPU
        return _distill_xla(spec, s, t, labels, params, want_s, want_t)
    if provider == "numba":
        return _distill_numba(spec, s, t, labels, params, want_s, want_t)
    return jax.lax.platform_dependent(
        s, t, labels, params,
        cpu=lambda a, b, c, d: _distill_numba(spec, a, b, c, d, want_s, want_t),
        default=lambda a, b, c, d: _distill_xla(spec, a, b, c, d, want_s, want_t))


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _distill_loss(spec, s, t, labels, params):
    values, _, _ = _distill_kernel(spec, s, t, labels, params, False, False)
    return reduce_rows(values, scale_of(params, DISTILLATION), spec.reduction)


@partial(_distill_loss.defjvp, symbolic_zeros=True)
def _distill_loss_jvp(spec, primals, tangents):
    s, t, labels, params = primals
    ds, dt, _, d_params = tangents
    want_s, want_t = not is_zero(ds), not is_zero(dt)
    values, gs, gt = _distill_kernel(spec, s, t, labels, params, want_s, want_t)
    reduction = spec.reduction
    out = reduce_rows(values, scale_of(params, DISTILLATION), reduction)
    tangent = jnp.zeros_like(out)
    for g, dv in ((gs, ds), (gt, dt)):
        if g is not None:
            prod = g.astype(out.dtype) * dv.astype(out.dtype)
            tangent = tangent + (jnp.sum(prod, axis=-1) if reduction == "none" else jnp.sum(prod))
    if not is_zero(d_params):
        # d loss / d (T, α, β): forward mode through the XLA formulation's rows (one more pass, only
        # when an option is being differentiated). The rows do not depend on the scale entry.
        rows = jax.jvp(lambda p: _distill_xla(spec, s, t, labels, p, False, False)[0], (params,), (d_params,))[1]
        tangent = tangent + (rows if reduction == "none" else jnp.sum(rows) * (scale_of(params, DISTILLATION) if reduction == "mean"
                                                                               else 1.0))
    return out, tangent


@partial(jax.jit, static_argnames=("spec",))
def _distill_core(s, t, labels, options, *, spec):
    ignore_index, has_labels, reduction = spec.ignore_index, spec.has_labels, spec.reduction
    lead = s.shape[:-1]
    c = s.shape[-1]
    s2, t2 = s.reshape(-1, c), t.reshape(-1, c)
    y = labels.reshape(-1) if has_labels else jnp.zeros((s2.shape[0],), jnp.int32)
    acc = K.acc_dtype(s)
    count = R.mean_count(y, ignore_index, c, xp=jnp) if has_labels else math.prod(lead)
    scale = 1.0 / R.nonzero_or_one(jnp.asarray(count, acc), jnp) if reduction == "mean" else jnp.ones((), acc)
    values = [option_value(v, o, acc) for o, v in zip(DISTILLATION.options, options)]
    params, poison = guarded_params(values, scale)
    out = _distill_loss(spec, s2, t2, y, params) + poison
    return out.reshape(lead) if reduction == "none" else out


def run(s, t, labels, opts, provider, want_s):
    """distillation_loss of jax (or NumPy) input: the loss, or with ``want_s`` (loss, d loss / d
    student) (``jax.value_and_grad``)."""
    check_not_torch(s, "student_logits")
    check_not_torch(t, "teacher_logits")
    has_labels = labels is not None
    if has_labels:
        check_not_torch(labels, "labels")
        check_labels_eagerly(labels, s.shape[-1], opts["ignore_index"])
    spec = DistillCall(opts["divergence"], opts["ignore_index"], has_labels, opts["reduction"], provider)
    options = tuple(opts[k] for k in DISTILLATION.option_names)
    ctx, numpy_in = x64_context(s, t)
    with ctx:
        sj, tj = jnp.asarray(s), jnp.asarray(t)
        yj = jnp.asarray(labels) if has_labels else jnp.zeros((), jnp.int32)
        core = partial(_distill_core, spec=spec)
        if want_s:
            return numpy_out(jax.value_and_grad(core)(sj, tj, yj, options), numpy_in)
        return numpy_out(core(sj, tj, yj, options), numpy_in)
