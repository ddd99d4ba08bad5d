"""The reused CPU gradient memory (fastloss/_numpy/buffers.py): never aliased while in use, reused after."""
import gc
import subprocess
import sys

import numpy as np
import pytest

from fastloss._numpy import buffers as _buffers

numba = pytest.importorskip("numba")

import fastloss  # noqa: E402

SHAPE = (64, 8192)  # 2 MiB of fp32: above _buffers.MIN_BYTES


def _grad(x, y):
    return fastloss.value_and_grad(fastloss.sparse_softmax_cross_entropy)(x, y, backend="numba")[1]


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return (rng.standard_normal(SHAPE).astype(np.float32),
            rng.integers(0, SHAPE[1], SHAPE[0]))


def test_held_gradient_is_never_handed_out_again(data):
    x, y = data
    g1 = _grad(x, y)
    ref = g1.copy()
    views = [g1[3:], g1.reshape(-1), g1.view(np.int32)]
    del g1
    gc.collect()
    others = [_grad(x * 2, y) for _ in range(3)]  # would reuse g1's block if views did not hold it
    np.testing.assert_array_equal(views[0], ref[3:])
    np.testing.assert_array_equal(views[1], ref.reshape(-1))
    for o in others:
        assert not np.shares_memory(o, views[1])


def test_dropped_gradient_memory_is_reused(data):
    x, y = data
    _buffers.empty_cache()
    g = _grad(x, y)
    addr = g.ctypes.data
    assert addr % 64 == 0
    del g
    gc.collect()
    assert _buffers.cached_bytes() >= x.nbytes
    g2 = _grad(x, y)
    assert g2.ctypes.data == addr
    np.testing.assert_allclose(g2, _grad(x.copy(), y), rtol=0, atol=0)
    fastloss.empty_cache()
    assert _buffers.cached_bytes() == 0


def test_torch_gradient_keeps_its_block(data):
    torch = pytest.importorskip("torch")
    x, y = data
    xt = torch.from_numpy(x).requires_grad_()
    fastloss.sparse_softmax_cross_entropy(xt, torch.from_numpy(y)).backward()
    held = xt.grad
    ref = held.clone()
    del xt
    gc.collect()
    for _ in range(3):
        xt2 = torch.from_numpy(x * 3).requires_grad_()
        fastloss.sparse_softmax_cross_entropy(xt2, torch.from_numpy(y)).backward()
        assert not np.shares_memory(xt2.grad.numpy(), held.numpy())
    assert torch.equal(held, ref)


def test_small_arrays_are_plain_numpy():
    a = _buffers.empty((4, 4), np.float32)
    assert a.flags.owndata


def _run(code, env):
    import os
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True)


def test_cache_can_be_turned_off_and_bad_setting_is_an_error():
    code = ("import numpy as np; from fastloss._numpy import buffers as b; a = b.empty((1024, 1024), np.float32); "
            "print(a.flags.owndata)")
    assert _run(code, {"FASTLOSS_CPU_CACHE_MB": "0"}).stdout.strip() == "True"
    bad = _run(code, {"FASTLOSS_CPU_CACHE_MB": "lots"})
    assert bad.returncode != 0 and "FASTLOSS_CPU_CACHE_MB" in bad.stderr and "'lots'" in bad.stderr
