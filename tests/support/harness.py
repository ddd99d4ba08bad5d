"""One driver per (backend, input framework), so every contract test runs on every backend.

A harness turns float64 NumPy test data into the backend's input type at a given dtype, runs a loss
with fastloss's public API, and returns the loss and the gradients as float64 NumPy arrays together
with their dtypes. Nothing here probes a device at import time; frameworks are imported on first use.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

import fastloss

DTYPES = ("float16", "bfloat16", "float32", "float64")
PALLAS_LOSSES = ("sparse_softmax_cross_entropy", "softmax_cross_entropy")  # the losses with Pallas kernels
FLOAT_SECOND = {"softmax_cross_entropy", "sigmoid_cross_entropy", "mean_squared_error", "huber", "sigmoid_focal_loss"}


def float_second(loss, other):
    """Whether ``other`` is float data (targets) rather than integer labels: by the loss, or by the
    array for the softmax focal loss, which takes either."""
    return loss in FLOAT_SECOND or (loss == "softmax_focal_loss" and np.asarray(other).dtype.kind == "f")


def np_dtype(name):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def rounded(a, dtype):
    """What the kernel actually sees: ``a`` rounded to ``dtype``, as float64 (for the reference)."""
    return np.asarray(a).astype(np_dtype(dtype)).astype(np.float64)


@dataclasses.dataclass
class Result:
    loss: np.ndarray
    loss_dtype: str
    grad_x: np.ndarray | None = None
    grad_x_dtype: str | None = None
    grad_other: np.ndarray | None = None
    grad_other_dtype: str | None = None


def _f64(a):
    return np.asarray(a, dtype=np.float64)


class JaxHarness:
    """jax arrays; ``backend`` "jax" (the XLA formulation, eagerly), "numba" (the Numba kernels
    through the XLA FFI) or "triton" (the Pallas kernels: interpret mode on CPU, with
    TRITON_INTERPRET=1), the latter two called inside ``jax.jit`` as a training loop calls them."""
    grads_for_none = True     # can take a vjp of per-row losses
    grads_for_other = True    # gradient to float targets
    max_elements = None
    losses = None             # None: every loss

    def __init__(self, backend="jax"):
        self.backend = backend
        self.name = {"jax": "jax", "numba": "numba-jax", "triton": "pallas-jax"}[backend]
        self.traced = backend != "jax"  # labels are tracers: out-of-range ones give NaN, cannot raise
        if backend == "triton":
            self.losses = PALLAS_LOSSES
            # The interpreter runs a grid of programs as a loop: ~20 ms per 1e5 elements.
            self.max_elements = None if os.environ.get("FASTLOSS_TEST_DEVICE") == "cuda" else 300_000

    def _ctx(self, dtype):
        import contextlib
        import jax
        return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()

    def run(self, loss, x, other, dtype, opts, cot=None, grads=True):
        import jax
        import jax.numpy as jnp
        fn = getattr(fastloss, loss)
        with self._ctx(dtype):
            xj = jnp.asarray(np.asarray(x).astype(np_dtype(dtype)))
            if float_second(loss, other):
                oj = jnp.asarray(np.asarray(other).astype(np_dtype(dtype)))
            else:
                oj = jnp.asarray(other)
            opts = dict(opts, backend=self.backend)
            argnums = (0, 1) if float_second(loss, other) else (0,)

            def objective(a, b):
                val = fn(a, b, **opts)
                obj = jnp.sum(val * jnp.asarray(cot, val.dtype)) if opts.get("reduction") == "none" else val
                return obj, val

            if not self.traced:  # eagerly, as a user outside jit: the loss, then its gradient
                out = fn(xj, oj, **opts)
                g = jax.grad(lambda a, b: objective(a, b)[0], argnums=argnums)(xj, oj) if grads else None
            elif grads:
                # One program for the value and the gradient, as a training step compiles them: one
                # compile per test instead of two. The forward-only program (no gradient written)
                # is checked by the grads=False cases (test_forward_only_programs).
                (_, out), g = jax.jit(jax.value_and_grad(objective, argnums=argnums, has_aux=True))(xj, oj)
            else:
                out, g = jax.jit(lambda a, b: fn(a, b, **opts))(xj, oj), None
            res = Result(_f64(out), out.dtype.name)
            if not grads:
                return res
            res.grad_x, res.grad_x_dtype = _f64(g[0]), g[0].dtype.name
            if len(g) > 1:
                res.grad_other, res.grad_other_dtype = _f64(g[1]), g[1].dtype.name
            return res


class NumbaNumpyHarness:
    name = "numba"
    losses = None
    grads_for_none = False    # NumPy has no vjp: value_and_grad needs a scalar loss
    grads_for_other = False
    max_elements = None

    def run(self, loss, x, other, dtype, opts, cot=None, grads=True):
        fn = getattr(fastloss, loss)
        xn = np.asarray(x).astype(np_dtype(dtype))
        on = np.asarray(other).astype(np_dtype(dtype)) if float_second(loss, other) else np.asarray(other)
        x_before, o_before = xn.copy(), on.copy()
        out = fn(xn, on, backend="numba", **opts)
        res = Result(_f64(out), np.asarray(out).dtype.name)
        if grads and opts.get("reduction") != "none":
            val, g = fastloss.value_and_grad(fn)(xn, on, backend="numba", **opts)
            np.testing.assert_allclose(_f64(val), res.loss, rtol=1e-6)  # same kernel, with or without grad
            res.grad_x, res.grad_x_dtype = _f64(g), g.dtype.name
        # Inputs are never modified.
        np.testing.assert_array_equal(xn.view(np.uint8), x_before.view(np.uint8))
        np.testing.assert_array_equal(on.view(np.uint8), o_before.view(np.uint8))
        return res


class TorchHarness:
    """torch tensors through autograd; ``backend`` is "numba" (CPU) or "triton"."""
    losses = None
    grads_for_none = True
    grads_for_other = True

    def __init__(self, backend, device="cpu", max_elements=None):
        self.backend = backend
        self.name = f"{backend}-torch"
        self.device = device
        self.max_elements = max_elements

    def run(self, loss, x, other, dtype, opts, cot=None, grads=True):
        import torch
        tdt = getattr(torch, dtype)
        fn = getattr(fastloss, loss)
        xt = torch.tensor(np.asarray(x, dtype=np.float64), device=self.device).to(tdt)
        second = float_second(loss, other)
        if second:
            ot = torch.tensor(np.asarray(other, dtype=np.float64), device=self.device).to(tdt)
        else:
            ot = torch.tensor(np.asarray(other), device=self.device)
        x_before, o_before = xt.clone(), ot.clone()
        xt.requires_grad_(grads)
        if second:
            ot.requires_grad_(grads)
        out = fn(xt, ot, backend=self.backend, **opts)
        res = Result(_f64(out.detach().cpu().double()), str(out.dtype).replace("torch.", ""))
        if grads:
            obj = (out * torch.tensor(np.asarray(cot), dtype=out.dtype, device=out.device)).sum() \
                if opts.get("reduction") == "none" else out
            obj.backward()
            res.grad_x = _f64(xt.grad.cpu().double())
            res.grad_x_dtype = str(xt.grad.dtype).replace("torch.", "")
            if second:
                res.grad_other = _f64(ot.grad.cpu().double())
                res.grad_other_dtype = str(ot.grad.dtype).replace("torch.", "")
        for now, before in ((xt.detach(), x_before), (ot.detach(), o_before)):  # inputs never modified
            assert torch.equal(now.isnan(), before.isnan()) if now.is_floating_point() else True
            assert torch.equal(now.nan_to_num(0.0), before.nan_to_num(0.0)) if now.is_floating_point() \
                else torch.equal(now, before), "input modified"
        return res


def make(name):
    if name == "jax":
        return JaxHarness()
    if name == "numba-jax":
        return JaxHarness("numba")
    if name == "pallas-jax":
        return JaxHarness("triton")
    if name == "numba":
        return NumbaNumpyHarness()
    if name == "numba-torch":
        return TorchHarness("numba")
    if name == "triton":
        # Under TRITON_INTERPRET=1 on CPU; FASTLOSS_TEST_DEVICE=cuda runs the same tests on a GPU.
        device = os.environ.get("FASTLOSS_TEST_DEVICE", "cpu")
        return TorchHarness("triton", device=device, max_elements=None if device == "cuda" else 300_000)
    raise KeyError(name)


# Per-dtype tolerances (relative to the reference's magnitude). The loss is accumulated in fp32 for
# every 16/32-bit input, so its tolerance does not depend on the input dtype; a gradient is stored in
# the input's dtype, so its tolerance is a few ulps of that dtype.
LOSS_RTOL = {"float64": 1e-11, "float32": 2e-5, "bfloat16": 2e-5, "float16": 2e-5}
GRAD_RTOL = {"float64": 1e-11, "float32": 2e-5, "bfloat16": 1.6e-2, "float16": 2e-3}
# Half the smallest subnormal of the stored gradient's dtype: values below it round to 0 on store.
GRAD_TINY = {"float64": 0.0, "float32": 0.0, "bfloat16": 0.0, "float16": 2.0 ** -25}
ACC_EPS = {"float64": 2.0 ** -52, "float32": 2.0 ** -23, "bfloat16": 2.0 ** -23, "float16": 2.0 ** -23}


def assert_close(actual, expected, rtol, atol, what):
    actual, expected = _f64(actual), _f64(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    assert np.array_equal(nan_a, nan_e), f"{what}: NaN pattern differs ({nan_a.sum()} vs {nan_e.sum()} NaNs)"
    inf_e = np.isinf(expected)
    assert np.array_equal(actual[inf_e], expected[inf_e]), f"{what}: infinities differ"
    ok = ~(nan_e | inf_e)
    err = np.abs(actual[ok] - expected[ok])
    bound = atol + rtol * np.abs(expected[ok])
    if err.size and not np.all(err <= bound):
        i = int(np.argmax(err - bound))
        raise AssertionError(f"{what}: max excess error at flat {i}: got {actual[ok][i]!r}, "
                             f"expected {expected[ok][i]!r} (|err|={err[i]:.3g}, bound={bound[i]:.3g})")


def require_backend(name):
    """Skip (or, with FASTLOSS_REQUIRE_ALL_BACKENDS set, as in CI, fail) unless the backend of a
    driver name such as "numba-torch" can run here."""
    import pytest
    from fastloss import _dispatch
    reason = _dispatch.unavailable_reason(name.split("-")[0])
    if reason is not None:
        if os.environ.get("FASTLOSS_REQUIRE_ALL_BACKENDS"):
            pytest.fail(f"backend {name} unavailable: {reason}")
        pytest.skip(reason)
