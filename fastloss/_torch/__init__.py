"""torch tensors: every loss as a custom op with autograd, fake tensors (torch.compile), vmap and an
exact second order; the kernels are Numba's for CPU tensors (zero-copy) and Triton's for CUDA tensors
(or CPU tensors under TRITON_INTERPRET=1).

- ``library``: the ``fastloss`` torch library, the shared scale op and helpers;
- ``ops``: the two-input losses' custom ops (one per ``_spec.PAIR_SPECS`` row);
- ``distill``: distillation_loss's op; ``linear``: linear_cross_entropy's chunked ops;
- ``second_order``: the differentiable gradient formulas a differentiated backward uses;
- ``launch``: the Triton launchers.

Importing this package imports nothing: torch comes with the first call.
"""
from __future__ import annotations


def run(spec, arrays, opts, choice, want_grad):
    """The call that ``fastloss._dispatch.route`` sent here (``choice``: "numba" or "triton"): the
    loss with autograd, or with ``want_grad`` (loss, d loss / d first array) from one kernel call."""
    if spec.other == "linear":
        from . import linear
        return linear.linear_cross_entropy(*arrays, opts, choice)
    if spec.other == "teacher":
        from . import distill
        s, t, labels = arrays
        if want_grad:
            return distill.distill_value_and_grad(s, t, labels, opts, choice)
        return distill.distill_call(s, t, labels, opts, choice)
    from . import ops
    if want_grad:
        return ops.value_and_grad(spec, *arrays, opts, choice)
    return ops.call(spec, *arrays, opts, choice)
