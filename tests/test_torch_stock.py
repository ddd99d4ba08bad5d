"""torch's own cross-entropy tests against fastloss: the sample inputs of torch's OpInfo for
``nn.functional.cross_entropy`` (the ones its test suite runs, with class weights, ignore_index
and every reduction) and torch's reference implementation ``cross_entropy_loss_reference`` over a
grid of weights, ignore_index and label smoothing.

torch puts the class axis second ((N, C, d1, ...)); fastloss puts it last, so logits are moved
there first. Dense (probability) targets are softmax_cross_entropy's business and are skipped."""
from __future__ import annotations

import itertools

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest")  # torch.testing._internal needs it
F = torch.nn.functional

import fastloss  # noqa: E402

BACKENDS = ["numba", "triton"]


def _samples():
    from torch.testing._internal.common_methods_invocations import op_db
    op = next(o for o in op_db if o.name == "nn.functional.cross_entropy")
    out = []
    for s in op.sample_inputs("cpu", torch.float64, requires_grad=True):
        target = s.args[0]
        if not target.is_floating_point():
            out.append((s.input.detach(), target, dict(s.kwargs)))
    return out


def _ours(x, y, backend, **kw):
    """fastloss on torch's layout: the class axis (dim 1) moved last."""
    xl = x.movedim(1, -1) if x.dim() > 1 else x
    yl = y
    return fastloss.sparse_softmax_cross_entropy(xl, yl, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_opinfo_samples(backend):
    samples = _samples()
    assert len(samples) >= 10 and any("weight" in kw for _, _, kw in samples)
    for x, y, kw in samples:
        kw.setdefault("ignore_index", -100)
        a = x.clone().requires_grad_()
        b = x.clone().requires_grad_()
        ours = _ours(a, y, backend, **kw)
        ref = F.cross_entropy(b, y, **kw)
        torch.testing.assert_close(ours.to(torch.float64), ref, rtol=1e-10, atol=1e-12, msg=str(kw))
        cot = torch.randn_like(ref)
        (ours * cot).sum().backward()
        (ref * cot).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=str(kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_reference_function_grid(backend):
    """torch's own reference (common_nn.cross_entropy_loss_reference) for weights, ignore_index
    and label smoothing together, 2-D and 4-D inputs (tests/conftest.py runs Triton interpreted)."""
    from torch.testing._internal.common_nn import cross_entropy_loss_reference
    g = torch.Generator().manual_seed(0)
    for shape, weighted, ignore, eps, reduction in itertools.product(
            ((6, 5), (2, 5, 3, 2)), (False, True), (-100, 2), (0.0, 0.25), ("mean", "sum", "none")):
        x = torch.randn(shape, dtype=torch.float64, generator=g)
        y = torch.randint(0, shape[1], (shape[0],) + shape[2:], generator=g)
        y.view(-1)[::3] = ignore
        w = torch.rand(shape[1], dtype=torch.float64, generator=g) + 0.1 if weighted else None
        ref = cross_entropy_loss_reference(x, y, weight=w, ignore_index=ignore, reduction=reduction,
                                           label_smoothing=eps)
        ours = _ours(x, y, backend, weight=w, ignore_index=ignore, reduction=reduction, label_smoothing=eps)
        torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=1e-10, atol=1e-12,
                                   msg=f"{shape} w={weighted} ignore={ignore} eps={eps} {reduction}")
