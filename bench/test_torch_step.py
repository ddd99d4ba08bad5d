"""PyTorch training steps, eager and under torch.compile: fastloss vs F.cross_entropy, same model and
data, for each step of ``cases.steps()``.

    pytest bench/test_torch_step.py --benchmark-only

The step: the model's logits, the loss, gradients by autograd, an SGD update. Compiled with
``torch.compile(fullgraph=True)``; fastloss runs inside the compiled graph as its custom op.
"""
from __future__ import annotations

import numpy as np
import pytest

from .cases import rounds, steps

PROVIDERS = ["fastloss-eager", "fastloss-compiled", "torch-eager", "torch-compiled"]


def _make_step(provider, step, device):
    import torch
    import fastloss
    torch._dynamo.config.trace_autograd_ops = True
    x, y = (torch.from_numpy(a).to(device) for a in step.data())
    y = y.long()
    torch.manual_seed(0)
    layers = [torch.nn.Linear(step.features, step.hidden), torch.nn.ReLU()] if step.hidden else []
    model = torch.nn.Sequential(*layers, torch.nn.Linear(step.hidden or step.features, step.classes)).to(device)
    params = list(model.parameters())
    loss_fn = fastloss.sparse_softmax_cross_entropy if provider.startswith("fastloss") else \
        torch.nn.functional.cross_entropy

    def train_step():
        loss = loss_fn(model(x), y)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, gp in zip(params, grads):
                p -= 1e-3 * gp
        return loss.detach()
    return torch.compile(train_step, fullgraph=True) if provider.endswith("compiled") else train_step


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("step", steps(), ids=lambda s: s.id)
def test_torch_training_step(benchmark, step, provider):
    torch = pytest.importorskip("torch")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fn = _make_step(provider, step, device)
    first = float(fn())  # compile and warm up outside the timing
    benchmark.group = f"torch-step-{step.id}-{device}"
    benchmark.extra_info.update(kind="torch-step", provider=provider, device=device, step=step.id,
                                shape=[step.batch, step.features, step.classes], first_loss=first)
    benchmark.pedantic(fn, rounds=rounds(step), iterations=1, warmup_rounds=3)
    assert np.isfinite(first) and abs(first - np.log(step.classes)) < 0.5 * np.log(step.classes)
