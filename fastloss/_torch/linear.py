"""``linear_cross_entropy`` for torch tensors: torch matmuls and the fused sparse cross-entropy
kernel (Numba on CPU, Triton on CUDA) per chunk of rows, as custom ops.

Two ops (``torch.ops.fastloss.linear_cross_entropy`` and ``linear_cross_entropy_backward``) with
fake implementations, so ``torch.compile(fullgraph=True)`` traces them without running them, and
an autograd.Function around them:

- "mean"/"sum": the forward computes the loss and, for the inputs that require grad, the
  gradients for an upstream gradient of 1 (the cotangent only scales them); backward scales them
  in place (nothing at all for the usual 1). One logits matmul per chunk in all.
- "none": the forward computes the rows' losses only; the backward op recomputes each chunk's
  logits and weights the cross-entropy gradient's rows by their upstream gradients.

Per chunk of ``rows`` rows (``fastloss._chunks``), with ``G`` the CE gradient written over the
chunk's logits (in place: a chunk costs one ``rows x C`` buffer)::

    Z = h_c @ W^T + b            (the inputs' dtype; torch accumulates in fp32)
    G = d loss / d Z             (the fused kernel, fp32 math, scaled by the mean's 1/count)
    d h_c = G @ W                (written straight into its rows of d hidden)
    d W  += G^T @ h_c            (fp32 inside the matmul; accumulated in W's dtype, see _sweep)
    d b  += Σ_rows G             (fp32)

Second derivatives are not supported: a gradient taken with ``create_graph=True`` carries a
``grad_fn`` that raises when something differentiates through it (a gradient penalty), instead of
looking constant and silently dropping that term.
"""
from __future__ import annotations

import torch

from .. import _chunks
from .. import _reduction as R
from .._spec import LINEAR_CE, SPARSE_CE
from .library import LIB, acc_dtype, launchers

_OPTS = LINEAR_CE.option_names
_FWD = ("(Tensor hidden, Tensor weight, Tensor labels, Tensor? bias, float[] params, "
        "int ignore_index, str reduction, str backend, int rows, bool want_h, bool want_w, bool want_b) "
        "-> (Tensor, Tensor, Tensor, Tensor)")
_BWD = ("_backward(Tensor hidden, Tensor weight, Tensor labels, Tensor? bias, "
        "Tensor row_grad, float[] params, int ignore_index, str backend, int rows, bool want_h, bool want_w, "
        "bool want_b) -> (Tensor, Tensor, Tensor)")


def _opts(params, ignore_index):
    opts = dict(zip(_OPTS, params), reduction="none")
    opts["ignore_index"] = R.user_ignore_index(ignore_index)
    return opts


def _ce_chunk(z, y, opts, scale, backend):
    """(rows' losses (acc dtype), G over z's memory | None) from the fused sparse CE kernel."""
    launch = launchers(backend, z)
    # in_place: the gradient overwrites the chunk's logits (a temporary). labels_checked: the whole
    # label array was checked once already, so no check (on a GPU a host sync) per chunk.
    values, g, _ = launch.sparse_cross_entropy(z, y, opts, scale is not None, False, grad_scale=scale,
                                               in_place=scale is not None, labels_checked=True)
    return values, g


def _sweep(h, w, y, b, params, ignore_index, backend, rows, scale, row_grad, want_h, want_w, want_b):
    """(rows' losses (N,), d h | None, d W | None, d b fp32 | None) over all chunks; the
    gradients are those of ``scale * Σ rows`` (times ``row_grad`` per row when given)."""
    opts = _opts(params, ignore_index)
    n = h.shape[0]
    acc = acc_dtype(h)
    want = want_h or want_w or want_b
    values = torch.empty(n, dtype=acc, device=h.device)
    gh = torch.empty_like(h) if want_h else None
    # d W accumulates in the weight's dtype: torch's addmm sums each chunk's rows in fp32 inside the
    # matmul, then adds to the accumulator. For 16-bit weights an fp32 accumulator would need the
    # chunk's operands widened (torch has no 16-bit x 16-bit -> fp32 matmul on CPU): measured at
    # 4096x2048x128256 bf16, 25.7 s against 11.4 s for the unfused pair, so 16-bit accumulates in
    # 16-bit (as Liger-Kernel does by default): one rounding per chunk instead of one in all.
    gw = torch.zeros(w.shape, dtype=w.dtype, device=w.device) if want_w else None
    gb = torch.zeros(w.shape[:1], dtype=acc, device=w.device) if want_b else None
    for lo in range(0, n, rows):
        hi = min(lo + rows, n)
        # One function call per chunk: its logits are freed before the next chunk allocates its
        # own (a loop variable would keep two chunks alive at once: +1 chunk of peak memory).
        values[lo:hi] = _one_chunk(h[lo:hi], w, y[lo:hi], b, opts, backend, scale if want else None,
                                   None if row_grad is None else row_grad[lo:hi],
                                   None if gh is None else gh[lo:hi], gw, gb)
    return values, gh, gw, gb


def _one_chunk(hc, w, y, b, opts, backend, scale, row_grad, gh, gw, gb):
    """The chunk's rows' losses; with ``scale``, its gradients written into ``gh`` (its rows) and
    added to the accumulators ``gw``, ``gb``."""
    z = torch.addmm(b, hc, w.t()) if b is not None else hc @ w.t()
    v, g = _ce_chunk(z, y, opts, scale, backend)
    if scale is None:
        return v
    acc = v.dtype
    if row_grad is not None:
        g = (g.to(acc) * row_grad[:, None].to(acc)).to(g.dtype)
    if gh is not None:
        torch.mm(g, w, out=gh)
    if gw is not None:
        gw.addmm_(g.t(), hc)
    if gb is not None:
        gb += g.sum(0, dtype=acc)
    return v


def _mean_scale(y, ignore_index, reduction):
    if reduction != "mean":
        return 1.0
    return R.mean_scale(reduction, int(R.mean_count(y, R.user_ignore_index(ignore_index), 0, xp=torch)))


def _empty(like):
    return like.new_empty(0)


def _forward(hidden, weight, labels, bias, params, ignore_index, reduction, backend, rows, want_h, want_w, want_b):
    want = (want_h or want_w or want_b) and reduction != "none"
    scale = _mean_scale(labels, ignore_index, reduction)
    values, gh, gw, gb = _sweep(hidden, weight, labels, bias, params, ignore_index, backend, rows, scale, None,
                                want and want_h, want and want_w, want and want_b and bias is not None)
    if reduction == "none":
        value = values
    else:
        value = values.sum(dtype=torch.float64).to(values.dtype) * scale
    return (value, gh if gh is not None else _empty(hidden), gw.to(weight.dtype) if gw is not None else _empty(weight),
            gb.to(bias.dtype) if gb is not None else _empty(hidden))


def _forward_fake(hidden, weight, labels, bias, params, ignore_index, reduction, backend, rows, want_h, want_w,
                  want_b):
    value = hidden.new_empty(hidden.shape[:1] if reduction == "none" else (), dtype=acc_dtype(hidden))
    want = reduction != "none"
    return (value, torch.empty_like(hidden) if want and want_h else _empty(hidden),
            torch.empty_like(weight) if want and want_w else _empty(weight),
            torch.empty_like(bias) if want and want_b and bias is not None else _empty(hidden))


def _backward(hidden, weight, labels, bias, row_grad, params, ignore_index, backend, rows, want_h, want_w, want_b):
    _, gh, gw, gb = _sweep(hidden, weight, labels, bias, params, ignore_index, backend, rows, 1.0, row_grad,
                           want_h, want_w, want_b and bias is not None)
    return (gh if gh is not None else _empty(hidden), gw.to(weight.dtype) if gw is not None else _empty(weight),
            gb.to(bias.dtype) if gb is not None else _empty(hidden))


def _backward_fake(hidden, weight, labels, bias, row_grad, params, ignore_index, backend, rows, want_h, want_w,
                   want_b):
    return (torch.empty_like(hidden) if want_h else _empty(hidden),
            torch.empty_like(weight) if want_w else _empty(weight),
            torch.empty_like(bias) if want_b and bias is not None else _empty(hidden))


LIB.define(LINEAR_CE.name + _FWD)
LIB.define(LINEAR_CE.name + _BWD)
_QUAL = f"fastloss::{LINEAR_CE.name}"
torch.library.impl(_QUAL, ("cpu", "cuda"), lib=LIB)(_forward)
torch.library.register_fake(_QUAL, _forward_fake, lib=LIB)
torch.library.impl(_QUAL + "_backward", ("cpu", "cuda"), lib=LIB)(_backward)
torch.library.register_fake(_QUAL + "_backward", _backward_fake, lib=LIB)
_FORWARD_OP = getattr(torch.ops.fastloss, LINEAR_CE.name)
_BACKWARD_OP = getattr(torch.ops.fastloss, LINEAR_CE.name + "_backward")


class _FirstOrderOnly(torch.autograd.Function):
    """The identity on a gradient of the linear head; differentiating through it raises.

    ``once_differentiable`` alone is not enough: it attaches its error only when an incoming
    gradient requires grad, and ``torch.autograd.grad(loss, hidden, create_graph=True)`` passes a
    constant 1, so the gradient came back without a ``grad_fn`` and a penalty on it added nothing
    to ``weight.grad`` (93% off). The gradient does depend on ``hidden`` and ``weight``."""

    @staticmethod
    def forward(grad, *anchors):
        # anchors: the head's inputs that require grad, so that the result has a grad_fn (a
        # Function's output gets one only when an input requires grad; the gradient does not)
        return grad.view_as(grad)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"{LINEAR_CE.name} has no second derivative in torch (a gradient taken with "
                           f"create_graph=True was differentiated). For a gradient penalty, use "
                           f"fastloss.{SPARSE_CE.name}(torch.nn.functional.linear(hidden, weight, bias), labels), "
                           f"whose second derivative is exact.")


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(hidden, weight, labels, bias, params, ignore_index, reduction, backend, rows, want):
        return _FORWARD_OP(hidden, weight, labels, bias, params, ignore_index, reduction,
                           backend, rows, *want)

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, labels, bias, params, ignore_index, reduction, backend, rows, want = inputs
        ctx.cfg = (params, ignore_index, backend, rows)
        ctx.reduction = reduction
        ctx.anchors = tuple(t for t in (hidden, weight, bias) if t is not None and t.requires_grad)
        if reduction == "none":  # recomputed in the backward
            ctx.save_for_backward(hidden, weight, labels, bias)
        else:
            ctx.save_for_backward(*output[1:])
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g, *_):
        if torch.is_grad_enabled():  # create_graph=True: first-order gradients that refuse a second
            with torch.no_grad():
                grads = _LinearCE.backward(ctx, g)
            return tuple(_FirstOrderOnly.apply(t, *ctx.anchors) if isinstance(t, torch.Tensor) else t
                         for t in grads)
        rest = (None,) * 6
        if g is None:
            return (None,) * 4 + rest
        need = ctx.needs_input_grad[:4]
        if ctx.reduction == "none":
            hidden, weight, labels, bias = ctx.saved_tensors
            params, ignore_index, backend, rows = ctx.cfg
            gh, gw, gb = _BACKWARD_OP(
                hidden, weight, labels, bias, g.reshape(-1), params, ignore_index, backend, rows, need[0], need[1],
                need[3])
        else:
            gh, gw, gb = ctx.saved_tensors
            for grad, needed in zip((gh, gw, gb), (need[0], need[1], need[3])):
                if needed and grad.numel():
                    torch.ops.fastloss.scale_(grad, g)  # in place; a no-op for the usual g = 1
        return (gh if need[0] else None, gw if need[1] else None, None, gb if need[3] else None) + rest


def linear_cross_entropy(hidden, weight, labels, bias, opts, backend):
    """The loss of torch tensors through the custom ops, with autograd."""
    lead = tuple(hidden.shape[:-1])
    h2 = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    if not torch.compiler.is_compiling() and y.numel():
        R.check_label_range(y, weight.shape[0], opts["ignore_index"])
    chunk_size = opts["chunk_size"]
    free = None if chunk_size is not None or torch.compiler.is_compiling() else _chunks.free_bytes(hidden.device)
    rows = _chunks.rows_per_chunk(h2.shape[0], weight.shape[0], chunk_size, free)
    grad_on = torch.is_grad_enabled()
    want = (bool(grad_on and hidden.requires_grad), bool(grad_on and weight.requires_grad),
            bool(grad_on and bias is not None and bias.requires_grad))
    params = [float(opts[k]) for k in _OPTS]
    ign = R.kernel_ignore_index(opts["ignore_index"])
    value = _LinearCE.apply(h2, weight, y, bias, params, ign, opts["reduction"], backend, rows, want)[0]
    return value.reshape(lead) if opts["reduction"] == "none" else value
