"""pytest-benchmark suite for distillation_loss: loss + gradient to the student logits, with hard labels
(α = 0.5, T = 3, forward KL), against stock Keras ``LogitsDistillation`` + ``SparseCategoricalCrossentropy``
(JAX backend), a plain JAX autodiff formulation and torch ``F.kl_div`` + ``F.cross_entropy``.

    pytest bench/test_distillation.py --benchmark-only      # 4096x32000 fp32 (+ 8192x128256 bf16 on a GPU)

The floor is two reads (student, teacher) and one write (the student's gradient) at the copy
bandwidth measured in the same run; extra_info carries it with the loss and its float64 reference.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest

from .cases import copy_bandwidth, peak_extra_mib, rounds

TEMP, ALPHA = 3.0, 0.5
PROVIDERS = ("fastloss-numba", "fastloss-jax", "fastloss-torch", "jax-autodiff", "keras-stock-jax", "torch-eager")


class Skip(Exception):
    pass


def _cases():
    mode = os.environ.get("FASTLOSS_BENCH", "full")
    if mode == "tiny":
        return [((64, 1000), "float32", False)]
    if mode == "quick":
        return [((4096, 32000), "float32", False)]
    return [((4096, 32000), "float32", False), ((8192, 128256), "bfloat16", True)]


_DATA = {}


def data(shape):
    if shape not in _DATA:
        _DATA.clear()
        rng = np.random.default_rng(0)
        s = rng.standard_normal(shape, dtype=np.float32) * 2
        t = rng.standard_normal(shape, dtype=np.float32) * 2
        y = rng.integers(0, shape[-1], size=shape[:-1])
        _DATA[shape] = (s, t, y)
    return _DATA[shape]


def reference(shape):
    from tests.support import reference as R
    s, t, y = data(shape)
    total = 0.0
    for lo in range(0, shape[0], 256):  # chunked: the reference holds several float64 (N, C) arrays
        total += R.distillation_loss(s[lo:lo + 256], t[lo:lo + 256], y[lo:lo + 256], temperature=TEMP, alpha=ALPHA,
                                     reduction="sum")[0]
    return total / shape[0]


def _jax_plain(s, t, y):
    """What a careful JAX user writes: log-softmaxes, KL and CE, then autodiff."""
    import jax
    import jax.numpy as jnp
    ls, lt = jax.nn.log_softmax(s / TEMP), jax.nn.log_softmax(t / TEMP)
    kl = jnp.sum(jnp.exp(lt) * (lt - ls), -1)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(s), y[:, None], -1)[:, 0]
    return jnp.mean(ALPHA * TEMP ** 2 * kl + (1 - ALPHA) * ce)


def _keras_stock(s, t, y):
    import keras
    kd = keras.distillation.LogitsDistillation(temperature=TEMP, loss=keras.losses.KLDivergence())
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return ALPHA * kd.compute_loss(t, s) + (1 - ALPHA) * ce(y, s)


def make_step(provider, shape, dtype):
    s, t, y = data(shape)
    import fastloss
    if provider == "fastloss-numba":
        if dtype != "float32":
            raise Skip("NumPy has no bfloat16 input path in this suite")
        vg = fastloss.value_and_grad(fastloss.distillation_loss)
        return lambda: float(vg(s, t, y, temperature=TEMP, alpha=ALPHA)[0]), None
    if provider in ("fastloss-jax", "jax-autodiff", "keras-stock-jax"):
        import jax
        import jax.numpy as jnp
        if provider == "keras-stock-jax":
            import keras
            if keras.backend.backend() != "jax":
                raise Skip("stock Keras runs here with KERAS_BACKEND=jax")
        fn = {"fastloss-jax": lambda a, b, c: fastloss.distillation_loss(a, b, c, temperature=TEMP, alpha=ALPHA),
              "jax-autodiff": _jax_plain, "keras-stock-jax": _keras_stock}[provider]
        jdt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
        sj0, tj, yj = jnp.asarray(s, jdt), jnp.asarray(t, jdt), jnp.asarray(y, jnp.int32)
        # The student logits are a dead intermediate in a training step: donated, a fresh copy per round.
        step = jax.jit(jax.value_and_grad(fn), donate_argnums=0)

        def run(sj):
            value, g = step(sj, tj, yj)
            g.block_until_ready()
            return float(value)
        # ready before the timing starts (an asynchronous copy would be timed with the step)
        return run, lambda: (jnp.array(sj0, copy=True).block_until_ready(),)
    import torch
    import torch.nn.functional as F
    tdt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    st = torch.tensor(s, device=dev).to(tdt).requires_grad_(True)
    tt, yt = torch.tensor(t, device=dev).to(tdt), torch.tensor(y, device=dev)

    def torch_eager(a, b, c):
        kl = F.kl_div(F.log_softmax(a.float() / TEMP, -1), F.log_softmax(b.float() / TEMP, -1), reduction="batchmean",
                      log_target=True)
        return ALPHA * TEMP ** 2 * kl + (1 - ALPHA) * F.cross_entropy(a.float(), c)
    fn = torch_eager if provider == "torch-eager" else (
        lambda a, b, c: fastloss.distillation_loss(a, b, c, temperature=TEMP, alpha=ALPHA))

    def run():
        st.grad = None
        out = fn(st, tt, yt)
        out.backward()
        if dev == "cuda":
            torch.cuda.synchronize()
        return float(out)
    return run, None


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", _cases(), ids=lambda c: f"distill-{'x'.join(map(str, c[0]))}-{c[1]}")
def test_distillation_loss_and_grad(benchmark, case, provider):
    shape, dtype, gpu_only = case
    if gpu_only:
        import importlib.util
        if importlib.util.find_spec("torch") is None or not __import__("torch").cuda.is_available():
            pytest.skip("GPU case: no CUDA device here")
    try:
        step, setup = make_step(provider, shape, dtype)
    except Skip as why:
        pytest.skip(str(why))
    benchmark.group = f"distill-{'x'.join(map(str, shape))}-{dtype}"
    bandwidth = copy_bandwidth()
    call = (lambda: step(*setup())) if setup else step
    value = call()  # compile / warm up outside the timing
    args = setup() if setup else ()
    peak = peak_extra_mib(lambda: step(*args))
    benchmark.pedantic(step, setup=(lambda: (setup(), {})) if setup else None, rounds=rounds(), iterations=1,
                       warmup_rounds=1)
    ref = reference(shape)
    rel = abs(value - ref) / max(abs(ref), 1e-30)
    itemsize = 2 if dtype == "bfloat16" else 4
    nbytes = 3 * int(np.prod(shape)) * itemsize
    benchmark.extra_info.update(provider=provider, case=benchmark.group, loss="distillation_loss", shape=list(shape),
                                dtype=dtype, bytes=nbytes, copy_bw=bandwidth, value=value, reference=ref, rel_err=rel,
                                peak_extra_mib=peak,
                                correct=bool(math.isfinite(value) and rel <= (2e-2 if itemsize == 2 else 1e-4)))
    assert math.isfinite(value) and rel <= (2e-2 if itemsize == 2 else 1e-4), f"{provider}: {value} vs {ref}"
