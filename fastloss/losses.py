"""The public functional API: every loss, ``value_and_grad``, and the in-place cross-entropy.

Each function states its math in its docstring and does three things: check the call against its
loss's spec (``fastloss._spec``), route it (``fastloss._dispatch``) and return what the adapter
computed. The kernels are in ``fastloss.kernels``; the adapters (``fastloss._jax``, ``._torch``,
``._numpy``) reshape, allocate and reduce around them.
"""
from __future__ import annotations

import inspect

from . import _dispatch
from ._spec import (DENSE_CE, DISTILLATION, HUBER, LINEAR_CE, MSE, SIGMOID_CE, SIGMOID_FOCAL, SOFTMAX_FOCAL,
                    SPARSE_CE)
from ._validation import cast_like, check_scalar_loss, validate, validate_distillation, validate_linear


def _run(spec, arrays, given, backend, want_grad=False):
    """Validate a call of ``spec``, route it, run it: the loss, or (loss, d loss / d first array) with
    ``want_grad``. ``given`` holds the public function's arguments by name: its ``locals()`` taken
    before it defines any other name, so each signature is written once, in its ``def``."""
    first = arrays[0]
    if spec.other == "teacher":
        *arrays, opts = validate_distillation(spec, *arrays, given)
    elif spec.other == "linear":
        h, w, y, b, opts, chunk = validate_linear(spec, *arrays, given)
        arrays, opts["chunk_size"] = (h, w, y, b), chunk
    else:
        return _dispatch.checked_call(spec, arrays, given, backend, want_grad)
    check_scalar_loss(opts, want_grad)
    result = _dispatch.call(spec, arrays, opts, backend, want_grad)
    if want_grad and spec.other == "teacher" and arrays[0] is not first:  # widened for a float64 teacher:
        return result[0], cast_like(result[1], first)  # the gradient in the student's dtype, as autograd gives it
    return result


def sparse_softmax_cross_entropy(logits, labels, *, temperature=1.0, label_smoothing=0.0,
                                 ignore_index=-100, z_loss=0.0, weight=None, softcap=None, reduction="mean",
                                 backend=None):
    """Softmax cross-entropy with integer class labels, fused loss and gradient.

    With ``z = logits / temperature`` (fp32, or fp64 for fp64 input), per row::

        row = (1-ε)(lse(z) - z[y]) + ε(lse(z) - mean_c z_c) + z_loss * lse(z)^2
        d row / d logits = (softmax(z) (1 + 2 z_loss lse(z)) - q) / temperature,
        q = (1-ε) onehot(y) + ε/C

    The label's logit is gathered; no one-hot is ever built. With class weights ``w`` (torch's
    ``weight``, and torch's label smoothing with weights)::

        row = w[y] ((1-ε)(lse(z) - z[y]) + z_loss lse(z)^2) + (ε/C) Σ_c w_c (lse(z) - z_c)

    With ``softcap`` the logits are first replaced by ``softcap * tanh(logits / softcap)`` (before
    the temperature; -inf stays -inf), and the gradient goes through the tanh.

    Args:
        logits: float array (..., C): float16, bfloat16, float32 or float64.
        labels: integer array (...): class indices in [0, C), or ``ignore_index``.
        temperature: > 0; divides the logits (it does not rescale the loss by T^2).
        label_smoothing: ε in [0, 1], as in torch and Keras.
        ignore_index: rows with this label have loss 0 and gradient 0 (whatever their logits hold),
            and are not counted by "mean"; None ignores no row.
        z_loss: weight of the lse^2 regulariser (PaLM), >= 0.
        weight: None, or (C,) finite float class weights (an array of the logits' framework, or
            NumPy). Not differentiated (as in torch).
        softcap: None, or a Python number > 0: the logits' soft cap (Gemma 2 uses 30).
        reduction: "mean" (sum over non-ignored rows / their count, or with ``weight`` / the sum
            of their labels' weights; 0.0 when that is 0), "sum", or "none" (per-row losses of
            shape (...)).
        backend: None (by input type), "jax", "numba" or "triton".

    Returns:
        The loss: a scalar, or shape (...) for "none"; float32 (float64 for float64 logits), of the
        input's framework (jax array, torch tensor, NumPy array).

    Example:
        >>> import numpy as np, fastloss
        >>> logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]], np.float32)
        >>> labels = np.array([0, 2])
        >>> loss = fastloss.sparse_softmax_cross_entropy(logits, labels, label_smoothing=0.1)
        >>> print(f"{float(loss):.4f}")
        0.3455
    """
    return _run(SPARSE_CE, (logits, labels), locals(), backend)


def softmax_cross_entropy(logits, targets, *, temperature=1.0, label_smoothing=0.0,
                          reduction="mean", backend=None):
    """Softmax cross-entropy with dense (soft, one-hot or any non-negative) targets.

    With ``z = logits / temperature`` and ``q = (1-ε) t + ε/C``, per row::

        row = Σ_c q_c (lse(z) - z_c)          (terms with q_c == 0 contribute 0)
        d row / d logits  = (softmax(z) Σ_c q_c - q) / temperature
        d row / d targets = (1-ε) (lse(z) - z)

    Args:
        logits: float array (..., C).
        targets: float array of the same shape.
        temperature, label_smoothing, reduction, backend: as in ``sparse_softmax_cross_entropy``;
            "mean" divides by the number of rows.

    Returns:
        Scalar loss, or per-row losses (...) for "none".

    Example:
        >>> import numpy as np, fastloss
        >>> logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]], np.float32)
        >>> targets = np.array([[0.9, 0.1, 0.0], [0.0, 0.0, 1.0]], np.float32)
        >>> loss = fastloss.softmax_cross_entropy(logits, targets)
        >>> print(f"{float(loss):.4f}")
        0.2505
    """
    return _run(DENSE_CE, (logits, targets), locals(), backend)


def sigmoid_cross_entropy(logits, targets, *, label_smoothing=0.0, reduction="mean", backend=None):
    """Binary cross-entropy from logits, per element, in the stable form::

        t' = t (1-ε) + ε/2
        loss = max(x, 0) - x t' + log1p(exp(-|x|))
        d loss / d x = sigmoid(x) - t',   d loss / d t = -x (1-ε)

    Args:
        logits: float array of any shape; targets: float array of the same shape.
        label_smoothing: ε in [0, 1] (Keras semantics).
        reduction: "mean" over elements, "sum", or "none" (per element).

    Example:
        >>> import numpy as np, fastloss
        >>> x = np.array([2.0, -1.0, 0.0], np.float32)
        >>> loss = fastloss.sigmoid_cross_entropy(x, np.array([1.0, 0.0, 1.0], np.float32))
        >>> print(f"{float(loss):.4f}")
        0.3778
    """
    return _run(SIGMOID_CE, (logits, targets), locals(), backend)


def mean_squared_error(predictions, targets, *, reduction="mean", backend=None):
    """Squared error per element, ``(p - t)^2``, with gradients ``2 (p - t)`` and ``-2 (p - t)``.

    "mean" divides by the number of elements and accumulates in fp32 (fp64 for fp64 input) with a
    blocked summation, accurate to ~1e-6 relative even over 10^7+ elements.

    Example:
        >>> import numpy as np, fastloss
        >>> pred, target = np.array([1.0, 2.0, 4.0], np.float32), np.array([1.0, 3.0, 2.0], np.float32)
        >>> print(f"{float(fastloss.mean_squared_error(pred, target)):.4f}")
        1.6667
    """
    return _run(MSE, (predictions, targets), locals(), backend)


def huber(predictions, targets, *, delta=1.0, reduction="mean", backend=None):
    """Huber loss per element: quadratic near zero, linear beyond ``delta`` (Keras ``Huber``, torch
    ``F.huber_loss``), fused with its gradient. With ``e = p - t`` and ``c = clip(e, -δ, δ)``::

        loss = e²/2              for |e| <= δ
               δ (|e| - δ/2)     otherwise        (= c (e - c/2), one branch-free form)
        d loss / d p = c,   d loss / d t = -c

    so one large error moves the gradient by at most δ (MSE's grows with the error). Two reads and
    one write per element, as MSE; fp32 accumulation (fp64 for fp64 input).

    Args:
        predictions: float array of any shape; targets: float array of the same shape.
        delta: δ > 0, where the loss turns from quadratic to linear. A jax scalar or tracer works
            under ``jit`` (the loss is differentiable with respect to it).
        reduction: "mean" over elements, "sum", or "none" (per element).
        backend: None (by input type), "jax", "numba" or "triton".

    Returns:
        Scalar loss, or per-element losses for "none": float32 (float64 for float64 input).

    Example:
        >>> import numpy as np, fastloss
        >>> pred, target = np.array([0.5, 2.0, -4.0], np.float32), np.array([0.0, 0.0, 0.0], np.float32)
        >>> print(f"{float(fastloss.huber(pred, target, delta=1.0)):.4f}")
        1.7083
    """
    return _run(HUBER, (predictions, targets), locals(), backend)


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
    return _run(SIGMOID_FOCAL, (logits, targets), locals(), backend)


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
    return _run(SOFTMAX_FOCAL, (logits, labels), locals(), backend)


def distillation_loss(student_logits, teacher_logits, labels=None, *, temperature=1.0, alpha=0.5,
                      divergence="forward_kl", beta=0.5, ignore_index=-100, reduction="mean", backend=None):
    """Knowledge distillation (Hinton et al., 2015) with temperature, fused: one pass over both logits.

    With ``P_t = softmax(teacher / T)`` and ``P_s = softmax(student / T)``, per row::

        forward_kl:  D = KL(P_t || P_s) = Σ P_t (log P_t - log P_s)
        reverse_kl:  D = KL(P_s || P_t)
        jsd:         D = β KL(P_t || M) + (1-β) KL(P_s || M),   M = β P_t + (1-β) P_s
        row = T² D                                     (no labels)
        row = α T² D + (1 - α) CE(student, y)          (labels; CE at T = 1)

    Everything is computed in log space from shifted logits (no probability clipping: stock Keras
    clips at 1e-7, which changes the answer once probabilities fall below it), in fp32 (fp64 for fp64
    input). The T² factor keeps the gradient's magnitude comparable across temperatures. Classes
    masked with -inf in both logits contribute 0. The teacher's gradient is computed only when it is
    asked for (a teacher is usually frozen).

    Args:
        student_logits: float array (..., C).
        teacher_logits: float array of the same shape (any float dtype).
        labels: None, or integer array (...) of class indices (or ``ignore_index``) for the hard-label
            term; ignored rows contribute nothing to either term and are not counted by "mean".
        temperature: T > 0, divides both logits.
        alpha: weight in [0, 1] of the divergence when labels are given (unused without labels).
        divergence: "forward_kl" (Hinton), "reverse_kl" or "jsd" (generalised, weight ``beta``).
        beta: the JSD's weight in [0, 1] of the teacher in the mixture M.
        ignore_index: label of rows to ignore (None: none).
        reduction: "mean" (over non-ignored rows), "sum" or "none" (per row, shape (...)).
        backend: None (by input type), "jax", "numba" or "triton".

    Returns:
        Scalar loss (float32, float64 for float64 student logits), or per-row values for "none".

    Example:
        >>> import numpy as np, fastloss
        >>> student = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]], np.float32)
        >>> teacher = np.array([[3.0, 0.0, -2.0], [0.0, 0.5, 2.5]], np.float32)
        >>> loss = fastloss.distillation_loss(student, teacher, np.array([0, 2]), temperature=2.0)
        >>> print(f"{float(loss):.4f}")
        0.1712
    """
    return _run(DISTILLATION, (student_logits, teacher_logits, labels), locals(), backend)


def linear_cross_entropy(hidden, weight, labels, *, bias=None, temperature=1.0, label_smoothing=0.0,
                         ignore_index=-100, z_loss=0.0, reduction="mean", chunk_size=None, backend=None):
    """Sparse softmax cross-entropy of ``hidden @ weight.T + bias``, fused with the projection: the
    (N, C) logits are computed, turned into their gradient and used, one chunk of rows at a time.

    Per chunk of rows ``h_c`` (``chunk_size`` rows)::

        Z = h_c @ W^T + b          G = d loss / d Z   (the fused sparse CE kernel, in place)
        d h_c = G @ W              d W += G^T @ h_c   d b += Σ_rows G     (fp32 accumulation)

    so the extra memory is O(chunk_size x C + C x H), never O(N x C): at N=8192, C=32000 fp32 the
    unfused pair holds 2 GiB of logits and their gradient. For "mean" and "sum" the gradients are
    computed during the forward (the upstream gradient only scales them): a training step does one
    logits matmul per chunk plus the two gradient matmuls, as the unfused pair does. For "none" the
    backward recomputes the logits. The loss is that of ``sparse_softmax_cross_entropy`` on the
    logits, with the same options; it is not differentiable with respect to the options.

    Args:
        hidden: float array (..., H).
        weight: float array (C, H) of the same dtype, as ``torch.nn.Linear`` stores it.
        labels: integer array (...): class indices in [0, C), or ``ignore_index``.
        bias: None or float array (C,).
        temperature, label_smoothing, ignore_index, z_loss, reduction: as in
            ``sparse_softmax_cross_entropy``.
        chunk_size: rows per chunk; None picks ~64 MiB of fp32 logits (512 rows at C=32000), less
            when free memory is short.
        backend: None (by input type), "jax", "numba" or "triton" (the kernel for the chunks; the
            matmuls are the framework's).

    Returns:
        Scalar loss, or per-row losses (...) for "none": float32 (float64 for float64 input), of
        the input's framework. jax and torch inputs are differentiable (d hidden, d weight, d bias);
        NumPy input gives the loss only.

    Example:
        >>> import numpy as np, fastloss
        >>> rng = np.random.default_rng(0)
        >>> hidden = rng.standard_normal((6, 4)).astype(np.float32)
        >>> weight = rng.standard_normal((10, 4)).astype(np.float32)
        >>> labels = np.array([0, 3, 9, 1, 1, -100])
        >>> loss = fastloss.linear_cross_entropy(hidden, weight, labels, chunk_size=4)
        >>> ref = fastloss.sparse_softmax_cross_entropy(hidden @ weight.T, labels)
        >>> bool(np.isclose(loss, ref, rtol=1e-5))
        True
    """
    return _run(LINEAR_CE, (hidden, weight, labels, bias), locals(), backend)


def sparse_softmax_cross_entropy_(logits, labels, *, temperature=1.0, label_smoothing=0.0,
                                  ignore_index=-100, z_loss=0.0, reduction="mean", backend="triton"):
    """In-place variant for torch tensors on the Triton backend: returns the loss (a tensor without
    autograd history) and overwrites ``logits`` with d loss / d logits, as Liger-Kernel does, so a
    (N, C) gradient buffer is never allocated. Off the default path: every other fastloss function
    leaves its inputs untouched. Use it where nothing else needs the logits' values: with
    ``logits = hidden @ w``, ``logits.backward(logits.detach())`` then continues backpropagation
    with the gradient now stored in them (a matmul's backward needs its inputs, not its output).

    Example:
        >>> import torch, fastloss
        >>> w = torch.randn(16, 10, requires_grad=True)
        >>> logits = torch.randn(4, 16) @ w
        >>> loss = fastloss.sparse_softmax_cross_entropy_(logits, torch.tensor([1, 2, 3, 4]))
        >>> logits.backward(logits.detach())
    """
    given = dict(locals(), weight=None, softcap=None)
    x, other, opts = validate(SPARSE_CE, logits, labels, given)
    _dispatch.route_in_place(SPARSE_CE, x, opts, backend)
    from ._torch import launch
    return launch.sparse_cross_entropy(x, other, opts, True, False, in_place=True)[0]


# value_and_grad takes these, and finds their spec here.
_SPECS = {sparse_softmax_cross_entropy: SPARSE_CE, softmax_cross_entropy: DENSE_CE, sigmoid_cross_entropy: SIGMOID_CE,
          mean_squared_error: MSE, huber: HUBER, sigmoid_focal_loss: SIGMOID_FOCAL, softmax_focal_loss: SOFTMAX_FOCAL,
          distillation_loss: DISTILLATION}


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
    spec = _SPECS.get(loss_fn) if callable(loss_fn) else None
    if spec is None:
        names = ", ".join(f.__name__ for f in _SPECS)
        raise TypeError(f"`loss_fn` must be one of the fastloss losses ({names}); received {loss_fn!r}.")
    # The signature read once: a call fills the defaults and its arguments in a dict (inspect's
    # bind() per call cost as much as the rest of a small call's Python work).
    params = [p for p in inspect.signature(loss_fn).parameters.values() if p.name != "backend"]
    positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    defaults = {p.name: p.default for p in params if p.default is not p.empty}
    required = [name for name in positional if name not in defaults]
    n_arrays = len(spec.args)

    def wrapped(*args, backend=None, **kwargs):
        if len(args) > len(positional):
            raise TypeError(f"{wrapped.__name__}() takes at most {len(positional)} positional arguments; "
                            f"received {len(args)}.")
        given = dict(defaults)
        given.update(zip(positional, args))
        unknown = [k for k in kwargs if k not in defaults and k not in positional]
        if unknown:
            raise TypeError(f"{wrapped.__name__}() got an unexpected keyword argument {unknown[0]!r}.")
        given.update(kwargs)
        missing = [name for name in required if name not in given]
        if missing:
            raise TypeError(f"{wrapped.__name__}() missing required argument {missing[0]!r}.")
        arrays = tuple(given[name] for name in positional[:n_arrays])
        return _run(spec, arrays, given, backend, want_grad=True)

    wrapped.__name__ = f"value_and_grad_{spec.name}"
    wrapped.__doc__ = f"(loss, gradient to `{spec.args[0]}`) of fastloss.{spec.name}."
    return wrapped
