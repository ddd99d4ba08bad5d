"""The Keras 3 pieces of fastloss that work on models rather than on a (y_true, y_pred) pair: the
KL divergence and the distillation loss of ``keras.distillation.Distiller``, and the fused output
head. Re-exported by ``fastloss.keras``; see its docstring for the backend rules."""
from __future__ import annotations

import warnings

import keras
import numpy as np
from keras import ops
from keras.src.losses.loss import squeeze_or_expand_to_same_rank

import fastloss

from ._spec import LINEAR_CE
from ._validation import validate_linear

_WARNED = []


def kernel_backend():
    """'jax', 'torch' or None (no fused kernel for this Keras backend: keras.ops fallback)."""
    name = keras.backend.backend()
    if name in ("jax", "torch"):
        return name
    if not _WARNED:
        _WARNED.append(name)
        warnings.warn(f"fastloss.keras: no fused kernel for the Keras backend {name!r}; using an unfused "
                      f"keras.ops formula (same results, stock speed).", RuntimeWarning, stacklevel=3)
    return None


# ----------------------------------------------------------------------------- distillation
@keras.saving.register_keras_serializable(package="fastloss")
def kl_divergence(y_true, y_pred):
    """``keras.losses.kl_divergence``, Σ t (log t - log p) over the last axis, unclipped.

    Stock clips both inputs to [1e-7, 1] first; here a zero target probability contributes 0 (its
    limit) and a zero predicted probability under a non-zero target gives inf (the exact KL). Where
    no probability falls below 1e-7 the two agree. Rows are not renormalised (as stock). Inputs are
    probabilities, so there is no softmax to fuse: this is one elementwise pass and a row sum, which
    XLA and torch fuse as they are; the fused kernel serves logits (``LogitsDistillation``,
    ``fastloss.distillation_loss``).
    """
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = ops.convert_to_tensor(y_true, y_pred.dtype)
    y_true, y_pred = squeeze_or_expand_to_same_rank(y_true, y_pred)
    # where(t == 0) on both the value and the log argument: no 0 * log 0 = NaN, and no NaN gradient
    zero = y_true == 0
    safe_t = ops.where(zero, ops.ones_like(y_true), y_true)
    terms = ops.where(zero, ops.zeros_like(y_true), y_true * (ops.log(safe_t) - ops.log(y_pred)))
    return ops.sum(terms, axis=-1)


@keras.saving.register_keras_serializable(package="fastloss")
class KLDivergence(keras.losses.KLDivergence):
    """``keras.losses.KLDivergence`` without the 1e-7 clipping (see ``kl_divergence``)."""

    def __init__(self, reduction="sum_over_batch_size", name="kl_divergence", dtype=None):
        super().__init__(reduction=reduction, name=name, dtype=dtype)
        self.fn = kl_divergence


def _is_kl(loss_fn):
    return isinstance(loss_fn, keras.losses.KLDivergence) or loss_fn in (keras.losses.kl_divergence, kl_divergence)


@keras.saving.register_keras_serializable(package="fastloss")
class LogitsDistillation(keras.distillation.LogitsDistillation):
    """``keras.distillation.LogitsDistillation`` with the KL term fused: T² KL(softmax(t/T) || softmax(s/T))
    per row from both logits in one pass (``fastloss.distillation_loss``), in log space.

    Same signature (``temperature=3.0``, ``loss="kl_divergence"``) and use
    (``keras.distillation.Distiller(..., distillation_losses=LogitsDistillation(...))``). Differences
    from stock, both on purpose:

    - no probability clipping (stock's KLDivergence clips at 1e-7, which changes the answer once
      probabilities fall below it, e.g. at 32k+ classes);
    - the default ``loss="kl_divergence"`` computes the KL divergence of the tempered distributions.
      Stock resolves that string to the ``kl_divergence`` *function*, which its probability branch
      does not recognise (it checks for a ``KLDivergence`` instance), and so applies it to the clipped
      logits: 18.0 where the distributions' KL·T² is 6.74 (4x10 logits, T = 3). With
      ``loss=keras.losses.KLDivergence()`` stock and fastloss agree.

    Other losses (``"categorical_crossentropy"``, instances, nested structures, ``None``) behave as
    stock: the loss of the tempered logits.
    """

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        from keras import tree
        temperature = self.temperature

        def apply(loss_fn, teacher, student):
            if loss_fn is None:
                return ops.convert_to_tensor(0.0)
            if _is_kl(loss_fn) and kernel_backend() is not None:
                reduction = getattr(loss_fn, "reduction", "sum_over_batch_size")
                return fastloss.distillation_loss(student, teacher, temperature=temperature,
                                                  reduction="sum" if reduction == "sum" else "mean")
            if _is_kl(loss_fn):
                lt = ops.log_softmax(teacher / temperature, axis=-1)
                ls = ops.log_softmax(student / temperature, axis=-1)
                t = ops.exp(lt)
                rows = ops.sum(ops.where(t == 0, ops.zeros_like(t), t * (lt - ls)), axis=-1)
                return ops.mean(rows) * temperature ** 2
            return ops.mean(loss_fn(teacher / temperature, student / temperature))

        values = tree.map_structure(apply, self.loss, teacher_outputs, student_outputs)
        return ops.sum(ops.stack([ops.cast(v, "float32") for v in tree.flatten(values)]))


# ------------------------------------------------------------------------------ output head
@keras.saving.register_keras_serializable(package="fastloss")
class LinearCrossEntropyHead(keras.layers.Layer):
    """A classifier's or language model's output layer that trains with the fused
    ``fastloss.linear_cross_entropy``: its (N, units) logits never exist in full during training.

    ``head(hidden)`` returns the logits ``hidden @ kernel + bias``, as ``keras.layers.Dense(units)``
    does (same weights, same layout: a Dense head's weights load into it). ``head(hidden, labels)``
    adds the mean sparse cross-entropy of those logits over the rows whose label is not
    ``ignore_index`` to the model's losses (``add_loss``), computed chunk by chunk with its gradient,
    and returns that loss (a scalar) instead of the logits. A training model therefore takes the
    labels as an input and is compiled without a loss; an inference model shares the layers:

        tokens = keras.Input((H,)); labels = keras.Input((), dtype="int32")
        hidden = body(tokens)
        head = LinearCrossEntropyHead(num_classes)
        train = keras.Model({"x": tokens, "labels": labels}, head(hidden, labels))
        train.compile(optimizer="adam")                       # no loss: the head adds it
        train.fit({"x": x, "labels": y}, epochs=3)
        infer = keras.Model(tokens, head(hidden))             # logits, for predict()

    Args:
        units: number of classes C.
        use_bias, kernel_initializer, bias_initializer: as ``keras.layers.Dense``.
        temperature, label_smoothing, z_loss: the options of ``fastloss.sparse_softmax_cross_entropy``.
        ignore_index: label of rows to leave out of the loss and of its mean (None: none).
        chunk_size: rows per chunk (None: picked from the shapes).

    On the JAX and torch backends the fused kernels run (inside ``fit``'s compiled step); on any
    other backend an unfused ``keras.ops`` formula gives the same numbers (with a warning).
    """

    def __init__(self, units, use_bias=True, kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 temperature=1.0, label_smoothing=0.0, z_loss=0.0, ignore_index=-100, chunk_size=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(units, bool) or not isinstance(units, int) or units < 1:
            raise ValueError(f"`units` must be a positive integer; received units={units!r}.")
        self.units = units
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.options = dict(temperature=temperature, label_smoothing=label_smoothing, z_loss=z_loss,
                            ignore_index=ignore_index, chunk_size=chunk_size)
        # Checked now (a ValueError naming the option at construction, not inside fit).
        validate_linear(LINEAR_CE, np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32),
                        np.zeros(1, np.int64), None, dict(self.options, reduction="mean"))

    def build(self, inputs_shape, labels_shape=None):
        self.kernel = self.add_weight(name="kernel", shape=(inputs_shape[-1], self.units),
                                      initializer=self.kernel_initializer)
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer=self.bias_initializer) \
            if self.use_bias else None

    def call(self, inputs, labels=None):
        if labels is None:
            logits = ops.matmul(inputs, self.kernel)
            return logits + self.bias if self.bias is not None else logits
        labels = ops.cast(labels, "int32")
        if kernel_backend() is not None:
            # weight (C, H) as torch.nn.Linear stores it: a transposed view of the (H, C) kernel
            bias = None if self.bias is None else ops.convert_to_tensor(self.bias)  # the framework's tensor
            loss = fastloss.linear_cross_entropy(inputs, ops.transpose(self.kernel), labels, bias=bias,
                                                 **self.options)
        else:
            loss = self._unfused_loss(inputs, labels)
        self.add_loss(loss)
        return loss

    def _unfused_loss(self, inputs, labels):
        o = self.options
        logits = self.call(inputs) / o["temperature"]
        log_p = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
        ignored = labels == o["ignore_index"] if o["ignore_index"] is not None else ops.zeros_like(labels, "bool")
        safe = ops.where(ignored, 0, labels)
        nll = -ops.take_along_axis(log_p, ops.expand_dims(safe, -1), axis=-1)[..., 0]
        eps = o["label_smoothing"]
        rows = (1 - eps) * nll - eps * ops.mean(log_p, axis=-1)
        if o["z_loss"]:
            rows = rows + o["z_loss"] * ops.logsumexp(ops.cast(logits, "float32"), axis=-1) ** 2
        rows = ops.where(ignored, 0.0, rows)
        return ops.sum(rows) / ops.maximum(ops.sum(ops.cast(~ignored, "float32")), 1.0)

    def compute_output_spec(self, inputs, labels=None):
        if labels is None:
            return keras.KerasTensor(tuple(inputs.shape[:-1]) + (self.units,), dtype=self.compute_dtype)
        return keras.KerasTensor((), dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, use_bias=self.use_bias,
                      kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
                      bias_initializer=keras.initializers.serialize(self.bias_initializer), **self.options)
        return config
