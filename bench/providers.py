"""Providers: one setup factory per (provider, case) returning ``step() -> loss`` that computes the
loss and the gradient to the logits, and blocks until both are ready.

fastloss-jax / fastloss-numba / fastloss-triton: this project. keras-stock-jax / keras-stock-torch:
``keras.losses`` under that Keras backend (KERAS_BACKEND must name it: a process holds one Keras
backend). jax-autodiff: ``logsumexp - take_along_axis`` through ``jax.value_and_grad``. optax:
its integer-label / sigmoid / l2 losses. torch: ``torch.nn.functional`` with autograd.
"""
from __future__ import annotations

import os

import numpy as np

from .cases import DENSE, ELEMENTWISE, FOCAL, HUBER, LABELED, MSE, SIGMOID, SOFTCAP, SOFTMAX_FOCAL, SPARSE, data

PROVIDERS = ("fastloss-numba", "fastloss-jax", "fastloss-triton", "keras-stock-jax", "keras-stock-torch",
             "jax-autodiff", "optax", "torch", "torch-compile", "liger")


class Skip(Exception):
    """The provider cannot run this case here; the message says why."""


def _need_keras(backend):
    current = os.environ.get("KERAS_BACKEND")
    if current != backend:
        raise Skip(f"keras-stock-{backend} needs KERAS_BACKEND={backend} in this process (it is {current!r})")


def _jax_inputs(case):
    import jax.numpy as jnp
    x, other = data(case)
    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[case.dtype]
    xj = jnp.asarray(x).astype(dt)
    oj = jnp.asarray(other) if case.loss in LABELED else jnp.asarray(other).astype(dt)
    return xj, oj


def _jax_step(fn, xj, oj):
    """``jit(value_and_grad)`` with the logits donated, for every JAX provider alike: in a training
    loop the logits are an intermediate that is dead once the loss has read them, and donating them
    here gives XLA the same freedom (reuse their memory for the gradient) in an isolated step. Each
    round gets a fresh copy of the logits from ``step.setup``, outside the timing."""
    import jax
    import jax.numpy as jnp
    vg = jax.jit(jax.value_and_grad(fn), donate_argnums=0)

    def step(xa):
        loss, g = vg(xa, oj)
        g.block_until_ready()
        return float(loss)

    step.setup = lambda: (jnp.array(xj, copy=True).block_until_ready(),)
    return step


def _fastloss_jax(case):
    import fastloss
    fn = getattr(fastloss, case.loss)
    opts = case.options()
    return _jax_step(lambda a, b: fn(a, b, **opts), *_jax_inputs(case))


def _jax_autodiff(case):
    import jax
    import jax.numpy as jnp

    def sparse_rows(z, b):
        return jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, b[..., None], axis=-1)[..., 0]

    w = jnp.asarray(case.options().get("weight", np.ones(1, np.float32)))

    def sparse(a, b):
        z = a.astype(jnp.float32)
        if case.variant == "softcap":
            return jnp.mean(sparse_rows(SOFTCAP * jnp.tanh(z / SOFTCAP), b))
        if case.variant == "weighted":  # torch's weighted mean
            return jnp.sum(w[b] * sparse_rows(z, b)) / jnp.sum(w[b])
        return jnp.mean(sparse_rows(z, b))

    def dense(a, b):
        return jnp.mean(-jnp.sum(b * jax.nn.log_softmax(a.astype(jnp.float32), axis=-1), axis=-1))

    def sigmoid(a, b):
        z = a.astype(jnp.float32)
        return jnp.mean(jnp.maximum(z, 0) - z * b + jnp.log1p(jnp.exp(-jnp.abs(z))))

    def mse(a, b):
        return jnp.mean(jnp.square(a.astype(jnp.float32) - b))

    def huber(a, b):
        e = jnp.abs(a.astype(jnp.float32) - b)
        return jnp.mean(jnp.where(e <= 1.0, 0.5 * e * e, e - 0.5))

    def focal(a, b):  # Keras' formula from logits (gamma 2), autodiffed
        z = a.astype(jnp.float32)
        p = jax.nn.sigmoid(z)
        bce = jnp.maximum(z, 0) - z * b + jnp.log1p(jnp.exp(-jnp.abs(z)))
        return jnp.mean((1 - (b * p + (1 - b) * (1 - p))) ** 2 * bce)

    def softmax_focal(a, b):  # Keras' formula from logits with labels (gamma 2, alpha 0.25), autodiffed
        lp = jnp.take_along_axis(jax.nn.log_softmax(a.astype(jnp.float32), axis=-1), b[..., None], axis=-1)
        return jnp.mean(0.25 * (1 - jnp.exp(lp)) ** 2 * -lp)

    fn = {SPARSE: sparse, DENSE: dense, SIGMOID: sigmoid, MSE: mse, HUBER: huber, FOCAL: focal,
          SOFTMAX_FOCAL: softmax_focal}[case.loss]
    return _jax_step(fn, *_jax_inputs(case))


def _optax(case):
    import jax.numpy as jnp
    import optax
    if case.loss == SOFTMAX_FOCAL:
        raise Skip("optax has no softmax focal loss")
    if case.variant == "softcap":  # optax has no softcap: the user caps the logits first
        return _jax_step(lambda a, b: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
            SOFTCAP * jnp.tanh(a.astype(jnp.float32) / SOFTCAP), b)), *_jax_inputs(case))
    if case.variant == "weighted":  # nor class weights: the user weighs the per-row losses
        wj = jnp.asarray(case.options()["weight"])
        return _jax_step(lambda a, b: jnp.sum(wj[b] * optax.softmax_cross_entropy_with_integer_labels(
            a.astype(jnp.float32), b)) / jnp.sum(wj[b]), *_jax_inputs(case))
    fns = {
        SPARSE: lambda a, b: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(a.astype(jnp.float32), b)),
        DENSE: lambda a, b: jnp.mean(optax.softmax_cross_entropy(a.astype(jnp.float32), b)),
        SIGMOID: lambda a, b: jnp.mean(optax.sigmoid_binary_cross_entropy(a.astype(jnp.float32), b)),
        MSE: lambda a, b: 2 * jnp.mean(optax.l2_loss(a.astype(jnp.float32), b)),  # l2_loss is half the square
        HUBER: lambda a, b: jnp.mean(optax.huber_loss(a.astype(jnp.float32), b)),
        FOCAL: lambda a, b: jnp.mean(optax.sigmoid_focal_loss(a.astype(jnp.float32), b)),
    }
    return _jax_step(fns[case.loss], *_jax_inputs(case))


def _keras_fn(case):
    import keras
    if case.variant:
        raise Skip("Keras' SparseCategoricalCrossentropy has no class weights (fit's class_weight scales "
                   "samples, with another mean) and no softcap")
    return {
        SPARSE: keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        DENSE: keras.losses.CategoricalCrossentropy(from_logits=True),
        SIGMOID: keras.losses.BinaryCrossentropy(from_logits=True),
        MSE: keras.losses.MeanSquaredError(),
        HUBER: keras.losses.Huber(),
        FOCAL: keras.losses.BinaryFocalCrossentropy(from_logits=True),
        SOFTMAX_FOCAL: keras.losses.CategoricalFocalCrossentropy(from_logits=True),
    }[case.loss]


def _keras_stock_jax(case):
    _need_keras("jax")
    loss = _keras_fn(case)
    xj, oj = _jax_inputs(case)
    if case.loss in ELEMENTWISE:  # keras reduces over the last axis first: give it rows
        xj, oj = xj.reshape(-1, 1024), oj.reshape(-1, 1024)
    if case.loss == SOFTMAX_FOCAL:  # Keras' class takes one-hot targets (made outside the step)
        import jax
        oj = jax.nn.one_hot(oj, xj.shape[-1], dtype=xj.dtype)
    return _jax_step(lambda a, b: loss(b, a), xj, oj)


def _torch_inputs(case, device="cpu"):
    import torch
    x, other = data(case)
    dt = getattr(torch, case.dtype)
    xt = torch.from_numpy(x).to(device=device, dtype=dt).requires_grad_()
    ot = torch.from_numpy(other).to(device) if case.loss in LABELED else torch.from_numpy(other).to(device, dt)
    return xt, ot


def _torch_step(fn, xt, ot):
    import torch

    def step():
        xt.grad = None
        loss = fn(xt, ot)
        loss.backward()
        if xt.device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())
    return step


def _device():
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch(case):
    import torch
    import torch.nn.functional as F
    if case.variant == "softcap":  # torch has no softcap option: cap the logits, then cross_entropy
        return _torch_step(lambda a, b: F.cross_entropy(SOFTCAP * torch.tanh(a.flatten(0, -2) / SOFTCAP),
                                                        b.flatten()), *_torch_inputs(case, _device()))
    if case.variant == "weighted":
        wt = torch.from_numpy(case.options()["weight"]).to(_device())
        return _torch_step(lambda a, b: F.cross_entropy(a.flatten(0, -2), b.flatten(), weight=wt),
                           *_torch_inputs(case, _device()))
    fns = {
        SPARSE: lambda a, b: F.cross_entropy(a.flatten(0, -2), b.flatten()),
        DENSE: lambda a, b: F.cross_entropy(a.flatten(0, -2), b.flatten(0, -2)),
        SIGMOID: F.binary_cross_entropy_with_logits,
        MSE: F.mse_loss,
        HUBER: F.huber_loss,
        FOCAL: _torch_focal,
        SOFTMAX_FOCAL: _torch_softmax_focal,
    }
    return _torch_step(fns[case.loss], *_torch_inputs(case, _device()))


def _torch_focal(a, b):
    """torchvision.ops.sigmoid_focal_loss's formula (gamma 2, no alpha), inlined: torchvision's wheel
    does not load beside this torch build (docs/performance.md)."""
    import torch
    import torch.nn.functional as F
    p = torch.sigmoid(a)
    ce = F.binary_cross_entropy_with_logits(a, b, reduction="none")
    return (ce * (1 - (p * b + (1 - p) * (1 - b))) ** 2).mean()


def _torch_softmax_focal(a, b):
    """The softmax focal loss by hand (torch has none): gamma 2, alpha 0.25, labels."""
    import torch
    lp = torch.log_softmax(a.flatten(0, -2), -1).gather(-1, b.flatten()[:, None])
    return (0.25 * (1 - lp.exp()) ** 2 * -lp).mean()


def _torch_compile(case):
    import torch
    import torch.nn.functional as F
    if _device() != "cuda":
        raise Skip("torch-compile is a GPU peer (on CPU it only measures Inductor's C++ codegen)")
    if case.loss != SPARSE:
        raise Skip("torch-compile is measured on sparse cross-entropy")
    fn = torch.compile(lambda a, b: F.cross_entropy(a.flatten(0, -2).float(), b.flatten()))
    return _torch_step(fn, *_torch_inputs(case, "cuda"))


def _liger(case):
    if case.loss != SPARSE:
        raise Skip("liger is measured on sparse cross-entropy")
    if _device() != "cuda":
        raise Skip("Liger-Kernel runs on CUDA only")
    from liger_kernel.transformers.functional import liger_cross_entropy
    return _torch_step(lambda a, b: liger_cross_entropy(a.flatten(0, -2), b.flatten()), *_torch_inputs(case, "cuda"))


def _keras_stock_torch(case):
    _need_keras("torch")
    loss = _keras_fn(case)
    xt, ot = _torch_inputs(case, _device())
    if case.loss in ELEMENTWISE:
        return _torch_step(lambda a, b: loss(b.reshape(-1, 1024), a.reshape(-1, 1024)), xt, ot)
    if case.loss == SOFTMAX_FOCAL:  # Keras' class takes one-hot targets (made outside the step)
        import torch
        ot = torch.nn.functional.one_hot(ot, xt.shape[-1]).to(xt.dtype)
    return _torch_step(lambda a, b: loss(b, a), xt, ot)


def _fastloss_numba(case):
    import fastloss
    if case.dtype == "bfloat16":  # torch CPU tensors: the zero-copy autograd path
        fn = getattr(fastloss, case.loss)
        return _torch_step(lambda a, b: fn(a, b, backend="numba"), *_torch_inputs(case, "cpu"))
    x, other = data(case)
    vg = fastloss.value_and_grad(getattr(fastloss, case.loss))
    opts = case.options()
    return lambda: float(vg(x, other, backend="numba", **opts)[0])


def _fastloss_triton(case):
    import fastloss
    reason = fastloss.available_backends()["triton"]
    if reason is not None:
        raise Skip(f"fastloss-triton: {reason}")
    device = _device()
    if device == "cpu" and int(np.prod(case.shape)) > 1 << 16:
        raise Skip("fastloss-triton on the interpreter runs only the tiny harness cases (FASTLOSS_BENCH=tiny)")
    fn = getattr(fastloss, case.loss)
    opts = case.options()
    if "weight" in opts:
        import torch
        opts["weight"] = torch.from_numpy(opts["weight"]).to(device)
    return _torch_step(lambda a, b: fn(a, b, backend="triton", **opts), *_torch_inputs(case, device))


_FACTORIES = {
    "fastloss-numba": _fastloss_numba, "fastloss-jax": _fastloss_jax, "fastloss-triton": _fastloss_triton,
    "keras-stock-jax": _keras_stock_jax, "keras-stock-torch": _keras_stock_torch,
    "jax-autodiff": _jax_autodiff, "optax": _optax, "torch": _torch, "torch-compile": _torch_compile,
    "liger": _liger,
}


JAX_PROVIDERS = ("fastloss-jax", "jax-autodiff", "optax", "keras-stock-jax")


def _check_gpu(provider, case):
    """GPU cases run the jax providers on jax's GPU and the torch providers on CUDA tensors; each
    skips, saying why, where its framework sees no GPU."""
    if provider in JAX_PROVIDERS:
        try:
            import jax
            has_gpu = jax.default_backend() == "gpu"
        except ImportError:
            has_gpu = False
        if not has_gpu:
            raise Skip(f"{case.id} is a GPU case and jax sees no GPU")
        return
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        raise Skip(f"{case.id} is a GPU case and no CUDA device is visible")
    if provider == "fastloss-numba":
        raise Skip("fastloss-numba does not run CUDA tensors")


def make_step(provider, case):
    """The provider's ``step`` for ``case``, or raise Skip (missing package, wrong Keras backend, ...)."""
    if case.gpu_only:
        _check_gpu(provider, case)
    elif case.dtype == "bfloat16" and provider in JAX_PROVIDERS:
        raise Skip("bf16 CPU cases compare the torch-tensor paths")
    try:
        return _FACTORIES[provider](case)
    except ImportError as exc:
        raise Skip(f"{provider} needs {exc.name}, which is not installed") from exc
