"""optax's own tests for the losses fastloss provides, run against fastloss.

The test classes come from the installed optax wheel (``optax/losses/_classification_test.py`` and
``_regression_test.py``): nothing is copied. Their modules' ``_classification`` / ``_regression``
names are rebound to namespaces whose softmax_cross_entropy, softmax_cross_entropy_with_integer_labels,
sigmoid_binary_cross_entropy, squared_error and huber_loss call fastloss (optax's signatures: ``axis``, and
``where`` as masked logits), everything else stock. Run by tests/test_optax.py once per backend
(``FASTLOSS_OPTAX_BACKEND=jax|numba``, one process each), always on jax arrays: "jax" is the XLA
formulation, "numba" the Numba kernels called through the XLA FFI, under optax's own ``jit``,
``grad`` and ``check_grads`` (forward and reverse mode).
"""
from __future__ import annotations

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optax.losses import _classification, _classification_test, _regression, _regression_test

import fastloss

BACKEND = os.environ.get("FASTLOSS_OPTAX_BACKEND", "jax")


def _array(x):
    return jnp.asarray(x)


def _classes_last(x, axis):
    """``x`` with the class axis (or axes, flattened in order) moved last."""
    xp = jnp
    if isinstance(axis, int):
        return xp.moveaxis(x, axis, -1)
    axes = tuple(a % x.ndim for a in axis)
    rest = tuple(a for a in range(x.ndim) if a not in axes)
    x = xp.transpose(x, rest + axes)
    return x.reshape(x.shape[:len(rest)] + (-1,))


def _masked(logits, where, axis):
    """optax's ``where``: excluded logits leave the softmax, i.e. become -inf (fastloss's masked
    classes); returns the logits and the mask broadcast to them."""
    xp = jnp
    where = xp.asarray(where)
    if where.ndim != logits.ndim:
        where = xp.expand_dims(where, axis)
    where = xp.broadcast_to(where, logits.shape)
    return xp.where(where, logits, -xp.inf), where


def softmax_cross_entropy(logits, labels, axis=-1, where=None):
    logits, labels = _array(logits), _array(labels)
    if where is not None:
        logits, where = _masked(logits, where, axis)
        labels = jnp.where(where, labels, 0)
    logits, labels = _classes_last(logits, axis), _classes_last(labels, axis)
    if logits.shape[-1] == 0:
        # No class at all: fastloss's contract asks for at least one (a ValueError naming the shape);
        # optax's answer is its empty sum, 0. optax's test_mask indexes its inputs with a random
        # mask, which is all False (no class left) in about one run in 32.
        return jnp.zeros(logits.shape[:-1], logits.dtype)
    return fastloss.softmax_cross_entropy(logits, labels, reduction="none", backend=BACKEND)


def softmax_cross_entropy_with_integer_labels(logits, labels, axis=-1, where=None):
    xp = jnp
    logits, labels = _array(logits), _array(labels)
    if where is not None:
        logits, where = _masked(logits, where, axis)
        # a row with nothing left in it is excluded: loss 0, as optax's masked sum
        labels = xp.where(xp.any(_classes_last(where, axis), axis=-1), labels, -100)
    return fastloss.sparse_softmax_cross_entropy(_classes_last(logits, axis), labels, reduction="none",
                                                 backend=BACKEND)


def sigmoid_binary_cross_entropy(logits, labels):
    logits = _array(logits)
    return fastloss.sigmoid_cross_entropy(logits, _array(labels).astype(logits.dtype), reduction="none",
                                          backend=BACKEND)


def squared_error(predictions, targets=None):
    predictions = _array(predictions)
    targets = jnp.zeros_like(predictions) if targets is None else _array(targets)
    return fastloss.mean_squared_error(predictions, targets, reduction="none", backend=BACKEND)


def huber_loss(predictions, targets=None, *, delta=1.0):
    predictions = _array(predictions)
    targets = jnp.zeros_like(predictions) if targets is None else jnp.broadcast_to(_array(targets), predictions.shape)
    return fastloss.huber(predictions, targets.astype(predictions.dtype), delta=delta, reduction="none",
                          backend=BACKEND)


def sigmoid_focal_loss(logits, labels, *, alpha=None, gamma=2.0):
    logits = _array(logits)
    labels = jnp.broadcast_to(_array(labels), logits.shape).astype(logits.dtype)
    # optax's alpha=None is no class balancing; a given alpha is Keras' apply_class_balancing
    return fastloss.sigmoid_focal_loss(logits, labels, gamma=gamma, alpha=0.25 if alpha is None else alpha,
                                       apply_class_balancing=alpha is not None, reduction="none", backend=BACKEND)


def _rebind(module, name, stock, **ours):
    ns = types.SimpleNamespace(**{k: v for k, v in vars(stock).items() if not k.startswith("__")})
    for k, v in ours.items():
        setattr(ns, k, v)
    setattr(module, name, ns)


_rebind(_classification_test, "_classification", _classification,
        softmax_cross_entropy=softmax_cross_entropy,
        softmax_cross_entropy_with_integer_labels=softmax_cross_entropy_with_integer_labels,
        sigmoid_binary_cross_entropy=sigmoid_binary_cross_entropy, sigmoid_focal_loss=sigmoid_focal_loss)
_rebind(_regression_test, "_regression", _regression, squared_error=squared_error, huber_loss=huber_loss)


class TestSoftmaxCrossEntropy(_classification_test.SoftmaxCrossEntropyTest):
    pass


class TestSoftmaxCrossEntropyWithIntegerLabels(_classification_test.SoftmaxCrossEntropyWithIntegerLabelsTest):
    pass


class TestSigmoidCrossEntropy(_classification_test.SigmoidCrossEntropyTest):
    pass


class TestSigmoidFocalLoss(_classification_test.SigmoidFocalLossTest):
    pass


class TestSquaredError(_regression_test.SquaredErrorTest):
    pass


class TestHuberLoss(_regression_test.HuberLossTest):
    pass


def test_shim_really_calls_fastloss(monkeypatch):
    calls = []
    real = fastloss.sparse_softmax_cross_entropy
    monkeypatch.setattr(fastloss, "sparse_softmax_cross_entropy", lambda *a, **k: calls.append(k) or real(*a, **k))
    _classification_test._classification.softmax_cross_entropy_with_integer_labels(
        np.zeros((2, 3), np.float32), np.array([0, 1]))
    assert calls and calls[0]["backend"] == BACKEND
    assert jax  # imported for the stock tests' module state
