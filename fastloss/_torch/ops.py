"""Every loss as a torch custom op (``torch.ops.fastloss.<loss>``), for eager, autograd, torch.func
and ``torch.compile(fullgraph=True)``.

One op per loss, with the schema

    (Tensor x, Tensor other, float[] params, int ignore_index, str reduction, str backend,
     bool want_x, bool want_other, Tensor? weight=None) -> (Tensor value, Tensor grad_x, Tensor grad_other)

(``weight``: class weights or per-class factors, not differentiated, as in torch.) The ops are made
from the loss specs (``fastloss._spec.PAIR_SPECS``): ``params`` are the spec's options in order, then
its float statics (the softcap, 0.0 for none).

- The real implementation runs the fused kernel: Numba for CPU tensors (or Triton's interpreter
  when ``backend="triton"``), Triton for CUDA tensors. The forward writes the gradients already
  scaled for the reduction (an upstream gradient of 1); an unwanted gradient is an empty tensor.
- The fake implementation gives shapes and dtypes, so Dynamo and AOTAutograd trace the op without
  running, or importing, Numba or Triton.
- Autograd (``_Fused``, an autograd.Function around the op): backward rescales the fused gradient
  by the upstream gradient. When the backward itself is being differentiated (``create_graph=True``,
  ``torch.func`` nesting, hessians), it computes the same gradient with a differentiable unfused
  formula instead, so second derivatives are exact.
- The op's vmap rule runs the batch as more rows and reduces per batch element.

``want_x``/``want_other`` are decided by the caller from ``requires_grad`` and the grad mode, so
``torch.no_grad`` computes no gradient.
"""
from __future__ import annotations

import torch
from torch._C._functorch import unwrap_if_dead

from .. import _reduction as R
from .._spec import BY_NAME, PAIR_SPECS
from . import second_order
from .library import LIB, acc_dtype, grad_f32, launchers, plain_eager, rescale

_SCHEMA = ("(Tensor x, Tensor other, float[] params, int ignore_index, str reduction, str backend, bool want_x, "
           "bool want_other, Tensor? weight=None) -> (Tensor, Tensor, Tensor)")


def _param_names(spec):
    """The op's float params: the spec's options in kernel order, then the softcap (0.0: none)."""
    return _PARAM_NAMES[spec.name]


# Built once: a call asks for them three times (the call, the op, the autograd context).
_PARAM_NAMES = {s.name: s.option_names + tuple(n for n in s.statics if n == "softcap") for s in PAIR_SPECS}


def _opts(spec, params, ignore_index, reduction, weight=None):
    opts = dict(zip(_param_names(spec), params), reduction=reduction)
    if "ignore_index" in spec.statics:
        opts["ignore_index"] = R.user_ignore_index(ignore_index)
    if "softcap" in spec.statics:
        opts["softcap"] = opts["softcap"] or None
    if weight is not None:
        opts["weight"] = weight
    return opts


def _value_shape(spec, x, reduction):
    if reduction != "none":
        return ()
    return tuple(x.shape[:-1]) if spec.row_ndim else tuple(x.shape)


# ------------------------------------------------------------------------------- forward
def _real(spec):
    def impl(x, other, params, ignore_index, reduction, backend, want_x, want_other, weight=None):
        opts = _opts(spec, params, ignore_index, reduction, weight)
        kernel = getattr(launchers(backend, x), spec.kernel)
        value, gx, go = kernel(x, other, opts, want_x, want_other,
                               grad_dtype="float32" if grad_f32(x, reduction) else None)
        # Outputs of a custom op are new tensors of fixed types: an unwanted gradient is empty.
        return (value.reshape(_value_shape(spec, x, reduction)),
                gx if gx is not None else x.new_empty(0), go if go is not None else other.new_empty(0))
    return impl


def _fake(spec):
    def impl(x, other, params, ignore_index, reduction, backend, want_x, want_other, weight=None):
        value = x.new_empty(_value_shape(spec, x, reduction), dtype=acc_dtype(x))
        gdt = torch.float32 if grad_f32(x, reduction) else None
        return (value, torch.empty_like(x, dtype=gdt or x.dtype) if want_x else x.new_empty(0),
                torch.empty_like(other, dtype=gdt or other.dtype) if want_other else other.new_empty(0))
    return impl


# ------------------------------------------------------------------------------ backward
def _weights(spec, x, other, opts, g):
    """d total / d value per row (per element), broadcastable to x: the upstream gradient times the
    reduction's scale."""
    acc = acc_dtype(x)
    g = g.to(acc)
    if opts["reduction"] == "none":
        return g.reshape(g.shape + (1,) * spec.row_ndim)
    if opts["reduction"] == "sum":
        return g
    return g / _mean_count(spec, x, other, opts).to(acc)


def _mean_count(spec, x, other, opts, batch_axes=0):
    """The count "mean" divides by, at least 1: of the whole input, or per index of its first
    ``batch_axes`` axes (the vmap rule)."""
    lead = tuple(x.shape[:batch_axes])
    if spec.has_labels or spec.other == "either" and not other.is_floating_point():
        weight = opts.get("weight") if spec.weighted_mean else None
        weight = None if weight is None else weight.to(acc_dtype(x))
        count = R.mean_count(other.reshape(lead + (-1,)), opts["ignore_index"], x.shape[-1], weight, xp=torch,
                             axis=-1)
    else:
        per = x[(0,) * batch_axes].numel() // (max(x.shape[-1], 1) if spec.row_ndim else 1)
        count = torch.full(lead, per, device=x.device)
    return R.nonzero_or_one(count, torch)


class _Fused(torch.autograd.Function):
    """Autograd around the op (an autograd.Function with setup_context, so torch.func transforms
    and Dynamo both take it; the op's vmap rule makes ``generate_vmap_rule`` work)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x, other, name, params, ignore_index, reduction, backend, want_x, want_other, weight):
        if plain_eager(x, other, weight):  # the dispatcher would only route to _IMPLS[name] (~20 us)
            return _IMPLS[name](x, other, params, ignore_index, reduction, backend, want_x, want_other, weight)
        return getattr(torch.ops.fastloss, name)(x, other, params, ignore_index, reduction, backend, want_x,
                                                 want_other, weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, other, name, params, ignore_index, reduction, _, _, _, weight = inputs
        ctx.spec = BY_NAME[name]
        ctx.opts = _opts(ctx.spec, params, ignore_index, reduction, weight)
        ctx.save_for_backward(x, other, output[1], output[2])
        ctx.mark_non_differentiable(output[1], output[2])
        # The gradient outputs have no gradient: without this autograd would fill an (N, C) zeros
        # tensor for each of them on every backward (as long as the kernel itself, measured).
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g_value, _g_gx, _g_go):
        x, other, gx, go = ctx.saved_tensors
        spec, opts = ctx.spec, ctx.opts
        want = ctx.needs_input_grad[:2]
        rest = (None,) * 8
        if g_value is None:
            return (None, None) + rest
        if torch.is_grad_enabled():  # the backward is differentiated: an exact, differentiable formula
            ux, uo = getattr(second_order, spec.kernel)(x, other, opts, _weights(spec, x, other, opts, g_value))
            return ((ux.to(x.dtype) if want[0] else None),
                    (uo.to(other.dtype) if want[1] and uo is not None else None)) + rest
        out = []
        for grad, ref, needed in zip((gx, go), (x, other), want):
            # needed but not computed in the forward: only if requires_grad changed in between
            out.append(rescale(grad, g_value, opts["reduction"], spec.row_ndim).to(ref.dtype)
                       if needed and grad.shape == ref.shape else None)
        return tuple(out) + rest


# --------------------------------------------------------------------------------- vmap
def _vmap(spec):
    op = lambda *a: getattr(torch.ops.fastloss, spec.name)(*a)  # noqa: E731 - resolved at call time

    def rule(info, in_dims, x, other, params, ignore_index, reduction, backend, want_x, want_other, weight=None):
        bx, bo = in_dims[0], in_dims[1]
        if len(in_dims) > 8 and in_dims[8] is not None:
            raise ValueError("vmap over `weight` is not supported: class weights are one (C,) tensor for the batch.")
        size = info.batch_size
        x = x.movedim(bx, 0) if bx is not None else x.expand((size,) + tuple(x.shape))
        other = other.movedim(bo, 0) if bo is not None else other.expand((size,) + tuple(other.shape))
        value, gx, go = op(x, other, params, ignore_index, "none", backend, want_x, want_other, weight)
        if reduction != "none":  # reduce per batch element; the fused gradients get that element's scale
            opts = _opts(spec, params, ignore_index, reduction, weight)
            flat = value.reshape(size, -1)
            total = flat.sum(-1, dtype=torch.float64).to(value.dtype)
            if reduction == "mean":
                count = _mean_count(spec, x, other, opts, batch_axes=1).to(value.dtype)
                total = total / count
                scale = (1.0 / count).reshape((size,) + (1,) * (x.dim() - 1))
                gx = (gx.to(scale.dtype) * scale).to(gx.dtype) if want_x else gx
                go = (go.to(scale.dtype) * scale.reshape((size,) + (1,) * (other.dim() - 1))).to(go.dtype) \
                    if want_other else go
            value = total
        return (value, gx, go), (0, 0 if want_x else None, 0 if want_other else None)
    return rule


_IMPLS = {s.name: _real(s) for s in PAIR_SPECS}
for _spec in PAIR_SPECS:
    LIB.define(_spec.name + _SCHEMA)
    _qual = f"fastloss::{_spec.name}"
    torch.library.impl(_qual, ("cpu", "cuda"), lib=LIB)(_IMPLS[_spec.name])
    torch.library.register_fake(_qual, _fake(_spec), lib=LIB)
    torch.library.register_vmap(_qual, _vmap(_spec), lib=LIB)


def call(spec, x, other, opts, backend):
    """The loss of torch tensors through ``torch.ops.fastloss.<loss>``; gradients are computed in the
    forward exactly when autograd will ask for them."""
    grad_on = torch.is_grad_enabled()
    want_x = bool(grad_on and x.requires_grad)
    want_other = bool(grad_on and other.requires_grad and other.is_floating_point())
    params = [float(opts.get(k) or 0.0) for k in _param_names(spec)]  # softcap None -> 0.0
    ign = R.kernel_ignore_index(opts.get("ignore_index"))
    weight = opts.get("weight")
    if weight is not None:
        weight = weight.detach().to(device=x.device, dtype=acc_dtype(x)).contiguous()
    # Function.apply binds its arguments with inspect.signature on every call (~50 us here), which
    # only matters for keyword arguments and torch.func; plain eager calls go straight to the C entry
    # (after the one other thing apply does outside transforms: unwrap tensors that escaped one).
    apply = _Fused.apply
    if plain_eager(x, other, weight):
        apply, x, other = _APPLY, unwrap_if_dead(x), unwrap_if_dead(other)
    value, _, _ = apply(x, other, spec.name, params, ign, opts["reduction"], backend, want_x, want_other, weight)
    return value


_APPLY = super(torch.autograd.Function, _Fused).apply  # torch._C._FunctionBase.apply, bound to _Fused


def value_and_grad(spec, x, other, opts, backend):
    """(loss, d loss / d x) from one fused kernel call, without autograd."""
    value, gx, _ = getattr(launchers(backend, x), spec.kernel)(x.detach(), other.detach(), opts, True, False)
    return value, gx
