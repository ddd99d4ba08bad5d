"""``fastloss.value_and_grad``: the loss and its gradient from one fused kernel call, for every loss
in ``fastloss.losses`` (validated by the same validators, so the two never disagree)."""
from __future__ import annotations

from . import _dispatch
from . import losses as L

_BY_NAME = {f.__name__: f for f in (L.sparse_softmax_cross_entropy, L.softmax_cross_entropy,
                                    L.sigmoid_cross_entropy, L.mean_squared_error, L.huber, L.sigmoid_focal_loss,
                                    L.softmax_focal_loss, L.distillation_loss)}


def value_and_grad(loss_fn):
    """Wrap a fastloss loss so that it returns ``(loss, d loss / d x)`` for its first argument.

    ``f(x, other, **kw)`` validates like ``loss_fn``; on NumPy input (and torch CPU tensors) the loss
    and the gradient come from one fused kernel call, on jax input from ``jax.value_and_grad`` over
    the custom-VJP kernel. The reduction must be "mean" or "sum" (a scalar loss). Inputs are never
    modified.

    Example:
        >>> import numpy as np, fastloss
        >>> logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]], np.float32)
        >>> vg = fastloss.value_and_grad(fastloss.sparse_softmax_cross_entropy)
        >>> loss, dlogits = vg(logits, np.array([0, 2]), label_smoothing=0.1)
        >>> dlogits.shape
        (2, 3)
    """
    name = getattr(loss_fn, "__name__", None)
    if _BY_NAME.get(name) is not loss_fn:
        raise TypeError(
            f"`loss_fn` must be one of the fastloss losses ({', '.join(_BY_NAME)}); received {loss_fn!r}."
        )
    if name == "distillation_loss":
        return _distill_value_and_grad()
    validate = L._VALIDATORS[name]

    def wrapped(x, other, *, backend=None, **kwargs):
        x, other, opts = validate(x, other, **kwargs)
        if opts["reduction"] == "none":
            raise ValueError("`reduction` must be 'mean' or 'sum' under value_and_grad (the loss must "
                             "be a scalar); received 'none'.")
        if _dispatch.framework_of(x) == "jax":
            choice = _dispatch.explicit(backend)
            if choice in (None, "jax", "numba"):
                from . import _jax
                return _jax.value_and_grad(name, x, other, opts, choice)
        chosen = _dispatch.resolve(backend, x)
        return _dispatch.get_value_and_grad(chosen)(name, x, other, opts)

    wrapped.__name__ = f"value_and_grad_{name}"
    wrapped.__doc__ = f"(loss, gradient to the first argument) of fastloss.{name}."
    return wrapped


def _distill_value_and_grad():
    def wrapped(student_logits, teacher_logits, labels=None, *, backend=None, **kwargs):
        s, t, y, opts = L._validate_distill(student_logits, teacher_logits, labels, **kwargs)
        if opts["reduction"] == "none":
            raise ValueError("`reduction` must be 'mean' or 'sum' under value_and_grad (the loss must "
                             "be a scalar); received 'none'.")
        return L._distill(s, t, y, backend, opts, True)

    wrapped.__name__ = "value_and_grad_distillation_loss"
    wrapped.__doc__ = "(loss, gradient to the student logits) of fastloss.distillation_loss."
    return wrapped
