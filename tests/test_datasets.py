"""Tests for jaxvelo.datasets (fixture cache, shared-data lookup, preprocessing recipes)."""

from __future__ import annotations

import io
import random
import subprocess
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest

from jaxvelo import datasets


def _fake_sdist(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _fixture_or_skip(name: str) -> Path:
    try:
        return datasets.scvelo_fixture(name)
    except RuntimeError as e:  # pip could not reach the index
        pytest.skip(f"scVelo fixture {name!r} unavailable (pip download failed): {e}")


# ---------------------------------------------------------------------------------------------
# locations
# ---------------------------------------------------------------------------------------------
def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXVELO_DATA_DIR", str(tmp_path / "env"))
    assert datasets.data_dir() == tmp_path / "env"
    assert datasets.data_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("JAXVELO_DATA_DIR")
    assert datasets.data_dir() == Path.home() / ".cache" / "jaxvelo" / "data"


def test_fixture_extraction_from_local_sdist(monkeypatch, tmp_path):
    sdist = _fake_sdist(
        tmp_path / "scvelo-0.3.4.tar.gz",
        {
            "scvelo-0.3.4/tests/_data/pancreas_50obs.h5ad": b"A",
            "scvelo-0.3.4/tests/_data/dentategyrus_50obs.h5ad": b"B",
            "scvelo-0.3.4/tests/_data/test_moments/x/nested.h5ad": b"C",  # not top level
            "scvelo-0.3.4/tests/_data/readme.txt": b"D",
            "scvelo-0.3.4/scvelo/__init__.py": b"E",
        },
    )
    monkeypatch.setenv("JAXVELO_SCVELO_SDIST", str(sdist))
    cache = tmp_path / "cache"
    p = datasets.scvelo_fixture("pancreas_50obs.h5ad", cache_dir=cache)
    assert p == cache / "pancreas_50obs.h5ad" and p.read_bytes() == b"A"
    assert sorted(f.name for f in cache.glob("*.h5ad")) == [
        "dentategyrus_50obs.h5ad",
        "pancreas_50obs.h5ad",
    ]
    # cached now: no sdist needed any more
    monkeypatch.setenv("JAXVELO_SCVELO_SDIST", str(tmp_path / "missing.tar.gz"))
    assert datasets.scvelo_fixture("dentategyrus_50obs", cache_dir=cache).read_bytes() == b"B"
    # unknown names are answered from the manifest, without fetching anything
    with pytest.raises(FileNotFoundError, match="no test fixture 'nested'"):
        datasets.scvelo_fixture("nested", cache_dir=cache)


def test_scvelo_tests_extraction_from_local_sdist(monkeypatch, tmp_path):
    members = {
        "scvelo-0.3.4/tests/__init__.py": b"",
        "scvelo-0.3.4/tests/conftest.py": b"C",
        "scvelo-0.3.4/tests/test_basic.py": b"T",
        "scvelo-0.3.4/tests/core/test_base.py": b"X",  # not needed
        "scvelo-0.3.4/tests/_data/pancreas_50obs.h5ad": b"A",
        "scvelo-0.3.4/tests/_data/test_moments/x/nested.h5ad": b"N",
    }
    sdist = _fake_sdist(tmp_path / "scvelo-0.3.4.tar.gz", members)
    monkeypatch.setenv("JAXVELO_SCVELO_SDIST", str(sdist))
    root = datasets.scvelo_tests(cache_dir=tmp_path / "cache")
    assert root == tmp_path / "cache" / "scvelo-0.3.4-tests"
    files = sorted(str(f.relative_to(root)) for f in root.rglob("*") if f.is_file())
    assert files == [".complete", "tests/__init__.py", "tests/_data/pancreas_50obs.h5ad",
                     "tests/conftest.py", "tests/test_basic.py"]  # fmt: skip
    # cached now: no sdist needed any more
    monkeypatch.setenv("JAXVELO_SCVELO_SDIST", str(tmp_path / "missing.tar.gz"))
    assert datasets.scvelo_tests(cache_dir=tmp_path / "cache") == root
    # an sdist without the test files is refused, nothing left behind
    del members["scvelo-0.3.4/tests/test_basic.py"]
    monkeypatch.setenv("JAXVELO_SCVELO_SDIST", str(_fake_sdist(tmp_path / "b.tar.gz", members)))
    with pytest.raises(RuntimeError, match="test_basic.py"):
        datasets.scvelo_tests(cache_dir=tmp_path / "other")
    assert list((tmp_path / "other").iterdir()) == []


def test_fixture_pip_failure_message(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXVELO_SCVELO_SDIST", raising=False)
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version\n")

    monkeypatch.setattr(datasets.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="pip could not download the scVelo 0.3.4 sdist"):
        datasets.scvelo_fixture("pancreas_100obs", cache_dir=tmp_path)
    (cmd,) = calls
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in cmd and ":all:" in cmd and "scvelo==0.3.4" in cmd


def test_shared_data_path_env(monkeypatch, tmp_path):
    f = tmp_path / "p.h5ad"
    f.write_bytes(b"")
    monkeypatch.setenv("JAXVELO_PANCREAS", str(f))
    assert datasets.shared_data_path() == f
    monkeypatch.setenv("JAXVELO_PANCREAS", str(tmp_path / "missing.h5ad"))
    with pytest.warns(UserWarning, match="JAXVELO_PANCREAS"):
        assert datasets.shared_data_path() is None


def test_shared_data_path_walks_up_from_cwd(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXVELO_PANCREAS", raising=False)
    target = tmp_path / "shared" / "data" / datasets.PANCREAS_FILENAME
    target.parent.mkdir(parents=True)
    target.write_bytes(b"")
    work = tmp_path / "main" / "sub"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    # pretend the package lives somewhere without a shared/ above it
    elsewhere = Path("/nonexistent-jaxvelo-pkg") / "jaxvelo"  # no shared/ above it
    monkeypatch.setattr(datasets, "__file__", str(elsewhere / "datasets.py"))
    assert datasets.shared_data_path() == target
    # and from the package's location when cwd has nothing
    monkeypatch.setattr(datasets, "__file__", str(tmp_path / "main" / "jaxvelo" / "datasets.py"))
    monkeypatch.chdir(tmp_path.parent)
    assert datasets.shared_data_path() == target


# ---------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------
def test_simulated_ground_truth_and_moments():
    np.random.seed(123)  # noqa: NPY002
    random.seed(123)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()  # noqa: NPY002
    adata = datasets.simulated(200, 6, seed=3)
    assert np.array_equal(np.random.get_state()[1], np_before)  # noqa: NPY002
    assert random.getstate() == py_before

    rng = np.random.default_rng(3)
    alpha = rng.lognormal(np.log(5.0), 0.5, 6)
    beta = rng.lognormal(np.log(0.3), 0.5, 6)
    gamma = rng.lognormal(np.log(0.12), 0.5, 6)
    np.testing.assert_array_equal(adata.var["true_alpha"], alpha)
    np.testing.assert_array_equal(adata.var["true_beta"], beta)
    np.testing.assert_array_equal(adata.var["true_gamma"], gamma)
    np.testing.assert_array_equal(adata.var["true_scaling"], 1.0)
    assert adata.var["true_t_"].nunique() > 1  # per-gene switches were used
    assert adata.obs["true_t"].max() == pytest.approx(25.0)
    assert adata.layers["Ms"].dtype == np.float32 and adata.layers["Mu"].dtype == np.float32
    assert adata.layers["Ms"].shape == (200, 6)
    assert adata.uns["neighbors"]["params"]["n_neighbors"] == 30
    assert adata.uns["neighbors"]["params"]["method"] == "sklearn"
    # deterministic
    again = datasets.simulated(200, 6, seed=3)
    np.testing.assert_array_equal(again.layers["Ms"], adata.layers["Ms"])


def test_simulated_rejects_ambiguous_shape():
    with pytest.raises(ValueError, match="ambiguous"):
        datasets.simulated(100, 100)


def test_simulated_exact_neighbours_above_4096_cells():
    adata = datasets.simulated(4200, 3, seed=0)
    deg = np.diff(adata.obsp["distances"].indptr)  # exact zeros (duplicate cells) are dropped
    assert adata.n_obs == 4200 and deg.max() == 29 and np.mean(deg == 29) > 0.9
    assert adata.uns["neighbors"]["params"]["method"] == "sklearn"


def test_recipes_restore_verbosity():
    import scanpy as sc
    import scvelo as scv

    scv.settings.verbosity, sc.settings.verbosity = 3, 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # chatter must not escape
        datasets.simulated(80, 4, seed=1)
    assert scv.settings.verbosity == 3 and sc.settings.verbosity == 2


@pytest.mark.slow
def test_scvelo_fixture_download():
    p = _fixture_or_skip("pancreas_100obs")
    assert p.is_file() and p.stat().st_size > 1_000_000
    assert datasets.scvelo_fixture("pancreas_100obs_preprocessed").is_file()


@pytest.mark.slow
def test_fixture_recipe():
    _fixture_or_skip("pancreas_100obs")
    adata = datasets.fixture("pancreas_100obs")
    assert adata.n_obs == 100 and adata.n_vars > 100
    assert adata.layers["Ms"].dtype == np.float32 and adata.layers["Mu"].dtype == np.float32
    assert "connectivities" in adata.obsp and "log1p" in adata.uns
    assert adata.uns["neighbors"]["params"]["n_neighbors"] == 30


_PANCREAS = datasets.shared_data_path()
_needs_pancreas = pytest.mark.skipif(
    _PANCREAS is None,
    reason="pancreas_3696.h5ad not found (set JAXVELO_PANCREAS or provide ../shared/data)",
)


@pytest.mark.shared
@_needs_pancreas
def test_pancreas_small_tier():
    adata = datasets.pancreas(n_obs=1500)
    assert adata.n_obs == 1500
    assert adata.layers["Ms"].dtype == np.float32 and adata.layers["Mu"].dtype == np.float32
    import anndata

    names = anndata.read_h5ad(_PANCREAS, backed="r").obs_names
    idx = np.sort(np.random.default_rng(0).choice(len(names), 1500, replace=False))
    assert list(adata.obs_names) == list(names[idx])


@pytest.mark.shared
@_needs_pancreas
def test_pancreas_full_gene_count():
    adata = datasets.pancreas()
    assert adata.shape == (3696, 1126)  # shared/data/README.md
