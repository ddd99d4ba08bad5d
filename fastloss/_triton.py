"""The "triton" backend: torch tensors on ``fastloss.kernels.triton_gpu``.

CUDA tensors run on the GPU. CPU tensors run through Triton's interpreter when TRITON_INTERPRET=1 is
set (how CI proves the kernels without a GPU); otherwise this backend says why it cannot run.
"""
from __future__ import annotations

import os

import torch

from . import _adapter

try:  # import errors surface through unavailable_reason()
    import triton
    from fastloss.kernels import triton_focal as KF
    from fastloss.kernels import triton_gpu as K
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


def check_device(x, other):
    for a in (x, other):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"the 'triton' backend takes torch tensors; received {type(a).__name__}.")
    if x.device != other.device:
        raise TypeError(f"both inputs must be on one device; received {x.device} and {other.device}.")
    if x.device.type == "cpu" and not _interpret():
        raise RuntimeError("the 'triton' backend runs CPU tensors only under TRITON_INTERPRET=1; "
                           "move the tensors to CUDA or use backend='numba'.")


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _params(values, reduction, count, device, dtype):
    """[*values, scale] in the accumulation dtype on the device; scale = d total / d row, from a
    count that may itself be a device tensor (no host sync)."""
    if not isinstance(count, torch.Tensor):
        return torch.tensor(list(values) + [_adapter.mean_scale(reduction, count)], device=device, dtype=dtype)
    head = torch.tensor(list(values) + [1.0], device=device, dtype=dtype)
    if reduction == "mean":
        head[-1:] = 1.0 / _at_least_one(count).to(dtype)
    return head


def _grad_dtype(opts, like):
    """The gradient's storage dtype: the input's, or float32 when the caller asks (fastloss._torch_ops
    does for 16-bit inputs with reduction="none", whose gradients it rescales per row afterwards)."""
    return getattr(torch, opts["grad_dtype"]) if opts.get("grad_dtype") else like.dtype


def _at_least_one(count):
    # the count, 1 where it is 0 (_adapter.nonzero_or_one on the device: a weighted count may be < 1)
    if isinstance(count, torch.Tensor):
        return torch.where(count != 0, count, torch.ones_like(count))
    return _adapter.nonzero_or_one(count)


def _reduce(values, reduction, count, lead):
    value = _adapter.reduce(values, reduction, count, lead, lambda v: v.sum(dtype=torch.float64), _at_least_one)
    return value if reduction == "none" else value.to(values.dtype)


def _sparse(x, labels, opts, want_x, want_other, inplace=False):
    n_cls = x.shape[-1]
    lead = tuple(x.shape[:-1])
    x2 = x.detach().reshape(-1, n_cls)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if inplace and x2.data_ptr() != x.data_ptr() or inplace and not x.is_contiguous():
        raise ValueError("`logits` must be contiguous for the in-place variant (its memory receives the "
                         f"gradient); received strides {tuple(x.stride())}.")
    y = labels.reshape(-1)
    n = x2.shape[0]
    ign = _adapter.kernel_ignore_index(opts["ignore_index"])
    if n and not opts.get("labels_checked"):  # eager contract: a clear error (one host sync, as torch's own)
        _adapter.check_label_range(y, n_cls, opts["ignore_index"])
    acc = _acc_dtype(x)
    loss = torch.empty(n, device=x.device, dtype=acc)
    lse = torch.empty(n, device=x.device, dtype=acc)
    # In place: pass 2 of each row reads a block of logits, then overwrites it with its gradient
    # (the label's logit is read in pass 1), so the (N, C) gradient costs no new memory.
    g = x2 if (inplace and want_x) else torch.empty_like(x2, dtype=_grad_dtype(opts, x2)) if want_x else x2[:1]
    cap = opts.get("softcap") or 0.0
    weight = opts.get("weight")
    if weight is None:
        count, w, w_sum = (y != ign).sum(), loss[:1], float(n_cls)
    else:
        # "mean" divides by the counted rows' label weights (as torch); Σ w for the smoothed term.
        w = weight.detach().to(device=x.device, dtype=acc).reshape(-1).contiguous()
        counted = (y != ign) & (y >= 0) & (y < n_cls)
        count = torch.where(counted, w[y.clamp(0, n_cls - 1)], torch.zeros((), dtype=acc, device=x.device)).sum()
        count = torch.where(count != 0, count, torch.ones_like(count))
        w_sum = w.sum()
    params = _params((1.0 / opts["temperature"], opts["label_smoothing"], opts["z_loss"], cap, 0.0),
                     opts["reduction"], count, x.device, acc)
    params[4] = w_sum
    if opts.get("grad_scale") is not None:  # a chunk of a larger "mean" (fastloss._torch_linear)
        params[-1] = opts["grad_scale"]
    if n:
        block = K.row_block(n_cls, x.device.type == "cpu", x.dtype)
        K.sparse_ce_kernel[(n,)](
            x2, x2.stride(0), y, loss, lse, g, g.stride(0), params, w, n_cls, ign, BLOCK=block,
            HAS_SMOOTH=opts["label_smoothing"] != 0.0, HAS_ZLOSS=opts["z_loss"] != 0.0, HAS_CAP=cap != 0.0,
            HAS_WEIGHT=weight is not None, WANT_GRAD=want_x, ACC_F64=acc == torch.float64,
            num_warps=K.num_warps(block))
    value = _reduce(loss, opts["reduction"], count, lead)
    return value, (g.reshape(x.shape) if want_x else None), None


def _dense(x, t, opts, want_x, want_other):
    n_cls = x.shape[-1]
    x2 = x.detach().reshape(-1, n_cls).contiguous()
    t2 = t.detach().reshape(-1, n_cls).contiguous()
    n = x2.shape[0]
    acc = _acc_dtype(x)
    loss = torch.empty(n, device=x.device, dtype=acc)
    lse = torch.empty(n, device=x.device, dtype=acc)
    gx = torch.empty_like(x2, dtype=_grad_dtype(opts, x2)) if want_x else x2[:1]
    gt = torch.empty_like(t2, dtype=_grad_dtype(opts, t2)) if want_other else t2[:1]
    params = _params((1.0 / opts["temperature"], opts["label_smoothing"]), opts["reduction"], n, x.device, acc)
    if n:
        block = K.row_block(n_cls, x.device.type == "cpu", x.dtype)
        K.dense_ce_kernel[(n,)](
            x2, x2.stride(0), t2, t2.stride(0), loss, lse, gx, gx.stride(0), gt, gt.stride(0), params, n_cls,
            BLOCK=block, WANT_GX=want_x, WANT_GT=want_other,
            ACC_F64=acc == torch.float64, num_warps=K.num_warps(block))
    value = _reduce(loss, opts["reduction"], n, tuple(x.shape[:-1]))
    return value, (gx.reshape(x.shape) if want_x else None), (gt.reshape(t.shape) if want_other else None)


def _elementwise(kernel, extra):
    def run(x, t, opts, want_x, want_other):
        xf = x.detach().reshape(-1).contiguous()
        tf = t.detach().reshape(-1).contiguous()
        n = xf.shape[0]
        acc = _acc_dtype(x)
        want_out = opts["reduction"] == "none"
        out = torch.empty(n if want_out else 1, device=x.device, dtype=acc)
        n_prog = triton.cdiv(n, K.elem_block(x.dtype))
        partial = torch.zeros(max(n_prog, 1), device=x.device, dtype=acc)
        gx = torch.empty_like(xf, dtype=_grad_dtype(opts, xf)) if want_x else xf[:1]
        gt = torch.empty_like(tf, dtype=_grad_dtype(opts, tf)) if want_other else tf[:1]
        params = _params(extra(opts), opts["reduction"], n, x.device, acc)
        if n:
            kernel[(n_prog,)](xf, tf, out, partial, gx, gt, params, n, BLOCK=K.elem_block(x.dtype),
                              WANT_OUT=want_out, ACC_F64=acc == torch.float64, num_warps=8,
                              **{kernel.arg_names[-3]: want_x, kernel.arg_names[-2]: want_other})
        # "none": the per-element values; otherwise the programs' partial sums carry the total.
        value = _reduce(out if want_out else partial, opts["reduction"], n, tuple(x.shape))
        return value, (gx.reshape(x.shape) if want_x else None), (gt.reshape(t.shape) if want_other else None)
    return run


def _softmax_focal(x, other, opts, want_x, want_other):
    """Labels (ignore_index applies) or dense targets: one launch of the focal kernel."""
    n_cls = x.shape[-1]
    x2 = x.detach().reshape(-1, n_cls).contiguous()
    n = x2.shape[0]
    dense = other.is_floating_point()
    acc = _acc_dtype(x)
    loss = torch.empty(n, device=x.device, dtype=acc)
    if dense:
        t2 = other.detach().reshape(-1, n_cls).contiguous()
        y, ign, count = x2.new_empty(1, dtype=torch.int64), _adapter.NO_IGNORE, n
    else:
        t2 = x2[:1]
        y = other.reshape(-1)
        ign = _adapter.kernel_ignore_index(opts["ignore_index"])
        if n:  # eager contract: a clear error (one host sync, as torch's own)
            _adapter.check_label_range(y, n_cls, opts["ignore_index"])
        count = (y != ign).sum()
    want_t = want_other and dense
    gx = torch.empty_like(x2, dtype=_grad_dtype(opts, x2)) if want_x else x2[:1]
    gt = torch.empty_like(t2, dtype=_grad_dtype(opts, t2)) if want_t else t2[:1]
    weight = opts.get("weight")
    a = loss[:1] if weight is None else weight.detach().to(device=x.device, dtype=acc).reshape(-1).contiguous()
    params = _params((opts["gamma"], opts["label_smoothing"], opts["alpha"]), opts["reduction"], count, x.device, acc)
    if n:
        block = K.row_block(n_cls, x.device.type == "cpu", x.dtype)
        KF.softmax_focal_kernel[(n,)](
            x2, x2.stride(0), t2, t2.stride(0), y, loss, gx, gx.stride(0), gt, gt.stride(0), params, a, n_cls, ign,
            BLOCK=block, DENSE=dense, HAS_ALPHA=weight is not None, GAMMA_INT=KF.gamma_int(opts["gamma"]),
            LABEL_ONLY=not dense and opts["label_smoothing"] == 0.0, WANT_GX=want_x, WANT_GT=want_t, ACC_F64=acc == torch.float64, num_warps=K.num_warps(block))
    value = _reduce(loss, opts["reduction"], count, tuple(x.shape[:-1]))
    return value, (gx.reshape(x.shape) if want_x else None), (gt.reshape(other.shape) if want_t else None)


def distill(s, t, labels, opts, want_s, want_t):
    """(loss, grad_student | None, grad_teacher | None) of distillation_loss, one launch."""
    n_cls = s.shape[-1]
    s2 = s.detach().reshape(-1, n_cls).contiguous()
    t2 = t.detach().reshape(-1, n_cls).contiguous()
    n = s2.shape[0]
    has_labels = labels is not None
    y = labels.reshape(-1) if has_labels else s2.new_empty(1, dtype=torch.int64)
    ign = _adapter.kernel_ignore_index(opts["ignore_index"])
    if has_labels and n:
        _adapter.check_label_range(y, n_cls, opts["ignore_index"])
    acc = _acc_dtype(s)
    loss = torch.empty(n, device=s.device, dtype=acc)
    gs = torch.empty_like(s2, dtype=_grad_dtype(opts, s2)) if want_s else s2[:1]
    gt = torch.empty_like(t2, dtype=_grad_dtype(opts, t2)) if want_t else t2[:1]
    count = (y != ign).sum() if has_labels else n
    params = _params((1.0 / opts["temperature"], opts["temperature"], opts["alpha"], opts["beta"]),
                     opts["reduction"], count, s.device, acc)
    if n:
        block = K.distill_block(n_cls, s.device.type == "cpu", s.dtype)
        K.distill_kernel[(n,)](
            s2, s2.stride(0), t2, t2.stride(0), y, loss, gs, gs.stride(0), gt, gt.stride(0), params, n_cls, ign,
            BLOCK=block, DIV=("forward_kl", "reverse_kl", "jsd").index(opts["divergence"]), HAS_LABELS=has_labels,
            WANT_GS=want_s, WANT_GT=want_t, ACC_F64=acc == torch.float64, num_warps=K.num_warps(block))
    value = _reduce(loss, opts["reduction"], count, tuple(s.shape[:-1]))
    return value, (gs.reshape(s.shape) if want_s else None), (gt.reshape(t.shape) if want_t else None)


_RUNNERS = {}
if _IMPORT_ERROR is None:
    _RUNNERS = {
        "sparse_softmax_cross_entropy": _sparse,
        "softmax_cross_entropy": _dense,
        "sigmoid_cross_entropy": _elementwise(K.sigmoid_ce_kernel, lambda o: (o["label_smoothing"],)),
        "mean_squared_error": _elementwise(K.squared_error_kernel, lambda o: ()),
        "huber": _elementwise(K.huber_kernel, lambda o: (o["delta"],)),
        "sigmoid_focal_loss": _elementwise(K.sigmoid_focal_kernel, lambda o: (
            o["gamma"], o["alpha"], float(o["apply_class_balancing"]), o["label_smoothing"])),
        "softmax_focal_loss": _softmax_focal,
    }


def run(name, x, other, opts, want_x, want_other):
    """(loss, grad_x | None, grad_other | None) from one kernel launch (torch tensors come here
    through fastloss._torch_ops, which adds autograd)."""
    return _RUNNERS[name](x, other, opts, want_x, want_other)


def _loss(name):
    def call(x, other, opts):
        from ._torch_ops import call as op_call  # explicit backend="triton" reached through the registry
        check_device(x, other)
        return op_call(name, x, other, opts, "triton")
    call.__name__ = name
    return call


LOSSES = _adapter.loss_table(_loss)


def sparse_inplace(x, labels, opts):
    """Sparse CE whose gradient is written into ``x``'s memory (Liger-style, saves an (N, C) buffer).
    Returns the loss; ``x`` holds d loss / d logits afterwards (for reduction "mean"/"sum" as is,
    for "none" per-row weights 1)."""
    check_device(x, labels)
    value, _, _ = _sparse(x, labels, opts, True, False, inplace=True)
    return value


def value_and_grad(name, x, other, opts):
    check_device(x, other)
    value, gx, _ = _RUNNERS[name](x, other, opts, True, False)
    return value, gx
