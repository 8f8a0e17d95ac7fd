"""The AnnData edge: clear errors on bad input, nothing written before they are raised.

Fits here reuse two compiled programs (200 cells, 6 genes per batch; with and without
neighbours): every variant is built from the same simulated AnnData so that the neighbour
graph, and hence the compiled shapes, stay the same.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp

import jaxvelo
from jaxvelo import cli, datasets
from jaxvelo.adapter import recover

FIT_COLS = ["fit_alpha", "fit_beta", "fit_gamma", "fit_t_", "fit_scaling", "fit_likelihood"]


@pytest.fixture(scope="module")
def small():
    return datasets.simulated(200, 6, seed=1)


@pytest.fixture(scope="module")
def small_fit(small):
    return jaxvelo.recover_dynamics(small, var_names="all", copy=True, show_progress_bar=False)


def _array(x):
    return x.toarray() if sp.issparse(x) else np.array(x, copy=True)


def _snapshot(adata):
    return (
        list(adata.var_names),
        list(adata.var.columns),
        list(adata.layers.keys()),
        list(adata.varm.keys()),
        list(adata.uns.keys()),
        {k: _array(adata.layers[k]) for k in adata.layers.keys()},
    )


def _assert_untouched(adata, snap):
    names, cols, layers, varm, uns, data = snap
    assert list(adata.var_names) == names
    assert list(adata.var.columns) == cols
    assert list(adata.layers.keys()) == layers
    assert list(adata.varm.keys()) == varm
    assert list(adata.uns.keys()) == uns
    for k, v in data.items():
        np.testing.assert_array_equal(_array(adata.layers[k]), v)


def _set(key, value):
    def mutate(a):
        a.layers[key] = value(a)

    return mutate


def _zero_all(a):
    a.layers["Ms"] = np.zeros_like(a.layers["Ms"])


BAD_INPUT = [
    # missing / broken layers
    ("no_unspliced", lambda a: a.layers.pop("unspliced"), {}, KeyError, "unspliced"),
    ("no_spliced", lambda a: a.layers.pop("spliced"), {}, KeyError, "spliced"),
    ("nan", lambda a: a.layers["Ms"].__setitem__((0, 0), np.nan), {"var_names": "all"},
     ValueError, "NaN"),
    ("inf", lambda a: a.layers["Mu"].__setitem__((3, 2), np.inf), {"var_names": "all"},
     ValueError, "inf"),
    ("nan_raw", lambda a: a.layers["spliced"].__setitem__((5, 1), np.nan),
     {"var_names": "all", "use_raw": True}, ValueError, "NaN"),
    ("negative", lambda a: a.layers["Mu"].__setitem__((1, 1), -1.0), {"var_names": "all"},
     ValueError, "negative"),
    ("negative_sparse", _set("Ms", lambda a: sp.csr_matrix(np.where(
        np.arange(a.n_vars) == 2, -a.layers["Ms"], a.layers["Ms"]))), {"var_names": "all"},
     ValueError, "negative"),
    ("strings", _set("Ms", lambda a: a.layers["Ms"].astype(str)), {}, TypeError, "numeric"),
    ("objects", _set("Mu", lambda a: a.layers["Mu"].astype(object)), {}, TypeError, "numeric"),
    ("complex", _set("Mu", lambda a: a.layers["Mu"].astype(complex)), {}, TypeError,
     "numeric"),
    ("all_unrecoverable", _zero_all, {"var_names": "all"}, ValueError, "recoverable"),
    # var_names
    ("unknown_gene", None, {"var_names": ["no_such_gene"]}, ValueError, "not found"),
    ("unknown_key", None, {"var_names": "no_such_key"}, ValueError, "not found"),
    ("empty_list", None, {"var_names": []}, ValueError, "No variable names"),
    ("int_names", None, {"var_names": [1, 2]}, TypeError, "var_names"),
    ("none_names", None, {"var_names": None}, TypeError, "var_names"),
    ("float_column", lambda a: a.var.__setitem__("score", 1.5), {"var_names": "score"},
     ValueError, "not boolean"),
    # options
    ("assignment_mode", None, {"assignment_mode": "projecton"}, ValueError,
     r"one of \(None, 'inverse', 'projection', 'full_projection', 'partial_projection'\)"),
    ("max_iter_negative", None, {"max_iter": -1}, ValueError, "max_iter"),
    ("max_iter_float", None, {"max_iter": 2.5}, ValueError, "max_iter"),
    ("max_iter_str", None, {"max_iter": "10"}, ValueError, "max_iter"),
    ("max_iter_bool", None, {"max_iter": True}, ValueError, "max_iter"),
    ("n_top_genes_zero", None, {"n_top_genes": 0}, ValueError, "n_top_genes"),
    ("n_top_genes_negative", None, {"n_top_genes": -3}, ValueError, "n_top_genes"),
    ("n_top_genes_float", None, {"n_top_genes": 2.5}, ValueError, "n_top_genes"),
    ("prior_shape", None, {"var_names": "all", "steady_state_prior": np.ones(3, bool)},
     ValueError, "steady_state_prior"),
    ("fit_time_without_load_pars", None, {"fit_time": False}, ValueError, "load_pars"),
    ("unknown_kwargs", None, {"bogus_option": 1, "other": 2}, TypeError,
     r"\['bogus_option', 'other'\]"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("mutate", "kwargs", "error", "match"),
    [case[1:] for case in BAD_INPUT],
    ids=[case[0] for case in BAD_INPUT],
)
def test_bad_input_raises_and_leaves_adata_untouched(small, mutate, kwargs, error, match):
    adata = small.copy()
    if mutate is not None:
        mutate(adata)
    snap = _snapshot(adata)
    with pytest.raises(error, match=match):
        jaxvelo.recover_dynamics(adata, show_progress_bar=False, **kwargs)
    _assert_untouched(adata, snap)


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("no_unspliced", KeyError, "unspliced"),
        ("nan", ValueError, "NaN"),
        ("assignment_mode", ValueError, "full_projection"),
        ("unknown_kwargs", TypeError, "bogus_option"),
        ("all_unrecoverable", ValueError, "recoverable"),
    ],
)
def test_bad_input_under_backend_flag(small, case, error, match):
    """The same errors, and nothing written, through ``scv.tl.recover_dynamics``."""
    import scvelo as scv

    (mutate, kwargs, *_), = [c[1:] for c in BAD_INPUT if c[0] == case]  # fmt: skip
    adata = small.copy()
    if mutate is not None:
        mutate(adata)
    snap = _snapshot(adata)
    with jaxvelo.enabled(), pytest.raises(error, match=match):
        scv.tl.recover_dynamics(adata, show_progress_bar=False, **kwargs)
    assert not jaxvelo.is_enabled()
    _assert_untouched(adata, snap)


@pytest.mark.parametrize("sl", [np.s_[:0], np.s_[:, :0]], ids=["no_cells", "no_genes"])
def test_empty_anndata(small, sl):
    adata = small[sl].copy()
    snap = _snapshot(adata)
    with pytest.raises(ValueError, match="no cells" if adata.n_obs == 0 else "no genes"):
        jaxvelo.recover_dynamics(adata, show_progress_bar=False)
    _assert_untouched(adata, snap)


def test_unknown_names_among_known_are_dropped_with_warning(small, small_fit, caplog):
    adata = small.copy()
    with caplog.at_level(logging.WARNING, logger="jaxvelo"):
        jaxvelo.recover_dynamics(
            adata, var_names=[*small.var_names, "no_such_gene"], show_progress_bar=False
        )
    assert "no_such_gene" in caplog.text
    for col in FIT_COLS:
        np.testing.assert_array_equal(adata.var[col], small_fit.var[col])


def test_missing_moments_fall_back_to_raw_counts(small, caplog):
    adata = small.copy()
    del adata.layers["Ms"], adata.layers["Mu"]
    with caplog.at_level(logging.WARNING, logger="jaxvelo"):
        jaxvelo.recover_dynamics(adata, var_names="all", show_progress_bar=False)
    assert "'Ms'/'Mu' not found" in caplog.text
    assert adata.uns["recover_dynamics"]["use_raw"] is True
    assert adata.uns["recover_dynamics"]["fit_connected_states"] is False
    # the same as asking for the raw counts explicitly
    ref = small.copy()
    jaxvelo.recover_dynamics(ref, var_names="all", use_raw=True, show_progress_bar=False)
    for col in FIT_COLS:
        assert np.isfinite(adata.var[col]).all(), col
        np.testing.assert_array_equal(adata.var[col], ref.var[col])


def test_layer_types(small, small_fit):
    """float32 moments dense or CSR give identical fits; raw counts work as float64, as
    integers (made float64 like upstream's division) and as CSR, identically."""
    sparse = small.copy()
    sparse.layers["Ms"] = sp.csr_matrix(sparse.layers["Ms"])
    sparse.layers["Mu"] = sp.csc_matrix(sparse.layers["Mu"])
    jaxvelo.recover_dynamics(sparse, var_names="all", show_progress_bar=False)
    for col in FIT_COLS:
        np.testing.assert_array_equal(sparse.var[col], small_fit.var[col])

    counts = small.copy()
    for key in ("spliced", "unspliced"):
        counts.layers[key] = np.rint(counts.layers[key]).astype(np.int64)
    fits = {}
    for name, conv in [("float64", np.asarray), ("int", np.asarray), ("csr", sp.csr_matrix)]:
        a = counts.copy()
        for key in ("spliced", "unspliced"):
            x = a.layers[key]
            a.layers[key] = conv(x.astype(np.float64) if name == "float64" else x)
        jaxvelo.recover_dynamics(a, var_names="all", use_raw=True, show_progress_bar=False)
        fits[name] = a
        assert np.isfinite(a.var["fit_alpha"]).all(), name
    for col in FIT_COLS:
        np.testing.assert_array_equal(fits["int"].var[col], fits["float64"].var[col])
        np.testing.assert_array_equal(fits["csr"].var[col], fits["float64"].var[col])


def test_duplicate_var_names_made_unique_with_warning(small, small_fit, caplog):
    adata = small.copy()
    adata.var_names = ["gene_0", "gene_0", *small.var_names[2:]]
    with caplog.at_level(logging.WARNING, logger="jaxvelo"):
        jaxvelo.recover_dynamics(adata, var_names="all", show_progress_bar=False)
    assert "Duplicate var_names" in caplog.text
    assert list(adata.var_names) == ["gene_0", "gene_0-1", *small.var_names[2:]]
    for col in FIT_COLS:
        np.testing.assert_array_equal(adata.var[col], small_fit.var[col])


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_unrecoverable_gene_gets_nan_with_warning(small, small_fit, caplog):
    adata = small[:, [*range(small.n_vars), 0]].copy()  # same cells and neighbours, 7 genes
    adata.var_names = [*small.var_names, "dead"]
    adata.layers["Ms"][:, -1] = 0
    with caplog.at_level(logging.WARNING, logger="jaxvelo"):
        jaxvelo.recover_dynamics(adata, var_names="all", show_progress_bar=False)
    assert "dead not recoverable" in caplog.text
    for col in FIT_COLS:
        assert np.isnan(adata.var[col]["dead"]), col
        np.testing.assert_array_equal(adata.var[col][:-1], small_fit.var[col])
    assert np.isnan(adata.layers["fit_t"][:, -1]).all()
    assert np.isnan(adata.varm["loss"][-1]).all()


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_failure_mid_fit_leaves_adata_untouched(small, monkeypatch):
    adata = small[:, list(range(small.n_vars)) * 2].copy()  # two batches of 6 genes
    adata.var_names = [f"g{i}" for i in range(adata.n_vars)]
    real = recover.fit_genes
    batches = []

    def failing(*args, progress=None, **kwargs):
        def step(n):
            batches.append(n)
            if len(batches) == 2:
                raise RuntimeError("device lost on the second batch")

        return real(*args, progress=step, **kwargs)

    monkeypatch.setattr(recover, "fit_genes", failing)
    snap = _snapshot(adata)
    with pytest.raises(RuntimeError, match="second batch"):
        jaxvelo.recover_dynamics(adata, var_names="all", show_progress_bar=True, batch_size=6)
    assert batches == [6, 6]
    _assert_untouched(adata, snap)


def test_cli_fit_and_copy(small, small_fit, tmp_path):
    path = tmp_path / "in.h5ad"
    out = tmp_path / "out.h5ad"
    small.write_h5ad(path)
    assert cli.main(["fit", str(path), "-o", str(out), "-q", "--var-names", "all"]) == 0
    import anndata

    fitted = anndata.read_h5ad(out)
    assert np.isfinite(fitted.var["fit_alpha"]).all()
    for key in ("fit_t", "fit_tau", "fit_tau_"):
        assert key in fitted.layers
    # copy=True returns a new object and leaves the input alone
    adata = small.copy()
    snap = _snapshot(adata)
    res = jaxvelo.recover_dynamics(adata, var_names="all", copy=True, show_progress_bar=False)
    _assert_untouched(adata, snap)
    np.testing.assert_array_equal(res.var["fit_alpha"], fitted.var["fit_alpha"])
    np.testing.assert_array_equal(res.var["fit_alpha"], small_fit.var["fit_alpha"])
