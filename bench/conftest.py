import os
import sys

# Keras holds one backend per process; the suites default to JAX (keras-stock-torch runs in a
# second process with KERAS_BACKEND=torch, see bench/__main__.py).
os.environ.setdefault("KERAS_BACKEND", "jax")
if os.environ.get("FASTLOSS_BENCH") == "tiny":
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.reference
