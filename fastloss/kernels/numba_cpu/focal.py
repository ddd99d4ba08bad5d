"""Softmax focal loss (Lin et al., 2017; Keras ``CategoricalFocalCrossentropy`` from logits), with
integer labels or dense targets: one entry point, ``softmax_focal``.

Row math, with p = softmax(x), ℓ_j = lse - x_j = -log p_j, q_j = 1 - p_j, the smoothed target
t'_j = (1-ε) t_j + ε/C (t the one-hot of the label, never built, or the dense target row) and
c_j = α_j t'_j::

    row = Σ_j c_j q_j^γ ℓ_j                    (terms with c_j = 0 are 0: a masked -inf class
                                               with no target mass stays finite)
    d row / d x_k = p_k S - c_k (f_k + h_k),   f = q^γ, h = γ q^(γ-1) p ℓ, S = Σ_j c_j (f_j + h_j)
    d row / d t_j = (1-ε) α_j f_j ℓ_j           (dense targets)

(d ℓ_j / d x_k = p_k - δ_jk and d q_j / d x_k = -p_j (δ_jk - p_k), so each term's derivative is
(p_k - δ_jk)(f_j + h_j) times c_j.)

Precision: q_j = 1 - p_j is exact enough for every class but the row's argmax (only it can have
p > 1/2); there q = Σ_{k≠a} e_k / s is summed directly (rowstats._rest_sum), and log s =
log1p(that sum), so a confident row (q = 1e-9) keeps its focal factor q^γ instead of rounding it to 0.

Passes per row: the block-online statistics (one read of the logits, exps kept in a scratch row),
one pass forming each class's terms (q^γ by multiplication for γ in {0, 1, 2, 3}, ``**`` otherwise)
with c_j (f_j + h_j) kept in a second scratch row, then the gradient, stored non-temporally. With
labels and ε = 0 only the label's term is non-zero: the terms pass is skipped (``_label_term``) and
the gradient is S (p - onehot), the cost of a plain cross-entropy plus the argmax's block.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .base import JIT, LOG2E, _as, _padded, _u
from .halfio import _load, _store
from .intrinsics import _store_fence
from .rowstats import STAT_BLOCK, _axpb, _block_factor, _fill, _online_stats, _rest_sum


@njit(**JIT)
def _gamma_code(gamma):
    """0-3 for an integer γ (powers by multiplication, vectorised), -1 for any other (``**``)."""
    for k in range(4):
        if gamma == k:
            return k
    return -1


@njit(inline="always", **JIT)
def _factors(q, p, nll, gamma, k, zero, one):
    """(f, h) = (q^γ, γ q^(γ-1) p ℓ). h is 0 where p ℓ is: p = 0 at a masked class (ℓ = inf, where
    p ℓ would be NaN) and ℓ = 0 where p = 1 (q^(γ-1) = inf for γ < 1)."""
    pl = p * nll
    pl = pl if p != zero else zero
    if k == 0:
        return one, zero
    if k == 1:
        return q, pl
    if k == 2:
        dq = q + q
        f = q * q
    elif k == 3:
        f = q * q * q
        dq = _as(3, zero) * q * q
    else:
        f = q ** gamma
        dq = gamma * q ** (gamma - one)
    return f, (dq * pl if pl != zero else zero)


@njit(inline="always", **JIT)
def _terms(xr, tr, uy, dense, al, sc, bm, wk, gtr, c, m, inv_s, log_s, ua, qa, fp, k, want_gt):
    """One pass over the row: (Σ c f ℓ, S); wk[j] = c_j (f_j + h_j); the targets' gradient."""
    gamma, eps, alpha, scale, unit = fp
    zero = gamma - gamma
    one = _as(1, zero)
    keep = one - eps
    eps_c = eps / _as(c, zero)
    has_al = al.shape[0] != 0
    loss = zero
    big_s = zero
    for blk in range((c + STAT_BLOCK - 1) // STAT_BLOCK):
        blo = blk * STAT_BLOCK
        bhi = min(blo + STAT_BLOCK, c)
        fb = _block_factor(bm, blk, m, LOG2E, zero) * inv_s
        for j in range(_u(blo), _u(bhi)):
            p = sc[j] * fb
            nll = log_s - (_load(xr[j]) - m) * unit  # see softmax_focal on ``unit``
            q = qa if j == ua else one - p
            if dense:
                tq = keep * _load(tr[j]) + eps_c
            else:
                tq = keep + eps_c if j == uy else eps_c
            aj = al[j] if has_al else alpha
            cj = aj * tq
            f, h = _factors(q, p, nll, gamma, k, zero, one)
            term = cj * f * nll
            loss += term if cj != zero else zero
            w = cj * (f + h)
            w = w if cj != zero else zero
            wk[j] = w
            big_s += w
            if want_gt:
                ga = aj * keep
                gt = ga * f * nll * scale
                gtr[j] = _store(gt if ga != zero else zero, gtr[j])
    return loss, big_s


@njit(**JIT)
def _label_term(xr, y, al, sc, bm, m, log_s, inv_s, a, qa, fp, k):
    """(row, w) of a row whose only target mass is its label's (labels, ε = 0): the one term
    c_y q_y^γ ℓ_y and w = c_y (f_y + h_y), the S of the gradient. No pass over the classes."""
    gamma, eps, alpha, scale, unit = fp
    zero = gamma - gamma
    one = _as(1, zero)
    zs = (_load(xr[y]) - m) * unit
    nll = log_s - zs
    p = sc[y] * _block_factor(bm, y // STAT_BLOCK, m, _as(LOG2E, zero), zero) * inv_s
    q = qa if y == a else one - p
    cy = (al[y] if al.shape[0] != 0 else alpha) * (one - eps)
    f, h = _factors(q, p, nll, gamma, k, zero, one)
    if cy == zero:
        return zero, zero
    return cy * f * nll, cy * (f + h)


@njit(**JIT)
def _argmax(xr, bm, c, m):
    """The first index holding the row max m, or -1 (an all -inf row, whose m was made 0, or NaN).
    The first block whose shift is m is where the running max reached m: the max is in it."""
    for blk in range((c + STAT_BLOCK - 1) // STAT_BLOCK):
        if bm[0, blk] == m:
            for j in range(blk * STAT_BLOCK, min(blk * STAT_BLOCK + STAT_BLOCK, c)):
                if _load(xr[j]) == m:
                    return j
            return -1
    return -1


@njit(**JIT)
def _focal_row(xr, tr, y, dense, al, loss, gxr, gtr, i, sc, bm, wk, fp, k, want_gx, want_gt):
    zero = fp[0] - fp[0]
    one = _as(1, zero)
    c = xr.shape[0]
    m, s, _ = _online_stats(xr, 0, c, _as(LOG2E, zero), sc, bm, False, zero)
    a = _argmax(xr, bm, c, m)
    if a >= 0:  # s = 1 + rest exactly as the math has it; log1p keeps log s accurate near 1
        rest = _rest_sum(sc, bm, c, a, m, _as(LOG2E, zero), zero)
        s = one + rest
        log_s = np.log1p(rest)
        qa = rest / s
        ua = _u(a)
    else:
        log_s = np.log(s)
        qa = zero
        ua = _u(c)  # matches no class
    inv_s = one / s
    uy = _u(y if y >= 0 else c)
    label_only = not dense and fp[1] == zero and not want_gt
    if label_only:  # every other class has c_j = 0: one term, and the gradient is S (p - onehot)
        row, big_s = _label_term(xr, y, al, sc, bm, m, log_s, inv_s, a, qa, fp, k)
    elif k == 2:
        row, big_s = _terms(xr, tr, uy, dense, al, sc, bm, wk, gtr, c, m, inv_s, log_s, ua, qa, fp, 2, want_gt)
    elif k == 0:
        row, big_s = _terms(xr, tr, uy, dense, al, sc, bm, wk, gtr, c, m, inv_s, log_s, ua, qa, fp, 0, want_gt)
    elif k == 1:
        row, big_s = _terms(xr, tr, uy, dense, al, sc, bm, wk, gtr, c, m, inv_s, log_s, ua, qa, fp, 1, want_gt)
    elif k == 3:
        row, big_s = _terms(xr, tr, uy, dense, al, sc, bm, wk, gtr, c, m, inv_s, log_s, ua, qa, fp, 3, want_gt)
    else:
        row, big_s = _terms(xr, tr, uy, dense, al, sc, bm, wk, gtr, c, m, inv_s, log_s, ua, qa, fp, -1, want_gt)
    # A row whose logits hold NaN or +inf is NaN whatever its targets (s is NaN exactly then).
    loss[i] = row if s == s else s
    if want_gx:
        scale = fp[3]
        a_s = big_s * scale * inv_s
        for blk in range((c + STAT_BLOCK - 1) // STAT_BLOCK):
            blo = blk * STAT_BLOCK
            bhi = min(blo + STAT_BLOCK, c)
            f = a_s * _block_factor(bm, blk, m, _as(LOG2E, zero), zero)
            if label_only:
                for j in range(_u(blo), _u(bhi)):
                    sc[j] = sc[j] * f
            else:
                for j in range(_u(blo), _u(bhi)):
                    sc[j] = sc[j] * f - wk[j] * scale
        if label_only:  # p_y S - S = -S q_y: no cancellation where p_y is close to 1
            sy = big_s * scale
            sc[y] = -sy * qa if y == a else sc[y] - sy
        _axpb(gxr, sc, 0, c, one, zero)


@njit(parallel=True, **JIT)
def softmax_focal(x, x_stride, t, t_stride, y, c, loss, gx, gt, opts, alpha, ign, dense, want_gx, want_gt,
                  n_workers):
    """Per-row softmax focal loss and its gradients (see the module docstring).

    Args:
        x: flat logits, row i at ``i * x_stride``; t: flat dense targets likewise (``dense``), or a
            1-element dummy; y: (N,) int64 labels (sparse), or a 1-element dummy (dense).
        loss: (N,) out, accumulation dtype; gx, gt: (N, C) out, written when ``want_gx``/``want_gt``.
        opts: ``options.FocalOptions`` (γ, ε, α, scale, 1) in the accumulation dtype; alpha: (C,)
            per-class α (then ``opts.alpha`` is unused) or empty. The field ``one`` (1) arrives at
            run time so that LLVM cannot fold it:
            ``log s - (x - m) * 1`` keeps ``x - m`` (exact) from being re-associated by fast-math into
            ``(log s + m) - x``, which loses ulp(m) (0.008 at a 1e5 offset) in every class's -log p.
        ign: the label of ignored rows (loss 0, gradient 0).

    Returns:
        True if some label was outside [0, C) and not ``ign`` (its row is NaN): the caller raises.
    """
    n = loss.shape[0]
    k = _gamma_code(opts.gamma)
    zero = opts.gamma - opts.gamma
    nan = zero / zero
    sc = np.empty((n_workers, _padded(c)), dtype=loss.dtype)
    wk = np.empty((n_workers, _padded(c)), dtype=loss.dtype)
    bstats = np.empty((n_workers, 2, _padded((c + STAT_BLOCK - 1) // STAT_BLOCK)), dtype=loss.dtype)
    bad = np.zeros(n_workers, dtype=np.bool_)
    for w in prange(n_workers):
        for i in range(w * n // n_workers, (w + 1) * n // n_workers):
            gxr = gx[i if want_gx else 0]
            yi = -1
            if not dense:
                yi = y[i]
                if yi == ign or yi < 0 or yi >= c:
                    invalid = yi != ign
                    bad[w] |= invalid
                    loss[i] = nan if invalid else zero
                    if want_gx:
                        _fill(gxr, 0, c, nan if invalid else zero)
                    continue
            _focal_row(x[i * x_stride:i * x_stride + c], t[i * t_stride:i * t_stride + c] if dense else t, yi, dense,
                       alpha, loss, gxr, gt[i if want_gt else 0], i, sc[w], bstats[w], wk[w], opts, k, want_gx,
                       want_gt)
        _store_fence()  # this worker's non-temporal gradient stores are complete
    return bad.any()
