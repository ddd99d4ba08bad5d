"""Benchmark cases and the data/bytes model shared by the suites and the report.

Every measurement is loss + gradient to the logits (predictions). The floor for one case is the
bytes it must move at least (one read of each input, one write of the gradient) divided by this
machine's copy bandwidth, measured in the same run with ``np.copyto``.
"""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

SPARSE = "sparse_softmax_cross_entropy"
DENSE = "softmax_cross_entropy"
SIGMOID = "sigmoid_cross_entropy"
MSE = "mean_squared_error"
HUBER = "huber"
FOCAL = "sigmoid_focal_loss"
SOFTMAX_FOCAL = "softmax_focal_loss"  # with integer labels here (the drop-in's one-hot is a provider detail)
LABELED = (SPARSE, SOFTMAX_FOCAL)
ELEMENTWISE = (SIGMOID, MSE, HUBER, FOCAL)
SHORT = {SPARSE: "sparse-ce", DENSE: "dense-ce", SIGMOID: "sigmoid-ce", MSE: "mse", HUBER: "huber",
         FOCAL: "sigmoid-focal", SOFTMAX_FOCAL: "softmax-focal",
         "distillation_loss": "distill"}  # the last: bench/test_distillation.py


SOFTCAP = 30.0  # Gemma 2's final-logit cap


@dataclasses.dataclass(frozen=True)
class Case:
    loss: str
    shape: tuple
    dtype: str = "float32"
    gpu_only: bool = False
    variant: str = ""  # sparse CE: "weighted" (class weights) or "softcap"

    @property
    def id(self):
        name = SHORT[self.loss] + (f"-{self.variant}" if self.variant else "")
        return f"{name}-{'x'.join(map(str, self.shape))}-{self.dtype}"

    def options(self):
        """The loss's keyword options for this case: class weights (uniform in [0.5, 2), fixed
        seed) or the softcap; none for the plain case."""
        if self.variant == "weighted":
            return dict(weight=np.random.default_rng(7).uniform(0.5, 2.0, self.shape[-1]).astype(np.float32))
        if self.variant == "softcap":
            return dict(softcap=SOFTCAP)
        return {}

    @property
    def itemsize(self):
        return 8 if self.dtype == "float64" else 4 if self.dtype == "float32" else 2

    @property
    def bytes_moved(self):
        """Floor traffic: read x (and dense/elementwise targets), write d loss / d x."""
        n = int(np.prod(self.shape))
        reads = 1 if self.loss in LABELED else 2
        return (reads + 1) * n * self.itemsize


N24 = 1 << 24
# The shapes most users train (MNIST-like heads, a small vocabulary): where per-call overhead, not
# bandwidth, decides, and where fastloss must not be slower than the stock loss.
SMALL_CASES = [Case(SPARSE, (32, 10)), Case(SPARSE, (256, 10)), Case(SPARSE, (256, 1000))]
CPU_CASES = SMALL_CASES + [
    Case(SPARSE, (4096, 32000)),
    Case(SPARSE, (8, 262144)),
    Case(SPARSE, (65536, 10)),
    Case(SPARSE, (65536, 1000)),
    Case(SPARSE, (4096, 32000), "bfloat16"),
    Case(SPARSE, (4096, 32000), variant="weighted"),
    Case(SPARSE, (4096, 32000), variant="softcap"),
    Case(DENSE, (65536, 1000)),
    Case(MSE, (N24,)),
    Case(HUBER, (N24,)),
    Case(SIGMOID, (N24,)),
    Case(FOCAL, (N24,)),
    Case(SOFTMAX_FOCAL, (4096, 32000)),
]
GPU_CASES = [
    Case(SPARSE, (16384, 131072), gpu_only=True),
    Case(SPARSE, (8192, 128256), "bfloat16", gpu_only=True),
    Case(SPARSE, (4096, 32000), gpu_only=True),
]
QUICK_CASES = SMALL_CASES + [
    Case(SPARSE, (4096, 32000)), Case(SPARSE, (4096, 32000), variant="weighted"),
    Case(SPARSE, (4096, 32000), variant="softcap"), Case(SPARSE, (65536, 1000)), Case(MSE, (N24,)),
    Case(HUBER, (N24,)), Case(SIGMOID, (N24,)), Case(FOCAL, (N24,)), Case(SOFTMAX_FOCAL, (4096, 32000))]
TINY_CASES = [Case(SPARSE, (8, 1000)), Case(MSE, (4096,))]  # harness smoke runs (interpreter, CI)


@dataclasses.dataclass(frozen=True)
class Step:
    """A training step's model: ``features`` -> (Dense(hidden) + ReLU if hidden) -> Dense(classes), a
    softmax cross-entropy on integer labels, plain SGD. The same step is timed with the stock loss and
    with fastloss in every framework (bench/test_keras_fit.py, test_torch_step.py, test_optax_step.py)."""
    batch: int
    features: int
    hidden: int | None
    classes: int

    @property
    def shape(self):
        return (self.batch, self.classes)  # the logits' (what rounds() sizes the timing by)

    @property
    def id(self):
        body = f"mlp{self.features}-{self.hidden}" if self.hidden else f"dense{self.features}"
        return f"{body}-{self.classes}-b{self.batch}"

    def data(self):
        rng = np.random.default_rng(0)
        return (rng.standard_normal((self.batch, self.features)).astype(np.float32),
                rng.integers(0, self.classes, self.batch).astype(np.int32))


def steps():
    """The training steps of this run: the shapes most users train (an MNIST-like MLP at batch 32 and
    256), a 1000-class head and a 32000-class head. CI's smoke run (tiny) takes one small step."""
    mode = os.environ.get("FASTLOSS_BENCH", "full")
    if mode == "tiny":
        return [Step(32, 16, 8, 10)]
    big = Step(256 if mode == "quick" else 1024, 128, None, 32000)
    return [Step(32, 784, 128, 10), Step(256, 784, 128, 10), Step(256, 128, None, 1000), big]


def rounds(case=None):
    """Timed rounds per benchmark: 3 in the quick report (it must finish in minutes), else 5; a case
    of under a million elements takes microseconds and many more rounds (its noise is the VM's)."""
    base = 3 if os.environ.get("FASTLOSS_BENCH") == "quick" else 5
    if case is not None and int(np.prod(case.shape)) < 1_000_000:
        return base * 40
    return base


def selected_cases():
    """Cases for this run: FASTLOSS_BENCH=quick|tiny|gpu|full (default full: CPU cases, and the GPU
    cases, which skip with a message where no GPU is visible)."""
    mode = os.environ.get("FASTLOSS_BENCH", "full")
    if mode == "tiny":
        return TINY_CASES
    if mode == "quick":
        return QUICK_CASES
    if mode == "gpu":
        return GPU_CASES
    return CPU_CASES + GPU_CASES


_DATA = {}


def data(case, seed=0):
    """Float64-free NumPy inputs for a case (cached): logits/predictions and labels/targets."""
    key = (case, seed)
    if key not in _DATA:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal(case.shape, dtype=np.float32) * 2
        if case.loss in LABELED:
            other = rng.integers(0, case.shape[-1], size=case.shape[:-1])
        elif case.loss == DENSE:
            other = rng.random(case.shape, dtype=np.float32)
            other /= other.sum(-1, keepdims=True)
        else:
            other = rng.random(case.shape, dtype=np.float32)
        _DATA.clear()  # keep one case in memory at a time (4096x32000 alone is 0.5 GB)
        _DATA[key] = (x, other)
    return _DATA[key]


_REFERENCE = {}


def reference_loss(case):
    """The float64 reference loss (mean reduction) on the case's data, rounded to its dtype
    (computed once per case: at 4096x32000 it takes seconds)."""
    if case not in _REFERENCE:
        _REFERENCE[case] = _reference_loss(case)
    return _REFERENCE[case]


def _reference_loss(case):
    if case.gpu_only and case.loss == SPARSE and not case.variant:
        return _reference_on_gpu(case)
    from tests.support import reference as R
    from tests.support.harness import rounded
    x, other = data(case)
    xr = rounded(x, case.dtype)
    o = rounded(other, case.dtype) if case.loss not in LABELED else other
    if case.loss in LABELED:  # chunked: the naive reference holds several (N, C) float64 arrays
        total = 0.0
        opts = case.options()
        for lo in range(0, xr.shape[0], 512):
            total += R.LOSSES[case.loss](xr[lo:lo + 512], o[lo:lo + 512], reduction="sum", **opts)[0]
        return total / (float(np.sum(opts["weight"][o])) if "weight" in opts else xr.shape[0])
    return R.LOSSES[case.loss](xr, o)[0]


def _reference_on_gpu(case, rows=256):
    """The float64 reference of a GPU case on the GPU (torch, float64, chunks of rows): at 16384x131072
    the NumPy reference would take minutes of a GPU session's short lease."""
    import torch
    from tests.support.harness import np_dtype
    x, y = data(case)
    total = 0.0
    for lo in range(0, x.shape[0], rows):
        xr = torch.from_numpy(np.ascontiguousarray(x[lo:lo + rows]).astype(np_dtype(case.dtype)).astype(np.float32))
        xr = xr.to("cuda", torch.float64)
        yr = torch.from_numpy(np.asarray(y[lo:lo + rows], np.int64)).to("cuda")
        total += float((torch.logsumexp(xr, -1) - xr.gather(1, yr[:, None])[:, 0]).sum())
    return total / x.shape[0]


def device_copy_bandwidth(nbytes=2 << 30, repeat=20):
    """Bytes per second of a device-to-device copy on the GPU (read + write counted), the median of
    ``repeat`` copies timed with CUDA events (torch), after a warm-up."""
    import torch
    src = torch.ones(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / sorted(times)[len(times) // 2]


def copy_bandwidth(nbytes=512 << 20, repeat=5):
    """Bytes per second of np.copyto (read + write counted), best of ``repeat``."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeat))
    return 2 * nbytes / best


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def peak_extra_mib(fn, device="cpu"):
    """Peak memory added while ``fn`` runs: CUDA ``max_memory_allocated`` on a GPU, else resident
    memory (Linux: VmHWM, reset through /proc/self/clear_refs)."""
    if device == "jax-gpu":  # XLA's own accounting of the device's peak
        import jax
        dev = jax.devices()[0]
        before = dev.memory_stats() or {}
        fn()
        after = dev.memory_stats() or {}
        if "peak_bytes_in_use" not in after:
            return float("nan")
        return max(0.0, (after["peak_bytes_in_use"] - before.get("bytes_in_use", 0)) / 2 ** 20)
    if device == "cuda":
        import torch
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    # fastloss keeps dropped CPU gradients for reuse (fastloss/_buffers.py); release them first, so
    # the step's own allocation is counted rather than hidden in memory the cache already holds.
    import fastloss
    fastloss.empty_cache()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
        fn()
        return max(0.0, (_status_kib("VmHWM") - before) / 1024)
    except OSError:
        return float("nan")


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0
