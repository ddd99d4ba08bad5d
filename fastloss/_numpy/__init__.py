"""NumPy input (and torch CPU tensors, through ``fastloss._torch``) on the Numba kernels.

``launch`` holds one launcher per kernel (named as ``LossSpec.kernel``): views of the inputs in the
kernels' element types, outputs allocated in the input's framework, one kernel call for the loss
and its gradients. ``buffers`` recycles large CPU gradient blocks. Importing this package imports
NumPy only; numba comes with ``launch``, at the first call.
"""
from __future__ import annotations


def run(spec, arrays, opts, choice, want_grad):
    """The call that ``fastloss._dispatch.route`` sent here (``choice`` is "numba"): the loss, or
    (loss, d loss / d first array) with ``want_grad``."""
    from . import launch
    if spec.other == "linear":
        return launch.linear_cross_entropy(*arrays, opts)
    if spec.other == "teacher":
        value, gs, _ = launch.distillation(*arrays, opts, want_grad, False)
    else:
        value, gs, _ = getattr(launch, spec.kernel)(*arrays, opts, want_grad, False)
    return (value, gs) if want_grad else value
