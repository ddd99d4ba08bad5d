"""Numba kernel internals: exp2 accuracy in ulps, 16-bit conversions, the split-row path, caching."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import fastloss

from .support import reference as R

numba = pytest.importorskip("numba")
from fastloss.kernels import numba_cpu as K  # noqa: E402
from fastloss.kernels.numba_cpu import approx, base, halfio, intrinsics, plan, rowstats  # noqa: E402
from fastloss.kernels.numba_cpu.options import DenseOptions, SparseOptions  # noqa: E402


def _sparse_ce(x, stride, c, y, loss, lse, g, inv_t, eps, ignore_index, z_loss, scale, want_grad, n_chunks,
               n_workers, short_rows):
    """One call naming the path: split rows (n_chunks > 1), short rows (tiny groups when C <= TINY_ROW
    and rows are back to back) or the block-online path; returns the count of bad labels."""
    opts = SparseOptions(inv_t, eps, z_loss, inv_t * 0, scale)  # no softcap
    if n_chunks > 1:
        return K.sparse_split(x, stride, c, y, loss, lse, g, opts, ignore_index, want_grad, n_chunks, n_workers)
    if short_rows and c <= plan.TINY_ROW and stride == c:
        return K.sparse_tiny(x, c, y, loss, lse, g, opts, ignore_index, want_grad, n_workers)
    kernel = K.sparse_short if short_rows else K.sparse_blocks
    return kernel(x, stride, c, y, loss, lse, g, opts, np.zeros(0, loss.dtype), ignore_index, want_grad, n_workers)


def _dense_ce(x, x_stride, t, t_stride, c, loss, lse, gx, gt, inv_t, eps, scale, want_gx, want_gt, n_workers):
    opts = DenseOptions(inv_t, eps, scale)
    if plan.dense_path(c, x_stride, t_stride) == "tiny":
        return K.dense_tiny(x, t, c, loss, lse, gx, gt, opts, want_gx, want_gt, n_workers)
    return K.dense_blocks(x, x_stride, t, t_stride, c, loss, lse, gx, gt, opts, want_gx, want_gt, n_workers)


@numba.njit(fastmath=base.FASTMATH)
def _apply(f, u, out):
    # Called from a fast-math loop, as the kernels call it (that is where constant folding bites),
    # in a function marked like the kernels' loops, so that 1/(1 + e) is the refined vrcpps estimate.
    intrinsics._use_rcp_estimate()
    for i in range(u.size):
        out[i] = f(u[i])


def _apply_exp2(u, out):
    _apply(approx.exp2_32, u, out)


def _ulp_error(got, ref):
    """|got - ref| in units of the fp32 spacing at ref (ref in float64)."""
    return np.abs(got - ref) / np.spacing(ref.astype(np.float32)).astype(np.float64)


@numba.njit
def _roundtrip_load(bits, out):
    for i in range(bits.size):
        out[i] = halfio._load(bits[i])


@numba.njit
def _roundtrip_store(vals, out):
    for i in range(vals.size):
        out[i] = halfio._store(vals[i], out[i])


def test_exp2_ulp_error_over_dense_sweep():
    u = np.linspace(-125.0, 0.0, 4_000_001, dtype=np.float32)
    out = np.empty_like(u)
    _apply_exp2(u, out)
    ref = np.exp2(u.astype(np.float64))
    err = _ulp_error(out, ref)
    assert err.max() <= 2.5, f"max error {err.max():.3f} ulp"
    assert out[-1] == 1.0  # u = 0: the row max's exp is exactly 1


def test_exp2_special_values():
    u = np.array([-np.inf, np.nan, -np.nan, -126.0, -126.6, -127.0, -1000.0, -3e38, 0.0, -0.0, -1.0], np.float32)
    out = np.empty_like(u)
    _apply_exp2(u, out)
    assert out[0] == 0.0 and np.isnan(out[1]) and np.isnan(out[2])
    # 2^-126 is the smallest normal and exact; from -126.5 down the result is flushed to exactly 0.
    np.testing.assert_array_equal(out[3:], [2.0 ** -126, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.5])


def test_exp2_absolute_error_near_underflow():
    # Below 2^-125 the result may be flushed: the absolute error stays under the smallest normal.
    u = np.linspace(-130.0, -125.0, 100_001, dtype=np.float32)
    out = np.empty_like(u)
    _apply_exp2(u, out)
    assert np.all(np.abs(out - np.exp2(u.astype(np.float64))) <= 2.0 ** -126)


@numba.njit
def _apply_block_max(a, lo, hi):
    return rowstats._block_max(a, lo, hi)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16, np.int16])
def test_block_max_every_span_ignores_nan(dtype):
    # The explicit vector loop (fp32/fp64, and 16-bit bits widened in registers) against NumPy, for
    # spans that start and end at every offset around the unroll.
    rng = np.random.default_rng(5)
    vals = (rng.standard_normal(300) * 50).astype(np.float32)
    vals[rng.integers(0, 300, 20)] = np.nan
    vals[rng.integers(0, 300, 20)] = -np.inf
    if dtype in (np.float32, np.float64):
        a = vals.astype(dtype)
        wide = a.astype(np.float64)
    else:
        import ml_dtypes
        half = ml_dtypes.bfloat16 if dtype == np.uint16 else np.float16
        a = vals.astype(half).view(dtype)
        wide = vals.astype(half).astype(np.float64)
    for lo in (0, 1, 7, 31):
        for hi in (lo, lo + 1, lo + 33, lo + 64, 300):
            got = _apply_block_max(a, lo, hi)
            span = wide[lo:hi]
            span = span[~np.isnan(span)]
            want = span.max() if span.size else -np.inf
            assert got == want, (lo, hi, got, want)


def test_float16_load_every_bit_pattern():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.int16)
    out = np.empty(bits.size, np.float32)
    _roundtrip_load(bits, out)
    expected = bits.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    ok = ~np.isnan(expected)
    np.testing.assert_array_equal(out[ok], expected[ok])


def test_bfloat16_load_every_bit_pattern():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    out = np.empty(bits.size, np.float32)
    _roundtrip_load(bits, out)
    expected = bits.view(ml_dtypes.bfloat16).astype(np.float32)
    ok = ~np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(out), ~ok)
    np.testing.assert_array_equal(out[ok], expected[ok])


def _store_sweep():
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal(200_000) * 10.0 ** rng.integers(-9, 6, 200_000),
             np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65520.0, 1e6, 6e-8, 3e-8, 2.98e-8,
                       1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, 3.4e38])]
    # exact ties between neighbouring 16-bit values (round half to even)
    h = np.arange(0, 0x7C00, 7, dtype=np.uint16).view(np.float16).astype(np.float64)
    parts.append((h[:-1] + h[1:]) / 2)
    return np.concatenate(parts).astype(np.float32)


def test_float16_store_rounds_to_nearest_even():
    vals = _store_sweep()
    out = np.empty(vals.size, np.int16)
    _roundtrip_store(vals, out)
    got = out.view(np.float16)
    with np.errstate(over="ignore"):
        expected = vals.astype(np.float16)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    ok = ~np.isnan(expected)
    np.testing.assert_array_equal(got[ok].view(np.uint16), expected[ok].view(np.uint16))


def test_bfloat16_store_rounds_to_nearest_even():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    vals = _store_sweep()
    out = np.empty(vals.size, np.uint16)
    _roundtrip_store(vals, out)
    expected = vals.astype(ml_dtypes.bfloat16)
    got = out.view(ml_dtypes.bfloat16)
    ok = ~np.isnan(expected.astype(np.float32))
    np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), ~ok)
    np.testing.assert_array_equal(got[ok].view(np.uint16), expected[ok].view(np.uint16))


@pytest.mark.parametrize("eps,z_loss", [(0.0, 0.0), (0.1, 1e-3)])
def test_split_rows_match_whole_rows(eps, z_loss):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 20011)) * 4).astype(np.float32)
    x[0, :5000] = -np.inf         # a fully masked leading chunk
    x[1, 7000:] -= 300.0          # chunks far below the max
    y = np.array([6000, 5, 19999])
    outs = []
    for chunks in (1, 4):
        loss, lse = np.empty(3, np.float32), np.empty(3, np.float32)
        g = np.empty_like(x)
        f32 = np.float32
        bad = _sparse_ce(x.reshape(-1), x.shape[1], x.shape[1], y, loss, lse, g, f32(1 / 1.3), f32(eps), -100, f32(z_loss), f32(1.0), True,
                                     chunks, 2, False)
        assert bad == 0
        outs.append((loss, g))
    ref_loss, ref_g = R.sparse_softmax_cross_entropy(x, y, temperature=1.3, label_smoothing=eps, z_loss=z_loss,
                                                     reduction="none")
    for loss, g in outs:
        if eps == 0.0:
            np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        else:  # ε > 0 with -inf logits: the smoothing term is +inf, as in the reference
            np.testing.assert_array_equal(np.isinf(loss), np.isinf(ref_loss))
        fin = np.isfinite(ref_g)
        np.testing.assert_allclose(g[fin], ref_g[fin], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("short_rows", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_cls", [13, 517, 1031])
def test_gradient_rows_at_every_alignment(dtype, n_cls, short_rows):
    # The gradient pass stores whole aligned vectors (non-temporal) between a scalar head and tail;
    # every start offset within a 32-byte vector must give the same, correct gradient.
    rng = np.random.default_rng(n_cls)
    x = (rng.standard_normal((5, n_cls)) * 3).astype(dtype)
    y = rng.integers(0, n_cls, 5)
    _, ref_g = R.sparse_softmax_cross_entropy(x, y, label_smoothing=0.1, reduction="sum")
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for offset in range(8):
        buf = np.full(x.size + 8, np.nan, dtype)
        g = buf[offset:offset + x.size].reshape(x.shape)
        loss, lse = np.empty(5, dtype), np.empty(5, dtype)
        _sparse_ce(x.reshape(-1), n_cls, n_cls, y, loss, lse, g, dtype(1.0), dtype(0.1), -100, dtype(0.0), dtype(1.0), True, 1, 2,
                               short_rows)
        np.testing.assert_allclose(g, ref_g, rtol=rtol, atol=rtol * 1e-3, err_msg=f"offset {offset}")
        assert np.isnan(buf[:offset]).all() and np.isnan(buf[offset + x.size:]).all()  # nothing outside


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("eps,z_loss,temperature", [(0.0, 0.0, 1.0), (0.1, 1e-3, 1.7)])
@pytest.mark.parametrize("n_cls", [1, 13, 600, plan.SHORT_ROW])
def test_short_row_path_matches_block_path(dtype, eps, z_loss, temperature, n_cls):
    # Rows with C <= SHORT_ROW take plain loops (_short_row); the block-online path must agree with
    # it, and both with the float64 reference, on masked, shifted, NaN, ignored and invalid rows.
    rng = np.random.default_rng(n_cls)
    x = (rng.standard_normal((9, n_cls)) * 4).astype(dtype)
    x[1, : n_cls // 2] = -np.inf          # half-masked row (all of it when C = 1)
    x[2] += dtype(1e5)                    # large offset
    x[3, n_cls // 3] = np.nan             # NaN row
    x[4] *= dtype(3e4 / 4)                # logits around +-3e4
    y = rng.integers(0, n_cls, 9)
    y[1] = n_cls - 1
    y[5] = -100                           # ignored
    x[7, y[7]] += dtype(20)               # confident label: p_y - 1 ~ -C e^-20 must not cancel
    outs = []
    # C <= TINY_ROW with rows back to back takes _tiny_rows; a row stride > C sends the same rows
    # through _short_row.
    padded = np.full((9, n_cls + 3), np.nan, dtype)
    padded[:, :n_cls] = x
    for short, flat, stride in ((True, x.reshape(-1), n_cls), (False, x.reshape(-1), n_cls),
                                (True, padded.reshape(-1)[:8 * (n_cls + 3) + n_cls], n_cls + 3)):
        loss, lse, g = np.empty(9, dtype), np.empty(9, dtype), np.full_like(x, 7.0)
        bad = _sparse_ce(flat, stride, n_cls, y, loss, lse, g, dtype(1 / temperature),
                                     dtype(eps), -100, dtype(z_loss), dtype(0.5), True, 1, 2, short)
        assert bad == 0
        outs.append((loss, g))
    (ls, gs), (lb, gb), (lp, gp) = outs
    np.testing.assert_allclose(lp, lb, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=4 * np.finfo(dtype).eps)
    np.testing.assert_allclose(gp, gb, rtol=1e-4 if dtype == np.float32 else 1e-11, atol=1e-8)
    tight = 1e-5 if dtype == np.float32 else 1e-12
    # The paths sum s in different orders; on the confident row log s ~ 8e-4 is rounded next to 0,
    # which costs a few ulp of 1.0 absolute (every fp32 log-softmax does the same).
    np.testing.assert_allclose(ls, lb, rtol=tight, atol=4 * np.finfo(dtype).eps)
    np.testing.assert_allclose(gs, gb, rtol=tight * 10, atol=tight * 1e-3)
    ref_loss, ref_g = R.sparse_softmax_cross_entropy(x, y, temperature=temperature, label_smoothing=eps,
                                                     z_loss=z_loss, ignore_index=-100, reduction="none")
    np.testing.assert_allclose(ls, ref_loss, rtol=tight * 10, atol=tight)
    np.testing.assert_allclose(gs, ref_g * 0.5, rtol=tight * 100, atol=tight * 1e-3)
    assert np.isnan(ls[3]) and np.isnan(gs[3]).all()
    assert ls[5] == 0 and (gs[5] == 0).all()
    if n_cls > 1:  # the label's gradient on the confident row, relative to its own (tiny) size
        for g_ in (gs, gb):
            np.testing.assert_allclose(g_[7, y[7]], ref_g[7, y[7]] * 0.5, rtol=tight * 10)
    y[6] = n_cls                          # out of range: counted, NaN row
    loss, lse, g = np.empty(9, dtype), np.empty(9, dtype), np.empty_like(x)
    assert _sparse_ce(x.reshape(-1), n_cls, n_cls, y, loss, lse, g, dtype(1.0), dtype(0.0), -100,
                                  dtype(0.0), dtype(1.0), True, 1, 2, True) == 1
    assert np.isnan(loss[6]) and np.isnan(g[6]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, "bfloat16"])
@pytest.mark.parametrize("n_cls", [1, 7, plan.TINY_ROW])
def test_tiny_rows_across_groups_and_workers(dtype, n_cls):
    # _tiny_rows works in groups of TINY_GROUP // C rows; rows near group and worker boundaries
    # (ignored, out-of-range, NaN, masked, confident) must come out as in the float64 reference.
    rows = max(1, rowstats.TINY_GROUP // n_cls)
    n = 2 * rows + 5
    rng = np.random.default_rng(n_cls)
    x64 = rng.standard_normal((n, n_cls)) * 3
    y = rng.integers(0, n_cls, n)
    y[rows - 1] = -100                      # ignored, last row of a group
    x64[rows, 0] = np.nan                   # NaN, first row of the next group
    x64[n // 2, : n_cls // 2] = -np.inf     # masked half, at the worker boundary
    y[n // 2] = n_cls - 1
    x64[n - 1, y[n - 1]] += 20              # confident label, last row
    if dtype == "bfloat16":
        bits = np.asarray(x64, np.float32).view(np.uint32) + 0x8000 >> 16  # round to bf16 bits
        flat = bits.astype(np.uint16).reshape(-1)
        x64 = (flat.astype(np.uint32) << 16).view(np.float32).astype(np.float64).reshape(n, n_cls)
        acc, g = np.float32, np.empty((n, n_cls), np.uint16)
    else:
        flat = x64.astype(dtype).reshape(-1)
        x64 = flat.astype(np.float64).reshape(n, n_cls)
        acc, g = dtype, np.empty((n, n_cls), dtype)
    loss, lse = np.empty(n, acc), np.empty(n, acc)
    assert _sparse_ce(flat, n_cls, n_cls, y, loss, lse, g, acc(1.0), acc(0.0), -100, acc(0.0),
                                  acc(1.0), True, 1, 2, True) == 0
    if dtype == "bfloat16":
        g = (g.astype(np.uint32) << 16).view(np.float32)
    ref_loss, ref_g = R.sparse_softmax_cross_entropy(x64, y, ignore_index=-100, reduction="none")
    tol = {np.float32: 1e-5, np.float64: 1e-12, "bfloat16": 1e-2}[dtype]
    ok = ~np.isnan(ref_loss)
    np.testing.assert_allclose(loss[ok], ref_loss[ok], rtol=tol, atol=tol)
    np.testing.assert_allclose(g[ok], ref_g[ok], rtol=tol * 10, atol=tol * 1e-3)
    assert np.isnan(loss[rows]) and np.isnan(g[rows]).all()
    assert loss[rows - 1] == 0 and (g[rows - 1] == 0).all()
    if dtype != "bfloat16" and n_cls > 1:  # the confident label's gradient keeps its relative accuracy
        # (rtol 1e-9 for fp64: the reference forms p_y - 1 itself, to 1e-16 absolute of 1.6e-6)
        np.testing.assert_allclose(g[n - 1, y[n - 1]], ref_g[n - 1, y[n - 1]], rtol=max(tol * 10, 1e-9))
    y[rows + 1] = n_cls                     # out of range inside a group: counted, NaN row
    assert _sparse_ce(flat, n_cls, n_cls, y, loss, lse, g, acc(1.0), acc(0.0), -100, acc(0.0),
                                  acc(1.0), True, 1, 2, True) == 1
    assert np.isnan(loss[rows + 1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("eps,temperature", [(0.0, 1.0), (0.1, 1.7)])
@pytest.mark.parametrize("n_cls", [1, 7, plan.TINY_ROW])
def test_dense_tiny_rows_match_block_path_and_reference(dtype, eps, temperature, n_cls):
    # Dense CE rows of <= TINY_ROW classes back to back go through _dense_tiny_rows in groups of
    # TINY_GROUP // C rows; a row stride > C sends the same rows through _dense_row. Both must agree
    # with the float64 reference, gradients to logits and targets included, across group and
    # worker boundaries and on masked, NaN and shifted rows.
    rows = max(1, rowstats.TINY_GROUP // n_cls)
    n = 2 * rows + 3
    rng = np.random.default_rng(n_cls)
    x = (rng.standard_normal((n, n_cls)) * 3).astype(dtype)
    t = rng.random((n, n_cls)).astype(dtype)
    t /= t.sum(axis=1, keepdims=True)
    x[rows, : n_cls // 2] = -np.inf          # masked classes ...
    t[rows, : n_cls // 2] = 0                # ... with zero target: finite loss
    x[rows + 1, 0] = np.nan                  # NaN row, inside a group
    x[n // 2] += dtype(1e5)                  # large offset, at the worker boundary
    outs = []
    for stride in (n_cls, n_cls + 3):
        xp = np.full((n, stride), np.nan, dtype)
        tp = np.full((n, stride), np.nan, dtype)
        xp[:, :n_cls], tp[:, :n_cls] = x, t
        xf = xp.reshape(-1)[:(n - 1) * stride + n_cls]
        tf = tp.reshape(-1)[:(n - 1) * stride + n_cls]
        loss, lse = np.empty(n, dtype), np.empty(n, dtype)
        gx, gt = np.full((n, n_cls), 7, dtype), np.full((n, n_cls), 7, dtype)
        _dense_ce(xf, stride, tf, stride, n_cls, loss, lse, gx, gt, dtype(1 / temperature), dtype(eps),
                              dtype(0.5), True, True, 2)
        outs.append((loss, gx, gt))
    ref_loss, ref_gx, ref_gt = R.softmax_cross_entropy(x, t, temperature=temperature, label_smoothing=eps,
                                                       reduction="none")
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for loss, gx, gt in outs:
        ok = ~np.isnan(ref_loss)
        if eps == 0:
            np.testing.assert_allclose(loss[ok], ref_loss[ok], rtol=tol * 10, atol=tol)
        else:  # ε > 0 puts target mass on the masked classes: +inf loss there, as in the reference
            np.testing.assert_array_equal(np.isinf(loss[ok]), np.isinf(ref_loss[ok]))
            fin = ok & np.isfinite(ref_loss)
            np.testing.assert_allclose(loss[fin], ref_loss[fin], rtol=tol * 10, atol=tol)
        fin = np.isfinite(ref_gx)
        np.testing.assert_allclose(gx[fin], ref_gx[fin] * 0.5, rtol=tol * 100, atol=tol * 1e-3)
        fin = np.isfinite(ref_gt)
        np.testing.assert_allclose(gt[fin], ref_gt[fin] * 0.5, rtol=tol * 100, atol=tol)
        assert np.isnan(loss[rows + 1]) and np.isnan(gx[rows + 1]).all()
    np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=tol * 10, atol=tol * 1e-3)


@pytest.mark.parametrize("shape", [(8, 5000), (1, 262144), (64, 100)], ids=["block-path", "split-row", "short-row"])
def test_confident_label_gradient_keeps_relative_accuracy(shape):
    # p_y = 1 - O(1e-5): the label's gradient must come from the sum of the other classes, not from
    # s = 1 + small (rounded next to 1 in fp32, 0.8% error in an earlier version).
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(shape) * 2).astype(np.float32)
    y = rng.integers(0, shape[1], shape[0])
    x[0, y[0]] = x[0].max() + np.float32(18)
    loss, g = fastloss.value_and_grad(fastloss.sparse_softmax_cross_entropy)(x, y, reduction="sum", backend="numba")
    ref_loss, ref_g = R.sparse_softmax_cross_entropy(x, y, reduction="sum")
    assert 0 < -ref_g[0, y[0]] < 1e-3
    np.testing.assert_allclose(g[0, y[0]], ref_g[0, y[0]], rtol=1e-5)
    np.testing.assert_allclose(g, ref_g, rtol=1e-4, atol=1e-10)


def test_single_long_row_uses_all_threads_and_is_correct():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 262144)).astype(np.float32)
    y = np.array([12345])
    loss, g = fastloss.value_and_grad(fastloss.sparse_softmax_cross_entropy)(x, y, label_smoothing=0.1)
    ref = R.sparse_softmax_cross_entropy(x, y, label_smoothing=0.1)
    np.testing.assert_allclose(loss, ref[0], rtol=1e-5)
    np.testing.assert_allclose(g, ref[1], rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("loss,shape", [("sparse_softmax_cross_entropy", (32, 10)),
                                        ("sparse_softmax_cross_entropy", (8, 1000)),
                                        ("softmax_cross_entropy", (32, 10)), ("mean_squared_error", (300,)),
                                        ("softmax_focal_loss", (16, 40))])
def test_small_calls_run_on_the_calling_thread_with_the_same_numbers(monkeypatch, loss, shape):
    # Below plan.SERIAL_MAX_ELEMENTS a call runs with one worker (no pool wake-up): the same rows
    # in the same order, so the same bits as the pool's run; the caller's thread count comes back.
    import numba
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(np.float32)
    if loss.startswith(("sparse", "softmax_focal")):
        other = rng.integers(0, shape[-1], shape[:-1])
    elif loss == "softmax_cross_entropy":
        other = rng.dirichlet(np.ones(shape[-1]), shape[0]).astype(np.float32)
    else:
        other = rng.standard_normal(shape).astype(np.float32)
    vg = fastloss.value_and_grad(getattr(fastloss, loss))
    before = numba.get_num_threads()
    serial = vg(x, other)
    assert numba.get_num_threads() == before
    monkeypatch.setattr(plan, "SERIAL_MAX_ELEMENTS", 0)
    pooled = vg(x, other)
    np.testing.assert_array_equal(np.asarray(serial[0]), np.asarray(pooled[0]))
    np.testing.assert_array_equal(serial[1], pooled[1])
    if loss.startswith("sparse"):  # and after a call that raised (a label out of range)
        monkeypatch.setattr(plan, "SERIAL_MAX_ELEMENTS", 1 << 15)
        with pytest.raises(ValueError, match="labels"):
            vg(x, np.full(shape[:-1], shape[-1]))
        assert numba.get_num_threads() == before


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16"])
@pytest.mark.parametrize("loss,opts", [("huber", dict(delta=0.6)), ("mean_squared_error", {}),
                                       ("sigmoid_cross_entropy", dict(label_smoothing=0.1)),
                                       ("sigmoid_focal_loss", dict(gamma=2.0)),
                                       ("sigmoid_focal_loss", dict(gamma=0.7, apply_class_balancing=True,
                                                                   label_smoothing=0.1))])
def test_elementwise_kernels_across_blocks_and_alignments(loss, opts, dtype):
    # Lengths around the kernels' BLOCK and the non-temporal store's vector width, with views that
    # start off a 32-byte boundary: each block's scalar head, vector body and tail against float64.
    from .support.harness import np_dtype, rounded
    rng = np.random.default_rng(len(loss))
    for n, start in ((1, 0), (7, 1), (K.BLOCK - 1, 3), (K.BLOCK + 5, 1), (3 * K.BLOCK + 17, 0)):
        p = (rng.standard_normal(n + start) * 2).astype(np_dtype(dtype))[start:]
        t = rng.random(n + start).astype(np_dtype(dtype))[start:]
        for reduction in ("sum", "none"):
            got = getattr(fastloss, loss)(p, t, reduction=reduction, backend="numba", **opts)
            ref = R.LOSSES[loss](rounded(p, dtype), rounded(t, dtype), reduction=reduction, **opts)
            np.testing.assert_allclose(np.asarray(got, np.float64), ref[0], rtol=2e-5, atol=1e-6)
        _, g = fastloss.value_and_grad(getattr(fastloss, loss))(p, t, reduction="sum", backend="numba", **opts)
        g_ref = rounded(ref[1], dtype)
        tol = {"float32": 2e-6, "float64": 1e-12, "bfloat16": 8e-3, "float16": 1e-3}[dtype]
        np.testing.assert_allclose(rounded(g, dtype), g_ref, rtol=tol, atol=tol)


def test_strided_inputs():
    rng = np.random.default_rng(3)
    base = rng.standard_normal((10, 40)).astype(np.float32)
    x = base[::2, ::3]                      # neither rows nor columns contiguous
    y = rng.integers(0, x.shape[1], 5)
    loss, g = fastloss.value_and_grad(fastloss.sparse_softmax_cross_entropy)(x, y)
    ref = R.sparse_softmax_cross_entropy(x, y)
    np.testing.assert_allclose(loss, ref[0], rtol=1e-6)
    np.testing.assert_allclose(g, ref[1], rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(base[::2, ::3], x)


@pytest.mark.parametrize("shape,pad", [((7, 13), 3), ((3, 5, 17), 7), ((4, 32001), 63), ((1, 9), 5)])
def test_row_strided_logits_are_streamed_without_a_copy(shape, pad):
    from fastloss._numpy.launch import row_view
    rng = np.random.default_rng(sum(shape))
    base = (rng.standard_normal(shape[:-1] + (shape[-1] + pad,)) * 4).astype(np.float32)
    x = base[..., :shape[-1]]               # a padded vocabulary: rows strided, classes contiguous
    assert not x.flags.c_contiguous or x.shape[0] == 1  # one row is trivially contiguous
    flat, stride, n = row_view(x, shape[-1])
    assert np.shares_memory(flat, base) and n == int(np.prod(shape[:-1]))
    assert stride == (shape[-1] + pad if n > 1 else shape[-1])
    assert flat.size == (n - 1) * stride + shape[-1]  # ends at the last row's last class
    y = rng.integers(0, shape[-1], shape[:-1])
    for kw in ({}, {"label_smoothing": 0.1, "z_loss": 1e-3, "temperature": 1.7}):
        loss, g = fastloss.value_and_grad(fastloss.sparse_softmax_cross_entropy)(x, y, **kw)
        ref = R.sparse_softmax_cross_entropy(x, y, **kw)
        np.testing.assert_allclose(loss, ref[0], rtol=1e-5)
        np.testing.assert_allclose(g, ref[1], rtol=1e-4, atol=1e-9)
        assert g.flags.c_contiguous and g.shape == x.shape
    t = rng.random(shape[:-1] + (shape[-1] + 2 * pad,)).astype(np.float32)[..., pad:pad + shape[-1]]
    loss, g = fastloss.value_and_grad(fastloss.softmax_cross_entropy)(x, t)
    ref = R.softmax_cross_entropy(x, t)
    np.testing.assert_allclose(loss, ref[0], rtol=1e-5)
    # p Σq - q cancels where p ~ q: fp32 error relative to the gradient's scale, not per element
    np.testing.assert_allclose(g, ref[1], rtol=1e-4, atol=1e-6 * np.abs(ref[1]).max())


def test_layouts_that_cannot_stream_are_copied_and_correct():
    from fastloss._numpy.launch import row_view
    rng = np.random.default_rng(8)
    base = rng.standard_normal((6, 10)).astype(np.float32)
    for x in (base[::-1], base[:, ::2], np.broadcast_to(base[:1], (4, 10)), base.T):
        flat, stride, n = row_view(x, x.shape[-1])
        assert not np.shares_memory(flat, base) and stride == x.shape[-1]
        y = rng.integers(0, x.shape[-1], x.shape[0])
        loss, g = fastloss.value_and_grad(fastloss.sparse_softmax_cross_entropy)(x, y)
        np.testing.assert_allclose(loss, R.sparse_softmax_cross_entropy(x, y)[0], rtol=1e-5)


def test_torch_row_strided_view_autograd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    base = torch.from_numpy(rng.standard_normal((6, 40)).astype(np.float32))
    for dtype, rtol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        leaf = base.to(dtype).clone().requires_grad_()
        x = leaf[:, :33]
        y = torch.from_numpy(rng.integers(0, 33, 6))
        fastloss.sparse_softmax_cross_entropy(x, y).backward()
        ref = R.sparse_softmax_cross_entropy(x.detach().float().numpy(), y.numpy())[1]
        np.testing.assert_allclose(leaf.grad[:, :33].float().numpy(), ref, rtol=rtol, atol=1e-3 * rtol)
        assert (leaf.grad[:, 33:] == 0).all()


def test_torch_non_contiguous_and_bf16_autograd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    x64 = rng.standard_normal((6, 9))
    xt = torch.tensor(x64).to(torch.bfloat16).t().contiguous().t().requires_grad_()  # column-major
    y = torch.tensor(rng.integers(0, 9, 6))
    loss = fastloss.sparse_softmax_cross_entropy(xt, y, temperature=2.0)
    loss.backward()
    ref = R.sparse_softmax_cross_entropy(xt.detach().double().numpy(), y.numpy(), temperature=2.0)
    assert loss.dtype == torch.float32 and xt.grad.dtype == torch.bfloat16
    np.testing.assert_allclose(loss.item(), ref[0], rtol=1e-5)
    np.testing.assert_allclose(xt.grad.double().numpy(), ref[1], rtol=1.6e-2, atol=1e-4)


def test_torch_upstream_gradient_scales_the_fused_gradient():
    torch = pytest.importorskip("torch")
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (4,))
    (3.0 * fastloss.sparse_softmax_cross_entropy(x, y)).backward()
    ref = R.sparse_softmax_cross_entropy(x.detach().numpy(), y.numpy())[1] * 3.0
    np.testing.assert_allclose(x.grad.numpy(), ref, rtol=1e-12)


def test_kernels_are_cached_on_disk(tmp_path):
    code = ("import numpy as np, fastloss\n"
            "from fastloss.kernels import numba_cpu as K\n"
            "x = np.random.rand(3, 5).astype(np.float32); y = np.zeros(3, np.int64)\n"
            "fastloss.value_and_grad(fastloss.sparse_softmax_cross_entropy)(x, y)\n"
            "print(sum(K.sparse_tiny.stats.cache_hits.values()))\n")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.split()[-1] == "0" and int(second.stdout.split()[-1]) >= 1


def test_log1p_01_ulp_error():
    e = np.concatenate([np.linspace(0, 1, 2_000_001, dtype=np.float32),
                        np.logspace(-45, 0, 100_000).astype(np.float32)])
    out = np.empty_like(e)
    _apply(approx.log1p_01, e, out)
    ref = np.log1p(e.astype(np.float64))
    ok = ref > 0
    err = _ulp_error(out[ok], ref[ok])
    # w G(e): the reciprocal's error and two roundings on top of G's. Measured 3.58 on Zen 1 (2.86
    # with the exact-to-rounding third-order reciprocal); the bound leaves room for the 0.4 ulp
    # more that the x86 specification of vrcpps allows (see test_recip_1p_01_ulp_error).
    assert err.max() <= 4.0, f"max error {err.max():.3f} ulp"
    assert out[e == 0].max() == 0.0
    nan = np.array([np.nan], np.float32)
    _apply(approx.log1p_01, nan, nan)
    assert np.isnan(nan[0])


def test_recip_1p_01_ulp_error():
    e = np.concatenate([np.linspace(0, 1, 2_000_001, dtype=np.float32),
                        np.logspace(-45, 0, 100_000).astype(np.float32), np.float32([np.nan])])
    out = np.empty_like(e)
    _apply(approx.recip_1p_01, e, out)
    ref = 1.0 / (1.0 + e[:-1].astype(np.float64))
    err = _ulp_error(out[:-1], ref)
    # One Newton step leaves -h^2 relative for the estimate's error h: |h| <= 3.2e-4 measured on Zen 1
    # (1.88 ulp measured), |h| <= 1.5 * 2^-12 by the x86 specification, i.e. <= 2.25 ulp of a
    # result in (1/2, 1], plus 0.5 for the rounding.
    assert err.max() <= 2.75, f"max error {err.max():.3f} ulp"
    assert np.isnan(out[-1])


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 instruction names")
def test_recip_uses_the_hardware_estimate():
    # What the sigmoid kernel relies on for speed: in a marked function LLVM lowers the division in
    # _recip_core to (v)rcpps/(v)rcpss instead of a divide. An LLVM or llvmlite change that drops the
    # attribute would make the kernel slower (never wrong); this test makes that visible.
    e = np.linspace(0, 1, 64, dtype=np.float32)
    out = np.empty_like(e)
    _apply(approx.recip_1p_01, e, out)
    asm = "\n".join(a for sig, a in _apply.inspect_asm().items() if "recip_1p_01" in str(sig[0]))
    assert "rcpps" in asm and "divps" not in asm


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="an x86 target")
@pytest.mark.skipif(bool(os.environ.get("NUMBA_CPU_NAME")), reason="already running for a named target")
def test_kernels_on_a_second_cpu_target(tmp_path):
    # The machines this suite runs on change CPU (AVX2 one day, AVX-512 the next), and LLVM picks
    # different instructions, vector widths and FMA contractions for each. Run this module's kernel
    # tests once more, compiled for Haswell (AVX2 + FMA + F16C: the baseline the kernels are written
    # for), in a fresh process with its own cache: on an AVX-512 host that is the AVX2 code path.
    # What rounding can change is covered once: the approximations' ulp bounds, the 16-bit loads and
    # stores, and each row kernel path (sparse short, blocks, tiny, split; dense tiny, blocks) in
    # float32 (and bfloat16 for the grouped tiny rows). Left out: float64 (fp64 accumulation has
    # ~2^29 times fp32's margin), the elementwise kernels (per element, the approximations tested
    # here, then a blocked sum), layouts and the torch glue (no arithmetic of their own), the planner
    # and the cache. Every kernel specialisation costs 10-25 s to compile for the second target on 2
    # cores: the whole module took 335 s in CI, this ~110 s.
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES="", NUMBA_CACHE_DIR=str(tmp_path))
    skip = ("cached_on_disk", "second_cpu_target", "planner", "float64", "torch", "strided", "layouts",
            "elementwise")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", __file__,
           "-k", " and ".join(f"not {k}" for k in skip)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


def test_planner_picks_each_path_and_compiles_only_it():
    assert plan.sparse_path(65536, 10, 10, 2) == ("tiny", 1)
    assert plan.sparse_path(65536, 10, 16, 2) == ("short", 1)       # row-strided: not back to back
    assert plan.sparse_path(4096, 1000, 1000, 2) == ("short", 1)
    assert plan.sparse_path(4096, 32000, 32000, 2) == ("blocks", 1)
    # class weights or a softcap: the whole-row kernels only
    assert plan.sparse_path(65536, 10, 10, 2, plain=False) == ("short", 1)
    assert plan.sparse_path(1, 262144, 262144, 2, plain=False) == ("blocks", 1)
    assert plan.sparse_path(1, 262144, 262144, 2) == ("split", 4)
    assert plan.sparse_path(8, 262144, 262144, 8) == ("split", 2)
    assert plan.dense_path(10, 10, 10) == "tiny" and plan.dense_path(10, 12, 10) == "blocks"
    # A process compiles (or loads from the cache) the entry point its shape takes, and no other. The
    # shared cache: a private one would compile a parallel kernel again for this test alone (~20 s).
    code = ("import numpy as np, fastloss\n"
            "from fastloss.kernels import numba_cpu as K\n"
            "x = np.random.rand(4, 1000).astype(np.float32); y = np.zeros(4, np.int64)\n"
            "fastloss.value_and_grad(fastloss.sparse_softmax_cross_entropy)(x, y)\n"
            "print(sorted(k for k, f in K.SPARSE.items() if getattr(f, 'signatures', None)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == "['short']"


def test_tanh_32_ulp_error_and_special_values():
    u = np.concatenate([np.linspace(-12, 12, 2_000_001, dtype=np.float32),
                        np.logspace(-40, 1, 100_000).astype(np.float32),
                        -np.logspace(-40, 1, 100_000).astype(np.float32)])
    out = np.empty_like(u)
    _apply(approx.tanh_32, u, out)
    ref = np.tanh(u.astype(np.float64))
    ok = ref != 0
    err = _ulp_error(out[ok], ref[ok])
    # The rational fit's 2.1e-8 relative (0.35 ulp) plus the roundings of P and Q (four FMAs each, their
    # relative errors adding in P / Q), the divide and the multiply by u: 5.3 ulp measured here.
    assert err.max() <= 6.5, f"max error {err.max():.3f} ulp"
    assert np.all(out[u == 0] == 0) and np.all(np.abs(out) <= 1.0)
    special = np.array([np.inf, -np.inf, np.nan, 1e30, -1e30], np.float32)
    got = np.empty_like(special)
    _apply(approx.tanh_32, special, got)
    assert got[0] == 1.0 and got[1] == -1.0 and np.isnan(got[2]) and got[3] == 1.0 and got[4] == -1.0
