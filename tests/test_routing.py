"""The one router (fastloss._dispatch.route): every loss x every backend name x every input kind gives
the same answer through the loss and through ``value_and_grad`` (the same value, or the same
exception type and message), and the routes are the documented ones (docs/contract.md)."""
from __future__ import annotations

import numpy as np
import pytest

import fastloss
from fastloss import _dispatch, _spec

from .support.harness import require_backend

N, C = 4, 5
RNG = np.random.default_rng(7)
X = RNG.standard_normal((N, C)).astype(np.float32)
LABELS = np.array([0, 3, 4, -100])
TARGETS = RNG.random((N, C)).astype(np.float32)
TEACHER = RNG.standard_normal((N, C)).astype(np.float32)

CASES = {  # loss -> its arrays after the first, as NumPy
    "sparse_softmax_cross_entropy": (LABELS,),
    "softmax_cross_entropy": (TARGETS,),
    "sigmoid_cross_entropy": (TARGETS,),
    "mean_squared_error": (TARGETS,),
    "huber": (TARGETS,),
    "sigmoid_focal_loss": (TARGETS,),
    "softmax_focal_loss": (LABELS,),
    "distillation_loss": (TEACHER, LABELS),
}


def _convert(kind, a):
    if kind == "jax":
        import jax.numpy as jnp
        return jnp.asarray(a)
    if kind == "torch":
        import torch
        return torch.as_tensor(a)
    return a


def _outcome(f):
    try:
        return "value", float(f())
    except Exception as exc:  # noqa: BLE001 - the outcome compared is the exception itself
        return type(exc).__name__, str(exc)


@pytest.mark.parametrize("kind", ["numpy", "jax", "torch"])
@pytest.mark.parametrize("backend", [None, "jax", "numba", "triton"])
@pytest.mark.parametrize("loss", sorted(CASES))
def test_loss_and_value_and_grad_agree(loss, backend, kind):
    require_backend({"numpy": "numba", "jax": "jax", "torch": "numba"}[kind])
    fn = getattr(fastloss, loss)
    args = [_convert(kind, a) for a in (X,) + CASES[loss]]
    plain = _outcome(lambda: fn(*args, backend=backend))
    paired = _outcome(lambda: fastloss.value_and_grad(fn)(*args, backend=backend)[0])
    assert plain[0] == paired[0], (plain, paired)
    if plain[0] == "value":
        np.testing.assert_allclose(paired[1], plain[1], rtol=2e-6)
    else:
        assert plain[1] == paired[1]


def test_every_loss_is_covered():
    assert set(CASES) == {s.name for s in _spec.SPECS if s.other != "linear"}


@pytest.mark.parametrize("kind, backend, expected", [
    ("numpy", None, ("numpy", "numba")),
    ("numpy", "numba", ("numpy", "numba")),
    ("numpy", "jax", ("jax", "xla")),
    ("jax", None, ("jax", "auto")),
    ("jax", "jax", ("jax", "xla")),
    ("jax", "numba", ("jax", "numba")),
    ("jax", "triton", ("jax", "pallas")),      # TRITON_INTERPRET=1 (tests/conftest.py): Pallas' interpreter
    ("torch", None, ("torch", "numba")),
    ("torch", "numba", ("torch", "numba")),
    ("torch", "triton", ("torch", "triton")),  # CPU tensors through Triton's interpreter
])
def test_routes(kind, backend, expected):
    require_backend({"numpy": "numba", "jax": "jax", "torch": "numba"}[kind])
    x = _convert(kind, X)
    assert _dispatch.route(_spec.SPARSE_CE, x, {}, backend) == expected


@pytest.mark.parametrize("kind, backend, error, match", [
    ("numpy", "triton", TypeError, "takes torch tensors"),
    ("torch", "jax", TypeError, "takes jax or NumPy arrays"),
])
def test_routes_that_refuse(kind, backend, error, match):
    require_backend({"numpy": "numba", "jax": "jax", "torch": "numba"}[kind])
    with pytest.raises(error, match=match):
        _dispatch.route(_spec.SPARSE_CE, _convert(kind, X), {}, backend)


def test_pallas_covers_the_cross_entropies_only():
    import jax.numpy as jnp
    with pytest.raises(ValueError, match="Pallas kernels, which cover"):
        _dispatch.route(_spec.HUBER, jnp.asarray(X), {}, "triton")
