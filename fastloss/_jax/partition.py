"""The cross-entropy kernels under sharding: each device runs on its own shard of the logits.

XLA cannot look inside a custom call (the Numba kernel through the FFI, the Pallas kernel), so
with the logits sharded over a mesh it would gather them whole onto every device first. Here the
fused kernel is wrapped in ``custom_partitioning``:

- rows split over mesh axes (data parallelism): every device runs the fused kernel on its rows;
  the labels follow the rows, the small ``params`` vector is replicated;
- classes split (vocabulary parallelism): every device runs the XLA formulation on its columns
  with the row statistics completed by collectives (pmax of the row max, psum of Σ exp and of the
  label's logit, ``jax_xla.ClassSplit``); the loss is the whole row's and the gradient keeps the
  logits' sharding. Per row that is three scalars of communication, never the (N, C) logits.

The wrapper keeps what the kernels support: ``vmap`` folds the batch into rows (a
``custom_vmap`` rule: rows are independent), and derivatives of the kernel (second order) are the
XLA formulation's, as for the unwrapped kernels.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ..kernels import jax_xla as K


def _outputs(call, want_x, want_other):
    """Which of (values, grad_x, grad_other) the kernel returns as arrays."""
    return (True, want_x, want_other and not call.spec.has_labels)


def _pack(result, wanted):
    return tuple(r for r, w in zip(result, wanted) if w)


def _unpack(arrays, wanted):
    it = iter(arrays)
    return tuple(next(it) if w else None for w in wanted)


def _class_parallel(call, want_x, want_other, axis, n_cls, x, other, params):
    """One shard of the classes: the XLA formulation with collectives over ``axis``."""
    split = K.ClassSplit(axis, n_cls, jax.lax.axis_index(axis) * x.shape[-1])
    return getattr(K, call.spec.kernel)(x, other, params, **call.kwargs, want_x=want_x, want_other=want_other,
                                        split=split)


def _axes(entry):
    """A PartitionSpec entry as a tuple of mesh axis names (() when not split)."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _partitioned(kernel, call, want_x, want_other):
    """``kernel(call, x, other, params, want_x, want_other) -> (values, gx, go)`` as a
    custom_partitioning op on arrays."""
    wanted = _outputs(call, want_x, want_other)
    labels = call.spec.has_labels

    def run(x, other, params):
        return _pack(kernel(call, x, other, params, want_x, want_other), wanted)

    fn = custom_partitioning(run)

    def shardings(mesh, x_spec):
        rows, cols = (tuple(x_spec) + (None, None))[:2]
        x_sh = NamedSharding(mesh, P(rows, cols))
        row_sh = NamedSharding(mesh, P(rows))
        args = (x_sh, row_sh if labels else x_sh, NamedSharding(mesh, P()))
        results = _pack((row_sh, x_sh, x_sh), wanted)
        return rows, cols, args, results

    def partition(mesh, arg_shapes, result_shape):
        _, cols, args, results = shardings(mesh, arg_shapes[0].sharding.spec)
        n_cls = arg_shapes[0].shape[-1]
        axis = _axes(cols)
        if axis:
            def lower(x, other, params):
                return _pack(_class_parallel(call, want_x, want_other, axis, n_cls, x, other, params), wanted)
        else:
            lower = run
        return mesh, lower, results, args

    def infer(mesh, arg_shapes, result_shape):
        return shardings(mesh, arg_shapes[0].sharding.spec)[3]

    x_factors = "n c"
    other_factors = "n" if labels else "n c"
    out_factors = ", ".join(_pack(("n", "n c", "n c"), wanted))
    fn.def_partition(partition=partition, infer_sharding_from_operands=infer,
                     sharding_rule=f"{x_factors}, {other_factors}, p -> {out_factors}")
    return fn


@partial(jax.custom_jvp, nondiff_argnums=(0, 1, 5, 6))
def partitioned_kernel(kernel, call, x, other, params, want_x, want_other):
    """``kernel(call, x, other, params, want_x, want_other)`` (``providers.local_kernel``, a
    module-level function) as an op that XLA partitions shard by shard."""
    return _vmappable(kernel, call, want_x, want_other)(x, other, params)


def in_manual_context():
    """Whether the trace is inside ``shard_map`` (manual mesh axes): there every device already runs
    on its own shard, and the kernel needs no partitioning."""
    try:
        return bool(jax.sharding.get_abstract_mesh().manual_axes)
    except AttributeError:
        return False


def explicit_axes(x):
    """The explicit mesh axes ``x``'s type is sharded over (sharding in types), else ()."""
    try:
        sharding = jax.typeof(x).sharding
        mesh = sharding.mesh
    except AttributeError:
        return ()
    explicit = getattr(jax.sharding.AxisType, "Explicit", None)
    return tuple(name for name, kind in zip(mesh.axis_names, getattr(mesh, "axis_types", ()))
                 if kind == explicit)


@partitioned_kernel.defjvp
def _partitioned_jvp(kernel, call, want_x, want_other, primals, tangents):
    # Second order: the XLA formulation's derivative (the same math), as for the kernels themselves:
    # the kernel with the "xla" provider is plain XLA.
    xla_call = call._replace(provider="xla")
    return jax.jvp(lambda a, b, c: kernel(xla_call, a, b, c, want_x, want_other), primals, tangents)


_CACHE = {}


def _vmappable(kernel, call, want_x, want_other):
    key = (kernel, call, want_x, want_other)
    if key not in _CACHE:
        _CACHE[key] = _with_vmap(kernel, call, want_x, want_other)
    return _CACHE[key]


def _with_vmap(kernel, call, want_x, want_other):
    wanted = _outputs(call, want_x, want_other)
    part = _partitioned(kernel, call, want_x, want_other)

    @jax.custom_batching.custom_vmap
    def op(x, other, params):
        return _unpack(part(x, other, params), wanted)

    @op.def_vmap
    def rule(axis_size, in_batched, x, other, params):
        xb, ob, pb = in_batched
        if pb:  # per-example options (a vmapped temperature): one call per example
            x = x if xb else jnp.broadcast_to(x, (axis_size,) + x.shape)
            other = other if ob else jnp.broadcast_to(other, (axis_size,) + other.shape)
            outs = jax.lax.map(lambda a: op(*a), (x, other, params))
            return outs, _unpack((True,) * sum(wanted), wanted)
        # Rows are independent: the batch folds into the rows, one kernel call for all of it.
        x = x if xb else jnp.broadcast_to(x, (axis_size,) + x.shape)
        other = other if ob else jnp.broadcast_to(other, (axis_size,) + other.shape)
        n = x.shape[1]
        outs = op(x.reshape((-1,) + x.shape[2:]), other.reshape((-1,) + other.shape[2:]), params)
        outs = tuple(None if o is None else o.reshape((axis_size, n) + o.shape[1:]) for o in outs)
        return outs, _unpack((True,) * sum(wanted), wanted)

    return op
