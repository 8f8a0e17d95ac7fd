"""``return_model`` and ``plot_results``: upstream's model object holding jaxvelo's fit.

The model returned is scVelo's own ``DynamicsRecovery`` (built without fitting, filled with
jaxvelo's results), so its methods and scVelo's plotting work on it; it is compared here with
the object upstream returns after fitting the same gene.
"""

from __future__ import annotations

import warnings

import matplotlib
import numpy as np
import pytest
from _upstream import upstream_recover

import jaxvelo
from jaxvelo import datasets

matplotlib.use("Agg")

SCALARS = ["alpha", "beta", "gamma", "scaling", "t_", "likelihood", "varx", "std_u", "std_s",
           "pval_steady", "steady_u", "steady_s", "steady_state_ratio"]  # fmt: skip
ARRAYS = ["pars", "loss", "t", "tau", "tau_", "m"]
EXACT = ["o", "u", "s", "weights", "weights_upper", "u0", "s0", "alpha_", "gene", "recoverable",
         "assignment_mode", "max_iter", "simplex_kwargs", "perc", "refit_time", "fit_scaling",
         "fit_steady_states", "high_pars_resolution", "init_vals", "steady_state_prior",
         "use_raw", "cb_fit_t_and_alpha", "cb_fit_scaling_", "cb_fit_rates", "cb_fit_t_",
         "cb_fit_t_and_rates", "cb_fit_rates_all"]  # fmt: skip


_upstream = upstream_recover


@pytest.fixture(scope="module")
def small():
    return datasets.simulated(200, 6, seed=1)


@pytest.fixture(scope="module")
def models(small):
    ref, test = small.copy(), small.copy()
    dm_ref = _upstream(ref, var_names="all", return_model=True)
    dm = jaxvelo.recover_dynamics(test, var_names="all", return_model=True, show_progress_bar=False)
    return (ref, dm_ref), (test, dm)


def _rel(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    scale = np.maximum(np.maximum(np.abs(a), np.abs(b)), 1e-300)
    return float(np.max(np.abs(a - b) / scale, initial=0.0))


def test_model_matches_upstream_fitted_model(models):
    from scvelo.tools import DynamicsRecovery

    (_, ref), (_, dm) = models
    assert type(dm) is DynamicsRecovery
    assert dm.gene == ref.gene == "gene_5"
    assert set(vars(dm)) == set(vars(ref))
    for name in SCALARS:
        assert _rel(getattr(dm, name), getattr(ref, name)) <= 1e-6, name
    for name in ARRAYS:
        a, b = np.asarray(getattr(dm, name)), np.asarray(getattr(ref, name))
        assert a.shape == b.shape, name
        assert _rel(a, b) <= 1e-6, name
    for name in EXACT:
        a, b = getattr(dm, name), getattr(ref, name)
        if isinstance(b, np.ndarray):
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            assert a == b, name
    for name in ("std_u", "std_s", "steady_s"):  # upstream's dtypes (float32 data)
        assert type(getattr(dm, name)) is type(getattr(ref, name)), name
    assert (dm.connectivities != ref.connectivities).nnz == 0
    # u0_, s0_: the switching state at the (unaligned) t_, as load_pars sets them; upstream
    # keeps its initial estimate rescaled with scaling (unused by the methods below)
    assert np.isfinite([dm.u0_, dm.s0_]).all()
    # the model's own methods give upstream's numbers
    for method in ("get_loss", "get_likelihood", "get_variance"):
        assert _rel(getattr(dm, method)(), getattr(ref, method)()) <= 1e-6, method
    np.testing.assert_allclose(dm.get_ut(), ref.get_ut(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(dm.get_st(), ref.get_st(), rtol=1e-6, atol=1e-12)


def test_results_are_written_as_without_model(small, models):
    _, (test, _) = models
    plain = jaxvelo.recover_dynamics(small, var_names="all", copy=True, show_progress_bar=False)
    for col in plain.var.columns:
        np.testing.assert_array_equal(test.var[col], plain.var[col], err_msg=col)
    for key in ("fit_t", "fit_tau", "fit_tau_"):
        np.testing.assert_array_equal(test.layers[key], plain.layers[key])
    np.testing.assert_array_equal(test.varm["loss"], plain.varm["loss"])

    # with copy=True the model is returned and the input stays untouched, as upstream
    adata = small.copy()
    dm = jaxvelo.recover_dynamics(
        adata, var_names="all", return_model=True, copy=True, show_progress_bar=False
    )
    assert dm.gene == "gene_5"
    assert "fit_alpha" not in adata.var


def test_model_plots(models):
    import matplotlib.pyplot as pl

    (ref_data, _), (test, dm) = models
    ax = dm.plot_phase(adata=test, show=False)
    assert len(ax.lines) >= 1
    pl.close("all")


def test_plot_results_draws_traces(small):
    import matplotlib.pyplot as pl

    pl.close("all")
    adata = small.copy()
    jaxvelo.recover_dynamics(adata, var_names="all", plot_results=True, show_progress_bar=False)
    assert len(pl.get_fignums()) == 1
    axes = np.array(pl.gcf().axes).reshape(4, 6)
    assert [ax.get_title() for ax in axes[0]] == ["alpha", "beta", "gamma", "t_", "scaling",
                                                  "loss"]  # fmt: skip
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["gene_0", "gene_1", "gene_2", "gene_3"]
    n = np.sum(np.isfinite(adata.varm["loss"][:4]), axis=1)
    for i, row in enumerate(axes):
        for ax in row:
            (line,) = ax.lines
            assert len(line.get_ydata()) == n[i]
    # the last point of the alpha trace is the aligned fit_alpha, as upstream intends
    np.testing.assert_allclose(axes[0, 0].lines[0].get_ydata()[-1], adata.var["fit_alpha"][0])
    pl.close("all")

    # upstream's own block raises (its list of parameter histories is never filled)
    with pytest.raises(IndexError):
        _upstream(small.copy(), var_names="all", plot_results=True)
    pl.close("all")


def test_scatter_with_dynamical_fit(models):
    """``scv.pl.scatter`` draws the fitted trajectory from jaxvelo's ``fit_*`` as from
    upstream's."""
    import matplotlib.pyplot as pl
    import scvelo as scv

    (ref, _), (test, _) = models
    lines = []
    for adata in (ref.copy(), test.copy()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scv.tl.velocity(adata, mode="dynamical")
            ax = scv.pl.scatter(adata, basis="gene_2", frameon=False, show=False)
        assert ax.lines, "no dynamics curve drawn"
        lines.append([line.get_xydata() for line in ax.lines])
        pl.close("all")
    assert len(lines[0]) == len(lines[1])
    for a, b in zip(*lines, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-8)
