"""Every loss as a torch custom op (``torch.ops.fastloss.<loss>``), for eager, autograd, torch.func
and ``torch.compile(fullgraph=True)``.

One op per loss, with the schema

    (Tensor x, Tensor other, float[] params, int ignore_index, str reduction, str backend,
     bool want_x, bool want_other, Tensor? weight=None) -> (Tensor value, Tensor grad_x, Tensor grad_other)

(``weight``: sparse cross-entropy's class weights, not differentiated, as in torch.)

- The real implementation runs the fused kernel: Numba for CPU tensors (or Triton's interpreter
  when ``backend="triton"``), Triton for CUDA tensors. The forward writes the gradients already
  scaled for the reduction (an upstream gradient of 1); an unwanted gradient is an empty tensor.
- The fake implementation gives shapes and dtypes, so Dynamo and AOTAutograd trace the op without
  running, or importing, Numba or Triton.
- Autograd (``_Fused``, an autograd.Function around the op): backward rescales the fused gradient
  by the upstream gradient. When the backward itself is being differentiated (``create_graph=True``,
  ``torch.func`` nesting, hessians), it computes the same gradient with a differentiable unfused
  formula instead, so second derivatives are exact.
- The op's vmap rule runs the batch as more rows and reduces per batch element.

``want_x``/``want_other`` are decided by the caller from ``requires_grad`` and the grad mode, so
``torch.no_grad`` computes no gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _adapter

_ROW = _adapter.ROW_NDIM
_SCHEMA = ("(Tensor x, Tensor other, float[] params, int ignore_index, str reduction, str backend, bool want_x, "
           "bool want_other, Tensor? weight=None) -> (Tensor, Tensor, Tensor)")
_LIB = torch.library.Library("fastloss", "DEF")  # noqa: TOR901 - one library object, kept for the process

# params per loss, in order (names of the options dict)
PARAMS = {
    "sparse_softmax_cross_entropy": ("temperature", "label_smoothing", "z_loss", "softcap"),
    "softmax_cross_entropy": ("temperature", "label_smoothing"),
    "sigmoid_cross_entropy": ("label_smoothing",),
    "mean_squared_error": (),
    "huber": ("delta",),
    "sigmoid_focal_loss": ("gamma", "alpha", "apply_class_balancing", "label_smoothing"),
    "softmax_focal_loss": ("gamma", "label_smoothing", "alpha"),
}
_WITH_CLASS_TENSOR = ("sparse_softmax_cross_entropy", "softmax_focal_loss")  # ignore_index and `weight`


def _opts(name, params, ignore_index, reduction, weight=None):
    opts = dict(zip(PARAMS[name], params), reduction=reduction)
    if name in _WITH_CLASS_TENSOR:
        opts["ignore_index"] = None if ignore_index == _adapter.NO_IGNORE else ignore_index
        if name == "sparse_softmax_cross_entropy":
            opts["softcap"] = opts["softcap"] or None  # 0.0 in params: none
        if weight is not None:  # sparse CE's class weights; the focal loss's per-class α
            opts["weight"] = weight
    return opts


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _value_shape(name, x, reduction):
    if reduction != "none":
        return ()
    return tuple(x.shape[:-1]) if _ROW[name] else tuple(x.shape)


# ------------------------------------------------------------------------------- forward
_HALF = (torch.float16, torch.bfloat16)


def _grad_f32(x, reduction):
    """16-bit gradients for reduction="none" are kept in float32 until the per-row cotangent scales
    them: the gradient for a cotangent of 1 can overflow float16 (|2 (p - t)| > 65504) where the
    scaled one does not, and rounding twice costs an ulp."""
    return reduction == "none" and x.dtype in _HALF


def _real(name):
    def impl(x, other, params, ignore_index, reduction, backend, want_x, want_other, weight=None):
        opts = _opts(name, params, ignore_index, reduction, weight)
        if _grad_f32(x, reduction):
            opts["grad_dtype"] = "float32"
        if backend == "triton" or x.device.type != "cpu":
            from . import _triton as adapter
            adapter.check_device(x, other)
        else:
            from . import _numba as adapter
        value, gx, go = adapter.run(name, x, other, opts, want_x, want_other)
        # Outputs of a custom op are new tensors of fixed types: an unwanted gradient is empty.
        return (value.reshape(_value_shape(name, x, reduction)),
                gx if gx is not None else x.new_empty(0), go if go is not None else other.new_empty(0))
    return impl


def _fake(name):
    def impl(x, other, params, ignore_index, reduction, backend, want_x, want_other, weight=None):
        value = x.new_empty(_value_shape(name, x, reduction), dtype=_acc(x))
        gdt = torch.float32 if _grad_f32(x, reduction) else None
        return (value, torch.empty_like(x, dtype=gdt or x.dtype) if want_x else x.new_empty(0),
                torch.empty_like(other, dtype=gdt or other.dtype) if want_other else other.new_empty(0))
    return impl


# ------------------------------------------------------------------------------ backward
def _weights(name, x, other, opts, g):
    """d total / d value per row (per element), broadcastable to x: the upstream gradient times the
    reduction's scale."""
    acc = _acc(x)
    g = g.to(acc)
    if opts["reduction"] == "none":
        return g.reshape(g.shape + (1,) * _ROW[name])
    if opts["reduction"] == "sum":
        return g
    return g / _mean_count(name, x, other, opts).to(acc)


def _mean_count(name, x, other, opts, batch_axes=0):
    """The count "mean" divides by, at least 1: of the whole input, or per index of its first
    ``batch_axes`` axes (the vmap rule). Non-ignored rows for sparse CE (with class weights the
    sum of their labels' weights, 1 where that is 0), rows for dense CE, elements for the
    elementwise losses."""
    lead = tuple(x.shape[:batch_axes])
    if name == "sparse_softmax_cross_entropy" and opts.get("weight") is not None:
        w, n_cls = opts["weight"].to(_acc(x)), x.shape[-1]
        kept = (other >= 0) & (other < n_cls)
        if opts["ignore_index"] is not None:
            kept = kept & (other != opts["ignore_index"])
        per = torch.where(kept, w[other.clamp(0, n_cls - 1)], torch.zeros((), dtype=w.dtype, device=w.device))
        count = per.reshape(lead + (-1,)).sum(-1)
        return torch.where(count != 0, count, torch.ones_like(count))
    labeled = name == "sparse_softmax_cross_entropy" or (name == "softmax_focal_loss"
                                                          and not other.is_floating_point())
    if labeled and opts["ignore_index"] is not None:
        kept = other != opts["ignore_index"]
        count = kept.reshape(lead + (-1,)).sum(-1)
    else:
        per = x[(0,) * batch_axes].numel() // (max(x.shape[-1], 1) if _ROW[name] else 1)
        count = torch.full(lead, per, device=x.device)
    return count.clamp(min=1)


def _unfused_grads(name, x, other, opts, w):
    """The gradients as differentiable torch expressions (the contract's closed forms), for the
    second order only: correctness over speed. ``w`` is _weights(...)."""
    acc = _acc(x)
    xf = x.to(acc)
    if name == "sparse_softmax_cross_entropy":
        return _sparse_unfused(x, other, opts, w), None
    if name == "softmax_cross_entropy":
        t, eps = opts["temperature"], opts["label_smoothing"]
        q = other.to(acc) * (1 - eps) + eps / x.shape[-1]
        z = xf / t
        gx = (torch.softmax(z, -1) * q.sum(-1, keepdim=True) - q) / t * w
        gt = (1 - eps) * (torch.logsumexp(z, -1, keepdim=True) - z) * w
        return gx, gt
    if name == "sigmoid_cross_entropy":
        eps = opts["label_smoothing"]
        tt = other.to(acc) * (1 - eps) + eps / 2
        return (torch.sigmoid(xf) - tt) * w, -(1 - eps) * xf * w
    if name == "sigmoid_focal_loss":
        return _focal_grads(xf, other.to(acc), opts, w)
    if name == "softmax_focal_loss":
        return _softmax_focal_grads(xf, other, opts, w)
    d = xf - other.to(acc)
    if name == "huber":
        c = torch.clamp(d, -opts["delta"], opts["delta"])
        return c * w, -c * w
    return 2 * d * w, -2 * d * w


def _sparse_unfused(x, y, opts, w):
    """Sparse CE's gradient as a torch expression (the contract's closed form, with class weights
    and the softcap), for the second order."""
    acc = _acc(x)
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
    return torch.where(keep.unsqueeze(-1), g, torch.zeros_like(g))


def _focal_grads(x, t, opts, w):
    """The focal loss's gradients as torch expressions, in the log-space form of
    kernels.jax_xla._focal_parts (whose derivatives stay finite at extreme logits)."""
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


def _softmax_focal_grads(x, other, opts, w):
    """The softmax focal loss's gradients as torch expressions (kernels.jax_xla.softmax_focal's
    math: q at the argmax from the other classes' mass; limits where a direct form is NaN)."""
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


class _Fused(torch.autograd.Function):
    """Autograd around the op (an autograd.Function with setup_context, so torch.func transforms
    and Dynamo both take it; the op's vmap rule makes ``generate_vmap_rule`` work)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x, other, name, params, ignore_index, reduction, backend, want_x, want_other, weight):
        return getattr(torch.ops.fastloss, name)(x, other, params, ignore_index, reduction, backend, want_x,
                                                 want_other, weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, other, name, params, ignore_index, reduction, _, _, _, weight = inputs
        ctx.name = name
        ctx.opts = _opts(name, params, ignore_index, reduction, weight)
        ctx.save_for_backward(x, other, output[1], output[2])
        ctx.mark_non_differentiable(output[1], output[2])
        # The gradient outputs have no gradient: without this autograd would fill an (N, C) zeros
        # tensor for each of them on every backward (as long as the kernel itself, measured).
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g_value, _g_gx, _g_go):
        x, other, gx, go = ctx.saved_tensors
        name, opts = ctx.name, ctx.opts
        want = ctx.needs_input_grad[:2]
        rest = (None,) * 8
        if g_value is None:
            return (None, None) + rest
        if torch.is_grad_enabled():  # the backward is differentiated: an exact, differentiable formula
            ux, uo = _unfused_grads(name, x, other, opts, _weights(name, x, other, opts, g_value))
            return ((ux.to(x.dtype) if want[0] else None),
                    (uo.to(other.dtype) if want[1] and uo is not None else None)) + rest
        out = []
        for grad, ref, needed in zip((gx, go), (x, other), want):
            # needed but not computed in the forward: only if requires_grad changed in between
            out.append(_rescale(name, grad, g_value, opts["reduction"]).to(ref.dtype)
                       if needed and grad.shape == ref.shape else None)
        return tuple(out) + rest


def _rescale(name, grad, g, reduction):
    """The fused gradient (for an upstream gradient of 1) times the actual upstream gradient."""
    acc = _acc(grad)
    if reduction == "none":
        w = g.to(acc).reshape(g.shape + (1,) * _ROW.get(name, 1))  # distillation_loss: per row
        return (grad.to(acc) * w).to(grad.dtype)
    torch.ops.fastloss.scale_(grad, g)  # in place, and nothing at all for the usual g = 1
    return grad


def _scale_in_place(grad, g):
    """grad *= g for a scalar g, skipped when g is 1 (a loss that is the root of backward): an opaque
    op, so a compiled backward makes the same run-time check instead of a pass over the gradient.
    It mutates only the fused gradient buffer, which nothing else holds."""
    if not (g.dim() == 0 and g.device.type == "cpu" and float(g) == 1.0):
        acc = _acc(grad)
        grad.copy_(grad.to(acc) * g.to(acc))


# --------------------------------------------------------------------------------- vmap
def _vmap(name):
    op = lambda *a: getattr(torch.ops.fastloss, name)(*a)  # noqa: E731 - resolved at call time

    def rule(info, in_dims, x, other, params, ignore_index, reduction, backend, want_x, want_other, weight=None):
        bx, bo = in_dims[0], in_dims[1]
        if len(in_dims) > 8 and in_dims[8] is not None:
            raise ValueError("vmap over `weight` is not supported: class weights are one (C,) tensor for the batch.")
        size = info.batch_size
        x = x.movedim(bx, 0) if bx is not None else x.expand((size,) + tuple(x.shape))
        other = other.movedim(bo, 0) if bo is not None else other.expand((size,) + tuple(other.shape))
        value, gx, go = op(x, other, params, ignore_index, "none", backend, want_x, want_other, weight)
        if reduction != "none":  # reduce per batch element; the fused gradients get that element's scale
            opts = _opts(name, params, ignore_index, reduction, weight)
            flat = value.reshape(size, -1)
            total = flat.sum(-1, dtype=torch.float64).to(value.dtype)
            if reduction == "mean":
                count = _mean_count(name, x, other, opts, batch_axes=1).to(value.dtype)
                total = total / count
                scale = (1.0 / count).reshape((size,) + (1,) * (x.dim() - 1))
                gx = (gx.to(scale.dtype) * scale).to(gx.dtype) if want_x else gx
                go = (go.to(scale.dtype) * scale.reshape((size,) + (1,) * (other.dim() - 1))).to(go.dtype) \
                    if want_other else go
            value = total
        return (value, gx, go), (0, 0 if want_x else None, 0 if want_other else None)
    return rule


_LIB.define("scale_(Tensor(a!) grad, Tensor g) -> ()")
torch.library.impl("fastloss::scale_", ("cpu", "cuda"), lib=_LIB)(_scale_in_place)
torch.library.register_fake("fastloss::scale_", lambda grad, g: None, lib=_LIB)

for _name in _ROW:
    _LIB.define(_name + _SCHEMA)
    _qual = f"fastloss::{_name}"
    torch.library.impl(_qual, ("cpu", "cuda"), lib=_LIB)(_real(_name))
    torch.library.register_fake(_qual, _fake(_name), lib=_LIB)
    torch.library.register_vmap(_qual, _vmap(_name), lib=_LIB)


def call(name, x, other, opts, backend):
    """The loss of torch tensors through ``torch.ops.fastloss.<name>``; gradients are computed in the
    forward exactly when autograd will ask for them."""
    grad_on = torch.is_grad_enabled()
    want_x = bool(grad_on and x.requires_grad)
    want_other = bool(grad_on and other.requires_grad and other.is_floating_point())
    params = [float(opts.get(k) or 0.0) for k in PARAMS[name]]  # softcap None -> 0.0
    ign = _adapter.kernel_ignore_index(opts.get("ignore_index"))
    weight = opts.get("weight")
    if weight is not None:
        weight = weight.detach().to(device=x.device, dtype=_acc(x)).contiguous()
    value, _, _ = _Fused.apply(x, other, name, params, ign, opts["reduction"], backend, want_x, want_other, weight)
    return value


# ---------------------------------------------------------------------------- distillation
# torch.ops.fastloss.distillation_loss(student, teacher, labels, [T, α, β], ignore_index, divergence,
# reduction, backend, has_labels, want_s, want_t) -> (value, grad_student, grad_teacher). Without
# labels, ``labels`` is an empty int64 tensor (a schema's Tensor? would do, but an always-present
# tensor keeps the vmap rule and the fake simple).
_DISTILL_SCHEMA = ("distillation_loss(Tensor s, Tensor t, Tensor labels, float[] params, int ignore_index, "
                   "str divergence, str reduction, str backend, bool has_labels, bool want_s, bool want_t) "
                   "-> (Tensor, Tensor, Tensor)")


def _distill_opts(params, ignore_index, divergence, reduction):
    return dict(temperature=params[0], alpha=params[1], beta=params[2], divergence=divergence, reduction=reduction,
                ignore_index=None if ignore_index == _adapter.NO_IGNORE else ignore_index)


def _distill_real(s, t, labels, params, ignore_index, divergence, reduction, backend, has_labels, want_s, want_t):
    opts = _distill_opts(params, ignore_index, divergence, reduction)
    if _grad_f32(s, reduction):
        opts["grad_dtype"] = "float32"
    if backend == "triton" or s.device.type != "cpu":
        from . import _triton as adapter
        adapter.check_device(s, t)
    else:
        from . import _numba as adapter
    value, gs, gt = adapter.distill(s, t, labels if has_labels else None, opts, want_s, want_t)
    lead = tuple(s.shape[:-1]) if reduction == "none" else ()
    return (value.reshape(lead), gs if gs is not None else s.new_empty(0), gt if gt is not None else t.new_empty(0))


def _distill_fake(s, t, labels, params, ignore_index, divergence, reduction, backend, has_labels, want_s, want_t):
    value = s.new_empty(tuple(s.shape[:-1]) if reduction == "none" else (), dtype=_acc(s))
    gdt = torch.float32 if _grad_f32(s, reduction) else None
    return (value, torch.empty_like(s, dtype=gdt or s.dtype) if want_s else s.new_empty(0),
            torch.empty_like(t, dtype=gdt or t.dtype) if want_t else t.new_empty(0))


def _distill_count(s, labels, opts, has_labels, batch_axes=0):
    """The count "mean" divides by, at least 1 (per index of the first ``batch_axes`` axes)."""
    lead = tuple(s.shape[:batch_axes])
    if has_labels and opts["ignore_index"] is not None:
        count = (labels != opts["ignore_index"]).reshape(lead + (-1,)).sum(-1)
    else:
        count = torch.full(lead, s[(0,) * batch_axes].numel() // max(s.shape[-1], 1), device=s.device)
    return count.clamp(min=1)


def _distill_unfused(s, t, labels, opts, has_labels, w):
    """Differentiable torch expressions of the gradients (second order only): the contract's math."""
    acc = _acc(s)
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


class _Distill(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(s, t, labels, params, ignore_index, divergence, reduction, backend, has_labels, want_s, want_t):
        return torch.ops.fastloss.distillation_loss(s, t, labels, params, ignore_index, divergence, reduction,
                                                    backend, has_labels, want_s, want_t)

    @staticmethod
    def setup_context(ctx, inputs, output):
        s, t, labels, params, ignore_index, divergence, reduction, _, has_labels, _, _ = inputs
        ctx.opts = _distill_opts(params, ignore_index, divergence, reduction)
        ctx.has_labels = has_labels
        ctx.save_for_backward(s, t, labels, output[1], output[2])
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g_value, _g1, _g2):
        s, t, labels, gs, gt = ctx.saved_tensors
        opts, want = ctx.opts, ctx.needs_input_grad[:2]
        rest = (None,) * 9
        if g_value is None:
            return (None, None) + rest
        if torch.is_grad_enabled():  # differentiated backward: the exact, differentiable formula
            acc = _acc(s)
            if opts["reduction"] == "none":
                w = g_value.to(acc).unsqueeze(-1)
            elif opts["reduction"] == "sum":
                w = g_value.to(acc)
            else:
                w = g_value.to(acc) / _distill_count(s, labels, opts, ctx.has_labels).to(acc)
            us, ut = _distill_unfused(s, t, labels, opts, ctx.has_labels, w)
            return (us.to(s.dtype) if want[0] else None, ut.to(t.dtype) if want[1] else None) + rest
        out = []
        for grad, ref, needed in zip((gs, gt), (s, t), want):
            out.append(_rescale("distillation_loss", grad, g_value, opts["reduction"]).to(ref.dtype)
                       if needed and grad.shape == ref.shape else None)
        return tuple(out) + rest


def _distill_vmap(info, in_dims, s, t, labels, params, ignore_index, divergence, reduction, backend, has_labels,
                  want_s, want_t):
    size = info.batch_size

    def lift(a, d):
        return a.movedim(d, 0) if d is not None else a.expand((size,) + tuple(a.shape))
    s, t = lift(s, in_dims[0]), lift(t, in_dims[1])
    labels = lift(labels, in_dims[2]) if has_labels else labels
    value, gs, gt = torch.ops.fastloss.distillation_loss(s, t, labels, params, ignore_index, divergence, "none",
                                                         backend, has_labels, want_s, want_t)
    if reduction != "none":
        total = value.reshape(size, -1).sum(-1, dtype=torch.float64).to(value.dtype)
        if reduction == "mean":
            opts = _distill_opts(params, ignore_index, divergence, reduction)
            count = _distill_count(s, labels, opts, has_labels, batch_axes=1).to(value.dtype)
            total = total / count
            scale = (1.0 / count).reshape((size,) + (1,) * (s.dim() - 1))
            gs = (gs.to(scale.dtype) * scale).to(gs.dtype) if want_s else gs
            gt = (gt.to(scale.dtype) * scale).to(gt.dtype) if want_t else gt
        value = total
    return (value, gs, gt), (0, 0 if want_s else None, 0 if want_t else None)


_LIB.define(_DISTILL_SCHEMA)
torch.library.impl("fastloss::distillation_loss", ("cpu", "cuda"), lib=_LIB)(_distill_real)
torch.library.register_fake("fastloss::distillation_loss", _distill_fake, lib=_LIB)
torch.library.register_vmap("fastloss::distillation_loss", _distill_vmap, lib=_LIB)


def _distill_args(s, t, labels, opts):
    has_labels = labels is not None
    y = labels if has_labels else torch.empty(0, dtype=torch.int64, device=s.device)
    params = [float(opts[k]) for k in ("temperature", "alpha", "beta")]
    return y, params, _adapter.kernel_ignore_index(opts["ignore_index"]), has_labels


def distill_call(s, t, labels, opts, backend):
    """distillation_loss of torch tensors through the custom op, with autograd; the teacher's
    gradient is computed only when the teacher requires it."""
    grad_on = torch.is_grad_enabled()
    y, params, ign, has_labels = _distill_args(s, t, labels, opts)
    value, _, _ = _Distill.apply(s, t, y, params, ign, opts["divergence"], opts["reduction"], backend, has_labels,
                                 bool(grad_on and s.requires_grad), bool(grad_on and t.requires_grad))
    return value


def distill_value_and_grad(s, t, labels, opts, backend):
    y, params, ign, has_labels = _distill_args(s, t, labels, opts)
    value, gs, _ = torch.ops.fastloss.distillation_loss(s.detach(), t.detach(), y, params, ign, opts["divergence"],
                                                        opts["reduction"], backend, has_labels, True, False)
    return value, gs
