"""Inside JAX programs: options as traced values, forward mode, vmap, threads and shard_map, on the
XLA formulation ("jax") and on the Numba kernels through the XLA FFI ("numba")."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import fastloss
from fastloss.kernels.numba_cpu import plan

from .support import reference as R

jax = pytest.importorskip("jax")
jnp = jax.numpy

BACKENDS = ["jax", "numba"]
LOSSES = ["sparse_softmax_cross_entropy", "softmax_cross_entropy", "sigmoid_cross_entropy", "mean_squared_error",
          "huber", "sigmoid_focal_loss"]
OPTIONS = {"sparse_softmax_cross_entropy": ("temperature", "label_smoothing", "z_loss"),
           "softmax_cross_entropy": ("temperature", "label_smoothing"),
           "sigmoid_cross_entropy": ("label_smoothing",), "mean_squared_error": (), "huber": ("delta",),
           "sigmoid_focal_loss": ("gamma", "alpha", "label_smoothing")}


def _inputs(loss, n=5, c=37, seed=0):
    rng = np.random.default_rng(seed)
    if loss.startswith(("sparse", "softmax")):
        x = (rng.standard_normal((n, c)) * 3).astype(np.float32)
        other = rng.integers(0, c, n) if loss.startswith("sparse") else rng.dirichlet(np.ones(c), n).astype(np.float32)
    else:
        x = (rng.standard_normal((n, c)) * 3).astype(np.float32)
        other = rng.random((n, c)).astype(np.float32)
    return x, other


def _reference_jnp(loss, x, other, temperature=1.0, label_smoothing=0.0, z_loss=0.0, delta=1.0, gamma=2.0,
                   alpha=0.25, apply_class_balancing=False):
    """The textbook formulas in plain jnp (autodiff of these is the second reference)."""
    if loss == "sigmoid_focal_loss":  # Keras' formula from logits
        t = other * (1 - label_smoothing) + 0.5 * label_smoothing
        p = jax.nn.sigmoid(x)
        bce = jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
        w = t * alpha + (1 - t) * (1 - alpha) if apply_class_balancing else 1.0
        return jnp.mean(w * (1 - (t * p + (1 - t) * (1 - p))) ** gamma * bce)
    if loss == "mean_squared_error":
        return jnp.mean((x - other) ** 2)
    if loss == "huber":
        e = jnp.abs(x - other)
        return jnp.mean(jnp.where(e <= delta, 0.5 * e ** 2, delta * (e - 0.5 * delta)))
    if loss == "sigmoid_cross_entropy":
        t = other * (1 - label_smoothing) + 0.5 * label_smoothing
        return jnp.mean(jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x))))
    z = x / temperature
    lse = jax.nn.logsumexp(z, axis=-1)
    c = x.shape[-1]
    if loss == "softmax_cross_entropy":
        q = (1 - label_smoothing) * other + label_smoothing / c
        return jnp.mean(jnp.sum(q * (lse[:, None] - z), axis=-1))
    z_y = jnp.take_along_axis(z, other[:, None], axis=-1)[:, 0]
    row = (1 - label_smoothing) * (lse - z_y) + label_smoothing * (lse - jnp.mean(z, axis=-1)) + z_loss * lse ** 2
    return jnp.mean(row)


# --------------------------------------------------------------------------- traced options
@pytest.mark.parametrize("backend", BACKENDS)
def test_new_temperature_does_not_recompile(backend):
    x, y = _inputs("sparse_softmax_cross_entropy")
    f = jax.jit(lambda a, b, t: fastloss.sparse_softmax_cross_entropy(a, b, temperature=t, backend=backend))
    for t in (0.5, 1.0, 2.0, 7.5):
        got = float(f(jnp.asarray(x), jnp.asarray(y), t))
        ref = R.sparse_softmax_cross_entropy(x, y, temperature=t)[0]
        np.testing.assert_allclose(got, ref, rtol=2e-6)
    assert f._cache_size() == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_jax_scalar_options_are_accepted_eagerly(backend):
    x, y = _inputs("sparse_softmax_cross_entropy")
    got = fastloss.sparse_softmax_cross_entropy(jnp.asarray(x), jnp.asarray(y), temperature=jnp.float32(2.0),
                                                label_smoothing=jnp.asarray(0.1), backend=backend)
    np.testing.assert_allclose(float(got), R.sparse_softmax_cross_entropy(x, y, temperature=2.0,
                                                                          label_smoothing=0.1)[0], rtol=2e-6)
    with pytest.raises(ValueError, match="temperature"):
        fastloss.sparse_softmax_cross_entropy(jnp.asarray(x), jnp.asarray(y), temperature=jnp.float32(-1.0))


# A "binary" option (apply_class_balancing) is a Python bool: a traced one is a ValueError.
_INVALID = {"positive": (0.0, -1.0, np.nan, np.inf), "non_negative": (-1.0, np.nan, np.inf),
            "unit": (-0.5, 1.5, np.nan)}
_TRACED_CASES = [(spec.name, option.name, _INVALID[option.rule]) for spec in fastloss._spec.SPECS
                 for option in spec.options if option.rule in _INVALID]


def _arrays(loss, n=5, c=7):
    """Every array argument of ``loss`` (the first is differentiated), as jax arrays."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, c)) * 3, jnp.float32)
    labels = jnp.asarray(rng.integers(0, c, n))
    kind = fastloss._spec.BY_NAME[loss].other
    if kind in ("labels", "either"):
        return x, labels
    if kind == "teacher":
        return x, jnp.asarray(rng.standard_normal((n, c)), jnp.float32), labels
    if kind == "linear":  # hidden (n, c), a head of 11 classes, labels
        return x, jnp.asarray(rng.standard_normal((11, c)), jnp.float32), labels
    return x, jnp.asarray(rng.random((n, c)), jnp.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss,option,invalid", _TRACED_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_traced_option_out_of_range_is_nan(backend, loss, option, invalid):
    # An eager value out of range raises; a traced one cannot, so the loss and the gradient are NaN
    # (as a traced out-of-range label makes its row NaN). Huber's δ used to give 0.5 x MSE: the
    # clip's selects passed d through a NaN δ.
    x, *rest = _arrays(loss)
    fn = getattr(fastloss, loss)
    f = jax.jit(jax.value_and_grad(lambda a, v: fn(a, *rest, backend=backend, **{option: v})))
    for bad in invalid:  # one program: the option is a value
        value, grad = f(x, jnp.float32(bad))
        assert np.isnan(float(value)), (bad, float(value))
        assert np.isnan(np.asarray(grad)).all(), bad
    default = next(o.default for o in fastloss._spec.BY_NAME[loss].options if o.name == option)
    value, grad = f(x, jnp.float32(default))
    assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()


def _option_fd(loss, x, other, opts, name, h=1e-5):
    """Central difference of the float64 reference with respect to one option."""
    fn = getattr(R, loss)
    lo, hi = dict(opts), dict(opts)
    lo[name] -= h
    hi[name] += h
    x64 = x.astype(np.float64)
    o64 = other if loss.startswith("sparse") else other.astype(np.float64)
    return (fn(x64, o64, **hi)[0] - fn(x64, o64, **lo)[0]) / (2 * h)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", [name for name in LOSSES if OPTIONS[name]])
def test_gradient_with_respect_to_options(backend, loss):
    x, other = _inputs(loss, seed=3)
    opts = {"temperature": 1.7, "label_smoothing": 0.2, "z_loss": 0.01, "delta": 1.3, "gamma": 1.7, "alpha": 0.3}
    opts = {k: opts[k] for k in OPTIONS[loss]}
    fixed = {"apply_class_balancing": True} if loss == "sigmoid_focal_loss" else {}  # so that alpha counts
    fn = getattr(fastloss, loss)

    def f(vals):
        return fn(jnp.asarray(x), jnp.asarray(other), **dict(zip(opts, vals)), **fixed, backend=backend)

    grads = jax.jit(jax.grad(f))(tuple(jnp.float32(v) for v in opts.values()))
    for name, g in zip(opts, grads):
        np.testing.assert_allclose(float(g), _option_fd(loss, x, other, dict(opts, **fixed), name), rtol=2e-4,
                                   atol=1e-5, err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_learnable_temperature_with_large_offset(backend):
    # d/dT from shifted statistics: a common offset of 1e4 cancels exactly, as in the loss itself.
    x, y = _inputs("sparse_softmax_cross_entropy", seed=4)
    g = jax.grad(lambda t: fastloss.sparse_softmax_cross_entropy(jnp.asarray(x + 1e4), jnp.asarray(y),
                                                                 temperature=t, backend=backend))(2.0)
    np.testing.assert_allclose(float(g), _option_fd("sparse_softmax_cross_entropy", x, y, {"temperature": 2.0},
                                                    "temperature"), rtol=1e-4)


def _weighted_capped_jnp(x, y, weight, softcap, temperature=1.0, label_smoothing=0.0, z_loss=0.0):
    """Weighted, softcapped sparse CE as plain jnp (torch's weighted smoothing; "mean" over Σ w_y)."""
    z = jnp.where(x == -jnp.inf, x, softcap * jnp.tanh(x / softcap)) / temperature
    lse = jax.nn.logsumexp(z, axis=-1)
    w_y = weight[y]
    z_y = jnp.take_along_axis(z, y[:, None], axis=-1)[:, 0]
    rows = w_y * ((1 - label_smoothing) * (lse - z_y) + z_loss * lse ** 2) + \
        label_smoothing / x.shape[-1] * jnp.sum(weight * (lse[:, None] - z), axis=-1)
    return jnp.sum(rows) / jnp.sum(w_y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_weights_and_softcap_under_transforms(backend):
    """Option gradients, jvp, hessian and vmap with class weights and a softcap, against autodiff
    of the jnp formula; the weights may be a jit argument (a tracer)."""
    x, y = _inputs("sparse_softmax_cross_entropy", n=4, c=7, seed=12)
    w = np.random.default_rng(12).uniform(0.2, 2.0, 7).astype(np.float32)
    xj, yj, wj = jnp.asarray(x), jnp.asarray(y), jnp.asarray(w)
    opts = dict(temperature=1.3, label_smoothing=0.1, z_loss=1e-2)

    def ours(a, t, e, zl, weight):
        return fastloss.sparse_softmax_cross_entropy(a, yj, temperature=t, label_smoothing=e, z_loss=zl,
                                                    weight=weight, softcap=2.5, backend=backend)

    def ref(a, t, e, zl, weight):
        return _weighted_capped_jnp(a, yj, weight, 2.5, t, e, zl)

    args = (xj, *(jnp.float32(v) for v in opts.values()), wj)
    got = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2, 3)))(*args)
    want = jax.value_and_grad(ref, argnums=(0, 1, 2, 3))(*args)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    for g, r in zip(got[1], want[1]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6)
    dx = jnp.asarray(np.random.default_rng(13).standard_normal(x.shape).astype(np.float32))
    t1 = jax.jvp(lambda a: ours(a, *args[1:]), (xj,), (dx,))[1]
    t2 = jax.jvp(lambda a: ref(a, *args[1:]), (xj,), (dx,))[1]
    np.testing.assert_allclose(float(t1), float(t2), rtol=1e-4, atol=1e-6)
    h1 = jax.hessian(lambda a: ours(a, *args[1:]))(xj)
    h2 = jax.hessian(lambda a: ref(a, *args[1:]))(xj)
    np.testing.assert_allclose(np.asarray(h1), np.asarray(h2), rtol=1e-4, atol=1e-6)
    xb = jnp.stack([xj, -xj, 0.5 * xj])
    v1 = jax.jit(jax.vmap(lambda a: ours(a, *args[1:])))(xb)
    v2 = jax.vmap(lambda a: ref(a, *args[1:]))(xb)
    np.testing.assert_allclose(np.asarray(v1), np.asarray(v2), rtol=1e-5)


# ------------------------------------------------------------------------------ forward mode
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_jvp_and_jacfwd_match_autodiff_of_the_formula(backend, loss):
    x, other = _inputs(loss, seed=5)
    opts = {k: v for k, v in {"temperature": 1.3, "label_smoothing": 0.1, "z_loss": 1e-3, "delta": 0.9, "gamma": 1.5,
                              "alpha": 0.3}.items()
            if k in OPTIONS[loss]}
    fn = getattr(fastloss, loss)
    xj, oj = jnp.asarray(x), jnp.asarray(other)
    ours = lambda a: fn(a, oj, **opts, backend=backend)  # noqa: E731
    ref = lambda a: _reference_jnp(loss, a, oj, **opts)  # noqa: E731
    dx = jnp.asarray(np.random.default_rng(6).standard_normal(x.shape).astype(np.float32))
    (v, t), (rv, rt) = jax.jvp(ours, (xj,), (dx,)), jax.jvp(ref, (xj,), (dx,))
    np.testing.assert_allclose(float(v), float(rv), rtol=1e-5)
    np.testing.assert_allclose(float(t), float(rt), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.jacfwd(ours))(xj)), np.asarray(jax.jacfwd(ref)(xj)),
                               rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_hessian_matches_autodiff_of_the_formula(backend, loss):
    x, other = _inputs(loss, n=3, c=6, seed=7)
    opts = {"temperature": 0.8} if "temperature" in OPTIONS[loss] else {}
    fn = getattr(fastloss, loss)
    oj = jnp.asarray(other)
    h = jax.hessian(lambda a: fn(a, oj, **opts, backend=backend))(jnp.asarray(x))
    hr = jax.hessian(lambda a: _reference_jnp(loss, a, oj, **opts))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(h), np.asarray(hr), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jvp_with_respect_to_dense_targets_and_temperature(backend):
    x, t = _inputs("softmax_cross_entropy", seed=8)
    xj, tj = jnp.asarray(x), jnp.asarray(t)
    ours = lambda a, b, temp: fastloss.softmax_cross_entropy(a, b, temperature=temp, backend=backend)  # noqa: E731
    ref = lambda a, b, temp: _reference_jnp("softmax_cross_entropy", a, b, temperature=temp)  # noqa: E731
    tangents = (jnp.ones_like(xj) * 0.1, jnp.ones_like(tj) * 0.01, jnp.float32(0.3))
    _, got = jax.jvp(ours, (xj, tj, jnp.float32(1.5)), tangents)
    _, want = jax.jvp(ref, (xj, tj, jnp.float32(1.5)), tangents)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_and_scan_over_minibatches(backend):
    x, y = _inputs("sparse_softmax_cross_entropy", n=12, c=50, seed=11)
    xs, ys = jnp.asarray(x.reshape(3, 4, 50)), jnp.asarray(y.reshape(3, 4))
    loss = jax.checkpoint(lambda a, b: fastloss.sparse_softmax_cross_entropy(a, b, reduction="sum", backend=backend))

    def total(a):
        return jax.lax.scan(lambda acc, ab: (acc + loss(*ab), None), jnp.float32(0), (a, ys))[0]

    v, g = jax.jit(jax.value_and_grad(total))(xs)
    np.testing.assert_allclose(float(v), R.sparse_softmax_cross_entropy(x, y, reduction="sum")[0], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g).reshape(12, 50),
                               R.sparse_softmax_cross_entropy(x, y, reduction="sum")[1], rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------ vmap and threads
@pytest.mark.parametrize("loss", LOSSES)
def test_vmap_on_the_numba_kernels_matches_a_loop(loss):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 4, 40)).astype(np.float32)
    other = rng.integers(0, 40, (3, 4)) if loss.startswith("sparse") else rng.random((3, 4, 40)).astype(np.float32)
    fn = getattr(fastloss, loss)
    per = lambda a, b: fn(a, b, backend="numba")  # noqa: E731
    v, g = jax.jit(jax.vmap(jax.value_and_grad(per)))(jnp.asarray(x), jnp.asarray(other))
    for i in range(3):
        vi, gi = jax.value_and_grad(lambda a: fn(a, jnp.asarray(other[i]), backend="jax"))(jnp.asarray(x[i]))
        np.testing.assert_allclose(float(v[i]), float(vi), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(g[i]), np.asarray(gi), rtol=1e-5, atol=1e-7)


def test_several_python_threads_call_jitted_losses_at_once():
    # XLA runs each call on the caller's thread: the Numba kernels are entered from several threads
    # at once (Numba's workqueue layer would abort the process here; omp and tbb take it).
    x, y = _inputs("sparse_softmax_cross_entropy", n=64, c=3000, seed=10)
    f = jax.jit(jax.value_and_grad(lambda a, b: fastloss.sparse_softmax_cross_entropy(a, b, backend="numba")))
    want_v, want_g = f(jnp.asarray(x), jnp.asarray(y))
    errors = []

    def work():
        try:
            for _ in range(20):
                v, g = f(jnp.asarray(x), jnp.asarray(y))
                assert float(v) == float(want_v) and np.array_equal(np.asarray(g), np.asarray(want_g))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_explicit_numba_backend_in_jit_outside_cpu_lowering_is_clear():
    # The automatic choice lowers for any platform (XLA decides at compile time); the CUDA lowering
    # of an automatic program holds no CPU custom call (the FFI targets are named fastloss_<loss>),
    # only the Pallas kernel. On CPU it takes the Numba kernel from plan.FFI_MIN_ELEMENTS elements up,
    # and XLA's own loops below.
    x, y = _inputs("sparse_softmax_cross_entropy", n=64, c=plan.FFI_MIN_ELEMENTS // 64)
    f = jax.jit(jax.grad(lambda a: fastloss.sparse_softmax_cross_entropy(a, jnp.asarray(y))))
    text = f.trace(jnp.asarray(x)).lower(lowering_platforms=("cuda",)).as_text()
    assert "custom_call @fastloss_" not in text and "__gpu$xla.gpu.triton" in text
    cpu = f.trace(jnp.asarray(x)).lower(lowering_platforms=("cpu",)).as_text()
    assert "fastloss_sparse" in cpu
    small = f.trace(jnp.asarray(x[:, :-1])).lower(lowering_platforms=("cpu",)).as_text()
    assert "custom_call @fastloss_" not in small


# ------------------------------------------------------------------------------- shard_map
_SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import numpy as np, jax, jax.numpy as jnp
    from jax.sharding import Mesh, PartitionSpec as P, NamedSharding
    import fastloss
    assert len(jax.devices()) == 8
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 300)).astype(np.float32) * 3)
    y = jnp.asarray(rng.integers(0, 300, 64))
    mesh = Mesh(np.array(jax.devices()), ("batch",))

    def local(a, b):  # per shard: the sum over its rows; psum makes the global mean
        s = fastloss.sparse_softmax_cross_entropy(a, b, reduction="sum", backend="numba")
        return jax.lax.psum(s, "batch") / 64

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P("batch"), P("batch")), out_specs=P())
    step = jax.jit(jax.value_and_grad(sharded))
    xs = jax.device_put(x, NamedSharding(mesh, P("batch")))
    ys = jax.device_put(y, NamedSharding(mesh, P("batch")))
    v, g = step(xs, ys)
    v1, g1 = jax.value_and_grad(lambda a: fastloss.sparse_softmax_cross_entropy(a, y, backend="jax"))(x)
    np.testing.assert_allclose(float(v), float(v1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g1), rtol=1e-5, atol=1e-9)
    hlo = step.lower(xs, ys).compile().as_text()
    assert "all-gather" not in hlo, "the logits were gathered"
    # Automatic dispatch on a batch-sharded jit (no shard_map): XLA partitions around the call.
    auto = jax.jit(jax.value_and_grad(lambda a, b: fastloss.sparse_softmax_cross_entropy(a, b)))
    v2, g2 = auto(xs, ys)
    np.testing.assert_allclose(float(v2), float(v1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g2), np.asarray(g1), rtol=1e-5, atol=1e-9)
    print("ok")
""")


def test_shard_map_on_eight_simulated_devices():
    proc = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-3000:] + proc.stderr[-3000:]


_EXIT_IN_FLIGHT = textwrap.dedent("""
    import jax, jax.numpy as jnp, fastloss
    x = jnp.ones((256, 3000)); y = jnp.zeros(256, jnp.int32)
    f = jax.jit(jax.value_and_grad(lambda a: fastloss.sparse_softmax_cross_entropy(a, y, backend="numba")))
    kept = f(x)
    f(x + 1)  # results dropped, still in flight when the interpreter starts to exit
""")


def test_process_exits_with_a_kernel_still_in_flight():
    # Regression: the process hung at exit in XLA's CPU client destructor (fastloss/_jax/ffi._at_exit).
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _EXIT_IN_FLIGHT], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
