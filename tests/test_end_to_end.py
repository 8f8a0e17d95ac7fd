"""End-to-end concordance with upstream scVelo 0.3.4 on real data.

Upstream runs in the test (no stored reference): scVelo's own 100-cell pancreas fixture from
its sdist, and the 1500-cell tier of the real pancreas from ../shared (skipped when absent).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
from _upstream import upstream_recover

import jaxvelo
from jaxvelo import datasets
from jaxvelo.concordance import compare

# The gate of the core issue: >= 99% of fitted genes within 1e-6 relative on all of alpha,
# beta, gamma, t_, scaling and likelihood (measured: 100% on both, docs/concordance.md).
FLOOR_WITHIN_1E6 = {"fixture": 0.99, "pancreas1500": 0.99}
# Not gated: genes whose six values are upstream's bit for bit, where the program calls
# numpy's own exp/log, and of those the genes whose fit_t/fit_tau/fit_tau_ columns are too
# (measured: 100% / 100% on both since 6ec7cc1; fixture 100% / 99.85%, 1500 cells
# 99.82% / 99.82% before it and the float32 flag of adjust_increments; at fe24983, before the FMA
# and float32 fixes of the final statistics, 98.42% and 97.85% with fit_t alone 100%; with
# XLA's exp/log 48.00% and 60.82%).
FLOOR_BITWISE = {"fixture": 0.995, "pancreas1500": 0.99}
FLOOR_TIME_BITWISE = 0.995


def _check_bitwise(c, tier: str) -> None:
    from jaxvelo.core import host_kernels

    if host_kernels.numpy_exp_log_available():
        assert c.frac_bitwise >= FLOOR_BITWISE[tier], c.summary()
        assert c.frac_t_bitwise >= FLOOR_TIME_BITWISE, c.summary()


def _upstream(adata, **kw):
    """scVelo's fit of a copy of ``adata``."""
    ref = adata.copy()
    upstream_recover(ref, **kw)
    return ref


@pytest.fixture(scope="module")
def fixture_data():
    try:
        return datasets.fixture("pancreas_100obs")
    except RuntimeError as err:  # pip cannot reach the index
        pytest.skip(f"scVelo sdist fixtures unavailable: {err}")


@pytest.fixture(scope="module")
def fixture_fits(fixture_data):
    ref = _upstream(fixture_data)
    test = fixture_data.copy()
    jaxvelo.recover_dynamics(test, show_progress_bar=False)
    return fixture_data, ref, test


def test_fixture_concordance(fixture_fits):
    _, ref, test = fixture_fits
    c = compare(ref, test)
    logging.getLogger("jaxvelo.tests").info(c.summary())
    assert c.n_genes_differ == 0
    assert c.n_genes_ref == c.n_genes_test > 1000
    for name in ("alpha", "beta", "gamma", "t_", "likelihood"):
        assert c.pearson[name] >= 0.999, (name, c.pearson[name])
    assert c.velocity_pearson >= 0.999
    assert c.frac_within_1e6 >= FLOOR_WITHIN_1E6["fixture"], c.summary()
    _check_bitwise(c, "fixture")


def test_outputs_have_upstream_structure(fixture_fits):
    _, ref, test = fixture_fits
    assert set(ref.var.columns) == set(test.var.columns)
    for col in ref.var.columns:
        assert ref.var[col].dtype == test.var[col].dtype, col
        a, b = ref.var[col].to_numpy(), test.var[col].to_numpy()
        if np.issubdtype(a.dtype, np.floating):
            np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=col)
    assert set(ref.layers.keys()) == set(test.layers.keys())
    for key in ("fit_t", "fit_tau", "fit_tau_"):
        assert ref.layers[key].shape == test.layers[key].shape
        assert ref.layers[key].dtype == test.layers[key].dtype
        np.testing.assert_array_equal(
            np.isnan(ref.layers[key]), np.isnan(test.layers[key]), err_msg=key
        )
    assert ref.varm["loss"].shape == test.varm["loss"].shape
    lr, lt = np.isnan(ref.varm["loss"]), np.isnan(test.varm["loss"])
    np.testing.assert_array_equal(lr.all(1), lt.all(1))  # same genes without a history
    # A loss history is the list of accepted updates. A handful of genes accept one update
    # more or less where a proposal ties the current loss to ~1e-8 relative (measured: 7 of
    # 1327 here, e.g. Tceb1 in initialize_scaling); their final parameters still agree to
    # 1e-6 (test_fixture_concordance). Everything else must match entry for entry.
    differ = (lr != lt).any(1)
    assert differ.sum() <= 0.01 * (~lr.all(1)).sum(), list(ref.var_names[differ])
    assert ref.uns["recover_dynamics"] == test.uns["recover_dynamics"]


def test_downstream_scvelo_runs(fixture_fits):
    import scvelo as scv

    _, _, test = fixture_fits
    adata = test.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scv.tl.velocity(adata, mode="dynamical")
        scv.tl.latent_time(adata)
    assert np.isfinite(adata.obs["latent_time"]).all()


def test_batch_size_invariance(fixture_data):
    genes = list(fixture_data.var_names[:23])
    a = fixture_data.copy()
    b = fixture_data.copy()
    jaxvelo.recover_dynamics(a, var_names=genes, show_progress_bar=False, batch_size=23)
    jaxvelo.recover_dynamics(b, var_names=genes, show_progress_bar=False, batch_size=5)
    for col in a.var.columns:
        if col.startswith("fit_"):
            np.testing.assert_array_equal(a.var[col].to_numpy(), b.var[col].to_numpy(), col)
    for key in ("fit_t", "fit_tau", "fit_tau_"):
        np.testing.assert_array_equal(a.layers[key], b.layers[key])
    np.testing.assert_array_equal(a.varm["loss"], b.varm["loss"])


@pytest.mark.shared
def test_pancreas_1500_concordance():
    if datasets.shared_data_path() is None:
        pytest.skip("../shared/data/pancreas_3696.h5ad not found (set JAXVELO_PANCREAS)")
    adata = datasets.pancreas(n_obs=1500)
    ref = _upstream(adata)
    test = adata.copy()
    jaxvelo.recover_dynamics(test, show_progress_bar=False)
    c = compare(ref, test)
    assert c.n_genes_differ == 0
    for name in ("alpha", "beta", "gamma", "t_", "likelihood"):
        assert c.pearson[name] >= 0.999, (name, c.pearson[name])
    assert c.velocity_pearson >= 0.999
    assert c.frac_within_1e6 >= FLOOR_WITHIN_1E6["pancreas1500"], c.summary()
    _check_bitwise(c, "pancreas1500")
    # the batch-size model (jaxvelo.core.batch.working_bytes) bounds the working memory of
    # the real data's program (a 16-gene batch of 1500 cells)
    from jaxvelo.core import batch

    fn = next(reversed(batch._MEMORY.values()))
    genes, cells = fn.args_info[0][0].u.shape
    assert cells == batch.size_bucket(1500) == 1536 and genes >= 16  # cells padded
    assert fn.memory_analysis().temp_size_in_bytes <= batch.working_bytes(genes, cells)


@pytest.mark.shared
def test_gpu_lowering_gives_the_cpu_results(monkeypatch):
    """What a GPU runs -- the XLA versions of the CPU's custom calls and float32 quotients
    taken in float64 -- gives bitwise the CPU's fit of real float32 data (here on CPU: the
    same program up to the backend's code generation). On the 3696-cell pancreas an XLA
    adjust_increments that subtracted float32 gaps moved the first loss of 4 of 48 genes.
    exp/log are XLA's in both (float32: the XLA port of numpy's kernels): a GPU computes
    float64 ones by libdevice, not numpy's own loops that the CPU program calls
    (tests/test_npmath64.py)."""
    monkeypatch.setenv("JAXVELO_NUMPY_EXP_LOG", "0")
    if datasets.shared_data_path() is None:
        pytest.skip("../shared/data/pancreas_3696.h5ad not found (set JAXVELO_PANCREAS)")
    adata = datasets.pancreas(n_obs=1500)
    genes = list(adata.var_names[:40])
    fits = {}
    for host, division in (("1", "native"), ("0", "float64")):
        monkeypatch.setenv("JAXVELO_HOST_KERNELS", host)
        monkeypatch.setenv("JAXVELO_F32_DIVISION", division)
        a = adata.copy()
        jaxvelo.recover_dynamics(a, var_names=genes, show_progress_bar=False)
        fits[host] = a
    cpu, gpu = fits["1"], fits["0"]
    assert np.isfinite(cpu.var["fit_alpha"]).sum() > 20
    for col in cpu.var.columns:
        if col.startswith("fit_"):
            np.testing.assert_array_equal(gpu.var[col].to_numpy(), cpu.var[col].to_numpy(), col)
    for key in ("fit_t", "fit_tau", "fit_tau_"):
        np.testing.assert_array_equal(gpu.layers[key], cpu.layers[key], key)
    np.testing.assert_array_equal(gpu.varm["loss"], cpu.varm["loss"])
