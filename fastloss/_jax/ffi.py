"""The Numba kernels inside ``jax.jit`` on CPU, through XLA's typed FFI.

Each call below emits one XLA custom call whose handler (``fastloss.kernels.numba_cpu.xla_ffi``)
runs the Numba kernel on XLA's own buffers: no copy in, no copy out, no Python at run time, so it
works inside ``jit``, ``grad``, ``vmap`` (one call per batch element), ``shard_map`` and the
persistent compilation cache. Handlers are built (or loaded from Numba's disk cache) and
registered at the first trace that needs them; importing fastloss builds nothing.

The functions have the signature of their ``fastloss.kernels.jax_xla`` counterparts and return
the same values (within fp32 rounding): ``(values, grad_x | None, grad_other | None)`` with the
gradients of ``scale * Σ values``. They are not differentiable themselves; ``fastloss._jax`` gives
them derivatives (the gradient they return, and the XLA formulation for second order).
"""
from __future__ import annotations

import atexit
import math
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np

from .. import _reduction as R
from ..kernels import jax_xla as K
from ..kernels.numba_cpu import BLOCK, plan
from .common import varying_like

_LOCK = threading.Lock()
_HANDLERS = {}  # target name -> cfunc; kept alive for the process: XLA holds raw pointers to them
_STATE = {}

# jax dtype name -> the element type the Numba kernels use (16-bit floats as raw bits).
_STORAGE = {"float32": np.float32, "float64": np.float64, "bfloat16": np.uint16, "float16": np.int16,
            "int32": np.int32, "int64": np.int64}


def unavailable_reason():
    """None when the Numba kernels can run inside XLA here, else why not.

    XLA calls a handler from several of its threads at once. Numba's ``omp`` and ``tbb`` threading
    layers take concurrent parallel launches; its fallback ``workqueue`` layer aborts the process
    on them, so it rules the FFI path out (automatic dispatch then uses the XLA formulation)."""
    if "reason" not in _STATE:
        _STATE["reason"] = _probe()
    return _STATE["reason"]


def _probe():
    try:
        import numba  # noqa: F401 - importable or not is the question
    except ImportError:
        return "it needs the package 'numba', which is not installed (pip install numba)"
    if np.dtype(np.intp).itemsize != 8 or sys.byteorder != "little":
        return "the XLA FFI handlers assume a 64-bit little-endian machine"
    from .._numpy import threads
    layer = threads.layer()
    if layer not in ("omp", "tbb"):
        return (f"Numba's threading layer is {layer!r}, which cannot run kernels called from several "
                f"XLA threads at once; install tbb (pip install tbb) or provide libgomp")
    return None


def preferred(spec, x):
    """Whether the automatic choice should take the Numba kernel for this input (shapes are static
    at trace time): from plan.FFI_MIN_ELEMENTS elements up (below, XLA's fused loops are done before a
    custom call pays off), and for the cross-entropies only with rows of more than plan.TINY_ROW
    classes: XLA fuses such short rows into its own loops at least as well as the grouped kernel
    does (docs/performance.md)."""
    if math.prod(x.shape) < plan.FFI_MIN_ELEMENTS:
        return False
    if spec.kernel in ("sparse_cross_entropy", "softmax_cross_entropy"):
        return x.shape[-1] > plan.TINY_ROW
    return True


def check_available():
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"fastloss backend 'numba' cannot run inside jax here: {reason}")


def _threads():
    import numba
    return numba.get_num_threads()


def _storage(dtype):
    return _STORAGE[jnp.dtype(dtype).name]


def _at_exit():
    """Keep XLA's CPU client from being destroyed at interpreter exit.

    Once a Numba kernel has run inside XLA, the CPU client's thread pool has threads that ran
    OpenMP regions, and its destructor, run when Python tears down its modules, could wait for one
    of them forever: the process hung at exit (every time, for a script that ended while its last
    jitted step was still in flight). So first the live results are waited for, then the client
    is given one extra reference, so that the destructor never runs; the operating system reclaims
    its memory and threads when the process ends, as it does for any process."""
    import ctypes
    for arr in jax.live_arrays():
        try:
            arr.block_until_ready()
        except Exception:  # noqa: BLE001 - a deleted or failed array has nothing left to wait for
            pass
    try:
        client = jax.devices("cpu")[0].client
    except Exception:  # noqa: BLE001 - no CPU backend was ever created: nothing to keep
        return
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(client))


def _target(key, build):
    """Register (once) the handler that ``build()`` makes, under a name derived from ``key``."""
    name = "fastloss_" + "_".join(str(k) for k in key)
    with _LOCK:
        if name not in _HANDLERS:
            check_available()
            if not _HANDLERS:
                atexit.register(_at_exit)
            handler = build()
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler.address), platform="cpu")
            _HANDLERS[name] = handler
    return name


def _labels(labels):
    # The handler reads int32 or int64 labels; other integer types (uint8, int16...) are widened.
    return labels if labels.dtype in (jnp.int32, jnp.int64) else labels.astype(jnp.int32)


def _acc(x):
    return np.float64 if x.dtype == jnp.float64 else np.float32


def _outs(first, x, other, want_x, want_other):
    """The results a handler writes: ``first`` (values), then the gradients asked for."""
    return ([first] + ([jax.ShapeDtypeStruct(x.shape, x.dtype)] if want_x else [])
            + ([jax.ShapeDtypeStruct(other.shape, other.dtype)] if want_other else []))


def _results(res, want_x, want_other):
    """(values, grad_x | None, grad_other | None) from the results of ``_outs``."""
    return res[0], (res[1] if want_x else None), (res[1 + want_x] if want_other else None)


def _call(name, outs, args, alias_grad, **attrs):
    # alias_grad only for kernels that read each logit before writing its gradient and never after
    # (the callers say which): the gradient takes the logits' buffer (input 0 -> output 1). In a
    # training step the logits are a dead intermediate by then, so a large (N, C) gradient needs no
    # fresh memory (XLA:CPU maps fresh pages for every execution: ~128,000 page faults for a 0.5 GB
    # gradient, as long as the kernel itself). Where the logits stay live (a jit argument), XLA
    # copies them first: an extra pass that a smaller gradient avoids (plan.FFI_ALIAS_MIN_BYTES).
    big = math.prod(args[0].shape) * args[0].dtype.itemsize >= plan.FFI_ALIAS_MIN_BYTES
    aliases = {0: 1} if alias_grad and big else {}
    res = jax.ffi.ffi_call(name, outs, vmap_method="sequential", input_output_aliases=aliases)(
        *args, **{k: np.int64(v) for k, v in attrs.items()})
    # Inside shard_map the results vary over the mesh axes their inputs vary over. The FFI call does
    # not say so by itself, and a JVP whose tangent varies while its primal does not is rejected.
    return [varying_like(r, args) for r in res]


def sparse_cross_entropy(x, labels, params, ignore_index, softcap=None, weighted=False, *, want_x=True,
                         want_other=False):
    """params: the option pack of jax_xla.sparse_cross_entropy (T, ε, z_loss, scale, weights)."""
    from ..kernels.numba_cpu import xla_ffi
    labels = _labels(labels)
    n, c = x.shape
    threads = _threads()
    path, chunks = plan.sparse_path(n, c, c, threads, plain=not weighted and not softcap)
    acc = _acc(x)
    xs, ys = _storage(x.dtype), _storage(labels.dtype)
    key = ("sparse", path, np.dtype(xs).name, np.dtype(ys).name, np.dtype(acc).name, int(weighted))
    name = _target(key, lambda: xla_ffi.sparse_handler(path, xs, ys, acc, weighted))
    outs = _outs(jax.ShapeDtypeStruct((n,), acc), x, None, want_x, False)
    # The handler reads the softcap (a static option here) as a fourth option: [T, ε, z_loss, cap,
    # scale, (C class weights)].
    pp = K.unpack_params(params.astype(acc), 3, weighted)
    p = K.pack_params(pp.options + (jnp.asarray(softcap or 0.0, acc),), pp.scale, pp.weights)
    # In place only on the paths that never read a logit after writing its row's gradient.
    res = _call(name, outs, (x, labels, p), want_x and path in ("short", "blocks"),
                ignore_index=R.kernel_ignore_index(ignore_index), n_chunks=chunks, threads=threads, want_x=want_x)
    return _results(res, want_x, False)


def _with_other(kind, build, x, other, params, want_x, want_other, outs0, in_place, **attrs):
    acc = _acc(x)
    xs, ts = _storage(x.dtype), _storage(other.dtype)
    key = (kind, np.dtype(xs).name, np.dtype(ts).name, np.dtype(acc).name)
    name = _target(key, lambda: build(xs, ts, acc))
    outs = _outs(outs0, x, other, want_x, want_other)
    res = _call(name, outs, (x, other, params.astype(acc)), want_x and in_place, want_x=want_x, want_other=want_other,
                **attrs)
    return _results(res, want_x, want_other)


def softmax_cross_entropy(x, targets, params, *, want_x=True, want_other=False):
    from ..kernels.numba_cpu import xla_ffi
    n, c = x.shape
    path = plan.dense_path(c, c, c)
    return _with_other(f"dense_{path}", lambda xs, ts, acc: xla_ffi.dense_handler(path, xs, ts, acc),
                       x, targets, params, want_x, want_other, jax.ShapeDtypeStruct((n,), _acc(x)),
                       path == "blocks" and not want_other, threads=_threads())


def _elementwise(loss):
    def run(x, targets, params, *, want_x=True, want_other=False, want_values=True):
        from ..kernels.numba_cpu import xla_ffi
        n = x.shape[0]
        first = jax.ShapeDtypeStruct((n if want_values else -(-n // BLOCK),), _acc(x))
        return _with_other(loss, lambda xs, ts, acc: xla_ffi.elementwise_handler(loss, xs, ts, acc),
                           x, targets, params, want_x, want_other, first,
                           loss in ("squared_error", "huber") or not want_other, want_values=want_values)
    run.__name__ = loss
    return run


sigmoid_cross_entropy = _elementwise("sigmoid_cross_entropy")
squared_error = _elementwise("squared_error")
huber = _elementwise("huber")
sigmoid_focal = _elementwise("sigmoid_focal")


def distillation(s, t, labels, params, divergence, ignore_index, has_labels, *, want_s=True, want_t=False):
    """The Numba distillation kernel inside XLA; the signature of jax_xla.distillation."""
    from ..kernels.numba_cpu import DIVERGENCES, xla_ffi
    n, c = s.shape
    acc = _acc(s)
    labels = _labels(labels) if has_labels else jnp.zeros((1,), jnp.int32)
    ss, ts, ys = _storage(s.dtype), _storage(t.dtype), _storage(labels.dtype)
    key = ("distill", np.dtype(ss).name, np.dtype(ts).name, np.dtype(ys).name, np.dtype(acc).name)
    name = _target(key, lambda: xla_ffi.distill_handler(ss, ts, ys, acc))
    outs = _outs(jax.ShapeDtypeStruct((n,), acc), s, t, want_s, want_t)
    # Every read of a student row comes before that row's gradient is written: in place is safe.
    res = _call(name, outs, (s, t, labels, params.astype(acc)), want_s, div=DIVERGENCES[divergence],
                has_labels=has_labels, ignore_index=R.kernel_ignore_index(ignore_index), threads=_threads(),
                want_other=want_t, want_x=want_s)
    return _results(res, want_s, want_t)


def softmax_focal(x, other, params, ignore_index=None, weighted=False, *, want_x=True, want_other=False):
    """The Numba softmax focal kernel inside XLA; the signature of jax_xla.softmax_focal (labels or
    dense targets in ``other``)."""
    from ..kernels.numba_cpu import xla_ffi
    n, c = x.shape
    dense = jnp.issubdtype(other.dtype, jnp.floating)
    other = other if dense else _labels(other)
    want_t = want_other and dense
    acc = _acc(x)
    xs, os_ = _storage(x.dtype), _storage(other.dtype)
    key = ("focal", np.dtype(xs).name, np.dtype(os_).name, np.dtype(acc).name, int(dense), int(weighted))
    name = _target(key, lambda: xla_ffi.focal_handler(xs, os_, acc, dense, weighted))
    outs = _outs(jax.ShapeDtypeStruct((n,), acc), x, other, want_x, want_t)
    # Each row's logits are read (statistics, terms) before its gradient is written: in place is safe.
    res = _call(name, outs, (x, other, params.astype(acc)), want_x, dense=dense,
                ignore_index=R.kernel_ignore_index(ignore_index), threads=_threads(), want_other=want_t, want_x=want_x)
    return _results(res, want_x, want_t)
