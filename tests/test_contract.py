"""Every clause of docs/contract.md, run on every backend through tests/support/harness.py."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from .support import reference as R
from .support.harness import ACC_EPS, DTYPES, GRAD_RTOL, GRAD_TINY, LOSS_RTOL, assert_close, float_second, rounded

SPARSE = "sparse_softmax_cross_entropy"
DENSE = "softmax_cross_entropy"
SIGMOID = "sigmoid_cross_entropy"
MSE = "mean_squared_error"
HUBER = "huber"
FOCAL = "sigmoid_focal_loss"
SOFTMAX_FOCAL = "softmax_focal_loss"
ROWS = (SPARSE, DENSE, SOFTMAX_FOCAL)  # one value per row of classes


def make_inputs(loss, shape, seed=0, scale=3.0, ignore_frac=0.0, ignore_index=-100):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * scale
    if loss == SPARSE:
        other = rng.integers(0, shape[-1], size=shape[:-1]).astype(np.int64)
        if ignore_frac:
            other[rng.random(shape[:-1]) < ignore_frac] = ignore_index
    elif loss == DENSE:
        a = rng.standard_normal(shape)
        other = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
    elif loss in (SIGMOID, FOCAL):
        other = rng.random(shape)
    else:
        other = rng.standard_normal(shape)
    return x, other


def _as_stored(g, dtype):
    """The reference gradient where the gradient's dtype can hold it, else what storing it gives:
    beyond the dtype's range (|g| > 65504 in float16: T = 1e-10) the exact value rounds to ±inf."""
    g = np.asarray(g, dtype=np.float64)
    with np.errstate(over="ignore"):
        stored = rounded(g, dtype)
    return np.where(np.isfinite(g) & np.isinf(stored), stored, g)


def check(h, loss, x, other, dtype, opts, seed=1, grads=True):
    """Run ``loss`` on harness ``h`` and compare value, dtypes and gradients with the reference."""
    if h.max_elements is not None and np.size(x) > h.max_elements:
        pytest.skip(f"{h.name}: {np.size(x)} elements is too slow for this harness")
    ref_x = rounded(x, dtype)
    second = float_second(loss, other)
    ref_o = rounded(other, dtype) if second else other
    lead = np.shape(x)[:-1] if loss in ROWS else np.shape(x)
    cot = np.random.default_rng(seed).standard_normal(lead) if opts.get("reduction") == "none" else None
    res = h.run(loss, x, other, dtype, opts, cot=cot, grads=grads)
    ref = R.LOSSES[loss](ref_x, ref_o, **opts, cot=cot)

    assert res.loss_dtype == ("float64" if dtype == "float64" else "float32")
    finite = np.abs(ref_x[np.isfinite(ref_x)])
    zmag = (finite.max() if finite.size else 0.0) / opts.get("temperature", 1.0)
    # fp32 rounding of z = x / T costs ~|z| * eps32 absolute: it scales every tolerance below.
    mag = 8 * ACC_EPS[dtype] * zmag
    ref_loss = np.asarray(ref[0], dtype=np.float64)
    scale = np.abs(ref_loss[np.isfinite(ref_loss)]).mean() if np.isfinite(ref_loss).any() else 1.0
    assert_close(res.loss, ref_loss, LOSS_RTOL[dtype], LOSS_RTOL[dtype] * (1 + scale) + mag * (1 + scale),
                 f"{h.name} {loss} loss")
    if not grads:
        return res
    if res.grad_x is not None:
        assert res.grad_x_dtype == dtype
        g = _as_stored(ref[1], dtype)
        gmax = np.abs(g[np.isfinite(g)]).max() if np.isfinite(g).any() else 1.0
        if loss in ROWS + (SIGMOID, FOCAL):
            # The softmax (sigmoid) term p * scale / T bounds what fp32 rounding can cost, even where
            # the gradient itself is far smaller (C = 1: only the z-loss term survives p - q = 0;
            # sigmoid(3e4) - 1 = 0 while the fp32 sigmoid is within an ulp of 1).
            n_rows = int(np.prod(lead))
            counted = n_rows if second or loss != SPARSE and loss != SOFTMAX_FOCAL else \
                int(np.sum(np.asarray(other) != opts.get("ignore_index", -100)))
            unit = {"mean": 1.0 / max(counted, 1), "sum": 1.0}.get(opts.get("reduction", "mean"))
            unit = np.abs(cot).max(initial=0.0) if unit is None else unit
            gmax = max(gmax, unit / opts.get("temperature", 1.0))
        assert_close(res.grad_x, g, GRAD_RTOL[dtype], (GRAD_RTOL[dtype] + mag) * gmax + GRAD_TINY[dtype],
                     f"{h.name} {loss} grad_x")
    elif opts.get("reduction") != "none" or h.grads_for_none:
        raise AssertionError(f"{h.name} returned no gradient")
    if second and h.grads_for_other:
        assert res.grad_other_dtype == dtype
        g = _as_stored(ref[2], dtype)
        gmax = np.abs(g[np.isfinite(g)]).max() if np.isfinite(g).any() else 1.0
        assert_close(res.grad_other, g, GRAD_RTOL[dtype], (GRAD_RTOL[dtype] + mag) * gmax + GRAD_TINY[dtype],
                     f"{h.name} {loss} grad_other")
    return res


# ------------------------------------------------------------------------------ option matrix
SPARSE_OPTS = [dict(temperature=t, label_smoothing=e, z_loss=zl, reduction=r)
               for t, e, zl, r in itertools.product((1.0, 0.7), (0.0, 0.1), (0.0, 1e-3), ("mean", "sum", "none"))]
DENSE_OPTS = [dict(temperature=t, label_smoothing=e, reduction=r)
              for t, e, r in itertools.product((1.0, 2.5), (0.0, 0.2), ("mean", "sum", "none"))]
SIGMOID_OPTS = [dict(label_smoothing=e, reduction=r) for e, r in itertools.product((0.0, 0.1), ("mean", "sum", "none"))]
MSE_OPTS = [dict(reduction=r) for r in ("mean", "sum", "none")]
HUBER_OPTS = [dict(delta=d, reduction=r) for d, r in itertools.product((1.0, 0.3, 40.0), ("mean", "sum", "none"))]
FOCAL_OPTS = [dict(gamma=g, alpha=a, apply_class_balancing=b, label_smoothing=e, reduction=r)
              for g, (a, b), e, r in itertools.product((2.0, 0.5, 0.0, 3.7), ((0.25, False), (0.25, True), (0.9, True)),
                                                       (0.0, 0.1), ("mean", "none"))]
ALL_OPTS = [(SPARSE, o) for o in SPARSE_OPTS] + [(DENSE, o) for o in DENSE_OPTS] + \
    [(SIGMOID, o) for o in SIGMOID_OPTS] + [(MSE, o) for o in MSE_OPTS] + [(HUBER, o) for o in HUBER_OPTS] + \
    [(FOCAL, o) for o in FOCAL_OPTS]


def _id(v):
    return "-".join(f"{k[:4]}={v}" for k, v in v.items()) if isinstance(v, dict) else str(v)


@pytest.mark.parametrize("loss,opts", ALL_OPTS, ids=lambda v: _id(v))
def test_every_option_combination(harness, loss, opts):
    x, other = make_inputs(loss, (7, 13), ignore_frac=0.3 if loss == SPARSE else 0.0)
    check(harness, loss, x, other, "float32", opts)


SHAPES = [(7, 13), (3, 5, 17), (4, 32001), (5, 1), (11,)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("loss", [SPARSE, DENSE, SIGMOID, MSE, HUBER, FOCAL])
def test_shapes_and_dtypes(harness, loss, shape, dtype):
    if len(shape) == 1 and loss in (SPARSE, DENSE):
        shape = (1,) + shape  # a single row of 11 classes
    opts = {SPARSE: dict(temperature=0.7, label_smoothing=0.1, z_loss=1e-4),
            DENSE: dict(temperature=1.3, label_smoothing=0.1),
            SIGMOID: dict(label_smoothing=0.1), MSE: {}, HUBER: dict(delta=2.5),
            FOCAL: dict(gamma=1.5, apply_class_balancing=True, label_smoothing=0.1)}[loss]
    x, other = make_inputs(loss, shape, seed=hash(shape) % 1000, ignore_frac=0.2 if loss == SPARSE else 0.0)
    check(harness, loss, x, other, dtype, opts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", [SPARSE, DENSE, SIGMOID, MSE, HUBER, FOCAL])
def test_forward_only_programs(harness, loss, dtype):
    # The loss alone, no gradient asked for: under jit a program of its own (the kernels skip the
    # gradient store), which the other tests, computing value and gradient in one program, do not run.
    # The eager harnesses run the loss alone in every test already (tests/conftest.py keeps this
    # test for the jitted ones only).
    opts = {SPARSE: dict(temperature=0.7, label_smoothing=0.1, z_loss=1e-4), DENSE: dict(temperature=1.3),
            FOCAL: dict(gamma=1.5, apply_class_balancing=True)}.get(loss, {})
    x, other = make_inputs(loss, (5, 37), ignore_frac=0.2 if loss == SPARSE else 0.0)
    for reduction in ("mean", "none"):
        check(harness, loss, x, other, dtype, dict(opts, reduction=reduction), grads=False)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float64_is_exact(harness, reduction):
    x, y = make_inputs(SPARSE, (9, 31), seed=3, ignore_frac=0.2)
    res = check(harness, SPARSE, x, y, "float64", dict(label_smoothing=0.05, z_loss=1e-3, reduction=reduction))
    ref = R.sparse_softmax_cross_entropy(x, y, label_smoothing=0.05, z_loss=1e-3, reduction=reduction)[0]
    np.testing.assert_allclose(res.loss, ref, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- extreme inputs
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_huge_logits(harness, dtype, temperature):
    rng = np.random.default_rng(5)
    x = rng.choice([-3e4, 3e4], size=(6, 33)) * rng.random((6, 33))
    x[:, 0] = 3e4
    y = rng.integers(0, 33, size=6)
    res = check(harness, SPARSE, x, y, dtype, dict(temperature=temperature, reduction="none"))
    assert np.all(np.isfinite(res.loss)) and np.all(np.isfinite(res.grad_x if res.grad_x is not None else 0))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_common_offset_1e5(harness, dtype):
    x, y = make_inputs(SPARSE, (8, 50), seed=7)
    x = x + 1e5
    res = check(harness, SPARSE, x, y, dtype, dict(reduction="none"))
    ref = R.sparse_softmax_cross_entropy(rounded(x, dtype), y, reduction="none")[0]
    # Shift invariance, kept to fp32 precision of the *shifted* logits (not of 1e5).
    np.testing.assert_allclose(res.loss, ref, rtol=0, atol=2e-5)
    for loss in (DENSE,):
        xd, t = make_inputs(loss, (8, 50), seed=8)
        check(harness, loss, xd + 1e5, t, dtype, dict(reduction="none"))


@pytest.mark.parametrize("n_cls", [40, 24])  # 24: the numba kernels' grouped path for short rows
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_classes(harness, dtype, n_cls):
    x, y = make_inputs(SPARSE, (6, n_cls), seed=9)
    mask = np.zeros_like(x, dtype=bool)
    mask[:, n_cls // 2:] = True
    y = y % (n_cls // 2)
    x[mask] = -np.inf
    res = check(harness, SPARSE, x, y, dtype, dict(reduction="sum", temperature=0.9))
    assert np.isfinite(res.loss).all()
    if res.grad_x is not None:
        assert np.all(res.grad_x[mask] == 0.0)
    # Dense targets with zero mass on masked classes: finite too.
    t = np.where(mask, 0.0, 1.0 / (n_cls // 2))
    res = check(harness, DENSE, x, t, dtype, dict(reduction="mean"))
    assert np.isfinite(res.loss).all()


def test_nan_rows(harness):
    x, y = make_inputs(SPARSE, (5, 12), seed=10)
    x[2, 4] = np.nan
    res = check(harness, SPARSE, x, y, "float32", dict(reduction="none"))
    assert np.isnan(res.loss[2]) and np.isfinite(np.delete(res.loss, 2)).all()
    if res.grad_x is not None:
        assert np.isfinite(np.delete(res.grad_x, 2, axis=0)).all()
    xd, t = make_inputs(DENSE, (5, 12), seed=11)
    xd[1, 0] = np.nan
    res = check(harness, DENSE, xd, t, "float32", dict(reduction="none"))
    assert np.isnan(res.loss[1]) and np.isfinite(np.delete(res.loss, 1)).all()


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_sigmoid_extreme_logits(harness, label_smoothing):
    # Huge logits, both signed zeros, subnormal-scale and exp-underflow logits (|x| > 88), NaN and
    # +-inf, against every target kind: NaN and inf exactly where float64 has them (x t is NaN for
    # x = +-inf and t = 0), finite values to the usual tolerance.
    xs = np.array([-3e4, 3e4, -100.0, 100.0, -88.5, 88.5, -17.0, 17.0, 0.0, -0.0, 1e-30, -1e-30,
                   0.5, -0.5, np.nan, np.inf, -np.inf])
    ts = np.array([0.0, 0.3, 1.0])
    x = np.repeat(xs, ts.size).reshape(-1, ts.size)
    t = np.tile(ts, (xs.size, 1))
    res = check(harness, SIGMOID, x, t, "float32", dict(reduction="none", label_smoothing=label_smoothing))
    assert np.isnan(res.loss[xs != xs]).all()
    if res.grad_x is not None:
        finite_x = np.isfinite(xs)
        assert np.isfinite(res.grad_x[finite_x]).all() and np.isnan(res.grad_x[~(xs == xs)]).all()
        assert np.isfinite(res.grad_x[np.isinf(xs)]).all()


@pytest.mark.parametrize("gamma", [2.0, 0.5, 0.0, 1.0])
def test_focal_extreme_logits(harness, gamma):
    # As for sigmoid CE, plus what the focal factor adds: confident predictions whose 1 - p_t is far
    # below fp32's epsilon (x = ±17, ±88.5: 1 - p would round to 0, sigmoid(-x) does not), exactly
    # saturated ones (±3e4: 1 - p_t underflows to 0 with the BCE; the gradient is 0, its limit, even for
    # γ < 1 where u^(γ-1) is infinite), and NaN / ±inf logits.
    xs = np.array([-3e4, 3e4, -100.0, 100.0, -88.5, 88.5, -17.0, 17.0, 0.0, -0.0, 1e-30, 0.5, -0.5,
                   np.nan, np.inf, -np.inf])
    ts = np.array([0.0, 0.3, 1.0])
    x = np.repeat(xs, ts.size).reshape(-1, ts.size)
    t = np.tile(ts, (xs.size, 1))
    res = check(harness, FOCAL, x, t, "float32", dict(reduction="none", gamma=gamma, apply_class_balancing=True))
    assert np.isnan(res.loss[xs != xs]).all() and (res.loss[np.isfinite(xs)] >= 0).all()
    if res.grad_x is not None:
        assert np.isfinite(res.grad_x[np.isfinite(xs)]).all() and np.isnan(res.grad_x[xs != xs]).all()
        assert np.isfinite(res.grad_x[np.isinf(xs)][:, [0, 2]]).all()  # hard targets at ±inf: the finite limit
    # A confident, correct prediction keeps its small loss (not 0 from 1 - p rounded away).
    conf = harness.run(FOCAL, np.array([17.0]), np.array([1.0]), "float32", dict(gamma=gamma, reduction="none"),
                       grads=False)
    assert conf.loss[0] > 0 and np.isclose(conf.loss[0], R.sigmoid_focal_loss([17.0], [1.0], gamma=gamma,
                                                                              reduction="none")[0][0], rtol=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("delta", [1.0, 1e-3, 3e4])
def test_huber_extreme_errors(harness, dtype, delta):
    # Errors around ±3e4 (in float16 too: the difference of two such values is 6e4, held in fp32),
    # exactly ±delta (the joint, where both branches agree), ±0, ±inf (loss inf, gradient ±delta)
    # and NaN (NaN loss and NaN gradient: the clip must not turn NaN into ±delta).
    ps = np.array([3e4, -3e4, 3e4, 1.0, -1.0, 0.0, -0.0, 1e-3, np.inf, -np.inf, np.nan, 2.0])
    ts = np.array([-3e4, 3e4, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, np.nan])
    res = check(harness, HUBER, ps, ts, dtype, dict(delta=delta, reduction="none"))
    assert np.isnan(res.loss[-2:]).all() and not np.isnan(res.loss[:-2]).any()
    assert np.isinf(res.loss[8:10]).all() and (res.loss[:-2] >= 0).all()
    if res.grad_x is not None:
        assert np.isnan(res.grad_x[-2:]).all()
        assert np.isfinite(res.grad_x[:-2]).all()  # ±inf errors: the gradient is ±delta (times the cotangent)


# ----------------------------------------------------------------------- ignore and reductions
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(harness, reduction):
    x, y = make_inputs(SPARSE, (4, 9), seed=12)
    y[:] = -100
    res = check(harness, SPARSE, x, y, "float32", dict(reduction=reduction))
    assert np.all(res.loss == 0.0)
    if res.grad_x is not None:
        assert np.all(res.grad_x == 0.0)


def test_ignore_index_that_is_a_valid_class(harness):
    x, y = make_inputs(SPARSE, (10, 6), seed=13)
    y[:5] = 0
    res = check(harness, SPARSE, x, y, "float32", dict(ignore_index=0, reduction="mean"))
    ref_kept = R.sparse_softmax_cross_entropy(x[y != 0], y[y != 0], reduction="mean")[0]
    np.testing.assert_allclose(res.loss, ref_kept, rtol=1e-5)
    if res.grad_x is not None:
        assert np.all(res.grad_x[y == 0] == 0)


@pytest.mark.parametrize("loss", [SPARSE, DENSE, SIGMOID, MSE, HUBER, FOCAL])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(harness, loss, reduction):
    shape = (0, 5)
    x, other = make_inputs(loss, shape)
    res = check(harness, loss, x, other, "float32", dict(reduction=reduction))
    if reduction != "none":
        assert res.loss == 0.0
    else:
        assert res.loss.shape == ((0,) if loss in (SPARSE, DENSE) else (0, 5))


def test_sparse_matches_one_hot_dense(harness):
    x, y = make_inputs(SPARSE, (3, 5, 17), seed=14)
    onehot = np.eye(17)[y]
    opts = dict(temperature=1.7, label_smoothing=0.15, reduction="mean")
    a = check(harness, SPARSE, x, y, "float32", opts)
    b = check(harness, DENSE, x, onehot, "float32", opts)
    np.testing.assert_allclose(a.loss, b.loss, rtol=2e-6)
    if a.grad_x is not None:
        np.testing.assert_allclose(a.grad_x, b.grad_x, rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_long_mse_sum_is_accurate(harness):
    n = 20_000_000 if harness.max_elements is None else harness.max_elements
    rng = np.random.default_rng(15)
    p = rng.random(n, dtype=np.float32) + 1.0
    t = rng.random(n, dtype=np.float32)
    res = harness.run(MSE, p, t, "float32", dict(reduction="mean"), grads=False)
    ref = R.mean_squared_error(p, t)[0]
    assert abs(float(res.loss) - ref) <= 1e-6 * abs(ref), (float(res.loss), ref)
    x = (rng.standard_normal(n) * 4).astype(np.float32)
    res = harness.run(SIGMOID, x, t, "float32", dict(reduction="sum"), grads=False)
    ref = R.sigmoid_cross_entropy(x, t, reduction="sum")[0]
    assert abs(float(res.loss) - ref) <= 1e-6 * abs(ref), (float(res.loss), ref)


# ------------------------------------------------------------------------------ bad input
def test_out_of_range_labels_raise(harness):
    x, y = make_inputs(SPARSE, (4, 7), seed=16)
    for bad in (7, -1, 1000):
        y2 = y.copy()
        y2[2] = bad
        if getattr(harness, "traced", False):
            # Under jax.jit a traced label cannot raise: the row (so the mean) and its gradient are NaN.
            res = harness.run(SPARSE, x, y2, "float32", dict(reduction="none"), cot=np.ones(4))
            assert np.isnan(res.loss[2]) and np.isfinite(np.delete(res.loss, 2)).all()
            assert np.isnan(res.grad_x[2]).all() and np.isfinite(np.delete(res.grad_x, 2, axis=0)).all()
            continue
        with pytest.raises(ValueError, match="labels"):
            harness.run(SPARSE, x, y2, "float32", dict())


# ------------------------------------------------------------------- garbage, extremes, C = 1
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ignored_rows_with_garbage_logits_are_exactly_zero(harness, dtype):
    # Padding rows often hold NaN, inf or uninitialised memory: ignored, they must contribute loss 0
    # and gradient exactly 0, and leave the other rows' loss and gradient as if they were absent.
    x, y = make_inputs(SPARSE, (6, 40), seed=20)
    x[1] = np.nan
    x[2, ::3] = np.inf
    x[3, ::2] = -np.inf
    x[3, 1::2] = np.nan
    x[4, :] = -np.inf
    y[1:5] = -100
    for reduction in ("mean", "sum", "none"):
        res = check(harness, SPARSE, x, y, dtype, dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3))
        if reduction == "none":
            assert np.all(res.loss[1:5] == 0.0)
        assert np.isfinite(res.loss).all()
        if res.grad_x is not None:
            assert np.all(res.grad_x[1:5] == 0.0) and np.isfinite(res.grad_x).all()


@pytest.mark.parametrize("temperature", [1.0, 0.05, 1e-6, 40.0])
def test_single_class_is_zero_loss_at_any_temperature(harness, temperature):
    x = np.array([[-1.5], [0.0], [2.0], [-100.0], [1e4]])
    y = np.zeros(5, np.int64)
    res = check(harness, SPARSE, x, y, "float32", dict(temperature=temperature, reduction="none"))
    assert np.all(res.loss == 0.0)
    if res.grad_x is not None:
        assert np.all(res.grad_x == 0.0)
    t = np.ones((5, 1))
    res = check(harness, DENSE, x, t, "float32", dict(temperature=temperature, reduction="none"))
    assert np.all(res.loss == 0.0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_spread_near_the_dtype_range_is_finite(harness, dtype):
    # Logits far apart (2e19, up to ±1e38 in fp32) have an exact, finite cross-entropy.
    big = 1e38 if dtype == "float32" else 1e307
    x = np.array([[0.0, 2e19, 1.0], [0.0, 2e19, 1.0], [-big, big, 0.0], [big, -big, 0.0], [-big, -big, big]])
    y = np.array([1, 0, 1, 0, 2])
    res = check(harness, SPARSE, x, y, dtype, dict(reduction="none"))
    assert np.isfinite(res.loss).all() and (res.loss >= 0).all()
    assert res.loss[0] == 0.0 and res.loss[2] == 0.0 and res.loss[4] == 0.0
    if res.grad_x is not None:
        assert np.isfinite(res.grad_x).all()


@pytest.mark.parametrize("temperature", [1e-10, 1e-30, 3e-38])
def test_tiny_temperatures_are_finite_and_non_negative(harness, temperature):
    # z = x / T may overflow fp32 to inf: the loss must still be the finite limit (0 or the gap of
    # the label below the max, divided by T, which overflows to +inf only when that is the answer).
    x, y = make_inputs(SPARSE, (16, 11), seed=21)
    y = np.argmax(x, axis=-1)                  # the label is the max: the exact loss is ~0
    y[::4] = (y[::4] + 1) % 11                  # ... and some labels are not: a large positive loss
    res = harness.run(SPARSE, x, y, "float32", dict(temperature=temperature, reduction="none"), grads=False)
    assert not np.isnan(res.loss).any() and (res.loss >= 0).all()
    assert np.all(res.loss[np.arange(16) % 4 != 0] == 0.0)
    ref = R.sparse_softmax_cross_entropy(rounded(x, "float32"), y, temperature=temperature, reduction="none")[0]
    both_finite = np.isfinite(ref) & np.isfinite(res.loss)
    np.testing.assert_allclose(res.loss[both_finite], ref[both_finite], rtol=1e-5)


# --------------------------------------------------------------- class weights and softcap
def _class_weights(n_cls, seed=0):
    """Weights in [0.2, 3) with one class at 0 (a class that must drop out entirely)."""
    w = np.random.default_rng(seed).uniform(0.2, 3.0, n_cls)
    w[n_cls // 2] = 0.0
    return w


WEIGHT_CAP_OPTS = [dict(weight=w, softcap=c, label_smoothing=e, z_loss=zl, temperature=t, reduction=r)
                   for (w, c), (e, zl, t), r in itertools.product(
                       ((True, None), (None, 2.5), (True, 30.0)), ((0.0, 0.0, 1.0), (0.1, 1e-3, 0.7)),
                       ("mean", "sum", "none"))]


def _materialise(opts, n_cls):
    return dict(opts, weight=_class_weights(n_cls) if opts["weight"] else None)


@pytest.mark.parametrize("opts", WEIGHT_CAP_OPTS, ids=lambda o: f"w={o['weight']}-cap={o['softcap']}-"
                         f"eps={o['label_smoothing']}-{o['reduction']}")
def test_class_weights_and_softcap_options(harness, opts):
    x, y = make_inputs(SPARSE, (7, 13), ignore_frac=0.3)
    check(harness, SPARSE, x, y, "float32", _materialise(opts, 13))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 17), (4, 32001), (5, 1), (40, 10)], ids=str)
def test_class_weights_and_softcap_shapes_and_dtypes(harness, shape, dtype):
    # (4, 32001): the block-online path; (40, 10): rows the plain kernel would group (the tiny path).
    x, y = make_inputs(SPARSE, shape, seed=hash(shape) % 1000, ignore_frac=0.2)
    opts = dict(weight=_class_weights(shape[-1]), softcap=4.0, label_smoothing=0.1, z_loss=1e-4, temperature=0.7)
    check(harness, SPARSE, x, y, dtype, opts)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap_keeps_masked_classes_masked(harness, dtype):
    """Padded vocabulary lanes (-inf) stay at probability 0 under the softcap: the loss equals that
    of the unpadded logits, and their gradient is exactly 0 (tanh alone would make them -cap)."""
    x, y = make_inputs(SPARSE, (6, 12), seed=31)
    padded = np.concatenate([x, np.full((6, 5), -np.inf)], axis=-1)
    opts = dict(softcap=3.0, reduction="sum")
    res = check(harness, SPARSE, padded, y, dtype, opts)
    plain = check(harness, SPARSE, x, y, dtype, opts)
    assert_close(res.loss, plain.loss, LOSS_RTOL[dtype], 0.0, f"{harness.name} padded vs unpadded")
    if res.grad_x is not None:
        assert np.all(res.grad_x[:, 12:] == 0.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_softcap_extreme_logits(harness, dtype):
    """±3e4, a 1e5 offset (capped: the softcap bounds every logit), +inf (capped to +cap, a finite
    row), NaN (a NaN row), and a tiny cap."""
    x, y = make_inputs(SPARSE, (6, 9), seed=32)
    x[0, :] = [3e4, -3e4, 0, 1, 2, 3e4, -3e4, 5, 6]
    x[1] += 1e5 if dtype != "float16" else 6e4
    x[2, 3] = np.inf
    x[3, 4] = np.nan
    for cap in (30.0, 0.05):
        check(harness, SPARSE, x, y, dtype, dict(softcap=cap, reduction="none", label_smoothing=0.1))


def test_class_weight_mean_denominator(harness):
    """"mean" divides by the counted rows' label weights; all rows ignored, or every counted row's
    weight 0, gives 0.0 (divides by 1), where torch gives NaN."""
    x, y = make_inputs(SPARSE, (8, 6), seed=33)
    w = np.array([0.5, 0.0, 2.0, 1.0, 0.25, 3.0])
    check(harness, SPARSE, x, y, "float32", dict(weight=w))
    y0 = np.full(8, 1)  # every label has weight 0
    res = check(harness, SPARSE, x, y0, "float32", dict(weight=w))
    assert res.loss == 0.0
    res = check(harness, SPARSE, x, np.full(8, -100), "float32", dict(weight=w, label_smoothing=0.1))
    assert res.loss == 0.0
