"""linear_cross_entropy (the chunked projection + sparse CE) on every backend against the unfused
float64 reference (tests/support/reference.py): values and all three gradients, every option, ragged and
all-ignored chunks, chunk sizes 1, odd and larger than N, 16-bit inputs; its transforms (jit, vmap,
torch.compile) and the memory property itself (no (N, C) array in the JAX program)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastloss

from .support import reference as R
from .support.harness import np_dtype, require_backend, rounded

BACKENDS = ("numba", "numba-torch", "triton", "jax", "numba-jax")
GRAD_BACKENDS = BACKENDS[1:]  # NumPy input gives the loss only


def _data(n, hdim, n_cls, seed=0, ignored=(), scale=1.0):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((n, hdim)) * scale
    w = rng.standard_normal((n_cls, hdim)) / np.sqrt(hdim)
    b = rng.standard_normal(n_cls) * 0.5
    y = rng.integers(0, n_cls, n)
    y[list(ignored)] = -100
    return h, w, b, y


def run(backend, h, w, y, b, dtype, opts, cot=None):
    """(loss, d h, d W, d b | None) as float64 NumPy through the public API (gradients None for
    NumPy input)."""
    require_backend(backend)
    red = opts.get("reduction", "mean")
    if backend == "numba":
        nd = np_dtype(dtype)
        loss = fastloss.linear_cross_entropy(h.astype(nd), w.astype(nd), y, bias=None if b is None else b.astype(nd),
                                             backend="numba", **opts)
        return np.asarray(loss, np.float64), None, None, None
    if backend in ("numba-torch", "triton"):
        import torch
        tdt = getattr(torch, dtype)
        ht = torch.tensor(h).to(tdt).requires_grad_(True)
        wt = torch.tensor(w).to(tdt).requires_grad_(True)
        bt = None if b is None else torch.tensor(b).to(tdt).requires_grad_(True)
        out = fastloss.linear_cross_entropy(ht, wt, torch.tensor(y), bias=bt, backend=backend.split("-")[0], **opts)
        obj = (out * torch.tensor(cot, dtype=out.dtype)).sum() if red == "none" else out
        obj.backward()
        assert ht.grad.dtype == wt.grad.dtype == tdt
        return (out.detach().double().numpy(), ht.grad.double().numpy(), wt.grad.double().numpy(),
                None if b is None else bt.grad.double().numpy())
    import contextlib

    import jax
    import jax.numpy as jnp
    ctx = jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()
    with ctx:
        jd = jnp.dtype(np_dtype(dtype))
        hj, wj = jnp.asarray(h, jd), jnp.asarray(w, jd)
        bj = None if b is None else jnp.asarray(b, jd)
        yj = jnp.asarray(y)
        provider = "jax" if backend == "jax" else "numba"

        def f(hh, ww, bb):
            return fastloss.linear_cross_entropy(hh, ww, yj, bias=bb, backend=provider, **opts)
        if backend == "numba-jax":
            f = jax.jit(f)  # as a training loop calls it
        out, vjp = jax.vjp(f, hj, wj, bj)
        ct = jnp.asarray(cot, out.dtype) if red == "none" else jnp.ones((), out.dtype)
        gh, gw, gb = vjp(ct)
        assert gh.dtype == gw.dtype == jd
        return (np.asarray(out, np.float64), np.asarray(gh, np.float64), np.asarray(gw, np.float64),
                None if b is None else np.asarray(gb, np.float64))


# Tolerances: the matmul rounds the logits in the input dtype's accumulation (fp32 here, H terms),
# so the loss is checked relative to |loss| + its scale, gradients relative to their largest entry.
TOL = {"float64": 1e-10, "float32": 2e-5, "bfloat16": 3e-2, "float16": 5e-3}


def _close(actual, expected, tol, what):
    expected = np.asarray(expected, np.float64)
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
    err = float(np.max(np.abs(np.asarray(actual, np.float64) - expected), initial=0.0))
    assert err <= tol * scale + 1e-30, f"{what}: max error {err:.3g} > {tol:.1g} x {scale:.3g}"


def check(backend, dtype, h, w, y, b, opts, cot=None):
    hr, wr = rounded(h, dtype), rounded(w, dtype)
    br = None if b is None else rounded(b, dtype)
    loss, gh, gw, gb = run(backend, hr, wr, y, br, dtype, opts, cot)
    ref = R.linear_cross_entropy(hr, wr, y, br, cot=cot, **opts)
    tol = TOL[dtype]
    _close(loss, ref[0], tol, "loss")
    if gh is None:
        return
    _close(gh, ref[1], tol, "d hidden")
    _close(gw, ref[2], tol, "d weight")
    if b is not None:
        _close(gb, ref[3], tol, "d bias")


OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"temperature": 0.7, "z_loss": 1e-3},
    {"temperature": 2.0, "label_smoothing": 0.2, "z_loss": 1e-2, "ignore_index": 5},
    {"ignore_index": None},
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_options_fp32(backend, reduction, opts):
    h, w, b, y = _data(23, 12, 37, ignored=(2, 9))
    ign = opts.get("ignore_index", -100)
    y = np.where(y == -100, 0 if ign is None else ign, y)  # the rows the options ignore (none for None)
    cot = np.random.default_rng(1).standard_normal(23) if reduction == "none" else None
    check(backend, "float32", h, w, y, b, dict(opts, reduction=reduction, chunk_size=5), cot)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [1, 7, 16, 64, None])
@pytest.mark.parametrize("bias", [True, False])
def test_chunk_sizes(backend, chunk, bias):
    # 16 rows: chunks of 1, of 7 (ragged tail of 2), exactly one chunk, one larger than N, automatic
    h, w, b, y = _data(16, 8, 29, seed=3, ignored=(0, 1))
    check(backend, "float32", h, w, y, b if bias else None, {"chunk_size": chunk})


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_chunks(backend):
    # rows 0-7 ignored: with chunks of 4 the first two chunks contribute nothing; then all rows
    h, w, b, y = _data(14, 6, 11, seed=4, ignored=range(8))
    check(backend, "float32", h, w, y, b, {"chunk_size": 4})
    h, w, b, y = _data(9, 6, 11, seed=5, ignored=range(9))
    loss, gh, gw, gb = run(backend, h, w, y, b, "float32", {"chunk_size": 4})
    assert float(loss) == 0.0
    if gh is not None:
        assert not np.any(gh) and not np.any(gw) and not np.any(gb)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_no_rows(backend, reduction):
    # jax used to raise "Need at least one array to concatenate" (no chunk ran); every backend gives
    # 0 and zero gradients, as an empty batch does for the other losses.
    h, w, b, y = _data(3, 6, 11, seed=6)
    loss, gh, gw, gb = run(backend, h[:0], w, y[:0], b, "float32", {"reduction": reduction})
    assert float(loss) == 0.0
    if gh is not None:
        assert gh.shape == (0, 6) and not np.any(gw) and not np.any(gb)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float64", "bfloat16", "float16"])
def test_dtypes(backend, dtype):
    h, w, b, y = _data(19, 16, 33, seed=6, ignored=(4,))
    check(backend, dtype, h, w, y, b, {"chunk_size": 6, "label_smoothing": 0.1})


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_and_leading_axes(backend):
    # Large logits (|z| ~ 1e3: softmax saturates), a 3-D hidden (batch, seq, H)
    h, w, b, y = _data(12, 8, 21, seed=7, scale=300.0)
    check(backend, "float32", h, w, y, b, {"chunk_size": 5})
    hr, wr = rounded(h, "float32"), rounded(w, "float32")
    loss, gh, _, _ = run(backend, hr.reshape(3, 4, 8), wr, y.reshape(3, 4), None, "float32",
                         {"reduction": "none", "chunk_size": 5}, cot=np.ones((3, 4)))
    ref = R.linear_cross_entropy(hr, wr, y, reduction="none")
    assert loss.shape == (3, 4)
    _close(loss.reshape(-1), ref[0], 2e-5, "loss")
    if gh is not None:
        assert gh.shape == (3, 4, 8)


def test_matches_the_unfused_fastloss_pair():
    # Consistency between variants: the fused function equals matmul + fastloss's own sparse CE.
    h, w, b, y = _data(40, 16, 50, seed=8, ignored=(3,))
    h, w, b = (a.astype(np.float32) for a in (h, w, b))
    fused = fastloss.linear_cross_entropy(h, w, y, bias=b, label_smoothing=0.1, chunk_size=9)
    pair = fastloss.sparse_softmax_cross_entropy(h @ w.T + b, y, label_smoothing=0.1)
    np.testing.assert_allclose(fused, pair, rtol=1e-5)


def test_against_torch_linear_cross_entropy():
    # torch's own fused op, the framework's second reference (and its mean's ignore semantics)
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    h, w, b, y = _data(31, 16, 40, seed=9, ignored=(0, 30))
    ht, wt, bt = (torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in (h, w, b))
    yt = torch.tensor(y)
    ours = fastloss.linear_cross_entropy(ht, wt, yt, bias=bt, label_smoothing=0.1, chunk_size=8)
    g1 = torch.autograd.grad(ours, (ht, wt, bt))
    theirs = F.linear_cross_entropy(ht, wt, yt, linear_bias=bt, label_smoothing=0.1)
    g2 = torch.autograd.grad(theirs, (ht, wt, bt))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)


def test_torch_compile_fullgraph_and_frozen_head():
    torch = pytest.importorskip("torch")
    require_backend("numba-torch")
    h, w, b, y = _data(21, 8, 30, seed=10)
    ht = torch.tensor(h, dtype=torch.float32, requires_grad=True)
    wt = torch.tensor(w, dtype=torch.float32)  # frozen: no weight gradient is computed or returned
    yt = torch.tensor(y)

    def step(hh):
        return fastloss.linear_cross_entropy(hh, wt, yt, chunk_size=8, label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c = compiled(ht)
    (gc,) = torch.autograd.grad(loss_c, ht)
    loss_e = step(ht)
    (ge,) = torch.autograd.grad(loss_e, ht)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(gc, ge)
    ref = R.linear_cross_entropy(rounded(h, "float32"), rounded(w, "float32"), y, label_smoothing=0.1)
    _close(ge.numpy(), ref[1], 2e-5, "d hidden")
    with torch.no_grad():  # no gradient is computed, nothing is saved
        assert fastloss.linear_cross_entropy(ht, wt, yt).grad_fn is None


def test_torch_upstream_gradient_and_double_backward():
    torch = pytest.importorskip("torch")
    h, w, b, y = _data(10, 4, 9, seed=11)
    ht, wt = (torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in (h, w))
    loss = fastloss.linear_cross_entropy(ht, wt, torch.tensor(y), reduction="sum", chunk_size=3)
    (3.0 * loss).backward()
    ref = R.linear_cross_entropy(rounded(h, "float32"), rounded(w, "float32"), y, reduction="sum")
    _close(ht.grad.numpy(), 3.0 * ref[1], 2e-5, "d hidden x 3")
    _close(wt.grad.numpy(), 3.0 * ref[2], 2e-5, "d weight x 3")
    # A gradient penalty: the gradient came back without a grad_fn, so the penalty silently added
    # nothing to weight.grad (93% off against the unfused pair). Now a clear error.
    loss = fastloss.linear_cross_entropy(ht, wt, torch.tensor(y))
    (g,) = torch.autograd.grad(loss, ht, create_graph=True)
    assert g.grad_fn is not None
    with pytest.raises(RuntimeError, match="no second derivative"):
        (loss + 10 * g.pow(2).sum()).backward()


def test_jax_jit_vmap_and_no_full_logits():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    h, w, b, y = _data(64, 8, 96, seed=12, ignored=(5,))
    hj, wj, bj = (jnp.asarray(a, jnp.float32) for a in (h, w, b))
    yj = jnp.asarray(y)

    def loss(hh, ww, bb, yy):
        return fastloss.linear_cross_entropy(hh, ww, yy, bias=bb, chunk_size=16)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    value, (gh, gw, gb) = grad(hj, wj, bj, yj)
    ref = R.linear_cross_entropy(rounded(h, "float32"), rounded(w, "float32"), y, rounded(b, "float32"))
    _close(value, ref[0], 2e-5, "loss")
    _close(gh, ref[1], 2e-5, "d hidden")
    _close(gw, ref[2], 2e-5, "d weight")
    # The memory property: no (N, C) array anywhere in the compiled training step, only chunks.
    hlo = grad.lower(hj, wj, bj, yj).compile().as_text()
    assert "f32[64,96]" not in hlo and "f32[16,96]" in hlo
    # vmap over a batch of sequences sharing the head
    hb, yb = hj.reshape(4, 16, 8), yj.reshape(4, 16)
    per = jax.vmap(lambda hh, yy: loss(hh, wj, bj, yy))(hb, yb)
    for i in range(4):
        ri = R.linear_cross_entropy(rounded(h[16 * i:16 * i + 16], "float32"), rounded(w, "float32"),
                                    y[16 * i:16 * i + 16], rounded(b, "float32"))
        _close(per[i], ri[0], 2e-5, f"vmap row {i}")


def test_jax_frozen_head_computes_no_weight_gradient():
    # custom_vjp with symbolic zeros: the forward rule sees which inputs are differentiated.
    jax = pytest.importorskip("jax")
    h, w, b, y = _data(32, 8, 40, seed=13)
    hj, wj = jax.numpy.asarray(h, "float32"), jax.numpy.asarray(w, "float32")

    def loss(hh, ww):
        return fastloss.linear_cross_entropy(hh, ww, y, chunk_size=8)

    def dots(argnums):
        return str(jax.make_jaxpr(jax.grad(loss, argnums=argnums))(hj, wj)).count("dot_general")
    assert dots((0, 1)) == 3 and dots(0) == 2 and dots(1) == 2  # per chunk: logits, d hidden, d weight
    g_h = jax.grad(loss)(hj, wj)
    ref = R.linear_cross_entropy(rounded(h, "float32"), rounded(w, "float32"), y)
    _close(g_h, ref[1], 2e-5, "d hidden")


def test_jax_sharded_batch_on_8_devices():
    # Data parallelism: hidden and labels sharded over 8 simulated CPU devices, the head replicated.
    # Under plain jit XLA gathers the hidden states (the chunk scan runs over the sharded axis);
    # inside shard_map each device runs its own rows.
    require_backend("jax")
    code = textwrap.dedent("""
        import numpy as np, jax, jax.numpy as jnp, fastloss
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        assert jax.device_count() == 8
        rng = np.random.default_rng(0)
        h = rng.standard_normal((64, 8)).astype(np.float32)
        w = (rng.standard_normal((40, 8)) / 3).astype(np.float32)
        y = rng.integers(0, 40, 64); y[3] = -100
        f = jax.jit(jax.value_and_grad(lambda hh, ww: fastloss.linear_cross_entropy(hh, ww, jnp.asarray(y),
                                                                                    chunk_size=4), (0, 1)))
        v1, (gh1, gw1) = f(h, w)
        mesh = Mesh(np.array(jax.devices()), ("batch",))
        hs = jax.device_put(h, NamedSharding(mesh, P("batch")))
        v8, (gh8, gw8) = f(hs, w)
        np.testing.assert_allclose(v8, v1, rtol=1e-6)
        np.testing.assert_allclose(gh8, gh1, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(gw8, gw1, rtol=1e-5, atol=1e-7)
        # Per device through shard_map (the replicated head's gradient summed over devices by the
        # custom VJP's backward): the same answer, and no all-gather in the program.
        ys = jax.device_put(jnp.asarray(y), NamedSharding(mesh, P("batch")))
        for red in ("sum", "none"):
            def per_device(hh, ww, yy):
                local = fastloss.linear_cross_entropy(hh, ww, yy, chunk_size=4, reduction=red)
                return jax.lax.psum(jnp.sum(local), "batch") / 63.0  # 63 rows are not ignored
            g = jax.jit(jax.value_and_grad(lambda hh, ww, yy: jax.shard_map(
                per_device, mesh=mesh, in_specs=(P("batch"), P(), P("batch")), out_specs=P())(hh, ww, yy), (0, 1)))
            assert "all-gather" not in g.lower(hs, w, ys).compile().as_text()
            vs, (ghs, gws) = g(hs, w, ys)
            np.testing.assert_allclose(vs, v1, rtol=1e-6)
            np.testing.assert_allclose(ghs, gh1, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(gws, gw1, rtol=1e-5, atol=1e-7)
        print("ok")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"weight": np.zeros((5, 3), np.float32)}, ValueError, "`weight` must have shape"),
    ({"weight": np.zeros((5, 4), np.float64)}, TypeError, "one dtype"),
    ({"labels": np.zeros(6, np.float32)}, TypeError, "`labels` must have an integer dtype"),
    ({"labels": np.zeros(5, np.int64)}, ValueError, "`labels` must have the shape"),
    ({"bias": np.zeros(4, np.float32)}, ValueError, "`bias` must have shape"),
    ({"chunk_size": 0}, ValueError, "`chunk_size`"),
    ({"chunk_size": 2.5}, ValueError, "`chunk_size`"),
    ({"labels": np.full(6, 7)}, ValueError, "class indices in \\[0, 5\\)"),
    ({"temperature": 0.0}, ValueError, "`temperature`"),
])
def test_errors_name_the_argument(kwargs, exc, match):
    args = dict(hidden=np.zeros((6, 4), np.float32), weight=np.zeros((5, 4), np.float32),
                labels=np.zeros(6, np.int64))
    args.update(kwargs)
    h, w, y = args.pop("hidden"), args.pop("weight"), args.pop("labels")
    with pytest.raises(exc, match=match):
        fastloss.linear_cross_entropy(h, w, y, **args)


def test_chunk_planner():
    from fastloss import _chunks
    assert _chunks.rows_per_chunk(8192, 32000) == 512
    assert _chunks.rows_per_chunk(4096, 128256) == 128
    assert _chunks.rows_per_chunk(10, 32000) == 10
    assert _chunks.rows_per_chunk(8192, 32000, chunk_size=100) == 100
    assert _chunks.rows_per_chunk(8192, 32000, free=64 << 20) == 64  # short on memory: smaller chunks
    assert _chunks.rows_per_chunk(8192, 10 ** 7) == 16  # never fewer than 16 rows


def test_jax_backend_needs_no_numba():
    # The XLA path must run where only jax is installed: it imports neither numba nor the FFI module.
    code = ("import sys, jax.numpy as jnp, fastloss\n"
            "fastloss.linear_cross_entropy(jnp.ones((4, 3)), jnp.ones((5, 3)), jnp.zeros(4, jnp.int32), backend='jax')\n"
            "assert 'numba' not in sys.modules and 'fastloss._jax.ffi' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
