"""The softmax focal loss's clauses of docs/contract.md on every backend (tests/support/harness.py), against
the float64 reference: labels and dense targets, every option, shapes, dtypes and extreme inputs."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import fastloss

from .support.harness import DTYPES, LOSS_RTOL, assert_close
from .test_contract import check

LOSS = "softmax_focal_loss"


def focal_inputs(shape, dense, seed=0, scale=3.0, ignore_frac=0.0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * scale
    if dense:
        a = rng.standard_normal(shape) * 2
        return x, np.exp(a) / np.exp(a).sum(-1, keepdims=True)
    y = rng.integers(0, shape[-1], size=shape[:-1]).astype(np.int64)
    if ignore_frac:
        y[rng.random(shape[:-1]) < ignore_frac] = -100
    return x, y


def per_class(n_cls, seed=5):
    return np.random.default_rng(seed).uniform(0.0, 2.0, n_cls)


# γ: the four integer fast paths and two others (one below 1: q^(γ-1) unbounded at q = 0).
OPTS = [dict(gamma=g, alpha=a, label_smoothing=e, reduction=r)
        for (g, r), a, e in itertools.product(((2.0, "mean"), (0.0, "sum"), (1.0, "none"), (3.0, "mean"),
                                                (0.5, "none"), (2.7, "mean")), (0.25, "per-class"), (0.0, 0.1))]


def _materialise(opts, n_cls):
    return dict(opts, alpha=per_class(n_cls) if isinstance(opts["alpha"], str) else opts["alpha"])


@pytest.mark.parametrize("dense", [False, True], ids=["labels", "targets"])
@pytest.mark.parametrize("opts", OPTS, ids=lambda o: "-".join(f"{k[:4]}={v}" for k, v in o.items()))
def test_every_option_combination(harness, opts, dense):
    x, other = focal_inputs((7, 13), dense, ignore_frac=0.3)
    check(harness, LOSS, x, other, "float32", _materialise(opts, 13))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dense", [False, True], ids=["labels", "targets"])
@pytest.mark.parametrize("shape", [(3, 5, 17), (4, 32001), (5, 1), (40, 10)], ids=str)
def test_shapes_and_dtypes(harness, shape, dense, dtype):
    x, other = focal_inputs(shape, dense, seed=hash(shape) % 1000, ignore_frac=0.2)
    opts = dict(gamma=2.0, alpha=per_class(shape[-1]), label_smoothing=0.1)
    check(harness, LOSS, x, other, dtype, opts)


def _extreme_logits(dtype):
    """±3e4 rows (±1e4 where float16 cannot hold them), a 1e5 offset (float32/64 only), a confident
    row (q ~ 1e-9: its q^γ must not round to 0), masked -inf lanes and one all-but-one masked row."""
    big = 1e4 if dtype == "float16" else 3e4
    x = np.random.default_rng(9).standard_normal((7, 9)) * 3
    x[0] = big * np.sign(np.arange(9) - 4.5)
    x[1] = -x[0]
    if dtype in ("float32", "float64"):
        x[2] += 1e5
    x[3, 0] = 25.0
    x[4, 5:] = -np.inf
    x[5, 1:] = -np.inf
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [2.0, 0.5])
def test_extreme_logits(harness, dtype, gamma):
    x = _extreme_logits(dtype)
    y = np.array([0, 8, 3, 0, 2, 0, 4])  # row 4's label is unmasked; row 5's only class is its label
    check(harness, LOSS, x, y, dtype, dict(gamma=gamma, reduction="none"))
    t = np.zeros((7, 9))
    t[np.arange(7), y] = 1.0  # one-hot targets: the masked lanes carry no mass
    check(harness, LOSS, x, t, dtype, dict(gamma=gamma, alpha=per_class(9), reduction="sum"))


def test_confident_row_keeps_its_focal_factor(harness):
    """p_y = 1 - 5e-9: the focal factor (1 - p_y)^2 is ~2.5e-17, not 0 (1 - p rounds to 0 in fp32)."""
    x = np.array([[20.0, 0.0, 0.0]])
    res = check(harness, LOSS, x, np.array([0]), "float32", dict(gamma=2.0, alpha=1.0, reduction="sum"))
    assert res.loss > 0.0


@pytest.mark.parametrize("dense", [False, True], ids=["labels", "targets"])
def test_nan_row_and_ignored_rows(harness, dense):
    x, other = focal_inputs((6, 11), dense, seed=4)
    x[2, 3] = np.nan
    if not dense:
        other[[1, 4]] = -100
        x[4] = np.nan  # an ignored row is 0 whatever it holds
    res = check(harness, LOSS, x, other, "float32", dict(reduction="none"), grads=False)
    assert np.isnan(res.loss[2]) and np.isfinite(np.delete(res.loss, 2)).all()


def test_all_ignored_batch_is_zero(harness):
    x, y = focal_inputs((4, 6), False)
    y[:] = -100
    res = check(harness, LOSS, x, y, "float32", dict(reduction="mean"))
    assert res.loss == 0.0


def test_gamma_zero_is_alpha_weighted_cross_entropy(harness):
    x, y = focal_inputs((5, 8), False, seed=3)
    focal = check(harness, LOSS, x, y, "float32", dict(gamma=0.0, alpha=1.0, label_smoothing=0.1), grads=False)
    ce = harness.run("sparse_softmax_cross_entropy", x, y, "float32", dict(label_smoothing=0.1), grads=False)
    assert_close(focal.loss, ce.loss, LOSS_RTOL["float32"], 1e-7, f"{harness.name} γ = 0 vs CE")


def test_errors_name_the_argument():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="`alpha`"):
        fastloss.softmax_focal_loss(x, np.array([0, 1]), alpha=[1.0, 2.0])
    with pytest.raises(ValueError, match="`gamma`"):
        fastloss.softmax_focal_loss(x, np.array([0, 1]), gamma=-1.0)
    with pytest.raises(ValueError, match="`labels`"):
        fastloss.softmax_focal_loss(x, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="label 3"):
        fastloss.softmax_focal_loss(x, np.array([0, 3]), backend="numba")
