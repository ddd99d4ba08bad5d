"""JAX-specific clauses: jit, vmap, grad to either float argument, NaN for bad labels under jit."""
from __future__ import annotations

import numpy as np
import pytest

import fastloss

from .support import reference as R

jax = pytest.importorskip("jax")
jnp = jax.numpy


def _data(n=6, c=11, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, c)).astype(np.float32), rng.integers(0, c, n)


def test_jit_matches_eager():
    x, y = _data()
    f = lambda a, b: fastloss.sparse_softmax_cross_entropy(a, b, label_smoothing=0.1, z_loss=1e-3)  # noqa: E731
    eager = f(jnp.asarray(x), jnp.asarray(y))
    jitted = jax.jit(f)(jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6)
    g = jax.jit(jax.grad(f))(jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(np.asarray(g), R.sparse_softmax_cross_entropy(x, y, label_smoothing=0.1, z_loss=1e-3)[1],
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss", ["sparse_softmax_cross_entropy", "softmax_cross_entropy",
                                  "sigmoid_cross_entropy", "mean_squared_error", "huber", "sigmoid_focal_loss"])
def test_vmap_matches_loop(loss):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 5, 9)).astype(np.float32)
    other = rng.integers(0, 9, (4, 5)) if loss.startswith("sparse") else rng.random((4, 5, 9)).astype(np.float32)
    fn = getattr(fastloss, loss)
    vg = jax.vmap(jax.value_and_grad(lambda a, b: fn(a, b, reduction="sum")))(jnp.asarray(x), jnp.asarray(other))
    for i in range(4):
        v, g = jax.value_and_grad(lambda a, b: fn(a, b, reduction="sum"))(jnp.asarray(x[i]), jnp.asarray(other[i]))
        np.testing.assert_allclose(np.asarray(vg[0][i]), np.asarray(v), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(vg[1][i]), np.asarray(g), rtol=1e-6, atol=1e-8)


def test_out_of_range_label_is_nan_under_jit_never_clamped():
    x, y = _data()
    y[1], y[3] = 11, -5
    rows = jax.jit(lambda a, b: fastloss.sparse_softmax_cross_entropy(a, b, reduction="none"))(x, y)
    rows = np.asarray(rows)
    assert np.isnan(rows[1]) and np.isnan(rows[3])
    assert np.isfinite(np.delete(rows, [1, 3])).all()
    g = jax.jit(jax.grad(lambda a, b: fastloss.sparse_softmax_cross_entropy(a, b)))(x, y)
    assert np.isnan(np.asarray(g)).any()


def test_eager_out_of_range_label_raises():
    x, y = _data()
    y[0] = 11
    with pytest.raises(ValueError, match=r"\[0, 11\).*received label 11"):
        fastloss.sparse_softmax_cross_entropy(jnp.asarray(x), jnp.asarray(y))


def test_grad_to_targets_under_jit():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 7)).astype(np.float32)
    t = rng.random((3, 7)).astype(np.float32)
    g = jax.jit(jax.grad(lambda a, b: fastloss.softmax_cross_entropy(a, b, label_smoothing=0.2), argnums=1))(x, t)
    np.testing.assert_allclose(np.asarray(g), R.softmax_cross_entropy(x, t, label_smoothing=0.2)[2], rtol=1e-5)


def test_numpy_input_on_jax_backend_returns_numpy_and_keeps_float64():
    x, y = _data()
    out = fastloss.sparse_softmax_cross_entropy(x.astype(np.float64), y, backend="jax")
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_allclose(out, R.sparse_softmax_cross_entropy(x, y)[0], rtol=1e-12)
    loss, g = fastloss.value_and_grad(fastloss.sparse_softmax_cross_entropy)(x, y, backend="jax")
    assert isinstance(g, np.ndarray) and g.dtype == np.float32


def test_auto_backend_for_jax_input_is_jax():
    x, y = _data()
    out = fastloss.sparse_softmax_cross_entropy(jnp.asarray(x), jnp.asarray(y))
    assert isinstance(out, jax.Array)


@pytest.mark.parametrize("backend", ["jax", "numba"])
def test_backward_saves_only_the_gradient(backend):
    """The VJP keeps one (rows, C) array, the gradient the forward computed in its pass over the
    logits (its backward is that array times the cotangent), and O(rows) besides: no softmax, no
    log-softmax, not even the logits."""
    x, y = _data(8, 1000)
    f = lambda a: fastloss.sparse_softmax_cross_entropy(a, jnp.asarray(y), backend=backend)
    _, vjp = jax.vjp(f, jnp.asarray(x))
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(vjp) if hasattr(leaf, "shape")]
    big = [leaf for leaf in leaves if leaf.size >= x.size]
    assert len(big) == 1
    np.testing.assert_allclose(np.asarray(big[0]), np.asarray(jax.grad(f)(jnp.asarray(x))), rtol=1e-6, atol=1e-9)
    assert sum(leaf.size for leaf in leaves) <= x.size + 8 * x.shape[0]


def test_torch_tensor_on_jax_backend_is_a_type_error():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="torch"):
        fastloss.mean_squared_error(torch.ones(3), torch.ones(3), backend="jax")


def test_ffi_handler_serves_forward_and_backward_and_is_cached_on_disk():
    # One handler per type signature: the jitted loss and its gradient share it, and a new process
    # loads it from Numba's disk cache instead of building it (docs/jax.md, "The FFI handlers").
    import os
    import subprocess
    import sys
    from fastloss import _dispatch
    if _dispatch.unavailable_reason("numba") is not None:
        pytest.skip("numba is not available")
    code = ("import jax, jax.numpy as jnp, numpy as np, fastloss\n"
            "from fastloss._jax import ffi\n"
            "x = jnp.asarray(np.random.rand(6, 300), jnp.float32); y = jnp.arange(6) % 300\n"
            "f = lambda a, b: fastloss.sparse_softmax_cross_entropy(a, b, backend='numba')\n"
            "jax.jit(f)(x, y).block_until_ready(); jax.jit(jax.grad(f))(x, y).block_until_ready()\n"
            "print(len(ffi._HANDLERS), sum(h.cache_hits for h in ffi._HANDLERS.values()))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=root)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    handlers, hits = (int(v) for v in runs[1].stdout.split()[-2:])
    assert runs[0].stdout.split()[-2] == "1" and handlers == 1  # forward and gradient: one handler
    assert hits == 1  # the second process loaded it
