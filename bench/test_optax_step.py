"""A JAX + optax training step: optax's integer-label cross-entropy vs fastloss, same model and data,
for each step of ``cases.steps()``.

    pytest bench/test_optax_step.py --benchmark-only

The step: the model's logits, the mean loss, ``jax.value_and_grad`` over the parameters, an
``optax.sgd`` update, all in one ``jax.jit`` (parameters and optimizer state donated, as a training
loop does).
"""
from __future__ import annotations

import numpy as np
import pytest

from .cases import rounds, steps

PROVIDERS = ["fastloss-optax-step", "optax-step"]


def _make_step(provider, step):
    import jax
    import jax.numpy as jnp
    import optax
    import fastloss
    x, y = (jnp.asarray(a) for a in step.data())
    keys = jax.random.split(jax.random.key(0), 2)
    sizes = [step.features] + ([step.hidden] if step.hidden else []) + [step.classes]
    params = [(jax.random.normal(k, (a, b), jnp.float32) / np.sqrt(a), jnp.zeros((b,), jnp.float32))
              for k, a, b in zip(keys, sizes[:-1], sizes[1:])]
    if provider.startswith("fastloss"):
        loss_of = fastloss.sparse_softmax_cross_entropy
    else:
        def loss_of(logits, labels):
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    opt = optax.sgd(1e-3)

    def loss_fn(ps):
        h = x
        for i, (w, b) in enumerate(ps):
            h = h @ w + b
            if i < len(ps) - 1:
                h = jax.nn.relu(h)
        return loss_of(h, y)

    def update(ps, state):
        loss, grads = jax.value_and_grad(loss_fn)(ps)
        updates, state = opt.update(grads, state, ps)
        return optax.apply_updates(ps, updates), state, loss
    update = jax.jit(update, donate_argnums=(0, 1))
    carry = [params, opt.init(params)]

    def run():
        carry[0], carry[1], loss = update(*carry)
        return float(loss)  # waits for the step, as a training loop that logs its loss does
    return run


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("step", steps(), ids=lambda s: s.id)
def test_optax_training_step(benchmark, step, provider):
    pytest.importorskip("optax")
    fn = _make_step(provider, step)
    first = fn()  # compile outside the timing
    benchmark.group = f"optax-step-{step.id}"
    benchmark.extra_info.update(kind="optax-step", provider=provider, step=step.id,
                                shape=[step.batch, step.features, step.classes], first_loss=first)
    benchmark.pedantic(fn, rounds=rounds(step), iterations=1, warmup_rounds=3)
    assert np.isfinite(first) and abs(first - np.log(step.classes)) < 0.5 * np.log(step.classes)
