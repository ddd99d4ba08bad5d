"""Pallas kernels (Triton lowering) for jax arrays on NVIDIA GPUs: softmax cross-entropy.

The same math as ``triton_gpu`` (the torch kernels) and ``jax_xla`` (the reference formulation),
written in Pallas so that XLA compiles them into the jitted program: one custom call per loss,
inside ``jit``, ``grad``, ``vmap`` and ``shard_map``. On a machine without a GPU they run with
``interpret=True`` (slow; the tests use small shapes), and ``jax.jit(...).lower(
lowering_platforms=("cuda",))`` emits the Triton IR a GPU would compile (tests/test_pallas.py
compiles it to cubin for sm_80 and sm_90 and reads the registers and spills).

One program per row, an online softmax over power-of-two class blocks:

- pass 1 reads the row once for the running max m, the running sum s = Σ exp((x - m) / T)
  (rescaled when m grows) and, with label smoothing, Σ w (x - m) / T, kept per lane of the block
  and combined once at the end of the row (no block-wide reduction inside the loop);
- pass 2, only when a gradient is wanted, reads the row again and writes the gradient. It cannot
  be folded into pass 1: every element's gradient needs the row's final max and sum, and a row of
  128K fp32 classes (512 KiB) does not fit in registers or shared memory. For rows up to ~32K
  classes the second read is mostly served by L2 (60 MB on an H200 holds ~400 such rows), so the
  pair costs about one HBM read of the logits plus one write of the gradient.

Pallas Triton computes addresses in int32 (indices are truncated to i32 in the emitted IR), so a
kernel here serves arrays of at most 2^31 elements; ``fits`` says so, and the caller runs larger
ones on the XLA formulation (same numbers within fp32 rounding).

Every function returns ``(values, grad_x | None, grad_other | None)`` like its ``jax_xla``
counterpart: fp32 per-row losses (fp64 for fp64 input) and the gradients of ``scale * Σ values``
in the inputs' dtype.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .jax_xla import unpack_params

MAX_ELEMENTS = 2 ** 31  # int32 addressing: every in-bounds offset is below 2^31 (see the module docstring)
# Classes per block on a GPU: 1024 at 8 warps, 4 values per thread in flight (the fastest of the
# block sizes swept, docs/performance.md). fp64 values take two registers each and a row keeps up to
# five per-lane fp64 accumulators, so fp64 rows go in blocks of 256 (1 per thread): larger ones spill
# (tests/test_pallas.py reads registers and spills from the compiled cubin).
MAX_BLOCK = 1024
MAX_BLOCK_F64 = 256


def fits(x):
    """Whether the kernels take ``x``: int32 addressing, and at least one row (a grid of 0 programs
    does not lower; an empty batch is the XLA formulation's trivial case)."""
    return 0 < x.size <= MAX_ELEMENTS


def block_of(n_cols, dtype):
    """Power-of-two class block: the whole row up to MAX_BLOCK classes (MAX_BLOCK_F64 in fp64), at
    least 16."""
    cap = MAX_BLOCK_F64 if jnp.dtype(dtype) == jnp.float64 else MAX_BLOCK
    return min(cap, max(16, pl.next_power_of_2(n_cols)))


def warps_of(block):
    return 8 if block >= 256 else 4  # at most 4 classes per thread


def _compiler_params(block):
    return plgpu.CompilerParams(num_warps=warps_of(block), num_stages=1)


def _acc(x):
    return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def _any():
    return pl.BlockSpec(memory_space=pl.ANY)


def _varying_alike(*arrays):
    """The arrays, each declared to vary over every ``shard_map`` mesh axis one of them varies over
    (a no-op outside ``shard_map``): a Pallas call's outputs are declared with one such type, the
    first array's (see ``_out``)."""
    axes = frozenset().union(*(jax.typeof(a).manual_axis_type.varying for a in arrays))
    out = []
    for a in arrays:
        missing = tuple(sorted(axes - jax.typeof(a).manual_axis_type.varying))
        out.append(lax.pcast(a, missing, to="varying") if missing else a)
    return out


def _out(shape, dtype, like):
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


def _tanh(u):
    """tanh: the odd Taylor polynomial to u^9 where (1 - e)/(1 + e) would cancel (|u| < 1/4 in fp32,
    0.04 in fp64), (1 - e)/(1 + e) with e = exp(-2|u|) beyond; ±inf give ±1 (as triton_gpu)."""
    switch = 0.04 if u.dtype == jnp.float64 else 0.25
    a = jnp.abs(u)
    e = jnp.exp(-2.0 * a)
    a2 = a * a
    small = a + a * a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0))))
    t = jnp.where(a < switch, small, (1.0 - e) / (1.0 + e))
    return jnp.where(u < 0, -t, t)


def _capped(x, cap):
    """(logits after the softcap, tanh), -inf kept at -inf (tanh -1 there, so 1 - tanh² = 0)."""
    if cap is None:
        return x, x
    th = _tanh(x / cap)
    return jnp.where(x == -jnp.inf, x, cap * th), th


def _weighted(w, term):
    """w * term, 0 where w == 0: a disabled option (or a class of weight 0) never turns a row with a
    -inf mean or lse into NaN (0 * inf)."""
    return jnp.where(w == 0.0, 0.0, w * term)


def _load(ref, row, off, block, n_cols, other):
    cols = off + lax.broadcasted_iota(jnp.int32, (block,), 0)
    mask = cols < n_cols
    return plgpu.load(ref.at[row, pl.ds(off, block)], mask=mask, other=other), cols, mask


# ------------------------------------------------------------------------------- option packs
# What each kernel reads from its parameter vector, in this order: built as the class, stacked into
# one device array (traced values: a new temperature does not recompile), read back by field name.
class _SparseRow(NamedTuple):
    inv_t: Any
    label_smoothing: Any
    z_loss: Any
    weight_sum: Any
    scale: Any


class _DenseRow(NamedTuple):
    inv_t: Any
    label_smoothing: Any
    scale: Any


class _Fields:
    """A pack's fields, each loaded from the kernel's parameter ref where the kernel uses it. Loading
    them all at the top keeps every one live across the row's loops: an fp64 row with a softcap then
    spilled 8 bytes per thread on sm_90."""

    def __init__(self, pack, ref):
        self._pack, self._ref = pack, ref

    def __getattr__(self, name):
        return self._ref[self._pack._fields.index(name)]


# ------------------------------------------------------------------------------------ sparse CE
def _sparse_kernel(x_ref, y_ref, p_ref, w_ref, loss_ref, lse_ref, g_ref, *, n_cols, block, cap, ignore_index,
                   has_smooth, has_weight, want_grad, acc):
    """One row. p_ref holds a ``_SparseRow``; w_ref the (C,) class weights (has_weight)."""
    row = pl.program_id(0).astype(jnp.int32)  # int32 indices throughout, also under x64
    p = _Fields(_SparseRow, p_ref)
    inv_t, eps, z_loss = p.inv_t, p.label_smoothing, p.z_loss
    y = y_ref[row].astype(jnp.int32)
    ignored = (y == ignore_index) if ignore_index is not None else False
    valid = (y >= 0) & (y < n_cols)
    y_safe = jnp.where(valid, y, 0)
    n_blocks = pl.cdiv(n_cols, block)

    def stats(i, carry):
        # Lane-wise online softmax: every lane of the block keeps its own running max, sum, sum
        # without the label (s_rest, see the gradient) and Σ w zs, so the loop holds no reduction
        # and no barrier: it streams the row (a block-wide max and sum per block would make every
        # block wait on reductions). zs = (x - m) / T: the max is of the unscaled logits and the
        # shift comes before 1/T, so a tiny T cannot overflow x / T. A lane's shift that is -inf
        # (only masked classes so far) is taken as 0, so (-inf) - (-inf) never makes NaN.
        m, s, s_rest, sz, seen = carry
        off = i * block
        x, cols, mask = _load(x_ref, row, off, block, n_cols, -jnp.inf)
        x, _ = _capped(x.astype(acc), cap)
        m_new = jnp.maximum(m, x)
        m_old_safe = jnp.where(m == -jnp.inf, 0.0, m).astype(acc)
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new).astype(acc)
        rescale = jnp.exp((m - m_safe) * inv_t)
        e = jnp.exp((x - m_safe) * inv_t)  # 0 on the masked tail (x = -inf)
        s = s * rescale + e
        if want_grad:
            s_rest = s_rest * rescale + jnp.where(cols == y, 0.0, e)
        if has_smooth:
            if has_weight:
                wv = plgpu.load(w_ref.at[pl.ds(off, block)], mask=mask, other=0.0).astype(acc)
                # a class of weight 0 adds 0 even where its logit is -inf
                add = jnp.where(wv == 0.0, 0.0, wv * (x - m_safe) * inv_t)
            else:
                wv = mask.astype(acc)
                add = jnp.where(mask, (x - m_safe) * inv_t, 0.0)
            sz = sz + jnp.where(seen == 0.0, 0.0, seen * ((m_old_safe - m_safe) * inv_t)) + add
            seen = seen + wv
        return m_new, s, s_rest, sz, seen

    lanes = jnp.zeros((block,), acc)
    init = (jnp.full((block,), -jnp.inf, acc), lanes, lanes, lanes, lanes)
    m_l, s_l, rest_l, sz_l, seen_l = lax.fori_loop(jnp.int32(0), jnp.int32(n_blocks), stats, init)
    # The lanes combined once: shift to the row's max M (lanes that saw only -inf add 0; a NaN
    # lane makes its factor, so the row, NaN).
    m = jnp.max(m_l)
    m = jnp.where(m == -jnp.inf, 0.0, m).astype(acc)
    m_l_safe = jnp.where(m_l == -jnp.inf, 0.0, m_l).astype(acc)
    f = jnp.where(m_l == -jnp.inf, 0.0, jnp.exp((m_l - m) * inv_t))
    s = jnp.sum(s_l * f)
    s_rest = jnp.sum(rest_l * f)
    sz = jnp.sum(sz_l + jnp.where(seen_l == 0.0, 0.0, seen_l * ((m_l_safe - m) * inv_t)))
    log_s = jnp.log(s)
    lse = m * inv_t + log_s
    x_y, _ = _capped(x_ref[row, y_safe].astype(acc), cap)
    zs_y = (x_y - m) * inv_t
    loss = (1.0 - eps) * (log_s - zs_y) + _weighted(z_loss, lse * lse)
    if has_weight:
        w_sum = p.weight_sum
        w_y = w_ref[y_safe].astype(acc)
        loss = _weighted(w_y, loss) + _weighted(eps, (w_sum * log_s - sz) / n_cols)
    else:
        loss = loss + _weighted(eps, log_s - sz / n_cols)
    loss_ref[row] = jnp.where(ignored, 0.0, jnp.where(valid, loss, jnp.nan)).astype(acc)
    lse_ref[row] = lse
    if not want_grad:
        return
    # d row/dz = (p - q) + 2 z_loss lse p, q = (1-ε) onehot(y) + ε/C, times scale / T. At the label
    # p - q is written -s_rest/s + ε(1 - 1/C): p_y - 1 cancels in fp32 for a confident label. With
    # class weights: p A - ε w / C, A = w_y (1-ε + 2 z_loss lse) + ε Σw / C, and at the label
    # w_y (1-ε)(p_y - 1) + ε (Σw p_y - w_y) / C + 2 z_loss w_y lse p_y. (Derived in jax_xla.)
    scale = p.scale * inv_t
    scale = jnp.where(valid, scale, jnp.nan)
    zc = _weighted(z_loss, 2.0 * lse)
    at_label_plain = eps - eps / n_cols - s_rest / s

    def grad(i, carry):
        off = i * block
        xr, cols, mask = _load(x_ref, row, off, block, n_cols, -jnp.inf)
        x, th = _capped(xr.astype(acc), cap)
        p = jnp.exp((x - m) * inv_t - log_s)
        if has_weight:
            wv = plgpu.load(w_ref.at[pl.ds(off, block)], mask=mask, other=0.0).astype(acc)
            big_a = w_y * (1.0 - eps + zc) + eps * w_sum / n_cols
            at_label = w_y * (1.0 - eps) * (-s_rest / s) + eps * (w_sum * p - w_y) / n_cols + zc * w_y * p
            pq = jnp.where(cols == y, at_label, p * big_a - eps * wv / n_cols)
        else:
            pq = jnp.where(cols == y, at_label_plain, p - eps / n_cols) + zc * p
        if cap is not None:
            pq = pq * (1.0 - th * th)
        # Ignored rows: exactly 0, even when their logits hold NaN or inf (0 * NaN would be NaN).
        g = jnp.where(ignored, 0.0, pq * scale)
        plgpu.store(g_ref.at[row, pl.ds(off, block)], g.astype(g_ref.dtype), mask=mask)
        return carry

    lax.fori_loop(jnp.int32(0), jnp.int32(n_blocks), grad, 0)


def sparse_cross_entropy(x, labels, params, ignore_index, softcap=None, weighted=False, *, want_x=True,
                         want_other=False, interpret=False):
    """Per-row sparse softmax cross-entropy and its gradient (``jax_xla.sparse_cross_entropy``'s
    signature and math).

    Args:
        x: (N, C) float logits, N * C < 2^31. labels: (N,) integers.
        params: the option pack (``jax_xla.pack_params``): T, ε, z_loss, the scale and, when
            ``weighted`` (static), the (C,) class weights.
        ignore_index: static int or None. softcap: static float > 0 or None.

    Returns:
        (loss (N,) fp32 | fp64, grad (N, C) in x's dtype | None, None).
    """
    n, c = x.shape
    acc = _acc(x)
    (t, eps, z_loss), scale, weights = unpack_params(params.astype(acc), 3, weighted)
    has_weight = weighted
    w = weights if has_weight else jnp.zeros((1,), acc)
    kp = jnp.stack(_SparseRow(1.0 / t, eps, z_loss, jnp.sum(w), scale))
    info = jnp.iinfo(labels.dtype)
    if ignore_index is not None and not info.min <= ignore_index <= info.max:
        ignore_index = None  # an index the labels cannot hold matches nothing
    labels = labels.astype(jnp.int32)  # labels are < C < 2^31: int64 ones fit
    block = block_of(c, x.dtype)
    kernel = functools.partial(
        _sparse_kernel, n_cols=c, block=block, cap=softcap, ignore_index=ignore_index,
        has_smooth=True, has_weight=has_weight, want_grad=want_x, acc=acc)
    # Smoothing and z-loss are values (possibly traced), so their terms are always in the kernel;
    # they cost a few scalar operations per block and one multiply-add per element.
    x, labels, kp, w = _varying_alike(x, labels, kp, w)
    out_shape = [_out((n,), acc, x), _out((n,), acc, x), _out((n, c) if want_x else (1, 1), x.dtype, x)]
    loss, _, g = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(n,), in_specs=[_any()] * 4, out_specs=[_any()] * 3,
        compiler_params=_compiler_params(block), interpret=interpret, name="fastloss_sparse_ce",
    )(x, labels, kp, w)
    return loss, (g if want_x else None), None


# ------------------------------------------------------------------------------------- dense CE
def _dense_kernel(x_ref, t_ref, p_ref, loss_ref, lse_ref, gx_ref, gt_ref, *, n_cols, block, want_gx, want_gt, acc):
    """One row, q = (1-ε) t + ε/C; terms with q = 0 skipped. p_ref holds a ``_DenseRow``."""
    row = pl.program_id(0).astype(jnp.int32)  # int32 indices throughout, also under x64
    p = _Fields(_DenseRow, p_ref)
    inv_t, eps = p.inv_t, p.label_smoothing
    n_blocks = pl.cdiv(n_cols, block)

    def stats(i, carry):
        # Lane-wise statistics as in _sparse_kernel; qz = Σ q zs is re-based by the lane's target
        # mass when its max grows.
        m, s, q_lane, qz = carry
        off = i * block
        x, _, mask = _load(x_ref, row, off, block, n_cols, -jnp.inf)
        x = x.astype(acc)
        t, _, _ = _load(t_ref, row, off, block, n_cols, 0.0)
        q = jnp.where(mask, (1.0 - eps) * t.astype(acc) + eps / n_cols, 0.0)
        m_new = jnp.maximum(m, x)
        m_old_safe = jnp.where(m == -jnp.inf, 0.0, m).astype(acc)
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new).astype(acc)
        s = s * jnp.exp((m - m_safe) * inv_t) + jnp.exp((x - m_safe) * inv_t)
        qz = qz + jnp.where(q_lane == 0.0, 0.0, q_lane * ((m_old_safe - m_safe) * inv_t)) + \
            jnp.where(q == 0.0, 0.0, q * ((x - m_safe) * inv_t))
        return m_new, s, q_lane + q, qz

    lanes = jnp.zeros((block,), acc)
    m_l, s_l, q_l, qz_l = lax.fori_loop(jnp.int32(0), jnp.int32(n_blocks), stats,
                                        (jnp.full((block,), -jnp.inf, acc), lanes, lanes, lanes))
    m = jnp.max(m_l)
    m = jnp.where(m == -jnp.inf, 0.0, m).astype(acc)
    s = jnp.sum(s_l * jnp.where(m_l == -jnp.inf, 0.0, jnp.exp((m_l - m) * inv_t)))
    m_l_safe = jnp.where(m_l == -jnp.inf, 0.0, m_l).astype(acc)
    qz = jnp.sum(qz_l + jnp.where(q_l == 0.0, 0.0, q_l * ((m_l_safe - m) * inv_t)))
    q_sum = jnp.sum(q_l)
    log_s = jnp.log(s)
    # No target mass: 0 (an all-masked row has log s = -inf); NaN or +inf logits: NaN (s is NaN).
    loss_ref[row] = jnp.where(q_sum == 0.0, 0.0, q_sum * log_s) - qz + (s - s)
    lse_ref[row] = m * inv_t + log_s
    if not (want_gx or want_gt):
        return
    scale = p.scale

    def grad(i, carry):
        off = i * block
        x, _, mask = _load(x_ref, row, off, block, n_cols, -jnp.inf)
        zs = (x.astype(acc) - m) * inv_t
        if want_gx:
            t, _, _ = _load(t_ref, row, off, block, n_cols, 0.0)
            q = (1.0 - eps) * t.astype(acc) + eps / n_cols
            gx = (jnp.exp(zs - log_s) * q_sum - q) * (scale * inv_t)
            plgpu.store(gx_ref.at[row, pl.ds(off, block)], gx.astype(gx_ref.dtype), mask=mask)
        if want_gt:
            gt = (1.0 - eps) * (log_s - zs) * scale
            plgpu.store(gt_ref.at[row, pl.ds(off, block)], gt.astype(gt_ref.dtype), mask=mask)
        return carry

    lax.fori_loop(jnp.int32(0), jnp.int32(n_blocks), grad, 0)


def softmax_cross_entropy(x, targets, params, *, want_x=True, want_other=False, interpret=False):
    """Per-row softmax cross-entropy with dense targets (``jax_xla.softmax_cross_entropy``'s
    signature and math). params: the option pack (T, ε, the scale). Returns (loss (N,), grad x | None,
    grad t | None)."""
    n, c = x.shape
    acc = _acc(x)
    (t, eps), scale, _ = unpack_params(params.astype(acc), 2)
    kp = jnp.stack(_DenseRow(1.0 / t, eps, scale))
    block = block_of(c, x.dtype)
    kernel = functools.partial(_dense_kernel, n_cols=c, block=block, want_gx=want_x, want_gt=want_other, acc=acc)
    x, targets, kp = _varying_alike(x, targets, kp)
    out_shape = [_out((n,), acc, x), _out((n,), acc, x), _out((n, c) if want_x else (1, 1), x.dtype, x),
                 _out((n, c) if want_other else (1, 1), targets.dtype, x)]
    loss, _, gx, gt = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(n,), in_specs=[_any()] * 3, out_specs=[_any()] * 4,
        compiler_params=_compiler_params(block), interpret=interpret, name="fastloss_dense_ce",
    )(x, targets, kp)
    return loss, (gx if want_x else None), (gt if want_other else None)


# ------------------------------------------------------------------------- shipped configurations
def configurations():
    """Every (loss, dtype, C, options) whose lowering the tests check: each dtype at the largest and
    the smallest class block, every flag that changes the kernel's code (softcap, class weights,
    gradient outputs)."""
    out = []
    for dt in ("float32", "bfloat16", "float16", "float64"):
        for c in (32000, 16):
            for cap, weight, grad in ((None, False, True), (None, False, False), (30.0, False, True),
                                      (None, True, True), (30.0, True, True)):
                out.append(("sparse", dt, c, dict(softcap=cap, weight=weight, want_x=grad)))
            for gx, gt in ((True, False), (False, False), (True, True), (False, True)):
                out.append(("dense", dt, c, dict(want_x=gx, want_other=gt)))
    return out
