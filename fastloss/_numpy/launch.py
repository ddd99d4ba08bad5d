"""The Numba launchers: NumPy arrays and torch CPU tensors on ``fastloss.kernels.numba_cpu``.

Zero-copy: NumPy arrays and torch CPU tensors are passed as they are when C-contiguous, and so
are row-strided cross-entropy inputs (unit-stride classes, any row stride, e.g. ``logits[:, :V]``);
other layouts are copied once, since the kernels stream rows. Gradients are
written straight into the returned array or tensor, whose memory comes from ``_buffers`` (reused
between calls once the user has dropped it). 16-bit data travel as raw bits (bfloat16 as uint16,
float16 as int16; see the kernel module). One kernel call gives loss and gradient.
"""
from __future__ import annotations

import numpy as np

from .. import _chunks
from .. import _reduction as R
from .._frameworks import is_torch as _is_torch
from .._validation import dtype_name, is_integer_dtype
from . import buffers, threads

threads.prefer_tbb()  # before Numba's first parallel launch: a fork-safe layer (threads.py)

from ..kernels import numba_cpu as K  # noqa: E402 - after the threading layer is settled
from ..kernels.numba_cpu.options import (dense_options, distill_options, focal_options,  # noqa: E402
                                         sparse_options)
from ..kernels.numba_cpu import plan  # noqa: E402


def unavailable_reason():
    return None


_BITS = {"float16": np.int16, "bfloat16": np.uint16}


def _torch():
    import torch
    return torch


def _kernel_view(a):
    """A C-contiguous NumPy view of ``a`` with kernel element types (16-bit floats as bits)."""
    name = dtype_name(a)
    if _is_torch(a):
        if a.device.type != "cpu":
            raise TypeError(f"the 'numba' backend runs on CPU tensors; received a tensor on {a.device}. "
                            f"Use backend='triton' for CUDA tensors.")
        a = a.detach().contiguous()
        if name in _BITS:
            a = a.view(_torch().int16)  # torch has no NumPy bfloat16: reinterpret the bits
        arr = a.numpy()
    else:
        arr = np.ascontiguousarray(a)
    arr = arr.view(_BITS[name]) if name in _BITS else arr.view()
    # Inputs are read, never written: one read-only view type whether the caller's array is writable
    # or not (np.asarray of a jax array is read-only), so each kernel compiles one specialisation.
    arr.flags.writeable = False
    return arr


def row_view(a, n_cls):
    """(flat, row_stride, n_rows): the rows of ``a`` (shape (..., C)) as a flat 1-D array in which row
    i is ``flat[i * row_stride : i * row_stride + C]``, for the cross-entropy kernels.

    Arrays whose class axis is unit-stride and whose leading axes collapse to one row stride, such
    as ``logits[:, :V]`` of a padded vocabulary, are streamed as they are; anything else is copied
    once. ``flat`` spans exactly the elements from the first row's start to the last row's end,
    so it never reaches past the array's memory (the padding between rows is never read).
    """
    name = dtype_name(a)
    if _is_torch(a):
        if a.device.type != "cpu":
            raise TypeError(f"the 'numba' backend runs on CPU tensors; received a tensor on {a.device}. "
                            f"Use backend='triton' for CUDA tensors.")
        a = a.detach()
        if name in _BITS:
            a = a.view(_torch().int16)
        arr = a.numpy()
    else:
        arr = np.asarray(a)
    if name in _BITS:
        arr = arr.view(_BITS[name])
    if arr.flags.c_contiguous:  # the common case, checked first (the general one costs ~5 us)
        flat = arr.reshape(-1)
        flat.flags.writeable = False  # read-only like the strided view: one kernel specialisation
        return flat, n_cls, flat.shape[0] // n_cls
    try:
        rows = np.reshape(arr, (-1, n_cls), copy=False)
    except ValueError:
        rows = None
    item = arr.itemsize
    if (rows is None or rows.shape[0] == 0 or rows.strides[1] != item or rows.strides[0] % item
            or rows.strides[0] < n_cls * item):
        rows = np.ascontiguousarray(arr).reshape(-1, n_cls)
    n = rows.shape[0]
    stride = rows.strides[0] // item if n > 1 else n_cls
    span = (n - 1) * stride + n_cls if n else 0
    if rows.flags.c_contiguous:  # the common case: a plain reshape (as_strided costs ~20 us)
        flat = rows.reshape(-1)
        flat.flags.writeable = False  # read-only like the strided view: one kernel specialisation
    else:
        flat = np.lib.stride_tricks.as_strided(rows, shape=(span,), strides=(item,), writeable=False)
    return flat, stride, n


def _acc(name):
    return np.float64 if name == "float64" else np.float32


class _Out:
    """Allocates outputs in the input's framework and hands the kernel NumPy views of them."""

    def __init__(self, like):
        self.torch = _is_torch(like)

    def empty(self, shape, name):
        # Large gradients reuse memory from fastloss._buffers (no page faults per step); the array
        # or tensor returned to the user owns its block until the user drops it.
        arr = buffers.empty(shape, _BITS.get(name, name))
        if self.torch:
            t = _torch()
            tt = t.from_numpy(arr)
            return (tt.view(getattr(t, name)) if name in _BITS else tt), arr
        return arr, arr

    def finish(self, obj, name):
        """The user-facing object: torch tensor as is; NumPy bits viewed back as float16/bfloat16."""
        if self.torch or name not in _BITS:
            return obj
        if name == "bfloat16":
            import ml_dtypes
            return obj.view(ml_dtypes.bfloat16)
        return obj.view(np.float16)

    def scalar(self, value, acc):
        arr = np.array(value, dtype=acc)
        # from_numpy of a 0-d array: torch.tensor(value, dtype=...) costs ~4x as much per call
        return _torch().from_numpy(arr) if self.torch else arr[()]

    def array(self, values):
        return _torch().from_numpy(values) if self.torch else values


def _workers(n_elements=None):
    """The workers a kernel call splits its work over: 1 below plan.SERIAL_MAX_ELEMENTS."""
    if n_elements is not None and n_elements < plan.SERIAL_MAX_ELEMENTS:
        return 1
    import numba
    return numba.get_num_threads()


def _launch(kernel, n_elements, *args):
    """``kernel(*args)``; below plan.SERIAL_MAX_ELEMENTS on the calling thread alone (Numba's thread
    count is per calling thread), so the pool's sleeping worker is not woken for a few microseconds
    of work."""
    if n_elements >= plan.SERIAL_MAX_ELEMENTS:
        return kernel(*args)
    import numba
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(before)


def _total(values):
    # pairwise, in fp64: the long sum stays exact (np.add.reduce: np.sum's wrapper costs ~4 us)
    return np.add.reduce(values.reshape(-1), dtype=np.float64)


def _reduce(values, reduction, count, acc, out, shape):
    if reduction == "none":
        return out.array(values.reshape(shape))
    return out.scalar(acc(R.reduce(values, reduction, count, shape, _total)), acc)


def _scale(reduction, count, acc):
    return acc(R.mean_scale(reduction, count))


def _grad_names(grad_dtype, *names):
    """The gradients' storage dtypes: the inputs', or ``grad_dtype`` (float32) when the caller
    rescales them afterwards (fastloss._torch.ops, 16-bit inputs with reduction="none")."""
    return tuple(grad_dtype or n for n in names)


# ---------------------------------------------------------------------------- loss runners
def sparse_cross_entropy(x, labels, opts, want_x, want_other, *, grad_dtype=None, grad_scale=None, in_place=False,
                         labels_checked=False):
    """Sparse softmax CE. ``grad_scale``: d total / d row set by the caller (a chunk of a larger
    "mean"); ``in_place``: the gradient may overwrite ``x`` (a temporary the caller owns);
    ``labels_checked``: the caller checked the label range already. Accepted as the Triton
    launcher's is; it costs nothing to honour here: the kernel flags a bad label as it reads it,
    and only then is the range checked, for the error message."""
    name = dtype_name(x)
    acc = _acc(name)
    n_cls = x.shape[-1]
    xv, stride, n = row_view(x, n_cls)
    size = n * n_cls
    threads = _workers(size)
    y = _kernel_view(labels).reshape(-1)
    if y.dtype != np.int64:
        y = y.astype(np.int64)
        y.flags.writeable = False
    out = _Out(x)
    ign = R.kernel_ignore_index(opts["ignore_index"])
    count = int(R.mean_count(y, opts["ignore_index"], n_cls, xp=np))
    loss = np.empty(n, acc)
    lse = np.empty(n, acc)
    gname, = _grad_names(grad_dtype, name)
    w, count = _class_weights(opts.get("weight"), y, opts["ignore_index"], n_cls, acc, count)
    cap = opts.get("softcap") or 0.0
    path, chunks = plan.sparse_path(n, n_cls, stride, threads, plain=w.shape[0] == 0 and not cap)
    if want_x and in_place and path in ("short", "blocks") and stride == n_cls:
        # the linear head's chunk logits (a temporary it owns): the gradient overwrites them.
        # Only on the paths that read each row's logits before writing its gradient, never after.
        g_obj, g = x, xv.view()
        g.flags.writeable = True
    else:
        g_obj, g = out.empty(tuple(x.shape), gname) if want_x else (None, _dummy_rows(xv, n_cls))
    scale = acc(grad_scale) if grad_scale is not None else _scale(opts["reduction"], count, acc)
    kopts = sparse_options(acc(opts["temperature"]), acc(opts["label_smoothing"]), acc(opts["z_loss"]), acc(cap), scale)
    g2 = g.reshape(-1, n_cls)
    if path == "tiny":
        bad = _launch(K.sparse_tiny, size, xv, n_cls, y, loss, lse, g2, kopts, ign, want_x, threads)
    elif path == "split":
        bad = _launch(K.sparse_split, size, xv, stride, n_cls, y, loss, lse, g2, kopts, ign, want_x, chunks, threads)
    else:
        bad = _launch(K.SPARSE[path], size, xv, stride, n_cls, y, loss, lse, g2, kopts, w, ign, want_x, threads)
    if bad and not labels_checked:
        R.check_label_range(y, n_cls, opts["ignore_index"])
    value = _reduce(loss, opts["reduction"], count, acc, out, tuple(x.shape[:-1]))
    return value, (out.finish(g_obj, gname) if want_x else None), None


def _class_weights(weight, y, ignore_index, n_cls, acc, count):
    """(w, count): the kernel's weights ((C,) in the accumulation dtype, read-only; empty for none)
    and what "mean" divides by: the number of counted rows, or with weights the sum of their
    labels' weights (as torch; a sum of 0 divides by 1, as an empty batch does, where torch gives
    NaN)."""
    if weight is None:
        return _NO_WEIGHTS[acc], count
    w = _class_array(weight, acc)
    return w, float(R.mean_count(y, ignore_index, n_cls, w.astype(np.float64), xp=np))


def _class_array(values, acc):
    """A (C,) per-class array (class weights, the focal loss's α) as the kernels read it: the
    accumulation dtype, contiguous, read-only (one kernel specialisation)."""
    w = np.ascontiguousarray(_kernel_view(values).reshape(-1), dtype=acc)
    w.flags.writeable = False
    return w


_NO_WEIGHTS = {acc: np.zeros(0, acc) for acc in (np.float32, np.float64)}  # by the accumulation type
_NO_TARGETS = {acc: np.zeros(1, acc) for acc in (np.float32, np.float64)}  # focal with labels: never read
for _w in (*_NO_WEIGHTS.values(), *_NO_TARGETS.values()):
    _w.flags.writeable = False


def _dummy_rows(xv, n_cls):
    # The gradient argument of a forward-only call: never written (want_grad=False), but typed.
    return np.empty((1, n_cls), xv.dtype)


def softmax_cross_entropy(x, t, opts, want_x, want_other, *, grad_dtype=None):
    name, tname = dtype_name(x), dtype_name(t)
    acc = _acc(name)
    n_cls = x.shape[-1]
    xv, x_stride, n = row_view(x, n_cls)
    tv, t_stride, _ = row_view(t, n_cls)
    out = _Out(x)
    loss = np.empty(n, acc)
    lse = np.empty(n, acc)
    gname, gtname = _grad_names(grad_dtype, name, tname)
    gx_obj, gx = out.empty(tuple(x.shape), gname) if want_x else (None, _dummy_rows(xv, n_cls))
    gt_obj, gt = out.empty(tuple(t.shape), gtname) if want_other else (None, _dummy_rows(tv, n_cls))
    kopts = dense_options(acc(opts["temperature"]), acc(opts["label_smoothing"]),
                          _scale(opts["reduction"], n, acc))
    gx2, gt2 = gx.reshape(-1, n_cls), gt.reshape(-1, n_cls)
    size = n * n_cls
    if plan.dense_path(n_cls, x_stride, t_stride) == "tiny":
        _launch(K.dense_tiny, size, xv, tv, n_cls, loss, lse, gx2, gt2, kopts, want_x, want_other, _workers(size))
    else:
        _launch(K.dense_blocks, size, xv, x_stride, tv, t_stride, n_cls, loss, lse, gx2, gt2, kopts, want_x,
                want_other, _workers(size))
    value = _reduce(loss, opts["reduction"], n, acc, out, tuple(x.shape[:-1]))
    return (value, out.finish(gx_obj, gname) if want_x else None,
            out.finish(gt_obj, gtname) if want_other else None)


def softmax_focal(x, other, opts, want_x, want_other, *, grad_dtype=None):
    """Integer labels (ignore_index applies) or dense targets (..., C): one kernel, see focal.py."""
    name = dtype_name(x)
    acc = _acc(name)
    n_cls = x.shape[-1]
    xv, x_stride, n = row_view(x, n_cls)
    dense = not is_integer_dtype(dtype_name(other))
    if dense:
        tv, t_stride, _ = row_view(other, n_cls)
        y, ign, count = _NO_LABELS, R.NO_IGNORE, n
    else:
        tv, t_stride = _NO_TARGETS[acc], 0
        y = _kernel_view(other).reshape(-1)
        if y.dtype != np.int64:
            y = y.astype(np.int64)
            y.flags.writeable = False
        ign = R.kernel_ignore_index(opts["ignore_index"])
        count = int(R.mean_count(y, opts["ignore_index"], n_cls, xp=np))
    want_t = want_other and dense
    out = _Out(x)
    loss = np.empty(n, acc)
    gname, gtname = _grad_names(grad_dtype, name, dtype_name(other))
    gx_obj, gx = out.empty(tuple(x.shape), gname) if want_x else (None, _dummy_rows(xv, n_cls))
    gt_obj, gt = out.empty(tuple(other.shape), gtname) if want_t else (None, _dummy_rows(tv, n_cls))
    alpha = _NO_WEIGHTS[acc] if opts.get("weight") is None else _class_array(opts["weight"], acc)
    kopts = focal_options(acc(opts["gamma"]), acc(opts["label_smoothing"]), acc(opts["alpha"]),
                          _scale(opts["reduction"], count, acc))
    size = n * n_cls
    bad = _launch(K.softmax_focal, size, xv, x_stride, tv, t_stride, y, n_cls, loss, gx.reshape(-1, n_cls),
                  gt.reshape(-1, n_cls), kopts, alpha, ign, dense, want_x, want_t, _workers(size))
    if bad:
        R.check_label_range(y, n_cls, opts["ignore_index"])
    value = _reduce(loss, opts["reduction"], count, acc, out, tuple(x.shape[:-1]))
    return (value, out.finish(gx_obj, gname) if want_x else None,
            out.finish(gt_obj, gtname) if want_t else None)


def _elementwise(kernel, extra):
    def run(x, t, opts, want_x, want_other, *, grad_dtype=None):
        name, tname = dtype_name(x), dtype_name(t)
        acc = _acc(name)
        xv = _kernel_view(x).reshape(-1)
        tv = _kernel_view(t).reshape(-1)
        n = xv.shape[0]
        out = _Out(x)
        want_vals = opts["reduction"] == "none"
        vals = np.empty(n if want_vals else 1, acc)
        partial = np.empty((n + K.BLOCK - 1) // K.BLOCK, acc)
        # A forward-only call passes a typed 1-element output that the kernel never writes.
        gname, gtname = _grad_names(grad_dtype, name, tname)
        gx_obj, gx = out.empty(tuple(x.shape), gname) if want_x else (None, np.empty(1, xv.dtype))
        gt_obj, gt = out.empty(tuple(t.shape), gtname) if want_other else (None, np.empty(1, tv.dtype))
        _launch(kernel, n, xv, tv, vals, partial, gx.reshape(-1), gt.reshape(-1), *extra(opts, acc),
                _scale(opts["reduction"], n, acc), want_vals, want_x, want_other)
        # "none": the per-element values; otherwise the blocks' partial sums carry the total.
        value = _reduce(vals if want_vals else partial, opts["reduction"], n, acc, out, tuple(x.shape))
        return (value, out.finish(gx_obj, gname) if want_x else None,
                out.finish(gt_obj, gtname) if want_other else None)
    return run


sigmoid_cross_entropy = _elementwise(K.sigmoid_cross_entropy,
                                     lambda o, acc: (acc(o["label_smoothing"]), K.SIGMOID_COEF))
squared_error = _elementwise(K.squared_error, lambda o, acc: ())
huber = _elementwise(K.huber, lambda o, acc: (acc(o["delta"]),))
sigmoid_focal = _elementwise(K.sigmoid_focal, lambda o, acc: (
    acc(o["gamma"]), acc(o["alpha"]), acc(o["apply_class_balancing"]), acc(o["label_smoothing"]), K.SIGMOID_COEF))


def distillation(s, t, labels, opts, want_s, want_t, *, grad_dtype=None):
    """(loss, grad_student | None, grad_teacher | None) of distillation_loss from one kernel call;
    ``labels`` is None or an integer array of the leading shape."""
    name = dtype_name(s)
    acc = _acc(name)
    n_cls = s.shape[-1]
    sv, s_stride, n = row_view(s, n_cls)
    tv, t_stride, _ = row_view(t, n_cls)
    has_labels = labels is not None
    if has_labels:
        y = _kernel_view(labels).reshape(-1)
        if y.dtype != np.int64:
            y = y.astype(np.int64)
            y.flags.writeable = False
    else:
        y = _NO_LABELS
    ign = R.kernel_ignore_index(opts["ignore_index"])
    count = int(R.mean_count(y, opts["ignore_index"], n_cls, xp=np)) if has_labels else n
    out = _Out(s)
    loss = np.empty(n, acc)
    gname, gtname = _grad_names(grad_dtype, name, dtype_name(t))
    gs_obj, gs = out.empty(tuple(s.shape), gname) if want_s else (None, _dummy_rows(sv, n_cls))
    gt_obj, gt = out.empty(tuple(t.shape), gtname) if want_t else (None, _dummy_rows(tv, n_cls))
    kopts = distill_options(acc(opts["temperature"]), acc(opts["alpha"]), acc(opts["beta"]),
                            _scale(opts["reduction"], count, acc))
    size = n * n_cls
    bad = _launch(K.distill_rows, size, sv, s_stride, tv, t_stride, n_cls, y, loss, gs.reshape(-1, n_cls),
                  gt.reshape(-1, n_cls), kopts, K.DIVERGENCES[opts["divergence"]], ign, has_labels, want_s, want_t,
                  _workers(size))
    if bad:
        R.check_label_range(y, n_cls, opts["ignore_index"])
    value = _reduce(loss, opts["reduction"], count, acc, out, tuple(s.shape[:-1]))
    return (value, out.finish(gs_obj, gname) if want_s else None,
            out.finish(gt_obj, gtname) if want_t else None)


_NO_LABELS = np.zeros(1, np.int64)  # the labels argument of a call without labels (never read)
_NO_LABELS.flags.writeable = False


def linear_cross_entropy(h, w, y, b, opts):
    """linear_cross_entropy of NumPy arrays: NumPy matmuls and the Numba kernel per chunk of rows,
    the loss only (NumPy has no autograd; torch tensors and jax arrays get the gradients)."""
    acc = _acc(dtype_name(h))
    lead = tuple(h.shape[:-1])
    h2 = np.asarray(h).reshape(-1, h.shape[-1]).astype(acc, copy=False)  # 16-bit: matmul in fp32
    w2 = np.asarray(w).astype(acc, copy=False)
    b2 = None if b is None else np.asarray(b).astype(acc, copy=False)
    y2 = np.asarray(y).reshape(-1)
    R.check_label_range(y2, w2.shape[0], opts["ignore_index"])
    n = h2.shape[0]
    chunk_size = opts["chunk_size"]
    rows = _chunks.rows_per_chunk(n, w2.shape[0], chunk_size,
                                  None if chunk_size is not None else _chunks.free_bytes("cpu"))
    values = np.empty(n, acc)
    chunk_opts = dict(opts, reduction="none")
    for lo in range(0, n, rows):
        z = h2[lo:lo + rows] @ w2.T
        if b2 is not None:
            z += b2
        values[lo:lo + rows] = sparse_cross_entropy(z, y2[lo:lo + rows], chunk_opts, False, False,
                                                    labels_checked=True)[0]
    count = int(R.mean_count(y2, opts["ignore_index"], w2.shape[0], xp=np))
    return _reduce(values, opts["reduction"], count, acc, _Out(values), lead)
