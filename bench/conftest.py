import os
import sys

# Keras holds one backend per process; the suites default to JAX (keras-stock-torch runs in a
# second process with KERAS_BACKEND=torch, see bench/__main__.py).
os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.support.reference


def pytest_configure(config):
    # `pytest bench --benchmark-disable` is the smoke test (CI): every benchmark runs once on the tiny
    # cases, and fastloss-triton runs on the interpreter. Timed runs keep the cases they were given.
    if config.getoption("benchmark_disable", False):
        os.environ.setdefault("FASTLOSS_BENCH", "tiny")
        os.environ.setdefault("TRITON_INTERPRET", "1")
