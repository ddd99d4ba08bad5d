"""JAX kernels in XLA operations: fused loss and gradient, options as (possibly traced) arrays.

Every loss has one function ``<loss>(x, other, params, *static, want_x, want_other)`` returning
``(values, grad_x | None, grad_other | None)``:

- ``values``: fp32 per-row (cross-entropies) or per-element losses (fp64 for fp64 input);
- the gradients are those of ``scale * Σ values`` (``scale``: 1/count for "mean", else 1), in the
  input's dtype, computed in the same XLA program as the values, so XLA fuses them into the passes
  that compute the row statistics (one exp per element on CPU);
- ``params`` is the call's option pack: one 1-D array in the accumulation dtype, built only by
  ``pack_params`` and read only through ``unpack_params`` (a ``Params``: the loss's options in the
  order of its spec row, the scale, its per-class array). Options are values, not compile-time
  constants: a new temperature does not recompile, and a traced one (a schedule, a learnable
  temperature) works under ``jit``.

These functions are plain JAX: differentiating them (second order, forward mode) is exact. The
public layer (``fastloss._jax``) wraps them, or the Numba kernels reached through the XLA FFI, in
one ``custom_jvp`` per loss; ``option_grads`` gives the derivatives with respect to the options.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


def acc_dtype(x):
    # fp32 accumulation for 16/32-bit inputs, fp64 for fp64 input.
    return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


class Params(NamedTuple):
    """A call's options as the kernels read them: ``options``, the loss's numeric options (0-d
    arrays) in the order of its spec row; ``scale``, d total / d row; ``weights``, the (C,)
    per-class array (class weights, the focal loss's per-class α) or None."""
    options: tuple
    scale: Any
    weights: Any


def pack_params(options, scale, weights=None):
    """The one array a call's options travel in (through custom_jvp, custom_partitioning, vmap and
    the FFI): [options..., scale, weights...], in the dtype of ``scale``. The scalars sit at fixed
    positions and the per-class array at the tail; whether it is there is a static flag of the call
    (``weighted``), never read off the length."""
    acc = jnp.asarray(scale).dtype
    head = jnp.stack([jnp.asarray(v, acc) for v in options] + [jnp.asarray(scale, acc)])
    return head if weights is None else jnp.concatenate([head, jnp.asarray(weights, acc).reshape(-1)])


def unpack_params(params, n_options, weighted=False):
    """The ``Params`` of a packed array whose loss has ``n_options`` numeric options."""
    return Params(tuple(params[i] for i in range(n_options)), params[n_options],
                  params[n_options + 1:] if weighted else None)


def _zs(x, m, temperature):
    """The shifted, scaled logits (x - m) / T in the accumulation dtype (m per row, unscaled).

    The shift comes before the temperature: x / T alone overflows for a tiny T (x = 4, T = 1e-38),
    while x - m <= 0 and its quotient at worst goes to -inf, whose exp is the exact limit 0."""
    return (x.astype(acc_dtype(x)) - m[:, None]) / temperature


class ClassSplit(NamedTuple):
    """The class axis split over mesh axes (vocabulary parallelism): this shard holds classes
    [offset, offset + x.shape[-1]) of ``n``; every reduction over classes is completed with a
    collective over ``axis`` (pmax of the row max, psum of the sums and of the label's logit), so
    the (N, C) logits are never gathered. None everywhere below means the whole row is local."""
    axis: Any
    n: int
    offset: Any


def _cmax(v, split):
    return v if split is None else lax.pmax(v, split.axis)


def _csum(v, split):
    return v if split is None else lax.psum(v, split.axis)


def _n_classes(x, split):
    return x.shape[-1] if split is None else split.n


def _shift(x, temperature, split=None):
    """Row max ``m`` of the unscaled logits (made finite) and ``log s = log Σ exp((x - m) / T)`` of
    a 2-D array; lse = m / T + log s.

    Losses are formed from shifted values and ``log s``, never from ``lse - z``: with a common
    offset of 1e5, fp32 ``lse`` is rounded by ~4e-3 and the difference would inherit it, while
    ``x - m`` is exact (Sterbenz). The max is a constant of the math (stop_gradient: every result
    is invariant to it). An all-masked row (max -inf) shifts by 0, so it gives lse = -inf rather
    than NaN from (-inf) - (-inf); a row holding +inf or NaN keeps its max, so the row is NaN (as
    on the Numba and Triton backends).
    """
    m = lax.stop_gradient(_cmax(jnp.max(x.astype(acc_dtype(x)), axis=-1), split))
    m = jnp.where(m == -jnp.inf, jnp.zeros_like(m), m)
    return m, jnp.log(_csum(jnp.sum(jnp.exp(_zs(x, m, temperature)), axis=-1), split))


def is_ignored(labels, ignore_index):
    """labels == ignore_index, where None, or an index the label dtype cannot hold, matches nothing
    (comparing would overflow the int32 labels JAX uses by default)."""
    info = jnp.iinfo(labels.dtype)
    if ignore_index is None or not info.min <= ignore_index <= info.max:
        return jnp.zeros(labels.shape, bool)
    return labels == ignore_index


def _weighted(w, term):
    """w * term, 0 where w == 0: a disabled option never turns a row with a -inf mean or lse into
    NaN (0 * inf)."""
    return jnp.where(w == 0, jnp.zeros_like(term), w * term)


# ----------------------------------------------------------------------------------- sparse CE
def softcap_logits(x, cap):
    """(cap tanh(x / cap), 1 - tanh²) in the accumulation dtype: the capped logits and their
    derivative. A -inf (masked) logit stays -inf with derivative 0, where tanh alone would give it
    the finite logit -cap and so probability mass."""
    xf = x.astype(acc_dtype(x))
    th = jnp.tanh(xf / cap)
    return jnp.where(xf == -jnp.inf, xf, cap * th), 1.0 - th * th


def _sparse_parts(x, labels, params, ignore_index, weighted, split=None):
    pp = unpack_params(params, 3, weighted)
    t = pp.options[0]
    n_cls = _n_classes(x, split)
    m, log_s = _shift(x, t, split)
    lse = m / t + log_s
    # Gather the label's logit (a clamped index only to keep the gather in bounds; invalid rows are
    # overwritten with NaN). With the classes split, the shard holding the label gives it.
    local = labels if split is None else labels - split.offset
    owns = (local >= 0) & (local < x.shape[-1])
    idx = jnp.clip(local, 0, x.shape[-1] - 1)[:, None].astype(jnp.int32)
    zs_y = _zs(jnp.take_along_axis(x, idx, axis=-1), m, t)[:, 0]
    zs_y = _csum(jnp.where(owns, zs_y, jnp.zeros_like(zs_y)), split)
    w = pp.weights
    w_local = w
    if w is None:
        wy, wsum = jnp.ones_like(lse), float(n_cls)
        w_zs = _csum(jnp.sum(_zs(x, m, t), axis=-1), split)
    else:
        # Σ_k w_k zs_k, a class of weight 0 adding 0 even where its logit is -inf
        if split is not None:
            w_local = lax.dynamic_slice_in_dim(w, split.offset, x.shape[-1])
        wy, wsum = w[jnp.clip(labels, 0, n_cls - 1)], jnp.sum(w)
        w_zs = _csum(jnp.sum(_weighted(w_local[None, :], _zs(x, m, t)), axis=-1), split)
    valid = (labels >= 0) & (labels < n_cls)
    ignored = is_ignored(labels, ignore_index)
    return m, log_s, lse, zs_y, w_zs, wy, wsum, valid, ignored, (w_local, idx[:, 0], owns)


def _by_row_kind(values, valid, ignored):
    """0 on ignored rows, NaN on rows with a label outside [0, C), ``values`` elsewhere."""
    nan = jnp.full_like(values, jnp.nan)
    return jnp.where(ignored, jnp.zeros_like(values), jnp.where(valid, values, nan))


def sparse_cross_entropy(x, labels, params, ignore_index, softcap=None, weighted=False, *, want_x=True,
                         want_other=False, split=None):
    """Per-row sparse softmax cross-entropy and its gradient.

    Args:
        x: (N, C) float logits. labels: (N,) integers. params: options (T, ε, z_loss), the scale
            and, when ``weighted``, the (C,) class weights (``pack_params``).
        ignore_index: a static int or None. softcap: a static float > 0 or None. weighted: static,
            whether params carries class weights.
        split: None, or a ``ClassSplit`` when ``x`` holds one shard of the classes (inside a
            partitioned program): the loss is the whole row's, the gradient this shard's columns.

    Returns:
        (loss (N,), grad (N, C) | None, None). ``loss`` is 0 for ignored rows and NaN for labels
        outside [0, C) (never clamped to a valid class); so are the rows of the gradient.

    With z = x / T (x first replaced by softcap tanh(x / softcap)), q = (1-ε) onehot(y) + ε/C:
        row = (1-ε)(lse - z_y) + ε(lse - mean z) + z_loss lse²
        d row / dx = (softmax(z)(1 + 2 z_loss lse) - q) / T
    and with class weights w (W = Σ w), as torch weights label smoothing:
        row = w_y [(1-ε)(lse - z_y) + z_loss lse²] + (ε/C) Σ_k w_k (lse - z_k)
        d row / dz = softmax(z) [w_y (1-ε + 2 z_loss lse) + ε W / C] - w_y (1-ε) onehot(y) - ε w / C
    """
    dcap = None
    if softcap:
        x_in = x
        x, dcap = softcap_logits(x, softcap)
    (t, eps, z_loss), scale, _ = unpack_params(params, 3, weighted)
    n_cls = _n_classes(x, split)
    m, log_s, lse, zs_y, w_zs, wy, wsum, valid, ignored, (w, idx, owns) = _sparse_parts(
        x, labels, params, ignore_index, weighted, split)
    if w is None:
        row = (1.0 - eps) * (log_s - zs_y) + _weighted(eps, log_s - w_zs / n_cls) + _weighted(z_loss, lse * lse)
    else:
        own = (1.0 - eps) * (log_s - zs_y) + _weighted(z_loss, lse * lse)
        row = _weighted(wy, own) + _weighted(eps, (wsum * log_s - w_zs) / n_cls)
    loss = _by_row_kind(row, valid, ignored)
    if not want_x:
        return loss, None, None
    # Per element one multiply-add, g = e a - b, with e = exp(z - m) (XLA shares it with the sum
    # above), per-row a = scale (1 + 2 z_loss lse) / (s T) and b = scale ε / (C T); the label's
    # -(1-ε) scale / T is one scatter-add of N values (in place). An ignored row's gradient is
    # exactly 0 even when its logits hold NaN or inf (padding): the select fuses into the same pass.
    zl = _weighted(z_loss, 2.0 * lse)
    if w is None:
        a = scale * (1.0 + zl) * jnp.exp(-log_s) / t
        b = scale * eps / (n_cls * t)
        label = -(1.0 - eps) * scale / t
    else:
        a = scale * (wy * (1.0 - eps + zl) + eps * wsum / n_cls) * jnp.exp(-log_s) / t
        b = (scale * eps / (n_cls * t)) * w[None, :]
        label = -(1.0 - eps) * wy * scale / t
    g = jnp.exp(_zs(x, m, t)) * a[:, None] - b
    rows = jnp.arange(x.shape[0])
    g = g.at[rows, idx].add(jnp.where(owns, label, jnp.zeros_like(label)))
    if dcap is not None:
        g = g * dcap
    bad = jnp.where(valid, jnp.zeros_like(row), jnp.full_like(row, jnp.nan))
    g = jnp.where(ignored[:, None], jnp.zeros_like(g), g + bad[:, None])
    return loss, g.astype(x_in.dtype if softcap else x.dtype), None


def sparse_cross_entropy_option_grads(x, labels, params, ignore_index, softcap=None, weighted=False):
    """d row / d (T, ε, z_loss), shape (N, 3), with z = x / T and g_z = p A - q (A the factor of p
    in the gradient, q = (1-ε) w_y onehot(y) + ε w / C; w = 1 unweighted):

        d row / dT = -(1/T) Σ_c g_z,c z_c
                   = -(1/T) [A Σ p zs - (1-ε) w_y zs_y - (ε/C) Σ w zs + 2 z_loss w_y lse m / T]
        d row / dε = w_y (zs_y - log s) + (W log s - Σ w zs) / C,    d row / d z_loss = w_y lse²

    (zs = z - m/T: Σ g_z = 2 z_loss w_y lse carries the shift, so large offsets cancel exactly.)
    With a softcap these are the same expressions of the capped logits (T acts after the cap)."""
    if softcap:
        x, _ = softcap_logits(x, softcap)
    t, eps, z_loss = unpack_params(params, 3, weighted).options
    n_cls = x.shape[-1]
    m, log_s, lse, zs_y, w_zs, wy, wsum, valid, ignored, _ = _sparse_parts(x, labels, params, ignore_index,
                                                                           weighted)
    zs = _zs(x, m, t)
    p = jnp.exp(zs - log_s[:, None])
    p_zs = jnp.sum(jnp.where(p == 0, jnp.zeros_like(zs), p * zs), axis=-1)  # 0 * -inf of masked classes
    zl_lse = _weighted(z_loss, 2.0 * lse)
    if not weighted:
        d_t = -((1.0 + zl_lse) * p_zs - (1.0 - eps) * zs_y - _weighted(eps, w_zs / n_cls)
                + _weighted(zl_lse, m / t)) / t
        d = jnp.stack([d_t, zs_y - w_zs / n_cls, lse * lse], axis=-1)
    else:
        big_a = wy * (1.0 - eps + zl_lse) + eps * wsum / n_cls
        d_t = -(_weighted(big_a, p_zs) - _weighted(wy, (1.0 - eps) * zs_y) - _weighted(eps, w_zs / n_cls)
                + _weighted(wy * zl_lse, m / t)) / t
        d_eps = _weighted(wy, zs_y - log_s) + (wsum * log_s - w_zs) / n_cls
        d = jnp.stack([d_t, d_eps, _weighted(wy, lse * lse)], axis=-1)
    return _by_row_kind(d, valid[:, None], ignored[:, None])


# ------------------------------------------------------------------------------------ dense CE
def _dense_parts(x, targets, params, split=None):
    t, eps = unpack_params(params, 2).options
    m, log_s = _shift(x, t, split)
    zs = _zs(x, m, t)
    q = (1.0 - eps) * targets.astype(zs.dtype) + eps / _n_classes(x, split)
    return m, log_s, zs, q


def softmax_cross_entropy(x, targets, params, *, want_x=True, want_other=False, split=None):
    """Per-row softmax cross-entropy with dense targets and its gradients.

    Args:
        x, targets: (N, C) floats. params: options (T, ε) and the scale. split: as in
            ``sparse_cross_entropy``.

    Returns:
        (loss (N,), grad x | None, grad targets | None). With q = (1-ε) t + ε/C:
        row = Σ_c q_c (lse - z_c) (terms with q_c == 0 contribute 0, so a masked -inf class with
        zero target keeps the row finite); d/dx = (p Σq - q) / T; d/dt = (1-ε)(lse - z).
    """
    (t, eps), scale, _ = unpack_params(params, 2)
    m, log_s, zs, q = _dense_parts(x, targets, params, split)
    nll = log_s[:, None] - zs
    terms = jnp.where(q == 0, jnp.zeros_like(zs), q * nll)
    # A row whose logits hold NaN or +inf is NaN whatever its targets (log s is NaN exactly then).
    loss = jnp.where(jnp.isnan(log_s), log_s, _csum(jnp.sum(terms, axis=-1), split))
    gx = gt = None
    if want_x:
        p = jnp.exp(zs) * jnp.exp(-log_s)[:, None]  # shares exp(z - m) with the forward's sum
        gx = ((p * _csum(jnp.sum(q, axis=-1), split)[:, None] - q) * (scale / t)).astype(x.dtype)
    if want_other:
        gt = ((1.0 - eps) * scale * nll).astype(targets.dtype)
    return loss, gx, gt


def softmax_cross_entropy_option_grads(x, targets, params):
    """d row / d (T, ε), shape (N, 2): -(1/T)(Σq Σ p zs - Σ q zs) and Σ (1/C - t)(lse - z)."""
    t = unpack_params(params, 2).options[0]
    m, log_s, zs, q = _dense_parts(x, targets, params)
    p = jnp.exp(zs - log_s[:, None])
    p_zs = jnp.sum(jnp.where(p == 0, jnp.zeros_like(zs), p * zs), axis=-1)
    q_zs = jnp.sum(jnp.where(q == 0, jnp.zeros_like(zs), q * zs), axis=-1)
    d_t = -(jnp.sum(q, axis=-1) * p_zs - q_zs) / t
    d_eps = jnp.sum((1.0 / x.shape[-1] - targets.astype(zs.dtype)) * (log_s[:, None] - zs), axis=-1)
    return jnp.stack([d_t, d_eps], axis=-1)


# ---------------------------------------------------------------------------------- sigmoid CE
def _smoothed_target(targets, eps, dtype):
    return targets.astype(dtype) * (1.0 - eps) + 0.5 * eps


def sigmoid_cross_entropy(x, targets, params, *, want_x=True, want_other=False):
    """Elementwise binary cross-entropy from logits, max(x,0) - x t' + log1p(exp(-|x|)) with
    t' = t(1-ε) + ε/2; params: option ε and the scale; gradients sigmoid(x) - t' and -(1-ε) x."""
    (eps,), scale, _ = unpack_params(params, 1)
    xa = x.astype(acc_dtype(x))
    ts = _smoothed_target(targets, eps, xa.dtype)
    loss = jnp.maximum(xa, 0.0) - xa * ts + jnp.log1p(jnp.exp(-jnp.abs(xa)))
    gx = ((jax.nn.sigmoid(xa) - ts) * scale).astype(x.dtype) if want_x else None
    gt = (-(1.0 - eps) * scale * xa).astype(targets.dtype) if want_other else None
    return loss, gx, gt


def sigmoid_cross_entropy_option_grads(x, targets, params):
    """d loss / dε per element, (n, 1): -x (1/2 - t)."""
    xa = x.astype(acc_dtype(x))
    return (-xa * (0.5 - targets.astype(xa.dtype)))[:, None]


# ------------------------------------------------------------------------------------------ MSE
def squared_error(p, targets, params, *, want_x=True, want_other=False):
    """Elementwise (p - t)^2; params: the scale alone; gradients 2(p - t) and -2(p - t)."""
    acc = acc_dtype(p)
    d = p.astype(acc) - targets.astype(acc)
    two_d = 2.0 * unpack_params(params, 0).scale * d
    return (d * d, two_d.astype(p.dtype) if want_x else None,
            (-two_d).astype(targets.dtype) if want_other else None)


# ------------------------------------------------------------------------------ sigmoid focal
def _focal_parts(x, targets, params):
    """The shared terms of the binary focal loss (see sigmoid_focal).

    u = 1 - p_t is carried as log u = logaddexp(log t' + log q, log(1-t') + log p), with
    log p = log_sigmoid(x), log q = log_sigmoid(-x): it never underflows (u = e^-30000 at x = 3e4 is
    log u = -30000), so f = exp(γ log u), r = p q / u = exp(log p + log q - log u) and bce / u stay
    finite, and so do their derivatives: the second derivative (hessian, and the Numba kernels' own
    second order) differentiates these lines, and the direct forms' derivatives divide by u²,
    which underflows to 0 for |x| > ~44 (optax's extreme-logit hessian test: NaN)."""
    gamma, alpha, balance, eps = unpack_params(params, 4).options
    xa = x.astype(acc_dtype(x))
    ts = _smoothed_target(targets, eps, xa.dtype)
    log_p, log_q = jax.nn.log_sigmoid(xa), jax.nn.log_sigmoid(-xa)
    p, q = jnp.exp(log_p), jnp.exp(log_q)
    bce = jnp.maximum(xa, 0.0) - xa * ts + jnp.log1p(jnp.exp(-jnp.abs(xa)))
    # log t' and log(1 - t') through selects, so that hard targets (0, 1) give -inf with a finite
    # derivative in the unselected branch (a log(0) there would put 0 * inf = NaN into tangents).
    one, ninf = jnp.ones_like(ts), jnp.full_like(ts, -jnp.inf)
    log_t1 = jnp.where(ts > 0, jnp.log(jnp.where(ts > 0, ts, one)), ninf)
    log_t0 = jnp.where(ts < 1, jnp.log1p(-jnp.where(ts < 1, ts, 0.0 * one)), ninf)
    log_u = jnp.logaddexp(log_t1 + log_q, log_t0 + log_p)
    zero_u = log_u == -jnp.inf  # u = 0: f = 0^γ (1 for γ = 0, not exp(0 * -inf) = NaN)
    f = jnp.where(zero_u, jnp.where(gamma == 0, 1.0, 0.0), jnp.exp(gamma * jnp.where(zero_u, 0.0, log_u)))
    w = 1.0 + balance * (ts * alpha + (1.0 - ts) * (1.0 - alpha) - 1.0)
    return xa, ts, p, q, log_p, log_q, bce, log_u, f, w


def _focal_dt(params, xa, ts, p, q, bce, log_u, f, w):
    """d loss / d t' (the smoothed target); bce / u from logs (0 where bce is 0)."""
    gamma, alpha, balance, _ = unpack_params(params, 4).options
    none = bce == 0  # (a NaN bce stays NaN)
    sb = jnp.where(none, 0.0, jnp.exp(jnp.log(jnp.where(none, 1.0, bce)) - log_u))
    bal = jnp.where(balance != 0, balance * (2.0 * alpha - 1.0) * f * bce, 0.0)  # no 0 * inf at x = -inf
    focal = jnp.where(gamma == 0, 0.0, w * gamma * f * sb * (q - p))  # γ = 0: no term (not 0 * inf)
    return bal + focal - w * f * xa


def sigmoid_focal(x, targets, params, *, want_x=True, want_other=False):
    """Elementwise binary focal loss from logits (Keras BinaryFocalCrossentropy semantics).

    With t' = t(1-ε) + ε/2, p = sigmoid(x), q = sigmoid(-x), bce the stable BCE from logits,
    u = 1 - p_t = t' q + (1-t') p, f = u^γ, w = t' α + (1-t')(1-α) if balance else 1:
    loss = w f bce; d/dx = w f [(p - t') + γ (1 - 2t') bce p q / u]; d/dt = (1-ε) d/dt'.
    params: options (γ, α, balance (0 or 1), ε) and the scale."""
    (gamma, _, _, eps), scale, _ = unpack_params(params, 4)
    xa, ts, p, q, log_p, log_q, bce, log_u, f, w = _focal_parts(x, targets, params)
    loss = w * f * bce
    gx = gt = None
    if want_x:
        # p q / u <= max(p, q): γ u^(γ-1) p q = γ f r never overflows; u = 0 (log u = -inf, at x = ±inf
        # with a hard target) has r = 0, its limit
        r = jnp.where(log_u == -jnp.inf, 0.0, jnp.exp(log_p + log_q - jnp.where(log_u == -jnp.inf, 0.0, log_u)))
        rb = jnp.where(r == 0, 0.0, r * bce)  # 0 at x = ±inf (the limit), not 0 * inf
        gx = (w * f * ((p - ts) + gamma * (1.0 - 2.0 * ts) * rb) * scale).astype(x.dtype)
    if want_other:
        dt = _focal_dt(params, xa, ts, p, q, bce, log_u, f, w)
        gt = ((1.0 - eps) * dt * scale).astype(targets.dtype)
    return loss, gx, gt


def sigmoid_focal_option_grads(x, targets, params):
    """d loss / d (γ, α, balance, ε) per element, (n, 4): w f log(u) bce, balance (2t' - 1) f bce,
    (t' α + (1-t')(1-α) - 1) f bce and (1/2 - t) d loss / d t'."""
    _, alpha, balance, _ = unpack_params(params, 4).options
    xa, ts, p, q, log_p, log_q, bce, log_u, f, w = _focal_parts(x, targets, params)
    d_gamma = jnp.where(f > 0, w * f * log_u * bce, 0.0)  # f = 0: u^γ log u -> 0 (and no 0 * -inf)
    d_alpha = balance * (2.0 * ts - 1.0) * f * bce
    d_balance = (ts * alpha + (1.0 - ts) * (1.0 - alpha) - 1.0) * f * bce
    d_eps = (0.5 - targets.astype(xa.dtype)) * _focal_dt(params, xa, ts, p, q, bce, log_u, f, w)
    return jnp.stack([d_gamma, d_alpha, d_balance, d_eps], axis=-1)


# ---------------------------------------------------------------------------------------- Huber
def _huber_clip(p, targets, delta):
    acc = acc_dtype(p)
    d = p.astype(acc) - targets.astype(acc)
    # Two selects, as in the Numba kernel: NaN stays NaN (jnp.clip would too, but say it once).
    return d, jnp.where(d > delta, delta, jnp.where(d < -delta, -delta, d))


def huber(p, targets, params, *, want_x=True, want_other=False):
    """Elementwise Huber loss; params: option δ and the scale. With d = p - t and c = clip(d, -δ, δ):
    loss = c (d - c/2) (d²/2 inside [-δ, δ], δ(|d| - δ/2) outside); gradients c and -c."""
    (delta,), scale, _ = unpack_params(params, 1)
    d, c = _huber_clip(p, targets, delta)
    gc = c * scale
    return (c * (d - 0.5 * c), gc.astype(p.dtype) if want_x else None,
            (-gc).astype(targets.dtype) if want_other else None)


def huber_option_grads(p, targets, params):
    """d loss / dδ per element, (n, 1): |d| - δ outside [-δ, δ] (= |d| - |c|), 0 inside."""
    d, c = _huber_clip(p, targets, unpack_params(params, 1).options[0])
    return (jnp.abs(d) - jnp.abs(c))[:, None]


# ----------------------------------------------------------------------------- softmax focal
def _focal_factors(q, p, nll, gamma):
    """(f, h) = (q^γ, γ q^(γ-1) p ℓ) with the limits where a direct form is NaN: 0^0 = 1; h = 0
    where p ℓ = 0 (p = 0 at a masked class, where p ℓ = 0 * inf; ℓ = 0 where p = 1)."""
    pos = q > 0
    log_q = jnp.log(jnp.where(pos, q, 1.0))
    f = jnp.where(pos, jnp.exp(gamma * log_q), jnp.where(gamma == 0, 1.0, 0.0))
    pl = jnp.where(p == 0, 0.0, p * nll)
    h = jnp.where((pl == 0) | (gamma == 0), 0.0, gamma * jnp.exp((gamma - 1.0) * log_q) * pl)
    return f, h


def softmax_focal(x, other, params, ignore_index=None, weighted=False, *, want_x=True, want_other=False):
    """Per-row softmax focal loss (Keras CategoricalFocalCrossentropy from logits) and its gradients.

    Args:
        x: (N, C) float logits. other: (N,) integer labels, or (N, C) float targets.
        params: options (γ, ε, α), the scale and, when ``weighted`` (static), the (C,) per-class
            factors a (then c_j = α a_j t'_j). ignore_index: static, for labels.

    Returns:
        (loss (N,), grad x | None, grad targets | None). With p = softmax(x), ℓ = -log p, q = 1 - p,
        t' = (1-ε) t + ε/C, c = α a t': row = Σ c q^γ ℓ; d/dx_k = p_k S - c_k (f_k + h_k) with
        f = q^γ, h = γ q^(γ-1) p ℓ, S = Σ c (f + h); d/dt = (1-ε) α a f ℓ. q at the row's argmax
        (the only class that can have p > 1/2) is the sum of the other exps over s, and log s =
        log1p of it, so a confident row keeps its tiny q^γ (kernels.numba_cpu.focal).
    """
    (gamma, eps, alpha), scale, per_class = unpack_params(params, 3, weighted)
    n_cls = x.shape[-1]
    acc = acc_dtype(x)
    xa = x.astype(acc)
    # The shift is the argmax's own logit (not a stop_gradient max): log1p(r) and r / (1 + r) take
    # e_a = 1 as a constant, which differentiates right only if x_a's derivative flows through m.
    amax = lax.stop_gradient(jnp.argmax(xa, axis=-1))
    m = jnp.take_along_axis(xa, amax[:, None], axis=-1)[:, 0]
    finite = jnp.isfinite(m)
    m = jnp.where(m == -jnp.inf, jnp.zeros_like(m), m)
    zs = xa - m[:, None]
    is_a = jnp.arange(n_cls)[None, :] == amax[:, None]
    e = jnp.exp(zs)
    r = jnp.sum(jnp.where(is_a, 0.0, e), axis=-1)
    log_s = jnp.where(finite, jnp.log1p(r), jnp.log(jnp.sum(e, axis=-1)))
    nll = log_s[:, None] - zs
    p = e * jnp.exp(-log_s)[:, None]
    q = jnp.where(is_a & finite[:, None], (r / (1.0 + r))[:, None], 1.0 - p)
    dense = jnp.issubdtype(other.dtype, jnp.floating)
    if dense:
        t = other.astype(acc)
        valid = ignored = None
    else:
        valid = (other >= 0) & (other < n_cls)
        ignored = is_ignored(other, ignore_index)
        t = (jnp.arange(n_cls)[None, :] == other[:, None]).astype(acc)  # fused into the terms by XLA
    a = alpha * (per_class if weighted else jnp.ones((), acc))
    c = a * ((1.0 - eps) * t + eps / n_cls)
    f, h = _focal_factors(q, p, nll, gamma)
    loss = jnp.sum(jnp.where(c == 0, 0.0, c * f * nll), axis=-1)
    loss = jnp.where(jnp.isnan(log_s), log_s, loss)  # NaN / +inf logits: a NaN row
    w = jnp.where(c == 0, 0.0, c * (f + h))
    gx = gt = None
    if want_x:
        gx = (p * jnp.sum(w, axis=-1)[:, None] - w) * scale
    if want_other and dense:
        ga = a * (1.0 - eps)
        gt = (jnp.where(ga == 0, 0.0, ga * f * nll) * scale).astype(other.dtype)
    if not dense:
        loss = _by_row_kind(loss, valid, ignored)
        if gx is not None:
            gx = _by_row_kind(gx, valid[:, None], ignored[:, None])
    return loss, (gx.astype(x.dtype) if gx is not None else None), gt


# ------------------------------------------------------------------------------------ reduction
# -------------------------------------------------------------------------------- distillation
def _log_softmax(x, temperature):
    """log softmax((x - m) / T) of a 2-D array, from shifted logits (see _shift)."""
    m, log_s = _shift(x, temperature)
    return _zs(x, m, temperature) - log_s[:, None]


def _kl(p, lp, lq):
    """(Σ p (lp - lq), d/dz of it through p's logits), terms with p == 0 selected out (masked
    classes: 0, never 0 * (-inf) = NaN)."""
    zero = jnp.zeros_like(p)
    r = lp - lq
    d = jnp.sum(jnp.where(p == 0, zero, p * r), axis=-1)
    return d, jnp.where(p == 0, zero, p * (r - d[:, None]))


def distillation(s, t, labels, params, divergence, ignore_index, has_labels, *, want_s=True, want_t=False):
    """Per-row distillation loss and the gradients of ``scale * Σ rows`` to both logits.

    Args:
        s, t: (N, C) student and teacher logits. labels: (N,) integers (unused without labels).
        params: options (T, α, β) and the scale. divergence: "forward_kl" | "reverse_kl" | "jsd" (static).
        ignore_index: static int or None. has_labels: static bool.

    Returns:
        (rows (N,), grad_s (N, C) | None, grad_t (N, C) | None): rows are T² D, or
        α T² D + (1-α) CE(s, y) with labels (ignored rows 0, out-of-range labels NaN). The
        math and its gradients: fastloss.kernels.numba_cpu.distill.
    """
    (temp, alpha, beta), scale, _ = unpack_params(params, 3)
    ls, lt = _log_softmax(s, temp), _log_softmax(t, temp)
    ps, pt = jnp.exp(ls), jnp.exp(lt)
    if divergence == "forward_kl":
        d, g_t = _kl(pt, lt, ls)
        g_s = ps - pt
    elif divergence == "reverse_kl":
        d, g_s = _kl(ps, ls, lt)
        g_t = pt - ps
    else:
        # log M without forming M: logaddexp of the weighted log-probabilities (log 0 = -inf is fine)
        lm = jnp.logaddexp(jnp.log(beta) + lt, jnp.log1p(-beta) + ls)
        kt, dkt = _kl(pt, lt, lm)
        ks, dks = _kl(ps, ls, lm)
        d = beta * kt + (1.0 - beta) * ks
        g_t, g_s = beta * dkt, (1.0 - beta) * dks
    w = alpha if has_labels else jnp.ones_like(alpha)
    row = temp * temp * d * w
    g_s = g_s * (temp * w * scale)
    g_t = g_t * (temp * w * scale)
    if has_labels:
        n_cls = s.shape[-1]
        l1 = _log_softmax(s, jnp.ones_like(temp))
        idx = jnp.clip(labels, 0, n_cls - 1)
        rows = jnp.arange(s.shape[0])
        row = row + (1.0 - alpha) * -l1[rows, idx]
        g_s = (g_s + jnp.exp(l1) * ((1.0 - alpha) * scale)).at[rows, idx].add(-(1.0 - alpha) * scale)
        valid = (labels >= 0) & (labels < n_cls)
        ignored = is_ignored(labels, ignore_index)
        row = _by_row_kind(row, valid, ignored)
        g_s = _by_row_kind(g_s, valid[:, None], ignored[:, None])
        g_t = _by_row_kind(g_t, valid[:, None], ignored[:, None])
    return (row, g_s.astype(s.dtype) if want_s else None, g_t.astype(t.dtype) if want_t else None)


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
