"""Runs tests/support/optax_stock_tests.py (optax's own loss tests against fastloss) on the jax backend and,
through NumPy inputs, on the numba backend, each in its own process (the stock test modules are
rebound per backend)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "support")


@pytest.mark.parametrize("backend", ["jax", "numba"])
def test_optax_own_tests(backend):
    if importlib.util.find_spec("optax") is None:
        if os.environ.get("FASTLOSS_REQUIRE_ALL_BACKENDS"):
            pytest.fail("optax is not installed")
        pytest.skip("optax is not installed")
    env = dict(os.environ, FASTLOSS_OPTAX_BACKEND=backend)
    proc = subprocess.run([sys.executable, "-m", "pytest", os.path.join(HERE, "optax_stock_tests.py"), "-q",
                           "-p", "no:cacheprovider", "-o", "addopts=", "-W", "ignore::DeprecationWarning"],
                          capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(HERE)), timeout=1200)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and " failed" not in summary and " error" not in summary, tail
