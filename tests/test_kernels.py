"""Kernels against their upstream scVelo 0.3.4 functions (float64)."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import sparse
from scvelo.core import SplicingDynamics
from scvelo.tools import _em_model_utils as up

from jaxvelo.core import assign, kinetics
from jaxvelo.core.batch import neighbors_from_csr

rates = st.floats(0.05, 5.0).map(np.float64)


def _cells(seed: int, n: int = 300):
    rng = np.random.default_rng(seed)
    u = rng.gamma(2.0, 0.5, n)
    s = rng.gamma(2.0, 1.0, n)
    u[rng.random(n) < 0.1] = 0
    s[rng.random(n) < 0.1] = 0
    return u, s


@settings(max_examples=40, deadline=None)
@given(alpha=rates, beta=rates, gamma=rates, u0=st.floats(0, 3), s0=st.floats(0, 3))
def test_solution_matches_splicing_dynamics(alpha, beta, gamma, u0, s0):
    t = np.linspace(0, 20, 57)
    ref = SplicingDynamics(alpha=alpha, beta=beta, gamma=gamma, initial_state=[u0, s0])
    ru, rs = ref.get_solution(t, stacked=False)
    ju, js = kinetics.solution(jnp.asarray(t), alpha, beta, gamma, u0, s0)
    # XLA's float64 exp and numpy's differ in the last bit; with gamma close to beta the
    # term c * (exps - expu) cancels and magnifies that (hence 1e-12, not 1e-14)
    np.testing.assert_allclose(np.asarray(ju), ru, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(np.asarray(js), rs, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        np.asarray(kinetics.spliced(jnp.asarray(t), s0, u0, alpha, beta, gamma)),
        up.spliced(t, s0, u0, alpha, beta, gamma),
        rtol=1e-12,
        atol=1e-12,
    )


def test_invert_nan_at_zero():
    x = np.array([0.0, 2.0, -4.0])
    np.testing.assert_array_equal(np.asarray(kinetics.invert(jnp.asarray(x))), [np.nan, 0.5, -0.25])


@settings(max_examples=40, deadline=None)
@given(alpha=rates, beta=rates, gamma=rates, seed=st.integers(0, 10_000))
def test_tau_inv_both_branches(alpha, beta, gamma, seed):
    u, s = _cells(seed)
    ref = up.tau_inv(u, s, 0, 0, alpha, beta, gamma)
    got = kinetics.tau_inv(jnp.asarray(u), jnp.asarray(s), 0, 0, alpha, beta, gamma)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-13, atol=1e-13)
    u0_, s0_ = SplicingDynamics(alpha=alpha, beta=beta, gamma=gamma).get_solution(3.0, False)
    ref_ = up.tau_inv(u, s, u0_, s0_, 0, beta, gamma)
    got_ = kinetics.tau_inv(jnp.asarray(u), jnp.asarray(s), u0_, s0_, 0, beta, gamma)
    np.testing.assert_allclose(np.asarray(got_), ref_, rtol=1e-13, atol=1e-13)


@settings(max_examples=30, deadline=None)
@given(alpha=rates, beta=rates, gamma=rates, t_=st.floats(0.5, 20), seed=st.integers(0, 99))
def test_vectorize(alpha, beta, gamma, t_, seed):
    t = np.random.default_rng(seed).uniform(0, 2 * t_, 200)
    ref = up.vectorize(t, t_, alpha, beta, gamma)
    got = kinetics.vectorize(jnp.asarray(t), t_, alpha, beta, gamma)
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_allclose(np.asarray(g), r, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("num", [2, 4, 5, 200, 500, 739])
@pytest.mark.parametrize("stop", [0.0, 1.0, 3.7, 12.345678901])
def test_linspace_bitwise(num, stop):
    np.testing.assert_array_equal(np.asarray(kinetics.linspace(0, stop, num)),
                                  np.linspace(0, stop, num))  # fmt: skip
    np.testing.assert_array_equal(np.asarray(kinetics.linspace(-1.0, 1.0, num)),
                                  np.linspace(-1, 1, num))  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(num=st.integers(2, 500), extra=st.integers(0, 40),
       stop=st.floats(1e-3, 1e3, allow_nan=False), f32=st.booleans())  # fmt: skip
def test_linspace_traced_count(num, extra, stop, f32):
    """A traced ``num`` in a longer static buffer (a padded cell axis): numpy's first
    ``num`` points, then ``+inf``."""
    dt = np.float32 if f32 else np.float64
    with jax.enable_x64(True):
        got = jax.jit(lambda n, b: kinetics.linspace(jnp.asarray(0, dt), b, n, num + extra))(
            jnp.int32(num), jnp.asarray(stop, dt))  # fmt: skip
    got = np.asarray(got)
    assert got.dtype == dt and got.shape == (num + extra,)
    np.testing.assert_array_equal(got[:num], np.linspace(dt(0), dt(stop), num))
    assert np.all(got[num:] == np.inf)


@pytest.mark.parametrize("mode", [None, "projection", "full_projection"])
@pytest.mark.parametrize("seed", range(4))
def test_assign_tau(mode, seed):
    rng = np.random.default_rng(seed)
    u, s = _cells(seed, 1200)
    alpha, beta, gamma = rng.uniform(0.5, 3, 3)
    t_ = rng.uniform(2, 10)
    u0_, s0_ = SplicingDynamics(alpha=alpha, beta=beta, gamma=gamma).get_solution(t_, False)
    ref = up.assign_tau(u, s, alpha, beta, gamma, t_, u0_, s0_, mode)
    got = assign.assign_tau(jnp.asarray(u), jnp.asarray(s), alpha, beta, gamma, t_, u0_, s0_, mode)
    np.testing.assert_allclose(np.asarray(got[0]), ref[0], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(np.asarray(got[1]), ref[1], rtol=1e-13, atol=1e-13)


def test_projection_grid_size():
    assert assign.projection_grid_size(100) == 200
    assert assign.projection_grid_size(1500) == 300
    assert assign.projection_grid_size(3696) == 500


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), genes=st.integers(1, 5), n=st.integers(1, 700),
       m=st.integers(1, 60), f32=st.booleans(), ties=st.booleans())  # fmt: skip
def test_projection_host_kernel_matches_xla_and_numpy(seed, genes, n, m, f32, ties):
    """The CPU custom call of the projection's nearest grid point (8 cells at a time in
    registers, the last n % 8 through a padded 8-cell scratch) gives the XLA loop's and
    numpy's first minimum (``argmin`` of upstream's
    ``((xt[None] - x_obs[:, None]) ** 2).sum(2)``), batched and unbatched."""
    rng = np.random.default_rng(seed)
    dtype = np.float32 if f32 else np.float64
    u, s = (rng.random((2, genes, n)) * 2).astype(dtype)
    gu, gs = (rng.random((2, genes, m)) * 2).astype(dtype)
    if ties:  # repeated grid points and cells on the grid: equal distances
        gu[:, m // 2 :], gs[:, m // 2 :] = gu[:, : m - m // 2], gs[:, : m - m // 2]
        u[:, ::3], s[:, ::3] = gu[:, :1], gs[:, :1]
    tp = jnp.arange(m, dtype=jnp.int32)
    with jax.enable_x64(True):
        proj = jax.jit(jax.vmap(lambda *a: assign._project(*a, tp)))
        assert "jaxvelo_nearest" in proj.lower(u, s, gu, gs).as_text()  # the custom call
        host = proj(u, s, gu, gs)
        one = jax.jit(lambda *a: assign._project(*a, tp))(u[0], s[0], gu[0], gs[0])
        os.environ["JAXVELO_HOST_KERNELS"] = "0"
        try:
            xla = jax.jit(jax.vmap(lambda *a: assign._project(*a, tp)))(u, s, gu, gs)
        finally:
            del os.environ["JAXVELO_HOST_KERNELS"]
    for g in range(genes):
        x_obs, xt = np.stack([u[g], s[g]], 1), np.stack([gu[g], gs[g]], 1)
        expected = ((xt[None] - x_obs[:, None]) ** 2).sum(2).argmin(1)
        np.testing.assert_array_equal(np.asarray(host[g]), expected)
        np.testing.assert_array_equal(np.asarray(xla[g]), expected)
    np.testing.assert_array_equal(np.asarray(one), np.asarray(host[0]))


def _random_conn(n: int, seed: int) -> sparse.csr_matrix:
    rng = np.random.default_rng(seed)
    A = sparse.random(n, n, density=8 / n, random_state=rng, format="csr") > 0
    A = A.tolil()
    A.setdiag(1)
    A = A.tocsr()
    A = A.multiply(1.0 / A.sum(1)).tocsr().astype(np.float32)
    return A


def test_smooth_matches_scipy_csr_dot():
    conn = _random_conn(250, 0)
    res = np.random.default_rng(1).random((4, 250))
    nb = neighbors_from_csr(conn.indptr, conn.indices, conn.data)
    got = assign.smooth(jax.tree_util.tree_map(jnp.asarray, nb), jnp.asarray(res))
    np.testing.assert_array_equal(np.asarray(got), conn.dot(res.T).T)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_smooth_copy_rows_start_on_cache_line_pairs(dtype):
    """The smoothing kernel's cells-first copy: rows of 16 values on 128-byte boundaries
    (a gathered float64 row is two whole cache lines, not three), whatever the
    allocation's own alignment (numba's is 32 bytes)."""
    pytest.importorskip("numba")
    from jaxvelo.core import host_kernels

    for n in (1, 7, 3696):
        for extra in range(0, 96, 8):  # shift the buffer's start by 0..88 bytes
            raw = np.zeros(n * 16 + 256 // np.dtype(dtype).itemsize + extra, dtype)
            buf = raw[extra // np.dtype(dtype).itemsize :]
            t = host_kernels._aligned_rows(buf, n, 16)
            assert t.shape == (n, 16) and t.dtype == dtype and t.flags.c_contiguous
            assert t.ctypes.data % host_kernels._SMOOTH_ALIGN == 0
            assert np.shares_memory(t, raw)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 100_000), frac_on=st.floats(0, 1), n=st.integers(5, 400),
       dtype=st.sampled_from([np.float64, np.float32]))  # fmt: skip
def test_adjust_increments(seed, frac_on, n, dtype):
    rng = np.random.default_rng(seed)
    tau = np.round(rng.exponential(1.0, n) ** 2, 3).astype(dtype)  # heavy tail: big gaps, ties
    tau_ = np.round(rng.exponential(1.0, n) ** 2, 3).astype(dtype)
    on = rng.random(n) < frac_on
    off = ~on
    exp_tau, exp_tau_ = tau.copy(), tau_.copy()
    if on.any() and off.any():
        exp_tau[on], exp_tau_[off] = up.adjust_increments(tau[on], tau_[off])
    elif on.any():
        exp_tau[on] = up.adjust_increments(tau[on])
    else:
        exp_tau_[off] = up.adjust_increments(tau_[off])
    args = (jnp.asarray(tau), jnp.asarray(on), jnp.asarray(tau_), jnp.asarray(off))
    for impl in (assign.adjust_increments, assign._adjust_increments_xla):  # host and XLA
        got, got_ = impl(*args)
        np.testing.assert_array_equal(np.asarray(got), exp_tau)
        np.testing.assert_array_equal(np.asarray(got_), exp_tau_)


def test_adjust_increments_float32_subtracts_in_float64():
    # Upstream's gaps are float64 even for float32 times (np.diff's prepend=0 is int64), so
    # ``tau_new[tau >= ti] -= dti`` rounds float64 differences to float32. A float32
    # subtraction in the XLA port (every non-CPU backend) left one cell of this gene 1 ulp
    # off (53.504692 vs 53.504696), which moved the 3696-cell pancreas' first loss.
    rng = np.random.default_rng(1)
    for _ in range(47):  # the 47th draw of this generator is that gene
        n = int(rng.integers(200, 3000))
        shape = (6, n)
        tau = (rng.gamma(rng.uniform(0.3, 3), 1, shape) * rng.uniform(0.1, 20)).astype(np.float32)
        tau_ = (rng.gamma(rng.uniform(0.3, 3), 1, shape) * rng.uniform(0.1, 20)).astype(np.float32)
        on = rng.random(shape) < rng.uniform(0.1, 0.9)
    tau, tau_, on = tau[3], tau_[3], on[3]
    off = ~on
    want, want_ = tau.copy(), tau_.copy()
    want[on], want_[off] = up.adjust_increments(tau[on], tau_[off])
    args = (jnp.asarray(tau), jnp.asarray(on), jnp.asarray(tau_), jnp.asarray(off))
    for impl in (assign.adjust_increments, assign._adjust_increments_xla):  # host and XLA
        got, got_ = impl(*args)
        np.testing.assert_array_equal(np.asarray(got), want)
        np.testing.assert_array_equal(np.asarray(got_), want_)


def test_adjust_increments_float64_holding_float32_times():
    """Upstream's projection grid ``np.linspace(0, t_)`` is float32 for a float32 ``t_``, so
    the projected 'on' times are a float32 array and ``tau_new[tau >= ti] -= dti`` rounds
    each difference to float32; the fit holds them in float64 with a per-gene flag
    (``to32``). Before the flag, the final ``fit_tau`` of 1500-cell pancreas' Cfdp1 was
    ~4e-8 off in 401 cells. Host kernel (vmapped, mixed flags) and XLA port."""
    rng = np.random.default_rng(5)
    g, n = 4, 900
    # times in [0.5, 1.9), a gap that adjust_increments removes, then times in [6, 12):
    # x - (6 - 1.9...) lands in [2, 8), where the float32 result cannot keep 1.9...'s bits
    low = rng.uniform(0.5, 1.9, (g, n))
    high = rng.uniform(6.0, 12.0, (g, n)) + rng.uniform(0, 0.1, (g, 1))
    tau = np.where(rng.random((g, n)) < 0.3, low, high).astype(np.float32)
    tau_ = rng.uniform(0, 3, (g, n)).astype(np.float32)
    on = rng.random((g, n)) < 0.6
    to32 = np.array([True, False, True, False])
    want, want_ = tau.astype(np.float64), tau_.astype(np.float64)
    for k in range(g):
        if to32[k]:  # float32 'on' times (tau_ float64, as from a float64 t0)
            a, b = up.adjust_increments(tau[k][on[k]], tau_[k].astype(np.float64)[~on[k]])
        else:
            a, b = up.adjust_increments(tau[k].astype(np.float64)[on[k]],
                                        tau_[k].astype(np.float64)[~on[k]])  # fmt: skip
        want[k][on[k]], want_[k][~on[k]] = a, b
    assert np.all(want[to32].astype(np.float32).astype(np.float64) == want[to32])
    args = tuple(map(jnp.asarray, (tau.astype(np.float64), on, tau_.astype(np.float64), ~on,
                                   to32)))  # fmt: skip
    with jax.enable_x64(True):
        host = jax.jit(jax.vmap(assign.adjust_increments))(*args)
        xla = jax.jit(jax.vmap(assign._adjust_increments_xla))(*args)
        unflagged = jax.jit(jax.vmap(assign.adjust_increments))(*args[:4])
    for got in (host, xla):
        np.testing.assert_array_equal(np.asarray(got[0]), want)
        np.testing.assert_array_equal(np.asarray(got[1]), want_)
    assert not np.array_equal(np.asarray(unflagged[0])[to32], want[to32])  # the flag matters


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 100_000), n=st.integers(1, 3000), frac_on=st.floats(0, 1),
       dist=st.sampled_from(["uniform", "exp2", "rounded", "clusters", "outlier"]),
       f32=st.booleans())  # fmt: skip
def test_adjust_increments_sort_free_path(seed, n, frac_on, dist, f32):
    """The kernel's sort-free path (the gaps crossing a bucketing of the values) gives
    upstream's values whenever it reports that it applies, and applies to spread-out
    times; otherwise it leaves the outputs alone (the kernel then sorts)."""
    from jaxvelo.core import host_kernels as hk

    rng = np.random.default_rng(seed)

    def draw():
        if dist == "uniform":
            return rng.random(n) * 10
        if dist == "exp2":
            return rng.exponential(1.0, n) ** 2
        if dist == "rounded":
            return np.round(rng.exponential(1.0, n) ** 2, 2)
        if dist == "clusters":
            return rng.integers(0, 4, n) * 7.0 + rng.random(n) * 1e-3
        return np.concatenate([rng.random(n - 1), [1e6]])[rng.permutation(n)]

    dtype = np.float32 if f32 else np.float64
    tau, tau_ = draw().astype(dtype), draw().astype(dtype)
    on = rng.random(n) < frac_on
    exp_tau, exp_tau_ = tau.copy(), tau_.copy()
    if on.any() and (~on).any():
        exp_tau[on], exp_tau_[~on] = up.adjust_increments(tau[on], tau_[~on])
    elif on.any():
        exp_tau[on] = up.adjust_increments(tau[on])
    else:
        exp_tau_[~on] = up.adjust_increments(tau_[~on])
    out, out_ = tau.copy(), tau_.copy()
    used = hk._adjust_bucketed(out, tau, on, out_, tau_, ~on, np.empty((9, n + 1)))
    if used:
        np.testing.assert_array_equal(out, exp_tau)
        np.testing.assert_array_equal(out_, exp_tau_)
    else:
        np.testing.assert_array_equal(out, tau)
        np.testing.assert_array_equal(out_, tau_)
    # Spread-out times take the sort-free path, unless one of the two sets is tiny (a few
    # cells: its gaps are not resolved by the bucketing; measured up to 59 cells of 3000
    # random cases): then the kernel sorts, also correct.
    counts = (int(on.sum()), int((~on).sum()))
    if dist in ("uniform", "exp2") and all(c == 0 or c >= 200 for c in counts):
        assert used


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adjust_increments_sort_free_path_many_big_gaps(dtype):
    """Many removed gaps on the sort-free path (each cell subtracts its prefix of them,
    counted by bucket): 10,000 times, 40 gaps of 1000 and 11 of 10 above a dense cluster,
    so the 99.5th percentile is 10 and the 40 big gaps are removed."""
    from jaxvelo.core import host_kernels as hk

    rng = np.random.default_rng(12)
    tail = 1 + np.cumsum(np.r_[np.full(11, 10.0), np.full(40, 1000.0)])
    tau = np.concatenate([rng.random(10_000 - len(tail)), tail]).astype(dtype)
    rng.shuffle(tau)
    on = np.ones(len(tau), bool)
    out, out_ = tau.copy(), tau.copy()
    assert hk._adjust_bucketed(out, tau, on, out_, tau, ~on, np.empty((9, len(tau) + 1)))
    expected = up.adjust_increments(tau)
    assert (expected != tau).sum() > 0
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out_, tau)


def test_adjust_increments_host_vmap_equals_xla():
    rng = np.random.default_rng(3)
    tau = np.round(rng.exponential(1.0, (7, 300)) ** 2, 3)
    tau_ = np.round(rng.exponential(1.0, (7, 300)) ** 2, 3)
    on = rng.random((7, 300)) < np.linspace(0, 1, 7)[:, None]  # all-off .. all-on genes
    args = tuple(map(jnp.asarray, (tau, on, tau_, ~on)))
    assert assign.use_host_kernels()  # CPU
    with jax.enable_x64(True):
        host = jax.jit(jax.vmap(assign.adjust_increments))(*args)
        xla = jax.jit(jax.vmap(assign._adjust_increments_xla))(*args)
    for h, x in zip(host, xla, strict=True):
        np.testing.assert_array_equal(np.asarray(h), np.asarray(x))


@pytest.mark.parametrize("mode", [None, "projection", "full_projection"])
@pytest.mark.parametrize("connected", [False, True])
@pytest.mark.parametrize("steady", [True, False])
def test_assign_timepoints_matches_compute_divergence(mode, connected, steady):
    n = 600
    u, s = _cells(7, n)
    alpha, beta, gamma, scaling, t_ = 2.0, 0.8, 1.3, 1.4, 6.0
    std_u, std_s = 0.7, 1.1
    conn = _random_conn(n, 3) if connected else None
    ref_t, ref_tau, ref_o = up.compute_divergence(
        u / scaling, s, alpha, beta, gamma, scaling, t_=t_, std_u=std_u, std_s=std_s,
        mode="assign_timepoints", assignment_mode=mode, connectivities=conn,
        fit_steady_states=steady,
    )  # fmt: skip
    nb = None
    if connected:
        nb = neighbors_from_csr(conn.indptr, conn.indices, conn.data)
        nb = jax.tree_util.tree_map(jnp.asarray, nb)
    got = assign.assign_timepoints(jnp.asarray(u) / scaling, jnp.asarray(s), alpha, beta, gamma,
                                   scaling, t_, std_u, std_s, nb, mode, steady)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(got.o), ref_o)
    np.testing.assert_allclose(np.asarray(got.t), ref_t, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(got.tau), ref_tau, rtol=1e-12, atol=1e-12)


def test_assign_timepoints_vmap_equals_loop():
    n = 300
    u, s = _cells(11, n)
    pars = np.array(
        [[2.0, 0.8, 1.3, 1.4, 6.0], [1.0, 1.5, 0.4, 0.9, 3.0], [0.5, 0.3, 0.2, 1.0, 9.0]]
    )

    def one(p):
        return assign.assign_timepoints(jnp.asarray(u) / p[3], jnp.asarray(s), p[0], p[1], p[2],
                                        p[3], p[4], 0.7, 1.1, None, "projection").t  # fmt: skip

    batched = jax.jit(jax.vmap(one))(jnp.asarray(pars))
    single = jax.jit(one)
    for i, p in enumerate(pars):
        np.testing.assert_array_equal(np.asarray(batched[i]), np.asarray(single(jnp.asarray(p))))


def _ragged_conn(n: int, seed: int) -> sparse.csr_matrix:
    """kNN-like graph with a long tail of high-degree rows (several degree buckets)."""
    rng = np.random.default_rng(seed)
    deg = np.minimum(rng.geometric(0.08, n) + 1, n)
    rows = np.repeat(np.arange(n), deg)
    cols = np.concatenate([rng.choice(n, d, replace=False) for d in deg])
    A = sparse.csr_matrix((rng.random(len(rows)) + 0.1, (rows, cols)), shape=(n, n))
    A = A.multiply(1.0 / A.sum(1)).tocsr().astype(np.float32)
    return A


def _padded_csr(conn, pad: int):
    """``conn`` with ``pad`` empty rows and columns appended (padded cells)."""
    n = conn.shape[0] + pad
    indptr = np.concatenate([conn.indptr, np.full(pad, conn.nnz, conn.indptr.dtype)])
    return sparse.csr_matrix((conn.data, conn.indices, indptr), shape=(n, n))


@pytest.mark.parametrize("pad", [0, 7])
def test_smooth_vmap_match_scipy(pad):
    conn = _padded_csr(_ragged_conn(300, 5), pad)
    n = conn.shape[0]
    nb = neighbors_from_csr(conn.indptr[: 301], conn.indices, conn.data, n_cells=n,
                            n_entries=conn.nnz + 13)  # fmt: skip
    assert nb.ptr.shape == (n + 1,) and nb.idx.shape == (conn.nnz + 13,)
    res = np.random.default_rng(2).random((5, 6, n))  # genes x rows x cells
    nbj = jax.tree_util.tree_map(jnp.asarray, nb)
    with jax.enable_x64(True):
        batched = jax.jit(jax.vmap(lambda r: assign.smooth(nbj, r)))(jnp.asarray(res))
        single = [jax.jit(lambda r: assign.smooth(nbj, r))(jnp.asarray(r)) for r in res]
    for g in range(res.shape[0]):
        expected = conn.dot(res[g].T).T
        np.testing.assert_array_equal(np.asarray(batched[g]), expected)
        np.testing.assert_array_equal(np.asarray(single[g]), expected)


def test_neighbors_from_csr_refuses_what_does_not_fit():
    conn = _ragged_conn(50, 1)
    with pytest.raises(ValueError, match="do not fit"):
        neighbors_from_csr(conn.indptr, conn.indices, conn.data, n_cells=49)
    with pytest.raises(ValueError, match="do not fit"):
        neighbors_from_csr(conn.indptr, conn.indices, conn.data, n_entries=conn.nnz - 1)


def _emptied_rows(conn, frac: float, seed: int) -> sparse.csr_matrix:
    """``conn`` with the entries of a fraction ``frac`` of its rows removed (empty rows
    between rows with entries, storage order of the others kept)."""
    keep = np.random.default_rng(seed).random(conn.shape[0]) >= frac
    rows = np.repeat(np.arange(conn.shape[0]), np.diff(conn.indptr))
    kept = keep[rows]
    indptr = np.concatenate([[0], np.cumsum(np.diff(conn.indptr) * keep)])
    return sparse.csr_matrix((conn.data[kept], conn.indices[kept], indptr), shape=conn.shape)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 400), genes=st.integers(1, 13),
       parts=st.integers(1, 4), f32=st.booleans(), pad=st.integers(0, 20),
       holes=st.sampled_from([0.0, 0.1, 0.5]), kept=st.sampled_from([0.0, 0.3, 0.8]))  # fmt: skip
@example(seed=3, n=57, genes=10, parts=2, f32=False, pad=0, holes=0.0, kept=0.0)  # 16 + 4 wide
@example(seed=4, n=90, genes=9, parts=4, f32=True, pad=5, holes=0.1, kept=0.0)  # 32 + 4 wide
@example(seed=5, n=33, genes=13, parts=1, f32=False, pad=1, holes=0.5, kept=0.0)  # 16, not 8
@example(seed=6, n=40, genes=4, parts=2, f32=True, pad=2, holes=0.1, kept=0.0)  # exactly 8
@example(seed=7, n=64, genes=16, parts=4, f32=False, pad=3, holes=0.0, kept=0.3)  # gaps
def test_smooth_host_kernel_matches_scipy_and_xla(seed, n, genes, parts, f32, pad, holes, kept):
    """The CPU custom call (16-column blocks, any remainder -- a last block of 1-8 columns
    in the 8-wide kernel, of 9-15 in the 16-wide one, whose sums go through a scratch
    block; empty rows zero; the rows read from ``parts`` separate operands, the result
    part-major) and the XLA loop give scipy's ``conn.dot(x.T).T`` bitwise, in float32
    (float32 x) and float64, with ``pad`` empty rows (padded cells), a fraction ``holes``
    of rows emptied between rows with entries, and unused entries. With ``reuse``, the
    rows ``keep`` names (a fraction ``kept`` of the last two parts' rows) are copied from
    ``prev`` -- the rest computed around them, in blocks whose rows are not adjacent."""
    import numba

    conn = _padded_csr(_emptied_rows(_ragged_conn(n, seed), holes, seed), pad)
    n = conn.shape[0]
    nb = neighbors_from_csr(conn.indptr, conn.indices, conn.data,
                            n_entries=conn.nnz + 3 * pad)  # fmt: skip
    rng = np.random.default_rng(seed + 1)
    cols = genes * parts
    x = rng.random((cols, n)) ** 3 * rng.integers(0, 2, (cols, n))  # zeros too
    x = x.astype(np.float32 if f32 else np.float64)
    expected = conn.dot(x.T).T  # gene-major: row g * parts + k
    assert expected.dtype == x.dtype
    # reuse: parts >= 2 only; K = 2 earlier rows per gene, the last two parts may take them
    k_cached = min(2, parts - 1) if parts > 1 else 0
    prev = rng.random((genes, max(k_cached, 1), n)).astype(x.dtype)
    keep = np.full((genes, parts), -1, np.int32)
    for j in range(k_cached):
        keep[:, parts - k_cached + j] = np.where(rng.random(genes) < kept, j, -1)
    with jax.enable_x64(True):
        nbj = jax.tree_util.tree_map(jnp.asarray, nb)
        assert "jaxvelo_smooth" in jax.jit(assign.smooth).lower(nbj, jnp.asarray(x)).as_text()
        px = [jnp.asarray(x[k::parts]) for k in range(parts)]
        host = jax.jit(assign._smooth_host)(nbj, px)
        reused = jax.jit(assign._smooth_host)(nbj, px, (jnp.asarray(prev), jnp.asarray(keep)))
        xla = jax.jit(lambda v: assign._smooth_cells_first(nbj, v.T).T)(jnp.asarray(x))
    assert host.dtype == x.dtype
    # part-major (row k * genes + g) -> gene-major
    gm = np.asarray(host).reshape(parts, genes, n).transpose(1, 0, 2).reshape(cols, n)
    np.testing.assert_array_equal(gm, expected)
    np.testing.assert_array_equal(np.asarray(xla), expected)
    want = expected.reshape(genes, parts, n).copy()
    g_idx, k_idx = np.nonzero(keep >= 0)
    want[g_idx, k_idx] = prev[g_idx, keep[g_idx, k_idx]]
    got = np.asarray(reused).reshape(parts, genes, n).transpose(1, 0, 2)
    np.testing.assert_array_equal(got, want)
    # the kernel's compile-time switch is restored
    assert numba.config.SLP_VECTORIZE == int(os.environ.get("NUMBA_SLP_VECTORIZE", "0"))


def test_adjust_increments_float32_matches_upstream():
    """The first time assignment runs on float32 moments: the CPU kernel's float32 variant
    keeps numpy's dtype flow (float64 gaps, float64 subtraction rounded to float32)."""
    rng = np.random.default_rng(4)
    tau = (rng.exponential(1.0, (4, 250)) ** 2).astype(np.float32)
    tau_ = (rng.exponential(1.0, (4, 250)) ** 2).astype(np.float32)
    on = rng.random((4, 250)) < np.array([0.0, 0.3, 0.7, 1.0])[:, None]
    got, got_ = jax.jit(jax.vmap(assign.adjust_increments))(*map(jnp.asarray, (tau, on, tau_, ~on)))
    assert got.dtype == jnp.float32
    for g in range(4):
        exp_tau, exp_tau_ = tau[g].copy(), tau_[g].copy()
        n, f = on[g], ~on[g]
        if n.any() and f.any():
            exp_tau[n], exp_tau_[f] = up.adjust_increments(tau[g][n], tau_[g][f])
        elif n.any():
            exp_tau[n] = up.adjust_increments(tau[g][n])
        else:
            exp_tau_[f] = up.adjust_increments(tau_[g][f])
        np.testing.assert_array_equal(np.asarray(got[g]), exp_tau)
        np.testing.assert_array_equal(np.asarray(got_[g]), exp_tau_)


specials = st.sampled_from([0.0, -0.0, np.inf, -np.inf, 5e-324, -5e-324, 1.0, np.nan])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(0, 600), extra=st.lists(specials, max_size=8))
def test_host_radix_sort_matches_numpy(seed, n, extra):
    """The kernel's radix sort gives np.sort's values (NaNs last) for any float64 data."""
    from jaxvelo.core import host_kernels as hk

    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.standard_normal(n) * 10 ** rng.uniform(-300, 300), extra])
    rng.shuffle(x)
    got, want = hk._sort64(x.copy()), np.sort(x)
    np.testing.assert_array_equal(got, want)
    assert np.array_equal(np.signbit(got[got != 0]), np.signbit(want[want != 0]))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 3000), ties=st.booleans())
def test_host_percentile_matches_numpy(seed, n, ties):
    """The 99.5th percentile from the top order statistics (no full sort) is numpy's."""
    from jaxvelo.core import host_kernels as hk

    rng = np.random.default_rng(seed)
    x = rng.gamma(0.5, 1.0, n)
    if ties:
        x = np.round(x, 1)
    assert hk._percentile995(x) == np.percentile(x, 99.5)


@settings(max_examples=60, deadline=None)
@given(
    rows=hnp.arrays(
        np.float64,
        (4, 64),
        elements=st.sampled_from([0.0, -0.0, 1.0, 2.0, np.inf, np.nan, 0.5, 1e-300]),
    )
)
def test_argmin_rows_is_numpy_argmin(rows):
    from jaxvelo.core import assign

    with jax.enable_x64(True):
        got = jax.jit(assign._argmin_rows)(jnp.asarray(rows))
    np.testing.assert_array_equal(np.asarray(got), np.argmin(rows, axis=0))


@pytest.mark.parametrize("layout", ["outlier", "duplicates", "clustered", "tiny", "signed"])
def test_host_sort_layouts(layout):
    """The kernel's sort on value layouts the random test rarely makes: an outlier far
    from a dense cluster, many equal keys, tight clusters, short arrays, both signs
    around zero (subnormals included)."""
    from jaxvelo.core import host_kernels as hk

    rng = np.random.default_rng(7)
    x = {
        "outlier": np.concatenate([5 + rng.random(3000) * 1e-3, [1e300, -1e300]]),
        "duplicates": rng.integers(0, 5, 4000).astype(float),
        "clustered": np.concatenate([rng.normal(c, 1e-9, 300) for c in range(10)]),
        "tiny": rng.random(20),
        "signed": np.concatenate([rng.normal(0, 1e-300, 500), rng.normal(0, 1, 500), [0.0, -0.0]]),
    }[layout]
    rng.shuffle(x)
    got, want = hk._sort64(x.copy()), np.sort(x)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adjust_increments_many_big_gaps(dtype):
    """Clusters separated by large gaps: every cell above the first gap gets a sequence of
    subtractions (the kernel applies them cell by cell; upstream gap by gap)."""
    rng = np.random.default_rng(11)
    centres = np.cumsum(rng.uniform(5, 50, 12))
    tau = np.concatenate([c + rng.random(500) * 1e-2 for c in centres]).astype(dtype)
    rng.shuffle(tau)
    tau_ = np.concatenate([c + rng.random(300) * 1e-2 for c in centres[:5]]).astype(dtype)
    tau_ = np.concatenate([tau_, np.zeros(len(tau) - len(tau_), dtype)])
    on = np.zeros(len(tau), bool)
    on[: len(tau) // 2] = True
    off = np.zeros(len(tau), bool)
    off[:1500] = True
    exp_tau, exp_tau_ = tau.copy(), tau_.copy()
    exp_tau[on], exp_tau_[off] = up.adjust_increments(tau[on], tau_[off])
    assert not np.array_equal(exp_tau, tau)  # gaps were removed
    got, got_ = assign.adjust_increments(*map(jnp.asarray, (tau, on, tau_, off)))
    np.testing.assert_array_equal(np.asarray(got), exp_tau)
    np.testing.assert_array_equal(np.asarray(got_), exp_tau_)


def test_warm_cache_compiles_every_kernel_in_parallel(tmp_path):
    """``host_kernels.warm_cache`` fills an empty numba cache from worker processes (the
    fresh install's ~40 s of numba compilation, split), after which this process finds every
    kernel cached; importing the module compiles nothing."""
    code = (
        "import time; t = time.perf_counter()\n"
        "from jaxvelo.core import host_kernels as h\n"
        "assert time.perf_counter() - t < 20, 'import compiled kernels'\n"
        "fns = [f for f in h._COMPILE_S\n"
        "       if 'numpy' not in f.__name__ or h._numpy_loops() is not None]\n"
        "assert len(h._uncached(fns)) == len(fns)\n"
        "assert h.warm_cache(2) == len(fns)\n"
        "assert h._uncached(fns) == []\n"
        "assert h.warm_cache(2) == 0\n"
        "h.register_all()\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("batched", [False, True])
def test_steady_cache_reuses_exactly_while_its_inputs_are_unchanged(batched):
    """``assign_timepoints`` with a :class:`~jaxvelo.core.assign.SteadyCache`: the steady
    rows' sums come from the cache (here shifted by 1, so that a reuse shows) exactly
    while their inputs are bit for bit those of the cached call -- both rows with the same
    parameters, only ``distx_steady_`` after a change of ``alpha``, neither after a change
    of ``scaling`` (or with an empty cache) -- and the assignment is that of the call
    without a cache wherever the cache holds the true sums."""
    if not assign.use_host_kernels():
        pytest.skip("only the CPU kernel copies cached rows (the XLA loop smooths every row)")
    conn = _ragged_conn(120, 3)
    nb = neighbors_from_csr(conn.indptr, conn.indices, conn.data)
    rng = np.random.default_rng(0)
    u_raw, s = rng.random(120) * 2, rng.random(120) * 3

    def run(alpha, scaling, cache):
        u = u_raw / scaling
        args = (jnp.asarray(u), jnp.asarray(s), alpha, 0.4, 0.3, scaling, 3.0, 0.5, 0.7)

        def one(cache):
            return assign.assign_timepoints(*args, nbrs, None, steady_cache=cache)

        if not batched:
            return jax.jit(one)(cache)
        two = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), cache)
        return jax.tree_util.tree_map(lambda x: x[1], jax.jit(jax.vmap(one))(two))

    with jax.enable_x64(True):
        nbrs = jax.tree_util.tree_map(jnp.asarray, nb)
        empty = assign.SteadyCache.empty(120, jnp.float64)
        first = run(1.5, 1.2, empty)
        assert bool(first.cache.ok)
        plain = jax.jit(lambda: assign.assign_timepoints(
            jnp.asarray(u_raw / 1.2), jnp.asarray(s), 1.5, 0.4, 0.3, 1.2, 3.0, 0.5, 0.7,
            nbrs, None))()  # fmt: skip
        for f in ("t", "tau", "o"):
            np.testing.assert_array_equal(
                np.asarray(getattr(first, f)), np.asarray(getattr(plain, f))
            )
        true_y = np.asarray(first.cache.y)
        shifted = first.cache._replace(y=first.cache.y + 1.0)
        same = run(1.5, 1.2, shifted)
        np.testing.assert_array_equal(np.asarray(same.cache.y), true_y + 1.0)  # both reused
        # the cache holds the true sums: the same assignment as without it
        again = run(1.5, 1.2, first.cache)
        np.testing.assert_array_equal(np.asarray(again.t), np.asarray(plain.t))
        other_alpha = run(1.7, 1.2, shifted)
        np.testing.assert_array_equal(np.asarray(other_alpha.cache.y[0]), true_y[0] + 1.0)
        fresh = run(1.7, 1.2, empty)
        np.testing.assert_array_equal(
            np.asarray(other_alpha.cache.y[1]), np.asarray(fresh.cache.y[1])
        )
        other_scaling = run(1.5, 1.25, shifted)
        fresh = run(1.5, 1.25, empty)
        np.testing.assert_array_equal(np.asarray(other_scaling.cache.y), np.asarray(fresh.cache.y))
        assert not np.array_equal(np.asarray(fresh.cache.y), true_y)
