"""fastloss.kernels: the compute kernels, one family per module, no user-facing defaults.

- ``jax_xla``: fused loss-and-gradient formulations in XLA operations, any device jax runs on.
- ``numba_cpu``: Numba parallel CPU kernels with a vectorisable exp.
- ``triton_gpu``: Triton kernels for torch tensors (CUDA, or the interpreter on CPU).
- ``pallas_gpu``: Pallas kernels (Triton lowering) for jax arrays on NVIDIA GPUs (or Pallas'
  interpreter on CPU): the softmax cross-entropies.

Each kernel takes 2-D (rows, classes) or 1-D (elements) inputs and returns fp32 (fp64 for fp64
input) per-row or per-element losses; reductions and ignore handling live in ``fastloss``.
Submodules are imported explicitly, so importing this package imports no framework.
"""
