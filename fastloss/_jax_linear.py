"""``linear_cross_entropy`` for jax arrays: the output projection and the sparse cross-entropy in
row chunks, so the (N, C) logits never exist in full.

One ``jax.custom_vjp`` function (``_linear_ce``) around a ``lax.scan`` over chunks of rows. Per
chunk: ``logits = h_c @ W^T + b`` in fp32 (fp64 for fp64), then the fused cross-entropy kernel of
``fastloss._jax`` (the Numba kernel through the XLA FFI on CPU, the XLA formulation elsewhere),
which gives the rows' losses and ``G = d loss / d logits`` over the chunk's logits, then::

    d h_c = G @ W            (the chunk's rows of d hidden)
    d W  += G^T @ h_c        (fp32 accumulator, C x H)
    d b  += Σ_rows G

- "mean"/"sum": the scalar loss's gradient is known in the forward (its cotangent only scales
  it), so the forward pass of ``grad`` computes loss and all three gradients in one sweep over the
  chunks and the backward multiplies them by the cotangent: one logits matmul per chunk in all,
  as in the unfused pair, and O(chunk x C) memory instead of O(N x C).
- "none": per-row cotangents are only known in the backward, which recomputes each chunk's logits
  (one more matmul per chunk) and weights G's rows by them.
- The primal alone (no differentiation: evaluation) computes the logits and the losses only.

The options (temperature, label smoothing, z-loss) enter as constants: this function has no
derivative with respect to them (the other losses do), a documented limit.
"""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from fastloss.kernels import jax_xla as K

from . import _chunks
from . import _jax as J

_SPARSE = "sparse_softmax_cross_entropy"


# cfg = (ignore_index, reduction, provider, chunk_rows, weight dtype, bias dtype | None): static
def _ce_spec(cfg):
    ignore_index, _, provider = cfg[:3]
    return (_SPARSE, ignore_index, "sum", provider)


def _logits(h, w, b, acc):
    # (B, H) x (C, H) -> (B, C), contracted over H without transposing W in memory.
    z = jax.lax.dot_general(h, w, (((1,), (1,)), ((), ())), preferred_element_type=acc)
    return z if b is None else z + b.astype(acc)


def _chunk(cfg, w, b, params, h, y, row_w, want_grad):
    """One chunk: (rows' losses, d h_c, d W contribution, d b contribution); the gradients are
    those of ``params[-1] * Σ rows`` (times ``row_w`` per row when given), None without want_grad."""
    acc = params.dtype
    z = _logits(h, w, b, acc)
    values, g, _ = J._kernel(_ce_spec(cfg), z, y, params, want_grad, False)
    if not want_grad:
        return values, None, None, None
    g = g.astype(acc)
    if row_w is not None:
        g = g * row_w.astype(acc)[:, None]
    gl = g.astype(h.dtype)  # 16-bit inputs: the matmuls take 16-bit operands, accumulate in fp32
    gh = jax.lax.dot_general(gl, w, (((1,), (0,)), ((), ())), preferred_element_type=acc).astype(h.dtype)
    gw = jax.lax.dot_general(gl, h, (((0,), (0,)), ((), ())), preferred_element_type=acc)
    gb = jnp.sum(g, axis=0) if b is not None else None
    return values, gh, gw, gb


def _sweep(cfg, h, w, b, y, params, row_w, want_grad):
    """All chunks: (per-row losses (N,), d h, d W (fp32), d b (fp32)). Full chunks go through one
    ``lax.scan`` (one compiled body); a ragged tail is one more call of the same body."""
    n, hdim = h.shape
    rows = cfg[3]
    full, tail = divmod(n, rows)
    acc = params.dtype
    gw = jnp.zeros(w.shape, acc) if want_grad else None
    gb = jnp.zeros(w.shape[:1], acc) if want_grad and b is not None else None
    parts_v, parts_h = [], []
    if full:
        hs = h[:full * rows].reshape(full, rows, hdim)
        ys = y[:full * rows].reshape(full, rows)
        rs = row_w[:full * rows].reshape(full, rows) if row_w is not None else None

        def body(carry, xs):
            cw, cb = carry
            hc, yc, rc = xs
            v, gh, dw, db = _chunk(cfg, w, b, params, hc, yc, rc, want_grad)
            if want_grad:
                cw = cw + dw
                cb = cb + db if b is not None else None
            return (cw, cb), (v, gh)

        (gw, gb), (v, gh) = jax.lax.scan(body, (gw, gb), (hs, ys, rs))
        parts_v.append(v.reshape(-1))
        if want_grad:
            parts_h.append(gh.reshape(-1, hdim))
    if tail:
        lo = full * rows
        v, gh, dw, db = _chunk(cfg, w, b, params, h[lo:], y[lo:], row_w[lo:] if row_w is not None else None,
                               want_grad)
        parts_v.append(v)
        if want_grad:
            parts_h.append(gh)
            gw = gw + dw
            gb = gb + db if b is not None else None
    values = parts_v[0] if len(parts_v) == 1 else jnp.concatenate(parts_v)
    if not want_grad:
        return values, None, None, None
    gh = parts_h[0] if len(parts_h) == 1 else jnp.concatenate(parts_h)
    return values, gh, gw, gb


def _finish(values, params, reduction):
    if reduction == "none":
        return values
    total = K.accurate_sum(values)
    return total * params[-1] if reduction == "mean" else total


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _linear_ce(cfg, h, w, b, y, params):
    values, _, _, _ = _sweep(cfg, h, w, b, y, params, None, False)
    return _finish(values, params, cfg[1])


def _linear_ce_fwd(cfg, h, w, b, y, params):
    if cfg[1] == "none":
        values, _, _, _ = _sweep(cfg, h, w, b, y, params, None, False)
        return values, (h, w, b, y, params)
    values, gh, gw, gb = _sweep(cfg, h, w, b, y, params, None, True)
    # The weight and bias gradients stay fp32 until the cotangent has scaled them (one rounding).
    return _finish(values, params, cfg[1]), (gh, gw, gb)


def _linear_ce_bwd(cfg, res, ct):
    if cfg[1] == "none":
        h, w, b, y, params = res
        _, gh, gw, gb = _sweep(cfg, h, w, b, y, params, ct, True)
    else:
        gh, gw, gb = res
        gh = (gh.astype(ct.dtype) * ct).astype(gh.dtype)
        gw = gw * ct.astype(gw.dtype)
        gb = gb * ct.astype(gb.dtype) if gb is not None else None
    wdt, bdt = cfg[4], cfg[5]
    return gh, gw.astype(wdt), (gb.astype(bdt) if gb is not None else None), None, None


_linear_ce.defvjp(_linear_ce_fwd, _linear_ce_bwd)


@partial(jax.jit, static_argnames=("cfg",))
def _core(h, w, b, y, options, *, cfg):
    lead = h.shape[:-1]
    h2 = h.reshape(-1, h.shape[-1])
    y2 = y.reshape(-1)
    acc = K.acc_dtype(h)
    ignore_index, reduction = cfg[0], cfg[1]
    count = jnp.sum(~K.is_ignored(y2, ignore_index))
    scale = 1.0 / jnp.maximum(count, 1).astype(acc) if reduction == "mean" else jnp.ones((), acc)
    temp, eps, zl = (jax.lax.stop_gradient(J._option(v, k, acc))
                     for k, v in zip(J._OPTIONS[_SPARSE], options))
    params = jnp.stack([temp, eps, zl, scale]).astype(acc)
    out = _linear_ce(cfg, h2, w, b, y2, params)
    return out.reshape(lead) if reduction == "none" else out


def linear_cross_entropy(h, w, y, b, opts, backend, chunk_size):
    """The loss of jax (or NumPy) input; NumPy in, NumPy out (float64 NumPy in float64)."""
    for a, arg in ((h, "hidden"), (w, "weight"), (y, "labels"), (b, "bias")):
        if a is not None:
            J._check_not_torch(a, arg)
    J._check_labels_eagerly(y, w.shape[0], opts["ignore_index"])
    n = math.prod(h.shape[:-1])
    rows = _chunks.rows_per_chunk(n, w.shape[0], chunk_size,
                                  None if chunk_size is not None else _chunks.free_bytes("cpu"))
    cfg = (opts["ignore_index"], opts["reduction"], J._provider(backend), rows, _dtype(w),
           None if b is None else _dtype(b))
    options = tuple(opts[k] for k in J._OPTIONS[_SPARSE])
    ctx, numpy_in = J._context(h, w)
    with ctx:
        args = [jnp.asarray(a) if a is not None else None for a in (h, w, b, y)]
        return J._out(_core(args[0], args[1], args[2], args[3], options, cfg=cfg), numpy_in)


def _dtype(a):
    # jnp.dtype(...) of a NumPy, jax or ml_dtypes dtype: a hashable, static name for cfg
    return jnp.dtype(a.dtype).name
