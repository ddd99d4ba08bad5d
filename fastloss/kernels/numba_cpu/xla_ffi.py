"""XLA FFI handlers: the Numba kernels called by XLA:CPU from inside a jitted JAX program.

A handler is a C function ``XLA_FFI_Error* handler(XLA_FFI_CallFrame*)`` (the typed FFI of
``xla/ffi/api/c_api.h``, API version 0.3). It is built here as a ``numba.cfunc`` that reads the call
frame's buffers in place (zero copies: the kernel reads XLA's input memory and writes XLA's output
memory) and calls the same compiled kernel entry points as the NumPy path, with the same argument
types, so the disk-cached kernels serve both. Nothing here imports jax: ``fastloss._jax.ffi``
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

Handlers are cached on disk like the kernels (see ``_cfunc`` for what that takes): building one
links the cached kernels and costs seconds, once per machine and signature.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
from numba import carray, cfunc, njit, types
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic

from .approx import SIGMOID_COEF
from .dense_ce import dense_blocks, dense_tiny
from .distill import distill_rows
from .elementwise import BLOCK, huber, sigmoid_cross_entropy, sigmoid_focal, squared_error
from .focal import softmax_focal
from .options import dense_options, distill_options, focal_options, sparse_options
from .sparse_ce import _row_params, sparse_blocks, sparse_short, sparse_tiny
from .sparse_split import _chunk_grads, _chunk_stats, _combine_rows

# Word offsets in the call frame (see the module docstring).
_EXT, _STAGE, _ARGS, _RETS, _ATTRS = 1, 4, 9, 14, 20
_METADATA_EXTENSION = 1
_API_VERSION_STRUCT_SIZE = 24  # XLA_FFI_Api_Version: struct_size, extension_start, major, minor
_API_MINOR = 3
_DIGEST = []


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


# The frame readers below are ordinary cached functions, not inline="always": Numba's IR inlining
# deep-copies each body into every handler, which made a handler's first build 2-3 times slower
# (bfloat16 sigmoid focal 7.3 s -> 3.1 s, float32 sparse 4.6 s -> 2.1 s, kernels cached); LLVM
# still inlines them when the handler is linked.
@njit(cache=True)
def _words(addr, n):
    return carray(_ptr(addr, np.int64), (n,))


@njit(cache=True)
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


@njit(cache=True)
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


@njit(cache=True)
def _attr(frame, k):
    """Scalar int64 attribute k (attributes sorted by name)."""
    a = _words(_words(frame, 22)[_ATTRS], k + 1)[k]
    return _words(_words(a, 2)[1], 1)[0]


@njit(cache=True)
def _flat_in(frame, k, dtype):
    addr, rows, last = _buffer(frame, _ARGS, k)
    return _readonly(carray(_ptr(addr, dtype), (rows * last,)))


@njit(cache=True)
def _flat_out(frame, k, dtype):
    addr, rows, last = _buffer(frame, _RETS, k)
    return carray(_ptr(addr, dtype), (rows * last,))


@njit(cache=True)
def _rows_out(frame, k, dtype, c):
    addr, rows, last = _buffer(frame, _RETS, k)
    return carray(_ptr(addr, dtype), (rows * last // c, c))


@njit(cache=True)
def _grads_out(frame, c, x_dtype, o_dtype, want_x, want_o):
    """The (rows, C) gradients of the first and the second input: results 1 and 1 + want_x, each
    only when wanted (a one-row dummy otherwise, which the kernels never write)."""
    gx = _rows_out(frame, 1, x_dtype, c) if want_x else np.empty((1, c), x_dtype)
    go = _rows_out(frame, 1 + np.int64(want_x), o_dtype, c) if want_o else np.empty((1, c), o_dtype)
    return gx, go

# The handlers. Each builder returns a C function specialised on what changes the types it reads
# (dtypes, the kernel path, whether class weights or labels come in); what only changes which
# buffers are written (want_x, want_other, want_values, has_labels, dense) arrives as an int64
# attribute at run time. Two reasons: one handler serves every gradient request (a jitted program's
# forward and backward share it), and a flag reaches the kernel as a plain bool, so the kernel is
# the specialisation the NumPy path compiled and cached. A closure constant would reach it as a
# literal (Literal[bool](True)) and compile, in every process, a parallel kernel per combination:
# 15-20 s each on 2 cores.
#
# Attributes arrive sorted by name; each builder names its attributes' positions.


def sparse_handler(path, x_dtype, y_dtype, acc, weighted):
    """Handler for sparse CE: args (x (..., C), labels (...), params [T, ε, z_loss, cap, scale, (C
    class weights when ``weighted``)]), attributes (ignore_index, n_chunks, threads, want_x),
    results (loss (...), [grad (..., C)]). ``path`` comes from ``plan.sparse_path`` at trace time (the
    shape is static there)."""
    def handler(frame):
        if _answer_metadata(frame):
            return 0
        _, n, c = _buffer(frame, _ARGS, 0)
        x = _flat_in(frame, 0, x_dtype)
        y = _readonly(_flat_in(frame, 1, y_dtype).astype(np.int64))
        p = _flat_in(frame, 2, acc)
        ign, n_chunks, threads, want_grad = _attr(frame, 0), _attr(frame, 1), _attr(frame, 2), _attr(frame, 3) != 0
        loss = _flat_out(frame, 0, acc)
        lse = np.empty(n, acc)
        g = _rows_out(frame, 1, x_dtype, c) if want_grad else np.empty((1, c), x_dtype)
        opts = sparse_options(p[0], p[1], p[2], p[3], p[4])
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
            w = _readonly(np.ascontiguousarray(p[5:5 + c])) if weighted else _readonly(np.empty(0, acc))
            if path == "short":
                sparse_short(x, c, c, y, loss, lse, g, opts, w, ign, want_grad, threads)
            else:
                sparse_blocks(x, c, c, y, loss, lse, g, opts, w, ign, want_grad, threads)
        return 0
    return _cfunc(handler, "sparse", path, x_dtype, y_dtype, acc, weighted)


def dense_handler(path, x_dtype, t_dtype, acc):
    """Handler for dense-target CE: args (x, targets (..., C), params [T, ε, scale]), attributes
    (threads, want_other, want_x), results (loss (...), [grad x], [grad targets])."""
    def handler(frame):
        if _answer_metadata(frame):
            return 0
        _, n, c = _buffer(frame, _ARGS, 0)
        x = _flat_in(frame, 0, x_dtype)
        t = _flat_in(frame, 1, t_dtype)
        p = _flat_in(frame, 2, acc)
        threads, want_t, want_x = _attr(frame, 0), _attr(frame, 1) != 0, _attr(frame, 2) != 0
        loss = _flat_out(frame, 0, acc)
        lse = np.empty(n, acc)
        gx, gt = _grads_out(frame, c, x_dtype, t_dtype, want_x, want_t)
        opts = dense_options(p[0], p[1], p[2])
        if path == "tiny":
            dense_tiny(x, t, c, loss, lse, gx, gt, opts, want_x, want_t, threads)
        else:
            dense_blocks(x, c, t, c, c, loss, lse, gx, gt, opts, want_x, want_t, threads)
        return 0
    return _cfunc(handler, "dense", path, x_dtype, t_dtype, acc)


def distill_handler(s_dtype, t_dtype, y_dtype, acc):
    """Handler for distillation: args (student, teacher (..., C), labels (...) (a 1-element dummy
    without labels), params [T, α, β, scale]), attributes (div, has_labels, ignore_index, threads,
    want_other, want_x), results (loss (...), [grad student], [grad teacher])."""
    def handler(frame):
        if _answer_metadata(frame):
            return 0
        _, n, c = _buffer(frame, _ARGS, 0)
        s = _flat_in(frame, 0, s_dtype)
        t = _flat_in(frame, 1, t_dtype)
        y = _readonly(_flat_in(frame, 2, y_dtype).astype(np.int64))
        p = _flat_in(frame, 3, acc)
        div, has_labels, ign, threads = _attr(frame, 0), _attr(frame, 1) != 0, _attr(frame, 2), _attr(frame, 3)
        want_t, want_s = _attr(frame, 4) != 0, _attr(frame, 5) != 0
        loss = _flat_out(frame, 0, acc)
        gs, gt = _grads_out(frame, c, s_dtype, t_dtype, want_s, want_t)
        distill_rows(s, c, t, c, c, y, loss, gs, gt, distill_options(p[0], p[1], p[2], p[3]), div, ign,
                     has_labels, want_s, want_t, threads)
        return 0
    return _cfunc(handler, "distill", s_dtype, t_dtype, y_dtype, acc)


def focal_handler(x_dtype, o_dtype, acc, dense, weighted):
    """Handler for the softmax focal loss: args (x (..., C), labels (...) or targets (..., C),
    params [γ, ε, α, scale, (C per-class α when ``weighted``)]), attributes (dense, ignore_index,
    threads, want_other, want_x), results (loss (...), [grad x], [grad targets])."""
    def handler(frame):
        if _answer_metadata(frame):
            return 0
        _, n, c = _buffer(frame, _ARGS, 0)
        x = _flat_in(frame, 0, x_dtype)
        p = _flat_in(frame, 2, acc)
        # ``dense`` decides the types read (above, a constant); the kernel takes it as a plain bool.
        is_dense, ign, threads = _attr(frame, 0) != 0, _attr(frame, 1), _attr(frame, 2)
        want_t, want_x = _attr(frame, 3) != 0, _attr(frame, 4) != 0
        loss = _flat_out(frame, 0, acc)
        al = _readonly(np.ascontiguousarray(p[4:4 + c])) if weighted else _readonly(np.empty(0, acc))
        opts = focal_options(p[0], p[1], p[2], p[3])
        if dense:
            t = _flat_in(frame, 1, o_dtype)
            gx, gt = _grads_out(frame, c, x_dtype, o_dtype, want_x, want_t)
            softmax_focal(x, c, t, c, _readonly(np.zeros(1, np.int64)), c, loss, gx, gt, opts, al, ign, is_dense,
                          want_x, want_t, threads)
        else:
            y = _readonly(_flat_in(frame, 1, o_dtype).astype(np.int64))
            gx, gt = _grads_out(frame, c, x_dtype, acc, want_x, want_t)  # no target gradient with labels
            softmax_focal(x, c, _readonly(np.zeros(1, acc)), c, y, c, loss, gx, gt, opts, al, ign,
                          is_dense, want_x, want_t, threads)
        return 0
    return _cfunc(handler, "focal", x_dtype, o_dtype, acc, dense, weighted)


def elementwise_handler(loss, x_dtype, t_dtype, acc):
    """Handler for sigmoid CE (params [ε, scale]), squared error (params [scale]), Huber (params
    [δ, scale]) and sigmoid focal (params [γ, α, balance, ε, scale]): args (x, targets, params),
    attributes (want_other, want_values, want_x), results (per-element values if ``want_values``
    else per-block partial sums (ceil(n / BLOCK),), [grad x], [grad targets])."""
    kind = ("sigmoid_cross_entropy", "squared_error", "huber", "sigmoid_focal").index(loss)  # a literal in the body

    def handler(frame):
        if _answer_metadata(frame):
            return 0
        _, rows, last = _buffer(frame, _ARGS, 0)
        n = rows * last
        x = _flat_in(frame, 0, x_dtype)
        t = _flat_in(frame, 1, t_dtype)
        p = _flat_in(frame, 2, acc)
        want_t, want_values, want_x = _attr(frame, 0) != 0, _attr(frame, 1) != 0, _attr(frame, 2) != 0
        first = _flat_out(frame, 0, acc)
        vals = first if want_values else np.empty(1, acc)
        partial = np.empty((n + BLOCK - 1) // BLOCK, acc) if want_values else first
        gx = _flat_out(frame, 1, x_dtype) if want_x else np.empty(1, x_dtype)
        gt = _flat_out(frame, 1 + np.int64(want_x), t_dtype) if want_t else np.empty(1, t_dtype)
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
        return 0
    return _cfunc(handler, loss, x_dtype, t_dtype, acc)


def _sources_digest():
    """A digest of this package's sources. A cached handler holds the machine code of every kernel
    it calls, while Numba's cache checks only the time stamp of the file that defines the handler
    (this one): the digest in each handler's cache name keeps an edited kernel from being served
    by a stale handler."""
    if not _DIGEST:
        h = hashlib.sha256()
        here = os.path.dirname(os.path.abspath(__file__))
        for name in sorted(os.listdir(here)):
            if name.endswith(".py"):
                with open(os.path.join(here, name), "rb") as f:
                    h.update(name.encode() + b"\0" + f.read())
        _DIGEST.append(h.hexdigest()[:16])
    return _DIGEST[0]


def _cfunc(handler, *variant):
    """The handler as a C function ``int64 (int64)`` (XLA_FFI_Handler's pointer-sized argument and
    result, as integers: the same ABI), returning 0 (NULL: success), cached on disk.

    Each variant gets its own cache entry name (Numba names an entry by the function's qualified
    name): a handler's type is always int64(int64), so two variants that shared a name could only
    be told apart by the closure values hashed in the index key, and two processes writing that
    shared index at once can pair a key with the other's data file. Loading a cached handler is
    safe once Numba's threading layer has launched (``fastloss._numpy.threads.layer()``, which
    the caller runs first): before that, the parallel kernels' runtime symbols are unresolved and a
    cached handler that calls them crashes when loaded (numba issue 8578)."""
    parts = [v.__name__ if isinstance(v, type) else str(v) for v in variant]
    handler.__qualname__ = handler.__name__ = "handler_" + "_".join(parts + [_sources_digest()])
    return cfunc(types.int64(types.int64), nopython=True, error_model="numpy", cache=True)(handler)
