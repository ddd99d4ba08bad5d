"""distillation_loss on every backend against the float64 reference (tests/support/reference.py), and the
reference itself against float64 finite differences."""
from __future__ import annotations

import os

import numpy as np
import pytest

import fastloss

from .support import reference as R
from .support.harness import ACC_EPS, GRAD_RTOL, LOSS_RTOL, assert_close, np_dtype, require_backend, rounded

BACKENDS = ("numba", "numba-torch", "triton", "jax", "numba-jax")
DIVS = ("forward_kl", "reverse_kl", "jsd")


def run(backend, s, t, y, dtype, opts, cot=None, want_t=True):
    """(loss, grad_s, grad_t | None) as float64 NumPy, and the dtypes, through the public API."""
    require_backend(backend)
    red = opts.get("reduction", "mean")
    if backend == "numba":
        sn, tn = s.astype(np_dtype(dtype)), t.astype(np_dtype(dtype))
        before = sn.copy()
        loss = fastloss.distillation_loss(sn, tn, y, backend="numba", **opts)
        gs = None
        if red != "none":
            val, gs = fastloss.value_and_grad(fastloss.distillation_loss)(sn, tn, y, backend="numba", **opts)
            np.testing.assert_allclose(np.float64(val), np.float64(loss), rtol=1e-6)
            assert gs.dtype == sn.dtype
            gs = gs.astype(np.float64)
        np.testing.assert_array_equal(sn.view(np.uint8), before.view(np.uint8))
        return np.asarray(loss, np.float64), gs, None, str(np.asarray(loss).dtype)
    if backend in ("numba-torch", "triton"):
        import torch
        tdt = getattr(torch, dtype)
        st = torch.tensor(s).to(tdt).requires_grad_(True)
        tt = torch.tensor(t).to(tdt).requires_grad_(want_t)
        yt = None if y is None else torch.tensor(y)
        out = fastloss.distillation_loss(st, tt, yt, backend=backend.split("-")[0], **opts)
        obj = (out * torch.tensor(cot, dtype=out.dtype)).sum() if red == "none" else out
        obj.backward()
        assert st.grad.dtype == tdt
        gt = tt.grad.double().numpy() if want_t else None
        assert want_t or tt.grad is None
        return out.detach().double().numpy(), st.grad.double().numpy(), gt, str(out.dtype).replace("torch.", "")
    import contextlib

    import jax
    import jax.numpy as jnp
    ctx = jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()
    be = "jax" if backend == "jax" else "numba"
    with ctx:
        sj, tj = jnp.asarray(s.astype(np_dtype(dtype))), jnp.asarray(t.astype(np_dtype(dtype)))
        yj = None if y is None else jnp.asarray(y)

        def f(a, b):
            return fastloss.distillation_loss(a, b, yj, backend=be, **opts)

        def obj(a, b):
            v = f(a, b)
            return jnp.sum(v * jnp.asarray(cot, v.dtype)) if red == "none" else v
        wrap = jax.jit if be == "numba" else (lambda g: g)
        out = wrap(f)(sj, tj)
        gs, gt = wrap(jax.grad(obj, argnums=(0, 1)))(sj, tj)
        assert gs.dtype == sj.dtype
        return (np.asarray(out, np.float64), np.asarray(gs, np.float64), np.asarray(gt, np.float64),
                out.dtype.name)


def inputs(shape, seed=0, scale=3.0, labels=True, ignore_frac=0.2):
    rng = np.random.default_rng(seed)
    s = rng.standard_normal(shape) * scale
    t = rng.standard_normal(shape) * scale
    y = None
    if labels:
        y = rng.integers(0, shape[-1], size=shape[:-1]).astype(np.int64)
        y[rng.random(shape[:-1]) < ignore_frac] = -100
    return s, t, y


def check(backend, s, t, y, dtype, opts, want_t=True, seed=1):
    red = opts.get("reduction", "mean")
    cot = np.random.default_rng(seed).standard_normal(s.shape[:-1]) if red == "none" else None
    loss, gs, gt, loss_dtype = run(backend, s, t, y, dtype, opts, cot, want_t)
    rs, rt = rounded(s, dtype), rounded(t, dtype)
    ref = R.distillation_loss(rs, rt, y, **opts, cot=cot)
    assert loss_dtype == ("float64" if dtype == "float64" else "float32")
    temp = opts.get("temperature", 1.0)
    finite = np.abs(np.concatenate([rs[np.isfinite(rs)], rt[np.isfinite(rt)]]))
    zmag = (finite.max() if finite.size else 0.0) / min(temp, 1.0)
    ref_loss = np.asarray(ref[0], np.float64)
    fin = np.isfinite(ref_loss)
    lscale = np.abs(ref_loss[fin]).mean() if fin.any() else 1.0
    # fp32 rounding of z = x / T costs ~|z| eps32 per term; T² multiplies the divergence term
    atol = (LOSS_RTOL[dtype] + 8 * ACC_EPS[dtype] * zmag * max(temp, 1.0) ** 2) * (1 + lscale)
    assert_close(loss, ref_loss, LOSS_RTOL[dtype], atol, f"{backend} distillation loss")
    unit = {"mean": 1.0 / max(1, int(np.sum(np.asarray(y) != -100)) if y is not None else int(np.prod(s.shape[:-1]))),
            "sum": 1.0}.get(red, np.abs(cot).max(initial=0.0) if cot is not None else 1.0)
    # A NaN row's gradient is NaN wherever its probabilities are non-zero, which depends on where the
    # exps underflow (fp32 vs float64): compare gradients on the rows with a number for a loss.
    nan_rows = np.isnan(ref_loss).reshape(-1) if red == "none" else np.zeros(int(np.prod(s.shape[:-1])), bool)
    for got, want, what in ((gs, ref[1], "student"), (gt, ref[2], "teacher")):
        if got is None:
            continue
        got, want = got.reshape(-1, s.shape[-1])[~nan_rows], want.reshape(-1, s.shape[-1])[~nan_rows]
        gmax = max(np.abs(want[np.isfinite(want)]).max(initial=0.0), unit * max(temp, 1.0))
        rtol = GRAD_RTOL[dtype]
        assert_close(got, want, rtol, rtol * gmax + 8 * ACC_EPS[dtype] * zmag * gmax,
                     f"{backend} distillation grad {what}")


# ------------------------------------------------------------------------------ the matrix
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
def test_matches_reference_fp32(backend, divergence, labels, temperature):
    s, t, y = inputs((6, 37), seed=3, labels=labels)
    check(backend, s, t, y, "float32", dict(temperature=temperature, alpha=0.3, beta=0.4, divergence=divergence))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_matches_reference_every_dtype(backend, divergence, dtype):
    s, t, y = inputs((2, 3, 45), seed=4)
    check(backend, s, t, y, dtype, dict(temperature=2.0, alpha=0.7, beta=0.25, divergence=divergence))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reductions(backend, reduction):
    s, t, y = inputs((9, 20), seed=5)
    check(backend, s, t, y, "float32", dict(temperature=3.0, reduction=reduction, divergence="jsd"))
    check(backend, s, t, None, "float32", dict(temperature=3.0, reduction=reduction))


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_inputs(backend):
    s, t, y = inputs((8, 300), seed=6, ignore_frac=0.0)
    s[0] += 1e5                      # common offset: lse rounds by ~4e-3, shifted logits do not
    t[0] += 1e5
    s[1, ::3] = t[1, ::3] = -np.inf  # masked classes in both: contribute 0
    y[1] = 1
    s[2] *= 1e4                      # spreads near the fp32 range of exp
    t[2] = np.where(np.arange(300) == 7, 30.0, -30.0)  # a confident teacher
    t[3] = 0.0                       # a uniform teacher
    s[4] = np.nan                    # an ignored row holding garbage: 0, gradient exactly 0
    t[4] = np.inf
    y[4] = -100
    s[5, 5] = np.nan                 # a NaN row: NaN loss for that row
    for div in DIVS:
        for temp in (1e-3, 1.0, 7.0):
            check(backend, s, t, y, "float32", dict(temperature=temp, divergence=div, reduction="none"))
    check(backend, s[np.r_[0:4, 6:8]], t[np.r_[0:4, 6:8]], None, "float32", dict(temperature=2.0))


@pytest.mark.parametrize("backend", ["numba", "numba-jax"])
def test_large_vocabulary(backend):
    s, t, y = inputs((3, 131072), seed=7, scale=4.0)
    for div in DIVS:
        check(backend, s, t, y, "float32", dict(temperature=4.0, divergence=div))


@pytest.mark.parametrize("backend", ["numba-torch", "triton"])
def test_teacher_gradient_only_when_asked(backend):
    s, t, y = inputs((4, 33), seed=8)
    check(backend, s, t, y, "float32", dict(temperature=2.0), want_t=False)


def test_all_ignored_mean_is_zero():
    s, t, _ = inputs((3, 10), labels=False)
    y = np.full(3, -100)
    val, g = fastloss.value_and_grad(fastloss.distillation_loss)(s.astype(np.float32), t.astype(np.float32), y)
    assert float(val) == 0.0 and not np.any(g)


def test_stock_recipe_without_clipping_matches_where_no_probability_is_clipped():
    # With T = 1 and alpha = 1 the loss is KL(P_t || P_s), which torch computes from log-probabilities.
    torch = pytest.importorskip("torch")
    s, t, _ = inputs((5, 12), labels=False)
    ref = torch.nn.functional.kl_div(torch.log_softmax(torch.tensor(s), -1), torch.log_softmax(torch.tensor(t), -1),
                                     reduction="batchmean", log_target=True)
    np.testing.assert_allclose(float(fastloss.distillation_loss(s, t, temperature=1.0)), float(ref), rtol=1e-5)


# -------------------------------------------------------------------- the reference itself
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("labels", [False, True])
def test_reference_gradients_are_finite_differences(divergence, labels):
    s, t, y = inputs((3, 7), seed=9, labels=labels, ignore_frac=0.3)
    opts = dict(temperature=1.7, alpha=0.4, beta=0.3, divergence=divergence)
    _, gs, gt = R.distillation_loss(s, t, y, **opts)
    h = 1e-6
    for arr, g in ((s, gs), (t, gt)):
        fd = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            a, b = arr.copy(), arr.copy()
            a[idx] += h
            b[idx] -= h
            args = (a, t) if arr is s else (s, a)
            args2 = (b, t) if arr is s else (s, b)
            fd[idx] = (R.distillation_loss(*args, y, **opts)[0] - R.distillation_loss(*args2, y, **opts)[0]) / (2 * h)
        np.testing.assert_allclose(g, fd, atol=1e-8)


def test_reference_divergences_by_definition():
    s, t, _ = inputs((4, 9), labels=False)
    ps = np.exp(s / 2) / np.exp(s / 2).sum(-1, keepdims=True)
    pt = np.exp(t / 2) / np.exp(t / 2).sum(-1, keepdims=True)
    m = 0.3 * pt + 0.7 * ps
    kl = lambda p, q: np.sum(p * np.log(p / q), -1)  # noqa: E731
    for div, want in (("forward_kl", kl(pt, ps)), ("reverse_kl", kl(ps, pt)),
                      ("jsd", 0.3 * kl(pt, m) + 0.7 * kl(ps, m))):
        got = R.distillation_loss(s, t, temperature=2.0, divergence=div, beta=0.3, reduction="none")[0]
        np.testing.assert_allclose(got, 4.0 * want, rtol=1e-12)


# ------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kw, match", [
    (dict(divergence="kl"), "divergence"), (dict(alpha=1.5), "alpha"), (dict(beta=-0.1), "beta"),
    (dict(temperature=0.0), "temperature"), (dict(reduction="avg"), "reduction")])
def test_bad_options(kw, match):
    s, t, _ = inputs((2, 5), labels=False)
    with pytest.raises(ValueError, match=match):
        fastloss.distillation_loss(s, t, **kw)


def test_bad_shapes_and_labels():
    s, t, _ = inputs((2, 5), labels=False)
    with pytest.raises(ValueError, match="teacher_logits"):
        fastloss.distillation_loss(s, t[:, :4])
    with pytest.raises(ValueError, match="labels"):
        fastloss.distillation_loss(s, t, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="label"):
        fastloss.distillation_loss(s, t, np.array([1, 9]))
    with pytest.raises(TypeError, match="labels"):
        fastloss.distillation_loss(s, t, np.array([1.0, 2.0]))


# ------------------------------------------------------------------- compiled programs
def test_jax_traced_temperature_and_its_gradient():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    s, t, y = inputs((5, 40), seed=10)
    sj, tj, yj = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(y)

    @jax.jit
    def f(temp):
        return fastloss.distillation_loss(sj, tj, yj, temperature=temp, divergence="jsd")
    for temp in (1.5, 2.5):
        np.testing.assert_allclose(float(f(jnp.float32(temp))),
                                   R.distillation_loss(s, t, y, temperature=temp, divergence="jsd")[0], rtol=2e-5)
    assert f._cache_size() == 1
    with jax.enable_x64(True):
        g = jax.grad(lambda temp: fastloss.distillation_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y),
                                                             temperature=temp, divergence="jsd"))(2.0)
    h = 1e-6
    fd = (R.distillation_loss(s, t, y, temperature=2.0 + h, divergence="jsd")[0]
          - R.distillation_loss(s, t, y, temperature=2.0 - h, divergence="jsd")[0]) / (2 * h)
    np.testing.assert_allclose(float(g), fd, rtol=1e-6)


def test_jax_vmap_and_forward_mode():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    s, t, _ = inputs((3, 4, 11), seed=11, labels=False)
    sj, tj = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    got = jax.jit(jax.vmap(lambda a, b: fastloss.distillation_loss(a, b, temperature=2.0)))(sj, tj)
    want = [R.distillation_loss(s[i], t[i], temperature=2.0)[0] for i in range(3)]
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5)
    ds = np.random.default_rng(0).standard_normal(s.shape)
    _, tangent = jax.jvp(lambda a: fastloss.distillation_loss(a, tj, temperature=2.0), (sj,),
                         (jnp.asarray(ds, jnp.float32),))
    g = R.distillation_loss(s, t, temperature=2.0)[1]
    np.testing.assert_allclose(float(tangent), np.sum(g * ds), rtol=1e-4, atol=1e-5 * np.abs(g * ds).sum())


def test_torch_compile_fullgraph_and_double_backward():
    torch = pytest.importorskip("torch")
    s, t, y = inputs((4, 30), seed=12)
    st = torch.tensor(s, dtype=torch.float32, requires_grad=True)
    tt, yt = torch.tensor(t, dtype=torch.float32), torch.tensor(y)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(a, b, c):
        return fastloss.distillation_loss(a, b, c, temperature=3.0, divergence="reverse_kl")
    out = step(st, tt, yt)
    out.backward()
    ref = R.distillation_loss(s.astype(np.float32), t.astype(np.float32), y, temperature=3.0, divergence="reverse_kl")
    np.testing.assert_allclose(float(out), ref[0], rtol=2e-5)
    np.testing.assert_allclose(st.grad.numpy(), ref[1], atol=1e-6)
    s64 = torch.tensor(s[:2, :6], requires_grad=True)
    t64 = torch.tensor(t[:2, :6], requires_grad=True)
    y64 = torch.tensor([1, 4])
    for div in DIVS:
        fn = lambda a, b: fastloss.distillation_loss(a, b, y64, temperature=2.0, divergence=div)  # noqa: E731
        assert torch.autograd.gradgradcheck(fn, (s64, t64))
    got = torch.func.vmap(lambda a, b: fastloss.distillation_loss(a, b, temperature=2.0))(
        torch.tensor(s[None].repeat(2, 0)), torch.tensor(t[None].repeat(2, 0)))
    np.testing.assert_allclose(got.numpy(), [R.distillation_loss(s, t, temperature=2.0)[0]] * 2, rtol=1e-10)


@pytest.mark.skipif(__import__("platform").machine().lower() not in ("x86_64", "amd64"), reason="an x86 target")
@pytest.mark.skipif(bool(os.environ.get("NUMBA_CPU_NAME")), reason="already running for a named target")
def test_numba_distillation_on_a_second_cpu_target(tmp_path):
    # As tests/test_numba.py's second-target run: the NumPy cases of this module once more, compiled for
    # Haswell (AVX2) in a fresh process with its own cache; on an AVX-512 host that is the other code
    # path (the distillation kernel asks LLVM for 512-bit vectors where the target has them).
    import subprocess
    import sys
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES="", NUMBA_CACHE_DIR=str(tmp_path))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", __file__, "-k",
           "numba and not jax and not torch and not second_cpu_target and (fp32 or extreme or reductions)"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


@pytest.mark.parametrize("kind", ["numpy", "torch", "jax"])
def test_float64_teacher_with_a_float32_student_promotes(kind):
    # Was a Numba TypingError from deep inside the kernel (NumPy, torch CPU, and jax with x64).
    # The pair computes in float64, as the framework promotes it; the student's gradient comes back
    # in its own dtype.
    rng = np.random.default_rng(5)
    s = (rng.standard_normal((6, 9)) * 3).astype(np.float32)
    t = rng.standard_normal((6, 9)) * 3
    y = np.array([0, 3, 8, -100, 2, 5])
    ref, ref_gs, _ = R.distillation_loss(s.astype(np.float64), t, y, temperature=2.0)
    vg = fastloss.value_and_grad(fastloss.distillation_loss)
    if kind == "jax":
        jax = pytest.importorskip("jax")
        with jax.enable_x64(True):
            value, gs = vg(jax.numpy.asarray(s), jax.numpy.asarray(t), y, temperature=2.0)
            assert value.dtype == np.float64 and gs.dtype == np.float32
            value, gs = float(value), np.asarray(gs)
    elif kind == "torch":
        torch = pytest.importorskip("torch")
        st = torch.tensor(s, requires_grad=True)
        loss = fastloss.distillation_loss(st, torch.tensor(t), torch.tensor(y), temperature=2.0)
        loss.backward()
        assert loss.dtype == torch.float64 and st.grad.dtype == torch.float32
        value, gs = float(loss), st.grad.numpy()
    else:
        value, gs = vg(s, t, y, temperature=2.0)
        assert gs.dtype == np.float32
    np.testing.assert_allclose(value, ref, rtol=1e-12)
    np.testing.assert_allclose(gs, ref_gs.astype(np.float32), rtol=1e-6, atol=1e-9)
