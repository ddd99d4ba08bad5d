"""torch autograd glue shared by the Numba (CPU tensors) and Triton (CUDA tensors) backends.

The forward kernel already computes the gradient (scaled for the reduction with an upstream
gradient of 1), as in Liger-Kernel; backward only rescales it when the upstream gradient is not 1
(or is per-row, for reduction="none"). So a training step reads the logits once and writes the
gradient once, and keeps no softmax alive between forward and backward.
"""
from __future__ import annotations

import torch


class FusedLoss(torch.autograd.Function):
    """``run(needs_x, needs_other) -> (loss, grad_x | None, grad_other | None)``."""

    @staticmethod
    def forward(ctx, x, other, run, reduction, row_ndim):
        needs_x = x.requires_grad
        needs_other = other.requires_grad if other.is_floating_point() else False
        loss, gx, go = run(needs_x, needs_other)
        ctx.reduction = reduction
        ctx.row_ndim = row_ndim  # 1 for cross-entropies (one loss per row of C), 0 elementwise
        ctx.save_for_backward(gx if gx is not None else torch.empty(0), go if go is not None else torch.empty(0))
        ctx.has = (gx is not None, go is not None)
        return loss

    @staticmethod
    def backward(ctx, g):
        gx, go = ctx.saved_tensors
        out = []
        for grad, has in zip((gx, go), ctx.has):
            if not has:
                out.append(None)
                continue
            if ctx.reduction == "none":
                w = g.to(torch.float32 if grad.dtype != torch.float64 else torch.float64)
                w = w.reshape(w.shape + (1,) * ctx.row_ndim)
                grad = (grad * w).to(grad.dtype)
            elif not (g.device.type == "cpu" and float(g) == 1.0):
                grad = (grad * g.to(grad.dtype)) if grad.dtype == torch.float64 else \
                    (grad.float() * g.float()).to(grad.dtype)
            out.append(grad)
        return out[0], out[1], None, None, None
