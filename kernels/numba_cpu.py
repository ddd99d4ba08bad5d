"""Numba CPU kernels: fused loss + gradient, parallel over rows, with a vectorisable exp.

Layout of every kernel: one call computes per-row (or per-block) fp32 losses, the log-sum-exp and,
when asked, the gradient, already multiplied by ``scale`` = d total / d row (1/count for "mean"), so
the common training step needs no second pass. Rows are processed while they sit in cache:

    pass 1  max                      (reads a block of the row from memory)
    pass 2  sum exp(z - m)           (block in L1; exps kept in a per-worker scratch row)
    pass 3  gradient = p * a - b     (scratch in L2, one non-temporal write)

which is the floor of one read of the logits and one write of the gradient. Cross-entropy rows
are addressed as ``x[i * row_stride : i * row_stride + C]`` in a flat buffer, so row-strided
inputs (a padded vocabulary) need no copy. Rows that are long and few (fewer rows than 2x
threads) are split into chunks so that every thread has work; that costs a second read of each
chunk. Short rows go the other way: up to SHORT_ROW classes a row takes plain loops (no per-block
bookkeeping), and rows of at most TINY_ROW classes stored back to back are batched into groups of
TINY_GROUP elements, so that the exp and the gradient run as one vector loop over many rows.

Vectorisation is the whole game on CPU, and three things decide it here: loop indices are
unsigned (``_u``: Numba's negative-index wrap is a per-element select otherwise); the exp and
log1p are branch-free polynomials without division; and two loops that LLVM will not vectorise
well from scalar code are emitted as explicit vector IR (``_block_max_vec``, ``_nt_axpb``).

Dtypes: float32/float64 arrays directly; 16-bit data as raw bits, because Numba has no float16 on
CPU: **bfloat16 as uint16, float16 as int16** (a view, no copy). ``_load`` widens to fp32 and
``_store`` rounds to nearest-even, both branch-free so loops stay vectorised. Accumulation is fp32
(fp64 for fp64 input); the scalar parameters arrive already in that dtype, because a Python float
literal would silently promote fp32 arithmetic to fp64.

Fast-math: ``FASTMATH`` is chosen once here. It allows reassociation (vectorised reductions),
contraction (FMA), reciprocal and no-signed-zero rewrites, but never ``nnan``/``ninf``: NaN rows and
-inf masks are part of the contract. (One division carries ``ninf``, 1 / (1 + e) in the sigmoid,
whose operands cannot be infinite: see _RCP_FLAGS.) The exp and log1p are compiled without ``reassoc``, so that
their Horner evaluation order (and so their measured accuracy) is the one written.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
import numba
from numba import njit, prange, types
from numba.extending import intrinsic, overload

FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
_EXP_FLAGS = {"contract", "nsz"}
# error_model="numpy": float division by zero gives inf/NaN (IEEE) instead of raising.
_JIT = dict(fastmath=FASTMATH, cache=True, nogil=True, error_model="numpy")


# ------------------------------------------------------------------------------- bit casts
@intrinsic
def _f32_from_bits(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as a float32 (Numba widens int32 arithmetic to
    int64, so wider integers are truncated here rather than cast at every call site)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        if bits.bitwidth > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif bits.bitwidth < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())
    return types.float32(bits), codegen


@intrinsic
def _bits_from_f32(typingctx, val):
    if val != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(val), codegen


@intrinsic
def _sign_bit_set(typingctx, val):
    """True where the float32's sign bit is set (x < 0, -0.0, a negative NaN), as an integer test. A
    select on it is one vblendvps that reads the sign bit of x directly, with no vcmpps to make a
    mask (the sigmoid's branch: one fewer multiply-port operation per vector on Zen 1)."""
    if val != types.float32:
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        return builder.icmp_signed("<", builder.bitcast(args[0], i32), ir.Constant(i32, 0))
    return types.boolean(val), codegen


@intrinsic
def _f32_from_f16(typingctx, bits):
    """float16 bits (int16) -> float32 by LLVM's ``fpext half``: one vcvtph2ps per 8 elements on x86
    with F16C (a libcall elsewhere), exact for every bit pattern."""
    if bits != types.int16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(bits), codegen


@intrinsic
def _f16_from_f32(typingctx, val):
    """float32 -> float16 bits (int16) by LLVM's ``fptrunc``: round to nearest even, overflow to
    inf, NaN stays NaN (vcvtps2ph with F16C)."""
    if val != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.int16(val), codegen


# ----------------------------------------------------------------------------- exp2 (fp32)
LOG2E = 1.4426950408889634
# 2^f on [-1/2, 1/2]: 1 + f q(f), q of degree 4 fitted by Lawson-weighted least squares for the
# relative error of 2^f on 4000 Chebyshev nodes, coefficients rounded to fp32. P0 = 1 exactly, so
# the row max gets exp = 1.0 exactly. Measured <= 2.2 ulp in fp32 (a degree-6 fit gave <= 1 ulp
# and cost 4% more time in the sparse CE kernel, which is bound by this polynomial's FMAs).
_P0 = np.float32(1.0)
_P1 = np.float32(0.6931470632553101)
_P2 = np.float32(0.24022242426872253)
_P3 = np.float32(0.05550582334399223)
_P4 = np.float32(0.009671518579125404)
_P5 = np.float32(0.0013308818452060223)


@intrinsic
def _rint32(typingctx, x):
    """Round to nearest integer (llvm.rint -> vroundps). An intrinsic call, unlike the
    ``x + 1.5*2^23 - 1.5*2^23`` trick, survives fast-math DAG combines (which fold that to x)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        fn = builder.module.declare_intrinsic("llvm.rint", [ir.FloatType()])
        return builder.call(fn, [args[0]])
    return types.float32(x), codegen


@intrinsic
def _pow2_from_biased(typingctx, w):
    """2^k from w = k + (2^23 + 127), k integral in [-127, 0]: w's low mantissa bits hold the biased
    exponent k + 127, and shifting them into the exponent field gives 2^k (+0.0 for k = -127).
    Pure bit operations on i32: no float -> int conversion, which LLVM treats as poison for NaN and
    Numba would widen to int64 (AVX2 cannot convert that in vector registers)."""
    if w != types.float32:
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        bits = builder.bitcast(args[0], i32)
        return builder.bitcast(builder.shl(bits, ir.Constant(i32, 23)), ir.FloatType())
    return types.float32(w), codegen


_VEC_BYTES = 32  # one AVX register; the alignment a vector non-temporal store needs
_NT_MIN = 256    # shorter spans use ordinary stores: partial-line non-temporal writes are slow
def _vector_type(context, dtype):
    """(element type, 32-byte vector type, lanes) in LLVM IR for a float32/float64 Numba dtype."""
    ft = context.get_value_type(dtype)
    width = _VEC_BYTES // (dtype.bitwidth // 8)
    return ft, ir.VectorType(ft, width), width


_MAX_UNROLL = 4  # independent vector accumulators: vmaxps latency is 3 cycles, throughput 1


@intrinsic
def _block_max_vec(typingctx, arr, lo, hi):
    """max(arr[lo:hi]) ignoring NaN (-inf if empty or all NaN), for fp32/fp64 C arrays and
    16-bit bits (bfloat16 as uint16, float16 as int16, widened to fp32 in registers), as an explicit
    vector loop:
    ``acc = v > acc ? v : acc`` on 8- or 4-wide vectors, 4 accumulators, then a scalar tail. This is
    exactly one vmaxps per vector on x86. LLVM does not vectorise the scalar form of this reduction
    without ``nnan`` (49 ms for the max over 4096x32000 fp32), and vectorises ``llvm.maxnum`` with
    a NaN check, blend and early-exit test per vector, which was ~15% of the sparse CE kernel's
    time (bf16 4096x32000, A/B: 98 -> 91 ms when bf16 moved from maxnum to this loop)."""
    ok = (isinstance(arr, types.Array) and arr.layout == "C" and arr.ndim == 1
          and arr.dtype in (types.float32, types.float64, types.uint16, types.int16)
          and isinstance(lo, types.Integer) and isinstance(hi, types.Integer))
    if not ok:
        return None
    bf16 = arr.dtype == types.uint16
    f16 = arr.dtype == types.int16
    out_t = types.float32 if bf16 or f16 else arr.dtype

    def codegen(context, builder, sig, args):
        from numba.core import cgutils
        i32, i64 = ir.IntType(32), ir.IntType(64)
        ft, vt, width = _vector_type(context, out_t)
        data = context.make_array(sig.args[0])(context, builder, args[0]).data

        def widen(v, n):
            # 16-bit bits -> float32, as _load does: bfloat16 is the float's high half; float16
            # goes through fpext (vcvtph2ps).
            if f16:
                ht = ir.HalfType() if n == 1 else ir.VectorType(ir.HalfType(), n)
                return builder.fpext(builder.bitcast(v, ht), ft if n == 1 else vt)
            if not bf16:
                return v
            if n == 1:
                return builder.bitcast(builder.shl(builder.zext(v, i32), ir.Constant(i32, 16)), ft)
            w = builder.shl(builder.zext(v, ir.VectorType(i32, n)), ir.Constant(ir.VectorType(i32, n), [16] * n))
            return builder.bitcast(w, vt)
        ld_t = ir.VectorType(ir.IntType(16), width) if bf16 or f16 else vt
        ld_align = 2 if bf16 or f16 else sig.args[0].dtype.bitwidth // 8
        lo_ = context.cast(builder, args[1], sig.args[1], types.int64)
        hi_ = context.cast(builder, args[2], sig.args[2], types.int64)
        ninf = ir.Constant(ft, float("-inf"))
        step = width * _MAX_UNROLL
        n_vec = builder.mul(builder.sdiv(builder.sub(hi_, lo_), ir.Constant(i64, step)), ir.Constant(i64, step))
        vend = builder.add(lo_, n_vec)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(vt, [float("-inf")] * width))
                for _ in range(_MAX_UNROLL)]
        with cgutils.for_range_slice(builder, lo_, vend, ir.Constant(i64, step), i64) as (j, _):
            for u, acc_p in enumerate(accs):
                ptr = builder.gep(data, [builder.add(j, ir.Constant(i64, u * width))])
                v = widen(builder.load(builder.bitcast(ptr, ld_t.as_pointer()), align=ld_align), width)
                a = builder.load(acc_p)
                builder.store(builder.select(builder.fcmp_ordered(">", v, a), v, a), acc_p)
        vec = builder.load(accs[0])
        for acc_p in accs[1:]:
            a = builder.load(acc_p)
            vec = builder.select(builder.fcmp_ordered(">", a, vec), a, vec)
        best = cgutils.alloca_once_value(builder, ninf)
        for lane in range(width):
            e = builder.extract_element(vec, ir.Constant(ir.IntType(32), lane))
            b = builder.load(best)
            builder.store(builder.select(builder.fcmp_ordered(">", e, b), e, b), best)
        with cgutils.for_range_slice(builder, vend, hi_, ir.Constant(i64, 1), i64) as (j, _):
            e = widen(builder.load(builder.gep(data, [j])), 1)
            b = builder.load(best)
            builder.store(builder.select(builder.fcmp_ordered(">", e, b), e, b), best)
        return builder.load(best)
    return out_t(arr, lo, hi), codegen


def _block_max(arr, lo, hi):
    pass


@overload(_block_max, jit_options=_JIT)
def _block_max_ov(arr, lo, hi):
    """max(arr[lo:hi]) as an accumulation-dtype value, NaN ignored, -inf for an empty span."""
    if arr.dtype in (types.float32, types.float64, types.uint16, types.int16):
        return lambda arr, lo, hi: _block_max_vec(arr, lo, hi)
    return None


_EXP2_LO = np.float32(-127.0)          # clamp: 2^-127 has exponent field 0, i.e. the result is 0.0
_EXP2_BIAS = np.float32(8388608.0 + 127.0)  # 2^23 + 127


@njit(fastmath=_EXP_FLAGS, cache=True, error_model="numpy")
def _horner(x, c):
    """c[0] + x (c[1] + x (c[2] + ...)) for a tuple c, one FMA per coefficient (unrolled by LLVM)."""
    p = c[len(c) - 1]
    for i in range(len(c) - 2, -1, -1):
        p = p * x + c[i]
    return p


@njit(fastmath=_EXP_FLAGS, cache=True, error_model="numpy")
def _exp2_core(u, lo, bias, p0, p1, p2, p3, p4, p5):
    # exp2_32 with its constants as arguments (lo = _EXP2_LO, bias = _EXP2_BIAS, the coefficients):
    # see exp2_32 for the method, SIGMOID_COEF for why.
    uc = lo if u < lo else u
    k = _rint32(uc)
    return _horner(uc - k, (p0, p1, p2, p3, p4, p5)) * _pow2_from_biased(k + bias)


@njit(fastmath=_EXP_FLAGS, cache=True, error_model="numpy")
def exp2_32(u):
    """2^u for float32 u <= 0 (or -inf, or NaN), branch-free so loops calling it vectorise.

    2^u = 2^k 2^f with k = rint(u), f = u - k in [-1/2, 1/2] (exact), 2^f by a degree-5 polynomial,
    2^k written into the exponent bits. Every caller passes a non-positive argument (x - max,
    -|x|), so there is no overflow branch. Kernels call it on ``(x - m) * (log2(e) / T)``, folding
    the change of base into the temperature multiply, so exp costs no Cody-Waite reduction.

    Special values cost nothing extra: u is clamped to -127, where the exponent field becomes 0, so
    u <= -126.5 and -inf give exactly 0.0; the clamp is written ``lo if u < lo else u``, which
    passes NaN through to the polynomial, so NaN propagates. Measured error <= 2.2 ulp against
    float64 on [-125, 0] (tests/test_numba.py); 10 vector operations per 8 elements on AVX2.
    Positive u is outside the domain.
    """
    return _exp2_core(u, _EXP2_LO, _EXP2_BIAS, _P0, _P1, _P2, _P3, _P4, _P5)


# The reciprocal 1/(1 + e) is written as a division with ``arcp`` and ``ninf``, and the functions
# whose loops compute it carry the LLVM attribute "reciprocal-estimates"="vec-divf:0,divf:0"
# (_use_rcp_estimate). LLVM then emits the hardware estimate vrcpps (12 bits, one instruction) with
# no refinement of its own, and _recip_core refines it once. LLVM only uses the estimate when the
# division may assume no infinities, hence ``ninf`` on this one division: its operands are 1 and
# 1 + e with e = exp(-|x|) in [0, 1] or NaN, never infinite. NaN is still allowed (no ``nnan``).
_RCP_FLAGS = {"contract", "nsz", "arcp", "ninf"}


@intrinsic
def _use_rcp_estimate(typingctx):
    """Let LLVM lower ``1 / d`` (with arcp and ninf) to the vrcpps estimate in the calling function.

    The attribute goes on the LLVM function being generated, so the call must sit in the function
    whose loop does the division (a kernel's prange body, or a test's loop), not in a helper that
    LLVM later inlines: inlining keeps the caller's attributes. Without it the division is an exact
    vdivps (~3.6 cycles per element on the bench machine, Zen 1) and _recip_core's refinement does
    nothing: slower, never wrong. llvmlite's attribute set only accepts names it knows, so the
    string attribute is added to the underlying set directly."""
    def codegen(context, builder, sig, args):
        set.add(builder.function.attributes, '"reciprocal-estimates"="vec-divf:0,divf:0"')
        return context.get_dummy_value()
    return types.none(), codegen


@njit(fastmath=_RCP_FLAGS, cache=True, error_model="numpy")
def _recip_core(e, one):
    # r0 = 1/(1 + e): the vrcpps estimate (relative error h, |h| <= 3.2e-4 measured on Zen 1) where
    # _use_rcp_estimate is in effect. One Newton step: 1/d = r0 / (1 - h) with h = 1 - d r0, so
    # r = r0 (1 + h), relative error -h^2 (<= 1.0e-7). h is formed as (1 - r0) - e r0, both terms
    # exact or nearly so, rather than from the rounded d = 1 + e. ``one`` is 1.0 (an argument: see
    # SIGMOID_COEF). The third-order step r0 (1 + h + h^2) is exact to rounding (0.50 ulp) but one
    # FMA more, and the sigmoid loop is so short of registers that one more operation or constant
    # shows: 2^24 sigmoid CE, loss + gradient, A/B on two threads: 18.0 vs 17.6 ms; adding a
    # constant to centre the Newton error (1.2 ulp) made it 18.7 ms.
    r = one / (one + e)
    h = (one - r) - e * r
    return r + r * h


@njit(fastmath=_EXP_FLAGS, cache=True, error_model="numpy")
def recip_1p_01(e):
    """1 / (1 + e) for e in [0, 1] (the sigmoid of |x|) without a divide: vrcpps and one Newton
    step, 1 estimate + 2 FMAs + 2 adds per vector. NaN propagates. Measured <= 1.9 ulp on [0, 1]
    from a caller marked with _use_rcp_estimate (tests/test_numba.py); see _recip_core for why
    not the third-order step (0.50 ulp)."""
    return _recip_core(e, np.float32(1.0))


# G(e) = (1 + e) log1p(e) / e on [0, 1]: degree 7, G(0) = 1, Lawson-weighted least squares for the
# relative error on 4000 Chebyshev nodes, coefficients rounded to fp32 (fit error 2.4e-8, 1.0e-7
# evaluated in fp32). Multiplying by (1 + e) softens the log singularity at e = -1: log1p(e)/e
# itself needs degree 9 for the same accuracy.
_G = (np.float32(1.0), np.float32(0.4999975860118866), np.float32(-0.16659721732139587),
      np.float32(0.0826551616191864), np.float32(-0.04677879065275192), np.float32(0.024681273847818375),
      np.float32(-0.00944240391254425), np.float32(0.0017788028344511986))


@njit(fastmath=_EXP_FLAGS, cache=True, error_model="numpy")
def _g_core(e, g0, g1, g2, g3, g4, g5, g6, g7):
    return _horner(e, (g0, g1, g2, g3, g4, g5, g6, g7))


@njit(fastmath=_EXP_FLAGS, cache=True, error_model="numpy")
def log1p_01(e):
    """log1p(e) for e in [0, 1] (the sigmoid's exp(-|x|)), vectorisable and division-free.

    log1p(e) = w G(e) with w = e / (1 + e) (which the sigmoid kernel has anyway: it is sigmoid(-|x|))
    and G the degree-7 polynomial above. Tiny e keeps full relative accuracy (G(0) = 1, no 1 + e
    rounding). No division: a vector divide costs ~3.6 cycles per element on the bench machine
    (Zen 1), as much as the whole rest of the sigmoid loss. libm's log1p is a scalar call. NaN
    propagates. Measured <= 3.6 ulp on [0, 1], the reciprocal's error included (tests/test_numba.py);
    the degree-9 log1p(e)/e polynomial it replaces measured 1.7 ulp and cost two more FMAs.
    """
    return e * recip_1p_01(e) * _g_core(e, _G[0], _G[1], _G[2], _G[3], _G[4], _G[5], _G[6], _G[7])


def _per_dtype(f32_impl, f64_impl, doc):
    """A function Numba compiles to ``f32_impl`` for float32 arguments and ``f64_impl`` for float64
    ones: the fast approximations serve fp32 accumulation, libm keeps fp64 inputs exact."""
    def generic(u):
        return f64_impl(u)

    @overload(generic, jit_options=dict(fastmath=_EXP_FLAGS))
    def _impl(u):
        if u == types.float32:
            return lambda u: f32_impl(u)
        if u == types.float64:
            return lambda u: f64_impl(u)
        return None

    generic.__doc__ = doc
    return generic


fexp2 = _per_dtype(exp2_32, np.exp2, "2^u (u <= 0) in the accumulation dtype.")

# The sigmoid kernel's polynomial coefficients, passed to it as an array argument and read into
# scalars once per block: a run-time value is broadcast into a register (or spilled to a stack slot
# that an FMA reads directly) once per block, while LLVM re-materialises a compile-time constant in
# every vector iteration (an address load and a broadcast per coefficient). A tuple argument does
# not work: its elements are re-read inside the loop. Measured on the bench machine (A/B, same
# process, 2 threads, 2^16 elements in cache): 0.097 -> 0.081 ms together with the w G(e) form of
# log1p. The cross-entropy exp loop goes the other way (11.7 vs 13.3 cycles per vector with run-time
# coefficients), so exp2_32 keeps its constants.
#
# The array also carries the loop's other constants (-log2 e, the exp clamp and bias, 1.0), and that
# decides LLVM's interleave count. For a loop with a reduction LLVM takes it from its register
# estimate, (16 - loop invariants - 1) / (live values - 1) on AVX2. With 14 invariants that gave 1,
# one vector of 8 elements per iteration: latency-bound, and the vrcpps reciprocal made the kernel
# slower (2^16 in cache: 0.083 -> 0.106 ms). With 18 invariants the unsigned subtraction wraps and
# LLVM uses the target's maximum, 4, as it did with the older 17 (quadratic reciprocal guess):
# 0.078 -> 0.076 ms, 2^24: 18.6 -> 18.2 ms (A/B). Forcing 3 or 4 measured the same; 2 or 8 slower.
SIGMOID_COEF = np.array((_P0, _P1, _P2, _P3, _P4, _P5) + _G + (-LOG2E, _EXP2_LO, _EXP2_BIAS, 1.0), np.float32)
SIGMOID_COEF.flags.writeable = False


@njit(**_JIT)
def _coef_scalars(coef):
    return (coef[0], coef[1], coef[2], coef[3], coef[4], coef[5], coef[6], coef[7], coef[8], coef[9],
            coef[10], coef[11], coef[12], coef[13], coef[14], coef[15], coef[16], coef[17])


def _sigmoid_parts(xv, c):
    pass


@overload(_sigmoid_parts, jit_options=dict(fastmath=_EXP_FLAGS))
def _sigmoid_parts_ov(xv, c):
    """(log1p(e), sigmoid(x)) with e = exp(-|x|), in the accumulation dtype; c = the scalars of
    SIGMOID_COEF (_coef_scalars).

    fp32: e by the exp2 polynomial, 1/(1 + e) by a refined vrcpps (the caller's function must be
    marked with _use_rcp_estimate), w = e/(1 + e) = sigmoid(-|x|) shared by the
    gradient (x < 0) and log1p(e) = w G(e); the sigmoid is picked by x's sign bit (_sign_bit_set:
    -0.0 takes w, which equals 1/(1 + e) = 1/2 there). fp64: libm, exact to the last bit that
    matters.
    """
    if xv == types.float32:
        def parts32(xv, c):
            e = _exp2_core(abs(xv) * c[14], c[15], c[16], c[0], c[1], c[2], c[3], c[4], c[5])
            inv = _recip_core(e, c[17])
            w = e * inv
            sp = w * _g_core(e, c[6], c[7], c[8], c[9], c[10], c[11], c[12], c[13])
            return sp, (w if _sign_bit_set(xv) else inv)
        return parts32
    if xv == types.float64:
        def parts64(xv, c):
            e = np.exp(-abs(xv))
            inv = 1.0 / (1.0 + e)
            return np.log1p(e), (inv if xv >= 0.0 else e * inv)
        return parts64
    return None


# ------------------------------------------------------------------------ 16-bit load/store
def _load(v):
    return v


@overload(_load)
def _load_ov(v):
    if v == types.float32 or v == types.float64:
        return lambda v: v
    if v == types.uint16:  # bfloat16 bits: the high half of a float32
        return lambda v: _f32_from_bits(np.uint32(v) << 16)
    if v == types.int16:   # float16 bits
        return lambda v: _f32_from_f16(v)
    return None


def _store(v, like):
    return v


@overload(_store)
def _store_ov(v, like):
    """Convert an accumulation value to the element type of the output array (``like``)."""
    if like == types.float32:
        return lambda v, like: np.float32(v)
    if like == types.float64:
        return lambda v, like: np.float64(v)
    if like == types.uint16:  # bfloat16, round to nearest even, NaN stays a quiet NaN
        def store_bf16(v, like):
            b = _bits_from_f32(np.float32(v))
            r = (b + np.uint32(0x7FFF) + ((b >> 16) & np.uint32(1))) >> 16
            return np.uint16(0x7FC0) if v != v else np.uint16(r)
        return store_bf16
    if like == types.int16:  # float16, round to nearest even (overflow -> inf, NaN -> qNaN)
        return lambda v, like: _f16_from_f32(np.float32(v))
    return None


def _as(v, like):
    return v


@overload(_as)
def _as_ov(v, like):
    """``v`` in the dtype of ``like``. Numba types ``float32 + 1`` and ``float32 * 0.5`` as
    float64 (NumPy's rules), which would silently turn an fp32 kernel into an fp64 one."""
    if like == types.float32:
        return lambda v, like: np.float32(v)
    if like == types.float64:
        return lambda v, like: np.float64(v)
    return None


@njit(**_JIT)
def _u(i):
    """An index as uint64, for loop bounds: Numba wraps negative indices (``a[-1]``), and for a
    signed loop variable that LLVM cannot prove non-negative (any ``range(lo, hi)``) it emits a
    select per element that stops vectorisation: 3.5x slower max pass, 2.8x slower exp pass.
    Keep the whole index expression unsigned (uint64 mixed with int64 types as float64)."""
    return np.uint64(i)


# ------------------------------------------------------------------- non-temporal stores


@intrinsic
def _address(typingctx, arr):
    """The address of ``arr[0]`` as uint64 (to find the first vector-aligned element)."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(data, ir.IntType(64))
    return types.uint64(arr), codegen


@intrinsic
def _nt_axpb(typingctx, out, src, j, a, b):
    """out[j : j+W] = src[j : j+W] * a - b as one W-wide vector store marked ``!nontemporal``
    (W = 32 bytes / itemsize; out + j must be 32-byte aligned, src + j need not be).

    Why: a normal store to a line that is not in cache first reads it (read-for-ownership), so
    writing a gradient costs two memory transfers per line instead of one. LLVM's vectoriser will
    not widen a scalar non-temporal store it cannot prove aligned, so the vector is built here."""
    ok = (isinstance(out, types.Array) and isinstance(src, types.Array) and out.layout == "C"
          and src.layout == "C" and out.dtype == src.dtype == a == b
          and out.dtype in (types.float32, types.float64) and isinstance(j, types.Integer))
    if not ok:
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        _, vt, width = _vector_type(context, sig.args[0].dtype)
        out_a = context.make_array(sig.args[0])(context, builder, args[0])
        src_a = context.make_array(sig.args[1])(context, builder, args[1])
        j_ = args[2]
        zeros = ir.Constant(ir.VectorType(i32, width), [0] * width)

        def splat(x):
            v = builder.insert_element(ir.Constant(vt, ir.Undefined), x, ir.Constant(i32, 0))
            return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined), zeros)
        v = builder.load(builder.bitcast(builder.gep(src_a.data, [j_]), vt.as_pointer()),
                         align=sig.args[1].dtype.bitwidth // 8)
        r = builder.fsub(builder.fmul(v, splat(args[3])), splat(args[4]))
        st = builder.store(r, builder.bitcast(builder.gep(out_a.data, [j_]), vt.as_pointer()),
                           align=_VEC_BYTES)
        st.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(i32, 1)]))
        return context.get_dummy_value()
    return types.void(out, src, j, a, b), codegen


@intrinsic
def _store_fence(typingctx):
    """A full fence (x86: mfence) after a row's non-temporal stores: they are weakly ordered, and
    another thread may read the gradient as soon as the parallel region ends."""
    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()
    return types.void(), codegen


def _axpb(out, src, lo, hi, a, b):
    pass


@overload(_axpb, jit_options=_JIT)
def _axpb_ov(out, src, lo, hi, a, b):
    """out[lo:hi] = _store(src[lo:hi] * a - b): vector non-temporal stores when out has the
    accumulation dtype (fp32/fp64), an ordinary loop for 16-bit outputs."""
    if out.dtype == src.dtype and out.dtype in (types.float32, types.float64):
        itemsize = out.dtype.bitwidth // 8
        width = _VEC_BYTES // itemsize

        def nt_impl(out, src, lo, hi, a, b):
            base = _address(out)
            j = _u(lo)
            end = _u(hi)
            if base % _u(itemsize) == _u(0) and end - j >= _u(_NT_MIN):
                # scalar head up to the first 32-byte aligned element, then whole vectors
                head = ((_u(_VEC_BYTES) - (base + j * _u(itemsize)) % _u(_VEC_BYTES)) % _u(_VEC_BYTES)) // _u(itemsize)
                jv = min(j + head, end)
                for k in range(j, jv):
                    out[k] = src[k] * a - b
                j = jv
                while j + _u(width) <= end:
                    _nt_axpb(out, src, j, a, b)
                    j += _u(width)
            for k in range(j, end):
                out[k] = src[k] * a - b
        return nt_impl

    def impl(out, src, lo, hi, a, b):
        for k in range(_u(lo), _u(hi)):
            out[k] = _store(src[k] * a - b, out[k])
    return impl


@njit(**_JIT)
def _padded(n):
    """Row length for per-worker scratch: n rounded up to 16 elements plus 16 more, so that two
    workers' rows never share a 64-byte cache line. Unpadded 10-element rows made 65536x10 slower
    on two threads (11 ms) than on one (7.6 ms): every store invalidated the other core's line."""
    return (n + 15) // 16 * 16 + 16


# ------------------------------------------------------------------------- row statistics
# Elements per online-max block: 1 KiB of fp32, read once from memory into L1 by the block max and
# then exponentiated from there. Measured on the bench machine (A/B, fp32 loss + gradient, 2 threads)
# against 512: sparse 4096x32000 77-81 -> 72-75 ms, 64x262144 11.6 -> 9.9 ms, 1024x4096 3.1 -> 2.7
# ms, dense 4096x32000 120 -> 117 ms; 128 was slower than 512, 1024 and 2048 slower still.
STAT_BLOCK = 256


@njit(**_JIT)
def _finite_or_zero(m, zero):
    # The shift for a row/block max m: m itself when finite; 0 when m = -inf (all masked so far), so
    # (-inf) - (-inf) never makes NaN; NaN when m is +inf or NaN, so that such rows give NaN (exp2_32
    # is only defined for non-positive arguments, and +inf logits have no finite softmax anyway).
    if m == m and (m - m) != zero:
        return zero if m < zero else m - m
    return m


@njit(**_JIT)
def _online_stats(xr, lo, hi, k2, scratch, bstat, want_sz, zero):
    """One streaming pass over xr[lo:hi]: max, Σ 2^((x - m) k2), and Σ (x - m).

    Block-online softmax: each block of STAT_BLOCK elements is brought into L1 by its max, then
    exponentiated against the running max m; when m grows the running sum is rescaled. The
    exponentials go to ``scratch[lo:hi]``, the max each block used to ``bstat[0, b]`` and the block's
    sum to ``bstat[1, b]``, so the gradient pass needs no second exp (it rescales per block).
    Returns (m, s, sz) with m already made finite.
    """
    m = zero
    seen = False
    s = zero
    sz = zero
    nb = (hi - lo + STAT_BLOCK - 1) // STAT_BLOCK
    for b in range(nb):
        blo = lo + b * STAT_BLOCK
        bhi = min(blo + STAT_BLOCK, hi)
        bm = _finite_or_zero(_as(_block_max(xr, blo, bhi), zero), zero)
        # s == 0 means every earlier element was -inf (a finite one contributes 2^0 = 1): then the
        # shift may also move down, so a masked first block cannot pin m at 0 above the real max.
        if not seen or bm > m or s == zero:
            if seen:
                if s > zero:
                    s *= fexp2((m - bm) * k2)
                sz += (m - bm) * _as(blo - lo, zero)
            m = bm
            seen = True
        acc = zero
        for j in range(_u(blo), _u(bhi)):
            e = fexp2((_load(xr[j]) - m) * k2)
            scratch[j] = e
            acc += e
        s += acc
        if want_sz:
            accz = zero
            for j in range(_u(blo), _u(bhi)):
                accz += _load(xr[j]) - m
            sz += accz
        bstat[0, b] = m
        bstat[1, b] = acc
    return m, s, sz


@njit(**_JIT)
def _block_factor(bstat, blk, m, k2, zero):
    # 2^((shift of block blk - m) k2). The block's shift exceeds m only after a downward reset,
    # when that block's scratch is all 0: factor 1.
    d = bstat[0, blk] - m
    return fexp2((d if d < zero else zero) * k2)


@njit(**_JIT)
def _scaled_grad(gr, scratch, bstat, lo, hi, m, k2, a, b):
    """gr[j] = p_j * a - b with p_j = scratch[j] * 2^((bstat[0, blk] - m) k2) / s (the 1/s is in a)."""
    zero = a - a
    nb = (hi - lo + STAT_BLOCK - 1) // STAT_BLOCK
    blk = 0
    while blk < nb:
        # One _axpb call per run of blocks that used the same shift (after the first few blocks of a
        # row, usually all of them): fewer loop set-ups and alignment heads in the write stream.
        end = blk + 1
        while end < nb and bstat[0, end] == bstat[0, blk]:
            end += 1
        _axpb(gr, scratch, lo + blk * STAT_BLOCK, min(lo + end * STAT_BLOCK, hi),
              a * _block_factor(bstat, blk, m, k2, zero), b)
        blk = end


@njit(**_JIT)
def _sum_except(scratch, lo, hi, skip, zero):
    # Σ scratch[lo:hi] without scratch[skip] (summed directly: no subtraction, no cancellation).
    acc = zero
    for j in range(_u(lo), _u(skip)):
        acc += scratch[j]
    for j in range(_u(skip + 1), _u(hi)):
        acc += scratch[j]
    return acc


@njit(**_JIT)
def _rest_sum(scratch, bstat, c, yi, m, k2, zero):
    """Σ_{j != y} 2^((x_j - m) k2) from _online_stats' block sums; the label's block is re-summed
    without the label (a subtraction would cancel exactly when p_y is close to 1)."""
    rest = zero
    nb = (c + STAT_BLOCK - 1) // STAT_BLOCK
    by = yi // STAT_BLOCK
    for blk in range(nb):
        if blk == by:
            part = _sum_except(scratch, blk * STAT_BLOCK, min(blk * STAT_BLOCK + STAT_BLOCK, c), yi, zero)
        else:
            part = bstat[1, blk]
        if part != zero:
            rest += part * _block_factor(bstat, blk, m, k2, zero)
    return rest


@njit(**_JIT)
def _fill(gr, lo, hi, val):
    for j in range(_u(lo), _u(hi)):
        gr[j] = _store(val, gr[j])


# ------------------------------------------------------------------------------ sparse CE
@njit(**_JIT)
def _sparse_loss(x_y, m, s, sz, inv_t, eps, z_loss, c, zero):
    """Row loss from the shifted statistics (never from lse - z_y: see jax_xla._shift)."""
    one = _as(1, zero)
    log_s = np.log(s)
    lse = m * inv_t + log_s
    zs_y = (x_y - m) * inv_t
    row = (one - eps) * (log_s - zs_y) + z_loss * lse * lse
    if eps != zero:
        row += eps * (log_s - sz * inv_t / c)
    return row, lse, log_s


_LN2 = math.log(2.0)


@njit(**_JIT)
def _label_grad(x_y, m, log_s, inv_t, eps, z_loss, scale, cf, zero, s_rest, s):
    """The label's gradient, p_y (1 + 2 z lse) - (1 - ε + ε/C), times scale / T, written as
    (p_y - 1) + 2 z lse p_y + ε (1 - 1/C) so that p_y is never rounded next to 1.

    p_y - 1 is expm1(log p_y) when p_y <= 1/2, where it is accurate, and -s_rest / s when p_y > 1/2,
    with s_rest = Σ_{j != y} exp(z_j - m) summed directly (callers pass it, or a negative number
    when they have not computed it; see ``confident``). expm1 alone is not enough for a confident
    label: s = 1 + s_rest is itself rounded next to 1 in fp32, which cost the label's gradient 0.8%
    of its (small) value at p_y = 1 - 5e-6."""
    one = _as(1, zero)
    two = one + one
    log_p = (x_y - m) * inv_t - log_s  # from the shifted statistics (exact at any offset)
    lse = m * inv_t + log_s
    if s_rest >= zero:
        g = eps * (one - one / cf) - s_rest / s
    else:
        g = np.expm1(log_p) + eps * (one - one / cf)
    if z_loss != zero:  # a second libm call only when needed: it shows at small C (65536x10)
        g += two * z_loss * lse * np.exp(log_p)
    return g * scale * inv_t


@njit(**_JIT)
def _confident(x_y, m, log_s, inv_t):
    """p_y > 1/2: then p_y - 1 must come from s_rest (see _label_grad)."""
    return (x_y - m) * inv_t - log_s > _as(-_LN2, inv_t)


@njit(**_JIT)
def _skip_row(yi, c, loss, lse, gr, i, ignore_index, want_grad, zero):
    """A row whose label is ignore_index (loss 0, gradient 0) or outside [0, C) (loss and gradient
    NaN) is written here. Returns -1 for a row to compute, else the number of bad labels (0 or 1)."""
    if yi == ignore_index or yi < 0 or yi >= c:
        ok = yi == ignore_index
        loss[i] = zero if ok else _as(np.nan, zero)
        lse[i] = _as(np.nan, zero)
        if want_grad:
            _fill(gr, 0, c, zero if ok else _as(np.nan, zero))
        return 0 if ok else 1
    return -1


@njit(**_JIT)
def _sparse_row(xr, yi, loss, lse, gr, i, sc, bm, inv_t, k2, eps, ignore_index, z_loss, scale, want_grad, cf, zero):
    """One row of sparse_cross_entropy: stats in one streaming pass, gradient from the scratch row.
    Returns 1 if the label is out of range (not ignore_index), else 0."""
    c = xr.shape[0]
    one = _as(1, zero)
    skipped = _skip_row(yi, c, loss, lse, gr, i, ignore_index, want_grad, zero)
    if skipped >= 0:
        return skipped
    m, s, sz = _online_stats(xr, 0, c, k2, sc, bm, eps != zero, zero)
    x_y = _load(xr[yi])
    row, lse_i, log_s = _sparse_loss(x_y, m, s, sz, inv_t, eps, z_loss, cf, zero)
    loss[i] = row
    lse[i] = lse_i
    if want_grad:
        a = scale * (one + (z_loss + z_loss) * lse_i) * inv_t / s
        _scaled_grad(gr, sc, bm, 0, c, m, k2, a, scale * eps * inv_t / cf)
        # The label's term is folded in fp32 before the (possibly 16-bit) store.
        rest = _rest_sum(sc, bm, c, yi, m, k2, zero) if _confident(x_y, m, log_s, inv_t) else -one
        gr[yi] = _store(_label_grad(x_y, m, log_s, inv_t, eps, z_loss, scale, cf, zero, rest, s), gr[yi])
    return 0


# Rows up to this many classes skip the block-online statistics: the row is in L1, so a plain
# max pass, exp pass and gradient pass read it from cache, and the per-block bookkeeping and the
# vector loops' set-up cost more than they save. Measured (2 threads, fp32, loss + gradient, A/B in
# one process): 65536x10 8.7 -> 5.8 ms, 65536x100 11.2 -> 8.8 ms, 65536x1000 unchanged; at
# 4096x32000 the block path is faster.
SHORT_ROW = 2048


@njit(inline="always", **_JIT)
def _short_row(xr, yi, loss, lse, gr, i, sc, inv_t, k2, eps, ignore_index, z_loss, scale, want_grad, cf, zero):
    """One row of sparse_cross_entropy for C <= SHORT_ROW: max, exp-and-sum, gradient, each a
    plain loop over the (cache-resident) row. Same return value as _sparse_row. Inlined into the
    kernel (Numba-level): the call, with every array passed as its exploded struct, cost 23% of a
    10-class row (65536x10: 5.8 -> 4.4 ms inlined)."""
    c = xr.shape[0]
    one = _as(1, zero)
    skipped = _skip_row(yi, c, loss, lse, gr, i, ignore_index, want_grad, zero)
    if skipped >= 0:
        return skipped
    m = _finite_or_zero(_as(_block_max(xr, 0, c), zero), zero)
    s = zero
    for j in range(c):
        e = fexp2((_load(xr[j]) - m) * k2)
        sc[j] = e
        s += e
    sz = zero
    if eps != zero:
        for j in range(c):
            sz += _load(xr[j]) - m
    x_y = _load(xr[yi])
    row, lse_i, log_s = _sparse_loss(x_y, m, s, sz, inv_t, eps, z_loss, cf, zero)
    loss[i] = row
    lse[i] = lse_i
    if want_grad:
        a = scale * (one + (z_loss + z_loss) * lse_i) * inv_t / s
        _axpb(gr, sc, 0, c, a, scale * eps * inv_t / cf)
        # s_rest for every row here: summing a short cached row is cheaper than expm1, whose libm
        # call was ~40% of a 10-class row (65536x10: 4.4 -> 3.1 ms without it).
        rest = _sum_except(sc, 0, c, yi, zero)
        gr[yi] = _store(_label_grad(x_y, m, log_s, inv_t, eps, z_loss, scale, cf, zero, rest, s), gr[yi])
    return 0


# Rows up to this many classes, stored back to back (row_stride == C), are processed a group at a
# time: per-row scalar work (max, sum, log, label) and flat vector loops over the whole group for
# the exp and the gradient. A loop over one 10-element row never reaches LLVM's vector body (it
# is unrolled 4 x 8 wide), so per row the exp ran as scalar code.
TINY_ROW = 31
TINY_GROUP = 1024  # elements per group: the group's x, exps, shifts and factors stay in L1


@njit(**_JIT)
def _group_scratch(n_workers, c, dtype):
    # Per worker: the exps, each element's row shift and each element's gradient factor of a group.
    return np.empty((n_workers, 3, _padded(TINY_GROUP + c)), dtype=dtype)


@njit(**_JIT)
def _group_exp(xg, c, rows, sc, sh, k2, zero):
    """For ``rows`` rows of ``c`` elements back to back in ``xg``: each row's shift (its max, made
    finite) into every element of ``sh``, then sc = 2^((x - sh) k2) in one vector loop over all of
    them (a 10-element row on its own never reaches LLVM's 4 x 8 wide vector body)."""
    for r in range(rows):
        lo = r * c
        # NaN ignored, as in _block_max (exp propagates it); four chains for latency
        m0 = _as(-np.inf, zero)
        m1 = m0
        m2 = m0
        m3 = m0
        j = lo
        while j + 4 <= lo + c:
            v0 = _load(xg[j])
            v1 = _load(xg[j + 1])
            v2 = _load(xg[j + 2])
            v3 = _load(xg[j + 3])
            m0 = v0 if v0 > m0 else m0
            m1 = v1 if v1 > m1 else m1
            m2 = v2 if v2 > m2 else m2
            m3 = v3 if v3 > m3 else m3
            j += 4
        while j < lo + c:
            v0 = _load(xg[j])
            m0 = v0 if v0 > m0 else m0
            j += 1
        m0 = m1 if m1 > m0 else m0
        m2 = m3 if m3 > m2 else m2
        m = _finite_or_zero(m2 if m2 > m0 else m0, zero)
        for j in range(_u(lo), _u(lo + c)):
            sh[j] = m
    for j in range(_u(0), _u(rows * c)):
        sc[j] = fexp2((_load(xg[j]) - sh[j]) * k2)


@njit(**_JIT)
def _tiny_rows(x, c, y, loss, lse, g, r0, r1, sc, sh, fa, rs, inv_t, k2, eps, ignore_index, z_loss, scale,
               want_grad, cf, b_all, zero):
    """Rows r0 <= i < r1 of sparse_cross_entropy for short rows stored back to back, in groups of
    R = TINY_GROUP // C rows. Per-worker scratch: ``sc``, ``sh``, ``fa`` of R*C elements (exps, the
    shift of each element's row, the gradient factor of each element's row) and ``rs`` of 3R (each
    row's s_rest, s and log s). Returns the number of out-of-range labels."""
    one = _as(1, zero)
    rows = max(1, TINY_GROUP // c)
    gf = g.reshape(-1)
    bad = 0
    for g0 in range(r0, r1, rows):
        g1 = min(g0 + rows, r1)
        base = g0 * c
        span = (g1 - g0) * c
        xg = x[base:base + span]
        _group_exp(xg, c, g1 - g0, sc, sh, k2, zero)
        for r in range(g1 - g0):
            i = g0 + r
            lo = r * c
            yi = y[i]
            a = zero
            if yi == ignore_index or yi < 0 or yi >= c:
                ok = yi == ignore_index
                bad += 0 if ok else 1
                loss[i] = zero if ok else _as(np.nan, zero)
                lse[i] = _as(np.nan, zero)
            else:
                m = sh[lo]
                # s = s_rest + e_y: the label's gradient needs s_rest summed without e_y anyway.
                rest = _sum_except(sc, lo, lo + c, lo + yi, zero)
                s = rest + sc[lo + yi]
                sz = zero
                if eps != zero:
                    for j in range(_u(lo), _u(lo + c)):
                        sz += _load(xg[j]) - m
                row, lse_i, log_s = _sparse_loss(_load(xg[lo + yi]), m, s, sz, inv_t, eps, z_loss, cf, zero)
                loss[i] = row
                lse[i] = lse_i
                a = scale * (one + (z_loss + z_loss) * lse_i) * inv_t / s
                rs[3 * r] = rest
                rs[3 * r + 1] = s
                rs[3 * r + 2] = log_s
            for j in range(_u(lo), _u(lo + c)):
                fa[j] = a
        if want_grad:
            for j in range(_u(0), _u(span)):
                gf[base + j] = _store(sc[j] * fa[j] - b_all, gf[base + j])
            for r in range(g1 - g0):
                i = g0 + r
                yi = y[i]
                if yi == ignore_index or yi < 0 or yi >= c:
                    _fill(g[i], 0, c, zero if yi == ignore_index else _as(np.nan, zero))
                else:
                    gy = _label_grad(_load(xg[r * c + yi]), sh[r * c], rs[3 * r + 2], inv_t, eps, z_loss, scale,
                                     cf, zero, rs[3 * r], rs[3 * r + 1])
                    g[i, yi] = _store(gy, g[i, yi])
    return bad


@njit(parallel=True, **_JIT)
def sparse_cross_entropy(x, row_stride, c, y, loss, lse, g, inv_t, eps, ignore_index, z_loss, scale, want_grad,
                         n_chunks, n_workers, short_rows):
    """Fused sparse softmax cross-entropy over rows of ``x``.

    Args:
        x: logits as a flat 1-D array (float32, float64, bf16 bits as uint16, fp16 bits as int16):
            row i is ``x[i * row_stride : i * row_stride + c]``, so a row-strided view (e.g.
            ``logits[:, :V]`` of a padded vocabulary) streams without a copy.
        row_stride, c: elements between row starts (>= c) and classes per row.
        y: (N,) integer labels. loss, lse: (N,) outputs in the accumulation dtype.
        g: (N, C) gradient output, same element type as ``x`` (not touched unless ``want_grad``).
        inv_t, eps, z_loss, scale: accumulation-dtype scalars (1/T, ε, z-loss weight, d total/d row).
        ignore_index: rows with this label get loss 0 and a zero gradient.
        n_chunks: 1 to process each row in one piece; > 1 splits every row into that many chunks
            processed in parallel (for fewer rows than threads).
        n_workers: parallel work partitions (the thread count); each owns one scratch row. Static
            partitions instead of ``numba.get_thread_id()``, which would stop Numba caching the kernel.
        short_rows: with ``n_chunks == 1``, process rows with plain loops (_short_row) instead of the
            block-online statistics; the caller sets it for C <= SHORT_ROW.

    Returns:
        The number of rows whose label is outside [0, C) and not ignore_index (their loss is NaN).

    Gradient: d row/dz_j = p_j (1 + 2 z_loss lse) - ε/C - (1-ε)[j == y], times scale / T.
    """
    n = y.shape[0]
    zero = inv_t - inv_t
    one = _as(1, zero)
    two = one + one
    nan = _as(np.nan, zero)
    cf = _as(c, zero)
    k2 = inv_t * _as(LOG2E, zero)
    b_all = scale * eps * inv_t / cf
    bad = 0
    step = (c + n_chunks - 1) // n_chunks
    scratch = np.empty((n_workers, _padded(step)), dtype=loss.dtype)
    bstats = np.empty((n_workers, 2, _padded((step + STAT_BLOCK - 1) // STAT_BLOCK)), dtype=loss.dtype)
    if n_chunks <= 1 and short_rows and c <= TINY_ROW and row_stride == c:
        gs = _group_scratch(n_workers, c, loss.dtype)
        rs = np.empty((n_workers, _padded(3 * TINY_GROUP)), dtype=loss.dtype)
        for w in prange(n_workers):
            bad += _tiny_rows(x, c, y, loss, lse, g, w * n // n_workers, (w + 1) * n // n_workers, gs[w, 0], gs[w, 1],
                              gs[w, 2], rs[w], inv_t, k2, eps, ignore_index, z_loss, scale, want_grad, cf, b_all, zero)
        return bad
    if n_chunks <= 1:
        for w in prange(n_workers):
            for i in range(w * n // n_workers, (w + 1) * n // n_workers):
                xr = x[i * row_stride:i * row_stride + c]
                gr = g[i if want_grad else 0]
                if short_rows:
                    bad += _short_row(xr, y[i], loss, lse, gr, i, scratch[w], inv_t, k2, eps, ignore_index,
                                      z_loss, scale, want_grad, cf, zero)
                else:
                    bad += _sparse_row(xr, y[i], loss, lse, gr, i, scratch[w], bstats[w], inv_t, k2, eps,
                                       ignore_index, z_loss, scale, want_grad, cf, zero)
            _store_fence()  # this worker's non-temporal gradient stores are complete
        return bad

    # Few long rows: chunk statistics in parallel, combine per row, then gradients in parallel.
    # The gradient pass recomputes exp (the chunk's scratch is gone by then).
    cm = np.empty((n, n_chunks), dtype=loss.dtype)
    cs = np.empty((n, n_chunks), dtype=loss.dtype)
    csz = np.empty((n, n_chunks), dtype=loss.dtype)
    n_items = n * n_chunks
    for wk in prange(n_workers):
        for item in range(wk * n_items // n_workers, (wk + 1) * n_items // n_workers):
            i = item // n_chunks
            k = item - i * n_chunks
            lo = min(k * step, c)
            hi = min(lo + step, c)
            if hi > lo:
                r0 = i * row_stride
                m_k, s_k, sz_k = _online_stats(x[r0 + lo:r0 + hi], 0, hi - lo, k2, scratch[wk], bstats[wk],
                                               eps != zero, zero)
            else:
                m_k, s_k, sz_k = zero, zero, zero
            cm[i, k] = m_k
            cs[i, k] = s_k
            csz[i, k] = sz_k
    ms = np.empty(n, dtype=loss.dtype)
    ss = np.empty(n, dtype=loss.dtype)
    for i in prange(n):
        yi = y[i]
        ms[i] = zero
        ss[i] = one
        if yi == ignore_index or yi < 0 or yi >= c:
            ok = yi == ignore_index
            bad += 0 if ok else 1
            loss[i] = zero if ok else nan
            lse[i] = nan
            continue
        # The shift is the max over chunks that hold a finite value (s > 0); a fully masked chunk
        # reports m = 0, which must not pin the shift above the real max.
        m = _as(-np.inf, zero)
        for k in range(n_chunks):
            m = cm[i, k] if (cs[i, k] > zero and cm[i, k] > m) else m
        m = _finite_or_zero(m, zero)
        s = zero
        sz = zero
        for k in range(n_chunks):
            lo = min(k * step, c)
            hi = min(lo + step, c)
            if hi > lo:
                s += zero if cs[i, k] == zero else cs[i, k] * fexp2((cm[i, k] - m) * k2)
                sz += csz[i, k] + (cm[i, k] - m) * _as(hi - lo, zero)
        row, lse_i, _ = _sparse_loss(_load(x[i * row_stride + yi]), m, s, sz, inv_t, eps, z_loss, cf, zero)
        loss[i] = row
        lse[i] = lse_i
        ms[i] = m
        ss[i] = s
    if want_grad:
        for w in prange(n * n_chunks):
            i = w // n_chunks
            k = w - i * n_chunks
            lo = min(k * step, c)
            hi = min(lo + step, c)
            yi = y[i]
            gr = g[i]
            if yi == ignore_index or yi < 0 or yi >= c:
                _fill(gr, lo, hi, zero if yi == ignore_index else nan)
                continue
            m = ms[i]
            a = scale * (one + two * z_loss * lse[i]) * inv_t / ss[i]
            xi = x[i * row_stride:i * row_stride + c]
            for j in range(_u(lo), _u(hi)):
                gr[j] = _store(fexp2((_load(xi[j]) - m) * k2) * a - b_all, gr[j])
            if lo <= yi < hi:
                x_y = _load(xi[yi])
                log_s = np.log(ss[i])
                rest = -one
                if _confident(x_y, m, log_s, inv_t):
                    # s_rest: the other chunks' sums, plus this chunk's without the label, recomputed.
                    rest = zero
                    for kk in range(n_chunks):
                        if kk != k and cs[i, kk] != zero:
                            rest += cs[i, kk] * fexp2((cm[i, kk] - m) * k2)
                    for j in range(_u(lo), _u(hi)):
                        e = fexp2((_load(xi[j]) - m) * k2)
                        rest += e if j != yi else zero  # a select on a computed value: see _masked_term
                gy = _label_grad(x_y, m, log_s, inv_t, eps, z_loss, scale, cf, zero, rest, ss[i])
                gr[yi] = _store(gy, gr[yi])
    return bad


# ------------------------------------------------------------------------------- dense CE
@njit(inline="always", **_JIT)
def _masked_term(q, term, zero):
    """``term`` where the target mass q is non-zero, else 0 (a -inf logit with q = 0 gives 0, not
    0 * -inf = NaN). Written as a select on a value computed unconditionally: the form
    ``zero if q == zero else q * z`` puts the product in a branch, which LLVM did not vectorise
    (1.17 cycles per element against 0.40 for this form, in cache). Dense CE loss + gradient, A/B
    on the bench machine: 65536x1000 81 -> 70 ms, 4096x32000 155 -> 129 ms, 65536x10 2.16 -> 1.94 ms."""
    return term if q != zero else zero


@njit(**_JIT)
def _dense_row(xr, tr, loss, lse, gxr, gtr, i, sc, bm, inv_t, k2, eps, eps_c, scale, want_gx, want_gt, zero):
    c = xr.shape[0]
    one = _as(1, zero)
    m, s, _ = _online_stats(xr, 0, c, k2, sc, bm, False, zero)
    q_sum = zero
    qz = zero
    for j in range(_u(0), _u(c)):
        q = (one - eps) * _load(tr[j]) + eps_c
        q_sum += q
        qz += _masked_term(q, q * ((_load(xr[j]) - m) * inv_t), zero)
    log_s = np.log(s)
    loss[i] = q_sum * log_s - qz
    lse[i] = m * inv_t + log_s
    if want_gx:
        a = q_sum * scale * inv_t / s
        cq = (one - eps) * scale * inv_t  # q scale / T = t cq + cb
        cb = eps_c * scale * inv_t
        for blk in range((c + STAT_BLOCK - 1) // STAT_BLOCK):
            blo = blk * STAT_BLOCK
            bhi = min(blo + STAT_BLOCK, c)
            f = a * _block_factor(bm, blk, m, k2, zero)
            for j in range(_u(blo), _u(bhi)):
                sc[j] = sc[j] * f - (_load(tr[j]) * cq + cb)
        _axpb(gxr, sc, 0, c, one, zero)
    if want_gt:
        for j in range(c):
            gtr[j] = _store((one - eps) * (log_s - (_load(xr[j]) - m) * inv_t) * scale, gtr[j])


@njit(**_JIT)
def _dense_tiny_rows(x, t, c, loss, lse, gx, gt, r0, r1, sc, sh, fa, inv_t, k2, eps, eps_c, scale, want_gx,
                     want_gt, zero):
    """Rows r0 <= i < r1 of dense_cross_entropy for C <= TINY_ROW with rows back to back in x and t:
    groups of TINY_GROUP // C rows as in _tiny_rows (per-row sums, flat vector loops for the exp and
    the logits' gradient). ``sh`` ends up holding each element's row shift, ``fa`` its p factor."""
    one = _as(1, zero)
    rows = max(1, TINY_GROUP // c)
    gxf = gx.reshape(-1)
    cq = (one - eps) * scale * inv_t
    cb = eps_c * scale * inv_t
    for g0 in range(r0, r1, rows):
        g1 = min(g0 + rows, r1)
        base = g0 * c
        span = (g1 - g0) * c
        xg = x[base:base + span]
        tg = t[base:base + span]
        _group_exp(xg, c, g1 - g0, sc, sh, k2, zero)
        for r in range(g1 - g0):
            i = g0 + r
            lo = r * c
            m = sh[lo]
            s = zero
            q_sum = zero
            qz = zero
            for j in range(_u(lo), _u(lo + c)):
                s += sc[j]
                q = (one - eps) * _load(tg[j]) + eps_c
                q_sum += q
                qz += _masked_term(q, q * ((_load(xg[j]) - m) * inv_t), zero)
            log_s = np.log(s)
            loss[i] = q_sum * log_s - qz
            lse[i] = m * inv_t + log_s
            a = q_sum * scale * inv_t / s
            for j in range(_u(lo), _u(lo + c)):
                fa[j] = a
            if want_gt:
                for j in range(c):
                    gt[i, j] = _store((one - eps) * (log_s - (_load(xg[lo + j]) - m) * inv_t) * scale, gt[i, j])
        if want_gx:
            for j in range(_u(0), _u(span)):
                gxf[base + j] = _store(sc[j] * fa[j] - (_load(tg[j]) * cq + cb), gxf[base + j])


@njit(parallel=True, **_JIT)
def dense_cross_entropy(x, x_stride, t, t_stride, c, loss, lse, gx, gt, inv_t, eps, scale, want_gx, want_gt,
                        n_workers):
    """Fused softmax cross-entropy with dense targets, q = (1-ε) t + ε/C.

    ``x`` and ``t`` are flat 1-D arrays whose row i starts at ``i * x_stride`` (``i * t_stride``) and
    has ``c`` elements, as in sparse_cross_entropy; ``gx``/``gt`` are (N, C) C-contiguous.

    row = Σ_c q_c (log s - zs_c)  (terms with q_c == 0 skipped, so masked -inf classes with zero
    target stay finite); d/dlogits = (p Σq - q) scale / T; d/dtargets = (1-ε)(log s - zs) scale.
    ``gx``/``gt`` are written only when ``want_gx``/``want_gt``. One read of the logits from memory
    (online stats into a thread-local scratch row), one read of the targets per pass that needs them.
    The logits' gradient is formed in the scratch row and written with non-temporal stores (_axpb)
    for a whole row at once (A/B: 4096x32000 129 -> 121 ms, 65536x1000 69 -> 67 ms; per 512-element
    block it gained nothing at 65536x1000, whose rows are two blocks).
    """
    n = loss.shape[0]
    zero = inv_t - inv_t
    one = _as(1, zero)
    eps_c = eps / _as(c, zero)
    k2 = inv_t * _as(LOG2E, zero)
    if c <= TINY_ROW and x_stride == c and t_stride == c:
        gs = _group_scratch(n_workers, c, loss.dtype)
        for w in prange(n_workers):
            _dense_tiny_rows(x, t, c, loss, lse, gx, gt, w * n // n_workers, (w + 1) * n // n_workers, gs[w, 0],
                             gs[w, 1], gs[w, 2], inv_t, k2, eps, eps_c, scale, want_gx, want_gt, zero)
        return
    scratch = np.empty((n_workers, _padded(c)), dtype=loss.dtype)
    bstats = np.empty((n_workers, 2, _padded((c + STAT_BLOCK - 1) // STAT_BLOCK)), dtype=loss.dtype)
    for w in prange(n_workers):
        for i in range(w * n // n_workers, (w + 1) * n // n_workers):
            _dense_row(x[i * x_stride:i * x_stride + c], t[i * t_stride:i * t_stride + c], loss, lse,
                       gx[i if want_gx else 0], gt[i if want_gt else 0], i,
                       scratch[w], bstats[w], inv_t, k2, eps, eps_c, scale, want_gx, want_gt, zero)
        _store_fence()  # this worker's non-temporal gradient stores are complete


# ------------------------------------------------------------------------ elementwise losses
BLOCK = 4096  # elements per parallel work item; its partial sum is short enough to stay accurate


@intrinsic
def _relu_f32(typingctx, x):
    """max(x, 0) for float32 by bits, x & ~(x >> 31): LLVM emits vpmaxsd, an integer op, where the
    float select is a vmaxps on the multiply ports."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        b = builder.bitcast(args[0], i32)
        return builder.bitcast(builder.and_(b, builder.not_(builder.ashr(b, ir.Constant(i32, 31)))), ir.FloatType())
    return types.float32(x), codegen


def _relu(x):
    pass


@overload(_relu)
def _relu_ov(x):
    if x == types.float32:
        return lambda x: _relu_f32(x)
    return lambda x: x if x > 0.0 else 0.0


@njit(**_JIT)
def _bce(xv, tv, sp, zero):
    # max(x, 0) - x t + log1p(exp(-|x|)): never log(sigmoid), which is -inf once sigmoid underflows.
    return _relu(xv) - xv * tv + sp


@njit(inline="always", **_JIT)
def _bce_pass(x, t, out, gx, lo, hi, keep, half_eps, scale, c, zero, write_out, write_gx):
    """One block of sigmoid_cross_entropy; returns the block's loss sum. Inlined at every call site
    with literal flags (and t' = t for ε = 0), so each site compiles to one loop whose stores are
    unconditional: a store under a run-time ``if`` inside the loop keeps LLVM from vectorising it."""
    acc = zero
    for j in range(lo, hi):
        xv = _load(x[j])
        tv = _load(t[j]) * keep + half_eps
        sp, sig = _sigmoid_parts(xv, c)
        v = _bce(xv, tv, sp, zero)
        acc += v
        if write_out:
            out[j] = v
        if write_gx:
            gx[j] = _store((sig - tv) * scale, gx[j])
    return acc


@njit(parallel=True, **_JIT)
def sigmoid_cross_entropy(x, t, out, partial, gx, gt, eps, coef, scale, want_out, want_gx, want_gt):
    """Elementwise BCE from logits over flat arrays; per-block partial sums in ``partial``.

    loss = max(x,0) - x t' + log1p(exp(-|x|)), t' = t(1-ε) + ε/2;
    d/dx = sigmoid(x) - t' (sigmoid from the same e = exp(-|x|): 1/(1+e) or e/(1+e));
    d/dt = -(1-ε) x. Gradients are multiplied by ``scale``. ``coef`` is SIGMOID_COEF (an argument
    on purpose: see there).

    Each block runs one pass over x and t (_bce_pass), specialised per call site for the outputs
    wanted. log1p is a division-free polynomial and the sigmoid's reciprocal a refined vrcpps estimate
    (see _sigmoid_parts and _use_rcp_estimate).
    """
    n = x.shape[0]
    zero = scale - scale
    one = _as(1, zero)
    keep = one - eps
    half_eps = eps * _as(0.5, zero)
    nb = (n + BLOCK - 1) // BLOCK
    for bi in prange(nb):
        _use_rcp_estimate()  # in the prange body: that is the LLVM function holding the loop
        lo = _u(bi * BLOCK)  # unsigned: see _u
        hi = _u(min(bi * BLOCK + BLOCK, n))
        c = _coef_scalars(coef)
        if want_gx and want_out:
            acc = _bce_pass(x, t, out, gx, lo, hi, keep, half_eps, scale, c, zero, True, True)
        elif want_gx and eps == zero:  # the training step; t' = t saves an FMA per element
            acc = _bce_pass(x, t, out, gx, lo, hi, one, _as(0, zero), scale, c, zero, False, True)
        elif want_gx:
            acc = _bce_pass(x, t, out, gx, lo, hi, keep, half_eps, scale, c, zero, False, True)
        elif want_out:
            acc = _bce_pass(x, t, out, gx, lo, hi, keep, half_eps, scale, c, zero, True, False)
        else:
            acc = _bce_pass(x, t, out, gx, lo, hi, keep, half_eps, scale, c, zero, False, False)
        partial[bi] = acc
        if want_gt:
            for j in range(lo, hi):
                gt[j] = _store(-keep * _load(x[j]) * scale, gt[j])


@njit(parallel=True, **_JIT)
def squared_error(p, t, out, partial, gp, gt, scale, want_out, want_gp, want_gt):
    """Elementwise (p - t)^2 over flat arrays; per-block partial sums; gradients ±2(p - t) scale.

    One pass over p and t per block keeps d = p - t in an L1 buffer; the gradients are written from
    it with non-temporal stores (_axpb), which skip the read-for-ownership of each gradient line:
    one memory transfer per line instead of two. Measured on the bench machine (2^24 fp32, loss +
    d/dp, A/B in one process): 11.0 -> 8.0 ms; the earlier two-pass form re-read p and t."""
    n = p.shape[0]
    zero = scale - scale
    two = _as(2, zero)
    nb = (n + BLOCK - 1) // BLOCK
    for bi in prange(nb):
        lo = _u(bi * BLOCK)  # unsigned: see _u
        hi = _u(min(bi * BLOCK + BLOCK, n))
        dbuf = np.empty(hi - lo, dtype=partial.dtype)
        acc = zero
        for j in range(lo, hi):
            d = _load(p[j]) - _load(t[j])
            acc += d * d
            dbuf[j - lo] = d
        partial[bi] = acc
        if want_out:
            for j in range(lo, hi):
                d = dbuf[j - lo]
                out[j] = d * d
        if want_gp:
            _axpb(gp[lo:hi], dbuf, 0, hi - lo, two * scale, zero)
        if want_gt:
            _axpb(gt[lo:hi], dbuf, 0, hi - lo, -two * scale, zero)
        _store_fence()  # the non-temporal stores are complete before the parallel region ends


@njit(parallel=True, **_JIT)
def scale_rows(g, w):
    """g[i, :] *= w[i] in place (backward of reduction="none" with a non-trivial cotangent)."""
    n, c = g.shape
    for i in prange(n):
        wi = w[i]
        for j in range(c):
            g[i, j] = _store(_load(g[i, j]) * wi, g[i, j])
