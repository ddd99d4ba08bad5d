"""The gradients as differentiable torch expressions (the contract's closed forms), one function per
kernel (named as ``LossSpec.kernel``): what a backward returns when it is itself being
differentiated (``create_graph=True``, ``torch.func`` nesting, hessians), so second derivatives are
exact. Correctness over speed: only the second order runs them.

Each takes (x, other, opts, w) with ``w`` = d total / d value broadcastable to x (the upstream
gradient times the reduction's scale) and returns (d x, d other | None).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .library import acc_dtype


def softmax_cross_entropy(x, targets, opts, w):
    acc = acc_dtype(x)
    t, eps = opts["temperature"], opts["label_smoothing"]
    q = targets.to(acc) * (1 - eps) + eps / x.shape[-1]
    z = x.to(acc) / t
    gx = (torch.softmax(z, -1) * q.sum(-1, keepdim=True) - q) / t * w
    gt = (1 - eps) * (torch.logsumexp(z, -1, keepdim=True) - z) * w
    return gx, gt


def sigmoid_cross_entropy(x, targets, opts, w):
    acc = acc_dtype(x)
    xf, eps = x.to(acc), opts["label_smoothing"]
    tt = targets.to(acc) * (1 - eps) + eps / 2
    return (torch.sigmoid(xf) - tt) * w, -(1 - eps) * xf * w


def squared_error(p, targets, opts, w):
    d = p.to(acc_dtype(p)) - targets.to(acc_dtype(p))
    return 2 * d * w, -2 * d * w


def huber(p, targets, opts, w):
    d = p.to(acc_dtype(p)) - targets.to(acc_dtype(p))
    c = torch.clamp(d, -opts["delta"], opts["delta"])
    return c * w, -c * w


def sparse_cross_entropy(x, y, opts, w):
    """With class weights and the softcap; labels get no gradient."""
    acc = acc_dtype(x)
    t, eps, zl, cap = opts["temperature"], opts["label_smoothing"], opts["z_loss"], opts.get("softcap")
    ign = opts["ignore_index"]
    n_cls = x.shape[-1]
    xf = x.to(acc)
    dcap = None
    if cap:
        th = torch.tanh(xf / cap)
        xf, dcap = torch.where(xf == -float("inf"), xf, cap * th), 1 - th * th
    keep = torch.ones_like(y, dtype=torch.bool) if ign is None else y != ign
    z = xf / t
    p = torch.softmax(z, dim=-1)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    onehot = (torch.arange(n_cls, device=x.device) == y.unsqueeze(-1)).to(acc)  # no data-dependent shapes (vmap)
    if opts.get("weight") is None:
        g = p * (1 + 2 * zl * lse) - (onehot * (1 - eps) + eps / n_cls)
    else:
        cw = opts["weight"].to(acc)
        wy = (onehot * cw).sum(-1, keepdim=True)
        g = p * (wy * (1 - eps + 2 * zl * lse) + eps * cw.sum() / n_cls) - (onehot * wy * (1 - eps) + eps * cw / n_cls)
    g = g / t * w
    if dcap is not None:
        g = g * dcap
    return torch.where(keep.unsqueeze(-1), g, torch.zeros_like(g)), None


def sigmoid_focal(x, t, opts, w):
    """In the log-space form of kernels.jax_xla's sigmoid focal loss (whose derivatives stay finite
    at extreme logits)."""
    x, t = x.to(acc_dtype(x)), t.to(acc_dtype(x))
    gamma, alpha, eps = opts["gamma"], opts["alpha"], opts["label_smoothing"]
    balance = float(opts["apply_class_balancing"])
    ts = t * (1 - eps) + eps / 2
    log_p, log_q = F.logsigmoid(x), F.logsigmoid(-x)
    p, q = log_p.exp(), log_q.exp()
    bce = torch.clamp(x, min=0) - x * ts + torch.log1p(torch.exp(-x.abs()))
    ninf = torch.full_like(ts, -float("inf"))
    log_t1 = torch.where(ts > 0, torch.log(torch.where(ts > 0, ts, torch.ones_like(ts))), ninf)
    log_t0 = torch.where(ts < 1, torch.log1p(-torch.where(ts < 1, ts, torch.zeros_like(ts))), ninf)
    log_u = torch.logaddexp(log_t1 + log_q, log_t0 + log_p)
    zero_u = log_u == -float("inf")  # u = 0: f = 0^γ (1 for γ = 0, not exp(0 * -inf) = NaN)
    f = torch.where(zero_u, torch.full_like(log_u, 1.0 if gamma == 0 else 0.0),
                    torch.exp(gamma * torch.where(zero_u, torch.zeros_like(log_u), log_u)))
    wt = 1 + balance * (ts * alpha + (1 - ts) * (1 - alpha) - 1)
    finite = log_u != -float("inf")  # u = 0 at x = ±inf with a hard target: r = 0, its limit
    r = torch.where(finite, torch.exp(log_p + log_q - torch.where(finite, log_u, torch.zeros_like(log_u))),
                    torch.zeros_like(log_u))
    gx = wt * f * ((p - ts) + gamma * (1 - 2 * ts) * torch.where(r == 0, torch.zeros_like(r), r * bce))
    none = bce == 0  # (a NaN bce stays NaN)
    sb = torch.where(none, torch.zeros_like(bce),
                     torch.exp(torch.log(torch.where(none, torch.ones_like(bce), bce)) - log_u))
    focal = wt * gamma * f * sb * (q - p) if gamma else 0.0  # γ = 0: no term (not 0 * inf)
    dt = (balance * (2 * alpha - 1) * f * bce if balance else 0.0) + focal - wt * f * x
    return gx * w, (1 - eps) * dt * w


def softmax_focal(x, other, opts, w):
    """kernels.jax_xla.softmax_focal's math: q at the argmax from the other classes' mass; limits
    where a direct form is NaN."""
    x = x.to(acc_dtype(x))
    gamma, eps, n_cls = opts["gamma"], opts["label_smoothing"], x.shape[-1]
    # The shift is the argmax's own logit, not a detached max: log1p(r) and r/(1 + r) hold e_a = 1
    # as a constant, which is exact only if that element's derivative flows through the shift.
    amax = x.argmax(-1, keepdim=True)
    m = x.gather(-1, amax)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    zs = x - m
    is_a = torch.arange(n_cls, device=x.device) == amax
    e = zs.exp()
    r = torch.where(is_a, torch.zeros_like(e), e).sum(-1, keepdim=True)
    log_s = torch.log1p(r)
    nll = log_s - zs
    p = e / (1 + r)
    q = torch.where(is_a, r / (1 + r), 1 - p)
    dense = other.is_floating_point()
    t = other.to(x.dtype) if dense else (torch.arange(n_cls, device=x.device) == other.unsqueeze(-1)).to(x.dtype)
    a = opts["alpha"] * (opts["weight"].to(x.dtype) if opts.get("weight") is not None else 1.0)
    c = a * ((1 - eps) * t + eps / n_cls)
    pos = q > 0
    lq = torch.log(torch.where(pos, q, torch.ones_like(q)))
    f = torch.where(pos, torch.exp(gamma * lq), torch.full_like(q, 1.0 if gamma == 0 else 0.0))
    pl = torch.where(p == 0, torch.zeros_like(p), p * nll)
    h = torch.where(pl == 0, torch.zeros_like(pl), gamma * torch.exp((gamma - 1) * lq) * pl) if gamma else 0.0 * pl
    wc = torch.where(c == 0, torch.zeros_like(c), c * (f + h))
    gx = p * wc.sum(-1, keepdim=True) - wc
    gt = None
    if dense:
        ga = a * (1 - eps) * torch.ones_like(f)
        gt = torch.where(ga == 0, torch.zeros_like(f), ga * f * nll) * w
    elif opts["ignore_index"] is not None:
        gx = torch.where((other != opts["ignore_index"]).unsqueeze(-1), gx, torch.zeros_like(gx))
    return gx * w, gt


def distillation(s, t, labels, opts, has_labels, w):
    """(d student, d teacher) of distillation_loss."""
    acc = acc_dtype(s)
    temp, alpha, beta = opts["temperature"], opts["alpha"], opts["beta"]
    ls = torch.log_softmax(s.to(acc) / temp, -1)
    lt = torch.log_softmax(t.to(acc) / temp, -1)
    ps, pt = ls.exp(), lt.exp()

    def kl(p, lp, lq):
        r = torch.where(p == 0, torch.zeros_like(p), lp - lq)
        d = (p * r).sum(-1, keepdim=True)
        return d, torch.where(p == 0, torch.zeros_like(p), p * (r - d))

    div = opts["divergence"]
    if div == "forward_kl":
        _, g_t = kl(pt, lt, ls)
        g_s = ps - pt
    elif div == "reverse_kl":
        _, g_s = kl(ps, ls, lt)
        g_t = pt - ps
    else:
        lm = torch.logaddexp(lt + torch.log(torch.tensor(beta, dtype=acc)),
                             ls + torch.log1p(torch.tensor(-beta, dtype=acc)))
        _, dkt = kl(pt, lt, lm)
        _, dks = kl(ps, ls, lm)
        g_t, g_s = beta * dkt, (1 - beta) * dks
    wd = alpha if has_labels else 1.0
    g_s, g_t = g_s * (temp * wd), g_t * (temp * wd)
    if has_labels:
        onehot = torch.arange(s.shape[-1], device=s.device) == labels.unsqueeze(-1)
        g_s = g_s + (1 - alpha) * (torch.softmax(s.to(acc), -1) - onehot.to(acc))
        if opts["ignore_index"] is not None:
            keep = (labels != opts["ignore_index"]).unsqueeze(-1)
            g_s = torch.where(keep, g_s, torch.zeros_like(g_s))
            g_t = torch.where(keep, g_t, torch.zeros_like(g_t))
    return g_s * w, g_t * w
