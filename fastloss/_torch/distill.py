"""``distillation_loss`` of torch tensors as a custom op (``torch.ops.fastloss.distillation_loss``),
with autograd, a fake implementation (torch.compile) and a vmap rule, as the two-input losses of
``fastloss._torch.ops``: the forward writes the gradients for an upstream gradient of 1, the
backward rescales them, and a differentiated backward uses ``second_order.distillation``."""
from __future__ import annotations

import torch

from .. import _reduction as R
from .._spec import DISTILLATION
from . import second_order
from .library import LIB, acc_dtype, grad_f32, launchers, rescale

# torch.ops.fastloss.distillation_loss(student, teacher, labels, [T, α, β], ignore_index, divergence,
# reduction, backend, has_labels, want_s, want_t) -> (value, grad_student, grad_teacher). Without
# labels, ``labels`` is an empty int64 tensor (a schema's Tensor? would do, but an always-present
# tensor keeps the vmap rule and the fake simple).
_DISTILL_SCHEMA = ("(Tensor s, Tensor t, Tensor labels, float[] params, int ignore_index, "
                   "str divergence, str reduction, str backend, bool has_labels, bool want_s, bool want_t) "
                   "-> (Tensor, Tensor, Tensor)")


def _distill_opts(params, ignore_index, divergence, reduction):
    return dict(temperature=params[0], alpha=params[1], beta=params[2], divergence=divergence, reduction=reduction,
                ignore_index=R.user_ignore_index(ignore_index))


def _distill_real(s, t, labels, params, ignore_index, divergence, reduction, backend, has_labels, want_s, want_t):
    opts = _distill_opts(params, ignore_index, divergence, reduction)
    value, gs, gt = launchers(backend, s).distillation(s, t, labels if has_labels else None, opts, want_s, want_t,
                                                       grad_dtype="float32" if grad_f32(s, reduction) else None)
    lead = tuple(s.shape[:-1]) if reduction == "none" else ()
    return (value.reshape(lead), gs if gs is not None else s.new_empty(0), gt if gt is not None else t.new_empty(0))


def _distill_fake(s, t, labels, params, ignore_index, divergence, reduction, backend, has_labels, want_s, want_t):
    value = s.new_empty(tuple(s.shape[:-1]) if reduction == "none" else (), dtype=acc_dtype(s))
    gdt = torch.float32 if grad_f32(s, reduction) else None
    return (value, torch.empty_like(s, dtype=gdt or s.dtype) if want_s else s.new_empty(0),
            torch.empty_like(t, dtype=gdt or t.dtype) if want_t else t.new_empty(0))


def _distill_count(s, labels, opts, has_labels, batch_axes=0):
    """The count "mean" divides by, at least 1 (per index of the first ``batch_axes`` axes)."""
    lead = tuple(s.shape[:batch_axes])
    if has_labels:
        count = R.mean_count(labels.reshape(lead + (-1,)), opts["ignore_index"], s.shape[-1], xp=torch, axis=-1)
    else:
        count = torch.full(lead, s[(0,) * batch_axes].numel() // max(s.shape[-1], 1), device=s.device)
    return R.nonzero_or_one(count, torch)


class _Distill(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(s, t, labels, params, ignore_index, divergence, reduction, backend, has_labels, want_s, want_t):
        return _OP(s, t, labels, params, ignore_index, divergence, reduction,
                   backend, has_labels, want_s, want_t)

    @staticmethod
    def setup_context(ctx, inputs, output):
        s, t, labels, params, ignore_index, divergence, reduction, _, has_labels, _, _ = inputs
        ctx.opts = _distill_opts(params, ignore_index, divergence, reduction)
        ctx.has_labels = has_labels
        ctx.save_for_backward(s, t, labels, output[1], output[2])
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g_value, _g1, _g2):
        s, t, labels, gs, gt = ctx.saved_tensors
        opts, want = ctx.opts, ctx.needs_input_grad[:2]
        rest = (None,) * 9
        if g_value is None:
            return (None, None) + rest
        if torch.is_grad_enabled():  # differentiated backward: the exact, differentiable formula
            acc = acc_dtype(s)
            if opts["reduction"] == "none":
                w = g_value.to(acc).unsqueeze(-1)
            elif opts["reduction"] == "sum":
                w = g_value.to(acc)
            else:
                w = g_value.to(acc) / _distill_count(s, labels, opts, ctx.has_labels).to(acc)
            us, ut = second_order.distillation(s, t, labels, opts, ctx.has_labels, w)
            return (us.to(s.dtype) if want[0] else None, ut.to(t.dtype) if want[1] else None) + rest
        out = []
        for grad, ref, needed in zip((gs, gt), (s, t), want):
            out.append(rescale(grad, g_value, opts["reduction"], 1).to(ref.dtype)
                       if needed and grad.shape == ref.shape else None)
        return tuple(out) + rest


def _distill_vmap(info, in_dims, s, t, labels, params, ignore_index, divergence, reduction, backend, has_labels,
                  want_s, want_t):
    size = info.batch_size

    def lift(a, d):
        return a.movedim(d, 0) if d is not None else a.expand((size,) + tuple(a.shape))
    s, t = lift(s, in_dims[0]), lift(t, in_dims[1])
    labels = lift(labels, in_dims[2]) if has_labels else labels
    value, gs, gt = _OP(s, t, labels, params, ignore_index, divergence, "none",
                        backend, has_labels, want_s, want_t)
    if reduction != "none":
        total = value.reshape(size, -1).sum(-1, dtype=torch.float64).to(value.dtype)
        if reduction == "mean":
            opts = _distill_opts(params, ignore_index, divergence, reduction)
            count = _distill_count(s, labels, opts, has_labels, batch_axes=1).to(value.dtype)
            total = total / count
            scale = (1.0 / count).reshape((size,) + (1,) * (s.dim() - 1))
            gs = (gs.to(scale.dtype) * scale).to(gs.dtype) if want_s else gs
            gt = (gt.to(scale.dtype) * scale).to(gt.dtype) if want_t else gt
        value = total
    return (value, gs, gt), (0, 0 if want_s else None, 0 if want_t else None)


LIB.define(DISTILLATION.name + _DISTILL_SCHEMA)
_QUAL = f"fastloss::{DISTILLATION.name}"
torch.library.impl(_QUAL, ("cpu", "cuda"), lib=LIB)(_distill_real)
torch.library.register_fake(_QUAL, _distill_fake, lib=LIB)
torch.library.register_vmap(_QUAL, _distill_vmap, lib=LIB)
_OP = getattr(torch.ops.fastloss, DISTILLATION.name)


def _distill_args(s, t, labels, opts):
    has_labels = labels is not None
    y = labels if has_labels else torch.empty(0, dtype=torch.int64, device=s.device)
    params = [float(opts[k]) for k in ("temperature", "alpha", "beta")]
    return y, params, R.kernel_ignore_index(opts["ignore_index"]), has_labels


def distill_call(s, t, labels, opts, backend):
    """distillation_loss of torch tensors through the custom op, with autograd; the teacher's
    gradient is computed only when the teacher requires it."""
    grad_on = torch.is_grad_enabled()
    y, params, ign, has_labels = _distill_args(s, t, labels, opts)
    value, _, _ = _Distill.apply(s, t, y, params, ign, opts["divergence"], opts["reduction"], backend, has_labels,
                                 bool(grad_on and s.requires_grad), bool(grad_on and t.requires_grad))
    return value


def distill_value_and_grad(s, t, labels, opts, backend):
    y, params, ign, has_labels = _distill_args(s, t, labels, opts)
    value, gs, _ = _OP(s.detach(), t.detach(), y, params, ign, opts["divergence"],
                       opts["reduction"], backend, has_labels, True, False)
    return value, gs
