"""Every loss as a torch custom op (``torch.ops.fastloss.<loss>``), for eager, autograd, torch.func
and ``torch.compile(fullgraph=True)``.

One op per loss, with the schema

    (Tensor x, Tensor other, float[] params, int ignore_index, str reduction, str backend,
     bool want_x, bool want_other) -> (Tensor value, Tensor grad_x, Tensor grad_other)

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

from . import _adapter

_ROW = _adapter.ROW_NDIM
_SCHEMA = ("(Tensor x, Tensor other, float[] params, int ignore_index, str reduction, str backend, bool want_x, "
           "bool want_other) -> (Tensor, Tensor, Tensor)")
_LIB = torch.library.Library("fastloss", "DEF")  # noqa: TOR901 - one library object, kept for the process

# params per loss, in order (names of the options dict)
PARAMS = {
    "sparse_softmax_cross_entropy": ("temperature", "label_smoothing", "z_loss"),
    "softmax_cross_entropy": ("temperature", "label_smoothing"),
    "sigmoid_cross_entropy": ("label_smoothing",),
    "mean_squared_error": (),
}


def _opts(name, params, ignore_index, reduction):
    opts = dict(zip(PARAMS[name], params), reduction=reduction)
    if name == "sparse_softmax_cross_entropy":
        opts["ignore_index"] = None if ignore_index == _adapter.NO_IGNORE else ignore_index
    return opts


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _value_shape(name, x, reduction):
    if reduction != "none":
        return ()
    return tuple(x.shape[:-1]) if _ROW[name] else tuple(x.shape)


# ------------------------------------------------------------------------------- forward
_HALF = (torch.float16, torch.bfloat16)


def _grad_f32(x, reduction):
    """16-bit gradients for reduction="none" are kept in float32 until the per-row cotangent scales
    them: the gradient for a cotangent of 1 can overflow float16 (|2 (p - t)| > 65504) where the
    scaled one does not, and rounding twice costs an ulp."""
    return reduction == "none" and x.dtype in _HALF


def _real(name):
    def impl(x, other, params, ignore_index, reduction, backend, want_x, want_other):
        opts = _opts(name, params, ignore_index, reduction)
        if _grad_f32(x, reduction):
            opts["grad_dtype"] = "float32"
        if backend == "triton" or x.device.type != "cpu":
            from . import _triton as adapter
            adapter.check_device(x, other)
        else:
            from . import _numba as adapter
        value, gx, go = adapter.run(name, x, other, opts, want_x, want_other)
        # Outputs of a custom op are new tensors of fixed types: an unwanted gradient is empty.
        return (value.reshape(_value_shape(name, x, reduction)),
                gx if gx is not None else x.new_empty(0), go if go is not None else other.new_empty(0))
    return impl


def _fake(name):
    def impl(x, other, params, ignore_index, reduction, backend, want_x, want_other):
        value = x.new_empty(_value_shape(name, x, reduction), dtype=_acc(x))
        gdt = torch.float32 if _grad_f32(x, reduction) else None
        return (value, torch.empty_like(x, dtype=gdt or x.dtype) if want_x else x.new_empty(0),
                torch.empty_like(other, dtype=gdt or other.dtype) if want_other else other.new_empty(0))
    return impl


# ------------------------------------------------------------------------------ backward
def _weights(name, x, other, opts, g):
    """d total / d value per row (per element), broadcastable to x: the upstream gradient times the
    reduction's scale."""
    acc = _acc(x)
    g = g.to(acc)
    if opts["reduction"] == "none":
        return g.reshape(g.shape + (1,) * _ROW[name])
    if opts["reduction"] == "sum":
        return g
    return g / _mean_count(name, x, other, opts).to(acc)


def _mean_count(name, x, other, opts, batch_axes=0):
    """The count "mean" divides by, at least 1: of the whole input, or per index of its first
    ``batch_axes`` axes (the vmap rule). Non-ignored rows for sparse CE, rows for dense CE,
    elements for the elementwise losses."""
    lead = tuple(x.shape[:batch_axes])
    if name == "sparse_softmax_cross_entropy" and opts["ignore_index"] is not None:
        kept = other != opts["ignore_index"]
        count = kept.reshape(lead + (-1,)).sum(-1)
    else:
        per = x[(0,) * batch_axes].numel() // (max(x.shape[-1], 1) if _ROW[name] else 1)
        count = torch.full(lead, per, device=x.device)
    return count.clamp(min=1)


def _unfused_grads(name, x, other, opts, w):
    """The gradients as differentiable torch expressions (the contract's closed forms), for the
    second order only: correctness over speed. ``w`` is _weights(...)."""
    acc = _acc(x)
    xf = x.to(acc)
    if name == "sparse_softmax_cross_entropy":
        t, eps, zl = opts["temperature"], opts["label_smoothing"], opts["z_loss"]
        ign = opts["ignore_index"]
        n_cls = x.shape[-1]
        keep = torch.ones_like(other, dtype=torch.bool) if ign is None else other != ign
        z = xf / t
        p = torch.softmax(z, dim=-1)
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        onehot = torch.arange(n_cls, device=x.device) == other.unsqueeze(-1)  # no data-dependent shapes (vmap)
        q = onehot.to(acc) * (1 - eps) + eps / n_cls
        g = (p * (1 + 2 * zl * lse) - q) / t * w
        return torch.where(keep.unsqueeze(-1), g, torch.zeros_like(g)), None
    if name == "softmax_cross_entropy":
        t, eps = opts["temperature"], opts["label_smoothing"]
        q = other.to(acc) * (1 - eps) + eps / x.shape[-1]
        z = xf / t
        gx = (torch.softmax(z, -1) * q.sum(-1, keepdim=True) - q) / t * w
        gt = (1 - eps) * (torch.logsumexp(z, -1, keepdim=True) - z) * w
        return gx, gt
    if name == "sigmoid_cross_entropy":
        eps = opts["label_smoothing"]
        tt = other.to(acc) * (1 - eps) + eps / 2
        return (torch.sigmoid(xf) - tt) * w, -(1 - eps) * xf * w
    d = xf - other.to(acc)
    return 2 * d * w, -2 * d * w


class _Fused(torch.autograd.Function):
    """Autograd around the op (an autograd.Function with setup_context, so torch.func transforms
    and Dynamo both take it; the op's vmap rule makes ``generate_vmap_rule`` work)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x, other, name, params, ignore_index, reduction, backend, want_x, want_other):
        return getattr(torch.ops.fastloss, name)(x, other, params, ignore_index, reduction, backend, want_x,
                                                 want_other)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, other, name, params, ignore_index, reduction, _, _, _ = inputs
        ctx.name = name
        ctx.opts = _opts(name, params, ignore_index, reduction)
        ctx.save_for_backward(x, other, output[1], output[2])
        ctx.mark_non_differentiable(output[1], output[2])
        # The gradient outputs have no gradient: without this autograd would fill an (N, C) zeros
        # tensor for each of them on every backward (as long as the kernel itself, measured).
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g_value, _g_gx, _g_go):
        x, other, gx, go = ctx.saved_tensors
        name, opts = ctx.name, ctx.opts
        want = ctx.needs_input_grad[:2]
        rest = (None,) * 7
        if g_value is None:
            return (None, None) + rest
        if torch.is_grad_enabled():  # the backward is differentiated: an exact, differentiable formula
            ux, uo = _unfused_grads(name, x, other, opts, _weights(name, x, other, opts, g_value))
            return ((ux.to(x.dtype) if want[0] else None),
                    (uo.to(other.dtype) if want[1] and uo is not None else None)) + rest
        out = []
        for grad, ref, needed in zip((gx, go), (x, other), want):
            # needed but not computed in the forward: only if requires_grad changed in between
            out.append(_rescale(name, grad, g_value, opts["reduction"]).to(ref.dtype)
                       if needed and grad.shape == ref.shape else None)
        return tuple(out) + rest


def _rescale(name, grad, g, reduction):
    """The fused gradient (for an upstream gradient of 1) times the actual upstream gradient."""
    acc = _acc(grad)
    if reduction == "none":
        w = g.to(acc).reshape(g.shape + (1,) * _ROW[name])
        return (grad.to(acc) * w).to(grad.dtype)
    torch.ops.fastloss.scale_(grad, g)  # in place, and nothing at all for the usual g = 1
    return grad


def _scale_in_place(grad, g):
    """grad *= g for a scalar g, skipped when g is 1 (a loss that is the root of backward): an opaque
    op, so a compiled backward makes the same run-time check instead of a pass over the gradient.
    It mutates only the fused gradient buffer, which nothing else holds."""
    if not (g.dim() == 0 and g.device.type == "cpu" and float(g) == 1.0):
        acc = _acc(grad)
        grad.copy_(grad.to(acc) * g.to(acc))


# --------------------------------------------------------------------------------- vmap
def _vmap(name):
    op = lambda *a: getattr(torch.ops.fastloss, name)(*a)  # noqa: E731 - resolved at call time

    def rule(info, in_dims, x, other, params, ignore_index, reduction, backend, want_x, want_other):
        bx, bo = in_dims[0], in_dims[1]
        size = info.batch_size
        x = x.movedim(bx, 0) if bx is not None else x.expand((size,) + tuple(x.shape))
        other = other.movedim(bo, 0) if bo is not None else other.expand((size,) + tuple(other.shape))
        value, gx, go = op(x, other, params, ignore_index, "none", backend, want_x, want_other)
        if reduction != "none":  # reduce per batch element; the fused gradients get that element's scale
            opts = _opts(name, params, ignore_index, reduction)
            flat = value.reshape(size, -1)
            total = flat.sum(-1, dtype=torch.float64).to(value.dtype)
            if reduction == "mean":
                count = _mean_count(name, x, other, opts, batch_axes=1).to(value.dtype)
                total = total / count
                scale = (1.0 / count).reshape((size,) + (1,) * (x.dim() - 1))
                gx = (gx.to(scale.dtype) * scale).to(gx.dtype) if want_x else gx
                go = (go.to(scale.dtype) * scale.reshape((size,) + (1,) * (other.dim() - 1))).to(go.dtype) \
                    if want_other else go
            value = total
        return (value, gx, go), (0, 0 if want_x else None, 0 if want_other else None)
    return rule


_LIB.define("scale_(Tensor(a!) grad, Tensor g) -> ()")
torch.library.impl("fastloss::scale_", ("cpu", "cuda"), lib=_LIB)(_scale_in_place)
torch.library.register_fake("fastloss::scale_", lambda grad, g: None, lib=_LIB)

for _name in _ROW:
    _LIB.define(_name + _SCHEMA)
    _qual = f"fastloss::{_name}"
    torch.library.impl(_qual, ("cpu", "cuda"), lib=_LIB)(_real(_name))
    torch.library.register_fake(_qual, _fake(_name), lib=_LIB)
    torch.library.register_vmap(_qual, _vmap(_name), lib=_LIB)


def call(name, x, other, opts, backend):
    """The loss of torch tensors through ``torch.ops.fastloss.<name>``; gradients are computed in the
    forward exactly when autograd will ask for them."""
    grad_on = torch.is_grad_enabled()
    want_x = bool(grad_on and x.requires_grad)
    want_other = bool(grad_on and other.requires_grad and other.is_floating_point())
    params = [float(opts[k]) for k in PARAMS[name]]
    ign = _adapter.kernel_ignore_index(opts.get("ignore_index"))
    value, _, _ = _Fused.apply(x, other, name, params, ign, opts["reduction"], backend, want_x, want_other)
    return value
