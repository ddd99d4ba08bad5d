"""PyTorch: the custom ops under autograd (second order included), torch.func, no_grad and
torch.compile(fullgraph=True)."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import fastloss  # noqa: E402

N, C = 4, 5
CASES = {  # name -> (make other, a torch reference with the same options, options)
    "sparse_softmax_cross_entropy": (
        lambda g: torch.tensor([0, 1, -100, 3]),
        lambda x, y, temperature=1.0, label_smoothing=0.0, z_loss=0.0, reduction="mean": _torch_sparse(
            x, y, temperature, label_smoothing, z_loss, reduction),
        dict(temperature=0.7, label_smoothing=0.1, z_loss=1e-2)),
    "softmax_cross_entropy": (
        lambda g: torch.softmax(torch.randn(N, C, dtype=torch.float64, generator=g), -1),
        lambda x, t, temperature=1.0, label_smoothing=0.0, reduction="mean": F.cross_entropy(
            x / temperature, t, label_smoothing=label_smoothing, reduction=reduction),
        dict(temperature=1.3, label_smoothing=0.2)),
    "sigmoid_cross_entropy": (
        lambda g: torch.rand(N, C, dtype=torch.float64, generator=g),
        lambda x, t, label_smoothing=0.0, reduction="mean": F.binary_cross_entropy_with_logits(
            x, t * (1 - label_smoothing) + label_smoothing / 2, reduction=reduction),
        dict(label_smoothing=0.1)),
    "mean_squared_error": (
        lambda g: torch.randn(N, C, dtype=torch.float64, generator=g),
        lambda p, t, reduction="mean": F.mse_loss(p, t, reduction=reduction),
        dict()),
    "huber": (
        lambda g: torch.randn(N, C, dtype=torch.float64, generator=g),
        lambda p, t, delta=1.0, reduction="mean": F.huber_loss(p, t, delta=delta, reduction=reduction),
        dict(delta=0.7)),
    # class weights (one 0) and the softcap together, against torch's weighted cross-entropy of the
    # capped logits
    "sparse_softmax_cross_entropy[weight,softcap]": (
        lambda g: torch.tensor([0, 1, -100, 2]),
        lambda x, y, weight, softcap, temperature=1.0, label_smoothing=0.0, z_loss=0.0, reduction="mean":
            _torch_weighted(x, y, weight, softcap, temperature, label_smoothing, z_loss, reduction),
        dict(weight=torch.tensor([0.5, 2.0, 0.0, 1.5, 0.7], dtype=torch.float64), softcap=2.0, temperature=0.8,
             label_smoothing=0.1, z_loss=1e-2)),
    "sigmoid_focal_loss": (
        lambda g: torch.rand(N, C, dtype=torch.float64, generator=g),
        lambda x, t, gamma=2.0, alpha=0.25, apply_class_balancing=False, label_smoothing=0.0, reduction="mean":
            _torch_focal(x, t, gamma, alpha, apply_class_balancing, label_smoothing, reduction),
        dict(gamma=1.5, apply_class_balancing=True, alpha=0.4, label_smoothing=0.1)),
}


def _torch_focal(x, t, gamma, alpha, balance, eps, reduction):
    """Keras' formula from logits, autodiffed by torch (the second reference)."""
    t = t * (1 - eps) + eps / 2
    p = torch.sigmoid(x)
    per = (1 - (t * p + (1 - t) * (1 - p))) ** gamma * F.binary_cross_entropy_with_logits(x, t, reduction="none")
    if balance:
        per = per * (t * alpha + (1 - t) * (1 - alpha))
    return {"mean": per.mean, "sum": per.sum, "none": lambda: per}[reduction]()


def _torch_sparse(x, y, temperature, label_smoothing, z_loss, reduction):
    z = x / temperature
    keep = y != -100
    rows = F.cross_entropy(z, y, label_smoothing=label_smoothing, reduction="none") + \
        z_loss * torch.logsumexp(z, -1) ** 2 * keep
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / keep.sum().clamp(min=1)


def _torch_weighted(x, y, weight, softcap, temperature, label_smoothing, z_loss, reduction):
    """torch's weighted (and label-smoothed) cross-entropy of cap tanh(x / cap), plus the z-loss
    weighted by w[y] like the rest of the row; "mean" over the counted rows' weights."""
    z = torch.where(x == -float("inf"), x, softcap * torch.tanh(x / softcap)) / temperature
    keep = y != -100
    w_y = torch.where(keep, weight[y.clamp(min=0)], torch.zeros_like(weight[0]))
    rows = F.cross_entropy(z, y, weight=weight, label_smoothing=label_smoothing, reduction="none") + \
        z_loss * torch.logsumexp(z, -1) ** 2 * w_y
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / w_y.sum()


def _fn(name):
    return getattr(fastloss, name.split("[")[0])


def _inputs(name, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, dtype=torch.float64, generator=g) * 2
    return x, CASES[name][0](g)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", list(CASES))
def test_gradgradcheck_every_loss(name, reduction):
    x, other = _inputs(name)
    fn = _fn(name)
    opts = dict(CASES[name][2], reduction=reduction)
    float_other = other.is_floating_point()
    args = (x.requires_grad_(), other.requires_grad_() if float_other else other)

    def f(a, b):
        return fn(a, b, **opts)
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("name", list(CASES))
def test_hessian_and_create_graph_match_torch(name):
    x, other = _inputs(name, seed=1)
    fn, ref = _fn(name), CASES[name][1]
    opts = CASES[name][2]
    h = torch.autograd.functional.hessian(lambda a: fn(a, other, **opts), x)
    h_ref = torch.autograd.functional.hessian(lambda a: ref(a, other, **opts), x)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-12)
    xg = x.clone().requires_grad_()
    g, = torch.autograd.grad(fn(xg, other, **opts), xg, create_graph=True)
    assert g.requires_grad


def test_gradient_penalty_step_matches_torch():
    # loss + ||d loss / d logits||^2 through a linear head: the penalty's gradient needs the second
    # derivative of the loss (it was silently zero once).
    torch.manual_seed(0)
    h, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 7, (8,))
    w0 = torch.randn(6, 7, dtype=torch.float64)
    grads = []
    for loss_fn in (fastloss.sparse_softmax_cross_entropy, F.cross_entropy):
        w = w0.clone().requires_grad_()
        logits = h @ w
        loss = loss_fn(logits, y)
        g, = torch.autograd.grad(loss, logits, create_graph=True)
        (loss + (g ** 2).sum()).backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_torch_func_grad_vmap_jacrev(name):
    fn, ref = _fn(name), CASES[name][1]
    opts = CASES[name][2]
    x, other = _inputs(name, seed=2)
    g1 = torch.func.grad(lambda a: fn(a, other, **opts))(x)
    g2 = torch.func.grad(lambda a: ref(a, other, **opts))(x)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    xb = torch.stack([x, x * 0.5, -x])
    ob = torch.stack([other] * 3)
    for reduction in ("mean", "sum", "none"):
        o = dict(opts, reduction=reduction)
        v1 = torch.func.vmap(lambda a, b: fn(a, b, **o))(xb, ob)
        v2 = torch.func.vmap(lambda a, b: ref(a, b, **o))(xb, ob)
        torch.testing.assert_close(v1, v2, rtol=1e-10, atol=1e-12)
    gv1 = torch.func.vmap(torch.func.grad(lambda a, b: fn(a, b, **opts)))(xb, ob)
    gv2 = torch.func.vmap(torch.func.grad(lambda a, b: ref(a, b, **opts)))(xb, ob)
    torch.testing.assert_close(gv1, gv2, rtol=1e-10, atol=1e-12)
    j1 = torch.func.jacrev(lambda a: fn(a, other, reduction="none", **opts))(x)
    j2 = torch.func.jacrev(lambda a: ref(a, other, reduction="none", **opts))(x)
    torch.testing.assert_close(j1, j2, rtol=1e-10, atol=1e-12)


def test_no_grad_computes_no_gradient(monkeypatch):
    from fastloss._numpy import launch
    seen = []
    real = launch.sparse_cross_entropy
    monkeypatch.setattr(launch, "sparse_cross_entropy", lambda *a, **k: seen.append(a[3:5]) or real(*a, **k))
    x = torch.randn(N, C, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        loss = fastloss.sparse_softmax_cross_entropy(x, y)
    assert not loss.requires_grad and seen == [(False, False)]
    fastloss.sparse_softmax_cross_entropy(x, y).backward()
    assert seen[-1] == (True, False) and x.grad is not None


def test_no_warnings_per_call():
    x = torch.randn(N, C, requires_grad=True)
    t = torch.rand(N, C)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in CASES:
            other = torch.tensor([0, 1, 2, 3]) if name.startswith("sparse") else t
            _fn(name)(x, other).backward()
            _fn(name)(x.detach().numpy(), other.numpy())  # NumPy twins, read-only views inside


def test_float16_none_gradient_survives_a_cotangent_below_one():
    # The gradient for a cotangent of 1, 2 (p - t) = -75000, overflows float16; scaled by 0.5 it is
    # -37500, which float16 holds. It is kept in float32 until scaled.
    p = torch.tensor([-30000.0], dtype=torch.float16, requires_grad=True)
    t = torch.tensor([7500.0], dtype=torch.float16)
    (fastloss.mean_squared_error(p, t, reduction="none") * 0.5).sum().backward()
    assert p.grad.item() == -37504.0  # -37500 rounded to float16


_COMPILED_STEP = r"""
import sys, torch
import fastloss                                   # no fastloss kernel or backend module is loaded yet
torch._dynamo.config.trace_autograd_ops = True    # autograd.grad inside the compiled step
backend, names = sys.argv[1], sys.argv[2:]
assert "fastloss._numpy.launch" not in sys.modules and "fastloss._torch.ops" not in sys.modules


def make():
    torch.manual_seed(1)
    return torch.nn.Linear(8, 6)


def check(name):
    base = name.split("[")[0]
    kw = dict(weight=torch.tensor([0.5, 2.0, 0.0, 1.5, 0.7, 1.0]), softcap=1.5, label_smoothing=0.1) \
        if "[" in name else {}
    torch.manual_seed(0)
    h = torch.randn(16, 8)
    other = {"sparse_softmax_cross_entropy": torch.randint(0, 6, (16,)),
             "softmax_cross_entropy": torch.softmax(torch.randn(16, 6), -1),
             "sigmoid_cross_entropy": torch.rand(16, 6), "mean_squared_error": torch.randn(16, 6),
             "huber": torch.randn(16, 6), "sigmoid_focal_loss": torch.rand(16, 6)}[base]
    fn = getattr(fastloss, base)

    def step(head, h, other):
        loss = fn(head(h), other, backend=backend, **kw)
        # autograd.grad rather than backward() + p.grad = None: in a compiled step the latter kept
        # accumulating .grad across calls in torch 2.13 (with F.cross_entropy as well).
        params = list(head.parameters())
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():                     # SGD by hand: torch.optim breaks graphs on purpose
            for p, g in zip(params, grads):
                p -= 0.1 * g
        return loss.detach()

    torch._dynamo.utils.counters.clear()
    eager_head, compiled_head = make(), make()
    compiled = torch.compile(step, fullgraph=True)
    for _ in range(3):
        a = compiled(compiled_head, h, other)     # the first case: the process's first fastloss call
        b = step(eager_head, h, other)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(compiled_head.weight, eager_head.weight, rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"{name}: {m}")
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    assert breaks == 0, f"{name}: {breaks} graph breaks"


for name in names:
    check(name)
    print("ok", name)
"""


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_compiled_training_step_fullgraph_in_a_fresh_process(backend, tmp_path):
    # One process per backend for every loss: the first case is the process's first fastloss call
    # (the lazy imports run under the compiler); the others add ~1 s each, where a process per case
    # cost ~18 s (importing torch and warming Inductor up).
    script = tmp_path / "step.py"
    script.write_text(_COMPILED_STEP)
    env = dict(os.environ)
    if backend == "triton":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, str(script), backend, *CASES], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.split() == [w for name in CASES for w in ("ok", name)], proc.stdout


@pytest.mark.parametrize("k", [0.5, 1.0, 3.0])
def test_compiled_gradient_with_an_upstream_gradient_other_than_one(k):
    # The fused gradient is rescaled in place by an opaque op that skips the pass when the upstream
    # gradient is 1: under torch.compile that must still scale by k.
    torch._dynamo.config.trace_autograd_ops = True
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 6)
    h, y = torch.randn(16, 8), torch.randint(0, 6, (16,))
    t = torch.softmax(torch.randn(16, 6), -1)

    def grads(h, y, t):
        loss = k * fastloss.sparse_softmax_cross_entropy(head(h), y) + \
            k * fastloss.softmax_cross_entropy(head(h), t, temperature=2.0)
        return torch.autograd.grad(loss, [head.weight, head.bias])

    compiled = torch.compile(grads, fullgraph=True)
    for a, b in zip(compiled(h, y, t), grads(h, y, t)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fullgraph_step_whose_float_temperature_changes():
    # An annealed Python-float temperature: Dynamo traces the second value as a symbolic float, and
    # the option check failed on it ("Unsupported hasattr call"). Now each value compiles (the custom
    # op's float arguments specialise; options as graph values are issue 36's remaining work).
    torch._dynamo.reset()
    x, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    step = torch.compile(lambda a, b, t: fastloss.sparse_softmax_cross_entropy(a, b, temperature=t,
                                                                             label_smoothing=t / 10),
                         fullgraph=True)
    for t in (1.0, 2.0):  # the first value is a constant of the graph; the second failed
        want = torch.nn.functional.cross_entropy(x / t, y, label_smoothing=t / 10)
        torch.testing.assert_close(step(x, y, t), want, rtol=1e-6, atol=1e-7)
