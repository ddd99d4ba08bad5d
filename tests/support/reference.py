"""Naive float64 NumPy reference for every fastloss loss: values and gradients, every option.

Written for clarity, not speed: each formula is the contract's, term by term. ``cot`` is the
cotangent of the per-row / per-element losses for reduction="none" (gradients are those of
``sum(cot * loss)``); for "mean"/"sum" the gradient is that of the scalar.
Shared by tests/ and bench/ (the benchmark report checks every provider against it).
"""
from __future__ import annotations

import numpy as np


def f64(a):
    return np.asarray(a).astype(np.float64)


def _row_scale(n, reduction, count, cot):
    if reduction == "none":
        return np.ones(n) if cot is None else f64(cot).reshape(n)
    if reduction == "sum":
        return np.ones(n)
    return np.full(n, 1.0 / (count if count != 0 else 1))  # a weighted count may be below 1


def _reduce(values, reduction, count, lead_shape):
    if reduction == "none":
        return values.reshape(lead_shape)
    total = float(np.sum(values))  # pairwise summation in float64
    return total if reduction == "sum" else total / (count if count != 0 else 1)


def _shift(z):
    # An all -inf (masked) row shifts by 0; a row holding +inf or NaN keeps its max, so the whole
    # row is NaN (docs/numerics.md: +inf logits give NaN, as on every backend).
    m = np.max(z, axis=-1)
    m = np.where(m == -np.inf, 0.0, m)
    zs = z - m[:, None]
    return zs, m, np.log(np.sum(np.exp(zs), axis=-1))


def sparse_softmax_cross_entropy(logits, labels, temperature=1.0, label_smoothing=0.0,
                                 ignore_index=-100, z_loss=0.0, weight=None, softcap=None, reduction="mean",
                                 cot=None):
    """Returns (loss, d loss / d logits). With class weights w (torch's semantics) and a softcap c:

        x' = c tanh(x / c) (-inf kept), z = x' / T, W = Σ w
        row = w_y ((1-ε)(lse - z_y) + z_loss lse²) + (ε/C) Σ_k w_k (lse - z_k)
        "mean" = Σ rows / Σ_{counted rows} w_y
    """
    with np.errstate(all="ignore"):
        x = f64(logits)
        n_cls = x.shape[-1]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, n_cls)
        dcap = 1.0
        if softcap:
            th = np.tanh(x2 / softcap)
            x2, dcap = np.where(x2 == -np.inf, x2, softcap * th), 1.0 - th * th  # 0 at -inf: tanh = -1
        z = x2 / temperature
        y = np.asarray(labels).reshape(-1).astype(np.int64)
        n = z.shape[0]
        zs, m, log_s = _shift(z)
        lse = m + log_s
        valid = (y >= 0) & (y < n_cls)
        ignored = y == ignore_index
        yc = np.clip(y, 0, n_cls - 1)
        w = np.ones(n_cls) if weight is None else f64(weight)
        wy, w_sum = w[yc], w.sum()
        nll = log_s - zs[np.arange(n), yc]
        own = (1 - label_smoothing) * nll + (z_loss * lse ** 2 if z_loss else 0.0)
        row = np.where(wy == 0, 0.0, wy * own)
        if label_smoothing:  # Σ_k w_k (log s - zs_k), a class of weight 0 adding 0 even at -inf
            row = row + label_smoothing / n_cls * np.sum(np.where(w == 0, 0.0, w * (log_s[:, None] - zs)), axis=-1)
        row = np.where(ignored, 0.0, np.where(valid, row, np.nan))
        count = int(np.sum(~ignored)) if weight is None else float(np.sum(np.where(~ignored & valid, wy, 0.0)))
        scale = _row_scale(n, reduction, count, cot)
        scale = np.where(ignored, 0.0, np.where(valid, scale, np.nan))
        p = np.exp(zs - log_s[:, None])
        big_a = wy * (1 - label_smoothing + 2 * z_loss * lse) + label_smoothing * w_sum / n_cls
        g = p * big_a[:, None] - label_smoothing * w[None, :] / n_cls
        # The label's entry without cancellation: p_y - 1 = -Σ_{j≠y} p_j. Formed as p_y - 1, a
        # confident label (p_y = 1 - 5e-6) loses ~1e-11 of its relative accuracy to the rounding of p_y
        # next to 1, and by how much depends on the machine's exp (NumPy's AVX-512 and AVX2 float64
        # exp round differently): a reference must be more accurate than what it checks.
        onehot = np.arange(n_cls)[None, :] == yc[:, None]
        rest = np.sum(np.where(onehot, 0.0, p), axis=-1)
        p_y = p[np.arange(n), yc]
        g[np.arange(n), yc] = (wy * (1 - label_smoothing) * -rest + label_smoothing * (w_sum * p_y - wy) / n_cls
                               + 2 * z_loss * wy * lse * p_y)
        g = g * dcap
        g = np.where(ignored[:, None], 0.0, g * scale[:, None] / temperature)  # whatever the row holds
        return _reduce(row, reduction, count, lead), g.reshape(x.shape)


def softmax_cross_entropy(logits, targets, temperature=1.0, label_smoothing=0.0,
                          reduction="mean", cot=None):
    """Returns (loss, d loss / d logits, d loss / d targets)."""
    with np.errstate(all="ignore"):
        x = f64(logits)
        n_cls = x.shape[-1]
        z = x.reshape(-1, n_cls) / temperature
        t = f64(targets).reshape(-1, n_cls)
        n = z.shape[0]
        zs, m, log_s = _shift(z)
        q = (1 - label_smoothing) * t + label_smoothing / n_cls
        terms = np.where(q == 0, 0.0, q * (log_s[:, None] - zs))
        row = np.where(np.isnan(log_s), np.nan, terms.sum(axis=-1))  # NaN / +inf logits: a NaN row
        scale = _row_scale(n, reduction, n, cot)[:, None]
        p = np.exp(zs - log_s[:, None])
        g_x = (p * q.sum(axis=-1, keepdims=True) - q) * scale / temperature
        g_t = (1 - label_smoothing) * (log_s[:, None] - zs) * scale
        return _reduce(row, reduction, n, x.shape[:-1]), g_x.reshape(x.shape), g_t.reshape(x.shape)


def sigmoid_cross_entropy(logits, targets, label_smoothing=0.0, reduction="mean", cot=None):
    """Returns (loss, d loss / d logits, d loss / d targets)."""
    with np.errstate(all="ignore"):
        x = f64(logits)
        t = f64(targets) * (1 - label_smoothing) + 0.5 * label_smoothing
        vals = np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
        scale = _row_scale(x.size, reduction, x.size, cot).reshape(x.shape)
        sig = np.where(x >= 0, 1 / (1 + np.exp(-x)), np.exp(x) / (1 + np.exp(x)))
        return (_reduce(vals.reshape(-1), reduction, x.size, x.shape),
                (sig - t) * scale, -(1 - label_smoothing) * x * scale)


def mean_squared_error(predictions, targets, reduction="mean", cot=None):
    """Returns (loss, d loss / d predictions, d loss / d targets)."""
    p, t = f64(predictions), f64(targets)
    d = p - t
    scale = _row_scale(p.size, reduction, p.size, cot).reshape(p.shape)
    return _reduce((d * d).reshape(-1), reduction, p.size, p.shape), 2 * d * scale, -2 * d * scale


def huber(predictions, targets, delta=1.0, reduction="mean", cot=None):
    """Returns (loss, d loss / d predictions, d loss / d targets): the two-branch textbook form."""
    with np.errstate(all="ignore"):
        p, t = f64(predictions), f64(targets)
        e = p - t
        a = np.abs(e)
        vals = np.where(a <= delta, 0.5 * e * e, delta * (a - 0.5 * delta))
        vals = np.where(np.isnan(e), np.nan, vals)
        g = np.where(a <= delta, e, delta * np.sign(e))
        g = np.where(np.isnan(e), np.nan, g)
        scale = _row_scale(p.size, reduction, p.size, cot).reshape(p.shape)
        return _reduce(vals.reshape(-1), reduction, p.size, p.shape), g * scale, -g * scale


def sigmoid_focal_loss(logits, targets, gamma=2.0, alpha=0.25, apply_class_balancing=False, label_smoothing=0.0,
                       reduction="mean", cot=None):
    """Returns (loss, d loss / d logits, d loss / d targets): Keras' formula from logits, and its
    derivatives by the chain rule through p_t, in float64 (1 - p_t from sigmoid(-x))."""
    with np.errstate(all="ignore"):
        x = f64(logits)
        eps = label_smoothing
        t = f64(targets) * (1 - eps) + 0.5 * eps
        p = np.where(x >= 0, 1 / (1 + np.exp(-x)), np.exp(x) / (1 + np.exp(x)))
        q = np.where(x >= 0, np.exp(-x) / (1 + np.exp(-x)), 1 / (1 + np.exp(x)))
        bce = np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
        one_minus_pt = t * q + (1 - t) * p
        focal = one_minus_pt ** gamma
        bal = float(apply_class_balancing)
        w = 1 + bal * (t * alpha + (1 - t) * (1 - alpha) - 1)
        vals = w * focal * bce
        # d focal / d u = gamma u^(gamma-1); where u == 0 (p or q underflowed) the products below are 0
        dfocal = np.where(one_minus_pt > 0, gamma * one_minus_pt ** (gamma - 1), 0.0)
        # p q bce -> 0 as x -> ±inf (p q decays like exp(-|x|)): the limit, not 0 * inf = NaN
        pq_bce = np.where(p * q == 0, 0.0, p * q * bce)
        gx = w * (dfocal * (1 - 2 * t) * pq_bce + focal * (p - t))
        bal_term = (2 * alpha - 1) * focal * bce if apply_class_balancing else 0.0
        focal_term = np.where(dfocal == 0, 0.0, w * dfocal * (q - p) * bce)  # γ = 0: no term (not 0 * inf)
        gt = (1 - eps) * (bal_term + focal_term - w * focal * x)
        scale = _row_scale(x.size, reduction, x.size, cot).reshape(x.shape)
        return _reduce(vals.reshape(-1), reduction, x.size, x.shape), gx * scale, gt * scale


def softmax_focal_loss(logits, targets, gamma=2.0, alpha=0.25, label_smoothing=0.0, ignore_index=-100,
                       reduction="mean", cot=None):
    """Returns (loss, d loss / d logits, d loss / d targets | None): Keras' categorical focal loss
    from logits without its probability clip, term by term in float64. ``targets``: integer labels
    (..., ) or dense targets (..., C); ``alpha``: a number or (C,) per-class factors.

        p = softmax(x), q = 1 - p, t' = (1-ε) t + ε/C, c = α t'
        row = Σ_j c_j q_j^γ (-log p_j)
        d row / d x_k = p_k Σ_j c_j (f_j + h_j) - c_k (f_k + h_k),  f = q^γ, h = γ q^(γ-1) p (-log p)
    """
    with np.errstate(all="ignore"):
        x = f64(logits)
        n_cls = x.shape[-1]
        z = x.reshape(-1, n_cls)
        n = z.shape[0]
        dense = np.asarray(targets).dtype.kind == "f"
        zs, m, log_s = _shift(z)
        # Without cancellation at the argmax a (the one class that can have p > 1/2): with
        # r = Σ_{k≠a} exp(zs_k), s = 1 + r, log s = log1p(r) and q_a = r / s. Formed as log Σ exp,
        # s = 1 + 4e-16 rounds by 10% of r, and q_a^γ with it.
        amax = np.argmax(z, axis=-1)
        is_a = np.arange(n_cls)[None, :] == amax[:, None]
        r = np.sum(np.where(is_a, 0.0, np.exp(zs)), axis=-1)
        finite = np.isfinite(m) & (np.max(z, axis=-1) == m)  # the max is an element: exp(zs_a) = 1
        log_s = np.where(finite, np.log1p(r), log_s)
        nll = log_s[:, None] - zs
        p = np.exp(-nll)
        q = np.where(is_a & finite[:, None], (r / (1 + r))[:, None], 1.0 - p)
        if dense:
            t = f64(targets).reshape(-1, n_cls)
            y = np.zeros(n, np.int64)
            ignored = np.zeros(n, bool)
            valid = np.ones(n, bool)
        else:
            y = np.asarray(targets).reshape(-1).astype(np.int64)
            ignored = y == ignore_index
            valid = (y >= 0) & (y < n_cls)
            t = (np.arange(n_cls)[None, :] == np.clip(y, 0, n_cls - 1)[:, None]).astype(np.float64)
        tq = (1 - label_smoothing) * t + label_smoothing / n_cls
        a = np.broadcast_to(f64(alpha), (n_cls,))[None, :]
        c = a * tq
        f = q ** gamma
        pl = np.where(p == 0, 0.0, p * nll)
        h = np.where(pl == 0, 0.0, gamma * q ** (gamma - 1) * pl) if gamma else np.zeros_like(p)
        row = np.sum(np.where(c == 0, 0.0, c * f * nll), axis=-1)
        row = np.where(np.isnan(log_s), np.nan, row)
        row = np.where(ignored, 0.0, np.where(valid, row, np.nan))
        count = int(np.sum(~ignored))
        scale = _row_scale(n, reduction, count, cot)
        scale = np.where(ignored, 0.0, np.where(valid, scale, np.nan))[:, None]
        w = np.where(c == 0, 0.0, c * (f + h))
        g_x = (p * w.sum(axis=-1, keepdims=True) - w) * scale
        g_x = np.where(ignored[:, None], 0.0, g_x)
        g_t = None
        if dense:
            ga = a * (1 - label_smoothing)
            g_t = (np.where(ga == 0, 0.0, ga * f * nll) * scale).reshape(x.shape)
        return _reduce(row, reduction, count, x.shape[:-1]), g_x.reshape(x.shape), g_t


LOSSES = {
    "sparse_softmax_cross_entropy": sparse_softmax_cross_entropy,
    "softmax_cross_entropy": softmax_cross_entropy,
    "sigmoid_cross_entropy": sigmoid_cross_entropy,
    "mean_squared_error": mean_squared_error,
    "huber": huber,
    "sigmoid_focal_loss": sigmoid_focal_loss,
    "softmax_focal_loss": softmax_focal_loss,
}


def _log_softmax(z):
    """log softmax of the rows of z (float64), -inf where z is -inf; a NaN/+inf row is NaN."""
    zs, _, log_s = _shift(z)
    return zs - log_s[:, None]


def distillation_loss(student, teacher, labels=None, temperature=1.0, alpha=0.5, divergence="forward_kl",
                      beta=0.5, ignore_index=-100, reduction="mean", cot=None):
    """Returns (loss, d loss / d student, d loss / d teacher), term by term in float64 log space.

    Per row, P_t = softmax(teacher / T), P_s = softmax(student / T), D the divergence; the row is
    T² D without labels and α T² D + (1 - α) CE(student, y) with them (CE at T = 1). Terms whose
    probability is 0 (masked classes) contribute 0. Gradients are those of the softmax chain rule:
    for g = dD/dP, dD/dz_j = P_j (g_j - Σ_k P_k g_k), and dz/dx = 1/T.
    """
    with np.errstate(all="ignore"):
        s, t = f64(student), f64(teacher)
        n_cls = s.shape[-1]
        lead = s.shape[:-1]
        s2, t2 = s.reshape(-1, n_cls), t.reshape(-1, n_cls)
        n = s2.shape[0]
        T = temperature
        ls, lt = _log_softmax(s2 / T), _log_softmax(t2 / T)
        ps, pt = np.exp(ls), np.exp(lt)

        def kl(p, lp, lq):  # Σ p (lp - lq) with 0 where p == 0, and its gradients to lp's and lq's logits
            terms = np.where(p == 0, 0.0, p * (lp - lq))
            d = terms.sum(-1)
            d_own = np.where(p == 0, 0.0, p * (lp - lq - d[:, None]))  # d KL / d z_p (through p and lp)
            return d, d_own

        if divergence == "forward_kl":
            d, g_t = kl(pt, lt, ls)
            g_s = ps - pt
        elif divergence == "reverse_kl":
            d, g_s = kl(ps, ls, lt)
            g_t = pt - ps
        elif divergence == "jsd":
            lm = np.logaddexp(np.log(beta) + lt, np.log1p(-beta) + ls) if 0 < beta < 1 else (lt if beta == 1 else ls)
            kt, dkt = kl(pt, lt, lm)
            ks, dks = kl(ps, ls, lm)
            d = beta * kt + (1 - beta) * ks
            # d/dz of Σ M log M cancels the log M terms of the two KLs: what remains is each one's own part.
            g_t, g_s = beta * dkt, (1 - beta) * dks
        else:
            raise ValueError(divergence)
        row = T * T * d
        gs, gt = T * g_s, T * g_t
        keep = np.ones(n, bool)
        if labels is not None:
            y = np.asarray(labels).reshape(-1).astype(np.int64)
            keep = y != ignore_index
            valid = (y >= 0) & (y < n_cls)
            yc = np.clip(y, 0, n_cls - 1)
            l1 = _log_softmax(s2)
            ce = -l1[np.arange(n), yc]
            p1 = np.exp(l1)
            onehot = np.arange(n_cls)[None, :] == yc[:, None]
            g_ce = p1 - onehot
            # the label's entry without cancellation: p_y - 1 = -Σ_{j≠y} p_j
            g_ce[np.arange(n), yc] = -np.sum(np.where(onehot, 0.0, p1), axis=-1)
            row = alpha * row + (1 - alpha) * ce
            gs, gt = alpha * gs + (1 - alpha) * g_ce, alpha * gt
            row = np.where(keep, np.where(valid, row, np.nan), 0.0)
        count = int(np.sum(keep))
        scale = _row_scale(n, reduction, count, cot)[:, None]
        gs = np.where(keep[:, None], gs * scale, 0.0)
        gt = np.where(keep[:, None], gt * scale, 0.0)
        return _reduce(row, reduction, count, lead), gs.reshape(s.shape), gt.reshape(t.shape)


def linear_cross_entropy(hidden, weight, labels, bias=None, reduction="mean", cot=None, chunk_size=None,
                         **ce_options):
    """The unfused pair in float64: ``logits = hidden @ weight.T + bias``, then sparse CE (the
    chunk size changes nothing). Returns (loss, d hidden, d weight, d bias | None)."""
    h = f64(hidden)
    hdim = h.shape[-1]
    z = h.reshape(-1, hdim) @ f64(weight).T
    if bias is not None:
        z = z + f64(bias)
    y = np.asarray(labels).reshape(-1)
    loss, gz = sparse_softmax_cross_entropy(z, y, reduction=reduction, cot=cot, **ce_options)
    if reduction == "none":
        loss = np.asarray(loss).reshape(h.shape[:-1])
    gh = (gz @ f64(weight)).reshape(h.shape)
    gw = gz.T @ h.reshape(-1, hdim)
    return loss, gh, gw, (gz.sum(axis=0) if bias is not None else None)
