"""The public functional API: validate, pick a backend, call it.

The math of every loss is written once, in docs/contract.md and in the docstrings below; the kernels in
``fastloss.kernels`` implement it and the backend adapters (``fastloss._jax`` and friends) reshape,
allocate and reduce around them.
"""
from __future__ import annotations

from . import _dispatch
from . import _validation as V
from ._calling import _call, _float_pair, _pair
from ._focal import _validate_sigmoid_focal, _validate_softmax_focal, sigmoid_focal_loss, softmax_focal_loss  # noqa: F401


# One validator per loss: (x, other, **options) -> (x, other, opts). The public functions and
# value_and_grad (fastloss._gradients) share them, so the two can never disagree on what is valid.

def _validate_sparse(logits, labels, *, temperature=1.0, label_smoothing=0.0, ignore_index=-100,
                     z_loss=0.0, weight=None, softcap=None, reduction="mean"):
    logits, labels = _pair(logits, labels, "logits", "labels")
    V.check_float_input(logits, "logits")
    V.check_class_axis(V.shape_of(logits))
    V.check_labels(labels, V.shape_of(logits))
    if weight is not None:
        _, weight = _pair(logits, weight, "logits", "weight")
        V.check_class_weight(weight, V.shape_of(logits)[-1])
    opts = dict(temperature=V.check_temperature(temperature),
                label_smoothing=V.check_label_smoothing(label_smoothing),
                ignore_index=V.check_ignore_index(ignore_index),
                z_loss=V.check_z_loss(z_loss),
                reduction=V.check_reduction(reduction))
    # The new options appear only when set, so every other path sees the opts it always did.
    if weight is not None:
        opts["weight"] = weight
    if softcap is not None:
        opts["softcap"] = V.check_softcap(softcap)
    return logits, labels, opts


def _validate_dense(logits, targets, *, temperature=1.0, label_smoothing=0.0, reduction="mean"):
    logits, targets = _pair(logits, targets, "logits", "targets")
    V.check_float_input(logits, "logits")
    V.check_float_input(targets, "targets")
    V.check_class_axis(V.shape_of(logits))
    V.check_same_shape(logits, targets, "logits", "targets")
    return logits, targets, dict(temperature=V.check_temperature(temperature),
                                 label_smoothing=V.check_label_smoothing(label_smoothing),
                                 reduction=V.check_reduction(reduction))


def _validate_sigmoid(logits, targets, *, label_smoothing=0.0, reduction="mean"):
    logits, targets = _float_pair(logits, targets, "logits", "targets")
    return logits, targets, dict(label_smoothing=V.check_label_smoothing(label_smoothing),
                                 reduction=V.check_reduction(reduction))


def _validate_mse(predictions, targets, *, reduction="mean"):
    predictions, targets = _float_pair(predictions, targets, "predictions", "targets")
    return predictions, targets, dict(reduction=V.check_reduction(reduction))


def _validate_huber(predictions, targets, *, delta=1.0, reduction="mean"):
    predictions, targets = _float_pair(predictions, targets, "predictions", "targets")
    return predictions, targets, dict(delta=V.check_positive(delta, "delta"), reduction=V.check_reduction(reduction))


_VALIDATORS = {
    "sparse_softmax_cross_entropy": _validate_sparse,
    "softmax_cross_entropy": _validate_dense,
    "sigmoid_cross_entropy": _validate_sigmoid,
    "mean_squared_error": _validate_mse,
    "huber": _validate_huber,
    "sigmoid_focal_loss": _validate_sigmoid_focal,
    "softmax_focal_loss": _validate_softmax_focal,
}


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
    x, other, opts = _validate_sparse(logits, labels, temperature=temperature, label_smoothing=label_smoothing,
                                      ignore_index=ignore_index, z_loss=z_loss, weight=weight, softcap=softcap,
                                      reduction=reduction)
    return _call("sparse_softmax_cross_entropy", x, other, backend, opts)


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
    x, other, opts = _validate_dense(logits, targets, temperature=temperature,
                                     label_smoothing=label_smoothing, reduction=reduction)
    return _call("softmax_cross_entropy", x, other, backend, opts)


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
    x, other, opts = _validate_sigmoid(logits, targets, label_smoothing=label_smoothing,
                                       reduction=reduction)
    return _call("sigmoid_cross_entropy", x, other, backend, opts)


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
    x, other, opts = _validate_mse(predictions, targets, reduction=reduction)
    return _call("mean_squared_error", x, other, backend, opts)


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
    x, other, opts = _validate_huber(predictions, targets, delta=delta, reduction=reduction)
    return _call("huber", x, other, backend, opts)


def _validate_distill(student_logits, teacher_logits, labels=None, *, temperature=1.0, alpha=0.5,
                      divergence="forward_kl", beta=0.5, ignore_index=-100, reduction="mean"):
    s, t = _pair(student_logits, teacher_logits, "student_logits", "teacher_logits")
    V.check_float_input(s, "student_logits")
    V.check_float_input(t, "teacher_logits")
    V.check_class_axis(V.shape_of(s), "student_logits")
    V.check_same_shape(s, t, "student_logits", "teacher_logits")
    if labels is not None:
        s, labels = _pair(s, labels, "student_logits", "labels")
        V.check_labels(labels, V.shape_of(s))
    return s, t, labels, dict(temperature=V.check_temperature(temperature),
                              alpha=V.check_unit_interval(alpha, "alpha"),
                              beta=V.check_unit_interval(beta, "beta"),
                              divergence=V.check_divergence(divergence),
                              ignore_index=V.check_ignore_index(ignore_index),
                              reduction=V.check_reduction(reduction))


def _distill(s, t, labels, backend, opts, want_s):
    """(loss, d loss / d student | None) on the backend the inputs and ``backend`` pick."""
    kind = _dispatch.framework_of(s)
    if kind == "torch":
        name = _dispatch.resolve_torch(backend, s)
        if name != "jax":
            from . import _torch_ops
            if want_s:  # value_and_grad: the fused kernel directly, as for the other losses
                return _torch_ops.distill_value_and_grad(s, t, labels, opts, name)
            return _torch_ops.distill_call(s, t, labels, opts, name), None
    elif kind == "jax" or any(V._is_tracer(v) for v in opts.values()):
        choice = _dispatch.explicit(backend)
        if choice in (None, "jax", "numba"):
            from . import _jax
            return _jax.distill(s, t, labels, opts, choice, want_s)
    name = _dispatch.resolve(backend, s)
    if name == "numba":
        from . import _numba
        value, gs, _ = _numba.distill(s, t, labels, opts, want_s, False)
        return value, gs
    if name == "jax":
        from . import _jax
        return _jax.distill(s, t, labels, opts, "jax", want_s)
    from . import _triton
    _triton.check_device(s, t)  # NumPy input: a TypeError saying what the backend takes
    raise AssertionError("unreachable: check_device raises for non-torch input")


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
    s, t, y, opts = _validate_distill(student_logits, teacher_logits, labels, temperature=temperature,
                                      alpha=alpha, divergence=divergence, beta=beta,
                                      ignore_index=ignore_index, reduction=reduction)
    return _distill(s, t, y, backend, opts, False)[0]


def _validate_linear(hidden, weight, labels, bias, *, temperature=1.0, label_smoothing=0.0, ignore_index=-100,
                     z_loss=0.0, reduction="mean", chunk_size=None):
    h, w = _pair(hidden, weight, "hidden", "weight")
    h, y = _pair(h, labels, "hidden", "labels")
    V.check_float_input(h, "hidden")
    V.check_float_input(w, "weight")
    hs, ws = V.shape_of(h), V.shape_of(w)
    if len(hs) < 1 or len(ws) != 2 or hs[-1] != ws[1] or ws[0] < 1:
        raise ValueError(f"`weight` must have shape (C, H) with C >= 1 for `hidden` of shape (..., H) (as "
                         f"torch.nn.Linear stores it); received `hidden` of shape {hs} and `weight` of shape {ws}.")
    if V.dtype_name(h) != V.dtype_name(w):
        raise TypeError(f"`hidden` and `weight` must have one dtype; received {V.dtype_name(h)} and "
                        f"{V.dtype_name(w)}.")
    if not V.is_integer_dtype(V.dtype_name(y)):
        raise TypeError(f"`labels` must have an integer dtype (int32, int64, ...) holding class indices; "
                        f"received dtype {V.dtype_name(y)}.")
    if V.shape_of(y) != hs[:-1]:
        raise ValueError(f"`labels` must have the shape of `hidden` without its last axis, {hs[:-1]}; received "
                         f"shape {V.shape_of(y)}.")
    if bias is not None:
        _, bias = _pair(h, bias, "hidden", "bias")
        V.check_float_input(bias, "bias")
        if V.shape_of(bias) != ws[:1]:
            raise ValueError(f"`bias` must have shape (C,) = {ws[:1]}; received shape {V.shape_of(bias)}.")
    opts = dict(temperature=V.check_temperature(temperature), label_smoothing=V.check_label_smoothing(label_smoothing),
                ignore_index=V.check_ignore_index(ignore_index), z_loss=V.check_z_loss(z_loss),
                reduction=V.check_reduction(reduction))
    return h, w, y, bias, opts, V.check_chunk_size(chunk_size)


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
    h, w, y, b, opts, chunk = _validate_linear(hidden, weight, labels, bias, temperature=temperature,
                                               label_smoothing=label_smoothing, ignore_index=ignore_index,
                                               z_loss=z_loss, reduction=reduction, chunk_size=chunk_size)
    kind = _dispatch.framework_of(h)
    if kind == "torch":
        name = _dispatch.resolve_torch(backend, h)
        if name == "jax":
            raise TypeError("the 'jax' backend takes jax or NumPy arrays; `hidden` is a torch.Tensor. Use "
                            "backend='numba' (CPU) or 'triton' (CUDA) for torch tensors.")
        from . import _torch_linear
        return _torch_linear.linear_cross_entropy(h, w, y, b, opts, name, chunk)
    if kind == "jax" or any(V._is_tracer(v) for v in opts.values()) or _dispatch.explicit(backend) == "jax":
        choice = _dispatch.explicit(backend)
        if choice in (None, "jax", "numba"):
            from . import _jax_linear
            return _jax_linear.linear_cross_entropy(h, w, y, b, opts, choice, chunk)
    name = _dispatch.resolve(backend, h)
    if name == "numba":
        from . import _numba
        return _numba.linear_cross_entropy(h, w, y, b, opts, chunk)
    if name == "jax":  # NumPy input where Numba is missing: the automatic fallback
        from . import _jax_linear
        return _jax_linear.linear_cross_entropy(h, w, y, b, opts, "jax", chunk)
    from . import _triton
    _triton.check_device(h, w)  # NumPy input: a TypeError saying what the backend takes
    raise AssertionError("unreachable: check_device raises for non-torch input")


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
    x, other, opts = _validate_sparse(logits, labels, temperature=temperature, label_smoothing=label_smoothing,
                                      ignore_index=ignore_index, z_loss=z_loss, reduction=reduction)
    name = _dispatch.resolve(backend, x)
    if name != "triton":
        raise ValueError(f"`backend` must be 'triton' for the in-place variant (torch tensors); received {name!r}.")
    from . import _triton
    return _triton.sparse_inplace(x, other, opts)
