"""numpy's ``exp`` and ``log``, bit for bit, in JAX.

On the CPU backend :func:`np_exp32`, :func:`np_log32`, :func:`np_exp64` and
:func:`np_log64` call numpy's own inner loops through custom calls
(:func:`jaxvelo.core.host_kernels.register_numpy_exp_log`, checked at run time): numpy's
bits on any CPU. Elsewhere (GPU; ``JAXVELO_NUMPY_EXP_LOG=0``) the float64 functions are
XLA's ``exp``/``log`` (within an ulp) and the float32 ones this module's XLA port of
numpy's SIMD kernels, described below.

numpy does not call libm for float32 ``exp``/``log`` on x86-64: where the CPU has AVX512F
(or AVX2 + FMA3) it runs its own SIMD kernels ``simd_exp_FLOAT`` / ``simd_log_FLOAT`` from
``numpy/_core/src/umath/loops_exponent_log.dispatch.c.src``.  They are not correctly rounded
(numpy documents max 2.52 ulp for exp, 3.83 ulp for log), and XLA's own ``exp``/``log``
differ from them again.  This module transcribes one SIMD lane of the AVX512F
instantiation, so its results equal numpy's bit for bit (NaN sign included).

Which kernel numpy runs (``FLOAT_exp`` / ``FLOAT_log`` at the end of that file)::

    #if defined(SIMD_AVX2_FMA3) || defined(SIMD_AVX512F)
        if (IS_OUTPUT_BLOCKABLE_UNARY(...)) simd_@func@_FLOAT(op, ip, n, steps[0]);
        else UNARY_LOOP { simd_@func@_FLOAT(op1, ip1, 1, steps[0]); }   /* scalars too */
    #else
        UNARY_LOOP { *op1 = npy_expf(in1); }                               /* libm */

so a numpy scalar or a length-1 array goes through the same SIMD kernel as a long array
(``tests/test_npmath.py`` checks this).  ``SIMD_AVX512F`` is defined when the dispatch target
has AVX512F (numpy 2.4's ``X86_V4``/``AVX512_ICL`` targets on this machine, see
:func:`numpy_kernel_info`); otherwise ``SIMD_AVX2_FMA3`` (``X86_V3``).  The two
instantiations differ only in how they get exponent/mantissa (``getexp``/``getmant`` vs bit
masks with a 2**100 rescale for subnormals) and in ``scalef`` (``_mm512_scalef_ps`` vs an
exponent add plus a division for subnormal results): all of these are exact or correctly
rounded, so both give the same bits.  Without AVX2+FMA3 (older x86, or non-x86 CPUs such
as arm64) numpy calls the C library's ``expf``/``logf``, whose results this module does NOT
reproduce.  MSVC builds compile only the AVX2+FMA3 instantiation, reportedly with
``x * log2e + cvt_magic`` contracted into an FMA (see below), which changes a few results.
:func:`numpy_matches_npmath` detects such differences at run time.

Arithmetic model.  Each ``_mm512_fmadd_ps`` (``@fmadd@``) is one exactly rounded fused
multiply-add, every other intrinsic one IEEE float32 operation:

* fused multiply-adds go through :func:`fma32`, an exact float32 FMA computed in float64
  (the product of two float32 values is exact in float64; the sum is rounded to odd via an
  exact TwoSum and then to float32, which is a single correct rounding).  It does not depend
  on whether XLA contracts ``a * b + c``: every float64 product in it is exact, so a
  contracted and an uncontracted evaluation give the same bits.  (Relying on XLA:CPU's
  contraction of ``a * b + c`` in float32 happens to give the same bits on this backend;
  evaluating the polynomials without FMA does not: ~8% of exp and ~0.7% of log results
  then differ by up to 3 and 6 ulp.)
* ``quadrant = x * log2e`` is rounded before ``+ cvt_magic``: numpy's GCC build keeps them
  separate (checked exhaustively, see below).  A contracted ``fma(x, log2e, magic)``
  picks the other integer for 142 float32 inputs in (xmin, xmax) and changes 84 results;
  the tests include those inputs.  The magic-number pair is written as
  ``lax.round(.., TO_NEAREST_EVEN)`` (the same operation for |quadrant| < 2**22) because
  XLA's algebraic simplifier folds ``(a + C) - C`` to ``a``; the product additionally
  passes :func:`~jaxvelo.core.numerics.fma_barrier`.
* XLA:CPU runs with denormals-are-zero and flush-to-zero; numpy does not.  Subnormal inputs
  and results are therefore handled on the integer bit patterns (exponent/mantissa
  extraction for ``log``, ``scalef`` for ``exp``, and the float32 <-> float64 conversions),
  so they are bitwise equal as well.  A subnormal *result* is only exact as returned: any
  further XLA:CPU arithmetic on it flushes it to zero.

Verification (numpy 2.4.6, AVX512 CPU, XLA:CPU, jax 0.10.2): all 2**32 float32 bit patterns
through both functions, no differing bit (NaN sign and payload, signed zeros and
subnormals included).  On an H200 (XLA:GPU, jax 0.11.2) ~26% of exp and ~0.5% of log
results differed (docs/benchmarks.md, "GPU"): XLA:GPU's float32 division is not IEEE, now
taken in float64 (:func:`~jaxvelo.core.numerics.divide`), and with excess precision allowed
(XLA's default) XLA:GPU folds the float64 -> float32 -> float64 pairs between :func:`fma32`
calls, so programs using these functions are compiled without it (the fit program is).
``tests/test_npmath.py`` is the check to rerun there.

Requires ``jax_enable_x64`` (the FMA emulation needs float64 and int64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxvelo.core.numerics import divide, fma_barrier, native_f32_division

__all__ = [
    "fma32",
    "np_exp32",
    "np_exp64",
    "np_log32",
    "np_log64",
    "numpy_exp_log",
    "numpy_kernel_info",
    "numpy_matches_npmath",
]

_f32 = np.float32

# --------------------------------------------------------------------------- constants
# numpy/_core/src/umath/npy_simd_data.h ("Constants used in vector implementation of exp(x)")
_RINT_CVT_MAGIC = _f32(float.fromhex("0x1.800000p+23"))  # NPY_RINT_CVT_MAGICf 0x1.800000p+23f
_CODY_WAITE_LOGE_2_HIGH = _f32(-6.93145752e-1)  # NPY_CODY_WAITE_LOGE_2_HIGHf
_CODY_WAITE_LOGE_2_LOW = _f32(-1.42860677e-6)  # NPY_CODY_WAITE_LOGE_2_LOWf
_EXP_P = tuple(
    _f32(v)
    for v in (
        9.999999999980870924916e-01,  # NPY_COEFF_P0_EXPf
        7.257664613233124478488e-01,  # NPY_COEFF_P1_EXPf
        2.473615434895520810817e-01,  # NPY_COEFF_P2_EXPf
        5.114512081637298353406e-02,  # NPY_COEFF_P3_EXPf
        6.757896990527504603057e-03,  # NPY_COEFF_P4_EXPf
        5.082762527590693718096e-04,  # NPY_COEFF_P5_EXPf
    )
)
_EXP_Q = tuple(
    _f32(v)
    for v in (
        1.000000000000000000000e00,  # NPY_COEFF_Q0_EXPf
        -2.742335390411667452936e-01,  # NPY_COEFF_Q1_EXPf
        2.159509375685829852307e-02,  # NPY_COEFF_Q2_EXPf
    )
)
# npy_simd_data.h ("Constants used in vector implementation of log(x)")
_LOG_P = tuple(
    _f32(v)
    for v in (
        0.000000000000000000000e00,  # NPY_COEFF_P0_LOGf
        9.999999999999998702752e-01,  # NPY_COEFF_P1_LOGf
        2.112677543073053063722e00,  # NPY_COEFF_P2_LOGf
        1.480000633576506585156e00,  # NPY_COEFF_P3_LOGf
        3.808837741388407920751e-01,  # NPY_COEFF_P4_LOGf
        2.589979117907922693523e-02,  # NPY_COEFF_P5_LOGf
    )
)
_LOG_Q = tuple(
    _f32(v)
    for v in (
        1.000000000000000000000e00,  # NPY_COEFF_Q0_LOGf
        2.612677543073109236779e00,  # NPY_COEFF_Q1_LOGf
        2.453006071784736363091e00,  # NPY_COEFF_Q2_LOGf
        9.864942958519418960339e-01,  # NPY_COEFF_Q3_LOGf
        1.546476374983906719538e-01,  # NPY_COEFF_Q4_LOGf
        5.875095403124574342950e-03,  # NPY_COEFF_Q5_LOGf
    )
)
# numpy/_core/include/numpy/npy_math.h
_LOG2E = _f32(1.442695040888963407359924681001892137)  # NPY_LOG2Ef
_LOGE2 = _f32(0.693147180559945309417232121458176568)  # NPY_LOGE2f
_SQRT1_2 = _f32(0.707106781186547524400844362104849039)  # NPY_SQRT1_2f
# simd_exp_FLOAT: ``npy_float xmax = 88.72283935546875f; xmin = -103.97208404541015625f;``
_EXP_XMAX = _f32(88.72283935546875)
_EXP_XMIN = _f32(-103.97208404541015625)

# Bit patterns (int32) of the special results.  NPY_NANF is ``__builtin_nanf("")``.
_NAN_BITS = np.int32(0x7FC00000)  # NPY_NANF
_NEG_NAN_BITS = np.int32(np.uint32(0xFFC00000).view(np.int32))  # -NPY_NANF
_INF_BITS = np.int32(0x7F800000)  # NPY_INFINITYF
_NEG_INF_BITS = np.int32(np.uint32(0xFF800000).view(np.int32))  # -NPY_INFINITYF
_ABS_MASK = np.int32(0x7FFFFFFF)
_MANT_MASK = np.int32(0x007FFFFF)
_HIDDEN_BIT = np.int32(0x00800000)


def _require_x64() -> None:
    if jax.dtypes.canonicalize_dtype(np.float64) != np.float64:
        raise RuntimeError(
            "jaxvelo.core.npmath needs float64 (run under jax.enable_x64(True)): the exact "
            "float32 fused multiply-add is emulated in float64."
        )


# ------------------------------------------------------------------------- exact FMA


def fma32(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    """Exactly rounded float32 fused multiply-add ``round_f32(a * b + c)``.

    ``p = a * b`` is exact in float64 (24 + 24 <= 53 significand bits, no over/underflow for
    float32 operands).  ``s = fl64(p + c)`` and its exact error ``e`` (Knuth's TwoSum) give
    the exact sum ``s + e``; replacing ``s`` by its odd neighbour towards ``e`` when
    ``e != 0`` and ``s`` is even is rounding to odd, and round-to-odd in a format with at
    least ``24 + 2`` bits followed by round-to-nearest-even to float32 equals a single
    round-to-nearest-even (Boldo & Melquiond, "Emulation of FMA and correctly rounded sums:
    proved algorithms using rounding to odd", IEEE TC 2008).  XLA may contract ``a * b + c``
    and ``p - a'`` into float64 FMAs; since ``p`` is exact that changes no bit.

    Parameters
    ----------
    a, b, c : jax.Array
        float32 operands (broadcastable).  Subnormal operands are read as zero on XLA:CPU
        (denormals-are-zero), as in any XLA:CPU float32 arithmetic.

    Returns
    -------
    jax.Array
        float32, ``fma(a, b, c)`` for finite results.  A result in the subnormal range is
        flushed to zero by XLA:CPU's float64 -> float32 conversion.
    """
    _require_x64()
    f64 = jnp.float64
    a64 = jnp.asarray(a, jnp.float32).astype(f64)
    b64 = jnp.asarray(b, jnp.float32).astype(f64)
    c64 = jnp.asarray(c, jnp.float32).astype(f64)
    p = a64 * b64  # exact
    s = p + c64
    # TwoSum(p, c64): s + e == p + c64 exactly.
    c_virtual = s - p
    p_virtual = s - c_virtual
    e = (p - p_virtual) + (c64 - c_virtual)
    bits = lax.bitcast_convert_type(s, jnp.int64)
    towards_larger_magnitude = (e > 0) == (s > 0)
    step = jnp.where(towards_larger_magnitude, jnp.int64(1), jnp.int64(-1))
    odd = jnp.where((e != 0) & ((bits & 1) == 0), bits + step, bits)
    return lax.bitcast_convert_type(odd, f64).astype(jnp.float32)


# --------------------------------------------------------------- float32 <-> float64


def _f64_to_f32_bits(x: jax.Array) -> jax.Array:
    """``x.astype(float32)`` as int32 bits, subnormal float32 results included.

    XLA:CPU's float64 -> float32 conversion flushes subnormal results to zero; for those
    the significand ``|x| * 2**149`` (exact in float64, rounded half-to-even like the
    conversion) is assembled by hand.
    """
    x = jnp.asarray(x, jnp.float64)
    direct = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    ax = jnp.abs(x)
    tiny = (ax < 2.0**-126) & (ax > 0)
    sig = jnp.round(jnp.where(tiny, ax, 0.0) * 2.0**149).astype(jnp.int32)  # <= 2**23
    sign = jnp.where(jnp.signbit(x), jnp.int32(np.iinfo(np.int32).min), jnp.int32(0))
    return jnp.where(tiny, sig | sign, direct)


def _f32_bits_to_f64(bits: jax.Array) -> jax.Array:
    """float64 value of float32 bits, subnormals included (XLA:CPU reads them as zero)."""
    direct = lax.bitcast_convert_type(bits, jnp.float32).astype(jnp.float64)
    sub = (bits & jnp.int32(0x7F800000)) == 0
    mag = (bits & _MANT_MASK).astype(jnp.float64) * 2.0**-149
    val = jnp.where(bits < 0, -mag, mag)
    return jnp.where(sub, val, direct)


def _apply(kernel, x):
    """Run ``kernel`` (float32 bits -> float32 bits) on float32 or float64 input."""
    if x.dtype == jnp.float32:
        return lax.bitcast_convert_type(kernel(lax.bitcast_convert_type(x, jnp.int32)), x.dtype)
    return _f32_bits_to_f64(kernel(_f64_to_f32_bits(x)))  # float64 (checked by _exp_log)


# --------------------------------------------------------------------------------- exp


def _scalef_bits(poly: jax.Array, quadrant: jax.Array) -> jax.Array:
    """``_mm512_scalef_ps(poly, quadrant)`` = round(poly * 2**quadrant), as int32 bits.

    ``poly`` is a positive normal float32 (P/Q of the reduced argument, ~[0.7, 1.5]) and
    ``quadrant`` an integer in [-150, 128].  Normal results only need the exponent field
    moved (exact); subnormal results (exponent field <= 0) are the 24-bit significand shifted
    right with round-half-to-even, as the hardware rounds them (MXCSR: nearest, no FTZ).
    """
    pbits = lax.bitcast_convert_type(poly, jnp.int32)
    q = quadrant.astype(jnp.int32)
    new_exp = (pbits >> 23) + q  # biased exponent of the result (poly > 0: no sign bit)
    normal = pbits + (q << 23)
    sig = (pbits & _MANT_MASK) | _HIDDEN_BIT
    shift = jnp.clip(1 - new_exp, 1, 30)
    trunc = sig >> shift
    rem = sig & ((jnp.int32(1) << shift) - 1)
    half = jnp.int32(1) << (shift - 1)
    round_up = (rem > half) | ((rem == half) & ((trunc & 1) == 1))
    sub = trunc + round_up.astype(jnp.int32)
    return jnp.where(new_exp >= 1, normal, sub)


def _exp_kernel(xbits: jax.Array) -> jax.Array:
    """One lane of ``simd_exp_FLOAT`` (AVX512F instantiation), float32 bits in and out."""
    x = lax.bitcast_convert_type(xbits, jnp.float32)
    zero = jnp.float32(0.0)
    # nan_mask = _mm512_cmp_ps_mask(x, x, _CMP_NEQ_UQ);
    # x = avx512_set_masked_lanes_ps(x, zeros_f, nan_mask);
    nan_mask = (xbits & _ABS_MASK) > _INF_BITS
    x = jnp.where(nan_mask, zero, x)
    # xmax_mask = cmp(x, xmax, _CMP_GE_OQ); xmin_mask = cmp(x, xmin, _CMP_LE_OQ);
    xmax_mask = x >= _EXP_XMAX
    xmin_mask = x <= _EXP_XMIN
    # x = set_masked_lanes(x, zeros_f, nan_mask | xmin_mask | xmax_mask);
    x = jnp.where(nan_mask | xmin_mask | xmax_mask, zero, x)
    # quadrant = _mm512_mul_ps(x, log2e);   (a separate rounding: guard against contraction)
    quadrant = fma_barrier(x * _LOG2E)
    # /* round to nearest */ quadrant = add(quadrant, cvt_magic); quadrant = sub(.., cvt_magic);
    # For |quadrant| < 2**22 (here <= 150) adding 1.5 * 2**23 lands in [2**23, 2**24) where the
    # ulp is 1, so the pair is exactly round-half-to-even to an integer.  XLA's algebraic
    # simplifier folds ``(a + C) - C`` to ``a``, so it is written as the rounding it is.  (The
    # magic pair gives +0 where lax.round gives -0 for quadrant in (-0.5, -0]; a zero
    # quadrant only multiplies nonzero constants added to x, and the sign of a zero reduced
    # x never reaches the result, so no bit differs.)
    quadrant = lax.round(quadrant, lax.RoundingMethod.TO_NEAREST_EVEN)
    # x = simd_range_reduction(x, quadrant, codyw_c1, codyw_c2, zeros_f):
    #   reduced_x = fmadd(y, c1, x); reduced_x = fmadd(y, c2, reduced_x);
    #   reduced_x = fmadd(y, c3 = 0, reduced_x)   -> adds +-0 to a nonzero or +-0 value that
    #   only feeds fmadd(.., x, p_k) with p_k != 0 below, so it is omitted.
    x = fma32(quadrant, _CODY_WAITE_LOGE_2_HIGH, x)
    x = fma32(quadrant, _CODY_WAITE_LOGE_2_LOW, x)
    # num_poly = fmadd(exp_p5, x, exp_p4); ... fmadd(num_poly, x, exp_p0);
    num = fma32(_EXP_P[5], x, _EXP_P[4])
    for k in (3, 2, 1, 0):
        num = fma32(num, x, _EXP_P[k])
    # denom_poly = fmadd(exp_q2, x, exp_q1); denom_poly = fmadd(denom_poly, x, exp_q0);
    den = fma32(_EXP_Q[2], x, _EXP_Q[1])
    den = fma32(den, x, _EXP_Q[0])
    # poly = _mm512_div_ps(num_poly, denom_poly);   (elementwise, correctly rounded)
    poly = divide(num, den)
    # poly = avx512_scalef_ps(poly, quadrant);
    out = _scalef_bits(poly, quadrant)
    # poly = set_masked_lanes(poly, NPY_NANF, nan_mask); (.., inf, xmax_mask); (.., 0, xmin_mask)
    out = jnp.where(nan_mask, _NAN_BITS, out)
    out = jnp.where(xmax_mask, _INF_BITS, out)
    return jnp.where(xmin_mask, jnp.int32(0), out)


# --------------------------------------------------------------------------------- log


def _log_kernel(xbits: jax.Array) -> jax.Array:
    """One lane of ``simd_log_FLOAT`` (AVX512F instantiation), float32 bits in and out."""
    absb = xbits & _ABS_MASK
    # negx_mask = cmp(x_in, 0, _CMP_LT_OQ); zero_mask = cmp(x_in, 0, _CMP_EQ_OQ);
    # inf_mask = cmp(x_in, inf, _CMP_EQ_OQ); nan_mask = cmp(x_in, x_in, _CMP_NEQ_UQ);
    # (on the bits: XLA:CPU compares a subnormal as zero)
    nan_mask = absb > _INF_BITS
    zero_mask = absb == 0
    negx_mask = (xbits < 0) & ~nan_mask & ~zero_mask
    inf_mask = xbits == _INF_BITS
    # x = set_masked_lanes(x_in, zeros_f, negx_mask);
    # exponent = avx512_get_exponent(x) = _mm512_getexp_ps(x) + 1.0f   (floor(log2 x) + 1)
    # x = avx512_get_mantissa(x) = _mm512_getmant_ps(x, _MM_MANT_NORM_p5_1, _MM_MANT_SIGN_src)
    # Lanes that are masked at the end (<= 0, inf, nan) get x = 1 here; for positive finite
    # x both intrinsics are exact, subnormals included, so they are done on the bits.
    regular = ~(nan_mask | zero_mask | negx_mask | inf_mask)
    b = jnp.where(regular, absb, jnp.int32(0x3F800000))
    efield = b >> 23
    mant = b & _MANT_MASK
    # subnormal: normalise the significand so that its leading 1 sits at bit 23
    norm_shift = jnp.where(efield == 0, lax.clz(mant) - 8, 0)
    sig = mant << norm_shift
    exponent = jnp.where(efield == 0, -125 - norm_shift, efield - 126).astype(jnp.float32)
    x = lax.bitcast_convert_type((sig & _MANT_MASK) | jnp.int32(126 << 23), jnp.float32)
    # sqrt2_mask = cmp(x, NPY_SQRT1_2f, _CMP_LE_OQ);
    # x = blend(x, add(x, x), sqrt2_mask); exponent = blend(exponent, sub(exponent, 1), ..)
    sqrt2_mask = x <= _SQRT1_2
    x = jnp.where(sqrt2_mask, x + x, x)
    exponent = jnp.where(sqrt2_mask, exponent - jnp.float32(1.0), exponent)
    # x = _mm512_sub_ps(x, ones_f);
    x = x - jnp.float32(1.0)
    # num_poly = fmadd(log_p5, x, log_p4); ... fmadd(num_poly, x, log_p0);
    num = fma32(_LOG_P[5], x, _LOG_P[4])
    for k in (3, 2, 1, 0):
        num = fma32(num, x, _LOG_P[k])
    # denom_poly = fmadd(log_q5, x, log_q4); ... fmadd(denom_poly, x, log_q0);
    den = fma32(_LOG_Q[5], x, _LOG_Q[4])
    for k in (3, 2, 1, 0):
        den = fma32(den, x, _LOG_Q[k])
    # poly = _mm512_div_ps(num_poly, denom_poly); poly = fmadd(exponent, loge2, poly);
    poly = fma32(exponent, _LOGE2, divide(num, den))
    out = lax.bitcast_convert_type(poly, jnp.int32)
    # poly = set_masked_lanes(poly, nan, nan_mask); (.., neg_nan, negx_mask);
    #        (.., neg_inf, zero_mask); (.., inf, inf_mask);
    out = jnp.where(nan_mask, _NAN_BITS, out)
    out = jnp.where(negx_mask, _NEG_NAN_BITS, out)
    out = jnp.where(zero_mask, _NEG_INF_BITS, out)
    return jnp.where(inf_mask, _INF_BITS, out)


# ------------------------------------------------------------------------------ public


def _numpy_call(x: jax.Array, op: int, precision: str) -> jax.Array:
    """numpy's own ``precision`` exp (op 0) or log (1) loop as a custom call (CPU backend,
    :func:`jaxvelo.core.host_kernels.register_numpy_exp_log`): elementwise, so a batched
    call is the call on the batched array."""
    from . import host_kernels

    name = host_kernels.register_numpy_exp_log(precision, x.dtype)
    call = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(x.shape, x.dtype),
                            vmap_method="broadcast_all")  # fmt: skip
    return call(x, jnp.full((1,), op, jnp.int32))


def _exp_log(x: jax.Array, log: bool, host: bool, native_div: bool) -> jax.Array:
    # native_div (numerics.native_f32_division(), which divide() reads while tracing) is a
    # static argument only so that the jit cache keeps one trace per lowering choice
    del native_div
    _require_x64()
    x = jnp.asarray(x)
    if x.dtype not in (jnp.float32, jnp.float64):
        raise TypeError(f"expected a float32 or float64 array, got {x.dtype}")
    if host:
        return _numpy_call(x, int(log), "float32")
    return _apply(_log_kernel if log else _exp_kernel, x)


# Jitted so that a program traces each kernel once per shape and dtype: later uses reuse the
# jaxpr and its lowering. On the CPU backend (where numpy's loops are usable) the program
# calls numpy's own float32 loop; elsewhere (GPU, JAXVELO_NUMPY_EXP_LOG=0) it runs this
# module's XLA port (~250 inlined instructions per use, which XLA compiles at every site:
# ~4,300 of the 3696-cell pancreas program's 32,600). Both give numpy's bits.
_exp_log_jit = jax.jit(_exp_log, static_argnums=(1, 2, 3))


def _exp_jit(x: jax.Array) -> jax.Array:
    return _exp_log_jit(x, False, numpy_exp_log(), native_f32_division())


def _log_jit(x: jax.Array) -> jax.Array:
    return _exp_log_jit(x, True, numpy_exp_log(), native_f32_division())


def np_exp32(x: jax.Array) -> jax.Array:
    """``np.exp`` on float32, bit for bit as numpy's AVX512F/AVX2 kernel computes it.

    Parameters
    ----------
    x : jax.Array
        float32 array of any shape, or float64 array holding float32 values (other float64
        values are first rounded to float32, like ``x.astype(np.float32)``).

    Returns
    -------
    jax.Array
        Same dtype and shape as ``x``: ``np.exp(x.astype(np.float32))`` (cast back to
        float64 for float64 input), NaN sign included.  Overflow gives ``inf`` for
        ``x >= 88.72283935546875``, underflow ``0`` for ``x <= -103.97208404541015625``,
        subnormal results in between are exact as returned.  numpy additionally sets its
        overflow/underflow floating-point flags (RuntimeWarning); this does not.
    """
    return _exp_jit(x)


def np_log32(x: jax.Array) -> jax.Array:
    """``np.log`` on float32, bit for bit as numpy's AVX512F/AVX2 kernel computes it.

    Parameters
    ----------
    x : jax.Array
        float32 array of any shape, or float64 array holding float32 values.

    Returns
    -------
    jax.Array
        Same dtype and shape as ``x``: ``np.log(x.astype(np.float32))``.  ``log(+-0) =
        -inf``, ``log(x < 0) = -nan`` (sign bit set, as numpy's ``-NPY_NANF``),
        ``log(nan) = +nan``, ``log(inf) = inf``; subnormal inputs are exact.
    """
    return _log_jit(x)


# ------------------------------------------------------------------------- float64


def numpy_exp_log() -> bool:
    """Whether programs traced now call numpy's own exp/log loops (CPU backend,
    :func:`jaxvelo.core.host_kernels.numpy_exp_log_available`); part of a compiled
    program's cache key."""
    from .assign import use_host_kernels

    if not use_host_kernels():
        return False
    from . import host_kernels

    return host_kernels.numpy_exp_log_available()


def _numpy64(x: jax.Array) -> bool:
    return x.dtype == jnp.float64 and numpy_exp_log()


# Differentiable (the gradient mode's loss goes through the ODE solution): the tangents
# are JAX's own rules for exp and log (``g * ans``, ``g / x``).
@jax.custom_jvp
def _numpy_exp64(x: jax.Array) -> jax.Array:
    return _numpy_call(x, 0, "float64")


@_numpy_exp64.defjvp
def _numpy_exp64_jvp(primals, tangents):
    y = _numpy_exp64(primals[0])
    return y, tangents[0] * y


@jax.custom_jvp
def _numpy_log64(x: jax.Array) -> jax.Array:
    return _numpy_call(x, 1, "float64")


@_numpy_log64.defjvp
def _numpy_log64_jvp(primals, tangents):
    return _numpy_log64(primals[0]), tangents[0] / primals[0]


def np_exp64(x: jax.Array) -> jax.Array:
    """``np.exp`` on float64 as this process's numpy computes it: on the CPU backend a
    custom call of numpy's own loop (bit for bit; :func:`numpy_exp_log`); elsewhere XLA's
    ``exp`` (within an ulp)."""
    x = jnp.asarray(x)
    return _numpy_exp64(x) if _numpy64(x) else jnp.exp(x)


def np_log64(x: jax.Array) -> jax.Array:
    """``np.log`` on float64, like :func:`np_exp64` (XLA's ``log`` is glibc's there)."""
    x = jnp.asarray(x)
    return _numpy_log64(x) if _numpy64(x) else jnp.log(x)


# ------------------------------------------------------------------- run-time check


def numpy_kernel_info() -> dict[str, object]:
    """What numpy reports about its SIMD dispatch (``np.show_runtime`` data).

    Returns
    -------
    dict
        ``numpy_version``, ``found`` (dispatch targets the CPU supports), and
        ``simd_exp_log`` -- True when one of them has AVX2+FMA3 or AVX512F, i.e. when
        numpy's float32 exp/log run the SIMD kernel ported here rather than libm.
    """
    from numpy._core._multiarray_umath import __cpu_features__ as feats

    has_simd = bool(feats.get("AVX512F") or (feats.get("AVX2") and feats.get("FMA3")))
    return {
        "numpy_version": np.__version__,
        "found": sorted(k for k, v in feats.items() if v),
        "simd_exp_log": has_simd,
    }


# float32 values where numpy's kernel differs from the correctly rounded exp/log (and from
# typical libm expf/logf), plus "quadrant ties" where fl(x * log2e) and the exact product
# round to different integers: a build that contracts ``x * log2e + cvt_magic`` into an FMA
# (reported for MSVC's /fp:contract) gives other bits there.  Used by
# :func:`numpy_matches_npmath`.
_PROBE = np.array(
    [
        -4.1543407,
        -103.9,
        -100.0,
        -90.0,
        -87.0,
        -20.5,
        -1.5e-3,
        1.0e-30,
        0.3,
        0.6931472,
        2.5,
        40.0,
        88.72,
        88.7228,
        1.0397207736968994,
        12.130075454711914,
        44.7079963684082,
        57.87778854370117,
        77.2859115600586,
        -17.67525291442871,
        -30.845050811767578,
        -55.7983512878418,
        -81.44479370117188,
    ],
    np.float32,
)


def numpy_matches_npmath(n_random: int = 4096, seed: int = 0) -> bool:
    """Run-time check that this process's numpy computes float32 exp/log like this module.

    Compares ``np.exp``/``np.log`` (array and scalar calls) with :func:`np_exp32` /
    :func:`np_log32` on fixed probes plus ``n_random`` random float32 values.  False means
    numpy dispatches to another code path here (e.g. libm ``expf`` on a CPU without
    AVX2+FMA3, a non-x86 CPU, or a numpy version with a different kernel).

    Returns
    -------
    bool
        True when every probe agrees bit for bit.
    """
    rng = np.random.default_rng(seed)
    xe = np.concatenate([_PROBE, rng.uniform(-100, 88, n_random).astype(np.float32)])
    xl = np.concatenate(
        [np.abs(_PROBE), (2.0 ** rng.uniform(-140, 127, n_random)).astype(np.float32)]
    )
    with np.errstate(all="ignore"):
        want_e = np.exp(xe)
        want_l = np.log(xl)
        scal_e = np.array([np.exp(v) for v in xe[:32]], np.float32)
        scal_l = np.array([np.log(v) for v in xl[:32]], np.float32)
    with jax.enable_x64(True):
        got_e = np.asarray(jax.jit(np_exp32)(xe))
        got_l = np.asarray(jax.jit(np_log32)(xl))
    u = np.uint32
    return bool(
        np.array_equal(got_e.view(u), want_e.view(u))
        and np.array_equal(got_l.view(u), want_l.view(u))
        and np.array_equal(scal_e.view(u), want_e[:32].view(u))
        and np.array_equal(scal_l.view(u), want_l[:32].view(u))
    )
