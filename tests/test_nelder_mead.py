"""``jaxvelo.core.nelder_mead`` against ``scipy.optimize.minimize(method="Nelder-Mead")``.

Every comparison is bitwise: x (and its dtype), fun, nit, nfev, status, the final
simplex and the sequence of points handed to the callback. To make the objective
itself bitwise identical in numpy and XLA, the "exact" families only use
operations XLA cannot re-round (sums in a fixed order, products by powers of two,
abs, rint, comparisons); the smooth families (bowl, Rosenbrock) let scipy call the
*jitted JAX* objective, so both sides see the same function values.

Each configuration is compiled once and ``jax.vmap``-ed over a batch of starting
points and per-row parameters, then compared row by row with a Python loop of
scipy calls (this is also the vmap test).
"""

from __future__ import annotations

import functools
import itertools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from jaxvelo.core import nelder_mead as nm

# scipy's own convergence test computes inf - inf when fsim holds infinities
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

# --------------------------------------------------------------------------- #
# objective families: (numpy, jax) pairs computing identical bits
# --------------------------------------------------------------------------- #


def _l1_np(x, p):
    acc = 0.0
    for i in range(len(x)):
        acc = acc + abs(x[i] - p[i]) * 2.0**i
    return acc


def _l1_jx(x, p):
    acc = 0.0
    for i in range(x.shape[0]):
        acc = acc + jnp.abs(x[i] - p[i]) * 2.0**i
    return acc


def _plateau_np(x, p):
    # integer-valued with wide flat regions (exact ties) and signed zeros
    acc = 0.0
    for i in range(len(x)):
        acc = acc + abs(np.rint(x[i] * 4) - p[i])
    sign = -1.0 if x[0] < p[-1] else 1.0
    return acc * sign


def _plateau_jx(x, p):
    acc = 0.0
    for i in range(x.shape[0]):
        acc = acc + jnp.abs(jnp.round(x[i] * 4) - p[i])
    return acc * jnp.where(x[0] < p[-1], -1.0, 1.0)


def _nan_np(x, p):
    if x[0] > p[-2]:
        return np.nan
    if x[-1] < p[-1]:
        return np.inf
    return _l1_np(x, p)


def _nan_jx(x, p):
    v = _l1_jx(x, p)
    v = jnp.where(x[-1] < p[-1], jnp.inf, v)
    return jnp.where(x[0] > p[-2], jnp.nan, v)


def _f32_np(x, p):
    c = p.astype(np.float32)
    acc = np.float32(0.0)
    for i in range(len(x)):
        acc = acc + np.abs(np.float32(x[i]) - c[i]) * np.float32(2.0**i)
    return acc


def _f32_jx(x, p):
    c = p.astype(jnp.float32)
    acc = jnp.float32(0.0)
    for i in range(x.shape[0]):
        acc = acc + jnp.abs(x[i].astype(jnp.float32) - c[i]) * jnp.float32(2.0**i)
    return acc


def _r(v):
    # nextafter(v, v) == v, but XLA cannot fuse a product through it into an FMA,
    # so every product below is rounded on its own, as in numpy
    return jnp.nextafter(v, v)


def _bowl_np(x, p):
    n = len(x)
    acc = 0.0
    for i in range(n):
        d = x[i] - p[i]
        acc = acc + (1.0 + abs(p[n + i])) * d * d
    return acc


def _bowl_jx(x, p):
    n = x.shape[0]
    acc = 0.0
    for i in range(n):
        d = x[i] - p[i]
        acc = acc + _r(_r((1.0 + jnp.abs(p[n + i])) * d) * d)
    return acc


def _rosen_np(x, p):
    s = 1.0 + p[0] / 8
    y = [x[i] * s for i in range(len(x))]
    if len(y) == 1:
        return (1.0 - y[0]) * (1.0 - y[0])
    acc = 0.0
    for i in range(len(y) - 1):
        u = y[i + 1] - y[i] * y[i]
        acc = acc + 100.0 * (u * u) + (1.0 - y[i]) * (1.0 - y[i])
    return acc


def _rosen_jx(x, p):
    s = 1.0 + p[0] / 8
    y = [_r(x[i] * s) for i in range(x.shape[0])]
    if len(y) == 1:
        return _r((1.0 - y[0]) * (1.0 - y[0]))
    acc = 0.0
    for i in range(len(y) - 1):
        u = y[i + 1] - _r(y[i] * y[i])
        acc = acc + _r(100.0 * _r(u * u)) + _r((1.0 - y[i]) * (1.0 - y[i]))
    return acc


FAMILIES = {
    "l1": (_l1_np, _l1_jx),
    "plateau": (_plateau_np, _plateau_jx),
    "nan": (_nan_np, _nan_jx),
    "f32": (_f32_np, _f32_jx),
    "bowl": (_bowl_np, _bowl_jx),
    "rosen": (_rosen_np, _rosen_jx),
}
NPAR = 16


def _np_objective(family, p):
    return functools.partial(FAMILIES[family][0], p=p)


# --------------------------------------------------------------------------- #
# runners
# --------------------------------------------------------------------------- #


def _cb_len(maxiter, maxfev):
    return int(min(200 if maxiter is None else maxiter, 400 if maxfev is None else maxfev)) + 2


def run_scipy(family, x0, p, maxiter=None, maxfev=None, tol=None, callback=True):
    seen = []
    options = {}
    if maxiter is not None:
        options["maxiter"] = maxiter
    if maxfev is not None:
        options["maxfev"] = maxfev
    res = minimize(
        _np_objective(family, p),
        x0,
        method="Nelder-Mead",
        options=options,
        tol=tol,
        callback=(lambda x: seen.append(np.copy(x))) if callback else None,
    )
    return res, seen


@functools.cache
def _jax_runner(family, maxiter, maxfev, tol, callback=True):
    fjx = FAMILIES[family][1]
    kw = {"maxiter": maxiter, "maxfev": maxfev}
    if tol is not None:
        kw.update(xatol=tol, fatol=tol)
    length = _cb_len(maxiter, maxfev)

    def record(x, state):
        buf, count = state
        return buf.at[jnp.minimum(count, length - 1)].set(x), count + 1

    def one(x0, p):
        fun = functools.partial(fjx, p=p)
        if not callback:
            res, _ = nm.nelder_mead(fun, x0, **kw)
            return res, None
        cb0 = (jnp.zeros((length, x0.shape[0]), x0.dtype), jnp.asarray(0, jnp.int32))
        return nm.nelder_mead(fun, x0, callback=record, cb_state=cb0, **kw)

    return jax.jit(jax.vmap(one))


def assert_same(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype, (what, a.dtype, b.dtype)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    assert np.array_equal(a, b, equal_nan=True), (what, a, b)
    finite = ~np.isnan(a)
    assert np.array_equal(np.signbit(a[finite]), np.signbit(b[finite])), (what, a, b)


def compare_batch(family, X0, P, maxiter=None, maxfev=None, tol=None, callback=True):
    out = _jax_runner(family, maxiter, maxfev, tol, callback)(jnp.asarray(X0), jnp.asarray(P))
    res, cb = jax.tree.map(np.asarray, out)
    statuses = []
    for r in range(X0.shape[0]):
        ref, seen = run_scipy(family, X0[r], P[r], maxiter, maxfev, tol, callback)
        tag = (family, r, X0[r], maxiter, maxfev, tol)
        assert_same(res.x[r], ref.x, ("x", tag))
        assert_same(res.fun[r], np.float64(ref.fun), ("fun", tag))
        assert int(res.nit[r]) == ref.nit, ("nit", tag, int(res.nit[r]), ref.nit)
        assert int(res.nfev[r]) == ref.nfev, ("nfev", tag, int(res.nfev[r]), ref.nfev)
        assert int(res.status[r]) == ref.status, ("status", tag)
        assert_same(res.sim[r], ref.final_simplex[0], ("sim", tag))
        assert_same(res.fsim[r], ref.final_simplex[1], ("fsim", tag))
        if callback:
            buf, count = cb
            assert int(count[r]) == len(seen), ("callback count", tag)
            if seen:
                assert_same(buf[r, : len(seen)], np.stack(seen), ("callback x", tag))
        statuses.append(ref.status)
    return statuses


def make_batch(n, dtype, family, batch, seed):
    rng = np.random.default_rng(seed)
    X0 = rng.normal(0.0, 1.5, (batch, n))
    X0[rng.random((batch, n)) < 0.2] = 0.0  # zeros use zdelt
    X0[rng.random((batch, n)) < 0.05] = -0.0
    X0[0] = 0.0
    X0 = X0.astype(dtype)
    P = rng.normal(0.0, 1.0, (batch, NPAR))
    if family == "plateau":
        P[:, :n] = np.round(P[:, :n] * 3)
        P[:, -1] = rng.choice([-np.inf, 0.0, 0.3], batch)
    if family == "nan":
        P[:, -2] = rng.choice([np.inf, 0.5, -0.2], batch)  # x[0] > t -> NaN
        P[:, -1] = rng.choice([-np.inf, -1.0], batch)  # x[-1] < u -> inf
    return X0, P


# --------------------------------------------------------------------------- #
# configurations: (family, N, dtype, maxiter, maxfev, tol)
# --------------------------------------------------------------------------- #
F32, F64 = np.float32, np.float64
CONFIGS = [
    ("l1", 1, F64, 0, None, None),
    ("l1", 3, F64, 2, None, None),
    ("l1", 4, F64, 200, None, 1e-2),
    ("l1", 3, F32, 200, None, None),
    ("l1", 4, F32, 3, None, 1e-2),
    ("l1", 2, F64, None, None, None),
    ("plateau", 1, F64, 20, None, None),
    ("plateau", 2, F64, 1, None, 1e-2),
    ("plateau", 3, F32, 20, None, None),
    ("plateau", 4, F64, 200, None, None),
    ("nan", 2, F64, 20, None, None),
    ("nan", 3, F64, 200, None, 1e-2),
    ("nan", 4, F32, 5, None, None),
    ("f32", 2, F64, 200, None, None),
    ("f32", 4, F32, 2, None, 1e-2),
    ("bowl", 3, F64, 200, None, None),
    ("bowl", 4, F32, 20, None, 1e-2),
    ("rosen", 2, F64, 200, None, None),
    ("rosen", 4, F64, 2, None, 1e-2),
    ("rosen", 1, F32, 200, None, None),
]


@pytest.mark.parametrize("family,n,dtype,maxiter,maxfev,tol", CONFIGS)
def test_matches_scipy(family, n, dtype, maxiter, maxfev, tol):
    X0, P = make_batch(n, dtype, family, 12, seed=zlib.crc32(repr((family, n, maxiter)).encode()))
    compare_batch(family, X0, P, maxiter, maxfev, tol)


@pytest.mark.parametrize(
    "n,maxiter,maxfev",
    [(2, None, 0), (3, None, 2), (2, None, 4), (3, 200, 9), (4, None, 13), (1, 50, 9)],
)
def test_maxfev_guard(n, maxiter, maxfev):
    # maxfev inside the initial evaluations, right after them, and mid expansion /
    # contraction / shrink (partially shrunk simplices are kept, as in scipy)
    X0, P = make_batch(n, F64, "plateau", 16, seed=n * 100 + maxfev)
    statuses = compare_batch("plateau", X0, P, maxiter, maxfev, None)
    assert 1 in statuses


def test_no_callback_and_plain_jit():
    X0, P = make_batch(3, F64, "nan", 8, seed=7)
    compare_batch("nan", X0, P, 20, None, None, callback=False)
    # un-vmapped jit, integer x0 -> float64
    f = jax.jit(lambda x0: nm.nelder_mead(lambda x: _l1_jx(x, jnp.arange(4.0)), x0, maxiter=30)[0])
    for x0 in (np.array([2, 0, -1]),):
        res = f(x0)
        ref = minimize(
            lambda x: _l1_np(x, np.arange(4.0)), x0, method="Nelder-Mead", options={"maxiter": 30}
        )
        assert_same(res.x, ref.x, "x")
        assert (int(res.nit), int(res.nfev), int(res.status)) == (ref.nit, ref.nfev, ref.status)


def test_fun_reading_callback_state():
    """Upstream's accept-if-improved ``update`` callback changes what ``fun`` sees."""
    c = np.array([0.5, -1.0, 2.0])

    def base_np(x):
        return _l1_np(x, c)

    # scipy side: mutable closure
    def scipy_run(x0):
        best = {"loss": np.inf, "shift": 0.0, "n": 0}

        def fun(x):
            return base_np(x) + abs(x[0] - best["shift"]) * 0.25

        def cb(x):
            loss = base_np(x)
            if loss < best["loss"]:
                best.update(loss=loss, shift=x[1], n=best["n"] + 1)

        res = minimize(fun, x0, method="Nelder-Mead", options={"maxiter": 40}, callback=cb)
        return res, best

    def jax_run(x0):
        def fun(x, s):
            return _l1_jx(x, c) + jnp.abs(x[0] - s[1]) * 0.25

        def cb(x, s):
            loss = _l1_jx(x, c)
            better = loss < s[0]
            return (
                jnp.where(better, loss, s[0]),
                jnp.where(better, x[1], s[1]),
                s[2] + better.astype(jnp.int32),
            )

        s0 = (jnp.asarray(np.inf), jnp.asarray(0.0), jnp.asarray(0, jnp.int32))
        return nm.nelder_mead(fun, x0, maxiter=40, callback=cb, cb_state=s0, fun_uses_cb_state=True)

    X0 = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, -3.0], [0.1, 0.0, 5.0]])
    res, (loss, shift, count) = jax.jit(jax.vmap(jax_run))(X0)
    for r in range(len(X0)):
        ref, best = scipy_run(X0[r])
        assert_same(res.x[r], ref.x, "x")
        assert (int(res.nit[r]), int(res.nfev[r])) == (ref.nit, ref.nfev)
        assert float(loss[r]) == best["loss"] and float(shift[r]) == best["shift"]
        assert int(count[r]) == best["n"]


@settings(max_examples=40, deadline=None)
@given(
    x0=st.lists(
        # |x| >= 1e-300 or 0: halving a vertex near the normal limit gives a subnormal,
        # which XLA's CPU backend flushes to zero (a documented limitation)
        st.one_of(
            st.just(0.0),
            st.floats(-1e3, 1e3, width=64).filter(lambda v: v == 0 or abs(v) >= 1e-300),
        ),
        min_size=2,
        max_size=2,
    ),
    c=st.lists(st.integers(-3, 3).map(float), min_size=2, max_size=2),
    flip=st.sampled_from([-np.inf, 0.0, 1.0]),
)
def test_hypothesis_plateau(x0, c, flip):
    X0 = np.array([x0])
    P = np.zeros((1, NPAR))
    P[0, :2] = c
    P[0, -1] = flip
    compare_batch("plateau", X0, P, 20, None, None)


# --------------------------------------------------------------------------- #
# numpy primitives
# --------------------------------------------------------------------------- #
def _weak_orders(n):
    seen = set()
    for levels in itertools.product(range(n), repeat=n):
        u = sorted(set(levels))
        d = tuple(u.index(v) for v in levels)
        if d not in seen:
            seen.add(d)
            yield d


def _host_uses_avx512_argsort():
    return np.argsort(np.array([1.0, 1.0, 0.0, 0.0])).tolist() == [3, 2, 1, 0]


def test_host_argsort_is_unstable_network():
    """Documents the finding; the bitwise scipy tests with ties rely on it."""
    if not _host_uses_avx512_argsort():
        pytest.skip("host numpy argsort does not use the AVX-512 network (ties differ)")
    assert np.argsort(np.array([1.0, 1.0, 0.0, 0.0])).tolist() == [3, 2, 1, 0]
    assert np.argsort(np.array([1.0, 1.0, 0.0, 0.0]), kind="stable").tolist() == [2, 3, 0, 1]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8])
def test_numpy_argsort_all_tie_patterns(n):
    if not _host_uses_avx512_argsort():
        pytest.skip("host numpy argsort does not use the AVX-512 network (ties differ)")
    rng = np.random.default_rng(n)
    orders = np.array(list(_weak_orders(n)) if n <= 6 else rng.integers(0, n, (20000, n)))
    rows = [orders.astype(float)]
    levels = np.sort(rng.normal(size=(len(orders), n)), axis=1)
    lv = np.take_along_axis(levels, orders, 1)
    rows.append(np.where(orders == orders.max(1, keepdims=True), np.inf, lv))
    rows.append(np.where(orders == 0, -np.inf, lv))
    zeros = np.where(orders == 0, np.where(rng.random(orders.shape) < 0.5, -0.0, 0.0), lv)
    rows.append(zeros)
    nanny = orders.astype(float)
    nanny[rng.random(orders.shape) < 0.3] = np.nan
    rows.append(nanny)
    F = np.concatenate(rows)
    got = np.asarray(jax.jit(jax.vmap(nm.numpy_argsort))(F))
    want = np.stack([np.argsort(f) for f in F])
    bad = np.flatnonzero((got != want).any(1))
    assert bad.size == 0, (F[bad[:5]], got[bad[:5]], want[bad[:5]])


def test_numpy_min_signed_zeros_and_nan():
    vals = [0.0, -0.0, 1.0, np.nan, -np.inf]
    F = np.array(list(itertools.product(vals, repeat=4)))
    got = np.asarray(jax.jit(jax.vmap(nm._numpy_min))(F))
    want = np.array([np.min(f) for f in F])
    assert_same(got, want, "np.min")


@pytest.mark.parametrize("dtype", [F32, F64])
def test_exact_centroid_division(dtype):
    # XLA turns x / 3 into x * (1/3); the centroid must be numpy's correctly rounded x / N
    rng = np.random.default_rng(0)
    info = np.finfo(dtype)
    top = int(np.log10(info.max))
    s = np.concatenate(
        [
            rng.normal(size=20000) * 10.0 ** rng.integers(-top, top, 20000),
            [0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, 3.0, -7.0],
            info.max * rng.uniform(-1, 1, 100),
            info.tiny * 8 * rng.uniform(1, 1e3, 100),
        ]
    ).astype(dtype)
    s = s[~(np.abs(s) < 8 * info.tiny) | (s == 0)]  # subnormal quotients: XLA CPU flushes them
    for n in (1, 2, 3, 4, 5, 6, 7):
        got = np.asarray(jax.jit(lambda v, n=n: nm._div_small_int(v, n))(s))
        assert_same(got, s / n, f"s / {n}")


def test_initial_simplex_and_options():
    x0 = np.array([0.0, -0.0, 1e-3, -2.5], dtype=F32)
    state = nm.nm_init(None, x0)
    ref = minimize(lambda x: 0.0, x0, method="Nelder-Mead", options={"maxfev": 0})
    assert_same(state.sim, ref.final_simplex[0], "initial simplex")  # all-inf sort is identity
    assert nm.nm_options(3) == nm.NMOptions(3, 600, 600, 1e-4, 1e-4)
    assert nm.nm_options(3, maxiter=2) == nm.NMOptions(3, 2, math.inf, 1e-4, 1e-4)
    assert nm.nm_options(3, maxfev=7) == nm.NMOptions(3, math.inf, 7, 1e-4, 1e-4)
    assert nm.nm_options(2, maxfev=math.inf) == nm.NMOptions(2, 400, math.inf, 1e-4, 1e-4)


def test_float32_tolerance_is_compared_in_float32():
    # float32(1e-3) > 1e-3: numpy (NEP 50) compares in float32 -> converged
    x0 = np.array([1.0], F32)
    sim = jnp.asarray(np.array([[1.0], [1.0 + np.float32(1e-3)]], F32))
    st_ = nm.nm_init(None, x0)._replace(sim=sim, fsim=jnp.zeros(2))
    d = np.max(np.abs(np.asarray(sim)[1:] - np.asarray(sim)[0]))
    assert bool(nm.nm_converged(st_, 1e-3, 1e-3)) == bool(d <= 1e-3)


@pytest.mark.parametrize("round32", [False, True])
def test_traced_tolerances_match_python_floats(round32):
    # the schedule's shared Nelder-Mead slots pass per-gene tolerances as float64 arrays;
    # the convergence test must equal the one with Python-float tolerances, also where the
    # float32 rounding of dx or of the tolerance decides (the round32 path)
    rng = np.random.default_rng(3)
    tols = [1e-4, 1e-2, 1e-3, float(np.float32(1e-3)), 0.1]
    traced = jax.jit(lambda a, b, c: nm._converged(a, b, c, c, jnp.asarray(round32)))
    seen = set()
    for _ in range(200):
        tol = tols[rng.integers(len(tols))]
        base = rng.normal(size=3)
        scale = tol * rng.choice([0.5, 0.999999, 1.0, 1.0000001, 2.0])
        sim = jnp.asarray(np.vstack([base, base + scale * rng.choice([-1, 1], (3, 3))]))
        fsim = jnp.asarray(rng.normal(size=4) * tol)
        want = nm._converged(sim, fsim, tol, tol, jnp.asarray(round32))
        t = jnp.asarray(tol)
        got = traced(sim, fsim, t)
        assert bool(got) == bool(want), (tol, scale)
        seen.add(bool(want))
    assert seen == {True, False}  # both outcomes exercised


def test_requires_x64():
    with jax.enable_x64(False):
        with pytest.raises(RuntimeError, match="64-bit"):
            nm.nm_init(None, np.zeros(2, np.float32))


# --------------------------------------------------------------------------- #
# float32 emulation on a float64 simplex (round32), traced per batch member
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("maxiter", [0, 2, 5, 40])
@pytest.mark.parametrize("tol", [None, 1e-2])
def test_round32_equals_scipy_float32_x0(n, maxiter, tol):
    rng = np.random.default_rng(100 * n + maxiter)
    rows = 8
    x0 = rng.normal(size=(rows, n)).astype(np.float32)
    x0[0, 0] = 0.0  # zero coordinate -> zdelt
    params = rng.normal(size=(rows, 2 * n))
    flags = np.arange(rows) % 2 == 0  # half the rows float32, half float64
    kw = {} if tol is None else {"xatol": tol, "fatol": tol}

    def one(x, p, r):
        res, _ = nm.nelder_mead(lambda z: _bowl_jx(z, p), x, maxiter=maxiter, round32=r, **kw)
        return res

    out = jax.jit(jax.vmap(one))(jnp.asarray(x0, jnp.float64), jnp.asarray(params), flags)
    fj = jax.jit(_bowl_jx)
    for i in range(rows):
        start = x0[i] if flags[i] else x0[i].astype(np.float64)
        ref = minimize(lambda z, p=params[i]: float(fj(jnp.asarray(z, jnp.float64), p)), start,
                       method="Nelder-Mead", options={"maxiter": maxiter},
                       tol=tol)  # fmt: skip
        assert ref.x.dtype == (np.float32 if flags[i] else np.float64)
        np.testing.assert_array_equal(np.asarray(out.x[i]), ref.x.astype(np.float64))
        assert float(out.fun[i]) == ref.fun
        assert int(out.nit[i]) == ref.nit and int(out.nfev[i]) == ref.nfev
