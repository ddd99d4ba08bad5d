"""Differential fuzzing: every available backend against the float64 reference (and so against
each other) on shapes, dtypes, options, layouts and values that hypothesis picks and shrinks.

Profiles (tests/conftest.py): "ci" (the default; a few hundred examples in all) and "long"
(>= 10,000 examples: ``python -m pytest tests/test_fuzz.py --hypothesis-profile=long``, or
``FASTLOSS_FUZZ=long``). Each example runs one loss on every backend available here.

Inputs are drawn as parameters (seed, shape, dtype, value scale, how many of which special values,
options) and expanded with NumPy: hypothesis shrinks the parameters, and an example stays cheap
enough for the Triton interpreter. Special values are those the contract names: -inf masks, NaN,
+-inf, logits around +-3e4, a 1e5 offset, spreads near the dtype's range, tiny temperatures.
"""
from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from fastloss import _dispatch

from .support import harness as H
from .test_contract import DENSE, FOCAL, HUBER, MSE, SIGMOID, SOFTMAX_FOCAL, SPARSE, check

_BACKEND = {"pallas-jax": "triton"}
_AVAILABLE = [name for name in ("jax", "numba-jax", "pallas-jax", "numba", "numba-torch", "triton")
              if _dispatch.unavailable_reason(_BACKEND.get(name, name.split("-")[0])) is None]
HARNESSES = {name: H.make(name) for name in _AVAILABLE}

SPECIALS = {
    "mask": -np.inf, "nan": np.nan, "posinf": np.inf, "big": 3e4, "negbig": -3e4,
}


@st.composite
def _case(draw, loss):
    row_loss = loss in (SPARSE, DENSE, SOFTMAX_FOCAL)
    lead = draw(st.lists(st.integers(1, 5), min_size=1 if row_loss else 0, max_size=2))
    if row_loss:
        n_cls = draw(st.one_of(st.integers(1, 40), st.sampled_from([31, 32, 33, 257, 2049])))
        shape = tuple(lead) + (n_cls,)
    else:
        shape = tuple(lead) + (draw(st.integers(1, 70)),)
    return dict(
        shape=shape,
        seed=draw(st.integers(0, 2 ** 31 - 1)),
        dtype=draw(st.sampled_from(H.DTYPES)),
        scale=draw(st.sampled_from([1e-3, 1.0, 4.0, 30.0, 3e4])),
        offset=draw(st.sampled_from([0.0, 0.0, 1e5])),
        specials={k: draw(st.sampled_from([0, 0, 1, 3])) for k in SPECIALS},
        strided=draw(st.booleans()),
        read_only=draw(st.booleans()),
    )


def _values(case, rng):
    x = rng.standard_normal(case["shape"]) * case["scale"] + case["offset"]
    flat = x.reshape(-1)
    for name, count in case["specials"].items():
        if count and flat.size:
            flat[rng.integers(0, flat.size, count)] = SPECIALS[name]
    if float(np.finfo(H.np_dtype(case["dtype"])).max) < 1e6 and case["offset"]:
        x = x - case["offset"]  # float16 cannot hold a 1e5 offset: that case is the dtype's range itself
    return x


def _layout(a, case, rng):
    """The same values as a strided (a wider array's leading columns) and/or read-only array."""
    if case["strided"] and a.ndim >= 1:
        wide = np.full(a.shape[:-1] + (a.shape[-1] + 3,), np.nan, a.dtype)
        wide[..., :a.shape[-1]] = a
        a = wide[..., :a.shape[-1]]
    if case["read_only"]:
        a = a.view()
        a.flags.writeable = False
    return a


def _opts(draw_opts, loss):
    return {k: v for k, v in draw_opts.items() if k in {
        SPARSE: ("temperature", "label_smoothing", "z_loss", "reduction", "ignore_index", "weighted", "softcap"),
        DENSE: ("temperature", "label_smoothing", "reduction"),
        SIGMOID: ("label_smoothing", "reduction"),
        MSE: ("reduction",),
        HUBER: ("delta", "reduction"),
        FOCAL: ("gamma", "alpha", "apply_class_balancing", "label_smoothing", "reduction"),
        SOFTMAX_FOCAL: ("gamma", "alpha", "label_smoothing", "reduction", "ignore_index", "weighted",
                        "dense_targets")}[loss]}


OPTIONS = st.fixed_dictionaries(dict(
    temperature=st.sampled_from([1.0, 1.0, 0.7, 3.0, 0.05, 1e-4, 1e-10, 40.0]),
    label_smoothing=st.sampled_from([0.0, 0.0, 0.1, 1.0]),
    z_loss=st.sampled_from([0.0, 0.0, 1e-3]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    ignore_index=st.sampled_from([-100, 0]),
    delta=st.sampled_from([1.0, 1.0, 0.1, 5.0, 1e-3]),
    gamma=st.sampled_from([2.0, 2.0, 0.0, 0.5, 1.0, 3.0, 2.5]),
    alpha=st.sampled_from([0.25, 0.9]),
    apply_class_balancing=st.booleans(),
    weighted=st.sampled_from([False, False, True]),
    softcap=st.sampled_from([None, None, 30.0, 1.0, 1e-3]),
    dense_targets=st.booleans(),
))


def _other(loss, case, opts, rng):
    shape = case["shape"]
    if loss == SOFTMAX_FOCAL:  # labels or dense targets, as the loss takes either
        return _other(DENSE if opts.pop("dense_targets") else SPARSE, case, opts, rng)
    if loss == SPARSE:
        y = rng.integers(0, shape[-1], size=shape[:-1])
        y[rng.random(shape[:-1]) < 0.25] = opts["ignore_index"]
        return y
    if loss == DENSE:
        t = rng.dirichlet(np.ones(shape[-1]), size=shape[:-1])
        return np.where(rng.random(shape) < 0.2, 0.0, t)
    if loss in (SIGMOID, FOCAL):
        return np.where(rng.random(shape) < 0.5, rng.random(shape), (rng.random(shape) > 0.5).astype(float))
    return rng.standard_normal(shape) * case["scale"]


def _run(loss, case, opts):
    rng = np.random.default_rng(case["seed"])
    x = _values(case, rng)
    other = _other(loss, case, opts, rng)
    if opts.pop("weighted", False):  # class weights, about one in five of them 0
        n_cls = case["shape"][-1]
        w = np.where(rng.random(n_cls) < 0.2, 0.0, rng.uniform(0.1, 4.0, n_cls))
        opts["alpha" if loss == SOFTMAX_FOCAL else "weight"] = w
    for name, h in HARNESSES.items():
        if h.losses is not None and loss not in h.losses:
            continue  # the Pallas kernels: the softmax cross-entropies
        xl = _layout(x, case, rng) if name == "numba" else x
        check(h, loss, xl, other, case["dtype"], opts)


def _fuzz(loss):
    @settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], deadline=None)
    @given(case=_case(loss), options=OPTIONS)
    def test(case, options):
        _run(loss, case, _opts(options, loss))
    return test


test_fuzz_sparse_cross_entropy = _fuzz(SPARSE)
test_fuzz_dense_cross_entropy = _fuzz(DENSE)
test_fuzz_sigmoid_cross_entropy = _fuzz(SIGMOID)
test_fuzz_mean_squared_error = _fuzz(MSE)
test_fuzz_huber = _fuzz(HUBER)
test_fuzz_sigmoid_focal_loss = _fuzz(FOCAL)
test_fuzz_softmax_focal_loss = _fuzz(SOFTMAX_FOCAL)


def test_every_backend_is_fuzzed():
    if os.environ.get("FASTLOSS_REQUIRE_ALL_BACKENDS"):
        assert set(HARNESSES) == {"jax", "numba-jax", "pallas-jax", "numba", "numba-torch", "triton"}
    assert HARNESSES
