"""Launch configurations (class blocks, warps) and every specialisation the dispatch can launch, for the
ahead-of-time compilation checks."""
from __future__ import annotations

import triton

from .cross_entropy import dense_ce_kernel, sparse_ce_kernel
from .distill import distill_kernel
from .elementwise import huber_kernel, sigmoid_ce_kernel, sigmoid_focal_kernel, squared_error_kernel
from .focal import softmax_focal_kernel

# Register budget: these kernels are memory-bound, so they must keep loads in flight: at most 128
# registers per thread (two 256-thread blocks per SM at least). The sizes below hold 8 values of 16
# or 32 bits per thread (4 of fp64, which take two registers each) at 8 warps; larger blocks need
# more registers than that (tests/test_triton.py reads them from the compiled cubin).


def is_f64(dtype):
    return str(dtype).endswith("float64")


def row_block(n_cols, interpret, dtype="float32"):
    """Power-of-two class block for the row kernels: whole small rows, else 2048 classes (1024 in
    fp64) on a GPU; 2048 in the interpreter too, where each block is one NumPy operation."""
    cap = 1024 if is_f64(dtype) and not interpret else 2048
    return min(cap, max(16, triton.next_power_of_2(n_cols)))


def elem_block():
    """Elements per program of the elementwise kernels: 2 per thread at 8 warps. At 4 per thread
    ptxas spilled 8 bytes in the sigmoid focal loss's fp16 gradient for sm_80 (48 registers used,
    `ptxas -v`), and fp64 needed 143 registers; at 512 every variant stays <= 78, unspilled."""
    return 512


def distill_block(n_cols, interpret, dtype="float32"):
    """Distillation holds blocks of two rows and their log-probabilities at once: at most 2048
    classes per block (1024 in fp64 on a GPU), as the cross-entropies."""
    return row_block(n_cols, interpret, dtype)


def num_warps(block):
    return 8 if block >= 1024 else 4


PTR = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "float64": "*fp64"}


def _row_specializations():
    """Every (kernel, signature, constexprs, num_warps) the dispatch can launch, for ahead-of-time
    compilation checks (tests/test_triton.py compiles each for sm_80 and sm_90 without a GPU).

    Input dtypes x flag combinations at the largest class block, plus the smallest block for fp32;
    targets share the logits' dtype (the common case: a mixed pair compiles through the same code).
    """
    import itertools
    out = []
    bools = (False, True)
    for dt in ("float16", "bfloat16", "float32", "float64"):
        x, acc = PTR[dt], "*fp64" if dt == "float64" else "*fp32"
        f64 = dt == "float64"
        big = row_block(1 << 20, False, dt)
        blocks = (big, 16) if dt == "float32" else (big,)
        # class weights and softcap: with smoothing and z-loss on (their longest code), gradient wanted
        options = [(sm, zl, False, False, g) for sm, zl, g in itertools.product(bools, bools, bools)]
        options += [(True, True, cap, wt, True) for cap, wt in ((True, False), (False, True), (True, True))]
        for block, (smooth, zl, cap, wt, grad) in itertools.product(blocks, options):
            sig = dict(X=x, stride_x="i64", Y="*i64", LOSS=acc, LSE=acc, G=x, stride_g="i64", PARAMS=acc, W=acc,
                       n_cols="i32", ignore_index="i32")
            const = dict(BLOCK=block, HAS_SMOOTH=smooth, HAS_ZLOSS=zl, HAS_CAP=cap, HAS_WEIGHT=wt, WANT_GRAD=grad,
                         ACC_F64=f64)
            out.append((sparse_ce_kernel, sig, const, num_warps(block)))
        for block, gx, gt in itertools.product(blocks, bools, bools):
            sig = dict(X=x, stride_x="i64", T=x, stride_t="i64", LOSS=acc, LSE=acc, GX=x, stride_gx="i64", GT=x,
                       stride_gt="i64", PARAMS=acc, n_cols="i32")
            out.append((dense_ce_kernel, sig, dict(BLOCK=block, WANT_GX=gx, WANT_GT=gt, ACC_F64=f64),
                        num_warps(block)))
        for kern, names in ((sigmoid_ce_kernel, ("WANT_GX", "WANT_GT")), (squared_error_kernel, ("WANT_GP", "WANT_GT")),
                            (huber_kernel, ("WANT_GP", "WANT_GT")), (sigmoid_focal_kernel, ("WANT_GX", "WANT_GT"))):
            for w_out, g1, g2 in itertools.product(bools, bools, bools):
                first = "P" if names[0] == "WANT_GP" else "X"
                grad1 = "GP" if names[0] == "WANT_GP" else "GX"
                sig = {first: x, "T": x, "OUT": acc, "PARTIAL": acc, grad1: x, "GT": x, "PARAMS": acc, "n": "i32"}
                const = {"BLOCK": elem_block(), "WANT_OUT": w_out, names[0]: g1, names[1]: g2, "ACC_F64": f64}
                out.append((kern, sig, const, 8))
        # distillation: every flag combination in fp32, the training case (labels, student gradient)
        # in the other dtypes (each specialisation costs ~0.7 s per architecture to compile)
        for div, labels, gs, gt in itertools.product((0, 1, 2), bools, bools, bools):
            if dt != "float32" and not (labels and gs and not gt):
                continue
            block = distill_block(1 << 20, False, dt)
            sig = dict(S=x, stride_s="i64", T=x, stride_t="i64", Y="*i64", LOSS=acc, GS=x, stride_gs="i64", GT=x,
                       stride_gt="i64", PARAMS=acc, n_cols="i32", ignore_index="i64")
            const = dict(BLOCK=block, DIV=div, HAS_LABELS=labels, WANT_GS=gs, WANT_GT=gt, ACC_F64=f64)
            out.append((distill_kernel, sig, const, num_warps(block)))
    return out


def gamma_int(gamma):
    """GAMMA_INT for a γ: 0-3 for those integers, -1 otherwise."""
    return int(gamma) if gamma in (0.0, 1.0, 2.0, 3.0) else -1


def _focal_specializations():
    """The focal kernel's configurations for the ahead-of-time checks (as _row_specializations):
    every γ path and gradient flag in fp32 at the largest block (labels without per-class α, dense
    targets with them), the training case (γ = 2, gradient to the logits) in the other dtypes."""
    import itertools
    out = []
    bools = (False, True)
    for dt in ("float16", "bfloat16", "float32", "float64"):
        x, acc = PTR[dt], "*fp64" if dt == "float64" else "*fp32"
        block = row_block(1 << 20, False, dt)
        for dense, gi, gx, gt, label_only in itertools.product(bools, (0, 1, 2, 3, -1), bools, bools, bools):
            has_alpha = dense  # labels without per-class α, dense targets with them: both code paths
            if gt and not dense or not (gx or gt) or dt != "float32" and not (gi == 2 and gx and not gt):
                continue
            if label_only and dense or not label_only and not dense and gi not in (2, -1):
                continue  # labels: every γ path label-only; the smoothed (general) path for two γ
            sig = dict(X=x, stride_x="i64", T=x, stride_t="i64", Y="*i64", LOSS=acc, GX=x, stride_gx="i64", GT=x,
                       stride_gt="i64", PARAMS=acc, A=acc, n_cols="i32", ignore_index="i64")
            const = dict(BLOCK=block, DENSE=dense, HAS_ALPHA=has_alpha, GAMMA_INT=gi, LABEL_ONLY=label_only,
                         WANT_GX=gx, WANT_GT=gt, ACC_F64=dt == "float64")
            out.append((softmax_focal_kernel, sig, const, num_warps(block)))
    return out


def specializations():
    """Every (kernel, signature, constexprs, num_warps) the dispatch can launch: the row and elementwise
    kernels' and the focal kernel's."""
    return _row_specializations() + _focal_specializations()
