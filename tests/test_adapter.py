"""The AnnData edge: clear errors on bad input, nothing written before they are raised."""

from __future__ import annotations

import numpy as np
import pytest

import jaxvelo
from jaxvelo import cli, datasets


@pytest.fixture(scope="module")
def small():
    return datasets.simulated(200, 6, seed=1)


def _snapshot(adata):
    return (
        list(adata.var.columns),
        list(adata.layers.keys()),
        list(adata.varm.keys()),
        list(adata.uns.keys()),
        {k: np.array(adata.layers[k]).copy() for k in adata.layers.keys()},
    )


def _assert_untouched(adata, snap):
    cols, layers, varm, uns, data = snap
    assert list(adata.var.columns) == cols
    assert list(adata.layers.keys()) == layers
    assert list(adata.varm.keys()) == varm
    assert list(adata.uns.keys()) == uns
    for k, v in data.items():
        np.testing.assert_array_equal(np.array(adata.layers[k]), v)


@pytest.mark.parametrize(
    ("mutate", "kwargs", "error", "match"),
    [
        (lambda a: a.layers.pop("unspliced"), {}, KeyError, "unspliced"),
        (lambda a: a.layers["Ms"].__setitem__((0, 0), np.nan), {"var_names": "all"}, ValueError,
         "NaN"),
        (lambda a: a.layers["Mu"].__setitem__((1, 1), -1.0), {"var_names": "all"}, ValueError,
         "negative"),
        (None, {"var_names": ["no_such_gene"]}, ValueError, "not found"),
        (None, {"var_names": "no_such_key"}, ValueError, "not found"),
        (None, {"assignment_mode": "projecton"}, ValueError, "assignment_mode"),
        (None, {"max_iter": -1}, ValueError, "max_iter"),
        (None, {"max_iter": 2.5}, ValueError, "max_iter"),
        (None, {"n_top_genes": 0}, ValueError, "n_top_genes"),
        (None, {"load_pars": True}, NotImplementedError, "load_pars"),
        (None, {"bogus_option": 1}, TypeError, "bogus_option"),
    ],
)  # fmt: skip
def test_bad_input_raises_and_leaves_adata_untouched(small, mutate, kwargs, error, match):
    adata = small.copy()
    if mutate is not None:
        mutate(adata)
    snap = _snapshot(adata)
    with pytest.raises(error, match=match):
        jaxvelo.recover_dynamics(adata, show_progress_bar=False, **kwargs)
    _assert_untouched(adata, snap)


def test_no_cells(small):
    with pytest.raises(ValueError, match="no cells"):
        jaxvelo.recover_dynamics(small[:0].copy(), show_progress_bar=False)


def test_cli_fit_and_copy(small, tmp_path):
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
