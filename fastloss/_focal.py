"""The focal losses (Lin et al., 2017): binary from logits (``sigmoid_focal_loss``) and categorical
from logits (``softmax_focal_loss``), with Keras' ``BinaryFocalCrossentropy`` and
``CategoricalFocalCrossentropy`` semantics. Validators and public functions; the kernels are in
``fastloss.kernels`` like every other loss's."""
from __future__ import annotations

from . import _validation as V
from ._calling import _call, _float_pair, _pair


def _validate_sigmoid_focal(logits, targets, *, gamma=2.0, alpha=0.25, apply_class_balancing=False,
                            label_smoothing=0.0, reduction="mean"):
    logits, targets = _float_pair(logits, targets, "logits", "targets")
    return logits, targets, dict(gamma=V.check_non_negative(gamma, "gamma"), alpha=V.check_unit_interval(alpha, "alpha"),
                                 apply_class_balancing=V.check_bool(apply_class_balancing, "apply_class_balancing"),
                                 label_smoothing=V.check_label_smoothing(label_smoothing),
                                 reduction=V.check_reduction(reduction))


def _validate_softmax_focal(logits, labels, *, gamma=2.0, alpha=0.25, label_smoothing=0.0, ignore_index=-100,
                            reduction="mean"):
    logits, labels = _pair(logits, labels, "logits", "labels")
    V.check_float_input(logits, "logits")
    shape = V.shape_of(logits)
    V.check_class_axis(shape)
    if V.is_integer_dtype(V.dtype_name(labels)):
        V.check_labels(labels, shape)
    else:  # dense targets (one-hot or soft), as Keras' y_true and torch's probability targets
        V.check_float_input(labels, "labels")
        V.check_same_shape(logits, labels, "logits", "labels")
    opts = dict(gamma=V.check_non_negative(gamma, "gamma"), label_smoothing=V.check_label_smoothing(label_smoothing),
                ignore_index=V.check_ignore_index(ignore_index), reduction=V.check_reduction(reduction))
    if isinstance(alpha, (list, tuple)) or getattr(alpha, "ndim", 0) >= 1:
        # per-class factors (Keras' list alpha): they ride in the class-weight slot of the kernels
        _, weight = _pair(logits, alpha, "logits", "alpha")
        V.check_class_weight(weight, shape[-1], arg="alpha")
        opts.update(alpha=1.0, weight=weight)
    else:
        opts["alpha"] = V.check_non_negative(alpha, "alpha")
    return logits, labels, opts


def softmax_focal_loss(logits, labels, *, gamma=2.0, alpha=0.25, label_smoothing=0.0, ignore_index=-100,
                       reduction="mean", backend=None):
    """Categorical focal loss from logits (Lin et al., 2017), per row, fused with its gradient; the
    semantics of Keras ``CategoricalFocalCrossentropy(from_logits=True)`` without its probability
    clip. With ``p = softmax(x)``, ``t' = (1-ε) t + ε/C`` (``t`` the one-hot of the label, never
    built, or the dense target row)::

        row = Σ_j α_j t'_j (1 - p_j)^γ (-log p_j)

    ``-log p`` is ``lse - x`` (no log of a rounded probability), and ``1 - p`` of the row's most
    likely class is the sum of the others' probabilities, so a confident row keeps its focal
    factor instead of rounding it to 0. The gradient is the closed form
    ``p_k S - c_k (f_k + h_k)`` (docs/contract.md).

    Args:
        logits: (..., C) floats.
        labels: (...) integer class indices, or (..., C) float targets (one-hot or soft, as Keras'
            ``y_true``; torch's probability targets).
        gamma: focusing parameter γ >= 0 (0: α-weighted cross-entropy). Integers 0 to 3 take the
            fastest CPU path.
        alpha: a number >= 0 multiplying every class, or (C,) per-class factors (Keras' list form).
        label_smoothing: ε in [0, 1] (Keras: t becomes (1-ε) t + ε/C).
        ignore_index: integer labels equal to it contribute 0 and are not counted; None for none.
        reduction: "mean" over counted rows, "sum", or "none" (per row).
        backend: None (by input type), "jax", "numba" or "triton".

    Returns:
        Scalar loss, or per-row losses of shape (...) for "none": float32 (float64 for float64
        input).

    Example:
        >>> import numpy as np, fastloss
        >>> logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]], np.float32)
        >>> print(f"{float(fastloss.softmax_focal_loss(logits, np.array([0, 1]))):.4f}")
        0.3265
    """
    x, other, opts = _validate_softmax_focal(logits, labels, gamma=gamma, alpha=alpha, label_smoothing=label_smoothing,
                                             ignore_index=ignore_index, reduction=reduction)
    return _call("softmax_focal_loss", x, other, backend, opts)


def sigmoid_focal_loss(logits, targets, *, gamma=2.0, alpha=0.25, apply_class_balancing=False, label_smoothing=0.0,
                       reduction="mean", backend=None):
    """Binary focal loss from logits (Lin et al., 2017), per element, fused with its gradient; the
    semantics of Keras ``BinaryFocalCrossentropy(from_logits=True)``. With ``t' = t(1-ε) + ε/2``,
    ``p = sigmoid(x)``::

        p_t  = t' p + (1 - t')(1 - p)
        loss = w (1 - p_t)^γ bce(x, t'),    bce = max(x, 0) - x t' + log1p(exp(-|x|))
        w    = t' α + (1 - t')(1 - α)   with apply_class_balancing, else 1

    ``1 - p_t`` is formed from ``sigmoid(-x)``, never as ``1 - p`` (which rounds a confident
    prediction's factor to 0), and the gradient is the closed form (no log of a rounded
    probability). torchvision's ``sigmoid_focal_loss(alpha=a)`` is this with
    ``apply_class_balancing=True, alpha=a``; optax's with ``alpha=None`` is the default here.

    Args:
        logits: float array of any shape; targets: float array of the same shape (in [0, 1]).
        gamma: focusing parameter γ >= 0 (0: plain BCE). Integers 0 to 4 take the fastest CPU path.
        alpha: class-1 weight in [0, 1], used with ``apply_class_balancing``.
        apply_class_balancing: weight class 1 by α and class 0 by 1 - α.
        label_smoothing: ε in [0, 1], squeezing targets towards 1/2 (Keras).
        reduction: "mean" over elements, "sum", or "none" (per element).
        backend: None (by input type), "jax", "numba" or "triton".

    Returns:
        Scalar loss, or per-element losses for "none": float32 (float64 for float64 input).

    Example:
        >>> import numpy as np, fastloss
        >>> x = np.array([2.0, -1.0, 0.0], np.float32)
        >>> loss = fastloss.sigmoid_focal_loss(x, np.array([1.0, 0.0, 1.0], np.float32))
        >>> print(f"{float(loss):.4f}")
        0.0659
    """
    x, other, opts = _validate_sigmoid_focal(logits, targets, gamma=gamma, alpha=alpha,
                                             apply_class_balancing=apply_class_balancing,
                                             label_smoothing=label_smoothing, reduction=reduction)
    return _call("sigmoid_focal_loss", x, other, backend, opts)
