"""Drop-in Keras 3 losses backed by fastloss kernels, plus a ``temperature`` on the categorical ones.

    from fastloss.keras import SparseCategoricalCrossentropy
    model.compile(loss=SparseCategoricalCrossentropy(from_logits=True, temperature=2.0), ...)

Same signatures, defaults and results as ``keras.losses`` (reduction, sample_weight, masks,
ignore_class, from_logits, label_smoothing, axis, name, dtype): the classes subclass the stock ones
and only replace the per-sample function, so Keras's own reduction, weighting and masking apply.

Which kernel runs: on the JAX backend the JAX custom-VJP kernels (jit-compiled inside ``fit``); on
the torch backend the torch autograd path (Numba for CPU tensors, Triton for CUDA); on any other
backend a correct but unfused ``keras.ops`` formula, with a one-time warning.

Temperature: with ``from_logits=True`` it divides the logits. With ``from_logits=False`` it tempers
the predicted distribution, p^(1/T) renormalised, i.e. softmax(log(p) / T): dividing probabilities
by T before a normalising cross-entropy would change nothing. At T = 1 the probability path is
stock's own formula (-Σ t log clip(p / Σp)); there is no softmax there to fuse. At any T the
normalised probabilities are first clipped as stock clips them, to [1e-7, 1 - 1e-7], and then
tempered: softmax(log(clip(p / Σp)) / T). So the loss is continuous in T at T = 1 and finite where
a target class has p = 0; a probability below 1e-7 counts as 1e-7 (and one above 1 - 1e-7 as
1 - 1e-7), so a row holding such a value differs slightly from the exact p^(1/T).
"""
from __future__ import annotations


import keras
import numpy as np
from keras import ops
# Two helpers stock losses use and Keras does not export; pinned to keras>=3.3,<4 in pyproject.
from keras.src.backend.common.masking import set_keras_mask
from keras.src.losses.loss import squeeze_or_expand_to_same_rank

import fastloss

from ._keras_models import KLDivergence, LinearCrossEntropyHead, LogitsDistillation, kernel_backend, kl_divergence
from ._spec import HUBER, TEMPERATURE
from ._validation import check_option

__all__ = ["BinaryCrossentropy", "BinaryFocalCrossentropy", "CategoricalCrossentropy", "CategoricalFocalCrossentropy",
           "Huber", "KLDivergence", "LinearCrossEntropyHead", "LogitsDistillation", "MeanSquaredError",
           "SparseCategoricalCrossentropy", "binary_crossentropy", "binary_focal_crossentropy", "categorical_crossentropy",
           "categorical_focal_crossentropy", "huber", "kl_divergence", "mean_squared_error",
           "sparse_categorical_crossentropy"]


def _check_axis(axis):
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise ValueError(f"`axis` must be of type `int`. Received: axis={axis} of type {type(axis)}")


def _classes_last(x, axis):
    return x if axis in (-1, len(x.shape) - 1) else ops.moveaxis(x, axis, -1)


def _log_probs_clipped(y_pred, axis):
    """Stock's probability path: log(clip(p / Σp, ε, 1 - ε))."""
    eps = keras.backend.epsilon()
    p = y_pred / ops.sum(y_pred, axis=axis, keepdims=True)
    return ops.log(ops.clip(p, eps, 1.0 - eps))


# -------------------------------------------------------------------------------- functions
@keras.saving.register_keras_serializable(package="fastloss")
def categorical_crossentropy(y_true, y_pred, from_logits=False, label_smoothing=0.0, axis=-1, temperature=1.0):
    """``keras.losses.categorical_crossentropy`` with a fused kernel and ``temperature``.

    Args:
        y_true: one-hot or soft targets, same shape as ``y_pred``.
        y_pred: logits (``from_logits=True``) or probabilities.
        label_smoothing: ε: targets become (1-ε) t + ε/C.
        axis: the class axis.
        temperature: > 0; divides logits, or tempers probabilities (p^(1/T), renormalised, after
            stock's clip of p to [1e-7, 1 - 1e-7]: see the module docstring).

    Returns:
        Per-sample losses, shape of ``y_pred`` without the class axis.
    """
    _check_axis(axis)
    temperature = check_option(temperature, TEMPERATURE)
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = ops.cast(y_true, y_pred.dtype)
    if tuple(y_true.shape) != tuple(y_pred.shape):  # stock's check: a (N, 1) target never broadcasts
        raise ValueError("Arguments `target` and `output` must have the same shape. Received: "
                         f"target.shape={tuple(y_true.shape)}, output.shape={tuple(y_pred.shape)}")
    if not from_logits and temperature == 1.0:
        if label_smoothing:
            c = ops.cast(ops.shape(y_true)[axis], y_pred.dtype)
            y_true = y_true * (1.0 - label_smoothing) + label_smoothing / c
        return -ops.sum(y_true * _log_probs_clipped(y_pred, axis), axis=axis)
    logits = y_pred if from_logits else _log_probs_clipped(y_pred, axis)
    logits, y_true = _classes_last(logits, axis), _classes_last(y_true, axis)
    if kernel_backend() is None:
        q = y_true * (1.0 - label_smoothing) + label_smoothing / ops.cast(ops.shape(y_true)[-1], logits.dtype)
        return -ops.sum(q * ops.log_softmax(logits / temperature, axis=-1), axis=-1)
    return fastloss.softmax_cross_entropy(logits, y_true, temperature=temperature,
                                          label_smoothing=float(label_smoothing), reduction="none")


@keras.saving.register_keras_serializable(package="fastloss")
def sparse_categorical_crossentropy(y_true, y_pred, from_logits=False, ignore_class=None, axis=-1, temperature=1.0):
    """``keras.losses.sparse_categorical_crossentropy`` with a fused kernel and ``temperature``.

    Rows whose label is ``ignore_class`` get loss 0 and are masked out of the reduction (as stock).
    The label's logit is gathered by the kernel; no one-hot is built.
    """
    _check_axis(axis)
    temperature = check_option(temperature, TEMPERATURE)
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = ops.convert_to_tensor(y_true)
    if len(y_true.shape) == len(y_pred.shape) and y_true.shape[axis] == 1:
        y_true = ops.squeeze(y_true, axis=axis)
    y_true = ops.cast(y_true, "int32")
    valid = None if ignore_class is None else ops.not_equal(y_true, ignore_class)
    if not from_logits and temperature == 1.0:
        logp = _classes_last(_log_probs_clipped(y_pred, axis), axis)
        labels = y_true if valid is None else ops.where(valid, y_true, 0)
        res = -ops.squeeze(ops.take_along_axis(logp, ops.expand_dims(labels, -1), axis=-1), -1)
    else:
        logits = _classes_last(y_pred if from_logits else _log_probs_clipped(y_pred, axis), axis)
        if kernel_backend() is None:
            labels = y_true if valid is None else ops.where(valid, y_true, 0)
            logp = ops.log_softmax(logits / temperature, axis=-1)
            res = -ops.squeeze(ops.take_along_axis(logp, ops.expand_dims(labels, -1), axis=-1), -1)
        else:
            # ignore_class becomes the kernel's ignore_index: loss 0 and gradient 0 for those rows.
            ignore = int(ignore_class) if ignore_class is not None else None
            res = fastloss.sparse_softmax_cross_entropy(logits, y_true, temperature=temperature,
                                                        ignore_index=ignore, reduction="none")
    if valid is not None:
        res = ops.where(valid, res, ops.zeros_like(res))
        set_keras_mask(res, mask=valid)
    return res


@keras.saving.register_keras_serializable(package="fastloss")
def binary_crossentropy(y_true, y_pred, from_logits=False, label_smoothing=0.0, axis=-1):
    """``keras.losses.binary_crossentropy`` on the fused sigmoid-CE kernel: the mean over ``axis`` of
    max(x,0) - x t' + log1p(exp(-|x|)), t' = t(1-ε) + ε/2. Probabilities are clipped as stock and
    turned into logits log(p) - log(1-p), so σ(x) is exactly the clipped probability."""
    _check_axis(axis)
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = ops.cast(y_true, y_pred.dtype)
    logits = _logits_of(y_pred, from_logits)
    if kernel_backend() is None:
        per = _unfused_bce(logits, y_true, label_smoothing)[1]
    else:
        per = fastloss.sigmoid_cross_entropy(logits, y_true, label_smoothing=float(label_smoothing), reduction="none")
    return ops.mean(per, axis=axis)


def _unfused_bce(logits, y_true, label_smoothing):
    """(t', per-element BCE from logits) in keras.ops: the fallback formula for backends without a kernel."""
    t = y_true * (1.0 - label_smoothing) + 0.5 * label_smoothing
    return t, ops.relu(logits) - logits * t + ops.log1p(ops.exp(-ops.abs(logits)))


def _logits_of(y_pred, from_logits):
    """Logits as they are, or probabilities clipped as stock (to [ε, 1 - ε], ε = 1e-7) and turned into
    log(p) - log(1 - p), so that sigmoid of the result is exactly the clipped probability."""
    if from_logits:
        return y_pred
    eps = keras.backend.epsilon()
    p = ops.clip(y_pred, eps, 1.0 - eps)
    return ops.log(p) - ops.log(1.0 - p)


@keras.saving.register_keras_serializable(package="fastloss")
def binary_focal_crossentropy(y_true, y_pred, apply_class_balancing=False, alpha=0.25, gamma=2.0, from_logits=False,
                              label_smoothing=0.0, axis=-1):
    """``keras.losses.binary_focal_crossentropy`` on the fused sigmoid focal kernel
    (``fastloss.sigmoid_focal_loss``): the mean over ``axis`` of w (1 - p_t)^γ bce. Probabilities are
    clipped as stock's cross-entropy clips them and turned into logits; stock's focal factor uses the
    unclipped probability, so the two differ where p < 1e-7 or p > 1 - 1e-7 (by at most that much)."""
    _check_axis(axis)
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = ops.cast(y_true, y_pred.dtype)
    logits = _logits_of(y_pred, from_logits)
    if kernel_backend() is None:
        t, bce = _unfused_bce(logits, y_true, label_smoothing)
        p, q = ops.sigmoid(logits), ops.sigmoid(-logits)
        per = ops.power(t * q + (1.0 - t) * p, gamma) * bce
        if apply_class_balancing:
            per = per * (t * alpha + (1.0 - t) * (1.0 - alpha))
    else:
        per = fastloss.sigmoid_focal_loss(logits, y_true, gamma=gamma, alpha=alpha,
                                          apply_class_balancing=bool(apply_class_balancing),
                                          label_smoothing=float(label_smoothing), reduction="none")
    return ops.mean(per, axis=axis)


@keras.saving.register_keras_serializable(package="fastloss")
def categorical_focal_crossentropy(y_true, y_pred, alpha=0.25, gamma=2.0, from_logits=False, label_smoothing=0.0,
                                   axis=-1):
    """``keras.losses.categorical_focal_crossentropy`` with logits on the fused softmax focal kernel
    (``fastloss.softmax_focal_loss``): Σ_j α_j t'_j (1 - p_j)^γ (-log p_j) over ``axis``.

    From logits the kernel computes log p in log space without stock's clip of p to
    [1e-7, 1 - 1e-7]: the two agree wherever every p_j lies inside the clip, and where one does not
    fastloss keeps the exact value (stock caps -log p at 16.1 and floors 1 - p at 1e-7). From
    probabilities there is no softmax to fuse: stock's own formula runs.
    """
    _check_axis(axis)
    if not from_logits:
        return keras.losses.categorical_focal_crossentropy(y_true, y_pred, alpha=alpha, gamma=gamma,
                                                           label_smoothing=label_smoothing, axis=axis)
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = ops.cast(y_true, y_pred.dtype)
    if kernel_backend() is None:
        return keras.losses.categorical_focal_crossentropy(y_true, y_pred, alpha=alpha, gamma=gamma, from_logits=True,
                                                           label_smoothing=label_smoothing, axis=axis)
    logits, y_true = _classes_last(y_pred, axis), _classes_last(y_true, axis)
    if isinstance(alpha, (list, tuple)) or np.ndim(alpha):
        alpha = ops.convert_to_tensor(np.asarray(alpha, dtype=np.float32))
    return fastloss.softmax_focal_loss(logits, y_true, gamma=gamma, alpha=alpha, label_smoothing=float(label_smoothing),
                                       reduction="none")


def _regression_pair(y_true, y_pred):
    """Stock's regression-loss preamble: float predictions (integers in floatx), targets in their dtype,
    ranks matched by squeezing or expanding a trailing axis of size 1, then both broadcast to one
    shape (stock's ``y_pred - y_true`` broadcasts a (N, 1) target against (N, 3) predictions; the
    kernels take two arrays of one shape)."""
    y_pred = ops.convert_to_tensor(y_pred)
    if not keras.backend.is_float_dtype(y_pred.dtype):
        y_pred = ops.cast(y_pred, keras.backend.floatx())
    y_true = ops.convert_to_tensor(y_true, dtype=y_pred.dtype)
    y_true, y_pred = squeeze_or_expand_to_same_rank(y_true, y_pred)
    st, sp = tuple(y_true.shape), tuple(y_pred.shape)
    if st != sp:
        shape = np.broadcast_shapes(st, sp)  # a ValueError for shapes that do not broadcast, as stock's
        y_true = ops.broadcast_to(y_true, shape) if st != shape else y_true
        y_pred = ops.broadcast_to(y_pred, shape) if sp != shape else y_pred
    return y_true, y_pred


@keras.saving.register_keras_serializable(package="fastloss")
def mean_squared_error(y_true, y_pred):
    """``keras.losses.mean_squared_error`` on the fused MSE kernel: mean over the last axis.
    Integer inputs are computed in ``keras.backend.floatx()`` (the kernels take floats; stock squares
    the integers, with the same values)."""
    y_true, y_pred = _regression_pair(y_true, y_pred)
    if kernel_backend() is None:
        per = ops.square(y_pred - y_true)
    else:
        per = fastloss.mean_squared_error(y_pred, y_true, reduction="none")
    return ops.mean(per, axis=-1)


@keras.saving.register_keras_serializable(package="fastloss")
def huber(y_true, y_pred, delta=1.0):
    """``keras.losses.huber`` on the fused Huber kernel: per element 0.5 e² for |e| <= delta, else
    delta (|e| - 0.5 delta), e = y_pred - y_true; the mean over the last axis."""
    delta = check_option(delta, HUBER.options[0])
    y_true, y_pred = _regression_pair(y_true, y_pred)
    if kernel_backend() is None:
        c = ops.clip(y_pred - y_true, -delta, delta)
        per = c * (y_pred - y_true - 0.5 * c)
    else:
        per = fastloss.huber(y_pred, y_true, delta=delta, reduction="none")
    return ops.mean(per, axis=-1)


# ---------------------------------------------------------------------------------- classes
@keras.saving.register_keras_serializable(package="fastloss")
class CategoricalCrossentropy(keras.losses.CategoricalCrossentropy):
    """``keras.losses.CategoricalCrossentropy`` plus ``temperature`` (see the module docstring)."""

    def __init__(self, from_logits=False, label_smoothing=0.0, axis=-1, reduction="sum_over_batch_size",
                 name="categorical_crossentropy", dtype=None, temperature=1.0):
        super().__init__(from_logits=from_logits, label_smoothing=label_smoothing, axis=axis, reduction=reduction,
                         name=name, dtype=dtype)
        self.temperature = check_option(temperature, TEMPERATURE)
        self.fn = categorical_crossentropy
        self._fn_kwargs["temperature"] = self.temperature

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


@keras.saving.register_keras_serializable(package="fastloss")
class SparseCategoricalCrossentropy(keras.losses.SparseCategoricalCrossentropy):
    """``keras.losses.SparseCategoricalCrossentropy`` plus ``temperature`` (see the module docstring)."""

    def __init__(self, from_logits=False, ignore_class=None, reduction="sum_over_batch_size", axis=-1,
                 name="sparse_categorical_crossentropy", dtype=None, temperature=1.0):
        super().__init__(from_logits=from_logits, ignore_class=ignore_class, reduction=reduction, axis=axis,
                         name=name, dtype=dtype)
        self.axis = axis
        self.temperature = check_option(temperature, TEMPERATURE)
        self.fn = sparse_categorical_crossentropy
        self._fn_kwargs["temperature"] = self.temperature

    def get_config(self):
        return {**super().get_config(), "axis": self.axis, "temperature": self.temperature}


@keras.saving.register_keras_serializable(package="fastloss")
class BinaryCrossentropy(keras.losses.BinaryCrossentropy):
    """``keras.losses.BinaryCrossentropy`` on the fused sigmoid-CE kernel."""

    def __init__(self, from_logits=False, label_smoothing=0.0, axis=-1, reduction="sum_over_batch_size",
                 name="binary_crossentropy", dtype=None):
        super().__init__(from_logits=from_logits, label_smoothing=label_smoothing, axis=axis, reduction=reduction,
                         name=name, dtype=dtype)
        self.fn = binary_crossentropy


@keras.saving.register_keras_serializable(package="fastloss")
class BinaryFocalCrossentropy(keras.losses.BinaryFocalCrossentropy):
    """``keras.losses.BinaryFocalCrossentropy`` on the fused sigmoid focal kernel (see
    ``binary_focal_crossentropy``)."""

    def __init__(self, apply_class_balancing=False, alpha=0.25, gamma=2.0, from_logits=False, label_smoothing=0.0,
                 axis=-1, reduction="sum_over_batch_size", name="binary_focal_crossentropy", dtype=None):
        super().__init__(apply_class_balancing=apply_class_balancing, alpha=alpha, gamma=gamma, from_logits=from_logits,
                         label_smoothing=label_smoothing, axis=axis, reduction=reduction, name=name, dtype=dtype)
        self.fn = binary_focal_crossentropy


@keras.saving.register_keras_serializable(package="fastloss")
class CategoricalFocalCrossentropy(keras.losses.CategoricalFocalCrossentropy):
    """``keras.losses.CategoricalFocalCrossentropy`` on the fused softmax focal kernel (see
    ``categorical_focal_crossentropy``)."""

    def __init__(self, alpha=0.25, gamma=2.0, from_logits=False, label_smoothing=0.0, axis=-1,
                 reduction="sum_over_batch_size", name="categorical_focal_crossentropy", dtype=None):
        super().__init__(alpha=alpha, gamma=gamma, from_logits=from_logits, label_smoothing=label_smoothing, axis=axis,
                         reduction=reduction, name=name, dtype=dtype)
        self.fn = categorical_focal_crossentropy


@keras.saving.register_keras_serializable(package="fastloss")
class MeanSquaredError(keras.losses.MeanSquaredError):
    """``keras.losses.MeanSquaredError`` on the fused MSE kernel."""

    def __init__(self, reduction="sum_over_batch_size", name="mean_squared_error", dtype=None):
        super().__init__(reduction=reduction, name=name, dtype=dtype)
        self.fn = mean_squared_error


@keras.saving.register_keras_serializable(package="fastloss")
class Huber(keras.losses.Huber):
    """``keras.losses.Huber`` on the fused Huber kernel. One difference: ``get_config`` keeps ``delta``
    (stock's drops it, so a stock ``Huber(delta=0.8)`` reloads as ``delta=1.0``)."""

    def __init__(self, delta=1.0, reduction="sum_over_batch_size", name="huber_loss", dtype=None):
        super().__init__(delta=check_option(delta, HUBER.options[0]), reduction=reduction, name=name, dtype=dtype)
        self.delta = self._fn_kwargs["delta"]
        self.fn = huber

    def get_config(self):
        return {**super().get_config(), "delta": self.delta}
