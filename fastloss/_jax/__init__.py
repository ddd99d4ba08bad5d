"""jax arrays (and tracers; NumPy input routed here): every loss as a ``custom_jvp`` (or, for the
linear head, ``custom_vjp``) function over a fused kernel, under ``jit``, ``grad``, ``vmap``, forward
mode, ``hessian``, ``checkpoint``, ``scan`` and sharding.

- ``common``: the static description of a call, traced options, NumPy in and out;
- ``providers``: which fused kernel runs (XLA, Numba through the FFI, Pallas);
- ``losses``: the two-input losses; ``distill``: distillation_loss; ``linear``: linear_cross_entropy;
- ``ffi``: the Numba kernels as XLA custom calls; ``partition``: the kernels under sharding.

Importing this package imports nothing: jax comes with the first call.
"""
from __future__ import annotations


def run(spec, arrays, opts, choice, want_grad):
    """The call that ``fastloss._dispatch.route`` sent here (``choice``: the provider): the loss, or
    with ``want_grad`` (loss, d loss / d first array)."""
    if spec.other == "linear":
        from . import linear
        return linear.run(*arrays, opts, choice)
    if spec.other == "teacher":
        from . import distill
        return distill.run(*arrays, opts, choice, want_grad)
    from . import losses
    return losses.run(spec, *arrays, opts, choice, want_grad)
