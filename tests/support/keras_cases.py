"""Keras wrapper cases, run by tests/test_keras.py in one process per Keras backend (jax, torch):
``KERAS_BACKEND=jax python -m pytest tests/support/keras_cases.py``. Every case compares fastloss.keras with
keras.losses: values and gradients, every reduction, sample weights, masks, options, serialization,
and a model that fits, saves and reloads."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import keras
from keras import ops

import fastloss.keras as fk

BACKEND = keras.backend.backend()
REDUCTIONS = ["sum_over_batch_size", "sum", "none", None, "mean_with_sample_weight"]
RNG = np.random.default_rng(0)
N, C = 6, 5
X = RNG.standard_normal((N, C)).astype("float32") * 3
Y = RNG.integers(0, C, N)
Y[1] = 2
Y_ONEHOT = np.eye(C, dtype="float32")[Y]
PROBS = ops.convert_to_numpy(ops.softmax(X))
Y_BIN = (RNG.random((N, C)) > 0.5).astype("float32")
WEIGHTS = {"none": None, "per-sample": RNG.random(N).astype("float32"),
           "broadcast": RNG.random((N, 1)).astype("float32")}


def _np(x):
    return np.asarray(ops.convert_to_numpy(x), dtype=np.float64)


def value_and_grad(loss_obj, y_true, y_pred, sample_weight=None):
    """Loss value (reduced to a scalar by summing, for "none") and its gradient to y_pred."""
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        def f(p):
            out = loss_obj(y_true, p, sample_weight=sample_weight)
            return jnp.sum(out), out
        (_, out), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(y_pred))
        return _np(out), _np(g)
    import torch
    p = torch.tensor(np.asarray(y_pred), requires_grad=True)
    out = loss_obj(y_true, p, sample_weight=sample_weight)
    out.sum().backward()
    return _np(out.detach()), _np(p.grad)


def assert_same(stock, ours, y_true, y_pred, sample_weight=None, rtol=2e-5, atol=1e-6):
    v1, g1 = value_and_grad(stock, y_true, y_pred, sample_weight)
    v2, g2 = value_and_grad(ours, y_true, y_pred, sample_weight)
    np.testing.assert_allclose(v2, v1, rtol=rtol, atol=atol)
    np.testing.assert_allclose(g2, g1, rtol=rtol, atol=atol)


CLASS_CASES = (
    [("sparse", dict(from_logits=fl, ignore_class=ic)) for fl, ic in itertools.product((True, False), (None, 2, -1))]
    + [("categorical", dict(from_logits=fl, label_smoothing=ls)) for fl, ls in itertools.product((True, False), (0.0, 0.1))]
    + [("binary", dict(from_logits=fl, label_smoothing=ls)) for fl, ls in itertools.product((True, False), (0.0, 0.2))]
    + [("mse", {})]
    + [("huber", dict(delta=d)) for d in (1.0, 0.3)]
    + [("focal", dict(from_logits=fl, label_smoothing=ls, apply_class_balancing=b, gamma=g))
       for fl, ls, b, g in ((True, 0.0, False, 2.0), (True, 0.1, True, 0.5), (False, 0.0, True, 2.0),
                            (False, 0.2, False, 3.0))]
    + [("categorical_focal", dict(from_logits=fl, label_smoothing=ls, gamma=g, alpha=a))
       for fl, ls, g, a in ((True, 0.0, 2.0, 0.25), (True, 0.1, 0.5, [0.5, 1.0, 2.0, 0.1, 0.7]),
                            (False, 0.0, 2.0, 0.25))]
)
PAIRS = {
    "sparse": (keras.losses.SparseCategoricalCrossentropy, fk.SparseCategoricalCrossentropy, Y),
    "categorical": (keras.losses.CategoricalCrossentropy, fk.CategoricalCrossentropy, Y_ONEHOT),
    "binary": (keras.losses.BinaryCrossentropy, fk.BinaryCrossentropy, Y_BIN),
    "mse": (keras.losses.MeanSquaredError, fk.MeanSquaredError, Y_ONEHOT),
    "huber": (keras.losses.Huber, fk.Huber, Y_ONEHOT),
    "focal": (keras.losses.BinaryFocalCrossentropy, fk.BinaryFocalCrossentropy, Y_BIN),
    "categorical_focal": (keras.losses.CategoricalFocalCrossentropy, fk.CategoricalFocalCrossentropy, Y_ONEHOT),
}


@pytest.mark.parametrize("weight", list(WEIGHTS))
@pytest.mark.parametrize("reduction", REDUCTIONS, ids=str)
@pytest.mark.parametrize("kind,kwargs", CLASS_CASES, ids=lambda v: str(v))
def test_classes_match_stock(kind, kwargs, reduction, weight):
    stock_cls, ours_cls, y = PAIRS[kind]
    pred = X if kwargs.get("from_logits", kind in ("mse", "huber")) else \
        (PROBS if kind not in ("binary", "focal") else 1 / (1 + np.exp(-X)))
    stock = stock_cls(reduction=reduction, **kwargs)
    ours = ours_cls(reduction=reduction, **kwargs)
    assert_same(stock, ours, y, pred.astype("float32"), WEIGHTS[weight])


@pytest.mark.parametrize("fn_name,kwargs", [
    ("sparse_categorical_crossentropy", dict(from_logits=True)),
    ("sparse_categorical_crossentropy", dict(from_logits=False, ignore_class=2)),
    ("categorical_crossentropy", dict(from_logits=True, label_smoothing=0.2)),
    ("categorical_crossentropy", dict(from_logits=False)),
    ("binary_crossentropy", dict(from_logits=True, label_smoothing=0.1)),
    ("mean_squared_error", {}),
    ("huber", dict(delta=0.4)),
    ("binary_focal_crossentropy", dict(from_logits=True, gamma=1.5, apply_class_balancing=True)),
    ("categorical_focal_crossentropy", dict(from_logits=True, gamma=1.5, label_smoothing=0.1)),
    ("categorical_focal_crossentropy", dict(from_logits=False, gamma=2.0)),
])
def test_functions_match_stock(fn_name, kwargs):
    y = {"sparse_categorical_crossentropy": Y, "binary_crossentropy": Y_BIN,
         "binary_focal_crossentropy": Y_BIN}.get(fn_name, Y_ONEHOT)
    pred = X if kwargs.get("from_logits", fn_name in ("mean_squared_error", "huber")) else PROBS
    a = _np(getattr(keras.losses, fn_name)(y, pred, **kwargs))
    b = _np(getattr(fk, fn_name)(y, pred, **kwargs))
    np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-6)


def test_axis_argument():
    x3 = np.moveaxis(RNG.standard_normal((4, 3, C)).astype("float32"), -1, 1)  # classes on axis 1
    t3 = np.moveaxis(np.eye(C, dtype="float32")[RNG.integers(0, C, (4, 3))], -1, 1)
    for stock, ours in [(keras.losses.CategoricalCrossentropy(from_logits=True, axis=1),
                         fk.CategoricalCrossentropy(from_logits=True, axis=1)),
                        (keras.losses.BinaryCrossentropy(from_logits=True, axis=1),
                         fk.BinaryCrossentropy(from_logits=True, axis=1))]:
        assert_same(stock, ours, t3, x3)


def test_sparse_labels_with_trailing_unit_axis_and_3d():
    x3 = RNG.standard_normal((2, 4, C)).astype("float32")
    y3 = RNG.integers(0, C, (2, 4, 1))
    assert_same(keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                fk.SparseCategoricalCrossentropy(from_logits=True), y3, x3)


def test_extreme_logits_where_stock_is_finite():
    x = (RNG.choice([-3e4, 3e4], size=(N, C)) * RNG.random((N, C))).astype("float32")
    assert_same(keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                fk.SparseCategoricalCrossentropy(from_logits=True), Y, x, rtol=1e-5, atol=1e-3)
    assert_same(keras.losses.CategoricalCrossentropy(from_logits=True),
                fk.CategoricalCrossentropy(from_logits=True), Y_ONEHOT, x, rtol=1e-5, atol=1e-3)


def test_keras_mask_on_predictions():
    from keras.src.backend.common.masking import set_keras_mask
    mask = np.array([True, False, True, True, False, True])
    for stock, ours in [(keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                         fk.SparseCategoricalCrossentropy(from_logits=True)),
                        (keras.losses.CategoricalCrossentropy(from_logits=True),
                         fk.CategoricalCrossentropy(from_logits=True))]:
        y = Y if isinstance(ours, fk.SparseCategoricalCrossentropy) else Y_ONEHOT
        p1, p2 = ops.convert_to_tensor(X), ops.convert_to_tensor(X)
        set_keras_mask(p1, ops.convert_to_tensor(mask))
        set_keras_mask(p2, ops.convert_to_tensor(mask))
        np.testing.assert_allclose(_np(ours(y, p2)), _np(stock(y, p1)), rtol=2e-5)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_logits(temperature):
    ours = fk.SparseCategoricalCrossentropy(from_logits=True, temperature=temperature)
    stock = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    np.testing.assert_allclose(_np(ours(Y, X)), _np(stock(Y, X / temperature)), rtol=2e-5)
    ours = fk.CategoricalCrossentropy(from_logits=True, temperature=temperature, label_smoothing=0.1)
    stock = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)
    np.testing.assert_allclose(_np(ours(Y_ONEHOT, X)), _np(stock(Y_ONEHOT, X / temperature)), rtol=2e-5)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_tempers_probabilities(temperature):
    # p^(1/T), renormalised: the same as softmax(log p / T). Dividing p by T would be a no-op.
    tempered = PROBS ** (1 / temperature)
    tempered /= tempered.sum(-1, keepdims=True)
    ours = fk.SparseCategoricalCrossentropy(temperature=temperature)
    expected = -np.log(tempered[np.arange(N), Y])
    np.testing.assert_allclose(_np(ours(Y, PROBS, sample_weight=None)), expected.mean(), rtol=1e-5)
    naive = keras.losses.SparseCategoricalCrossentropy()(Y, PROBS / temperature)
    assert abs(_np(naive) - _np(keras.losses.SparseCategoricalCrossentropy()(Y, PROBS))) < 1e-6  # the no-op
    assert abs(_np(ours(Y, PROBS)) - _np(naive)) > 1e-3


def test_bad_temperature_is_a_value_error():
    with pytest.raises(ValueError, match="temperature"):
        fk.CategoricalCrossentropy(temperature=0.0)


@pytest.mark.parametrize("cls,kwargs", [
    (fk.SparseCategoricalCrossentropy, dict(from_logits=True, ignore_class=-1, temperature=1.5, name="scce", axis=-1)),
    (fk.CategoricalCrossentropy, dict(from_logits=True, label_smoothing=0.1, temperature=0.7, axis=-1,
                                      reduction="sum", dtype="float32")),
    (fk.BinaryCrossentropy, dict(from_logits=True, label_smoothing=0.3, axis=-1)),
    (fk.MeanSquaredError, dict(reduction="none", name="my_mse")),
    (fk.Huber, dict(delta=0.8, reduction="sum", name="my_huber")),
    (fk.BinaryFocalCrossentropy, dict(from_logits=True, gamma=3.0, alpha=0.4, apply_class_balancing=True, axis=-1)),
    (fk.CategoricalFocalCrossentropy, dict(from_logits=True, gamma=1.0, alpha=0.5, label_smoothing=0.1, axis=-1)),
])
def test_serialization_round_trip(cls, kwargs):
    obj = cls(**kwargs)
    config = obj.get_config()
    for k, v in kwargs.items():
        if k == "dtype":  # Keras stores a dtype policy; compare what it resolves to
            assert obj.dtype == v
            continue
        assert config[k] == v, (k, config[k], v)
    again = cls.from_config(config)
    assert again.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(obj))
    assert type(restored) is cls and restored.get_config() == config


def test_signatures_match_stock():
    import inspect
    for name in ("CategoricalCrossentropy", "SparseCategoricalCrossentropy", "BinaryCrossentropy", "MeanSquaredError",
                 "Huber", "BinaryFocalCrossentropy", "categorical_crossentropy", "sparse_categorical_crossentropy",
                 "binary_crossentropy", "mean_squared_error", "huber", "binary_focal_crossentropy",
                 "CategoricalFocalCrossentropy", "categorical_focal_crossentropy"):
        stock = inspect.signature(getattr(keras.losses, name))
        ours = inspect.signature(getattr(fk, name))
        extra = [p for p in ours.parameters if p not in stock.parameters]
        assert extra in ([], ["temperature"]), (name, extra)
        for p, param in stock.parameters.items():
            assert ours.parameters[p].default == param.default, (name, p)


def test_model_fits_saves_and_reloads(tmp_path):
    x = RNG.standard_normal((64, 8)).astype("float32")
    y = (x[:, :3].argmax(-1)).astype("int32")
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)])
    loss = fk.SparseCategoricalCrossentropy(from_logits=True, temperature=1.5)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=loss)
    hist = model.fit(x, y, epochs=8, batch_size=16, verbose=0)
    assert hist.history["loss"][-1] < hist.history["loss"][0]
    path = str(tmp_path / "m.keras")
    model.save(path)
    again = keras.saving.load_model(path)
    assert type(again.loss) is fk.SparseCategoricalCrossentropy and again.loss.temperature == 1.5
    np.testing.assert_allclose(_np(again.predict(x, verbose=0)), _np(model.predict(x, verbose=0)), rtol=1e-6)
    again.fit(x, y, epochs=1, batch_size=16, verbose=0)


def test_fallback_backend_warns_once_and_matches(monkeypatch):
    import fastloss._keras_models as models
    import fastloss.keras as mod
    monkeypatch.setattr(mod.keras.backend, "backend", lambda: "tensorflow")
    monkeypatch.setattr(models, "_WARNED", [])
    with pytest.warns(RuntimeWarning, match="not fused|unfused"):
        a = _np(mod.sparse_categorical_crossentropy(Y, X, from_logits=True, temperature=2.0))
    b = _np(keras.losses.sparse_categorical_crossentropy(Y, X / 2.0, from_logits=True))
    np.testing.assert_allclose(a, b, rtol=2e-5)


def test_out_of_range_label_message_says_what_the_user_passed():
    # Without ignore_class nothing is ignored: the message names the classes, no internal sentinel.
    with pytest.raises(ValueError, match=r"class indices in \[0, 5\); received label 9\.") as info:
        fk.SparseCategoricalCrossentropy(from_logits=True)(np.array([0, 9]), X[:2])
    assert "ignore_index" not in str(info.value)


def test_huber_keeps_delta_through_save_and_load():
    # Stock's get_config drops delta: keras.losses.Huber(delta=0.8) reloads as delta=1.0.
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(fk.Huber(delta=0.8)))
    ref = keras.losses.Huber(delta=0.8)
    np.testing.assert_allclose(_np(again(Y_ONEHOT, X)), _np(ref(Y_ONEHOT, X)), rtol=2e-6)
    with pytest.raises(ValueError, match="delta"):
        fk.Huber(delta=-1.0)


def test_integer_inputs_and_target_shape_check_as_stock():
    np.testing.assert_allclose(_np(fk.mean_squared_error(np.array([4, 8, 12]), np.array([[3], [0], [1]]))),
                               [1.0, 64.0, 121.0])
    with pytest.raises(ValueError, match="must have the same shape"):
        fk.categorical_crossentropy(np.array([[0.0], [1.0], [0.0]]), PROBS[:3, :3])


@pytest.mark.parametrize("cls", ["MeanSquaredError", "Huber"])
@pytest.mark.parametrize("shapes", [((N, 1), (N, 3)), ((N, 3), (N, 1)), ((N, 3), (1, 3))])
def test_regression_targets_broadcast_as_stock(cls, shapes):
    # A (N, 1) target against (N, 3) predictions raised; stock broadcasts y_pred - y_true.
    t = RNG.standard_normal(shapes[0]).astype("float32")
    p = RNG.standard_normal(shapes[1]).astype("float32") * 2
    ours, stock = getattr(fk, cls)(reduction="none"), getattr(keras.losses, cls)(reduction="none")
    np.testing.assert_allclose(_np(ours(t, p)), _np(stock(t, p)), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError):  # shapes that do not broadcast: an error, as stock's
        ours(np.zeros((N + 1, 3), "float32"), np.zeros((N, 3), "float32"))
