"""fastloss.keras.KLDivergence and LogitsDistillation against stock Keras, run by tests/test_keras.py in
one process per Keras backend (jax, torch)."""
from __future__ import annotations

import numpy as np
import pytest

import keras
from keras import ops

import fastloss.keras as fk

RNG = np.random.default_rng(0)
S = RNG.standard_normal((6, 12)).astype("float32") * 2
T = RNG.standard_normal((6, 12)).astype("float32") * 2
P_S = ops.convert_to_numpy(ops.softmax(S))  # no probability below Keras' 1e-7 clip here
P_T = ops.convert_to_numpy(ops.softmax(T))
W = RNG.random(6).astype("float32")


def _np(x):
    return np.asarray(ops.convert_to_numpy(x), np.float64)


def _grad(fn, x):
    """d sum(fn(x)) / dx on the active backend."""
    if keras.backend.backend() == "jax":
        import jax
        import jax.numpy as jnp
        return _np(jax.grad(lambda a: jnp.sum(fn(a)))(jnp.asarray(x)))
    import torch
    xt = torch.tensor(x, requires_grad=True)
    fn(xt).sum().backward()
    return _np(xt.grad)


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", "none", "mean_with_sample_weight"])
@pytest.mark.parametrize("weighted", [False, True])
def test_kl_divergence_matches_stock_above_the_clip(reduction, weighted):
    sw = W if weighted else None
    ours, stock = fk.KLDivergence(reduction=reduction), keras.losses.KLDivergence(reduction=reduction)
    np.testing.assert_allclose(_np(ours(P_T, P_S, sample_weight=sw)), _np(stock(P_T, P_S, sample_weight=sw)),
                               rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(_grad(lambda p: ours(P_T, p, sample_weight=sw), P_S),
                               _grad(lambda p: stock(P_T, p, sample_weight=sw), P_S), rtol=2e-4, atol=1e-6)


def test_kl_divergence_is_unclipped_below_the_clip():
    # A one-hot target: stock clips 0 to 1e-7 and adds 1e-7 log(1e-7 / p) per class; the exact KL is
    # -log p_y, which fastloss returns (and a finite gradient: no 0 * log 0).
    t = np.eye(12, dtype="float32")[[3, 5]]
    p = P_S[:2]
    np.testing.assert_allclose(_np(fk.kl_divergence(t, p)), -np.log(p[[0, 1], [3, 5]]), rtol=1e-5)
    assert np.all(np.isfinite(_grad(lambda q: fk.kl_divergence(t, q), p)))


@pytest.mark.parametrize("temperature", [1.0, 3.0, 10.0])
def test_logits_distillation_matches_stock_kl_instance(temperature):
    ours = fk.LogitsDistillation(temperature=temperature)
    stock = keras.distillation.LogitsDistillation(temperature=temperature, loss=keras.losses.KLDivergence())
    np.testing.assert_allclose(_np(ours.compute_loss(T, S)), _np(stock.compute_loss(T, S)), rtol=2e-5)
    np.testing.assert_allclose(_grad(lambda s: ours.compute_loss(T, s), S),
                               _grad(lambda s: stock.compute_loss(T, s), S), rtol=2e-4, atol=1e-7)


def test_logits_distillation_other_losses_as_stock():
    for loss in ("categorical_crossentropy", ["kl_divergence", None]):
        ours = fk.LogitsDistillation(temperature=2.0, loss=loss)
        stock = keras.distillation.LogitsDistillation(temperature=2.0, loss=loss)
        if isinstance(loss, list):  # stock applies the kl_divergence *function* to logits (see the docstring)
            want = keras.distillation.LogitsDistillation(temperature=2.0, loss=[keras.losses.KLDivergence(), None])
            np.testing.assert_allclose(_np(ours.compute_loss([T, T], [S, S])),
                                       _np(want.compute_loss([T, T], [S, S])), rtol=2e-5)
        else:
            np.testing.assert_allclose(_np(ours.compute_loss(T, S)), _np(stock.compute_loss(T, S)), rtol=2e-5)


def test_serialization():
    for obj in (fk.LogitsDistillation(temperature=4.0), fk.KLDivergence(reduction="sum")):
        back = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(obj))
        assert type(back) is type(obj)
        assert back.get_config() == obj.get_config()


def _distill_run(distillation_loss):
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((512, 16)).astype("float32")
    teacher = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])
    y = np.argmax(_np(teacher(x)), -1)
    student = keras.Sequential([keras.Input((16,)), keras.layers.Dense(10)])
    distiller = keras.distillation.Distiller(teacher=teacher, student=student, distillation_losses=distillation_loss,
                                             student_loss_weight=0.2)
    distiller.compile(optimizer=keras.optimizers.Adam(0.01),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    hist = distiller.fit(x, y, epochs=8, batch_size=64, verbose=0, shuffle=False)
    acc = float(np.mean(np.argmax(_np(student(x)), -1) == y))
    return acc, hist.history["loss"]


def test_distiller_fit_trains_like_stock():
    ours_acc, ours_loss = _distill_run(fk.LogitsDistillation(temperature=3.0))
    stock_acc, stock_loss = _distill_run(keras.distillation.LogitsDistillation(temperature=3.0,
                                                                              loss=keras.losses.KLDivergence()))
    assert ours_acc > 0.5 and abs(ours_acc - stock_acc) <= 0.03, (ours_acc, stock_acc)
    np.testing.assert_allclose(ours_loss, stock_loss, rtol=1e-3)
