"""XLA FFI handlers: the Numba kernels called by XLA:CPU from inside a jitted JAX program.

A handler is a C function ``XLA_FFI_Error* handler(XLA_FFI_CallFrame*)`` (the typed FFI of
``xla/ffi/api/c_api.h``, API version 0.3). It is built here as a ``numba.cfunc`` that reads the call
frame's buffers in place (zero copies: the kernel reads XLA's input memory and writes XLA's output
memory) and calls the same compiled kernel entry points as the NumPy path, with the same argument
types, so the disk-cached kernels serve both. Nothing here imports jax: ``fastloss._jax_ffi``
registers the handlers and emits the calls.

Call-frame layout (x86-64 / aarch64, 8-byte words; checked against the header's structs):

    frame: 0 struct_size, 1 extension_start, 2 api, 3 ctx, 4 stage,
           5-9 args  (struct_size, ext, size, types, args),
           10-14 rets (struct_size, ext, size, types, rets),
           15-20 attrs (struct_size, ext, size, types, names, attrs), 21 future
    buffer: 0 struct_size, 1 ext, 2 dtype, 3 data, 4 rank, 5 dims
    scalar attribute: 0 dtype, 1 pointer to the value

Attributes arrive sorted by name. XLA first calls every handler with a metadata extension to learn
its API version; a handler that does not answer makes XLA:CPU fail to initialise at all, so that
query is answered before anything else. Errors are never returned: invalid labels give NaN rows,
as everywhere under ``jit``.

Handlers are not cached to disk (a cached cfunc that calls a ``parallel=True`` kernel crashes when
loaded, numba issue 8578); building one links the cached kernels and takes ~1.5 s, once per process
and signature.
"""
from __future__ import annotations

import numpy as np
from numba import carray, cfunc, njit, types
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic

from .approx import SIGMOID_COEF
from .dense_ce import dense_blocks, dense_tiny
from .distill import distill_rows
from .elementwise import BLOCK, huber, sigmoid_cross_entropy, sigmoid_focal, squared_error
from .focal import softmax_focal
from .sparse_ce import _row_params, sparse_blocks, sparse_short, sparse_tiny
from .sparse_split import _chunk_grads, _chunk_stats, _combine_rows

# Word offsets in the call frame (see the module docstring).
_EXT, _STAGE, _ARGS, _RETS, _ATTRS = 1, 4, 9, 14, 20
_METADATA_EXTENSION = 1
_API_VERSION_STRUCT_SIZE = 24  # XLA_FFI_Api_Version: struct_size, extension_start, major, minor
_API_MINOR = 3


@intrinsic
def _ptr(typingctx, addr, dtype):
    """An integer address as a typed pointer (``dtype`` a NumPy scalar type such as np.float32)."""
    if not isinstance(addr, types.Integer) or not isinstance(dtype, types.NumberClass):
        return None
    sig = types.CPointer(dtype.instance_type)(addr, dtype)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))
    return sig, codegen


@intrinsic
def _readonly(typingctx, arr):
    """The same array typed read-only: the kernels were compiled (and cached) for read-only inputs
    by the NumPy path, so the handler reuses those specialisations instead of compiling new ones."""
    if not isinstance(arr, types.Array) or not arr.mutable:
        return None
    sig = arr.copy(readonly=True)(arr)

    def codegen(context, builder, sig, args):
        return impl_ret_borrowed(context, builder, sig.return_type, args[0])
    return sig, codegen


@njit(inline="always")
def _words(addr, n):
    return carray(_ptr(addr, np.int64), (n,))


@njit(inline="always")
def _answer_metadata(frame):
    """True (and the metadata filled in) when this call is XLA's API-version query."""
    ext = _words(frame, 22)[_EXT]
    if ext == 0:
        return False
    e = _words(ext, 4)
    if (e[1] & 0xFFFFFFFF) != _METADATA_EXTENSION:
        return False
    md = _words(e[3], 5)  # XLA_FFI_Metadata: struct_size, api_version (3 words), traits
    md[1] = _API_VERSION_STRUCT_SIZE
    md[2] = 0
    md[3] = np.int64(_API_MINOR) << 32  # major 0 in the low half, minor in the high half
    md[4] = 0  # traits: none
    return True


@njit(inline="always")
def _buffer(frame, which, k):
    """(data address, rows, last dimension) of argument (which=_ARGS) or result (_RETS) k."""
    b = _words(_words(_words(frame, 22)[which], k + 1)[k], 6)
    rank = b[4]
    dims = _words(b[5], max(rank, 1))
    last = dims[rank - 1] if rank > 0 else 1
    rows = 1
    for d in range(rank - 1):
        rows *= dims[d]
    return b[3], rows, last


@njit(inline="always")
def _attr(frame, k):
    """Scalar int64 attribute k (attributes sorted by name)."""
    a = _words(_words(frame, 22)[_ATTRS], k + 1)[k]
    return _words(_words(a, 2)[1], 1)[0]


@njit(inline="always")
def _flat_in(frame, k, dtype):
    addr, rows, last = _buffer(frame, _ARGS, k)
    return _readonly(carray(_ptr(addr, dtype), (rows * last,)))


@njit(inline="always")
def _flat_out(frame, k, dtype):
    addr, rows, last = _buffer(frame, _RETS, k)
    return carray(_ptr(addr, dtype), (rows * last,))


@njit(inline="always")
def _rows_out(frame, k, dtype, c):
    addr, rows, last = _buffer(frame, _RETS, k)
    return carray(_ptr(addr, dtype), (rows * last // c, c))


# ------------------------------------------------------------------------------- sparse CE
def sparse_handler(path, x_dtype, y_dtype, acc, want_grad, weighted):
    """Handler for sparse CE: args (x (..., C), labels (...), params [T, ε, z_loss, cap, (C class
    weights when ``weighted``), scale]), attributes (ignore_index, n_chunks, threads), results
    (loss (...), [grad (..., C)]). ``path`` comes from ``plan.sparse_path`` at trace time (the shape
    is static there)."""
    kernel = sparse_short if path == "short" else sparse_blocks  # for "short" / "blocks"; see run

    def run(frame):
        _, n, c = _buffer(frame, _ARGS, 0)
        x = _flat_in(frame, 0, x_dtype)
        y = _readonly(_flat_in(frame, 1, y_dtype).astype(np.int64))
        p = _flat_in(frame, 2, acc)
        ign, n_chunks, threads = _attr(frame, 0), _attr(frame, 1), _attr(frame, 2)
        loss = _flat_out(frame, 0, acc)
        lse = np.empty(n, acc)
        g = _rows_out(frame, 1, x_dtype, c) if want_grad else np.empty((1, c), x_dtype)
        opts = (acc(1) / p[0], p[1], p[2], p[3], p[p.shape[0] - 1])
        if path == "split":
            rp = _row_params(opts, c)
            cm = np.empty((n, n_chunks), acc)
            cs = np.empty((n, n_chunks), acc)
            csz = np.empty((n, n_chunks), acc)
            _chunk_stats(x, c, c, n, n_chunks, rp[1], rp[2] != 0, cm, cs, csz, threads)
            ms = np.empty(n, acc)
            ss = np.empty(n, acc)
            _combine_rows(x, c, c, y, loss, lse, cm, cs, csz, ms, ss, rp, ign)
            if want_grad:
                _chunk_grads(x, c, c, y, g, cm, cs, ms, ss, lse, rp, ign)
        elif path == "tiny":
            sparse_tiny(x, c, y, loss, lse, g, opts, ign, want_grad, threads)
        else:
            w = _readonly(np.ascontiguousarray(p[4:4 + c])) if weighted else _readonly(np.empty(0, acc))
            kernel(x, c, c, y, loss, lse, g, opts, w, ign, want_grad, threads)
    return _handler(run)


# -------------------------------------------------------------------------------- dense CE
def dense_handler(path, x_dtype, t_dtype, acc, want_x, want_t):
    """Handler for dense-target CE: args (x, targets (..., C), params [T, ε, scale]), attribute
    (threads), results (loss (...), [grad x], [grad targets])."""
    def run(frame):
        _, n, c = _buffer(frame, _ARGS, 0)
        x = _flat_in(frame, 0, x_dtype)
        t = _flat_in(frame, 1, t_dtype)
        p = _flat_in(frame, 2, acc)
        threads = _attr(frame, 0)
        loss = _flat_out(frame, 0, acc)
        lse = np.empty(n, acc)
        gx = _rows_out(frame, 1, x_dtype, c) if want_x else np.empty((1, c), x_dtype)
        gt = _rows_out(frame, 1 + want_x, t_dtype, c) if want_t else np.empty((1, c), t_dtype)
        opts = (acc(1) / p[0], p[1], p[2])
        if path == "tiny":
            dense_tiny(x, t, c, loss, lse, gx, gt, opts, want_x, want_t, threads)
        else:
            dense_blocks(x, c, t, c, c, loss, lse, gx, gt, opts, want_x, want_t, threads)
    return _handler(run)


# ---------------------------------------------------------------------------- distillation
def distill_handler(s_dtype, t_dtype, y_dtype, acc, has_labels, want_s, want_t):
    """Handler for distillation: args (student, teacher (..., C), labels (...) (a 1-element dummy
    without labels), params [T, α, β, scale]), attributes (div, ignore_index, threads), results
    (loss (...), [grad student], [grad teacher])."""
    def run(frame):
        _, n, c = _buffer(frame, _ARGS, 0)
        s = _flat_in(frame, 0, s_dtype)
        t = _flat_in(frame, 1, t_dtype)
        y = _readonly(_flat_in(frame, 2, y_dtype).astype(np.int64))
        p = _flat_in(frame, 3, acc)
        div, ign, threads = _attr(frame, 0), _attr(frame, 1), _attr(frame, 2)
        loss = _flat_out(frame, 0, acc)
        gs = _rows_out(frame, 1, s_dtype, c) if want_s else np.empty((1, c), s_dtype)
        gt = _rows_out(frame, 1 + want_s, t_dtype, c) if want_t else np.empty((1, c), t_dtype)
        distill_rows(s, c, t, c, c, y, loss, gs, gt, (p[0], p[1], p[2], p[3]), div, ign, has_labels, want_s,
                     want_t, threads)
    return _handler(run)


# --------------------------------------------------------------------------- softmax focal
@njit(inline="always")
def _focal_run(frame, x_dtype, acc, t, y, gt, dense, weighted, want_x, want_t):
    _, n, c = _buffer(frame, _ARGS, 0)
    x = _flat_in(frame, 0, x_dtype)
    p = _flat_in(frame, 2, acc)
    ign, threads = _attr(frame, 0), _attr(frame, 1)
    loss = _flat_out(frame, 0, acc)
    gx = _rows_out(frame, 1, x_dtype, c) if want_x else np.empty((1, c), x_dtype)
    k = p.shape[0]
    al = _readonly(np.ascontiguousarray(p[3:3 + c])) if weighted else _readonly(np.empty(0, acc))
    softmax_focal(x, c, t, c, y, c, loss, gx, gt, (p[0], p[1], p[2], p[k - 1], acc(1)), al, ign, dense, want_x,
                  want_t, threads)


def focal_handler(x_dtype, o_dtype, acc, dense, weighted, want_x, want_t):
    """Handler for the softmax focal loss: args (x (..., C), labels (...) or targets (..., C),
    params [γ, ε, α, (C per-class α when ``weighted``,) scale]), attributes (ignore_index, threads),
    results (loss (...), [grad x], [grad targets])."""
    if dense:
        def run(frame):
            _, _, c = _buffer(frame, _ARGS, 0)
            gt = _rows_out(frame, 1 + want_x, o_dtype, c) if want_t else np.empty((1, c), o_dtype)
            _focal_run(frame, x_dtype, acc, _flat_in(frame, 1, o_dtype), _readonly(np.zeros(1, np.int64)), gt, True,
                       weighted, want_x, want_t)
    else:
        def run(frame):
            _, _, c = _buffer(frame, _ARGS, 0)
            y = _readonly(_flat_in(frame, 1, o_dtype).astype(np.int64))
            _focal_run(frame, x_dtype, acc, _readonly(np.zeros(1, acc)), y, np.empty((1, c), acc), False, weighted,
                       want_x, False)
    return _handler(run)


# ----------------------------------------------------------------------------- elementwise
def elementwise_handler(loss, x_dtype, t_dtype, acc, want_values, want_x, want_t):
    """Handler for sigmoid CE (params [ε, scale]), squared error (params [scale]), Huber (params
    [δ, scale]) and sigmoid focal (params [γ, α, balance, ε, scale]): args (x, targets, params),
    results (per-element values if ``want_values`` else per-block partial sums (ceil(n / BLOCK),),
    [grad x], [grad targets])."""
    kind = ("sigmoid_cross_entropy", "squared_error", "huber", "sigmoid_focal").index(loss)  # a literal in the body

    def run(frame):
        _, rows, last = _buffer(frame, _ARGS, 0)
        n = rows * last
        x = _flat_in(frame, 0, x_dtype)
        t = _flat_in(frame, 1, t_dtype)
        p = _flat_in(frame, 2, acc)
        first = _flat_out(frame, 0, acc)
        vals = first if want_values else np.empty(1, acc)
        partial = np.empty((n + BLOCK - 1) // BLOCK, acc) if want_values else first
        gx = _flat_out(frame, 1, x_dtype) if want_x else np.empty(1, x_dtype)
        gt = _flat_out(frame, 1 + want_x, t_dtype) if want_t else np.empty(1, t_dtype)
        if kind == 0:
            sigmoid_cross_entropy(x, t, vals, partial, gx, gt, p[0], SIGMOID_COEF, p[1], want_values, want_x,
                                  want_t)
        elif kind == 1:
            squared_error(x, t, vals, partial, gx, gt, p[0], want_values, want_x, want_t)
        elif kind == 2:
            huber(x, t, vals, partial, gx, gt, p[0], p[1], want_values, want_x, want_t)
        else:
            sigmoid_focal(x, t, vals, partial, gx, gt, p[0], p[1], p[2], p[3], SIGMOID_COEF, p[4], want_values,
                          want_x, want_t)
    return _handler(run)


def _handler(run):
    body = njit(run)

    def handler(frame):
        if _answer_metadata(frame):
            return 0
        body(frame)
        return 0  # NULL: success
    # The pointer-sized argument and result of XLA_FFI_Handler, as integers (same ABI).
    return cfunc(types.int64(types.int64), nopython=True, error_model="numpy")(handler)
