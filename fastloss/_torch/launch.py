"""The Triton launchers: torch tensors on ``fastloss.kernels.triton_gpu``, one per kernel (named as
``LossSpec.kernel``).

CUDA tensors run on the GPU. CPU tensors run through Triton's interpreter when TRITON_INTERPRET=1 is
set (how CI proves the kernels without a GPU); otherwise this backend says why it cannot run.
"""
from __future__ import annotations

import os

import torch

from .. import _reduction as R

try:  # import errors surface through unavailable_reason()
    import triton

    from ..kernels import triton_gpu as K
    from ..kernels.triton_gpu import params as P
except ImportError as _exc:  # pragma: no cover - exercised where triton is absent
    triton = None
    _IMPORT_ERROR = _exc
else:
    _IMPORT_ERROR = None


def _interpret():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason():
    if _IMPORT_ERROR is not None:
        return f"triton is not importable: {_IMPORT_ERROR}"
    if torch.cuda.is_available() or _interpret():
        return None
    return ("no CUDA device is visible and TRITON_INTERPRET=1 is not set (set it before triton is first "
            "imported to run the Triton kernels on CPU tensors through the interpreter)")


def check_interpreter():
    """CPU tensors run through Triton's interpreter, which must have been asked for."""
    if not _interpret():
        raise RuntimeError("the 'triton' backend runs CPU tensors only under TRITON_INTERPRET=1; "
                           "move the tensors to CUDA or use backend='numba'.")


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _scale(reduction, count, dtype):
    """d total / d row: a number, or a 0-d device tensor for a device-side count (no host sync)."""
    if not isinstance(count, torch.Tensor):
        return R.mean_scale(reduction, count)
    return 1.0 / _at_least_one(count).to(dtype) if reduction == "mean" else 1.0


def _params(pack, device, dtype):
    """A kernel's option pack (``triton_gpu.params``) as its PARAMS vector: the fields in order,
    in the accumulation dtype on the device. Numbers go in one host-to-device copy; 0-d device
    tensors (a scale from a device-side count, Σ w) are copied in on the device."""
    values = list(pack)
    numbers = [0.0 if isinstance(v, torch.Tensor) else float(v) for v in values]
    out = torch.tensor(numbers, device=device, dtype=dtype)
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            out[i] = v
    return out


def _grad_dtype(grad_dtype, like):
    """The gradient's storage dtype: the input's, or ``grad_dtype`` (float32) when the caller asks
    (fastloss._torch.ops does for 16-bit inputs with reduction="none", whose gradients it rescales
    per row afterwards)."""
    return getattr(torch, grad_dtype) if grad_dtype else like.dtype


def _at_least_one(count):
    # the count, 1 where it is 0, on the device for a device count (no host sync)
    return R.nonzero_or_one(count, torch if isinstance(count, torch.Tensor) else None)


def _reduce(values, reduction, count, lead):
    value = R.reduce(values, reduction, count, lead, lambda v: v.sum(dtype=torch.float64), _at_least_one)
    return value if reduction == "none" else value.to(values.dtype)


def sparse_cross_entropy(x, labels, opts, want_x, want_other, *, grad_dtype=None, grad_scale=None, in_place=False,
                         labels_checked=False):
    """Sparse softmax CE, one launch. ``grad_scale``: d total / d row set by the caller (a chunk of a
    larger "mean"); ``in_place``: the gradient overwrites ``x``; ``labels_checked``: the caller
    checked the label range once already (no host sync here)."""
    n_cls = x.shape[-1]
    lead = tuple(x.shape[:-1])
    x2 = x.detach().reshape(-1, n_cls)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if in_place and (x2.data_ptr() != x.data_ptr() or not x.is_contiguous()):
        raise ValueError("`logits` must be contiguous for the in-place variant (its memory receives the "
                         f"gradient); received strides {tuple(x.stride())}.")
    y = labels.reshape(-1)
    n = x2.shape[0]
    ign = R.kernel_ignore_index(opts["ignore_index"])
    if n and not labels_checked:  # eager contract: a clear error (one host sync, as torch's own)
        R.check_label_range(y, n_cls, opts["ignore_index"])
    acc = _acc_dtype(x)
    loss = torch.empty(n, device=x.device, dtype=acc)
    lse = torch.empty(n, device=x.device, dtype=acc)
    # In place: pass 2 of each row reads a block of logits, then overwrites it with its gradient
    # (the label's logit is read in pass 1), so the (N, C) gradient costs no new memory.
    g = x2 if (in_place and want_x) else torch.empty_like(x2, dtype=_grad_dtype(grad_dtype, x2)) if want_x else x2[:1]
    cap = opts.get("softcap") or 0.0
    weight = opts.get("weight")
    if weight is None:
        count, w, w_sum = R.mean_count(y, opts["ignore_index"], n_cls, xp=torch), loss[:1], float(n_cls)
    else:
        # "mean" divides by the counted rows' label weights (as torch); Σ w for the smoothed term.
        w = weight.detach().to(device=x.device, dtype=acc).reshape(-1).contiguous()
        count = _at_least_one(R.mean_count(y, opts["ignore_index"], n_cls, w, xp=torch))
        w_sum = w.sum()
    # grad_scale: a chunk of a larger "mean" (the linear head) sets d total / d row itself.
    scale = grad_scale if grad_scale is not None else _scale(opts["reduction"], count, acc)
    params = _params(P.SparseParams(inv_t=1.0 / opts["temperature"], label_smoothing=opts["label_smoothing"],
                                    z_loss=opts["z_loss"], softcap=cap, weight_sum=w_sum, scale=scale), x.device, acc)
    if n:
        block = K.row_block(n_cls, x.device.type == "cpu", x.dtype)
        K.sparse_ce_kernel[(n,)](
            x2, x2.stride(0), y, loss, lse, g, g.stride(0), params, w, n_cls, ign, BLOCK=block,
            HAS_SMOOTH=opts["label_smoothing"] != 0.0, HAS_ZLOSS=opts["z_loss"] != 0.0, HAS_CAP=cap != 0.0,
            HAS_WEIGHT=weight is not None, WANT_GRAD=want_x, ACC_F64=acc == torch.float64,
            num_warps=K.num_warps(block))
    value = _reduce(loss, opts["reduction"], count, lead)
    return value, (g.reshape(x.shape) if want_x else None), None


def softmax_cross_entropy(x, t, opts, want_x, want_other, *, grad_dtype=None):
    n_cls = x.shape[-1]
    x2 = x.detach().reshape(-1, n_cls).contiguous()
    t2 = t.detach().reshape(-1, n_cls).contiguous()
    n = x2.shape[0]
    acc = _acc_dtype(x)
    loss = torch.empty(n, device=x.device, dtype=acc)
    lse = torch.empty(n, device=x.device, dtype=acc)
    gx = torch.empty_like(x2, dtype=_grad_dtype(grad_dtype, x2)) if want_x else x2[:1]
    gt = torch.empty_like(t2, dtype=_grad_dtype(grad_dtype, t2)) if want_other else t2[:1]
    params = _params(P.DenseParams(inv_t=1.0 / opts["temperature"], label_smoothing=opts["label_smoothing"],
                                   scale=_scale(opts["reduction"], n, acc)), x.device, acc)
    if n:
        block = K.row_block(n_cls, x.device.type == "cpu", x.dtype)
        K.dense_ce_kernel[(n,)](
            x2, x2.stride(0), t2, t2.stride(0), loss, lse, gx, gx.stride(0), gt, gt.stride(0), params, n_cls,
            BLOCK=block, WANT_GX=want_x, WANT_GT=want_other,
            ACC_F64=acc == torch.float64, num_warps=K.num_warps(block))
    value = _reduce(loss, opts["reduction"], n, tuple(x.shape[:-1]))
    return value, (gx.reshape(x.shape) if want_x else None), (gt.reshape(t.shape) if want_other else None)


def _elementwise(kernel, pack):
    def run(x, t, opts, want_x, want_other, *, grad_dtype=None):
        xf = x.detach().reshape(-1).contiguous()
        tf = t.detach().reshape(-1).contiguous()
        n = xf.shape[0]
        acc = _acc_dtype(x)
        want_out = opts["reduction"] == "none"
        out = torch.empty(n if want_out else 1, device=x.device, dtype=acc)
        n_prog = triton.cdiv(n, K.elem_block())
        partial = torch.zeros(max(n_prog, 1), device=x.device, dtype=acc)
        gx = torch.empty_like(xf, dtype=_grad_dtype(grad_dtype, xf)) if want_x else xf[:1]
        gt = torch.empty_like(tf, dtype=_grad_dtype(grad_dtype, tf)) if want_other else tf[:1]
        params = _params(pack(opts, _scale(opts["reduction"], n, acc)), x.device, acc)
        if n:
            kernel[(n_prog,)](xf, tf, out, partial, gx, gt, params, n, BLOCK=K.elem_block(),
                              WANT_OUT=want_out, ACC_F64=acc == torch.float64, num_warps=8,
                              **{kernel.arg_names[-3]: want_x, kernel.arg_names[-2]: want_other})
        # "none": the per-element values; otherwise the programs' partial sums carry the total.
        value = _reduce(out if want_out else partial, opts["reduction"], n, tuple(x.shape))
        return value, (gx.reshape(x.shape) if want_x else None), (gt.reshape(t.shape) if want_other else None)
    return run


def softmax_focal(x, other, opts, want_x, want_other, *, grad_dtype=None):
    """Labels (ignore_index applies) or dense targets: one launch of the focal kernel."""
    n_cls = x.shape[-1]
    x2 = x.detach().reshape(-1, n_cls).contiguous()
    n = x2.shape[0]
    dense = other.is_floating_point()
    acc = _acc_dtype(x)
    loss = torch.empty(n, device=x.device, dtype=acc)
    if dense:
        t2 = other.detach().reshape(-1, n_cls).contiguous()
        y, ign, count = x2.new_empty(1, dtype=torch.int64), R.NO_IGNORE, n
    else:
        t2 = x2[:1]
        y = other.reshape(-1)
        ign = R.kernel_ignore_index(opts["ignore_index"])
        if n:  # eager contract: a clear error (one host sync, as torch's own)
            R.check_label_range(y, n_cls, opts["ignore_index"])
        count = R.mean_count(y, opts["ignore_index"], n_cls, xp=torch)
    want_t = want_other and dense
    gx = torch.empty_like(x2, dtype=_grad_dtype(grad_dtype, x2)) if want_x else x2[:1]
    gt = torch.empty_like(t2, dtype=_grad_dtype(grad_dtype, t2)) if want_t else t2[:1]
    weight = opts.get("weight")
    a = loss[:1] if weight is None else weight.detach().to(device=x.device, dtype=acc).reshape(-1).contiguous()
    params = _params(P.FocalParams(gamma=opts["gamma"], label_smoothing=opts["label_smoothing"], alpha=opts["alpha"],
                                   scale=_scale(opts["reduction"], count, acc)), x.device, acc)
    if n:
        block = K.row_block(n_cls, x.device.type == "cpu", x.dtype)
        K.softmax_focal_kernel[(n,)](
            x2, x2.stride(0), t2, t2.stride(0), y, loss, gx, gx.stride(0), gt, gt.stride(0), params, a, n_cls, ign,
            BLOCK=block, DENSE=dense, HAS_ALPHA=weight is not None, GAMMA_INT=K.gamma_int(opts["gamma"]),
            LABEL_ONLY=not dense and opts["label_smoothing"] == 0.0, WANT_GX=want_x, WANT_GT=want_t, ACC_F64=acc == torch.float64, num_warps=K.num_warps(block))
    value = _reduce(loss, opts["reduction"], count, tuple(x.shape[:-1]))
    return value, (gx.reshape(x.shape) if want_x else None), (gt.reshape(other.shape) if want_t else None)


def distillation(s, t, labels, opts, want_s, want_t, *, grad_dtype=None):
    """(loss, grad_student | None, grad_teacher | None) of distillation_loss, one launch."""
    n_cls = s.shape[-1]
    s2 = s.detach().reshape(-1, n_cls).contiguous()
    t2 = t.detach().reshape(-1, n_cls).contiguous()
    n = s2.shape[0]
    has_labels = labels is not None
    y = labels.reshape(-1) if has_labels else s2.new_empty(1, dtype=torch.int64)
    ign = R.kernel_ignore_index(opts["ignore_index"])
    if has_labels and n:
        R.check_label_range(y, n_cls, opts["ignore_index"])
    acc = _acc_dtype(s)
    loss = torch.empty(n, device=s.device, dtype=acc)
    gs = torch.empty_like(s2, dtype=_grad_dtype(grad_dtype, s2)) if want_s else s2[:1]
    gt = torch.empty_like(t2, dtype=_grad_dtype(grad_dtype, t2)) if want_t else t2[:1]
    count = R.mean_count(y, opts["ignore_index"], n_cls, xp=torch) if has_labels else n
    params = _params(P.DistillParams(inv_t=1.0 / opts["temperature"], temperature=opts["temperature"],
                                     alpha=opts["alpha"], beta=opts["beta"], scale=_scale(opts["reduction"], count, acc)),
                     s.device, acc)
    if n:
        block = K.distill_block(n_cls, s.device.type == "cpu", s.dtype)
        K.distill_kernel[(n,)](
            s2, s2.stride(0), t2, t2.stride(0), y, loss, gs, gs.stride(0), gt, gt.stride(0), params, n_cls, ign,
            BLOCK=block, DIV=("forward_kl", "reverse_kl", "jsd").index(opts["divergence"]), HAS_LABELS=has_labels,
            WANT_GS=want_s, WANT_GT=want_t, ACC_F64=acc == torch.float64, num_warps=K.num_warps(block))
    value = _reduce(loss, opts["reduction"], count, tuple(s.shape[:-1]))
    return value, (gs.reshape(s.shape) if want_s else None), (gt.reshape(t.shape) if want_t else None)


if _IMPORT_ERROR is None:
    sigmoid_cross_entropy = _elementwise(K.sigmoid_ce_kernel, lambda o, scale: P.SigmoidCEParams(
        label_smoothing=o["label_smoothing"], scale=scale))
    squared_error = _elementwise(K.squared_error_kernel, lambda o, scale: P.SquaredErrorParams(scale=scale))
    huber = _elementwise(K.huber_kernel, lambda o, scale: P.HuberParams(delta=o["delta"], scale=scale))
    sigmoid_focal = _elementwise(K.sigmoid_focal_kernel, lambda o, scale: P.SigmoidFocalParams(
        gamma=o["gamma"], alpha=o["alpha"], balance=float(o["apply_class_balancing"]),
        label_smoothing=o["label_smoothing"], scale=scale))
