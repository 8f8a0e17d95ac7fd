"""``jaxvelo.enable()``: scVelo's dynamical model runs jaxvelo; ``disable()`` restores scVelo."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import jaxvelo
from jaxvelo import datasets
from jaxvelo.adapter import recover


@pytest.fixture(scope="module")
def small():
    return datasets.simulated(200, 6, seed=1)


@pytest.fixture(autouse=True)
def _flag_off():
    jaxvelo.disable()
    yield
    jaxvelo.disable()  # never leak the flag into other tests


@pytest.fixture
def no_upstream_fit(monkeypatch):
    """Fail if upstream's per-gene fit runs."""
    from scvelo.tools import DynamicsRecovery

    def fit(self, *args, **kwargs):
        raise AssertionError(f"upstream DynamicsRecovery.fit ran for {self.gene}")

    monkeypatch.setattr(DynamicsRecovery, "fit", fit)


@pytest.fixture
def core_calls(monkeypatch):
    calls = []
    real = recover.fit_genes

    def spy(u, *args, **kwargs):
        calls.append(u.shape[1])
        return real(u, *args, **kwargs)

    monkeypatch.setattr(recover, "fit_genes", spy)
    return calls


def _originals():
    import scvelo  # noqa: F401

    core = sys.modules["scvelo.tools._em_model_core"]
    em = sys.modules["scvelo.tools._em_model"]
    return core.recover_dynamics, em.ExpectationMaximizationModel.__dict__["fit"]


def _holders(obj):
    """(module name, attribute) of every loaded scVelo module attribute that is ``obj``."""
    return sorted(
        (name, key)
        for name, mod in list(sys.modules.items())
        if mod is not None and (name == "scvelo" or name.startswith("scvelo."))
        for key, value in list(getattr(mod, "__dict__", {}).items())
        if value is obj
    )


def _quiet_scvelo():
    import scvelo as scv

    scv.settings.verbosity = 0
    warnings.simplefilter("ignore")


def test_enable_disable_restore_identity():
    import scvelo as scv
    from scvelo.tools import ExpectationMaximizationModel

    original, original_fit = _originals()
    holders = _holders(original)
    # scvelo.tl / scvelo.tools (one module) and _em_model_core itself
    assert ("scvelo.tools", "recover_dynamics") in holders
    assert ("scvelo.tools._em_model_core", "recover_dynamics") in holders

    jaxvelo.enable()
    assert jaxvelo.is_enabled()
    wrapper = scv.tl.recover_dynamics
    assert wrapper is not original and wrapper.__wrapped__ is original
    assert _holders(original) == [] and _holders(wrapper) == holders
    assert inspect.signature(wrapper) == inspect.signature(original)
    assert wrapper.__doc__ == original.__doc__ and wrapper.__name__ == "recover_dynamics"
    fit = ExpectationMaximizationModel.fit
    assert fit is not original_fit and fit.__wrapped__ is original_fit
    assert inspect.signature(fit) == inspect.signature(original_fit)

    jaxvelo.enable()  # idempotent: the same wrappers stay
    assert scv.tl.recover_dynamics is wrapper and ExpectationMaximizationModel.fit is fit

    jaxvelo.disable()
    assert not jaxvelo.is_enabled()
    assert scv.tl.recover_dynamics is original and scv.tools.recover_dynamics is original
    assert _holders(original) == holders and _holders(wrapper) == []
    assert ExpectationMaximizationModel.__dict__["fit"] is original_fit
    jaxvelo.disable()  # idempotent
    assert scv.tl.recover_dynamics is original


def test_context_manager_restores_previous_state():
    import scvelo as scv

    original, original_fit = _originals()
    with pytest.raises(RuntimeError, match="inside"):
        with jaxvelo.enabled():
            assert jaxvelo.is_enabled() and scv.tl.recover_dynamics is not original
            raise RuntimeError("inside")
    assert not jaxvelo.is_enabled()
    assert scv.tl.recover_dynamics is original
    assert scv.tools.ExpectationMaximizationModel.__dict__["fit"] is original_fit

    jaxvelo.enable()
    wrapper = scv.tl.recover_dynamics
    with jaxvelo.enabled():  # nested: stays enabled, the same wrapper
        assert scv.tl.recover_dynamics is wrapper
    assert jaxvelo.is_enabled() and scv.tl.recover_dynamics is wrapper
    with jaxvelo.enabled():
        jaxvelo.disable()  # switched off inside: the previous state (on) comes back
    assert jaxvelo.is_enabled()
    jaxvelo.disable()
    assert scv.tl.recover_dynamics is original


def test_results_identical_through_scvelo(small, no_upstream_fit, core_calls):
    import scvelo as scv

    direct = small.copy()
    jaxvelo.recover_dynamics(direct, var_names="all", show_progress_bar=False)
    via = small.copy()
    with jaxvelo.enabled():
        out = scv.tl.recover_dynamics(via, var_names="all", show_progress_bar=False)
        copied = scv.tools.recover_dynamics(small, var_names="all", copy=True)
    assert out is None and core_calls == [6, 6, 6]
    for fitted in (via, copied):
        assert list(fitted.var.columns) == list(direct.var.columns)
        for col in direct.var.columns:
            np.testing.assert_array_equal(fitted.var[col], direct.var[col], err_msg=col)
        for key in ("fit_t", "fit_tau", "fit_tau_"):
            np.testing.assert_array_equal(fitted.layers[key], direct.layers[key])
        np.testing.assert_array_equal(fitted.varm["loss"], direct.varm["loss"])
        assert fitted.uns["recover_dynamics"] == direct.uns["recover_dynamics"]
    assert "fit_alpha" not in small.var


def test_differential_kinetic_test_runs_jaxvelo(small, no_upstream_fit, core_calls):
    import scvelo as scv

    direct = small.copy()
    jaxvelo.recover_dynamics(direct, var_names="all", show_progress_bar=False)
    adata = small.copy()
    adata.obs["clusters"] = pd.Categorical(np.where(np.arange(adata.n_obs) % 2, "a", "b"))
    with jaxvelo.enabled(), warnings.catch_warnings():
        _quiet_scvelo()
        scv.tl.differential_kinetic_test(adata, var_names="all", groupby="clusters")
    assert core_calls == [6, 6]  # the direct fit, then the one inside the test
    for col in ("fit_alpha", "fit_beta", "fit_gamma", "fit_t_", "fit_likelihood"):
        np.testing.assert_array_equal(adata.var[col], direct.var[col], err_msg=col)
    assert "fit_pval_kinetics" in adata.var and "fit_diff_kinetics" in adata.var


def test_em_model_fit_runs_jaxvelo(small, no_upstream_fit, core_calls):
    from scvelo.tools import DynamicsRecovery, ExpectationMaximizationModel

    adata = small.copy()
    model = ExpectationMaximizationModel(adata=adata, var_names_key="all")
    with jaxvelo.enabled():
        assert model.fit(copy=False, return_model=False, show_progress_bar=False) is None
    assert core_calls == [6]
    assert "fit_alpha" not in adata.var  # the class API writes on export only
    out = model.export_results_adata(copy=True)
    direct = small.copy()
    jaxvelo.recover_dynamics(direct, var_names="all", t_max=20, show_progress_bar=False)
    assert set(out.var.columns) == set(direct.var.columns)
    for col in direct.var.columns:
        np.testing.assert_array_equal(out.var[col], direct.var[col], err_msg=col)
    for key in ("fit_t", "fit_tau", "fit_tau_"):
        np.testing.assert_array_equal(out.layers[key], direct.layers[key])
    np.testing.assert_array_equal(out.varm["loss"], direct.varm["loss"])
    assert out.uns["recover_dynamics"] == direct.uns["recover_dynamics"]

    model = ExpectationMaximizationModel(adata=small.copy(), var_names_key="all")
    with jaxvelo.enabled():
        dm = model.fit(return_model=True, show_progress_bar=False)
    assert isinstance(dm, DynamicsRecovery) and dm.gene == "gene_5"


@pytest.mark.slow
def test_scvelo_test_basic_under_flag(tmp_path):
    """scVelo 0.3.4's own ``tests/test_basic.py`` (its sdist) passes with the flag on.

    ``test_dynamical_model`` and ``test_pipeline`` fit with ``ExpectationMaximizationModel``;
    the plugin checks that jaxvelo ran and upstream's per-gene fit did not. ``test_pipeline``
    also needs the NumPy 2 shim for scVelo's stochastic-mode velocity (plugin docstring): it
    fails without the flag as well, in ``scv.tl.velocity(adata)``, before any assertion.
    """
    try:
        root = datasets.scvelo_tests()
    except RuntimeError as err:
        pytest.skip(f"scVelo 0.3.4 sdist unavailable: {err}")
    report = tmp_path / "report.json"
    here = str(Path(__file__).parent)
    env = dict(
        os.environ,
        JAXVELO_FLAG_REPORT=str(report),
        JAXVELO_NP2_SHIM="1",
        PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]),
        MPLBACKEND="Agg",
    )
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
           "_jaxvelo_flag_plugin", "--rootdir", str(root), "-W", "ignore",
           "tests/test_basic.py"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert report.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads(report.read_text())
    tests = {k.split("::")[-1]: v for k, v in records.items() if "::" in k}
    assert set(tests) == {"test_einsum", "test_dynamical_model", "test_pipeline"}
    for name, rec in tests.items():
        assert rec.get("outcome") == "passed", (name, rec.get("error"))
    for name in ("test_dynamical_model", "test_pipeline"):
        assert tests[name]["jaxvelo"] >= 1 and tests[name]["upstream"] == 0, tests[name]
    assert proc.returncode == 0, proc.stdout[-3000:]
