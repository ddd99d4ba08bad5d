"""JAX kernels: custom-VJP losses with closed-form backward passes.

Each function takes 2-D ``(rows, C)`` (cross-entropies) or same-shape (elementwise losses) arrays and
returns fp32 per-row / per-element losses (fp64 for fp64 input). Options are static Python floats
(``nondiff_argnums``), so each option combination compiles once.

Why custom VJPs: autodiff through ``log_softmax`` keeps the (rows, C) softmax or log-softmax alive
for the backward pass and runs extra passes over it. Here the forward saves only the per-row
log-sum-exp (O(rows)); the backward re-reads the logits once and writes the gradient once:
``softmax(z) = exp(z - lse)`` is recomputed inside that single fused elementwise pass.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax


def _acc_dtype(x):
    # fp32 accumulation for 16/32-bit inputs, fp64 for fp64 input.
    return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def _zs(x, m, temperature):
    """The shifted, scaled logits (x - m) / T in the accumulation dtype (m per row, unscaled).

    The shift comes before the temperature: x / T alone overflows for a tiny T (x = 4, T = 1e-38),
    while x - m <= 0 and its quotient at worst goes to -inf, whose exp is the exact limit 0."""
    zs = x.astype(_acc_dtype(x)) - m[:, None]
    return zs if temperature == 1.0 else zs / temperature


def _shift(x, temperature):
    """Row max ``m`` of the unscaled logits (made finite) and ``log s = log Σ exp((x - m) / T)`` of
    a 2-D array; lse = m / T + log s.

    Losses are formed from shifted values and ``log s``, never from ``lse - z``: with a common
    offset of 1e5, fp32 ``lse`` is rounded by ~4e-3 and the difference would inherit it, while
    ``x - m`` is exact (Sterbenz). The (N, C) shifted array is not returned: callers gather or
    reduce ``_zs`` per row, so XLA fuses every use into its own pass over the logits instead of
    writing and re-reading an (N, C) intermediate. The max is a constant of the math
    (stop_gradient). An all-masked row (max -inf) shifts by 0, so it gives lse = -inf rather than
    NaN from (-inf) - (-inf); a row holding +inf or NaN keeps its max, so the row is NaN (as on the
    Numba and Triton backends).
    """
    m = lax.stop_gradient(jnp.max(x.astype(_acc_dtype(x)), axis=-1))
    m = jnp.where(m == -jnp.inf, jnp.zeros_like(m), m)
    return m, jnp.log(jnp.sum(jnp.exp(_zs(x, m, temperature)), axis=-1))


def _is_ignored(labels, ignore_index):
    """labels == ignore_index, where None, or an index the label dtype cannot hold, matches nothing
    (comparing would overflow the int32 labels JAX uses by default)."""
    info = jnp.iinfo(labels.dtype)
    if ignore_index is None or not info.min <= ignore_index <= info.max:
        return jnp.zeros(labels.shape, bool)
    return labels == ignore_index


# ----------------------------------------------------------------------------------- sparse CE
@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def sparse_cross_entropy(logits, labels, temperature, label_smoothing, ignore_index, z_loss):
    """Per-row sparse softmax cross-entropy.

    Args:
        logits: (N, C) float array. labels: (N,) integer array.
        temperature, label_smoothing, ignore_index, z_loss: static Python scalars.

    Returns:
        (loss, lse): both (N,) in the accumulation dtype. ``loss`` is 0 for ignored rows and NaN for
        labels outside [0, C) (never clamped to a valid class); ``lse`` is lse(logits / T).
    """
    return _sparse_fwd(logits, labels, temperature, label_smoothing, ignore_index, z_loss)[0]


def _sparse_rows(x, m, labels, log_s, lse, temperature, label_smoothing, ignore_index, z_loss):
    n_cls = x.shape[-1]
    valid = (labels >= 0) & (labels < n_cls)
    # Gather the label's logit (a clamped index only to keep the gather in bounds; invalid rows are
    # overwritten with NaN below).
    x_y = jnp.take_along_axis(x, jnp.clip(labels, 0, n_cls - 1)[:, None].astype(jnp.int32), axis=-1)
    row = log_s - _zs(x_y, m, temperature)[:, 0]
    if label_smoothing:
        row = (1.0 - label_smoothing) * row + label_smoothing * (log_s - jnp.mean(_zs(x, m, temperature), axis=-1))
    if z_loss:
        row = row + z_loss * lse * lse
    nan = jnp.full_like(row, jnp.nan)
    return jnp.where(_is_ignored(labels, ignore_index), jnp.zeros_like(row), jnp.where(valid, row, nan))


def _sparse_fwd(logits, labels, temperature, label_smoothing, ignore_index, z_loss):
    m, log_s = _shift(logits, temperature)
    lse = m / temperature + log_s
    loss = _sparse_rows(logits, m, labels, log_s, lse, temperature, label_smoothing, ignore_index, z_loss)
    return (loss, lse), (logits, labels, m, log_s)


def _sparse_bwd(temperature, label_smoothing, ignore_index, z_loss, res, cts):
    logits, labels, m, log_s = res
    lse = m / temperature + log_s
    g_loss, g_lse = cts
    n_cls = logits.shape[-1]
    valid = (labels >= 0) & (labels < n_cls)
    ignored = _is_ignored(labels, ignore_index)
    scale = jnp.where(ignored, 0.0, jnp.where(valid, g_loss, jnp.nan)).astype(lse.dtype)
    # d loss/dz = p (1 + 2 z_loss lse) - q, q = (1-ε) onehot(y) + ε/C;  d lse/dz = p;  dz/dx = 1/T.
    # Per element that is one multiply-add, g = e a - b with e = exp(z - m) and per-row
    # a = (scale (1 + 2 z_loss lse) + g_lse) / (s T), b = scale ε / (C T); the label's -(1-ε) scale / T
    # is then one scatter-add of N values into the gradient (in place), as autodiff does. Under one
    # jit with the forward, XLA shares e with the forward's sum (one exp per element: on CPU exp is
    # the bottleneck). The saved residuals stay O(rows) either way.
    inv_t = 1.0 / temperature
    a = (scale * (1.0 + 2.0 * z_loss * lse) + g_lse) * jnp.exp(-log_s) * inv_t
    e = jnp.exp(_zs(logits, m, temperature))
    g = e * a[:, None]
    if label_smoothing:
        g = g - (scale * (label_smoothing / n_cls * inv_t))[:, None]
    rows = jnp.arange(logits.shape[0])
    g = g.at[rows, jnp.clip(labels, 0, n_cls - 1)].add(-(1.0 - label_smoothing) * inv_t * scale)
    # An ignored row's gradient is exactly 0 even when its logits hold NaN or inf (padding): scale 0
    # times a NaN softmax would be NaN. The select fuses into the same elementwise pass.
    g = jnp.where(ignored[:, None], jnp.zeros_like(g), g)
    return g.astype(logits.dtype), None


sparse_cross_entropy.defvjp(_sparse_fwd, _sparse_bwd)


# ------------------------------------------------------------------------------------ dense CE
@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense_cross_entropy(logits, targets, temperature, label_smoothing):
    """Per-row softmax cross-entropy with dense targets.

    Args:
        logits, targets: (N, C) float arrays. temperature, label_smoothing: static Python floats.

    Returns:
        (loss, lse), both (N,) in the accumulation dtype. Terms with target mass 0 contribute 0
        (so a masked -inf class with zero target does not turn the row into NaN).
    """
    return _dense_fwd(logits, targets, temperature, label_smoothing)[0]


def _smoothed(targets, label_smoothing, dtype):
    q = targets.astype(dtype)
    if label_smoothing:
        q = (1.0 - label_smoothing) * q + label_smoothing / targets.shape[-1]
    return q


def _dense_fwd(logits, targets, temperature, label_smoothing):
    m, log_s = _shift(logits, temperature)
    zs = _zs(logits, m, temperature)
    q = _smoothed(targets, label_smoothing, zs.dtype)
    terms = jnp.where(q == 0, jnp.zeros_like(zs), q * (log_s[:, None] - zs))
    # A row whose logits hold NaN or +inf is NaN whatever its targets (log s is NaN exactly then).
    row = jnp.where(jnp.isnan(log_s), log_s, jnp.sum(terms, axis=-1))
    return (row, m / temperature + log_s), (logits, targets, m, log_s)


def _dense_bwd(temperature, label_smoothing, res, cts):
    logits, targets, m, log_s = res
    g_loss, g_lse = cts
    zs = _zs(logits, m, temperature)
    q = _smoothed(targets, label_smoothing, zs.dtype)
    p = jnp.exp(zs) * jnp.exp(-log_s)[:, None]  # shares exp(z - m) with the forward (see sparse)
    q_sum = jnp.sum(q, axis=-1)
    g_logits = ((p * q_sum[:, None] - q) * g_loss[:, None] + p * g_lse[:, None]) / temperature
    g_targets = (1.0 - label_smoothing) * (log_s[:, None] - zs) * g_loss[:, None]
    return g_logits.astype(logits.dtype), g_targets.astype(targets.dtype)


dense_cross_entropy.defvjp(_dense_fwd, _dense_bwd)


# ---------------------------------------------------------------------------------- sigmoid CE
@partial(jax.custom_vjp, nondiff_argnums=(2,))
def sigmoid_cross_entropy(logits, targets, label_smoothing):
    """Elementwise binary cross-entropy from logits: max(x,0) - x t' + log1p(exp(-|x|)),
    t' = t (1-ε) + ε/2. Returns the per-element loss in the accumulation dtype."""
    return _sigmoid_fwd(logits, targets, label_smoothing)[0]


def _sigmoid_fwd(logits, targets, label_smoothing):
    x = logits.astype(_acc_dtype(logits))
    t = targets.astype(x.dtype) * (1.0 - label_smoothing) + 0.5 * label_smoothing
    loss = jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
    return loss, (logits, targets)


def _sigmoid_bwd(label_smoothing, res, g):
    logits, targets = res
    x = logits.astype(_acc_dtype(logits))
    t = targets.astype(x.dtype) * (1.0 - label_smoothing) + 0.5 * label_smoothing
    g_x = (jax.nn.sigmoid(x) - t) * g
    g_t = -(1.0 - label_smoothing) * x * g
    return g_x.astype(logits.dtype), g_t.astype(targets.dtype)


sigmoid_cross_entropy.defvjp(_sigmoid_fwd, _sigmoid_bwd)


# ------------------------------------------------------------------------------------------ MSE
@jax.custom_vjp
def squared_error(predictions, targets):
    """Elementwise (p - t)^2 in the accumulation dtype; gradients 2(p - t) and -2(p - t)."""
    return _mse_fwd(predictions, targets)[0]


def _mse_fwd(predictions, targets):
    acc = _acc_dtype(predictions)
    d = predictions.astype(acc) - targets.astype(acc)
    return d * d, (predictions, targets)


def _mse_bwd(res, g):
    predictions, targets = res
    acc = _acc_dtype(predictions)
    d2 = 2.0 * (predictions.astype(acc) - targets.astype(acc)) * g
    return d2.astype(predictions.dtype), (-d2).astype(targets.dtype)


squared_error.defvjp(_mse_fwd, _mse_bwd)


# ------------------------------------------------------------------------------------ reduction
def accurate_sum(values):
    """Sum of a 1-D fp32/fp64 array with O(log n) error growth.

    A plain fp32 sum of 2*10^7 terms drifts by ~1e-4 relative; summing blocks of 1024 and then the
    block sums (recursively) keeps every partial sum short, so the error stays near 1e-7. The padding
    is a few zeros of the small per-row / per-element array, fused by XLA into the reduction.
    """
    block = 1024
    while values.shape[0] > block:
        pad = (-values.shape[0]) % block
        if pad:
            values = jnp.concatenate([values, jnp.zeros((pad,), values.dtype)])
        values = jnp.sum(values.reshape(-1, block), axis=-1)
    return jnp.sum(values)
