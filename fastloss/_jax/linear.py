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
  it), so the forward pass of ``grad`` computes the loss and the gradients of the inputs being
  differentiated (a frozen head gets no weight gradient matmul) in one sweep over the chunks, and
  the backward multiplies them by the cotangent: one logits matmul per chunk in all, as in the
  unfused pair, and O(chunk x C) memory instead of O(N x C).
- "none": per-row cotangents are only known in the backward, which recomputes each chunk's logits
  (one more matmul per chunk) and weights G's rows by them.
- The primal alone (no differentiation: evaluation) computes the logits and the losses only.

The options (temperature, label smoothing, z-loss) enter as constants: this function has no
derivative with respect to them (the other losses do), a documented limit.
"""
from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from .. import _chunks
from .. import _reduction as R
from .._spec import LINEAR_CE, SPARSE_CE
from ..kernels import jax_xla as K
from .common import (Call, check_labels_eagerly, check_not_torch, guarded_params, numpy_out, option_value,
                     scale_of, varying_like, x64_context)
from .losses import reduce_rows
from .providers import kernel


class Config(NamedTuple):
    """The static part of a call (a jit static argument)."""
    ignore_index: object
    reduction: str
    provider: str
    chunk_rows: int
    weight_dtype: str
    bias_dtype: str | None


def _ce_call(cfg):
    """The chunk's sparse cross-entropy: the gradients of ``scale * Σ rows`` (the pack's scale)."""
    return Call(SPARSE_CE, (("ignore_index", cfg.ignore_index), ("softcap", None), ("weighted", False)), "sum",
                cfg.provider)


def _logits(h, w, b, acc):
    # (B, H) x (C, H) -> (B, C), contracted over H without transposing W in memory.
    z = jax.lax.dot_general(h, w, (((1,), (1,)), ((), ())), preferred_element_type=acc)
    return z if b is None else z + b.astype(acc)


_NONE = (False, False, False)
_ALL = (True, True, True)


def _chunk(cfg, w, b, params, h, y, row_w, want):
    """One chunk: (rows' losses, d h_c, d W contribution, d b contribution); the gradients are
    those of ``scale * Σ rows`` (the pack's scale; times ``row_w`` per row when given), each None unless
    ``want`` = (want_h, want_w, want_b) asks for it."""
    acc = params.dtype
    z = _logits(h, w, b, acc)
    values, g, _ = kernel(_ce_call(cfg), z, y, params, any(want), False)
    if not any(want):
        return values, None, None, None
    g = g.astype(acc)
    if row_w is not None:
        g = g * row_w.astype(acc)[:, None]
    gl = g.astype(h.dtype)  # 16-bit inputs: the matmuls take 16-bit operands, accumulate in fp32
    gh = jax.lax.dot_general(gl, w, (((1,), (0,)), ((), ())), preferred_element_type=acc).astype(h.dtype) \
        if want[0] else None
    gw = jax.lax.dot_general(gl, h, (((0,), (0,)), ((), ())), preferred_element_type=acc) if want[1] else None
    gb = jnp.sum(g, axis=0) if want[2] and b is not None else None
    return values, gh, gw, gb


def _sweep(cfg, h, w, b, y, params, row_w, want):
    """All chunks: (per-row losses (N,), d h, d W (fp32), d b (fp32)), the gradients None unless
    ``want`` asks for them. Full chunks go through one ``lax.scan`` (one compiled body); a ragged
    tail is one more call of the same body."""
    n, hdim = h.shape
    rows = cfg.chunk_rows
    full, tail = divmod(n, rows)
    acc = params.dtype
    want_h, want_w, want_b = want[0], want[1], want[2] and b is not None
    # Inside shard_map the accumulators vary over the mesh axes the chunks vary over (a scan's carry
    # must keep its type): declared on the zeros they start from.
    like = tuple(a for a in (h, w, b, y) if a is not None)
    gw = varying_like(jnp.zeros(w.shape, acc), like) if want_w else None
    gb = varying_like(jnp.zeros(w.shape[:1], acc), like) if want_b else None
    parts_v, parts_h = [], []

    def add(acc_, part):
        return None if acc_ is None else acc_ + part

    if full:
        hs = h[:full * rows].reshape(full, rows, hdim)
        ys = y[:full * rows].reshape(full, rows)
        rs = row_w[:full * rows].reshape(full, rows) if row_w is not None else None

        def body(carry, xs):
            hc, yc, rc = xs
            v, gh, dw, db = _chunk(cfg, w, b, params, hc, yc, rc, (want_h, want_w, want_b))
            return (add(carry[0], dw), add(carry[1], db)), (v, gh)

        (gw, gb), (v, gh) = jax.lax.scan(body, (gw, gb), (hs, ys, rs))
        parts_v.append(v.reshape(-1))
        if want_h:
            parts_h.append(gh.reshape(-1, hdim))
    if tail:
        lo = full * rows
        v, gh, dw, db = _chunk(cfg, w, b, params, h[lo:], y[lo:], row_w[lo:] if row_w is not None else None,
                               (want_h, want_w, want_b))
        parts_v.append(v)
        if want_h:
            parts_h.append(gh)
        gw, gb = add(gw, dw), add(gb, db)
    if not parts_v:  # no rows: no chunk ran (the loss is 0, as an empty batch's is everywhere)
        return jnp.zeros((0,), acc), (jnp.zeros((0, hdim), h.dtype) if want_h else None), gw, gb
    values = parts_v[0] if len(parts_v) == 1 else jnp.concatenate(parts_v)
    gh = (parts_h[0] if len(parts_h) == 1 else jnp.concatenate(parts_h)) if want_h else None
    return values, gh, gw, gb


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _linear_ce(cfg, h, w, b, y, params):
    values, _, _, _ = _sweep(cfg, h, w, b, y, params, None, _NONE)
    return reduce_rows(values, scale_of(params, LINEAR_CE), cfg.reduction)


def _linear_ce_fwd(cfg, h, w, b, y, params):
    # symbolic_zeros=True: each argument comes with ``perturbed``, whether it is differentiated, so
    # a frozen head (or frozen hidden states) costs no weight (hidden) gradient matmul.
    want = (h.perturbed, w.perturbed, b is not None and b.perturbed)
    h, w, y, params = h.value, w.value, y.value, params.value
    b = None if b is None else b.value
    if cfg.reduction == "none":
        values, _, _, _ = _sweep(cfg, h, w, b, y, params, None, _NONE)
        return values, (h, w, b, y, params)
    values, gh, gw, gb = _sweep(cfg, h, w, b, y, params, None, want)
    # The weight and bias gradients stay fp32 until the cotangent has scaled them (one rounding).
    # w[:0], b[:0]: empty slices that carry the inputs' types (their shard_map varying axes) to
    # the backward, which needs them to sum per-device gradients of a replicated head.
    return reduce_rows(values, scale_of(params, LINEAR_CE), cfg.reduction), (gh, gw, gb, w[:0], None if b is None else b[:0])


def _sum_to_type_of(g, like):
    """Inside shard_map: the cotangent of an input replicated over mesh axes that ``g`` varies over
    is the sum of the per-device contributions (the transpose of broadcasting it)."""
    axes = tuple(sorted(jax.typeof(g).manual_axis_type.varying - jax.typeof(like).manual_axis_type.varying))
    return jax.lax.psum(g, axes) if axes else g


def _linear_ce_bwd(cfg, res, ct):
    if type(ct) is SymbolicZero:
        return None, None, None, None, None
    if cfg.reduction == "none":  # every gradient: the residuals cannot carry which inputs were perturbed
        h, w, b, y, params = res
        _, gh, gw, gb = _sweep(cfg, h, w, b, y, params, ct, _ALL)
    else:
        gh, gw, gb, w, b = res
        gh = (gh.astype(ct.dtype) * ct).astype(gh.dtype) if gh is not None else None
        gw = gw * ct.astype(gw.dtype) if gw is not None else None
        gb = gb * ct.astype(gb.dtype) if gb is not None else None
    wdt, bdt = cfg.weight_dtype, cfg.bias_dtype
    gw = _sum_to_type_of(gw, w).astype(wdt) if gw is not None else None
    gb = _sum_to_type_of(gb, b).astype(bdt) if gb is not None else None
    return gh, gw, gb, None, None


_linear_ce.defvjp(_linear_ce_fwd, _linear_ce_bwd, symbolic_zeros=True)


@partial(jax.jit, static_argnames=("cfg",))
def _core(h, w, b, y, options, *, cfg):
    lead = h.shape[:-1]
    h2 = h.reshape(-1, h.shape[-1])
    y2 = y.reshape(-1)
    acc = K.acc_dtype(h)
    reduction = cfg.reduction
    count = R.mean_count(y2, cfg.ignore_index, w.shape[0], xp=jnp).astype(acc)
    scale = 1.0 / R.nonzero_or_one(count, jnp) if reduction == "mean" else jnp.ones((), acc)
    opts = [jax.lax.stop_gradient(option_value(v, o, acc)) for o, v in zip(LINEAR_CE.options, options)]
    params, poison = guarded_params(opts, scale.astype(acc))
    out = _linear_ce(cfg, h2, w, b, y2, params) + poison
    return out.reshape(lead) if reduction == "none" else out


def run(h, w, y, b, opts, provider):
    """The loss of jax (or NumPy) input; NumPy in, NumPy out (float64 NumPy in float64)."""
    for a, arg in ((h, "hidden"), (w, "weight"), (y, "labels"), (b, "bias")):
        if a is not None:
            check_not_torch(a, arg)
    check_labels_eagerly(y, w.shape[0], opts["ignore_index"])
    chunk_size = opts["chunk_size"]
    n = math.prod(h.shape[:-1])
    rows = _chunks.rows_per_chunk(n, w.shape[0], chunk_size,
                                  None if chunk_size is not None else _chunks.free_bytes("cpu"))
    cfg = Config(opts["ignore_index"], opts["reduction"], provider, rows, _dtype(w), None if b is None else _dtype(b))
    options = tuple(opts[k] for k in LINEAR_CE.option_names)
    ctx, numpy_in = x64_context(h, w)
    with ctx:
        args = [jnp.asarray(a) if a is not None else None for a in (h, w, b, y)]
        return numpy_out(_core(args[0], args[1], args[2], args[3], options, cfg=cfg), numpy_in)


def _dtype(a):
    # jnp.dtype(...) of a NumPy, jax or ml_dtypes dtype: a hashable, static name for cfg
    return jnp.dtype(a.dtype).name
