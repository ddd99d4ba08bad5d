"""Runs tests/support/keras_cases.py (fastloss.keras against keras.losses), keras_distill_cases.py and
keras_linear_cases.py (the distillation losses and the fused output head against stock) and
tests/support/keras_stock_tests.py (Keras' own losses tests against fastloss.keras) under KERAS_BACKEND=jax and KERAS_BACKEND=torch,
each backend in its own process (Keras fixes its backend at import)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "support")


@pytest.mark.keras
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_keras_wrappers(backend):
    import importlib.util
    missing = [m for m in ("keras", backend) if importlib.util.find_spec(m) is None]
    if missing:  # not imported here: keras would pick its default backend (tensorflow) in this process
        if os.environ.get("FASTLOSS_REQUIRE_ALL_BACKENDS"):
            pytest.fail(f"not installed: {missing}")
        pytest.skip(f"not installed: {missing}")
    env = dict(os.environ, KERAS_BACKEND=backend)
    proc = subprocess.run([sys.executable, "-m", "pytest", os.path.join(HERE, "keras_cases.py"),
                           os.path.join(HERE, "keras_distill_cases.py"), os.path.join(HERE, "keras_linear_cases.py"),
                           os.path.join(HERE, "keras_stock_tests.py"), "-q", "-x",
                           "-p", "no:cacheprovider", "-o", "addopts=", "-W", "ignore::DeprecationWarning"], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(HERE)), timeout=1800)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and " failed" not in summary and " error" not in summary, tail
