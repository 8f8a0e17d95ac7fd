"""Parity of jaxvelo.core.numerics with numpy 2.4 / scipy 1.17 / scVelo 0.3.4.

Bitwise (``assert_array_equal`` on the bytes, dtype included) wherever the module claims it;
the KDE and ``norm.sf`` are compared with tight tolerances, see the comments there.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from _bitwise import assert_bitwise
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxvelo.core import numerics as nm

DTYPES = [np.float32, np.float64]
LENGTHS = [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 127, 128, 129, 130, 255, 256, 257, 1000, 3696]
N_BUF = 4096  # fixed buffer length: one compilation per dtype
Q_LIST = [0.0, 2.5, 5.0, 37.0, 50.0, 95.0, 97.5, 99.9, 100.0]
STATIC_Q = (50.0, 99.9)  # each static q is a separate compilation

# One jitted entry point per function; ``n`` (and ``q`` where traced) are runtime values.
j_sum = jax.jit(nm.pairwise_sum)
j_mean = jax.jit(nm.np_mean)
j_std = jax.jit(nm.np_std)
j_var = jax.jit(nm.np_var, static_argnames="ddof")
j_pct = jax.jit(nm.np_percentile, static_argnums=2)  # q as a Python float
j_pct_traced = jax.jit(nm.np_percentile)  # q as a traced float64
j_pct_masked = jax.jit(nm.np_percentile_masked)
j_compact = jax.jit(nm.compact)
j_linspace = jax.jit(nm.np_linspace, static_argnums=2)
j_kde = jax.jit(nm.gaussian_kde_eval)
j_bimod = jax.jit(nm.test_bimodality)
j_bimod_from_kde = jax.jit(nm.bimodality_from_kde)


def scrna_like(rng: np.random.Generator, size: int, dtype) -> np.ndarray:
    """Moments-like data: many exact zeros, repeated values, wide dynamic range."""
    x = rng.gamma(0.7, 2.0, size) * 10.0 ** rng.uniform(-2, 2)
    x = np.round(x, int(rng.integers(1, 4)))  # ties
    x[rng.random(size) < 0.4] = 0.0
    if size:
        x[rng.random(size) < 0.1] = x[0]
    return x.astype(dtype)


def buffer(x: np.ndarray, rng: np.random.Generator, size: int = N_BUF) -> np.ndarray:
    """``x`` followed by garbage (must be ignored)."""
    out = rng.normal(1e3, 1e3, size).astype(x.dtype)
    out[: len(x)] = x
    return out


def pairwise_reference(a: np.ndarray):
    """Pure-Python model of numpy's ``@TYPE@_pairwise_sum`` (loops_utils.h.src)."""
    t = a.dtype.type
    n = len(a)
    if n < 8:
        r = t(-0.0)
        for v in a:
            r = t(r + v)
        return r
    if n <= 128:
        r = [t(v) for v in a[:8]]
        i = 8
        while i < n - n % 8:
            for k in range(8):
                r[k] = t(r[k] + a[i + k])
            i += 8
        res = t(t(t(r[0] + r[1]) + t(r[2] + r[3])) + t(t(r[4] + r[5]) + t(r[6] + r[7])))
        for v in a[i:]:
            res = t(res + v)
        return res
    n2 = n // 2
    n2 -= n2 % 8
    return t(pairwise_reference(a[:n2]) + pairwise_reference(a[n2:]))


# ------------------------------------------------------------------- numpy's behaviour


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_add_reduce_is_pairwise(dtype):
    # The port relies on np.add.reduce == 0.0 + pairwise(x) for contiguous 1-D input,
    # with no blocking at the 8192-element iterator buffer size.
    rng = np.random.default_rng(0)
    lengths = list(range(1, 140)) + [255, 256, 257, 1000, 3696, 5000, 8193, 20000]
    for n in lengths:
        x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n)).astype(dtype)
        want = np.add.reduce(x)
        got = dtype(dtype(0.0) + pairwise_reference(x))
        assert_bitwise(got, want)


# ------------------------------------------------------------------- pairwise / moments


@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_mean_var_std_bitwise(dtype):
    rng = np.random.default_rng(1)
    for n in LENGTHS + list(rng.integers(1, N_BUF, 25)):
        n = int(n)
        x = scrna_like(rng, n, dtype)
        xb = buffer(x, rng)
        assert_bitwise(j_sum(xb, n), np.add.reduce(x))
        if n == 0:
            continue
        assert_bitwise(j_mean(xb, n), np.mean(x))
        assert_bitwise(j_std(xb, n), np.std(x))
        assert_bitwise(j_var(xb, n), np.var(x))
        if n > 1:
            assert_bitwise(j_var(xb, n, ddof=1), np.var(x, ddof=1))


def test_sum_large_buffer_and_signed_zero():
    rng = np.random.default_rng(2)
    x = rng.standard_normal(20000)
    for n in (8191, 8192, 8193, 20000):
        assert_bitwise(j_sum(x, n), np.add.reduce(x[:n]))
    z = np.full(16, -0.0)
    for n in (0, 1, 5, 16):
        assert_bitwise(j_sum(z, n), np.add.reduce(z[:n]))  # +0.0, like numpy


@pytest.mark.parametrize("host", [True, False], ids=["custom-call", "xla"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pairwise_sum_host_and_xla_bitwise(dtype, host, monkeypatch):
    # Both implementations (numba custom call on CPU, the XLA port elsewhere), unbatched,
    # batched with per-row n, nested vmap and the gathered variant pairwise_sum_at.
    monkeypatch.setenv("JAXVELO_HOST_KERNELS", "1" if host else "0")
    rng = np.random.default_rng(11)
    ns = np.array([0, 1, 7, 8, 9, 127, 128, 129, 130, 257, 1000, 2047, 3696, 4096], np.int32)
    xb = np.stack([buffer(scrna_like(rng, int(n), dtype), rng) for n in ns])
    xb[3, :5] = -0.0
    masks = rng.random(xb.shape) < 0.7
    idx = np.stack([np.argsort(~m, kind="stable") for m in masks]).astype(np.int32)
    cnt = masks.sum(1).astype(np.int32)
    one = jax.jit(lambda x, n: nm.pairwise_sum(x, n))
    rows = jax.jit(jax.vmap(nm.pairwise_sum))
    nested = jax.jit(jax.vmap(jax.vmap(nm.pairwise_sum, in_axes=(0, None)), in_axes=(None, 0)))
    at = jax.jit(jax.vmap(nm.pairwise_sum_at))
    got_rows, got_at = np.asarray(rows(xb, ns)), np.asarray(at(xb, idx, cnt))
    got_nested = np.asarray(nested(xb, ns[:3]))
    for i, n in enumerate(ns):
        want = np.add.reduce(xb[i, :n])
        assert_bitwise(one(xb[i], n), want)
        assert_bitwise(got_rows[i], want)
        assert_bitwise(got_at[i], np.add.reduce(xb[i][masks[i]]))
    for j, n in enumerate(ns[:3]):
        for i in range(len(ns)):
            assert_bitwise(got_nested[j, i], np.add.reduce(xb[i, :n]))


finite32 = st.floats(
    min_value=-1e6, max_value=1e6, allow_nan=False, allow_subnormal=False, width=32
).map(lambda v: 0.0 if abs(v) < 1e-6 else v)  # keep results away from subnormals


@settings(max_examples=60, deadline=None)
@given(
    data=hnp.arrays(np.float32, st.integers(0, 512), elements=finite32),
    as64=st.booleans(),
)
def test_moments_hypothesis(data, as64):
    x = data.astype(np.float64) if as64 else data
    xb = np.zeros(512, x.dtype)
    xb[: len(x)] = x
    n = len(x)
    assert_bitwise(j_sum(xb, n), np.add.reduce(x))
    if n:
        assert_bitwise(j_mean(xb, n), np.mean(x))
        assert_bitwise(j_std(xb, n), np.std(x))
        assert_bitwise(j_pct(xb, n, 99.9), np.percentile(x, 99.9))
        assert_bitwise(j_pct(xb, n, 50.0), np.percentile(x, 50.0))


# ------------------------------------------------------------------------- percentile


@pytest.mark.parametrize("dtype", DTYPES)
def test_percentile_bitwise(dtype):
    rng = np.random.default_rng(3)
    for n in [n for n in LENGTHS if n] + list(rng.integers(1, N_BUF, 10)):
        n = int(n)
        x = scrna_like(rng, n, dtype)
        xb = buffer(x, rng)
        mask = np.zeros(N_BUF, bool)
        mask[rng.choice(N_BUF, n, replace=False)] = True
        xm = rng.permutation(x)
        xmb = buffer(np.zeros(0, dtype), rng)
        xmb[mask] = xm
        for q in Q_LIST:
            want = np.percentile(x, q)  # Python q: result in x's dtype
            assert_bitwise(j_pct_traced(xb, n, jnp.float64(q)), want)
            assert_bitwise(j_pct_masked(xmb, mask, jnp.float64(q)), np.percentile(xm, q))
            if q in STATIC_Q:  # q folded at trace time (divided by 100 in Python)
                assert_bitwise(j_pct(xb, n, q), want)


def test_percentile_array_q_and_nan():
    rng = np.random.default_rng(4)
    x = scrna_like(rng, 777, np.float32)
    xb = buffer(x, rng)
    qs = np.array(Q_LIST)
    got = jax.jit(nm.np_percentile)(xb, 777, jnp.asarray(qs))
    want = np.array([np.percentile(x, float(q)) for q in qs])
    assert_bitwise(got, want)
    x[5] = np.nan
    xb[5] = np.nan
    assert np.isnan(np.percentile(x, 50.0))
    assert np.isnan(j_pct(xb, 777, 50.0))
    assert np.isnan(j_pct(xb, 0, 50.0))  # numpy raises on empty input; documented NaN


# -------------------------------------------------------------------- linspace/compact


@pytest.mark.parametrize("dtype", DTYPES)
def test_linspace_bitwise(dtype):
    rng = np.random.default_rng(5)
    pairs = [(0.0, 1.0), (0.1, 7.3), (3.0, 3.0), (-2.5, 1e-3), (0.0, 5e-30)]
    pairs += [tuple(np.sort(rng.gamma(1, 3, 2))) for _ in range(50)]
    for a, b in pairs:
        a, b = dtype(a), dtype(b)
        for num in (1, 2, 30, 31):
            assert_bitwise(j_linspace(a, b, num), np.linspace(a, b, num))


def test_compact():
    rng = np.random.default_rng(6)
    for dtype in DTYPES:
        x = rng.standard_normal(1000).astype(dtype)
        for p in (0.0, 0.01, 0.5, 1.0):
            mask = rng.random(1000) < p
            y, n = j_compact(x, mask)
            assert n.dtype == jnp.int32 and int(n) == mask.sum()
            assert_bitwise(np.asarray(y)[: int(n)], x[mask])
            assert not np.asarray(y)[int(n) :].any()


# --------------------------------------------------------------------------- vmap / jit


@pytest.mark.parametrize("dtype", DTYPES)
def test_vmap_rows_with_different_n(dtype):
    rng = np.random.default_rng(7)
    ns = np.array([0, 1, 2, 7, 8, 9, 128, 129, 1000, 3696, 4096], np.int32)
    rows = [buffer(scrna_like(rng, int(n), dtype), rng) for n in ns]
    xb = np.stack(rows)

    @jax.jit
    @jax.vmap
    def stats(x, n):
        return (
            nm.pairwise_sum(x, n),
            nm.np_mean(x, n),
            nm.np_std(x, n),
            nm.np_percentile(x, n, 99.9),
            nm.np_percentile(x, n, 2.5),
        )

    out = [np.asarray(v) for v in stats(xb, ns)]
    for i, n in enumerate(ns):
        x = xb[i, :n]
        assert_bitwise(out[0][i], np.add.reduce(x))
        if n:
            assert_bitwise(out[1][i], np.mean(x))
            assert_bitwise(out[2][i], np.std(x))
            assert_bitwise(out[3][i], np.percentile(x, 99.9))
            assert_bitwise(out[4][i], np.percentile(x, 2.5))
        # and vmapped == single-row jit
        assert_bitwise(out[3][i], j_pct(xb[i], int(n), 99.9))


@pytest.mark.parametrize("dtype", DTYPES)
def test_xla_rewrites_are_blocked(dtype):
    # Guards for the two XLA behaviours the module works around: FMA contraction of
    # ``a + b * c`` and ``A / broadcast(b) -> A * (1 / b)``.  If a future XLA folds the
    # workarounds away, this fails before the parity tests do.
    rng = np.random.default_rng(9)
    a, b, c = (rng.standard_normal((64, 512)).astype(dtype) for _ in range(3))
    fused = jax.jit(jax.vmap(lambda a, b, c: a + nm.fma_barrier(b * c)))(a, b, c)
    assert_bitwise(fused, a + b * c)
    d = rng.uniform(1, 100, 64).astype(dtype)
    quot = jax.jit(jax.vmap(nm.true_divide))(a, d)
    assert_bitwise(quot, a / d[:, None])
    assert_bitwise(jax.jit(lambda a: nm.true_divide(a, 3.0))(a), a / dtype(3.0))


@pytest.mark.parametrize("route", ["native", "float64"])
def test_divide_is_correctly_rounded_either_way(route, monkeypatch):
    # float32 quotients as numpy computes them, whether left to the backend (CPU) or taken
    # in float64 and rounded once (every other backend: XLA:GPU's float32 division is
    # div.full.f32, up to 2 ulp off). Python scalars are cast to float32 first (NEP 50).
    monkeypatch.setenv("JAXVELO_F32_DIVISION", route)
    rng = np.random.default_rng(21)
    bits = rng.integers(0x20000000, 0x5F000000, (2, 20000), dtype=np.int64)  # 2**-63..2**63
    a, b = bits.astype(np.uint32).view(np.float32)
    a = a * np.where(rng.random(a.shape) < 0.5, np.float32(-1), np.float32(1))
    q = np.asarray(jax.jit(nm.divide)(a, b))
    want = a / b
    normal = np.abs(want) >= np.finfo(np.float32).tiny  # XLA:CPU flushes subnormals
    assert_bitwise(q[normal], want[normal])
    assert normal.mean() > 0.99
    assert_bitwise(jax.jit(lambda x: nm.divide(0.05, x))(b), np.float32(0.05) / b)
    assert_bitwise(jax.jit(lambda x: nm.divide(x, 2))(a), a / 2)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0], np.float32)
    with np.errstate(all="ignore"):
        assert_bitwise(jax.jit(nm.divide)(specials[:, None], specials[None, :]),
                       specials[:, None] / specials[None, :])  # fmt: skip
    x64 = rng.standard_normal(100)
    assert_bitwise(jax.jit(nm.divide)(x64, x64[::-1]), x64 / x64[::-1])  # float64: plain


def test_division_route_environment(monkeypatch):
    monkeypatch.setenv("JAXVELO_F32_DIVISION", "float64")
    assert not nm.native_f32_division()
    monkeypatch.setenv("JAXVELO_F32_DIVISION", "native")
    assert nm.native_f32_division()
    monkeypatch.delenv("JAXVELO_F32_DIVISION")
    assert nm.native_f32_division() == (jax.default_backend() == "cpu")
    monkeypatch.setenv("JAXVELO_F32_DIVISION", "fast")
    with pytest.raises(ValueError, match="JAXVELO_F32_DIVISION"):
        nm.native_f32_division()


def test_round32_survives_the_fit_programs_compiler_options():
    # round32 is a float64 -> float32 -> float64 convert pair. XLA:GPU folds such pairs to
    # their input when excess precision is allowed (its default); the fit program is
    # compiled without it (batch.COMPILER_OPTIONS). On CPU this holds either way; on a GPU
    # it is the check that upstream's float32 roundings are still computed.
    from jaxvelo.core import batch

    x = np.random.default_rng(3).standard_normal(1000) * 1e3
    fn = jax.jit(lambda v: nm.round32(v * 1.0000001, True))
    got = fn.lower(x).compile(compiler_options=batch.COMPILER_OPTIONS)(x)
    assert_bitwise(got, (x * 1.0000001).astype(np.float32).astype(np.float64))


# --------------------------------------------------------------------------------- KDE

# The KDE cannot be bitwise: scipy's Cython kernel calls glibc exp and the bandwidth uses
# libm pow and two BLAS ddot reductions (OpenBLAS picks its kernel per CPU), while XLA
# has its own exp/pow (<= 1 ulp apart) and this port sums pairwise.  The error is a few
# ulp, amplified by the exponent's magnitude in the tails: ~1e-13 worst case seen.
KDE_RTOL = 1e-12


@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_kde_matches_scipy(dtype):
    rng = np.random.default_rng(10)
    for n in [2, 3, 7, 8, 9, 127, 128, 129, 1000, 3696] + list(rng.integers(2, N_BUF, 10)):
        n = int(n)
        x = scrna_like(rng, n, dtype)
        if np.ptp(x) == 0:
            x[-1] += dtype(1)
        xb = buffer(x, rng)
        grid = np.linspace(x.min(), x.max(), 30)  # x's dtype, as in test_bimodality
        want = scipy.stats.gaussian_kde(x)(grid)
        got = np.asarray(j_kde(xb, n, grid))
        assert got.dtype == want.dtype == np.float64  # float64 even for float32 x
        np.testing.assert_allclose(got, want, rtol=KDE_RTOL, atol=0)


def test_gaussian_kde_raising_inputs():
    # scipy raises ValueError (LinAlgError is a subclass) for these; the port returns NaN.
    cases = [np.zeros(10), np.zeros(10, np.float32), np.array([0.3]), np.full(4, 2.0)]
    for x in cases:
        with pytest.raises(ValueError):
            scipy.stats.gaussian_kde(x)
        got = j_kde(buffer(x, np.random.default_rng(0)), len(x), np.resize(x, 30))
        assert np.isnan(np.asarray(got)).all()
    # A constant array whose float64 weighted mean is off by an ulp does NOT raise:
    # the covariance is ~1e-34 and scipy happily evaluates a needle-thin kernel.
    for x in (np.full(5, 0.1), np.full(7, 0.3, np.float32)):
        want = scipy.stats.gaussian_kde(x)(np.resize(x, 30))
        got = np.asarray(j_kde(buffer(x, np.random.default_rng(0)), len(x), np.resize(x, 30)))
        np.testing.assert_allclose(got, want, rtol=KDE_RTOL)


# ------------------------------------------------------------------------- bimodality


def scvelo_bimodality(x: np.ndarray):
    """Upstream, with _em_model_core's ValueError fallback (pval 1, means [0, 0])."""
    from scvelo.tools.utils import test_bimodality as upstream

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t, p, means = upstream(x, kde=True)
    except ValueError:
        return None
    return t, p, np.asarray(means)


def check_bimodality(x: np.ndarray, rng: np.random.Generator) -> None:
    want = scvelo_bimodality(x)
    t, p, means, ok = (np.asarray(v) for v in j_bimod(buffer(x, rng), len(x)))
    assert bool(ok) == (want is not None)
    if want is None:
        return
    wt, wp, wmeans = want
    # means come from argmin/argmax over the KDE and the (bitwise) grid: exact.
    assert_bitwise(means, wmeans)
    # t_stat inherits the KDE's few-ulp error; norm.sf is jax's ndtr (<= ~2e-15 rel).
    np.testing.assert_allclose(t, wt, rtol=KDE_RTOL, atol=1e-14)
    np.testing.assert_allclose(p, wp, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bimodality_random(dtype):
    rng = np.random.default_rng(11)
    for n in [2, 3, 8, 9, 129, 1000, 3696] + list(rng.integers(2, N_BUF, 12)):
        n = int(n)
        bimodal = rng.random() < 0.5
        x = rng.gamma(2, 1, n)
        if bimodal:
            x[: n // 3] += 8
        x = np.round(x, int(rng.integers(1, 4))).astype(dtype)
        check_bimodality(x, rng)


def test_bimodality_raising_inputs():
    rng = np.random.default_rng(12)
    for x in (np.zeros(50, np.float32), np.array([1.5], np.float32), np.zeros(0, np.float32)):
        check_bimodality(x, rng)  # asserts ok == False where scVelo raises
    check_bimodality(np.full(5, 0.1), rng)  # constant but non-singular: ok


def test_bimodality_from_kde_bitwise():
    # Given scipy's own kde_grid, everything downstream is bitwise except norm.sf.
    rng = np.random.default_rng(13)
    for dtype in DTYPES:
        for _ in range(10):
            x = rng.gamma(2, 1, 500)
            x[:200] += rng.uniform(0, 10)
            x = x.astype(dtype)
            grid = np.linspace(x.min(), x.max(), 30)
            kde = scipy.stats.gaussian_kde(x)(grid)
            idx = 13 + int(np.argmin(kde[13:17]))
            p0, p1 = kde[:idx].argmax(), kde[idx:].argmax()
            t_want = (kde[idx:][p1] - kde[idx:].mean()) / np.clip(
                np.std(kde) / np.sqrt(30), 1, None
            )
            t, p, means = j_bimod_from_kde(kde, grid)
            assert_bitwise(t, t_want)
            g0, g1 = grid[:idx], grid[idx:]
            m_want = [(g0[p0] + g0[min(p0 + 1, len(g0) - 1)]) / 2]
            m_want += [(g1[p1] + g1[min(p1 + 1, len(g1) - 1)]) / 2]
            assert_bitwise(means, np.array(m_want))
            np.testing.assert_allclose(p, scipy.stats.norm.sf(t_want), rtol=1e-14)


def test_bimodality_vmap():
    rng = np.random.default_rng(14)
    ns = np.array([1, 2, 50, 300, 3000], np.int32)
    xs = [rng.gamma(2, 1, int(n)).astype(np.float32) for n in ns]
    xb = np.stack([buffer(x, rng) for x in xs])
    t, p, means, ok = (np.asarray(v) for v in jax.jit(jax.vmap(nm.test_bimodality))(xb, ns))
    for i, x in enumerate(xs):
        ti, pi, mi, oki = (np.asarray(v) for v in j_bimod(xb[i], ns[i]))
        assert_bitwise(means[i], mi)
        assert ok[i] == oki == (scvelo_bimodality(x) is not None)
        np.testing.assert_allclose(t[i], ti, rtol=1e-13)
        np.testing.assert_allclose(p[i], pi, rtol=1e-13)


# ---------------------------------------------------------------- realistic scVelo data


@pytest.fixture(scope="module")
def moments_columns():
    """Positive entries of Ms / Mu columns (float32), as _em_model_core sees them."""
    import scanpy as sc
    import scvelo as scv

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = scv.datasets.simulation(n_obs=300, n_vars=5, random_seed=0)
        scv.settings.verbosity = 0
        scv.pp.filter_and_normalize(adata)
        sc.pp.log1p(adata)
        warnings.simplefilter("ignore")  # scVelo re-inserts DeprecationWarning filters
        scv.pp.moments(adata)
    cols = []
    for layer in ("Ms", "Mu"):
        m = np.asarray(adata.layers[layer])
        assert m.dtype == np.float32
        for j in range(m.shape[1]):
            c = m[:, j]
            cols.append(np.ascontiguousarray(c[c > 0]))
    raw = adata.layers["spliced"]
    raw = raw.toarray() if hasattr(raw, "toarray") else np.asarray(raw)
    cols += [np.ascontiguousarray(raw[:, j].astype(np.float32)) for j in range(2)]
    return cols


def test_realistic_moments(moments_columns):
    rng = np.random.default_rng(15)
    for x in moments_columns:
        n = len(x)
        xb = buffer(x, rng)
        assert_bitwise(j_sum(xb, n), np.add.reduce(x))
        assert_bitwise(j_mean(xb, n), np.mean(x))
        assert_bitwise(j_std(xb, n), np.std(x))
        for q in Q_LIST:
            assert_bitwise(j_pct_traced(xb, n, jnp.float64(q)), np.percentile(x, q))
        check_bimodality(x, rng)


def test_where_lazy_matches_where_batched_and_unbatched():
    from jaxvelo.core.numerics import where_lazy

    calls = []

    def fn(v):
        calls.append(1)  # traced once per branch that evaluates fn
        return jnp.sin(v) * 3

    x = jnp.linspace(0.0, 1.0, 12).reshape(3, 4)
    other = -jnp.ones((3, 4))
    for flags in ([True, False, True], [False, False, False], [True, True, True]):
        f = jnp.asarray(flags)
        got = jax.jit(jax.vmap(lambda fl, v, o: where_lazy(fl, fn, v, o)))(f, x, other)
        np.testing.assert_array_equal(got, jnp.where(f[:, None], fn(x), other))
        # unbatched flag, batched operand; unbatched otherwise
        got = jax.vmap(lambda v, f=f: where_lazy(f[0], fn, v, other[0]))(x)
        np.testing.assert_array_equal(got, jnp.where(f[0], fn(x), other[0]))
    for fl in (True, False):
        got = jax.jit(lambda v, fl=fl: where_lazy(jnp.asarray(fl), fn, v, other))(x)
        np.testing.assert_array_equal(got, fn(x) if fl else other)
        assert where_lazy(fl, fn, x, other) is not None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=300))
def test_stable_partition_is_a_stable_argsort(bits):
    from jaxvelo.core.numerics import stable_partition

    mask = np.asarray(bits)
    want = np.argsort(~mask, kind="stable")
    np.testing.assert_array_equal(np.asarray(stable_partition(jnp.asarray(mask))), want)


@settings(max_examples=40, deadline=None)
@given(
    x=hnp.arrays(
        st.sampled_from([np.float32, np.float64]),
        st.tuples(st.integers(1, 4), st.integers(1, 200)),
        elements=st.floats(allow_nan=True, allow_infinity=True, width=32),
    )
)
def test_host_sort_is_np_sort(x):
    """The sort behind the percentiles (the numba radix sort on CPU, one custom call per
    batch) gives np.sort's values, NaNs last, under vmap and unbatched."""
    with jax.enable_x64(True):
        got = jax.jit(jax.vmap(nm.sort))(jnp.asarray(x))
        one = jax.jit(nm.sort)(jnp.asarray(x[0]))
    want = np.sort(x, axis=-1)
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(np.asarray(one), want[0])
    assert np.asarray(got).dtype == x.dtype
    nz = want != 0
    assert np.array_equal(np.signbit(np.asarray(got)[nz]), np.signbit(want[nz]))


def test_while_any_matches_while_loop_under_vmap():
    """``while_any`` under ``vmap``: the same carries as ``lax.while_loop`` (JAX's rule
    freezes finished members; here a body that leaves them unchanged does), with batched
    and unbatched constants, an unbatched carry leaf, and a member that never iterates;
    and without the rule's per-leaf select of the carry in the program."""
    limits = jnp.asarray([0, 3, 7, 1], jnp.int32)
    scale = 2.0

    def cond(c):
        return c[0] < c[2]

    def body(consts, c):
        lim, s = consts
        i, x, _ = c
        go = i < lim  # a finished member: unchanged
        return jnp.where(go, i + 1, i), jnp.where(go, x * s + 1.0, x), lim

    def ref(lim, x0):
        return jax.lax.while_loop(cond, lambda c: body((lim, scale), c), (jnp.int32(0), x0, lim))

    def ours(lim, x0):
        return nm.while_any(cond, body, (jnp.int32(0), x0, lim), (lim, scale))

    x0 = jnp.asarray([1.0, 0.5, -2.0, 3.0])
    want = jax.vmap(ref)(limits, x0)
    got = jax.jit(jax.vmap(ours))(limits, x0)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    np.testing.assert_array_equal(np.asarray(got[0]), [0, 3, 7, 1])
    # unbatched (no vmap): lax.while_loop itself
    np.testing.assert_array_equal(np.asarray(ours(limits[2], x0[2])[1]), np.asarray(want[1][2]))
    # JAX's rule selects each batched carry leaf between the body's result and the old
    # value on every iteration; the custom rule does not
    text_ref = jax.jit(jax.vmap(ref)).lower(limits, x0).as_text()
    text = jax.jit(jax.vmap(ours)).lower(limits, x0).as_text()
    assert text_ref.count("stablehlo.select") > text.count("stablehlo.select")
