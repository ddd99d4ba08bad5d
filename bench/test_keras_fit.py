"""Keras training steps, stock loss vs fastloss.keras, same model and data: the steps of
``cases.steps()`` (an MLP with 10 classes at batch 32 and 256, a 1000-class and a 32000-class head)
and a Distiller with a 32000-class student.

    pytest bench/test_keras_fit.py --benchmark-only       (KERAS_BACKEND=jax by default)

The test ids carry the Keras backend of the process (``jax-backend``/``torch-backend``), so the report
runs them once in each of its two processes.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from .cases import rounds, steps

SHAPES = {"tiny": (64, 16, 1000), "quick": (256, 128, 32000), "full": (1024, 128, 32000)}
BACKEND = os.environ.get("KERAS_BACKEND", "jax") + "-backend"


def _model(keras, step):
    layers = [keras.Input((step.features,))]
    if step.hidden:
        layers.append(keras.layers.Dense(step.hidden, activation="relu"))
    return keras.Sequential(layers + [keras.layers.Dense(step.classes)])


@pytest.mark.parametrize("backend", [BACKEND])
@pytest.mark.parametrize("which", ["keras-stock", "fastloss-keras"])
@pytest.mark.parametrize("step", steps(), ids=lambda s: s.id)
def test_train_on_batch(benchmark, step, which, backend):
    import keras
    import fastloss.keras as fk
    x, y = step.data()
    keras.utils.set_random_seed(0)
    model = _model(keras, step)
    loss = (keras.losses.SparseCategoricalCrossentropy(from_logits=True) if which == "keras-stock"
            else fk.SparseCategoricalCrossentropy(from_logits=True))
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss=loss)
    first = float(model.train_on_batch(x, y))  # compile outside the timing
    benchmark.group = f"keras-fit-{step.id}-{keras.backend.backend()}"
    benchmark.extra_info.update(kind="keras-fit", provider=which, backend=keras.backend.backend(), step=step.id,
                                shape=[step.batch, step.features, step.classes], first_loss=first)
    benchmark.pedantic(lambda: model.train_on_batch(x, y), rounds=rounds(step), iterations=1, warmup_rounds=3)
    assert np.isfinite(first) and abs(first - np.log(step.classes)) < 0.5 * np.log(step.classes)


@pytest.mark.parametrize("backend", [BACKEND])
@pytest.mark.parametrize("which", ["keras-stock", "fastloss-keras"])
def test_distiller_step_32000_classes(benchmark, which, backend):
    """keras.distillation.Distiller.train_on_batch: a frozen Dense teacher, a Dense student, T = 3, with
    stock LogitsDistillation (given a KLDivergence instance, its KL-of-distributions form) or
    fastloss.keras.LogitsDistillation; the student's hard-label loss is stock's in both."""
    import keras
    import fastloss.keras as fk
    batch, features, classes = SHAPES[os.environ.get("FASTLOSS_BENCH", "full")]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, features)).astype("float32")
    y = rng.integers(0, classes, batch).astype("int32")
    keras.utils.set_random_seed(0)
    teacher = keras.Sequential([keras.Input((features,)), keras.layers.Dense(classes)])
    student = keras.Sequential([keras.Input((features,)), keras.layers.Dense(classes)])
    kd = (keras.distillation.LogitsDistillation(temperature=3.0, loss=keras.losses.KLDivergence())
          if which == "keras-stock" else fk.LogitsDistillation(temperature=3.0))
    distiller = keras.distillation.Distiller(teacher=teacher, student=student, distillation_losses=kd,
                                             student_loss_weight=0.5)
    distiller.compile(optimizer=keras.optimizers.SGD(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    first = distiller.train_on_batch(x, y)
    first = float(first[0] if isinstance(first, (list, tuple)) else first)
    benchmark.group = f"keras-distill-{batch}x{classes}-{keras.backend.backend()}"
    benchmark.extra_info.update(kind="keras-distill", provider=which, backend=keras.backend.backend(),
                                shape=[batch, features, classes], first_loss=first)
    benchmark.pedantic(lambda: distiller.train_on_batch(x, y), rounds=rounds(), iterations=1, warmup_rounds=1)
    assert np.isfinite(first)
