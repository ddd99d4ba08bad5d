"""fastloss.keras.LinearCrossEntropyHead against stock Dense + SparseCategoricalCrossentropy, run by
tests/test_keras.py in one process per Keras backend (jax, torch)."""
from __future__ import annotations

import numpy as np
import pytest

import keras

import fastloss.keras as fk

RNG = np.random.default_rng(0)
N, D, HID, C = 96, 12, 16, 40
X = RNG.standard_normal((N, D)).astype("float32")
Y = RNG.integers(0, C, N).astype("int32")


def _body(seed):
    keras.utils.set_random_seed(seed)
    x = keras.Input((D,), name="x")
    return x, keras.layers.Dense(HID, activation="tanh", name="body")(x)


def _stock_model():
    x, h = _body(1)
    model = keras.Model(x, keras.layers.Dense(C, name="head")(h))
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _fused_models(**options):
    x, h = _body(1)
    labels = keras.Input((), dtype="int32", name="labels")
    head = fk.LinearCrossEntropyHead(C, name="head", chunk_size=10, **options)
    train = keras.Model({"x": x, "labels": labels}, head(h, labels))
    train.compile(optimizer=keras.optimizers.SGD(0.5))
    infer = keras.Model(x, head(h))
    return train, infer


def test_head_trains_like_stock_dense_and_sparse_ce():
    stock = _stock_model()
    train, infer = _fused_models()
    infer.set_weights(stock.get_weights())  # the same initial weights, Dense's layout
    h1 = stock.fit(X, Y, batch_size=32, epochs=4, shuffle=False, verbose=0).history["loss"]
    h2 = train.fit({"x": X, "labels": Y}, batch_size=32, epochs=4, shuffle=False, verbose=0).history["loss"]
    np.testing.assert_allclose(h2, h1, rtol=2e-5)
    assert h1[-1] < h1[0]
    np.testing.assert_allclose(infer.predict(X, verbose=0), stock.predict(X, verbose=0), rtol=1e-4, atol=1e-5)
    e1 = stock.evaluate(X, Y, verbose=0)
    e2 = train.evaluate({"x": X, "labels": Y}, verbose=0)
    np.testing.assert_allclose(e2, e1, rtol=2e-5)


def test_options_and_ignored_rows_match_the_unfused_formula():
    import fastloss
    y = Y.copy()
    y[::7] = -100
    train, infer = _fused_models(label_smoothing=0.1, temperature=1.5, z_loss=1e-3)
    value = train.evaluate({"x": X, "labels": y}, batch_size=N, verbose=0)
    logits = np.asarray(infer.predict(X, verbose=0), np.float32)
    ref = fastloss.sparse_softmax_cross_entropy(logits, y, label_smoothing=0.1, temperature=1.5, z_loss=1e-3)
    np.testing.assert_allclose(value, ref, rtol=1e-4)


def test_save_and_load(tmp_path):
    train, infer = _fused_models(label_smoothing=0.05)
    train.fit({"x": X, "labels": Y}, batch_size=32, epochs=1, verbose=0)
    path = str(tmp_path / "head.keras")
    train.save(path)
    loaded = keras.models.load_model(path)
    head = loaded.get_layer("head")
    assert isinstance(head, fk.LinearCrossEntropyHead) and head.options["label_smoothing"] == 0.05
    np.testing.assert_allclose(loaded.evaluate({"x": X, "labels": Y}, verbose=0),
                               train.evaluate({"x": X, "labels": Y}, verbose=0), rtol=1e-6)


def test_bad_options_raise_at_construction():
    with pytest.raises(ValueError, match="`label_smoothing`"):
        fk.LinearCrossEntropyHead(10, label_smoothing=2.0)
    with pytest.raises(ValueError, match="`units`"):
        fk.LinearCrossEntropyHead(0)


def test_unfused_fallback_equals_the_fused_head(monkeypatch):
    # The keras.ops formula other Keras backends get gives the fused kernels' numbers.
    y = Y.copy()
    y[::5] = -100
    train, _ = _fused_models(label_smoothing=0.1, temperature=0.8, z_loss=1e-3)
    fused = train.evaluate({"x": X, "labels": y}, batch_size=N, verbose=0)
    import fastloss._keras_models as models
    monkeypatch.setattr(models, "kernel_backend", lambda: None)
    unfused = train.evaluate({"x": X, "labels": y}, batch_size=N, verbose=0)
    np.testing.assert_allclose(unfused, fused, rtol=1e-5)
