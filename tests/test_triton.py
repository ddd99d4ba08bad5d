"""Triton-specific checks: ahead-of-time compilation for real GPUs, and backend behaviour.

The contract tests (tests/test_contract.py, harness "triton") already run every kernel under the
interpreter. Here every specialisation the dispatch can launch is compiled to cubin for sm_80 and
sm_90, which needs no GPU (a kernel that only works in the interpreter fails here), and its registers
and spills are read from the cubin (tests/support/gpu_resources.py).
"""
from __future__ import annotations

import numpy as np
import pytest

import fastloss

from .support import reference as R

triton = pytest.importorskip("triton")
torch = pytest.importorskip("torch")
from fastloss.kernels import triton_gpu as K  # noqa: E402

pytestmark = pytest.mark.triton


def resources_in_subprocess(arch, which):
    """The per-configuration reports of ``tests/support/gpu_resources.py`` for ``arch``, compiled in a fresh
    process without TRITON_INTERPRET (under the interpreter kernels cannot be compiled)."""
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-m", "tests.support.gpu_resources", str(arch), which], capture_output=True,
                          text=True, env=env, timeout=1200, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_every_specialization_compiles_without_spills(arch):
    """Every specialisation the dispatch can launch compiles to cubin, spills nothing and keeps to
    REG_LIMIT registers per thread (memory-bound kernels need loads in flight, so occupancy)."""
    from .support.gpu_resources import problems
    reports = resources_in_subprocess(arch, "triton")
    assert len(reports) > 200
    assert not problems(reports), "\n".join(problems(reports))


def test_long_row_spans_several_blocks():
    # C > block under the interpreter (block 2048): the online softmax crosses block boundaries.
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.standard_normal((3, 5000)) * 3, dtype=torch.float32, requires_grad=True)
    x.data[0, 4500:] += 20.0  # the max arrives in the last block
    y = torch.tensor([4999, 0, 2047])
    loss = fastloss.sparse_softmax_cross_entropy(x, y, label_smoothing=0.1, z_loss=1e-3, backend="triton")
    loss.backward()
    ref = R.sparse_softmax_cross_entropy(x.detach().numpy(), y.numpy(), label_smoothing=0.1, z_loss=1e-3)
    np.testing.assert_allclose(loss.item(), ref[0], rtol=1e-5)
    np.testing.assert_allclose(x.grad.numpy(), ref[1], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("n_cls", [300, 5000])
def test_confident_label_gradient_keeps_relative_accuracy(n_cls):
    # p_y = 1 - O(1e-6): the label's gradient comes from the sum of the other classes (s_rest), so it
    # keeps its relative accuracy where p_y - 1 in fp32 would be 0.
    rng = np.random.default_rng(5)
    xn = (rng.standard_normal((2, n_cls)) * 2).astype(np.float32)
    y = np.array([7, 3])
    xn[0, 7] = xn[0].max() + 18
    x = torch.tensor(xn, requires_grad=True)
    fastloss.sparse_softmax_cross_entropy(x, torch.tensor(y), reduction="sum", backend="triton").backward()
    ref = R.sparse_softmax_cross_entropy(xn, y, reduction="sum")[1]
    assert 0 < -ref[0, 7] < 1e-3
    np.testing.assert_allclose(x.grad[0, 7].item(), ref[0, 7], rtol=1e-5)
    np.testing.assert_allclose(x.grad.numpy(), ref, rtol=1e-4, atol=1e-10)


def test_numpy_input_is_a_type_error():
    with pytest.raises(TypeError, match="torch tensors"):
        fastloss.mean_squared_error(np.ones(3, np.float32), np.ones(3, np.float32), backend="triton")


def test_value_and_grad_on_torch_tensors():
    x = torch.randn(5, 7)
    y = torch.randint(0, 7, (5,))
    loss, g = fastloss.value_and_grad(fastloss.sparse_softmax_cross_entropy)(x, y, backend="triton")
    ref = R.sparse_softmax_cross_entropy(x.numpy(), y.numpy())
    np.testing.assert_allclose(loss.item(), ref[0], rtol=1e-6)
    np.testing.assert_allclose(g.numpy(), ref[1], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_inplace_gradient_into_logits(reduction):
    rng = np.random.default_rng(5)
    x_np = (rng.standard_normal((6, 3000)) * 2).astype(np.float32)
    y = torch.tensor(rng.integers(0, 3000, 6))
    y[2] = -100
    x = torch.tensor(x_np)
    loss = fastloss.sparse_softmax_cross_entropy_(x, y, label_smoothing=0.1, z_loss=1e-4, reduction=reduction)
    ref = R.sparse_softmax_cross_entropy(x_np, y.numpy(), label_smoothing=0.1, z_loss=1e-4, reduction=reduction)
    np.testing.assert_allclose(loss.item(), ref[0], rtol=1e-5)
    np.testing.assert_allclose(x.numpy(), ref[1], rtol=1e-4, atol=1e-9)  # logits now hold the gradient


def test_inplace_needs_triton_and_contiguous_logits():
    x = torch.randn(4, 6)
    y = torch.randint(0, 6, (4,))
    with pytest.raises(ValueError, match="backend"):
        fastloss.sparse_softmax_cross_entropy_(x, y, backend="numba")
    with pytest.raises(ValueError, match="contiguous"):
        fastloss.sparse_softmax_cross_entropy_(torch.randn(6, 4).t(), y)
