"""pytest-benchmark suite for linear_cross_entropy: the loss of ``hidden @ weight.T`` and its gradients
to hidden and weight (a language model's output head in training), time and peak extra memory,
against the unfused pair (the framework's matmul + fastloss's fused CE), stock Keras (JAX backend:
``SparseCategoricalCrossentropy`` on the logits, autodiff), torch ``F.linear_cross_entropy`` and
``F.linear`` + ``F.cross_entropy``.

    pytest bench/test_linear_ce.py --benchmark-only   # 8192x1024x32000 fp32, 4096x2048x128256 bf16
                                                      # (+ GPU cases on CUDA)

These steps are compute-bound (three N x H x C matmuls: 1.6 TFLOP at 8192x1024x32000), so the
report gives time and peak memory, not a bandwidth floor. cut-cross-entropy is not measured: it
runs on CUDA only (Triton kernels) and is not installed here.
"""
from __future__ import annotations

import ctypes
import gc
import math
import os

import numpy as np
import pytest

from .cases import peak_extra_mib

PROVIDERS = ("fastloss-torch", "fastloss-jax", "unfused-torch", "unfused-jax", "keras-stock-jax", "torch-linear-ce",
             "torch-eager")


class Skip(Exception):
    pass


def _cases():
    """(N, H, C), dtype, gpu_only."""
    mode = os.environ.get("FASTLOSS_BENCH", "full")
    if mode == "tiny":
        return [((64, 32, 1000), "float32", False)]
    if mode == "quick":
        return []  # minutes per case: the full report only
    return [((8192, 1024, 32000), "float32", False), ((4096, 2048, 128256), "bfloat16", False),
            ((8192, 4096, 128256), "bfloat16", True)]


def _rounds():
    return 1 if os.environ.get("FASTLOSS_BENCH") == "tiny" else 3


_DATA = {}


def data(shape):
    if shape not in _DATA:
        _DATA.clear()
        n, hdim, c = shape
        rng = np.random.default_rng(0)
        h = rng.standard_normal((n, hdim), dtype=np.float32)
        w = rng.standard_normal((c, hdim), dtype=np.float32) / np.sqrt(hdim) * 2
        y = rng.integers(0, c, size=n)
        _DATA[shape] = (h, w, y)
    return _DATA[shape]


_REF = {}


def reference(shape, dtype):
    """The float64 loss of the inputs rounded to ``dtype`` (chunked: (N, C) float64 is 2 GiB)."""
    if (shape, dtype) not in _REF:
        from tests.support import reference as R
        from tests.support.harness import rounded
        h, w, y = data(shape)
        hr, wr = rounded(h, dtype), rounded(w, dtype)
        total = 0.0
        for lo in range(0, shape[0], 256):
            total += R.sparse_softmax_cross_entropy(hr[lo:lo + 256] @ wr.T, y[lo:lo + 256], reduction="sum")[0]
        _REF[(shape, dtype)] = total / shape[0]
    return _REF[(shape, dtype)]


def _keras_stock(h, w, y):
    import keras
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, h @ w.T)


def make_step(provider, shape, dtype):
    import fastloss
    h, w, y = data(shape)
    if provider in ("fastloss-jax", "unfused-jax", "keras-stock-jax"):
        import jax
        import jax.numpy as jnp
        if provider == "keras-stock-jax":
            import keras
            if keras.backend.backend() != "jax":
                raise Skip("stock Keras runs here with KERAS_BACKEND=jax")
        fn = {"fastloss-jax": lambda a, b, c: fastloss.linear_cross_entropy(a, b, c),
              "unfused-jax": lambda a, b, c: fastloss.sparse_softmax_cross_entropy(a @ b.T, c),
              "keras-stock-jax": _keras_stock}[provider]
        jdt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
        hj, wj, yj = jnp.asarray(h, jdt), jnp.asarray(w, jdt), jnp.asarray(y, jnp.int32)
        step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))

        def run():
            value, (gh, gw) = step(hj, wj, yj)
            gw.block_until_ready()
            return float(value)

        def peak():
            # XLA's own accounting of the compiled step: its temporaries and its outputs (the
            # gradients). Resident memory cannot tell: the allocator keeps freed pages between steps.
            ma = step.lower(hj, wj, yj).compile().memory_analysis()
            return (ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes) / 2 ** 20
        return run, peak
    import torch
    import torch.nn.functional as F
    tdt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ht = torch.tensor(h, device=dev).to(tdt).requires_grad_(True)
    wt = torch.tensor(w, device=dev).to(tdt).requires_grad_(True)
    yt = torch.tensor(y, device=dev)
    fn = {"fastloss-torch": lambda a, b, c: fastloss.linear_cross_entropy(a, b, c),
          "unfused-torch": lambda a, b, c: fastloss.sparse_softmax_cross_entropy(a @ b.T, c),
          "torch-linear-ce": lambda a, b, c: F.linear_cross_entropy(a, b, c),
          "torch-eager": lambda a, b, c: F.cross_entropy(F.linear(a, b).float(), c)}[provider]

    def run():
        ht.grad = wt.grad = None
        out = fn(ht, wt, yt)
        out.backward()
        if dev == "cuda":
            torch.cuda.synchronize()
        return float(out.detach())

    def peak():
        # The whole step's extra memory, gradients included: the previous step's gradients are
        # dropped and the allocator's free pages handed back to the system before measuring.
        ht.grad = wt.grad = None
        gc.collect()
        if dev == "cpu":
            _trim()
        return peak_extra_mib(run, dev)
    return run, peak


def _trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: resident memory may then under-count
        pass


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", _cases(), ids=lambda c: f"linear-ce-{'x'.join(map(str, c[0]))}-{c[1]}")
def test_linear_cross_entropy_loss_and_grads(benchmark, case, provider):
    shape, dtype, gpu_only = case
    import importlib.util
    on_gpu = importlib.util.find_spec("torch") is not None and __import__("torch").cuda.is_available()
    if gpu_only and not on_gpu:
        pytest.skip("GPU case: no CUDA device here")
    try:
        step, peak_mib = make_step(provider, shape, dtype)
    except Skip as why:
        pytest.skip(str(why))
    benchmark.group = f"linear-ce-{'x'.join(map(str, shape))}-{dtype}"
    value = step()  # compile / warm up outside the timing
    peak = peak_mib()
    benchmark.pedantic(step, rounds=_rounds(), iterations=1)
    ref = reference(shape, dtype)
    rel = abs(value - ref) / max(abs(ref), 1e-30)
    n, hdim, c = shape
    tol = 2e-2 if dtype == "bfloat16" else 1e-4
    benchmark.extra_info.update(kind="linear-ce", provider=provider, case=benchmark.group, shape=list(shape),
                                dtype=dtype, flop=6 * n * hdim * c, value=value, reference=ref, rel_err=rel,
                                peak_extra_mib=peak, correct=bool(math.isfinite(value) and rel <= tol))
    assert math.isfinite(value) and rel <= tol, f"{provider}: {value} vs {ref}"
