"""Branch-free fp32 approximations of exp, 1/(1+e) and log1p, so that the loops calling them vectorise.

- ``exp2_32``: 2^u for u <= 0 (rint + a degree-5 polynomial + exponent bits), <= 2.2 ulp;
- ``recip_1p_01``: 1/(1+e) on [0, 1] from the ``vrcpps`` estimate and one Newton step, <= 1.9 ulp;
- ``log1p_01``: log1p(e) on [0, 1] as w G(e), w = e/(1+e), G a degree-7 polynomial, <= 3.6 ulp;
- ``fexp2`` picks exp2_32 for fp32 and libm for fp64; ``_sigmoid_parts`` gives the sigmoid CE its
  log1p and sigmoid from one exp.

Every bound is measured in tests/test_numba.py. NaN propagates through all of them; -inf gives 0.
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from .base import EXP_FLAGS, EXP_JIT, JIT, LOG2E, RCP_FLAGS
from .intrinsics import _pow2_from_biased, _rint32, _sign_bit_set

# ----------------------------------------------------------------------------- exp2 (fp32)
# 2^f on [-1/2, 1/2]: 1 + f q(f), q of degree 4 fitted by Lawson-weighted least squares for the
# relative error of 2^f on 4000 Chebyshev nodes, coefficients rounded to fp32. P0 = 1 exactly, so
# the row max gets exp = 1.0 exactly. Measured <= 2.2 ulp in fp32. Degree 5, not 6: the sparse CE
# kernel is bound by this polynomial's FMAs, and 2.2 ulp is far inside the fp32 loss tolerance.
_P0 = np.float32(1.0)
_P1 = np.float32(0.6931470632553101)
_P2 = np.float32(0.24022242426872253)
_P3 = np.float32(0.05550582334399223)
_P4 = np.float32(0.009671518579125404)
_P5 = np.float32(0.0013308818452060223)


_EXP2_LO = np.float32(-127.0)          # clamp: 2^-127 has exponent field 0, i.e. the result is 0.0
_EXP2_BIAS = np.float32(8388608.0 + 127.0)  # 2^23 + 127


@njit(**EXP_JIT)
def _horner(x, c):
    """c[0] + x (c[1] + x (c[2] + ...)) for a tuple c, one FMA per coefficient (unrolled by LLVM)."""
    p = c[len(c) - 1]
    for i in range(len(c) - 2, -1, -1):
        p = p * x + c[i]
    return p


@njit(**EXP_JIT)
def _exp2_core(u, lo, bias, p0, p1, p2, p3, p4, p5):
    # exp2_32 with its constants as arguments (lo = _EXP2_LO, bias = _EXP2_BIAS, the coefficients):
    # see exp2_32 for the method, SIGMOID_COEF for why.
    uc = lo if u < lo else u
    k = _rint32(uc)
    return _horner(uc - k, (p0, p1, p2, p3, p4, p5)) * _pow2_from_biased(k + bias)


@njit(**EXP_JIT)
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


@njit(fastmath=RCP_FLAGS, cache=True, error_model="numpy")
def _recip_core(e, one):
    # r0 = 1/(1 + e): the vrcpps estimate (relative error h, |h| <= 1.5 * 2^-12 by the x86 spec) where
    # _use_rcp_estimate is in effect. One Newton step: 1/d = r0 / (1 - h) with h = 1 - d r0, so
    # r = r0 (1 + h), relative error -h^2 (<= 1.4e-7). h is formed as (1 - r0) - e r0, both terms
    # exact or nearly so, rather than from the rounded d = 1 + e. ``one`` is 1.0 (an argument: see
    # SIGMOID_COEF). The third-order step r0 (1 + h + h^2) is exact to rounding (0.50 ulp) but one
    # FMA more, and the sigmoid loop is so short of registers that every extra operation or
    # constant shows in its time (docs/performance.md).
    r = one / (one + e)
    h = (one - r) - e * r
    return r + r * h


@njit(**EXP_JIT)
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


@njit(**EXP_JIT)
def _g_core(e, g0, g1, g2, g3, g4, g5, g6, g7):
    return _horner(e, (g0, g1, g2, g3, g4, g5, g6, g7))


@njit(**EXP_JIT)
def log1p_01(e):
    """log1p(e) for e in [0, 1] (the sigmoid's exp(-|x|)), vectorisable and division-free.

    log1p(e) = w G(e) with w = e / (1 + e) (which the sigmoid kernel has anyway: it is sigmoid(-|x|))
    and G the degree-7 polynomial above. Tiny e keeps full relative accuracy (G(0) = 1, no 1 + e
    rounding). No division: a vector divide costs about as much as the whole rest of the sigmoid
    loss, and libm's log1p is a scalar call. NaN propagates. Measured <= 3.6 ulp on [0, 1], the
    reciprocal's error included (tests/test_numba.py); a degree-9 log1p(e)/e polynomial is 1.7 ulp
    and two FMAs more.
    """
    return e * recip_1p_01(e) * _g_core(e, _G[0], _G[1], _G[2], _G[3], _G[4], _G[5], _G[6], _G[7])


def _per_dtype(f32_impl, f64_impl, doc):
    """A function Numba compiles to ``f32_impl`` for float32 arguments and ``f64_impl`` for float64
    ones: the fast approximations serve fp32 accumulation, libm keeps fp64 inputs exact."""
    def generic(u):
        return f64_impl(u)

    @overload(generic, jit_options=dict(fastmath=EXP_FLAGS))
    def _impl(u):
        if u == types.float32:
            return lambda u: f32_impl(u)
        if u == types.float64:
            return lambda u: f64_impl(u)
        return None

    generic.__doc__ = doc
    return generic


# tanh(a) = a P(a^2) / Q(a^2) on [0, 9], P and Q of degree 4 (Q(0) = 1), fitted here by iteratively
# reweighted least squares on the relative error (2.1e-8 over [0, 9]). Coefficients in increasing
# powers of a^2. The fraction is odd in a, so it serves negative arguments as written.
_TP = (np.float32(1.0), np.float32(1.3381033e-01), np.float32(3.4955961e-03), np.float32(2.0609210e-05),
       np.float32(1.3354835e-08))
_TQ = (np.float32(1.0), np.float32(4.6714348e-01), np.float32(2.5877012e-02), np.float32(3.2856475e-04),
       np.float32(7.7766293e-07))
# The argument bound. Past the fitted range the fraction keeps growing (degree 9 over degree 8): it
# crosses 1 near |u| = 8.9 (where tanh is within 1.4 ulp of 1), is 32 ulp above 1 at 10 and 1.06 at
# 16, so clamping its result to [-1, 1] saturates it with no test of u: exactly +-1 from about
# |u| = 9.6 on, far beyond what rounding could undo. 16 keeps the polynomials' terms small.
_TANH_SAT = np.float32(16.0)


@njit(**EXP_JIT)
def tanh_32(u):
    """tanh(u) for float32, branch-free so loops calling it vectorise (the softcap of the logits).

    u P(u^2) / Q(u^2) with u clamped to [-16, 16] and the result to [-1, 1] (which saturates it:
    _TANH_SAT): a rational fit with no exp and no cancellation (P(0) = Q(0) = 1, so tiny u keep
    full relative accuracy). The fraction is odd, so no |u| and no sign restore: about 17 vector
    operations. +-inf give +-1; NaN stays NaN (each clamp is written ``c if u > c else u``, false
    for NaN). Within 6.5 ulp of float64: the fit's 2.1e-8 (0.35 ulp) and the roundings of two
    Horner chains, a divide and a multiply; 5.3 ulp measured (tests/test_numba.py).
    """
    one = np.float32(1.0)
    uc = _TANH_SAT if u > _TANH_SAT else u  # bounded polynomial arguments
    uc = -_TANH_SAT if uc < -_TANH_SAT else uc
    s = uc * uc
    t = uc * _horner(s, _TP) / _horner(s, _TQ)
    t = one if t > one else t
    return -one if t < -one else t


fexp2 = _per_dtype(exp2_32, np.exp2, "2^u (u <= 0) in the accumulation dtype.")
ftanh = _per_dtype(tanh_32, np.tanh, "tanh(u) in the accumulation dtype.")
flog1p_01 = _per_dtype(log1p_01, np.log1p, "log1p(e) for e in [0, 1] in the accumulation dtype.")

# The sigmoid kernel's polynomial coefficients and constants (-log2 e, the exp clamp and bias, 1.0),
# passed to it as an array argument and read into scalars once per block. Why an array: a run-time
# value is broadcast into a register once per block, while LLVM re-materialises a compile-time
# constant in every vector iteration (an address load and a broadcast each); a tuple argument is
# re-read inside the loop. The cross-entropy exp loop goes the other way (run-time coefficients were
# slower there), so exp2_32 keeps its constants.
#
# The count of these invariants also decides LLVM's interleave count for the sigmoid loop. For a
# loop with a reduction LLVM derives it from its register estimate, (16 - invariants - 1) /
# (live values - 1) on AVX2: 14 invariants gave 1 (one latency-bound vector per iteration); with 18
# the unsigned subtraction wraps and LLVM uses the target's maximum, 4, which is the fastest
# interleave measured. Adding or removing an entry here changes that: measure (docs/performance.md).
SIGMOID_COEF = np.array((_P0, _P1, _P2, _P3, _P4, _P5) + _G + (-LOG2E, _EXP2_LO, _EXP2_BIAS, 1.0), np.float32)
SIGMOID_COEF.flags.writeable = False


@njit(**JIT)
def _coef_scalars(coef):
    return (coef[0], coef[1], coef[2], coef[3], coef[4], coef[5], coef[6], coef[7], coef[8], coef[9],
            coef[10], coef[11], coef[12], coef[13], coef[14], coef[15], coef[16], coef[17])


def _sigmoid_parts(xv, c):
    pass


@overload(_sigmoid_parts, jit_options=dict(fastmath=EXP_FLAGS))
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


def _sigmoid_pair(xv, c):
    pass


@overload(_sigmoid_pair, jit_options=dict(fastmath=EXP_FLAGS))
def _sigmoid_pair_ov(xv, c):
    """(log1p(e), p, q, p q) with p = sigmoid(x) and q = sigmoid(-x) = 1 - p, from one
    e = exp(-|x|), for the focal loss: q is never formed as 1 - p, so a confident prediction keeps
    its small complement (whose power is the focal factor); p q = e/(1+e)² needs no select."""
    if xv == types.float32:
        def pair32(xv, c):
            e = _exp2_core(abs(xv) * c[14], c[15], c[16], c[0], c[1], c[2], c[3], c[4], c[5])
            inv = _recip_core(e, c[17])
            w = e * inv
            sp = w * _g_core(e, c[6], c[7], c[8], c[9], c[10], c[11], c[12], c[13])
            neg = _sign_bit_set(xv)
            return sp, (w if neg else inv), (inv if neg else w), w * inv
        return pair32
    if xv == types.float64:
        def pair64(xv, c):
            e = np.exp(-abs(xv))
            inv = 1.0 / (1.0 + e)
            w = e * inv
            return np.log1p(e), (inv if xv >= 0.0 else w), (w if xv >= 0.0 else inv), w * inv
        return pair64
    return None
