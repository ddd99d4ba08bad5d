"""pytest-benchmark suite: loss + gradient for every (case, provider).

    pytest bench/ --benchmark-only                      # full CPU suite (groups: loss and shape)
    FASTLOSS_BENCH=quick pytest bench/ --benchmark-only  # the report's quick subset
    pytest bench/ --benchmark-disable                    # every benchmark once: a smoke test

Each result's extra_info carries the bytes the case must move, the copy bandwidth measured in
this run, the loss value and its float64 reference (so a wrong fast number is visible).
"""
from __future__ import annotations

import math

import pytest

from .cases import copy_bandwidth, device_copy_bandwidth, peak_extra_mib, reference_loss, rounds, selected_cases
from .providers import PROVIDERS, Skip, make_step

GPU_PROVIDERS = ("torch-compile", "liger")
TORCH_GPU_PROVIDERS = ("fastloss-triton", "torch", "keras-stock-torch", "torch-compile", "liger")

_BW = {}


def _bandwidth(case):
    # Measured once per case, when its first provider runs, rather than once per process: this VM
    # moves between fast and slow phases within minutes, and a floor measured minutes away from the
    # kernels it is compared with moved their "% of floor" by up to 1.5x (in both directions). GPU
    # cases: the device's own copy bandwidth.
    if case.id not in _BW:
        _BW[case.id] = device_copy_bandwidth() if case.gpu_only else copy_bandwidth()
    return _BW[case.id]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", selected_cases(), ids=lambda c: c.id)
def test_loss_and_grad(benchmark, case, provider):
    try:
        step = make_step(provider, case)
    except Skip as why:
        pytest.skip(str(why))
    benchmark.group = case.id
    bandwidth = _bandwidth(case)
    # A step with a ``setup`` (the JAX providers: fresh donated logits) gets its arguments from it,
    # made outside the timed call.
    setup = getattr(step, "setup", None)
    call = (lambda: step(*setup())) if setup else step
    value = call()  # compile / warm up outside the timing
    args = setup() if setup else ()
    peak = peak_extra_mib(lambda: step(*args), "cuda" if (case.gpu_only and provider in TORCH_GPU_PROVIDERS)
                          or provider in GPU_PROVIDERS else "jax-gpu" if case.gpu_only else "cpu")
    benchmark.pedantic(step, setup=(lambda: (setup(), {})) if setup else None, rounds=rounds(case), iterations=1,
                       warmup_rounds=1)
    ref = reference_loss(case)
    rel = abs(value - ref) / max(abs(ref), 1e-30)
    tol = 2e-2 if case.dtype in ("bfloat16", "float16") else 1e-4
    benchmark.extra_info.update(
        provider=provider, case=case.id, loss=case.loss, variant=case.variant, shape=list(case.shape),
        dtype=case.dtype,
        bytes=case.bytes_moved, copy_bw=bandwidth, value=value, reference=ref, rel_err=rel,
        correct=bool(math.isfinite(value) and rel <= tol), peak_extra_mib=peak)
    assert math.isfinite(value) and rel <= tol, f"{provider} {case.id}: loss {value} vs float64 {ref}"
