"""The JAX adapter: jax arrays (and tracers) on the XLA formulation or, on CPU, the Numba kernels.

Each loss is one ``jax.custom_jvp`` function over a fused kernel that returns the values and the
gradient together (``fastloss.kernels.jax_xla`` in XLA operations, or the Numba kernels through
the XLA FFI, ``fastloss._jax_ffi``):

- the primal alone (no differentiation) asks for no gradient;
- the JVP rule gets the gradient in the same kernel call and contracts it with the tangents, so
  forward mode (``jvp``, ``jacfwd``) and reverse mode (``grad``: JAX transposes the contraction into
  ``gradient * cotangent``) both work, and ``hessian`` too: the Numba kernel's own derivative is
  that of the XLA formulation. In reverse mode the saved residual is the gradient itself, computed
  in the forward's pass over the logits; with a cotangent of 1 (``grad`` of the loss) XLA drops the
  multiplication, so a training step makes one pass over the logits. No softmax is saved.
- the options (temperature, label smoothing, z-loss) are array values: jax scalars and tracers
  work under ``jit`` without recompiling, and the loss is differentiable with respect to them.

NumPy input gives NumPy output; float64 NumPy input is computed in float64 (x64 is switched on for
the call only), so automatic fallback to this backend never changes the numbers.
"""
from __future__ import annotations

import contextlib
import math
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from fastloss.kernels import jax_xla as K

from . import _adapter


def unavailable_reason():
    return None  # importing this module (jax) is the only requirement


def _is_jax(x):
    return isinstance(x, jax.Array)


def _check_not_torch(x, arg):
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        raise TypeError(f"the 'jax' backend takes jax or NumPy arrays; `{arg}` is a torch.Tensor. "
                        f"Use backend='numba' (CPU) or 'triton' (CUDA) for torch tensors.")


def _context(x, other):
    """x64 for float64 NumPy input (jax would silently demote it to float32 otherwise)."""
    numpy_in = not _is_jax(x)
    if numpy_in and (np.asarray(x).dtype == np.float64 or np.asarray(other).dtype == np.float64):
        return jax.enable_x64(True), numpy_in
    return contextlib.nullcontext(), numpy_in


def varying_like(out, args):
    """``out`` declared to vary over every ``shard_map`` mesh axis that one of ``args`` varies over
    (a no-op outside ``shard_map``): for results the type system cannot derive (an FFI call's
    outputs, a scan carry that starts from zeros)."""
    axes = frozenset().union(*(jax.typeof(a).manual_axis_type.varying for a in args))
    missing = tuple(sorted(axes - jax.typeof(out).manual_axis_type.varying))
    return jax.lax.pcast(out, missing, to="varying") if missing else out


def _out(value, numpy_in):
    if not numpy_in:
        return value
    return jax.tree_util.tree_map(np.asarray, value)


# ----------------------------------------------------------------------------- the kernels
# loss -> (XLA kernel, XLA option derivatives, FFI kernel name, option names in params order)
_OPTIONS = {
    "sparse_softmax_cross_entropy": ("temperature", "label_smoothing", "z_loss"),
    "softmax_cross_entropy": ("temperature", "label_smoothing"),
    "sigmoid_cross_entropy": ("label_smoothing",),
    "mean_squared_error": (),
    "huber": ("delta",),
    "sigmoid_focal_loss": ("gamma", "alpha", "apply_class_balancing", "label_smoothing"),
    "softmax_focal_loss": ("gamma", "label_smoothing", "alpha"),
}
_XLA = {
    "sparse_softmax_cross_entropy": (K.sparse_cross_entropy, K.sparse_option_grads),
    "softmax_cross_entropy": (K.softmax_cross_entropy, K.softmax_option_grads),
    "sigmoid_cross_entropy": (K.sigmoid_cross_entropy, K.sigmoid_option_grads),
    "mean_squared_error": (K.squared_error, None),
    "huber": (K.huber, K.huber_option_grads),
    "sigmoid_focal_loss": (K.sigmoid_focal, K.sigmoid_focal_option_grads),
    "softmax_focal_loss": (K.softmax_focal, None),  # option derivatives by forward mode (_option_rows)
}
_FFI = {"sparse_softmax_cross_entropy": "sparse_cross_entropy", "softmax_cross_entropy": "softmax_cross_entropy",
        "sigmoid_cross_entropy": "sigmoid_cross_entropy", "mean_squared_error": "squared_error",
        "huber": "huber", "sigmoid_focal_loss": "sigmoid_focal", "softmax_focal_loss": "softmax_focal"}


def _elementwise(name):
    return _adapter.ROW_NDIM[name] == 0


def _kwargs(spec):
    """The kernel's static keyword options: spec[1] holds them as (name, value) pairs (sparse CE:
    ignore_index and softcap; softmax focal: ignore_index; none for the other losses)."""
    return dict(spec[1])


def _xla_kernel(spec, x, other, params, want_x, want_other):
    name, _, reduction, _ = spec
    values, gx, go = _XLA[name][0](x, other, params, **_kwargs(spec), want_x=want_x, want_other=want_other)
    if _elementwise(name) and reduction != "none":
        values = _block_sums(values)  # the shape the Numba kernel returns
    return values, gx, go


def _block_sums(values):
    """Per-block sums over PARTIAL_BLOCK elements: what the Numba elementwise kernels return when
    only the total is needed (no per-element store), computed the same way here so the two kernels
    are interchangeable inside one program."""
    b = _adapter.PARTIAL_BLOCK
    pad = (-values.shape[0]) % b
    if pad:
        values = jnp.concatenate([values, jnp.zeros((pad,), values.dtype)])
    return jnp.sum(values.reshape(-1, b), axis=-1)


@partial(jax.custom_jvp, nondiff_argnums=(0, 4, 5))
def _numba_kernel(spec, x, other, params, want_x, want_other):
    from . import _jax_ffi
    name, _, reduction, _ = spec
    kw = _kwargs(spec)
    if _elementwise(name):
        kw["want_values"] = reduction == "none"
    return getattr(_jax_ffi, _FFI[name])(x, other, params, **kw, want_x=want_x, want_other=want_other)


@_numba_kernel.defjvp
def _numba_kernel_jvp(spec, want_x, want_other, primals, tangents):
    # Second order (a derivative of the gradient): that of the XLA formulation, the same math.
    return jax.jvp(lambda a, b, c: _xla_kernel(spec, a, b, c, want_x, want_other), primals, tangents)


_PALLAS = {"sparse_softmax_cross_entropy": "sparse_cross_entropy", "softmax_cross_entropy": "softmax_cross_entropy"}


def _interpret_pallas():
    """Pallas off a GPU runs only in interpret mode, and only when asked for (as Triton's torch
    kernels): TRITON_INTERPRET=1."""
    import os
    return os.environ.get("TRITON_INTERPRET") == "1"


@partial(jax.custom_jvp, nondiff_argnums=(0, 4, 5, 6))
def _pallas_kernel(spec, x, other, params, want_x, want_other, interpret):
    from fastloss.kernels import pallas_gpu
    return getattr(pallas_gpu, _PALLAS[spec[0]])(x, other, params, **_kwargs(spec), want_x=want_x,
                                                 want_other=want_other, interpret=interpret)


@_pallas_kernel.defjvp
def _pallas_kernel_jvp(spec, want_x, want_other, interpret, primals, tangents):
    # Second order: that of the XLA formulation, the same math.
    return jax.jvp(lambda a, b, c: _xla_kernel(spec, a, b, c, want_x, want_other), primals, tangents)


def _pallas_fits(spec, x):
    from fastloss.kernels import pallas_gpu
    return spec[0] in _PALLAS and pallas_gpu.fits(x)


def _kernel(spec, x, other, params, want_x, want_other):
    """The fused kernel ``spec`` asks for: (values, grad_x | None, grad_other | None); the
    cross-entropies' kernels run shard by shard under sharding (``fastloss._jax_partition``)."""
    from . import _jax_partition
    # Explicit sharding (sharding in types) keeps the kernel unwrapped: custom_partitioning places
    # ops by XLA's automatic partitioner, which those types bypass.
    if spec[0] in _jax_partition.PARTITIONED and not _jax_partition.explicit_axes(x) \
            and not _jax_partition.in_manual_context():
        return _jax_partition.partitioned_kernel(_local_kernel, spec, x, other, params, want_x, want_other)
    return _local_kernel(spec, x, other, params, want_x, want_other)


def _local_kernel(spec, x, other, params, want_x, want_other):
    """The fused kernel on the rows at hand (one device's shard under sharding)."""
    provider = spec[3]
    xla = partial(_xla_kernel, spec, want_x=want_x, want_other=want_other)
    if provider == "xla":
        return xla(x, other, params)
    if provider == "numba":
        return _numba_kernel(spec, x, other, params, want_x, want_other)
    if provider == "pallas":
        if not _pallas_fits(spec, x):
            return xla(x, other, params)  # int32 addressing: see kernels/pallas_gpu.py
        return jax.lax.platform_dependent(
            x, other, params,
            cuda=lambda a, b, c: _pallas_kernel(spec, a, b, c, want_x, want_other, False),
            default=lambda a, b, c: _pallas_kernel(spec, a, b, c, want_x, want_other, True))
    # Automatic: the Numba kernel where the program runs on CPU, the Pallas kernel on an NVIDIA GPU,
    # XLA anywhere else; XLA picks the branch when it compiles for a platform, so one traced program
    # stays portable.
    branches = {}
    from . import _jax_ffi, _jax_partition
    if provider == "auto" and _jax_ffi.preferred(spec[0], x):
        branches["cpu"] = lambda a, b, c: _numba_kernel(spec, a, b, c, want_x, want_other)
    if _pallas_fits(spec, x) and not _jax_partition.explicit_axes(x):
        # (Pallas cannot trace arrays whose types carry explicit sharding: those take XLA on GPUs.)
        branches["cuda"] = lambda a, b, c: _pallas_kernel(spec, a, b, c, want_x, want_other, False)
    if not branches:
        return xla(x, other, params)
    return jax.lax.platform_dependent(x, other, params, default=xla, **branches)


# ------------------------------------------------------------------------------- the loss
def reduce_rows(values, params, reduction):
    """The loss from a kernel's values: per row for "none", else the accurate total, times the
    mean's 1/count (``params[-1]``, 1 for "sum"). Every loss here (and linear + CE) reduces so."""
    if reduction == "none":
        return values
    total = K.accurate_sum(values)
    return total * params[-1] if reduction == "mean" else total


def _finish(values, params, spec):
    return reduce_rows(values, params, spec[2])


def _is_zero(t):
    return type(t) is SymbolicZero


def _contract(g, dv, spec):
    """<g, dv> in the accumulation dtype: over the class axis per row for "none", else in full."""
    acc = K.acc_dtype(g)
    prod = g.astype(acc) * dv.astype(acc)
    if spec[2] != "none":
        return jnp.sum(prod)
    return prod if _elementwise(spec[0]) else jnp.sum(prod, axis=-1)


def _wide_for_none(spec, x, other):
    """16-bit inputs widened to fp32 for reduction="none": the kernel's gradient is that of a
    cotangent of 1 and is scaled by the actual per-element cotangent afterwards, so stored in the
    input's dtype it could overflow float16 where the scaled one does not (a focal loss's target
    gradient reaches 3|x|: 9e4 at x = -3e4), and it would be rounded twice. The kernels widen every
    load to fp32 anyway, so the values are the same; torch keeps such gradients in fp32 likewise."""
    if spec[2] != "none" or x.dtype not in (jnp.bfloat16, jnp.float16):
        return x, other
    wide = other.astype(jnp.float32) if jnp.issubdtype(other.dtype, jnp.floating) else other
    return x.astype(jnp.float32), wide


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _loss(spec, x, other, params):
    values, _, _ = _kernel(spec, x, other, params, False, False)
    return _finish(values, params, spec)


@partial(_loss.defjvp, symbolic_zeros=True)
def _loss_jvp(spec, primals, tangents):
    x, other, params = primals
    dx, d_other, d_params = tangents
    name = spec[0]
    want_x = not _is_zero(dx)
    want_other = not _is_zero(d_other) and name != "sparse_softmax_cross_entropy"
    values, gx, go = _kernel(spec, *_wide_for_none(spec, x, other), params, want_x, want_other)
    out = _finish(values, params, spec)
    tangent = jnp.zeros_like(out)
    if want_x:
        tangent = tangent + _contract(gx, dx, spec)
    if want_other:
        tangent = tangent + _contract(go, d_other, spec)
    if _OPTIONS[name] and not _is_zero(d_params):
        # d loss / d option: per-row derivatives (XLA, one more pass, only when an option is
        # being differentiated) weighted like the rows.
        rows = _option_rows(spec, x, other, params, d_params.astype(out.dtype))
        tangent = tangent + (rows if spec[2] == "none" else jnp.sum(rows) * params[-1])
    return out, tangent


def _option_rows(spec, x, other, params, d_params):
    """Σ_option d row / d option · tangent, per row: the loss's closed-form option derivatives, or
    forward mode through its XLA formulation (whose rows do not read the scale entry)."""
    name = spec[0]
    kernel, option_grads = _XLA[name]
    if option_grads is not None:
        return option_grads(x, other, params, **_kwargs(spec)) @ d_params[:len(_OPTIONS[name])]
    return jax.jvp(lambda p: kernel(x, other, p, **_kwargs(spec), want_x=False, want_other=False)[0],
                   (params,), (d_params,))[1]


# ---------------------------------------------------------------------------- the adapter
def _option(value, name, acc, loss=None):
    """An option as an array in the accumulation dtype. A traced value cannot raise, so one
    outside its range makes the loss NaN (as a traced out-of-range label does); Python and
    concrete values were checked eagerly already, so for them the select is a no-op."""
    v = jnp.asarray(value, dtype=acc)
    ok = {"temperature": (v > 0) & jnp.isfinite(v),
          "label_smoothing": (v >= 0) & (v <= 1),
          "z_loss": (v >= 0) & jnp.isfinite(v),
          "delta": (v > 0) & jnp.isfinite(v),
          "gamma": (v >= 0) & jnp.isfinite(v),
          "alpha": (v >= 0) & (v <= 1),
          "apply_class_balancing": (v == 0) | (v == 1)}[_CHECKED_AS.get((loss, name), name)]
    return jnp.where(ok, v, jnp.nan)


_CHECKED_AS = {("softmax_focal_loss", "alpha"): "gamma"}  # a factor >= 0, not sigmoid focal's α in [0, 1]


def _has_labels(name, other):
    """Whether ``other`` holds integer labels (sparse CE always; the focal loss when not float)."""
    return name == "sparse_softmax_cross_entropy" or (name == "softmax_focal_loss"
                                                      and not jnp.issubdtype(other.dtype, jnp.floating))


def _sparse_scale_and_weights(labels, weight, ignore_index, n_cls, acc):
    """(count "mean" divides by, weights to append to params): the non-ignored rows, or with class
    weights the sum of the counted rows' label weights (as torch). Weights are not differentiated
    (as in torch): they enter with stop_gradient."""
    kept = ~K.is_ignored(labels, ignore_index)
    if weight is None:
        return jnp.sum(kept).astype(acc), jnp.zeros((0,), acc)
    w = jax.lax.stop_gradient(jnp.asarray(weight, acc).reshape(-1))
    counted = kept & (labels >= 0) & (labels < n_cls)
    return jnp.sum(jnp.where(counted, w[jnp.clip(labels, 0, n_cls - 1)], 0)), w


@partial(jax.jit, static_argnames=("spec",))
def _core(x, other, options, weight=None, *, spec):
    """The whole loss, jitted so eager calls run as one XLA program (inlined under an outer jit)."""
    name, statics, reduction, _ = spec
    row_ndim = _adapter.ROW_NDIM[name]
    lead = x.shape[:x.ndim - row_ndim]
    if row_ndim:
        x2 = x.reshape(-1, x.shape[-1])
        o2 = other.reshape(-1) if _has_labels(name, other) else other.reshape(-1, x.shape[-1])
    else:
        x2, o2 = x.reshape(-1), other.reshape(-1)
    acc = K.acc_dtype(x)
    weights = jnp.zeros((0,), acc)
    if name == "sparse_softmax_cross_entropy":
        count, weights = _sparse_scale_and_weights(o2, weight, dict(statics)["ignore_index"], x.shape[-1], acc)
    elif name == "softmax_focal_loss":  # the per-class α ride where sparse CE's weights do
        count = jnp.asarray(math.prod(lead), acc)
        if _has_labels(name, o2):
            count = jnp.sum(~K.is_ignored(o2, dict(statics)["ignore_index"])).astype(acc)
        if weight is not None:
            weights = jax.lax.stop_gradient(jnp.asarray(weight, acc).reshape(-1))
    else:
        count = jnp.asarray(math.prod(lead), acc)
    scale = 1.0 / jnp.where(count != 0, count, 1).astype(acc) if reduction == "mean" else jnp.ones((), acc)
    opts = (jnp.stack([_option(v, k, acc, name) for k, v in zip(_OPTIONS[name], options)]) if options
            else jnp.zeros(0, acc))
    params = jnp.concatenate([opts.astype(acc), weights, scale.reshape(1).astype(acc)])
    out = _loss(spec, x2, o2, params)
    return out.reshape(lead) if reduction == "none" else out


def _check_labels_eagerly(labels, n_cls, ignore_index):
    """ValueError for an out-of-range label on eager calls; under jit (a tracer) the kernel's NaN
    row is the answer, because a traced value cannot raise."""
    if not isinstance(labels, jax.core.Tracer):
        _adapter.check_label_range(np.asarray(labels), n_cls, ignore_index)


def _provider(backend, name=None):
    """"xla" for backend="jax", "numba" for backend="numba" and "pallas" for backend="triton" (checked
    now: an explicit choice raises its failure); for no choice "auto" (Numba on CPU where it can run
    inside XLA, Pallas on NVIDIA GPUs, XLA elsewhere) or "auto-gpu" (no Numba)."""
    if backend == "jax":
        return "xla"
    if backend == "triton":
        _check_pallas(name)
        return "pallas"
    from . import _jax_ffi
    if backend == "numba":
        _jax_ffi.check_available()
        return "numba"
    return "auto" if _jax_ffi.unavailable_reason() is None else "auto-gpu"


def _check_pallas(name):
    if name is not None and name not in _PALLAS:
        raise ValueError(f"backend='triton' for jax arrays runs the Pallas kernels, which cover "
                         f"{sorted(_PALLAS)}; received a call of {name!r}. Use backend=None or 'jax'.")
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"fastloss backend 'triton' cannot run on jax arrays here: jax's Pallas Triton "
                           f"lowering is not importable ({exc})") from exc
    if jax.default_backend() != "gpu" and not _interpret_pallas():
        raise RuntimeError("fastloss backend 'triton' runs jax arrays on an NVIDIA GPU (Pallas kernels); "
                           "here jax has no GPU. Set TRITON_INTERPRET=1 to run them in Pallas' interpreter "
                           "(slow), or use backend='jax' or 'numba'.")


def _run(name, x, other, opts, with_grad, backend=None):
    _check_not_torch(x, "predictions" if name in ("mean_squared_error", "huber") else "logits")
    _check_not_torch(other, "labels/targets")
    if _has_labels(name, other):
        _check_labels_eagerly(other, x.shape[-1], opts["ignore_index"])
    statics = ()
    if name == "sparse_softmax_cross_entropy":
        statics = (("ignore_index", opts["ignore_index"]), ("softcap", opts.get("softcap")))
    elif name == "softmax_focal_loss":
        statics = (("ignore_index", opts["ignore_index"]),)
    spec = (name, statics, opts["reduction"], _provider(backend, name))
    options = tuple(opts[k] for k in _OPTIONS[name])
    weight = opts.get("weight")
    ctx, numpy_in = _context(x, other)
    with ctx:
        xj, oj = jnp.asarray(x), jnp.asarray(other)
        core = partial(_core, spec=spec)
        if with_grad:
            return _out(jax.value_and_grad(core)(xj, oj, options, weight), numpy_in)
        return _out(core(xj, oj, options, weight), numpy_in)


def call(name, x, other, opts, backend=None):
    """The loss of jax (or NumPy) input on ``backend`` ("jax": the XLA formulation; "numba": the
    Numba kernels through the XLA FFI; None: automatic)."""
    return _run(name, x, other, opts, False, backend)


def _loss_entry(name):
    def entry(x, other, opts):
        return _run(name, x, other, opts, with_grad=False, backend="jax")
    entry.__name__ = name
    return entry


LOSSES = _adapter.loss_table(_loss_entry)


def value_and_grad(name, x, other, opts, backend="jax"):
    return _run(name, x, other, opts, with_grad=True, backend=backend)


# ---------------------------------------------------------------------------- distillation
# spec = (divergence, ignore_index, has_labels, reduction, provider); params = [T, α, β, scale].
def _distill_xla(spec, s, t, labels, params, want_s, want_t):
    divergence, ignore_index, has_labels, _, _ = spec
    return K.distillation(s, t, labels, params, divergence, ignore_index, has_labels, want_s=want_s, want_t=want_t)


@partial(jax.custom_jvp, nondiff_argnums=(0, 5, 6))
def _distill_numba(spec, s, t, labels, params, want_s, want_t):
    from . import _jax_ffi
    divergence, ignore_index, has_labels, _, _ = spec
    return _jax_ffi.distillation(s, t, labels, params, divergence, ignore_index, has_labels, want_s=want_s,
                                 want_t=want_t)


@_distill_numba.defjvp
def _distill_numba_jvp(spec, want_s, want_t, primals, tangents):
    # Second order: the XLA formulation's derivative (the same math).
    return jax.jvp(lambda a, b, c, d: _distill_xla(spec, a, b, c, d, want_s, want_t), primals, tangents)


def _distill_kernel(spec, s, t, labels, params, want_s, want_t):
    provider = spec[4]
    if provider in ("xla", "auto-gpu"):  # no Pallas distillation kernel (yet): XLA off the CPU
        return _distill_xla(spec, s, t, labels, params, want_s, want_t)
    if provider == "numba":
        return _distill_numba(spec, s, t, labels, params, want_s, want_t)
    return jax.lax.platform_dependent(
        s, t, labels, params,
        cpu=lambda a, b, c, d: _distill_numba(spec, a, b, c, d, want_s, want_t),
        default=lambda a, b, c, d: _distill_xla(spec, a, b, c, d, want_s, want_t))


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _distill_loss(spec, s, t, labels, params):
    values, _, _ = _distill_kernel(spec, s, t, labels, params, False, False)
    return reduce_rows(values, params, spec[3])


@partial(_distill_loss.defjvp, symbolic_zeros=True)
def _distill_loss_jvp(spec, primals, tangents):
    s, t, labels, params = primals
    ds, dt, _, d_params = tangents
    want_s, want_t = not _is_zero(ds), not _is_zero(dt)
    values, gs, gt = _distill_kernel(spec, s, t, labels, params, want_s, want_t)
    reduction = spec[3]
    out = reduce_rows(values, params, reduction)
    tangent = jnp.zeros_like(out)
    for g, dv in ((gs, ds), (gt, dt)):
        if g is not None:
            prod = g.astype(out.dtype) * dv.astype(out.dtype)
            tangent = tangent + (jnp.sum(prod, axis=-1) if reduction == "none" else jnp.sum(prod))
    if not _is_zero(d_params):
        # d loss / d (T, α, β): forward mode through the XLA formulation's rows (one more pass, only
        # when an option is being differentiated). The rows do not depend on the scale entry.
        rows = jax.jvp(lambda p: _distill_xla(spec, s, t, labels, p, False, False)[0], (params,), (d_params,))[1]
        tangent = tangent + (rows if reduction == "none" else jnp.sum(rows) * (params[-1] if reduction == "mean"
                                                                               else 1.0))
    return out, tangent


def _unit_option(value, acc):
    v = jnp.asarray(value, dtype=acc)
    return jnp.where((v >= 0) & (v <= 1), v, jnp.nan)


@partial(jax.jit, static_argnames=("spec",))
def _distill_core(s, t, labels, options, *, spec):
    _, ignore_index, has_labels, reduction, _ = spec
    lead = s.shape[:-1]
    c = s.shape[-1]
    s2, t2 = s.reshape(-1, c), t.reshape(-1, c)
    y = labels.reshape(-1) if has_labels else jnp.zeros((s2.shape[0],), jnp.int32)
    acc = K.acc_dtype(s)
    count = jnp.sum(~K.is_ignored(y, ignore_index)) if has_labels else math.prod(lead)
    scale = 1.0 / jnp.maximum(count, 1).astype(acc) if reduction == "mean" else jnp.ones((), acc)
    temp, alpha, beta = options
    params = jnp.stack([_option(temp, "temperature", acc), _unit_option(alpha, acc), _unit_option(beta, acc),
                        scale]).astype(acc)
    out = _distill_loss(spec, s2, t2, y, params)
    return out.reshape(lead) if reduction == "none" else out


def distill(s, t, labels, opts, backend, want_s):
    """distillation_loss of jax (or NumPy) input: the loss, and with ``want_s`` the gradient to the
    student logits (``jax.value_and_grad``)."""
    _check_not_torch(s, "student_logits")
    _check_not_torch(t, "teacher_logits")
    has_labels = labels is not None
    if has_labels:
        _check_not_torch(labels, "labels")
        _check_labels_eagerly(labels, s.shape[-1], opts["ignore_index"])
    spec = (opts["divergence"], opts["ignore_index"], has_labels, opts["reduction"], _provider(backend))
    options = (opts["temperature"], opts["alpha"], opts["beta"])
    ctx, numpy_in = _context(s, t)
    with ctx:
        sj, tj = jnp.asarray(s), jnp.asarray(t)
        yj = jnp.asarray(labels) if has_labels else jnp.zeros((), jnp.int32)
        core = partial(_distill_core, spec=spec)
        if want_s:
            return _out(jax.value_and_grad(core)(sj, tj, yj, options), numpy_in)
        return _out(core(sj, tj, yj, options), numpy_in), None
