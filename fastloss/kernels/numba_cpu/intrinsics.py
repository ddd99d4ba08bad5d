"""LLVM-level building blocks for the Numba kernels: bit casts, rounding, and two explicit vector loops.

Everything here is an ``@intrinsic``: it emits LLVM IR directly, for the few operations that Numba
cannot express or that LLVM will not vectorise well from scalar code:

- bit casts between float32 and its bits, and float16 <-> float32 through LLVM's ``half`` type;
- ``_rint32`` (``llvm.rint``, survives fast-math DAG combines) and ``_pow2_from_biased`` (2^k by
  integer shifts) for the exp;
- ``_block_max_vec``: a NaN-skipping vector max, one ``vmaxps`` per vector;
- ``_nt_axpb`` and ``_store_fence``: non-temporal vector stores of a gradient, and the fence after;
- ``_use_rcp_estimate``: lets LLVM emit the ``vrcpps`` estimate for a marked division;
- ``_sign_bit_set`` and ``_relu_f32``: float selects done on integer bits.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

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


# ------------------------------------------------------------------------------ vector loops
_VEC_BYTES = 32  # one AVX2 register (AVX2 is the baseline ISA); a vector non-temporal store's alignment


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
    without ``nnan``, and vectorises ``llvm.maxnum`` with a NaN check, blend and early-exit test per
    vector (docs/performance.md has the measurements)."""
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


@intrinsic
def _use_rcp_estimate(typingctx):
    """Let LLVM lower ``1 / d`` (with arcp and ninf) to the vrcpps estimate in the calling function.

    The attribute goes on the LLVM function being generated, so the call must sit in the function
    whose loop does the division (a kernel's prange body, or a test's loop), not in a helper that
    LLVM later inlines: inlining keeps the caller's attributes. Without it the division is an exact
    vdivps (several cycles per element) and _recip_core's refinement does
    nothing: slower, never wrong. llvmlite's attribute set only accepts names it knows, so the
    string attribute is added to the underlying set directly."""
    def codegen(context, builder, sig, args):
        set.add(builder.function.attributes, '"reciprocal-estimates"="vec-divf:0,divf:0"')
        return context.get_dummy_value()
    return types.none(), codegen


@intrinsic
def _prefer_wide_vectors(typingctx):
    """Let LLVM vectorise the calling function's loops at the widest width the target has (512 bits
    with AVX-512; LLVM's default for AVX-512 CPUs is 256). A no-op on AVX2 targets. Like
    _use_rcp_estimate, it marks the LLVM function being generated, so it goes in each function whose
    loops should widen."""
    def codegen(context, builder, sig, args):
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()
    return types.none(), codegen


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


class _Lanes:
    """The LLVM IR pieces of the non-temporal store intrinsics below: W-wide loads of array
    argument k at element j, splats of scalar argument k, and the one non-temporal store into
    argument 0 (32-byte aligned there; the loads assume only the element alignment)."""

    def __init__(self, context, builder, sig, args, j_pos):
        self.context, self.builder, self.sig, self.args = context, builder, sig, args
        _, self.vt, self.width = _vector_type(context, sig.args[0].dtype)
        self.i32 = ir.IntType(32)
        self.j = args[j_pos]

    def const(self, value):
        return ir.Constant(self.vt, [value] * self.width)

    def splat(self, k):
        b, undef = self.builder, ir.Constant(self.vt, ir.Undefined)
        v = b.insert_element(undef, self.args[k], ir.Constant(self.i32, 0))
        return b.shuffle_vector(v, undef, ir.Constant(ir.VectorType(self.i32, self.width), [0] * self.width))

    def _pointer(self, k):
        arr = self.context.make_array(self.sig.args[k])(self.context, self.builder, self.args[k])
        return self.builder.bitcast(self.builder.gep(arr.data, [self.j]), self.vt.as_pointer())

    def load(self, k):
        return self.builder.load(self._pointer(k), align=self.sig.args[k].dtype.bitwidth // 8)

    def store_nt(self, value):
        st = self.builder.store(value, self._pointer(0), align=_VEC_BYTES)
        st.set_metadata("nontemporal", self.builder.module.add_metadata([ir.Constant(self.i32, 1)]))
        return self.context.get_dummy_value()


def _float_arrays(arrays, scalars, j):
    """The typing check the intrinsics share: C-contiguous arrays and scalars of one float dtype."""
    dt = arrays[0].dtype if isinstance(arrays[0], types.Array) else None
    return (all(isinstance(v, types.Array) and v.layout == "C" and v.dtype == dt for v in arrays)
            and all(v == dt for v in scalars) and dt in (types.float32, types.float64)
            and isinstance(j, types.Integer))


@intrinsic
def _nt_axpb(typingctx, out, src, j, a, b):
    """out[j : j+W] = src[j : j+W] * a - b as one W-wide vector store marked ``!nontemporal``
    (W = 32 bytes / itemsize; out + j must be 32-byte aligned, src + j need not be).

    Why: a normal store to a line that is not in cache first reads it (read-for-ownership), so
    writing a gradient costs two memory transfers per line instead of one. LLVM's vectoriser will
    not widen a scalar non-temporal store it cannot prove aligned, so the vector is built here."""
    if not _float_arrays((out, src), (a, b), j):
        return None

    def codegen(context, builder, sig, args):
        v = _Lanes(context, builder, sig, args, 2)
        return v.store_nt(builder.fsub(builder.fmul(v.load(1), v.splat(3)), v.splat(4)))
    return types.void(out, src, j, a, b), codegen


@intrinsic
def _nt_axpbyc(typingctx, out, x, y, z, j, a, b, c):
    """out[j : j+W] = x[j:j+W] * a - y[j:j+W] * b + z[j:j+W] * c, one non-temporal W-wide vector store
    (as _nt_axpb, for a gradient that combines three scratch rows: distillation's)."""
    if not _float_arrays((out, x, y, z), (a, b, c), j):
        return None

    def codegen(context, builder, sig, args):
        v = _Lanes(context, builder, sig, args, 4)
        r = builder.fadd(builder.fsub(builder.fmul(v.load(1), v.splat(5)), builder.fmul(v.load(2), v.splat(6))),
                         builder.fmul(v.load(3), v.splat(7)))
        return v.store_nt(r)
    return types.void(out, x, y, z, j, a, b, c), codegen


@intrinsic
def _nt_axpb_capped(typingctx, out, src, xs, j, a, b, inv_cap):
    """out[j : j+W] = (src * a - b) * (1 - t²), t = max(xs * inv_cap, -1), one non-temporal W-wide
    vector store (as _nt_axpb): the softcapped cross-entropy's gradient, whose factor 1 - tanh² is
    recovered from the capped logits xs = cap tanh(x / cap) (t = -1 at a masked -inf logit: factor 0;
    a NaN passes through the compare)."""
    if not _float_arrays((out, src, xs), (a, b, inv_cap), j):
        return None

    def codegen(context, builder, sig, args):
        v = _Lanes(context, builder, sig, args, 3)
        minus_one = v.const(-1.0)
        t = builder.fmul(v.load(2), v.splat(6))
        t = builder.select(builder.fcmp_ordered("<", t, minus_one), minus_one, t)
        d = builder.fsub(v.const(1.0), builder.fmul(t, t))
        return v.store_nt(builder.fmul(builder.fsub(builder.fmul(v.load(1), v.splat(4)), v.splat(5)), d))
    return types.void(out, src, xs, j, a, b, inv_cap), codegen


@intrinsic
def _store_fence(typingctx):
    """A full fence (x86: mfence) after a row's non-temporal stores: they are weakly ordered, and
    another thread may read the gradient as soon as the parallel region ends."""
    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()
    return types.void(), codegen


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

