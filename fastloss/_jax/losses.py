"""The two-input losses on jax arrays (and tracers, and NumPy input routed here).

Each loss is one ``jax.custom_jvp`` function over a fused kernel (``fastloss._jax.providers``) that
returns the values and the gradient together:

- the primal alone (no differentiation) asks for no gradient;
- the JVP rule gets the gradient in the same kernel call and contracts it with the tangents, so
  forward mode (``jvp``, ``jacfwd``) and reverse mode (``grad``: JAX transposes the contraction into
  ``gradient * cotangent``) both work, and ``hessian`` too: the kernels' own derivative is that of
  the XLA formulation. In reverse mode the saved residual is the gradient itself, computed in the
  forward's pass over the logits; with a cotangent of 1 (``grad`` of the loss) XLA drops the
  multiplication, so a training step makes one pass over the logits. No softmax is saved.
- the options (``LossSpec.options``) are array values: jax scalars and tracers work under ``jit``
  without recompiling, and the loss is differentiable with respect to them.

NumPy input gives NumPy output; float64 NumPy input is computed in float64 (x64 is switched on for
the call only), so automatic fallback to this adapter never changes the numbers.
"""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from .. import _reduction as R
from ..kernels import jax_xla as K
from .common import (Call, check_labels_eagerly, check_not_torch, guarded_params, is_zero, numpy_out, option_value,
                     scale_of, x64_context)
from .providers import kernel


def unavailable_reason():
    return None  # importing this module (jax) is the only requirement


def reduce_rows(values, scale, reduction):
    """The loss from a kernel's values: per row for "none", else the accurate total, times the
    mean's 1/count (the option pack's ``scale``, 1 for "sum"). Every loss here (and linear + CE)
    reduces so."""
    if reduction == "none":
        return values
    total = K.accurate_sum(values)
    return total * scale if reduction == "mean" else total


def _contract(g, dv, call):
    """<g, dv> in the accumulation dtype: over the class axis per row for "none", else in full."""
    acc = K.acc_dtype(g)
    prod = g.astype(acc) * dv.astype(acc)
    if call.reduction != "none":
        return jnp.sum(prod)
    return prod if call.spec.row_ndim == 0 else jnp.sum(prod, axis=-1)


def _wide_for_none(call, x, other):
    """16-bit inputs widened to fp32 for reduction="none": the kernel's gradient is that of a
    cotangent of 1 and is scaled by the actual per-element cotangent afterwards, so stored in the
    input's dtype it could overflow float16 where the scaled one does not (a focal loss's target
    gradient reaches 3|x|: 9e4 at x = -3e4), and it would be rounded twice. The kernels widen every
    load to fp32 anyway, so the values are the same; torch keeps such gradients in fp32 likewise."""
    if call.reduction != "none" or x.dtype not in (jnp.bfloat16, jnp.float16):
        return x, other
    wide = other.astype(jnp.float32) if jnp.issubdtype(other.dtype, jnp.floating) else other
    return x.astype(jnp.float32), wide


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _loss(call, x, other, params):
    values, _, _ = kernel(call, x, other, params, False, False)
    return reduce_rows(values, scale_of(params, call.spec), call.reduction)


@partial(_loss.defjvp, symbolic_zeros=True)
def _loss_jvp(call, primals, tangents):
    x, other, params = primals
    dx, d_other, d_params = tangents
    want_x = not is_zero(dx)
    want_other = not is_zero(d_other) and not call.spec.has_labels
    values, gx, go = kernel(call, *_wide_for_none(call, x, other), params, want_x, want_other)
    out = reduce_rows(values, scale_of(params, call.spec), call.reduction)
    tangent = jnp.zeros_like(out)
    if want_x:
        tangent = tangent + _contract(gx, dx, call)
    if want_other:
        tangent = tangent + _contract(go, d_other, call)
    if call.spec.options and not is_zero(d_params):
        # d loss / d option: per-row derivatives (XLA, one more pass, only when an option is
        # being differentiated) weighted like the rows.
        rows = _option_rows(call, x, other, params, d_params.astype(out.dtype))
        tangent = tangent + (rows if call.reduction == "none" else jnp.sum(rows) * scale_of(params, call.spec))
    return out, tangent


def _option_rows(call, x, other, params, d_params):
    """Σ_option d row / d option · tangent, per row: the loss's closed-form option derivatives, or
    forward mode through its XLA formulation (whose rows do not read the scale entry)."""
    spec = call.spec
    option_grads = getattr(K, spec.kernel + "_option_grads", None)
    if option_grads is not None:
        return option_grads(x, other, params, **call.kwargs) @ d_params[:len(spec.options)]
    formulation = getattr(K, spec.kernel)
    return jax.jvp(lambda p: formulation(x, other, p, **call.kwargs, want_x=False, want_other=False)[0],
                   (params,), (d_params,))[1]


def _labelled(spec, other):
    """Whether ``other`` holds integer labels (always, or for the softmax focal loss when not float)."""
    return spec.has_labels or (spec.other == "either" and not jnp.issubdtype(other.dtype, jnp.floating))


@partial(jax.jit, static_argnames=("call",))
def _core(x, other, options, weight=None, *, call):
    """The whole loss, jitted so eager calls run as one XLA program (inlined under an outer jit)."""
    spec = call.spec
    lead = x.shape[:x.ndim - spec.row_ndim]
    labelled = _labelled(spec, other)
    if spec.row_ndim:
        x2 = x.reshape(-1, x.shape[-1])
        o2 = other.reshape(-1) if labelled else other.reshape(-1, x.shape[-1])
    else:
        x2, o2 = x.reshape(-1), other.reshape(-1)
    acc = K.acc_dtype(x)
    # Per-class weights (class weights, the focal loss's per-class α) are not differentiated (as in
    # torch): they enter with stop_gradient.
    weights = None if weight is None else jax.lax.stop_gradient(jnp.asarray(weight, acc).reshape(-1))
    if labelled:
        counted_by = weights if spec.weighted_mean and weight is not None else None
        count = R.mean_count(o2, call.kwargs["ignore_index"], x.shape[-1], counted_by, xp=jnp).astype(acc)
    else:
        count = jnp.asarray(math.prod(lead), acc)
    scale = 1.0 / R.nonzero_or_one(count, jnp) if call.reduction == "mean" else jnp.ones((), acc)
    values = [option_value(v, o, acc) for o, v in zip(spec.options, options)]
    params, poison = guarded_params(values, scale.astype(acc), weights)
    out = _loss(call, x2, o2, params) + poison
    return out.reshape(lead) if call.reduction == "none" else out


def run(spec, x, other, opts, provider, with_grad):
    """The loss of jax (or NumPy) input, or (loss, d loss / d x) with ``with_grad``."""
    check_not_torch(x, spec.args[0])
    check_not_torch(other, spec.args[1])
    if _labelled(spec, other):
        check_labels_eagerly(other, x.shape[-1], opts["ignore_index"])
    statics = tuple((k, opts[k]) for k in spec.statics)
    if spec.class_array:  # whether params carries the (C,) per-class array: static, never read off a length
        statics += (("weighted", opts.get("weight") is not None),)
    call = Call(spec, statics, opts["reduction"], provider)
    options = tuple(opts[k] for k in spec.option_names)
    weight = opts.get("weight")
    ctx, numpy_in = x64_context(x, other)
    with ctx:
        xj, oj = jnp.asarray(x), jnp.asarray(other)
        core = partial(_core, call=call)
        if with_grad:
            return numpy_out(jax.value_and_grad(core)(xj, oj, options, weight), numpy_in)
        return numpy_out(core(xj, oj, options, weight), numpy_in)
