"""Validation, dispatch and import-time behaviour: backend-independent parts of the contract."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import fastloss

X = np.zeros((3, 4), np.float32)
Y = np.zeros(3, np.int64)


def run_py(code, **env):
    full = dict(os.environ, **env)
    for k, v in env.items():
        if v is None:
            full.pop(k)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


def test_import_loads_no_framework():
    out = run_py("import sys, fastloss; print(sorted(m for m in ('jax','numba','triton','torch','keras','jaxlib') "
                 "if m in sys.modules))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="1"), "temperature"),
    (dict(label_smoothing=-0.1), "label_smoothing"), (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(z_loss=-1.0), "z_loss"), (dict(ignore_index=1.5), "ignore_index"),
    (dict(reduction="avg"), "reduction"), (dict(reduction=None), "reduction"),
    (dict(backend="cuda"), "backend"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        fastloss.sparse_softmax_cross_entropy(X, Y, **kwargs)
    assert "received" in str(err.value)


def test_bad_argument_messages_name_allowed_values():
    with pytest.raises(ValueError, match=r"one of \('mean', 'sum', 'none'\); received 'avg'"):
        fastloss.mean_squared_error(X, X, reduction="avg")
    with pytest.raises(ValueError, match=r"\[0, 1\]; received 2"):
        fastloss.sigmoid_cross_entropy(X, X, label_smoothing=2)


@pytest.mark.parametrize("delta", [0.0, -1.0, float("inf"), float("nan"), "1"])
def test_huber_delta_must_be_a_positive_number(delta):
    with pytest.raises(ValueError, match="`delta`.*received"):
        fastloss.huber(X, X, delta=delta)


@pytest.mark.parametrize("kwargs,match", [
    (dict(gamma=-1.0), "`gamma`.*>= 0"), (dict(gamma=float("inf")), "`gamma`"), (dict(alpha=1.5), r"`alpha`.*\[0, 1\]"),
    (dict(apply_class_balancing=1), "`apply_class_balancing`.*True or False"), (dict(label_smoothing=-0.1), "label_smoothing"),
])
def test_focal_options_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastloss.sigmoid_focal_loss(X, X, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(softcap=0.0), "`softcap`.*> 0"), (dict(softcap=-2.0), "`softcap`"), (dict(softcap=float("nan")), "`softcap`"),
    (dict(weight=np.ones(3)), r"`weight`.*shape \(4,\).*\(3,\)"),
    (dict(weight=np.ones((4, 1))), r"`weight`.*shape"),
    (dict(weight=np.arange(4)), r"`weight`.*float.*int64"),
    (dict(weight=np.array([1.0, np.inf, 1.0, 1.0])), r"`weight`.*finite.*inf.*class 1"),
    (dict(weight=np.array([1.0, 1.0, np.nan, 1.0])), r"`weight`.*finite.*class 2"),
])
def test_class_weight_and_softcap_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastloss.sparse_softmax_cross_entropy(X, Y, **kwargs)


def test_traced_softcap_is_a_type_error():
    jax = pytest.importorskip("jax")
    with pytest.raises(TypeError, match="`softcap`.*static"):
        jax.jit(lambda c: fastloss.sparse_softmax_cross_entropy(X, Y, softcap=c))(2.0)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(3, 5\)"):
        fastloss.softmax_cross_entropy(X, np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(4,\)"):
        fastloss.sparse_softmax_cross_entropy(X, np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="predictions"):
        fastloss.mean_squared_error(X, np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="at least one class"):
        fastloss.sparse_softmax_cross_entropy(np.zeros((3, 0), np.float32), Y)


@pytest.mark.parametrize("fn", [fastloss.sparse_softmax_cross_entropy, fastloss.softmax_cross_entropy,
                                fastloss.sigmoid_cross_entropy, fastloss.mean_squared_error, fastloss.huber,
                                fastloss.sigmoid_focal_loss])
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_])
def test_integer_logits_are_rejected(fn, dtype):
    other = Y if fn is fastloss.sparse_softmax_cross_entropy else X
    with pytest.raises(TypeError, match="floating-point"):
        fn(X.astype(dtype), other)


@pytest.mark.parametrize("dtype", [np.float32, np.bool_])
def test_non_integer_labels_are_rejected(dtype):
    with pytest.raises(TypeError, match="labels.*integer"):
        fastloss.sparse_softmax_cross_entropy(X, Y.astype(dtype))


def test_value_and_grad_rejects_other_functions_and_none_reduction():
    with pytest.raises(TypeError, match="loss_fn"):
        fastloss.value_and_grad(np.sum)
    with pytest.raises(ValueError, match="reduction"):
        fastloss.value_and_grad(fastloss.mean_squared_error)(X, X, reduction="none")


def test_available_backends_shape():
    got = fastloss.available_backends()
    assert set(got) == {"jax", "numba", "triton"}
    assert all(v is None or isinstance(v, str) for v in got.values())


def test_unknown_env_backend_is_an_error():
    out = run_py("import numpy as np, fastloss\n"
                 "fastloss.mean_squared_error(np.ones(3, np.float32), np.ones(3, np.float32))",
                 FASTLOSS_BACKEND="tpu")
    assert out.returncode != 0 and "FASTLOSS_BACKEND" in out.stderr


def test_env_backend_selects_jax_for_numpy():
    out = run_py("import numpy as np, sys, fastloss\n"
                 "r = fastloss.mean_squared_error(np.ones(3, np.float32), np.zeros(3, np.float32))\n"
                 "print(type(r).__name__, 'numba' in sys.modules)", FASTLOSS_BACKEND="jax")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ndarray", "False"]


def test_triton_without_gpu_or_interpreter_says_why():
    out = run_py("import torch, fastloss\n"
                 "print(fastloss.available_backends()['triton'])\n"
                 "fastloss.mean_squared_error(torch.ones(3), torch.zeros(3), backend='triton')",
                 TRITON_INTERPRET=None)
    assert out.returncode != 0
    assert "RuntimeError" in out.stderr and "TRITON_INTERPRET" in out.stderr


# ------------------------------------------------------------------- inputs from every framework
LOSS_INPUTS = [
    ("sparse_softmax_cross_entropy", np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], np.float32), np.array([1, 2])),
    ("softmax_cross_entropy", np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], np.float32),
     np.array([[0.2, 0.8, 0.0], [0.0, 0.0, 1.0]], np.float32)),
    ("sigmoid_cross_entropy", np.array([1.0, -2.0, 0.5], np.float32), np.array([1.0, 0.0, 1.0], np.float32)),
    ("mean_squared_error", np.array([1.0, -2.0, 0.5], np.float32), np.array([0.0, 0.0, 1.0], np.float32)),
    ("huber", np.array([1.0, -2.0, 0.5], np.float32), np.array([0.0, 0.0, 1.0], np.float32)),
    ("sigmoid_focal_loss", np.array([1.0, -2.0, 0.5], np.float32), np.array([1.0, 0.0, 1.0], np.float32)),
]


@pytest.mark.parametrize("name,x,other", LOSS_INPUTS, ids=[c[0] for c in LOSS_INPUTS])
def test_read_only_and_strided_numpy_inputs(name, x, other):
    # np.asarray(jax_array) is read-only; x.T and x[:, :V] are strided. Every loss takes them all.
    fn = getattr(fastloss, name)
    want = fn(x.copy(), other.copy(), backend="numba")
    ro_x, ro_o = x.copy(), other.copy()
    ro_x.flags.writeable = False
    ro_o.flags.writeable = False
    np.testing.assert_allclose(fn(ro_x, ro_o, backend="numba"), want, rtol=1e-6)
    val, g = fastloss.value_and_grad(fn)(ro_x, ro_o, backend="numba")
    np.testing.assert_allclose(val, want, rtol=1e-6)
    assert g.shape == x.shape and g.flags.writeable
    wide = np.zeros(x.shape[:-1] + (x.shape[-1] + 5,), np.float32)
    wide[..., :x.shape[-1]] = x
    np.testing.assert_allclose(fn(wide[..., :x.shape[-1]], other, backend="numba"), want, rtol=1e-6)
    np.testing.assert_allclose(fn(np.asfortranarray(x), other, backend="numba"), want, rtol=1e-6)


@pytest.mark.parametrize("name,x,other", LOSS_INPUTS, ids=[c[0] for c in LOSS_INPUTS])
def test_numpy_or_list_next_to_torch_is_converted(name, x, other):
    torch = pytest.importorskip("torch")
    fn = getattr(fastloss, name)
    want = fn(x, other)
    xt = torch.tensor(x, requires_grad=True)
    for o in (other, other.tolist()):
        out = fn(xt, o)
        assert isinstance(out, torch.Tensor)
        np.testing.assert_allclose(out.detach().numpy(), want, rtol=1e-6)
    out.backward()
    assert xt.grad is not None and xt.grad.shape == xt.shape


def test_other_framework_mixes_are_type_errors_naming_both():
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    x, y = LOSS_INPUTS[0][1], LOSS_INPUTS[0][2]
    with pytest.raises(TypeError, match=r"`logits`.*torch.*`labels`.*jax"):
        fastloss.sparse_softmax_cross_entropy(torch.tensor(x), jnp.asarray(y))
    with pytest.raises(TypeError, match=r"`logits`.*jax.*`labels`.*torch"):
        fastloss.sparse_softmax_cross_entropy(jnp.asarray(x), torch.tensor(y))
    with pytest.raises(TypeError, match=r"`logits`.*numpy.*`labels`.*torch"):
        fastloss.sparse_softmax_cross_entropy(x, torch.tensor(y))
    with pytest.raises(TypeError, match=r"`predictions`.*`targets`"):
        fastloss.mean_squared_error(torch.tensor(x), jnp.asarray(x))


def test_label_error_without_ignore_index_names_no_sentinel():
    x = LOSS_INPUTS[0][1]
    with pytest.raises(ValueError, match=r"\[0, 3\); received label 7\.$"):
        fastloss.sparse_softmax_cross_entropy(x, np.array([0, 7]), ignore_index=None)
    with pytest.raises(ValueError, match=r"or `ignore_index` \(-100\); received label -5"):
        fastloss.sparse_softmax_cross_entropy(x, np.array([-5, 1]))
    # ignore_index=None ignores nothing: every row counts in the mean
    y = np.array([1, 2])
    np.testing.assert_allclose(fastloss.sparse_softmax_cross_entropy(x, y, ignore_index=None),
                               fastloss.sparse_softmax_cross_entropy(x, y), rtol=1e-7)


def test_inplace_variant_errors_say_what_it_takes(monkeypatch):
    # Were Triton's "no CUDA device" message for NumPy input and for CPU tensors without the
    # interpreter; now: what the variant takes, and the function to use instead.
    torch = pytest.importorskip("torch")
    x, y = np.zeros((4, 6), np.float32), np.zeros(4, np.int64)
    with pytest.raises(TypeError, match="takes torch tensors.*sparse_softmax_cross_entropy"):
        fastloss.sparse_softmax_cross_entropy_(x, y)
    monkeypatch.setattr(fastloss._dispatch, "unavailable_reason", lambda name: "no CUDA device")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1.*'numba' backend"):
        fastloss.sparse_softmax_cross_entropy_(torch.tensor(x), torch.tensor(y))


@pytest.mark.parametrize("loss", ["sparse_softmax_cross_entropy", "mean_squared_error"])
def test_tensor_on_another_device_names_it(loss):
    # A meta tensor's error said "torch-cuda input".
    torch = pytest.importorskip("torch")
    x = torch.zeros((4, 6), device="meta")
    other = torch.zeros(4, dtype=torch.int64, device="meta") if loss.startswith("sparse") else x
    with pytest.raises(TypeError, match="CPU.*CUDA.*device meta"):
        getattr(fastloss, loss)(x, other)
