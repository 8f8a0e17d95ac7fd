"""Bitwise parity of jaxvelo.core.npmath with numpy's float32 ``np.exp`` / ``np.log``.

numpy's float32 exp/log are its own SIMD kernels (AVX512F or AVX2+FMA3), not libm; on a CPU
without them numpy calls libm and the port does not apply, so the tests are skipped there.
An exhaustive run over all 2**32 float32 bit patterns (both functions, this machine, numpy
2.4.6) found no differing bit; these tests sample it in a few seconds.
"""

from __future__ import annotations

import fractions

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _bitwise import assert_bitwise

from jaxvelo.core import host_kernels, npmath
from jaxvelo.core.numerics import native_f32_division

pytestmark = pytest.mark.skipif(
    not npmath.numpy_kernel_info()["simd_exp_log"],
    reason="numpy uses libm expf/logf on this CPU (no AVX512F / AVX2+FMA3 kernel)",
)

j_exp = jax.jit(npmath.np_exp32)
j_log = jax.jit(npmath.np_log32)
j_fma = jax.jit(npmath.fma32)
# The public functions call numpy's own loop on the CPU backend (where usable); the XLA
# port is what other backends run: the tests of numpy's results check both.
PORT = {
    log: jax.jit(lambda x, log=log: npmath._exp_log(x, log, False, native_f32_division()))
    for log in (False, True)
}
EXP = {"public": j_exp, "xla_port": PORT[False]}
LOG = {"public": j_log, "xla_port": PORT[True]}
IMPLS = pytest.mark.parametrize("impl", ["public", "xla_port"])

F32 = np.finfo(np.float32)
SUB_MIN = np.float32(F32.smallest_subnormal)
SUB_MAX = np.nextafter(F32.smallest_normal, np.float32(0))
XMAX = np.float32(88.72283935546875)
XMIN = np.float32(-103.97208404541015625)


def ref(fn, x):
    with np.errstate(all="ignore"):
        return fn(x)


def quadrant_ties() -> np.ndarray:
    """float32 x where ``round(fl(x * log2e))`` != ``round(x * log2e)`` (exact product).

    numpy rounds the product before the magic-number rounding; a contracted (FMA) version
    would pick the other quadrant for these x (and differs in the result for most of them).
    """
    log2e = np.float32(1.4426950408889634)
    k = np.arange(-151, 129, dtype=np.float64) + 0.5
    centre = (k / np.float64(log2e)).astype(np.float32).view(np.int32)
    x = (centre[:, None] + np.arange(-64, 65, dtype=np.int32)).ravel().view(np.float32)
    x = x[(x > XMIN) & (x < XMAX)]
    exact = np.round(x.astype(np.float64) * np.float64(log2e))
    return x[np.round((x * log2e).astype(np.float64)) != exact]


EDGE = np.array(
    [
        0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan,
        SUB_MIN, -SUB_MIN, SUB_MAX, -SUB_MAX, F32.smallest_normal, -F32.smallest_normal,
        F32.max, -F32.max, F32.tiny * 3, 1.0, -1.0, 2.0, 0.5, 1e-30, -1e-30,
        np.nextafter(np.float32(1), np.float32(2)), np.nextafter(np.float32(1), np.float32(0)),
        0.70710677, np.nextafter(np.float32(0.70710677), np.float32(1)),
        1.4142135, np.nextafter(np.float32(1.4142135), np.float32(2)),
        XMAX, np.nextafter(XMAX, np.float32(0)), np.nextafter(XMAX, np.float32(100)),
        XMIN, np.nextafter(XMIN, np.float32(0)), np.nextafter(XMIN, np.float32(-200)),
        -87.33654, -87.336556, -100.0, -103.27893, -103.9, -110.0, 88.0, 89.0, 100.0,
        -4.1543407, 0.6931472, -0.6931472, 0.34657359, -0.34657359, 3.0e38, 1e-45,
    ],
    dtype=np.float32,
)  # fmt: skip


def nan_with_payloads() -> np.ndarray:
    bits = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0x7FC12345],
                    np.uint32)  # fmt: skip
    return bits.view(np.float32)


# ------------------------------------------------------------------------ numpy facts


def test_numpy_scalar_and_strided_calls_use_the_same_kernel():
    """A numpy scalar, a 1-element array, a strided view and a strided ``out=`` all give
    the bits of the contiguous SIMD loop (numpy runs ``simd_*_FLOAT`` on single elements)."""
    rng = np.random.default_rng(1)
    v = np.concatenate([rng.uniform(-100, 88, 3000), 2.0 ** rng.uniform(-140, 127, 3000)])
    v = v.astype(np.float32)
    for fn in (np.exp, np.log):
        want = ref(fn, np.repeat(v[:, None], 17, axis=1))[:, 0]
        scalar = np.array([ref(fn, s) for s in v], np.float32)
        one = np.array([ref(fn, v[i : i + 1])[0] for i in range(0, len(v), 7)], np.float32)
        strided = ref(fn, np.repeat(v, 3)[::3])
        out = np.empty(2 * len(v), np.float32)
        with np.errstate(all="ignore"):
            fn(v, out=out[::2])
        assert_bitwise(scalar, want)
        assert_bitwise(one, want[::7])
        assert_bitwise(strided, want)
        assert_bitwise(out[::2], want)


def test_numpy_is_not_correctly_rounded_here():
    """The motivating example: numpy's exp differs from the correctly rounded value."""
    x = np.float32(-4.1543407)
    assert np.exp(x) == np.float32(0.015696134)
    assert np.float32(np.exp(np.float64(x))) == np.float32(0.015696136)
    assert_bitwise(j_exp(np.array([x])), np.exp(np.array([x])))


def test_runtime_check():
    assert npmath.numpy_matches_npmath(n_random=2048)


# ------------------------------------------------------------------------------- exp


@IMPLS
def test_exp_dense_sweep(impl):
    rng = np.random.default_rng(0)
    x = rng.uniform(-100, 100, 2**20).astype(np.float32)
    assert_bitwise(EXP[impl](x), ref(np.exp, x))


@IMPLS
def test_exp_subnormal_and_overflow_ranges(impl):
    """Results in the subnormal range (x in (xmin, -87.34)) and the saturation ends."""
    rng = np.random.default_rng(2)
    a = rng.uniform(-104.5, -86, 2**17).astype(np.float32)
    b = rng.uniform(87, 89, 2**16).astype(np.float32)
    near = (XMIN.view(np.int32) + np.arange(-300, 300, dtype=np.int32)).view(np.float32)
    x = np.concatenate([a, b, near])
    assert_bitwise(EXP[impl](x), ref(np.exp, x))


@IMPLS
def test_exp_random_bit_patterns(impl):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 2**32, 2**18, dtype=np.uint64).astype(np.uint32).view(np.float32)
    assert_bitwise(EXP[impl](x), ref(np.exp, x))


@IMPLS
def test_exp_edges_and_nans(impl):
    x = np.concatenate([EDGE, nan_with_payloads()])
    assert_bitwise(EXP[impl](x), ref(np.exp, x))


@IMPLS
def test_exp_quadrant_ties_need_the_rounded_product(impl):
    x = quadrant_ties()
    assert len(x) > 50
    assert_bitwise(EXP[impl](x), ref(np.exp, x))


# ------------------------------------------------------------------------------- log


@IMPLS
def test_log_dense_sweep(impl):
    rng = np.random.default_rng(4)
    x = (2.0 ** rng.uniform(-149, 128, 2**20)).astype(np.float32)  # every binade
    near_one = rng.uniform(0.5, 2.0, 2**18).astype(np.float32)
    x = np.concatenate([x, near_one])
    assert_bitwise(LOG[impl](x), ref(np.log, x))


@IMPLS
def test_log_random_bit_patterns(impl):
    rng = np.random.default_rng(5)
    x = rng.integers(0, 2**32, 2**18, dtype=np.uint64).astype(np.uint32).view(np.float32)
    assert_bitwise(LOG[impl](x), ref(np.log, x))


@IMPLS
def test_log_subnormal_inputs(impl):
    bits = np.concatenate([np.arange(1, 5000), np.arange(0x7FF000, 0x800000)]).astype(np.uint32)
    x = np.concatenate([bits.view(np.float32), -bits[:50].view(np.float32)])
    assert_bitwise(LOG[impl](x), ref(np.log, x))


@IMPLS
def test_log_edges_and_nans(impl):
    x = np.concatenate([EDGE, nan_with_payloads()])
    got = np.asarray(LOG[impl](x))
    assert_bitwise(got, ref(np.log, x))
    neg = np.signbit(x) & ~np.isnan(x) & (x != 0)
    assert np.isnan(got[neg]).all() and np.signbit(got[neg]).all()  # -NPY_NANF


# ---------------------------------------------------------------- jit / vmap / dtypes


def test_shapes_eager_jit_vmap():
    rng = np.random.default_rng(6)
    x = rng.uniform(-30, 30, (7, 5, 3)).astype(np.float32)
    pos = np.abs(x) + np.float32(1e-3)
    for fn, jfn, npfn, arg in ((npmath.np_exp32, j_exp, np.exp, x),
                               (npmath.np_log32, j_log, np.log, pos)):  # fmt: skip
        want = ref(npfn, arg)
        assert_bitwise(fn(arg), want)  # eager
        assert_bitwise(jfn(arg), want)
        assert_bitwise(jax.vmap(jfn)(arg), want)
        assert_bitwise(jax.jit(jax.vmap(jax.vmap(fn)))(arg), want)
        assert_bitwise(jax.vmap(fn, in_axes=2, out_axes=2)(arg), want)
        scalar = jfn(arg[0, 0, 0])
        assert scalar.shape == () and scalar.dtype == jnp.float32
        assert_bitwise(scalar, want[0, 0, 0])
        assert jfn(np.zeros((0, 3), np.float32)).shape == (0, 3)


@pytest.mark.skipif(not host_kernels.numpy_exp_log_available(),
                    reason="numpy's exp/log loops are not usable here")  # fmt: skip
@pytest.mark.parametrize("division", ["native", "float64"])
@pytest.mark.parametrize("log", [False, True], ids=["exp", "log"])
def test_custom_call_and_xla_port_agree(log, division, monkeypatch):
    # On CPU np_exp32/np_log32 call numpy's own loop (host_kernels) as a custom call;
    # other backends run the XLA port. Same bits on random patterns, the edges and
    # the subnormal ranges, for float32 and for float64 input; the XLA port also with its
    # float32 division taken in float64 (what a GPU runs, numerics.divide).
    monkeypatch.setenv("JAXVELO_F32_DIVISION", division)
    native = division == "native"
    rng = np.random.default_rng(12)
    bits = np.concatenate([rng.integers(0, 2**32, 2**18, dtype=np.uint64).astype(np.uint32),
                           np.arange(0, 2**23, 97, dtype=np.uint32),
                           np.arange(2**31, 2**31 + 2**23, 89, dtype=np.uint32)])  # fmt: skip
    x = np.concatenate([bits.view(np.float32), EDGE])
    v = np.concatenate([rng.standard_normal(4096) * 60, 2.0 ** rng.uniform(-160, -120, 4096)])
    for arg in (x, x.astype(np.float64), v):
        host = jax.jit(lambda a: npmath._exp_log(a, log, True, native))(arg)
        xla = jax.jit(lambda a: npmath._exp_log(a, log, False, native))(arg)
        assert_bitwise(host, xla)


@IMPLS
def test_float64_holding_float32(impl):
    rng = np.random.default_rng(7)
    xe = np.concatenate([rng.uniform(-104.5, 89, 2**17).astype(np.float32), EDGE])
    xl = np.concatenate([(2.0 ** rng.uniform(-149, 128, 2**17)).astype(np.float32), EDGE])
    for jfn, npfn, x32 in ((EXP[impl], np.exp, xe), (LOG[impl], np.log, xl)):
        x64 = x32.astype(np.float64)
        got = jfn(x64)
        assert got.dtype == jnp.float64
        assert_bitwise(got, ref(npfn, x32).astype(np.float64))  # subnormals included


@IMPLS
def test_float64_rounds_like_astype(impl):
    x = np.array([0.1, 1e-40, 3.3e-42, -1.00000001, 2.0**-149 * 2.5, 1e39], np.float64)
    with np.errstate(over="ignore"):
        x32 = x.astype(np.float32)
    assert_bitwise(EXP[impl](x), ref(np.exp, x32).astype(np.float64))
    assert_bitwise(LOG[impl](x), ref(np.log, x32).astype(np.float64))


def test_rejects_other_dtypes_and_needs_x64():
    with pytest.raises(TypeError):
        npmath.np_exp32(jnp.arange(3))
    with jax.enable_x64(False), pytest.raises(RuntimeError, match="x64"):
        npmath.np_exp32(jnp.ones(3, jnp.float32))


# ------------------------------------------------------------------------------ fma32


def _fma_exact(a: np.float32, b: np.float32, c: np.float32) -> np.float32:
    """round_f32(a * b + c) with rational arithmetic (nearest, ties to even)."""
    r = fractions.Fraction(float(a)) * fractions.Fraction(float(b)) + fractions.Fraction(float(c))
    f = np.float32(float(r))  # within one float32 ulp of the answer
    cands = [np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]
    dist = [abs(fractions.Fraction(float(v)) - r) for v in cands]
    best = min(dist)
    ties = [v for v, d in zip(cands, dist, strict=True) if d == best]
    return min(ties, key=lambda v: int(v.view(np.uint32)) & 1)  # even significand


def test_fma32_double_rounding_cases():
    """Exact a*b + c lies just off a float32 midpoint that the float64 sum lands on; a
    plain ``float32(a64 * b64 + c64)`` rounds these the wrong way."""
    one_p = np.float32(1 + 2.0**-23)
    one_m = np.float32(1 - 2.0**-23)
    a = np.array([one_p, -one_p, -one_p, one_p], np.float32)
    b = np.array([one_m, one_m, one_m, -one_m], np.float32)
    c = np.array([16777218.0, -16777218.0, 16777218.0, 2.0**25 + 4], np.float32)
    want = np.array([_fma_exact(*t) for t in zip(a, b, c, strict=True)], np.float32)
    naive = (a.astype(np.float64) * b + c).astype(np.float32)
    assert (naive != want).any()
    assert_bitwise(j_fma(a, b, c), want)


def test_fma32_random_against_rationals():
    rng = np.random.default_rng(8)
    n = 3000
    a = (rng.standard_normal(n) * 2.0 ** rng.integers(-20, 20, n)).astype(np.float32)
    b = (rng.standard_normal(n) * 2.0 ** rng.integers(-20, 20, n)).astype(np.float32)
    # c near -a*b (cancellation) or near a*b's ulp scale (many double-rounding candidates)
    p = a.astype(np.float64) * b
    c = np.where(rng.random(n) < 0.5, -p * (1 + rng.standard_normal(n) * 1e-6),
                 p * 2.0 ** rng.integers(10, 40, n)).astype(np.float32)  # fmt: skip
    want = np.array([_fma_exact(*t) for t in zip(a, b, c, strict=True)], np.float32)
    assert_bitwise(j_fma(a, b, c), want)
