import os

# Triton runs on CPU through its interpreter unless the suite is pointed at a GPU. This must be set
# before triton is first imported; it is an environment setting, not a device probe.
if os.environ.get("FASTLOSS_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Fuzz profiles (tests/test_fuzz.py): "ci" runs 8 fixed examples per loss (each on all six harnesses;
# the jax and Pallas harnesses compile per drawn shape: ~1-3 s per example on 2 cores, ~110 s for
# the module): a smoke test of the differential check within CI's 25-minute budget. The fuzzing
# itself is "long": 2,600 per loss (18,200 in all), by hand: --hypothesis-profile=long or
# FASTLOSS_FUZZ=long.
settings.register_profile("ci", max_examples=8, deadline=None, derandomize=True)
settings.register_profile("long", max_examples=2600, deadline=None)
settings.load_profile(os.environ.get("FASTLOSS_FUZZ", "ci"))

from fastloss import _dispatch  # noqa: E402

from .support import harness as H  # noqa: E402

HARNESSES = ("jax", "numba-jax", "pallas-jax", "numba", "numba-torch", "triton")


def _backend_of(name):
    return "triton" if name == "pallas-jax" else name.split("-")[0]


@pytest.fixture(params=HARNESSES)
def harness(request):
    name = request.param
    reason = _dispatch.unavailable_reason(_backend_of(name))
    if reason is not None:
        # CI sets FASTLOSS_REQUIRE_ALL_BACKENDS=1: a backend that silently went missing fails there.
        if os.environ.get("FASTLOSS_REQUIRE_ALL_BACKENDS"):
            pytest.fail(f"backend {name} unavailable: {reason}")
        pytest.skip(f"backend {name} unavailable: {reason}")
    return H.make(name)


def _pallas_covers(item):
    """The Pallas harness serves the cross-entropies of the contract matrix (tests/test_contract.py)."""
    loss = item.callspec.params.get("loss")
    other_loss = any(k in item.originalname for k in ("sigmoid", "focal", "huber", "mse"))
    return item.module.__name__.endswith("test_contract") and not other_loss and \
        (loss is None or loss in H.PALLAS_LOSSES)


def _needed(item, harness):
    if harness == "pallas-jax" and not _pallas_covers(item):
        return False
    # Forward-only programs exist under jit; the eager harnesses run the loss alone in every test.
    return item.originalname != "test_forward_only_programs" or harness in ("numba-jax", "pallas-jax")


# Tests of half a minute or more (a subprocess compiling for a second CPU, a Keras process, a fresh
# interpreter compiling a torch step) run first: xdist's two workers then end on short tests
# instead of one of them waiting out the other's long last test.
_LONG = ("test_keras_wrappers", "test_kernels_on_a_second_cpu_target",
         "test_compiled_training_step_fullgraph_in_a_fresh_process", "test_optax_own_tests",
         "test_numba_distillation_on_a_second_cpu_target", "test_sharded_equals_one_device_without_gathering_the_logits")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: getattr(item, "originalname", "") not in _LONG)  # stable: the rest keep their order
    kept, dropped = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        harness = callspec.params.get("harness") if callspec is not None else None
        if harness in ("triton", "pallas-jax"):
            item.add_marker(pytest.mark.triton)
        (kept if harness is None or _needed(item, harness) else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
