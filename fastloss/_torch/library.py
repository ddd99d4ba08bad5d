"""The ``fastloss`` torch library and what its custom ops share: the in-place gradient scale op, the
accumulation dtype, the launcher module for a tensor, and the rescale of a fused gradient."""
from __future__ import annotations

import torch

LIB = torch.library.Library("fastloss", "DEF")  # noqa: TOR901 - one library object, kept for the process
HALF = (torch.float16, torch.bfloat16)


def acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def grad_f32(x, reduction):
    """16-bit gradients for reduction="none" are kept in float32 until the per-row cotangent scales
    them: the gradient for a cotangent of 1 can overflow float16 (|2 (p - t)| > 65504) where the
    scaled one does not, and rounding twice costs an ulp."""
    return reduction == "none" and x.dtype in HALF


def launchers(backend, x):
    """The launcher module for tensor ``x``: Triton's (CUDA tensors, or CPU tensors under
    TRITON_INTERPRET=1 when ``backend`` is "triton"), else Numba's (CPU tensors, zero-copy)."""
    if backend == "triton" or x.device.type != "cpu":
        from . import launch
        if x.device.type == "cpu":
            launch.check_interpreter()
        return launch
    from .._numpy import launch
    return launch


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain_eager(*tensors):
    """Whether a call on ``tensors`` (None allowed) is plain eager PyTorch: no torch.compile trace, no
    torch.func transform, no dispatch or torch-function mode (FakeTensor, FlopCounter, a default
    device) and no tensor subclass. Then the custom op's dispatcher and Function.apply's argument
    binding have nothing to do, and a call may skip them (together ~70 us of a ~110 us small step
    on a 2-vCPU EPYC); anything else goes through them."""
    if (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()):
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


def rescale(grad, g, reduction, row_ndim):
    """The fused gradient (for an upstream gradient of 1) times the actual upstream gradient ``g``:
    per row (element) for "none", else a scalar, scaled in place (nothing at all for g = 1)."""
    acc = acc_dtype(grad)
    if reduction == "none":
        w = g.to(acc).reshape(g.shape + (1,) * row_ndim)
        return (grad.to(acc) * w).to(grad.dtype)
    if plain_eager(grad, g):
        _scale_in_place(grad, g)
    else:
        torch.ops.fastloss.scale_(grad, g)
    return grad


def _scale_in_place(grad, g):
    """grad *= g for a scalar g, skipped when g is 1 (a loss that is the root of backward): an opaque
    op, so a compiled backward makes the same run-time check instead of a pass over the gradient.
    It mutates only the fused gradient buffer, which nothing else holds."""
    if not (g.dim() == 0 and g.device.type == "cpu" and float(g) == 1.0):
        acc = acc_dtype(grad)
        grad.copy_(grad.to(acc) * g.to(acc))


LIB.define("scale_(Tensor(a!) grad, Tensor g) -> ()")
torch.library.impl("fastloss::scale_", ("cpu", "cuda"), lib=LIB)(_scale_in_place)
torch.library.register_fake("fastloss::scale_", lambda grad, g: None, lib=LIB)
