"""Every option of ``recover_dynamics`` that jaxvelo supports, against upstream scVelo 0.3.4.

Both fits run here on the same preprocessed data: the 1500-cell pancreas tier (``shared/data``,
skipped when absent) restricted to ten fixed velocity genes (``var_names="all"``: an AnnData
of those ten genes). Gate per option: the same fitted genes and every gene within 1e-6
relative on alpha, beta, gamma, t_, scaling and likelihood (and on every other ``fit_*``
column written), ``fit_t`` alike.

Each distinct static configuration compiles one program (~30-60 s on two cores); options that
only change the data or the AnnData edge (``t_max``, ``var_names``, ``n_top_genes``,
``steady_state_prior``, ``fit_basal_transcription``, ``copy``, ``n_jobs``) reuse the default
one. ``load_pars`` (with ``fit_time`` True, False or an obs key) and
``high_pars_resolution`` are at the end.
"""

from __future__ import annotations

import numpy as np
import pytest
from _upstream import upstream_recover

import jaxvelo
from jaxvelo import datasets
from jaxvelo.concordance import compare

# ten velocity genes of the 1500-cell tier, every 55th of the 559 (docs/concordance.md)
GENES = ["Cobl", "Nnat", "Pam", "Myl12a", "Prdm16", "Actn4", "Ptprf", "Muc1", "Cnpy2", "Ndufb8"]
MORE = ["Tgm2", "Cacna1a", "Sdk1", "Cnot6l", "Ppp1r14a", "Ptms", "Ocrl", "Tcf7l2", "Litaf",
        "Ndufa1"]  # fmt: skip
STEADY = ["Alpha", "Beta", "Delta", "Epsilon"]  # clusters used as steady-state prior

pytestmark = [pytest.mark.shared, pytest.mark.slow]


_upstream = upstream_recover


def _jaxvelo(adata, **kw):
    return jaxvelo.recover_dynamics(adata, show_progress_bar=False, **kw)


@pytest.fixture(scope="module")
def pancreas():
    if datasets.shared_data_path() is None:
        pytest.skip("../shared/data/pancreas_3696.h5ad not found (set JAXVELO_PANCREAS)")
    adata = datasets.pancreas(n_obs=1500)
    adata.var["selected"] = adata.var_names.isin(GENES)
    return adata


@pytest.fixture(scope="module")
def default_ref(pancreas):
    ref = pancreas.copy()
    _upstream(ref, var_names=GENES)
    return ref


def assert_concordant(ref, test, n_genes=10):
    """The gate: same fitted genes, all within 1e-6 relative; the rest of fit_* alike."""
    c = compare(ref, test, velocity=False)
    assert c.n_genes_differ == 0, c.summary()
    assert c.n_genes_ref == c.n_genes_test == n_genes, c.summary()
    assert c.diverging_genes == [], c.summary()
    fit_cols = sorted(k for k in ref.var.columns if k.startswith("fit_"))
    assert fit_cols == sorted(k for k in test.var.columns if k.startswith("fit_"))
    for col in fit_cols:
        a, b = ref.var[col].to_numpy(float), test.var[col].to_numpy(float)
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-12, err_msg=col)
    a, b = ref.layers["fit_t"], test.layers["fit_t"]
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-9, err_msg="fit_t")
    assert ref.uns["recover_dynamics"] == test.uns["recover_dynamics"]


STATIC_OPTIONS = [
    # grouped by compiled program (the core keeps only a few in memory; the on-disk cache,
    # on by default, keeps all)
    ("assignment_full_projection", {"assignment_mode": "full_projection"}, ()),
    ("assignment_partial_projection", {"assignment_mode": "partial_projection"}, ()),
    ("assignment_None", {"assignment_mode": None}, ()),
    ("assignment_inverse", {"assignment_mode": "inverse"}, ()),  # the program above
    ("fit_scaling_False", {"fit_scaling": False}, ()),
    ("fit_scaling_2.0", {"fit_scaling": 2.0}, ()),
    ("fit_steady_states_False", {"fit_steady_states": False}, ()),
    ("fit_connected_states_False", {"fit_connected_states": False}, ()),
    ("use_raw", {"use_raw": True}, ()),  # no neighbours either: the program above
    ("max_iter_0", {"max_iter": 0}, ()),
    ("max_iter_20", {"max_iter": 20}, ()),
    ("init_vals", {"init_vals": [1.1, 0.9, 1.0]}, ()),
    ("high_pars_resolution", {"high_pars_resolution": True}, ()),
    # the default program, shared with the tests below
    ("fit_basal_transcription", {"fit_basal_transcription": True}, ()),
    ("t_max_False", {"t_max": False}, ()),
    ("t_max_10", {"t_max": 10}, ()),
]


@pytest.mark.parametrize(
    "kwargs", [pytest.param(kw, id=name, marks=marks) for name, kw, marks in STATIC_OPTIONS]
)
def test_option(pancreas, kwargs):
    ref, test = pancreas.copy(), pancreas.copy()
    _upstream(ref, var_names=GENES, **kwargs)
    _jaxvelo(test, var_names=GENES, **kwargs)
    assert_concordant(ref, test)


def test_default_projection_and_fit_scaling_true(pancreas, default_ref):
    test = pancreas.copy()
    _jaxvelo(test, var_names=GENES, assignment_mode="projection", fit_scaling=True)
    assert_concordant(default_ref, test)


def test_inverse_is_none(pancreas):
    a, b = pancreas.copy(), pancreas.copy()
    _jaxvelo(a, var_names=GENES, assignment_mode="inverse")
    _jaxvelo(b, var_names=GENES, assignment_mode=None)
    for col in ("fit_alpha", "fit_t_", "fit_likelihood"):
        np.testing.assert_array_equal(a.var[col], b.var[col])


@pytest.mark.parametrize("var_names", ["list", "selected"], ids=["list_reordered", "bool_column"])
def test_var_names(pancreas, var_names):
    names = GENES[::-1] if var_names == "list" else var_names
    ref, test = pancreas.copy(), pancreas.copy()
    _upstream(ref, var_names=names)
    _jaxvelo(test, var_names=names)
    assert_concordant(ref, test)


def test_var_names_single_name_returns_model(pancreas):
    """One gene: upstream's default ``return_model`` (fewer than 5 genes) returns the model."""
    from scvelo.tools import DynamicsRecovery

    ref, test = pancreas.copy(), pancreas.copy()
    dm_ref = _upstream(ref, var_names="Pam")
    dm = _jaxvelo(test, var_names="Pam")
    assert isinstance(dm_ref, DynamicsRecovery) and isinstance(dm, DynamicsRecovery)
    assert dm.gene == dm_ref.gene == "Pam"
    assert_concordant(ref, test, n_genes=1)
    np.testing.assert_allclose(dm.pars, dm_ref.pars, rtol=1e-6)
    np.testing.assert_allclose(dm.loss, dm_ref.loss, rtol=1e-6)


def test_var_names_all(pancreas):
    """``"all"`` on a small AnnData: the ten genes only (same cells and neighbours, so the
    default program is reused)."""
    small = pancreas[:, GENES].copy()
    ref, test = small.copy(), small.copy()
    _upstream(ref, var_names="all")
    _jaxvelo(test, var_names="all")
    assert_concordant(ref, test)


def test_n_top_genes(pancreas):
    ref, test = pancreas.copy(), pancreas.copy()
    _upstream(ref, var_names=GENES + MORE, n_top_genes=10)
    _jaxvelo(test, var_names=GENES + MORE, n_top_genes=10)
    assert_concordant(ref, test)


@pytest.mark.parametrize("kind", ["ndarray", "list"])
def test_steady_state_prior(pancreas, kind):
    """Upstream indexes the prior with a boolean mask (``_prior[w]``, core ~52), so it fails
    on a list; jaxvelo takes either. Upstream gets the array."""
    prior = pancreas.obs["clusters"].isin(STEADY).to_numpy()
    ref, test = pancreas.copy(), pancreas.copy()
    _upstream(ref, var_names=GENES, steady_state_prior=prior)
    _jaxvelo(test, var_names=GENES, steady_state_prior=prior if kind == "ndarray" else list(prior))
    assert_concordant(ref, test)
    if kind == "list":
        with pytest.raises(TypeError):
            _upstream(pancreas.copy(), var_names=GENES[:1], steady_state_prior=list(prior))


def test_copy(pancreas):
    before = pancreas.var.copy()
    ref = _upstream(pancreas, var_names=GENES, copy=True)
    test = _jaxvelo(pancreas, var_names=GENES, copy=True)
    assert ref is not pancreas and test is not pancreas
    assert pancreas.var.equals(before) and "fit_t" not in pancreas.layers
    assert_concordant(ref, test)


def test_n_jobs(pancreas, default_ref):
    a, b = pancreas.copy(), pancreas.copy()
    _jaxvelo(a, var_names=GENES, n_jobs=1)
    _jaxvelo(b, var_names=GENES, n_jobs=2)
    for col in a.var.columns:
        np.testing.assert_array_equal(a.var[col], b.var[col], err_msg=col)
    np.testing.assert_array_equal(a.layers["fit_t"], b.layers["fit_t"])
    np.testing.assert_array_equal(a.varm["loss"], b.varm["loss"])
    assert_concordant(default_ref, a)


@pytest.mark.parametrize(
    "fit_time", [True, False, "my_time"], ids=["refit", "keep_times", "obs_key"]
)
def test_load_pars(default_ref, fit_time):
    """Refit from stored results (upstream's own fit of the ten genes), with ``fit_time``
    True (re-assign times), False (keep the stored ``fit_t``) or an obs key (new times; the
    stored switch time moves to the mean of its cells' new times)."""
    start = default_ref.copy()
    start.obs["my_time"] = np.linspace(0.0, 20.0, start.n_obs)
    ref, test = start.copy(), start.copy()
    _upstream(ref, var_names=GENES, load_pars=True, fit_time=fit_time)
    _jaxvelo(test, var_names=GENES, load_pars=True, fit_time=fit_time)
    assert_concordant(ref, test)


def test_fit_time_false_needs_load_pars(pancreas):
    a = pancreas.copy()
    with pytest.raises(ValueError, match="load_pars"):
        _jaxvelo(a, var_names=GENES, fit_time=False)
    assert "fit_alpha" not in a.var
