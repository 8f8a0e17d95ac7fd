"""The gradient mode (``method="gradient"``): its objective against upstream's, its
gradients, the fit's guarantees, the written fields, options, and device sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxvelo
from jaxvelo.core.gradient import phase_loss

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _upstream_mse(t, u, s, alpha, beta, gamma, scaling, t_, std_u, std_s, ratio):
    """``get_mse`` (scvelo/tools/_em_model_utils.py) on all cells, via upstream's own
    ``vectorize`` and ODE solution."""
    from scvelo.core import SplicingDynamics
    from scvelo.tools._em_model_utils import vectorize

    tau, a_v, u0, s0 = vectorize(t, t_, alpha, beta, gamma)
    ut, st_ = SplicingDynamics(alpha=a_v, beta=beta, gamma=gamma,
                               initial_state=[u0, s0]).get_solution(tau, stacked=False)  # fmt: skip
    udiff = (ut - u / scaling) / std_u * scaling
    sdiff = (st_ - s) / std_s
    reg = (gamma / beta - ratio) * s / std_s
    return np.mean(udiff**2 + sdiff**2 + reg**2)


@settings(max_examples=40, deadline=None)
@given(
    alpha=st.floats(0.5, 20),
    beta=st.floats(0.05, 3),
    gamma=st.floats(0.05, 3),
    t_=st.floats(0.5, 20),
    scaling=st.floats(0.2, 5),
    ratio=st.floats(0.05, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_phase_loss_is_upstream_mse(alpha, beta, gamma, t_, scaling, ratio, seed):
    """At phases taken from the times (on: t < t_), the M-step objective is upstream's
    ``get_mse`` (the Nelder-Mead objective with fixed times)."""
    if abs(gamma - beta) < 1e-3:
        return
    rng = np.random.default_rng(seed)
    n = 57
    t = rng.uniform(0, 2 * t_, n)
    u, s = rng.uniform(0, 5, n), rng.uniform(0, 5, n)
    std_u, std_s = 1.3, 0.7
    ref = _upstream_mse(t, u, s, alpha, beta, gamma, scaling, t_, std_u, std_s, ratio)
    on = t < t_
    with jax.enable_x64(True):
        pars = jnp.array([alpha, beta, gamma, t_, scaling])
        got = phase_loss(pars, u, s, np.where(on, t, t - t_), on, n, std_u, std_s, ratio)
    np.testing.assert_allclose(float(got), ref, rtol=1e-10)


def test_phase_loss_gradient_matches_finite_differences():
    from jax.test_util import check_grads

    rng = np.random.default_rng(0)
    n = 40
    t = rng.uniform(0, 10, n)
    on = t < 6.0
    tau = np.where(on, t, t - 6.0)
    u, s = rng.uniform(0, 3, n), rng.uniform(0, 3, n)
    with jax.enable_x64(True):

        def f(theta):
            return phase_loss(jnp.exp(theta), u, s, tau, on, 31, 1.1, 0.9, 0.4)

        check_grads(f, (jnp.log(jnp.array([4.0, 0.5, 0.2, 6.0, 1.3])),), order=1,
                    modes=["rev"], atol=1e-6, rtol=1e-6)  # fmt: skip


@pytest.fixture(scope="module")
def sim():
    from jaxvelo import datasets

    return datasets.simulated(400, 12, seed=3)


@pytest.fixture(scope="module")
def fitted(sim):
    a = sim.copy()
    jaxvelo.recover_dynamics(a, var_names="all", method="gradient", show_progress_bar=False)
    return a


def test_writes_the_exact_modes_fields(sim, fitted):
    b = sim.copy()
    jaxvelo.recover_dynamics(b, var_names="all", show_progress_bar=False, max_iter=0)
    assert set(b.var.columns) == set(fitted.var.columns)
    assert set(b.layers) == set(fitted.layers)
    assert set(b.varm) == set(fitted.varm)
    uns = fitted.uns["recover_dynamics"]
    assert uns["method"] == "gradient" and uns["rounds"] == 8 and uns["steps"] == 50
    assert "method" not in b.uns["recover_dynamics"]
    fit = fitted.var["fit_alpha"].notna().values
    assert fit.all()
    for k in ("fit_alpha", "fit_beta", "fit_gamma", "fit_t_", "fit_scaling", "fit_likelihood"):
        assert np.all(np.isfinite(fitted.var[k].values)) and np.all(fitted.var[k].values > 0)
    assert np.all(np.isfinite(fitted.layers["fit_t"]))


def test_rounds_only_lower_the_loss(sim, fitted):
    """The fit starts with the exact mode's initialisation (its loss history is that of
    ``rounds=0``); a round is accepted only when it lowers the loss (update()'s rule), so the
    rest of the history strictly decreases, and most genes improve on their start."""
    b = sim.copy()
    jaxvelo.recover_dynamics(b, var_names="all", method="gradient", rounds=0,
                             show_progress_bar=False)  # fmt: skip
    improved = 0
    for row, row0 in zip(fitted.varm["loss"], b.varm["loss"], strict=True):
        h, h0 = row[~np.isnan(row)], row0[~np.isnan(row0)]
        np.testing.assert_array_equal(h[: len(h0)], h0)
        assert np.all(np.diff(h[len(h0) - 1 :]) < 0)
        improved += len(h) > len(h0)
    assert improved >= len(fitted.varm["loss"]) // 2


def test_gradient_fit_is_better_than_its_start_on_truth(sim, fitted):
    """Against the ground truth, time recovery stays as good as the exact mode's."""
    from scipy.stats import spearmanr

    rho = [spearmanr(fitted.layers["fit_t"][:, j], sim.obs["true_t"])[0] for j in range(12)]
    assert np.median(rho) > 0.95


def test_downstream_scvelo_works(fitted):
    import scvelo as scv

    a = fitted.copy()
    scv.tl.velocity(a, mode="dynamical", min_r2=-np.inf, min_likelihood=0)
    vg = a.var["velocity_genes"].values
    assert vg.sum() >= 8
    assert np.isfinite(a.layers["velocity"][:, vg]).all()
    scv.tl.velocity_graph(a, show_progress_bar=False)
    scv.tl.latent_time(a)
    assert np.isfinite(a.obs["latent_time"]).all()


def test_batch_size_and_jobs_do_not_matter_much(sim, fitted):
    b = sim.copy()
    jaxvelo.recover_dynamics(b, var_names="all", method="gradient", batch_size=5, n_jobs=2,
                             show_progress_bar=False)  # fmt: skip
    for k in ("fit_alpha", "fit_beta", "fit_gamma", "fit_t_", "fit_likelihood"):
        np.testing.assert_allclose(b.var[k].values, fitted.var[k].values, rtol=1e-10)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"method": "adam"}, ValueError, "method"),
        ({"rounds": 3}, TypeError, "only apply to method='gradient'"),
        ({"method": "gradient", "load_pars": True}, ValueError, "load_pars"),
        ({"method": "gradient", "high_pars_resolution": True}, ValueError, "Nelder-Mead"),
        ({"method": "gradient", "learning_rate": -1.0}, ValueError, "learning_rate"),
        ({"method": "gradient", "rounds": -1}, ValueError, "rounds"),
        ({"method": "gradient", "steps": 2.5}, (TypeError, ValueError), "steps"),
        ({"method": "gradient", "gradient_scaling": "yes"}, TypeError, "gradient_scaling"),
    ],
)
def test_bad_options_fail_and_leave_adata_untouched(sim, kwargs, err, match):
    a = sim.copy()
    before = (set(a.var.columns), set(a.layers), set(a.uns))
    with pytest.raises(err, match=match):
        jaxvelo.recover_dynamics(a, var_names="all", show_progress_bar=False, **kwargs)
    assert (set(a.var.columns), set(a.layers), set(a.uns)) == before


def test_sharded_over_two_devices_is_identical(tmp_path, sim):
    """Genes dealt over 2 XLA host devices give bit-identical results to one device."""
    path = tmp_path / "sim.h5ad"
    sim.write_h5ad(path)
    code = textwrap.dedent(f"""
        import json, os, numpy as np, anndata as ad, jax, jaxvelo
        assert len(jax.devices()) == 2, jax.devices()
        a0 = ad.read_h5ad({str(path)!r})
        out = {{}}
        for nd in ("1", "2"):
            os.environ["JAXVELO_DEVICES"] = nd
            a = a0.copy()
            jaxvelo.recover_dynamics(a, var_names="all", method="gradient", batch_size=4,
                                     show_progress_bar=False)
            out[nd] = a
        keys = ["fit_alpha", "fit_beta", "fit_gamma", "fit_t_", "fit_scaling", "fit_likelihood"]
        same = {{k: bool(np.array_equal(out["1"].var[k].values, out["2"].var[k].values))
                for k in keys}}
        same["fit_t"] = bool(np.array_equal(out["1"].layers["fit_t"], out["2"].layers["fit_t"]))
        print(json.dumps(same))
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAXVELO_CACHE_DIR": "none"}  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    same = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(same.values()), same


@pytest.mark.parametrize("host", ["0", "1"])
def test_no_host_code_off_the_cpu_path(monkeypatch, sim, host):
    """With the host kernels off (what every non-CPU backend gets) the gradient program has
    no custom call or callback: only XLA operations, so it runs on GPU unchanged. With them
    on (CPU), the numba kernels are the custom calls."""
    from jaxvelo.core import batch
    from jaxvelo.core.em import FitConfig, GeneData
    from jaxvelo.core.gradient import GradientConfig

    monkeypatch.setenv("JAXVELO_HOST_KERNELS", host)
    n = sim.n_obs
    conn = sim.obsp["connectivities"].tocsr()
    nb = batch.neighbors_from_csr(conn.indptr, conn.indices, conn.data)
    gd = GeneData(u=np.ones((2, n), np.float32), s=np.ones((2, n), np.float32),
                  prior=np.zeros((2, n), bool))  # fmt: skip
    cfg = GradientConfig(fit=FitConfig(n_obs=n), rounds=1, steps=2)
    with jax.enable_x64(True):
        nbj = jax.tree_util.tree_map(jnp.asarray, nb)
        text = batch._program(cfg, True, None).lower(gd, nbj, None).as_text()
    calls = text.count("custom_call")
    if host == "0":
        assert calls == 0 and "callback" not in text
    else:
        assert calls > 0 and "jaxvelo" in text
