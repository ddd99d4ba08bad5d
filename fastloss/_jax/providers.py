"""Which fused kernel a JAX call runs: the provider chosen by ``fastloss._dispatch.route`` and, for
"auto", the platform the program is compiled for.

Every kernel has the signature of its ``fastloss.kernels.jax_xla`` formulation and returns
``(values, grad_x | None, grad_other | None)``, the gradients of ``scale * Σ values``:

- "xla": the XLA formulation (any device jax runs on);
- "numba": the Numba kernels through the XLA FFI (CPU), ``fastloss._jax.ffi``;
- "pallas": the Pallas kernels (Triton lowering) on NVIDIA GPUs, or Pallas' interpreter with
  TRITON_INTERPRET=1 elsewhere;
- "auto": Numba where the program runs on CPU, Pallas on an NVIDIA GPU, XLA anywhere else; XLA
  picks the branch when it compiles for a platform, so one traced program stays portable.

The Numba and Pallas kernels have no derivative of their own: their JVP (second order) is the XLA
formulation's, the same math. Under sharding the cross-entropies' kernels run shard by shard
(``fastloss._jax.partition``).
"""
from __future__ import annotations

import os
from functools import partial

import jax
import jax.numpy as jnp

from .. import _reduction as R
from ..kernels import jax_xla as K


def provider(asked):
    """The provider for ``backend=`` ``asked`` (checked now: an explicit choice raises its failure):
    "xla" for "jax", "numba" for "numba", "pallas" for "triton"; for None "auto" (or "auto-gpu"
    where the Numba kernels cannot run inside XLA)."""
    if asked == "jax":
        return "xla"
    if asked == "triton":
        check_pallas()
        return "pallas"
    from . import ffi  # imports numba: only when the Numba kernels may run
    if asked == "numba":
        ffi.check_available()
        return "numba"
    return "auto" if ffi.unavailable_reason() is None else "auto-gpu"


def interpret_pallas():
    """Pallas off a GPU runs only in interpret mode, and only when asked for (as Triton's torch
    kernels): TRITON_INTERPRET=1."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_pallas():
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"fastloss backend 'triton' cannot run on jax arrays here: jax's Pallas Triton "
                           f"lowering is not importable ({exc})") from exc
    if jax.default_backend() != "gpu" and not interpret_pallas():
        raise RuntimeError("fastloss backend 'triton' runs jax arrays on an NVIDIA GPU (Pallas kernels); "
                           "here jax has no GPU. Set TRITON_INTERPRET=1 to run them in Pallas' interpreter "
                           "(slow), or use backend='jax' or 'numba'.")


def xla_kernel(call, x, other, params, want_x, want_other):
    spec = call.spec
    values, gx, go = getattr(K, spec.kernel)(x, other, params, **call.kwargs, want_x=want_x, want_other=want_other)
    if spec.row_ndim == 0 and call.reduction != "none":
        values = _block_sums(values)  # the shape the Numba kernel returns
    return values, gx, go


def _block_sums(values):
    """Per-block sums over PARTIAL_BLOCK elements: what the Numba elementwise kernels return when
    only the total is needed (no per-element store), computed the same way here so the two kernels
    are interchangeable inside one program."""
    b = R.PARTIAL_BLOCK
    pad = (-values.shape[0]) % b
    if pad:
        values = jnp.concatenate([values, jnp.zeros((pad,), values.dtype)])
    return jnp.sum(values.reshape(-1, b), axis=-1)


@partial(jax.custom_jvp, nondiff_argnums=(0, 4, 5))
def _numba_kernel(call, x, other, params, want_x, want_other):
    from . import ffi
    kw = call.kwargs
    if call.spec.row_ndim == 0:
        kw["want_values"] = call.reduction == "none"
    return getattr(ffi, call.spec.kernel)(x, other, params, **kw, want_x=want_x, want_other=want_other)


@_numba_kernel.defjvp
def _numba_kernel_jvp(call, want_x, want_other, primals, tangents):
    return jax.jvp(lambda a, b, c: xla_kernel(call, a, b, c, want_x, want_other), primals, tangents)


@partial(jax.custom_jvp, nondiff_argnums=(0, 4, 5, 6))
def _pallas_kernel(call, x, other, params, want_x, want_other, interpret):
    from ..kernels import pallas_gpu
    return getattr(pallas_gpu, call.spec.kernel)(x, other, params, **call.kwargs, want_x=want_x,
                                                 want_other=want_other, interpret=interpret)


@_pallas_kernel.defjvp
def _pallas_kernel_jvp(call, want_x, want_other, interpret, primals, tangents):
    return jax.jvp(lambda a, b, c: xla_kernel(call, a, b, c, want_x, want_other), primals, tangents)


def _pallas_fits(call, x):
    from ..kernels import pallas_gpu
    return "pallas" in call.spec.families and pallas_gpu.fits(x)


def kernel(call, x, other, params, want_x, want_other):
    """The fused kernel ``call`` asks for: (values, grad_x | None, grad_other | None)."""
    from . import partition
    # Explicit sharding (sharding in types) keeps the kernel unwrapped: custom_partitioning places
    # ops by XLA's automatic partitioner, which those types bypass.
    if call.spec.partitioned and not partition.explicit_axes(x) and not partition.in_manual_context():
        return partition.partitioned_kernel(local_kernel, call, x, other, params, want_x, want_other)
    return local_kernel(call, x, other, params, want_x, want_other)


def local_kernel(call, x, other, params, want_x, want_other):
    """The fused kernel on the rows at hand (one device's shard under sharding)."""
    chosen = call.provider
    xla = partial(xla_kernel, call, want_x=want_x, want_other=want_other)
    if chosen == "xla":
        return xla(x, other, params)
    if chosen == "numba":
        return _numba_kernel(call, x, other, params, want_x, want_other)
    if chosen == "pallas":
        if not _pallas_fits(call, x):
            return xla(x, other, params)  # int32 addressing: see kernels/pallas_gpu.py
        return jax.lax.platform_dependent(
            x, other, params,
            cuda=lambda a, b, c: _pallas_kernel(call, a, b, c, want_x, want_other, False),
            default=lambda a, b, c: _pallas_kernel(call, a, b, c, want_x, want_other, True))
    branches = {}
    from . import ffi, partition
    if chosen == "auto" and ffi.preferred(call.spec, x):
        branches["cpu"] = lambda a, b, c: _numba_kernel(call, a, b, c, want_x, want_other)
    if _pallas_fits(call, x) and not partition.explicit_axes(x):
        # (Pallas cannot trace arrays whose types carry explicit sharding: those take XLA on GPUs.)
        branches["cuda"] = lambda a, b, c: _pallas_kernel(call, a, b, c, want_x, want_other, False)
    if not branches:
        return xla(x, other, params)
    return jax.lax.platform_dependent(x, other, params, default=xla, **branches)
