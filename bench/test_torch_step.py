"""A PyTorch training step with a 32000-class head, eager and under torch.compile: fastloss vs
F.cross_entropy, same model and data.

    pytest bench/test_torch_step.py --benchmark-only

The step: logits = Linear(H -> C)(h), the loss, gradients by autograd, an SGD update. Compiled with
``torch.compile(fullgraph=True)``; fastloss runs inside the compiled graph as its custom op.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from .cases import rounds

SHAPES = {"tiny": (64, 16, 1000), "quick": (256, 128, 32000), "full": (1024, 128, 32000)}
PROVIDERS = ["fastloss-eager", "fastloss-compiled", "torch-eager", "torch-compiled"]


def _make_step(provider, device):
    import torch
    import fastloss
    torch._dynamo.config.trace_autograd_ops = True
    batch, features, classes = SHAPES[os.environ.get("FASTLOSS_BENCH", "full")]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(batch, features, generator=g).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    torch.manual_seed(0)
    head = torch.nn.Linear(features, classes).to(device)
    params = list(head.parameters())
    loss_fn = fastloss.sparse_softmax_cross_entropy if provider.startswith("fastloss") else \
        torch.nn.functional.cross_entropy

    def step():
        loss = loss_fn(head(h), y)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, gp in zip(params, grads):
                p -= 1e-3 * gp
        return loss.detach()
    fn = torch.compile(step, fullgraph=True) if provider.endswith("compiled") else step
    return fn, (batch, features, classes)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_torch_training_step_32000_classes(benchmark, provider):
    torch = pytest.importorskip("torch")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    step, shape = _make_step(provider, device)
    first = float(step())  # compile and warm up outside the timing
    benchmark.group = f"torch-step-{shape[0]}x{shape[2]}-{device}"
    benchmark.extra_info.update(kind="torch-step", provider=provider, device=device, shape=list(shape),
                                first_loss=first)
    benchmark.pedantic(step, rounds=rounds(), iterations=1, warmup_rounds=1)
    assert np.isfinite(first) and abs(first - np.log(shape[2])) < 0.5 * np.log(shape[2])
