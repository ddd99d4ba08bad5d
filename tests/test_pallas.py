"""The Pallas kernels for jax arrays: GPU truth without a GPU, the dispatch, and jax's transforms.

The contract matrix (tests/test_contract.py, harness "pallas-jax") runs the kernels in Pallas'
interpreter. Here every shipped configuration is lowered for CUDA and its Triton IR compiled to cubin
for sm_80 and sm_90, with no spill and at most REG_LIMIT registers per thread (tests/support/gpu_resources.py).
"""
from __future__ import annotations

import numpy as np
import pytest

import fastloss

jax = pytest.importorskip("jax")
jnp = jax.numpy
pytest.importorskip("jax.experimental.pallas.triton")

pytestmark = pytest.mark.triton

SPARSE = fastloss.sparse_softmax_cross_entropy


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_every_configuration_lowers_and_compiles_without_spills(arch):
    pytest.importorskip("triton")
    from .support.gpu_resources import problems
    from .test_triton import resources_in_subprocess
    from fastloss.kernels import pallas_gpu as P
    reports = resources_in_subprocess(arch, "pallas")
    assert len(reports) == len(P.configurations())
    assert not problems(reports), "\n".join(problems(reports))


def _lowered_text(fn, *args, platform="cuda"):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("loss", ["sparse", "dense"])
def test_automatic_dispatch_runs_pallas_on_cuda_and_not_elsewhere(loss):
    x = jax.ShapeDtypeStruct((64, 1000), jnp.float32)
    other = jax.ShapeDtypeStruct((64,), jnp.int32) if loss == "sparse" else x
    fn = jax.value_and_grad(SPARSE if loss == "sparse" else fastloss.softmax_cross_entropy)
    assert "__gpu$xla.gpu.triton" in _lowered_text(fn, x, other)
    assert "__gpu$xla.gpu.triton" not in _lowered_text(fn, x, other, platform="cpu")


def test_arrays_beyond_int32_addressing_run_the_xla_formulation():
    # Pallas Triton truncates addresses to int32: 2^31 elements or more take the XLA formulation.
    x = jax.ShapeDtypeStruct((16384, 131073), jnp.float32)
    text = _lowered_text(jax.value_and_grad(SPARSE), x, jax.ShapeDtypeStruct((16384,), jnp.int32))
    assert "__gpu$xla.gpu.triton" not in text


def _inputs(shape=(3, 5, 40), seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape) * 3, jnp.float32)
    y = jnp.asarray(rng.integers(0, shape[-1], shape[:-1]), jnp.int32)
    return x, y


def _loss(backend):
    return lambda a, b: SPARSE(a, b, label_smoothing=0.1, z_loss=1e-3, backend=backend)


def test_vmap_of_value_and_grad_matches_the_xla_formulation():
    x, y = _inputs()
    got = jax.jit(jax.vmap(jax.value_and_grad(_loss("triton"))))(x, y)
    want = jax.jit(jax.vmap(jax.value_and_grad(_loss("jax"))))(x, y)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-7)


def test_second_order_and_forward_mode_match_the_xla_formulation():
    x, y = _inputs((5, 40))
    hess = [jax.jit(jax.hessian(_loss(b)))(x, y) for b in ("triton", "jax")]
    np.testing.assert_allclose(np.asarray(hess[0]), np.asarray(hess[1]), rtol=1e-5, atol=1e-8)
    tangent = jnp.ones_like(x)
    jvps = [jax.jvp(lambda a, b=b: _loss(b)(a, y), (x,), (tangent,)) for b in ("triton", "jax")]
    np.testing.assert_allclose(np.asarray(jvps[0][1]), np.asarray(jvps[1][1]), rtol=1e-5)


def test_a_traced_temperature_is_a_value_not_a_recompile():
    x, y = _inputs((4, 33))
    step = jax.jit(lambda a, b, t: SPARSE(a, b, temperature=t, backend="triton"))
    for t in (0.5, 2.0):
        want = SPARSE(x, y, temperature=t, backend="jax")
        np.testing.assert_allclose(float(step(x, y, jnp.float32(t))), float(want), rtol=2e-6)
    assert step._cache_size() == 1


def test_explicit_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if jax.default_backend() == "gpu":
        pytest.skip("jax has a GPU here")
    x, y = _inputs((2, 8))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        SPARSE(x, y, backend="triton")


def test_explicit_triton_names_the_losses_it_covers():
    x, t = _inputs((2, 8))[0], jnp.zeros((2, 8))
    with pytest.raises(ValueError, match="sparse_softmax_cross_entropy"):
        fastloss.sigmoid_cross_entropy(x, t, backend="triton")
