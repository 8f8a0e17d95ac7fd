"""Test and benchmark data: scVelo's own fixtures, the shared pancreas data, simulations.

Nothing here is shipped with the package. scVelo 0.3.4's test fixtures (``tests/_data/*.h5ad``)
are fetched once from the scVelo sdist on PyPI (``pip download``) into a cache directory; the
pancreas data (3696 cells) is found next to the repository (``../shared/data``) or through
``$JAXVELO_PANCREAS``.

The preprocessing recipes return AnnData objects ready for ``recover_dynamics``: moments computed,
``layers["Ms"]``/``layers["Mu"]`` in float32 exactly as ``scvelo.pp.moments`` writes them.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = [
    "SCVELO_SDIST_SPEC",
    "PANCREAS_FILENAME",
    "data_dir",
    "scvelo_fixture",
    "scvelo_tests",
    "shared_data_path",
    "pancreas",
    "preprocess",
    "fixture",
    "simulated",
]

SCVELO_SDIST_SPEC = "scvelo==0.3.4"
PANCREAS_FILENAME = "pancreas_3696.h5ad"
_MANIFEST = "scvelo-0.3.4-fixtures.txt"  # names found in the sdist, written after extraction


# --------------------------------------------------------------------------------------------
# locations
# --------------------------------------------------------------------------------------------
def data_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The fixture cache: ``cache_dir``, else ``$JAXVELO_DATA_DIR``, else ``~/.cache/jaxvelo/data``.

    Returned unresolved and not created.
    """
    if cache_dir is None:
        env = os.environ.get("JAXVELO_DATA_DIR")
        cache_dir = env if env else Path.home() / ".cache" / "jaxvelo" / "data"
    return Path(cache_dir).expanduser()


def _fixture_name(name: str) -> str:
    name = os.path.basename(str(name))
    return name[: -len(".h5ad")] if name.endswith(".h5ad") else name


def _download_sdist(dest: Path) -> Path:
    """``pip download`` scVelo 0.3.4's sdist into ``dest``; returns the tarball's path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        SCVELO_SDIST_SPEC,
        "-d",
        str(dest),
    ]
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(
            f"could not run `{' '.join(cmd)}` to fetch scVelo's test fixtures: {e}"
        ) from e
    tarballs = sorted(dest.glob("scvelo-0.3.4.tar.gz")) or sorted(dest.glob("scvelo-*.tar.gz"))
    if proc.returncode != 0 or not tarballs:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        raise RuntimeError(
            "pip could not download the scVelo 0.3.4 sdist (needed for scVelo's test fixtures "
            "tests/_data/*.h5ad); is PyPI reachable?\n"
            f"command: {' '.join(cmd)}\nexit status: {proc.returncode}\n{tail}\n"
            "Workarounds: set JAXVELO_SCVELO_SDIST to a local scvelo-0.3.4.tar.gz, or put the "
            "fixture files into the cache directory (JAXVELO_DATA_DIR)."
        )
    return tarballs[0]


def _extract_fixtures(tarball: Path, target: Path) -> list[str]:
    """Copy ``<root>/tests/_data/*.h5ad`` (top level only) out of the sdist into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    with tarfile.open(tarball, "r:*") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not (
                member.isfile()
                and len(parts) == 4
                and parts[1:3] == ["tests", "_data"]
                and parts[3].endswith(".h5ad")
            ):
                continue
            fname = os.path.basename(parts[3])  # never trust paths from the archive
            src = tar.extractfile(member)
            if src is None:  # pragma: no cover
                continue
            fd, tmp = tempfile.mkstemp(dir=target, prefix=".part-", suffix=".h5ad")
            try:
                with os.fdopen(fd, "wb") as out, src:
                    shutil.copyfileobj(src, out)
                os.replace(tmp, target / fname)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            names.append(_fixture_name(fname))
    if not names:
        raise RuntimeError(f"no tests/_data/*.h5ad found in {tarball}")
    (target / _MANIFEST).write_text("\n".join(sorted(names)) + "\n")
    return sorted(names)


def scvelo_fixture(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of scVelo 0.3.4's test fixture ``tests/_data/<name>.h5ad``, fetched on first use.

    ``name`` is e.g. ``"pancreas_100obs"``, ``"pancreas_100obs_preprocessed"``,
    ``"dentategyrus_50obs"`` (with or without ``.h5ad``). On a cache miss the scVelo 0.3.4 sdist is
    fetched with ``python -m pip download --no-deps --no-binary :all: scvelo==0.3.4`` (or read from
    ``$JAXVELO_SCVELO_SDIST`` when that names a local tarball), all top-level ``tests/_data/*.h5ad``
    are copied into the cache (see :func:`data_dir`), and the sdist is discarded.

    Raises ``RuntimeError`` when pip cannot download the sdist, ``FileNotFoundError`` when the
    sdist has no fixture of that name.
    """
    name = _fixture_name(name)
    target = data_dir(cache_dir)
    path = target / f"{name}.h5ad"
    if path.is_file():
        return path

    manifest = target / _MANIFEST
    if manifest.is_file():
        known = manifest.read_text().split()
        if name not in known:
            raise FileNotFoundError(
                f"scVelo 0.3.4 has no test fixture {name!r}; available: {', '.join(known)}"
            )

    local = os.environ.get("JAXVELO_SCVELO_SDIST")
    if local:
        names = _extract_fixtures(Path(local).expanduser(), target)
    else:
        with tempfile.TemporaryDirectory(prefix="jaxvelo-sdist-") as tmp:
            names = _extract_fixtures(_download_sdist(Path(tmp)), target)
    if not path.is_file():
        raise FileNotFoundError(
            f"scVelo 0.3.4 has no test fixture {name!r}; available: {', '.join(names)}"
        )
    return path


_TESTS_DIR = "scvelo-0.3.4-tests"
_TEST_FILES = ("__init__.py", "conftest.py", "test_basic.py")


def _extract_tests(tarball: Path, target: Path) -> None:
    """Copy ``tests/{__init__,conftest,test_basic}.py`` and the top-level ``tests/_data/*.h5ad``
    out of the sdist into ``target/tests`` (what scVelo's ``conftest.py`` reads at import)."""
    dest = target / "tests"
    (dest / "_data").mkdir(parents=True, exist_ok=True)
    found: set[str] = set()
    with tarfile.open(tarball, "r:*") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 3 or parts[1] != "tests":
                continue
            if len(parts) == 3 and parts[2] in _TEST_FILES:
                out = dest / parts[2]
            elif len(parts) == 4 and parts[2] == "_data" and parts[3].endswith(".h5ad"):
                out = dest / "_data" / os.path.basename(parts[3])
            else:
                continue
            src = tar.extractfile(member)
            if src is None:  # pragma: no cover
                continue
            with src, open(out, "wb") as f:
                shutil.copyfileobj(src, f)
            found.add(parts[-1])
    missing = [f for f in _TEST_FILES if f not in found]
    if missing:
        raise RuntimeError(f"{tarball} has no tests/{', tests/'.join(missing)}")


def scvelo_tests(cache_dir: str | os.PathLike | None = None) -> Path:
    """A directory holding scVelo 0.3.4's ``tests/test_basic.py`` with its ``conftest.py``.

    Returns the root to run ``pytest tests/test_basic.py`` from (scVelo's ``conftest.py`` reads
    ``tests/_data/*.h5ad`` relative to the working directory). Fetched once like
    :func:`scvelo_fixture` (``$JAXVELO_SCVELO_SDIST`` or ``pip download``) into
    ``<data_dir>/scvelo-0.3.4-tests``; raises ``RuntimeError`` when the sdist is unavailable.
    """
    root = data_dir(cache_dir) / _TESTS_DIR
    marker = root / ".complete"
    if marker.is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".part-", dir=root.parent) as tmp:
        part = Path(tmp) / "root"
        local = os.environ.get("JAXVELO_SCVELO_SDIST")
        if local:
            _extract_tests(Path(local).expanduser(), part)
        else:
            with tempfile.TemporaryDirectory(prefix="jaxvelo-sdist-") as dl:
                _extract_tests(_download_sdist(Path(dl)), part)
        (part / ".complete").write_text(SCVELO_SDIST_SPEC + "\n")
        if root.exists():  # an interrupted earlier attempt
            shutil.rmtree(root)
        os.replace(part, root)
    return root


def _ancestors(start: Path) -> Iterator[Path]:
    start = start.resolve()
    yield start
    yield from start.parents


def shared_data_path() -> Path | None:
    """Where ``pancreas_3696.h5ad`` is, or ``None``.

    ``$JAXVELO_PANCREAS`` when set (``None`` with a warning if it names no file); otherwise
    ``shared/data/pancreas_3696.h5ad`` in the nearest directory above this file or above the
    working directory that has one (for a checkout at ``<root>/main`` that is
    ``<root>/shared/data``, i.e. ``../shared/data`` relative to the repository root).
    """
    env = os.environ.get("JAXVELO_PANCREAS")
    if env:
        p = Path(env).expanduser()
        if p.is_file():
            return p
        warnings.warn(f"JAXVELO_PANCREAS={env!r} is not a file", stacklevel=2)
        return None
    for start in (Path(__file__).parent, Path.cwd()):
        for d in _ancestors(start):
            p = d / "shared" / "data" / PANCREAS_FILENAME
            if p.is_file():
                return p
    return None


# --------------------------------------------------------------------------------------------
# recipes
# --------------------------------------------------------------------------------------------
_CHATTER = (DeprecationWarning, FutureWarning, UserWarning)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence scVelo / scanpy logging and their deprecation chatter; restore afterwards."""
    import scanpy as sc
    import scvelo as scv

    scv_verbosity, sc_verbosity = scv.settings.verbosity, sc.settings.verbosity
    scv.settings.verbosity = 0
    sc.settings.verbosity = 0
    try:
        with warnings.catch_warnings():
            # scVelo's ``deprecated_arg_names`` decorator rewrites the global filters on every
            # call (simplefilter "always"/"default" for DeprecationWarning), so filters alone do
            # not hold; drop the chatter at ``showwarning`` too. catch_warnings restores both.
            for cat in _CHATTER:
                warnings.simplefilter("ignore", cat)
            shown = warnings.showwarning

            def _showwarning(message, category, *args, **kwargs):
                if not issubclass(category, _CHATTER):
                    shown(message, category, *args, **kwargs)

            warnings.showwarning = _showwarning
            yield
    finally:
        scv.settings.verbosity = scv_verbosity
        sc.settings.verbosity = sc_verbosity


def _preprocess(adata: AnnData, min_shared_counts: int) -> AnnData:
    """``filter_and_normalize`` -> ``log1p`` -> ``moments(n_pcs=30, n_neighbors=30)``."""
    import scanpy as sc
    import scvelo as scv

    scv.pp.filter_and_normalize(adata, min_shared_counts=min_shared_counts)
    sc.pp.log1p(adata)
    scv.pp.moments(adata, n_pcs=30, n_neighbors=30)
    return adata


def preprocess(adata: AnnData, min_shared_counts: int = 20) -> AnnData:
    """scVelo's standard recipe on raw counts: ``filter_and_normalize``, ``log1p``,
    ``moments(n_pcs=30, n_neighbors=30)`` (as for the benchmark tiers)."""
    return _preprocess(adata, min_shared_counts)


def pancreas(n_obs: int | None = None, path: str | os.PathLike | None = None) -> AnnData:
    """The pancreas benchmark tiers of ``shared/data/README.md``, preprocessed.

    ``n_obs=None``: all 3696 cells (medium tier); ``n_obs=1500``: the small tier, cells
    ``np.sort(np.random.default_rng(0).choice(3696, n_obs, replace=False))``. Then
    ``filter_and_normalize(min_shared_counts=20)``, ``sc.pp.log1p``,
    ``moments(n_pcs=30, n_neighbors=30)``.
    """
    import anndata

    if path is None:
        path = shared_data_path()
        if path is None:
            raise FileNotFoundError(
                f"{PANCREAS_FILENAME} not found: set JAXVELO_PANCREAS or put it in "
                "../shared/data relative to the repository root"
            )
    with _quiet():
        adata = anndata.read_h5ad(path)
        if n_obs is not None:
            if not 0 < n_obs <= adata.n_obs:
                raise ValueError(f"n_obs must be in 1..{adata.n_obs}, got {n_obs}")
            if n_obs < adata.n_obs:
                idx = np.sort(np.random.default_rng(0).choice(adata.n_obs, n_obs, replace=False))
                adata = adata[idx].copy()
        return _preprocess(adata, min_shared_counts=20)


def fixture(
    name: str = "pancreas_100obs",
    min_shared_counts: int = 5,
    cache_dir: str | os.PathLike | None = None,
) -> AnnData:
    """A raw scVelo fixture (see :func:`scvelo_fixture`), preprocessed.

    ``filter_and_normalize(min_shared_counts=min_shared_counts)``, ``sc.pp.log1p``,
    ``moments(n_pcs=30, n_neighbors=30)``. (The ``*_preprocessed`` fixtures are read as they are.)
    """
    import anndata

    path = scvelo_fixture(name, cache_dir=cache_dir)
    with _quiet():
        adata = anndata.read_h5ad(path)
        if _fixture_name(name).endswith("_preprocessed"):
            return adata
        return _preprocess(adata, min_shared_counts=min_shared_counts)


def simulated(n_obs: int, n_vars: int, seed: int = 0) -> AnnData:
    """``scvelo.datasets.simulation`` with per-gene kinetics, neighbours and moments.

    Per gene, from ``np.random.default_rng(seed)`` in this order: alpha ~ logN(log 5, 0.5),
    beta ~ logN(log 0.3, 0.5), gamma ~ logN(log 0.12, 0.5), switch fraction ~ U(0.1, 0.9).
    ``simulation(n_obs, n_vars, t_max=25, ..., noise_level=1, random_seed=seed)`` keeps the
    ground truth in ``var`` (``true_t_``, ``true_alpha``, ``true_beta``, ``true_gamma``,
    ``true_scaling``) and ``obs["true_t"]``. Then ``scv.pp.neighbors(n_neighbors=30,
    method="sklearn")`` (exact; scanpy's default approximate search breaks above 4096 cells with
    scipy 1.17) and ``scv.pp.moments(n_neighbors=30)``.

    The simulation seeds NumPy's and Python's global generators; their states are restored.
    ``n_obs == n_vars`` is refused: scVelo would read per-gene arrays of length ``n_obs`` as
    per-cell values. With very few genes the sklearn path can hit an upstream bug (cell 0 with an
    exact duplicate); that is reported as ``ValueError``.
    """
    import scvelo as scv

    if n_obs == n_vars:
        raise ValueError(
            "n_obs == n_vars is ambiguous for scvelo.datasets.simulation (per-gene arrays of "
            "length n_obs are taken as per-cell values)"
        )
    if n_obs <= 30:
        raise ValueError("n_obs must exceed n_neighbors=30")
    rng = np.random.default_rng(seed)
    alpha = rng.lognormal(np.log(5.0), 0.5, n_vars)
    beta = rng.lognormal(np.log(0.3), 0.5, n_vars)
    gamma = rng.lognormal(np.log(0.12), 0.5, n_vars)
    switches = rng.uniform(0.1, 0.9, n_vars)

    np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        with _quiet():
            adata = scv.datasets.simulation(
                n_obs=n_obs,
                n_vars=n_vars,
                t_max=25,
                alpha=alpha,
                beta=beta,
                gamma=gamma,
                switches=switches,
                noise_level=1,
                random_seed=seed,
            )
            adata.var_names = [f"gene_{i}" for i in range(n_vars)]
            adata.obs_names = [f"cell_{i}" for i in range(n_obs)]
            try:
                scv.pp.neighbors(adata, n_neighbors=30, method="sklearn")
            except IndexError as e:
                # scVelo's set_diagonal only prepends the self-neighbour when cell 0's nearest
                # neighbour is at a nonzero distance; an exact duplicate of cell 0 (common with
                # very few genes, where noise is clipped to 0) leaves 29 columns -> IndexError.
                raise ValueError(
                    "scv.pp.neighbors(method='sklearn') failed: cell 0 has an exact duplicate "
                    f"in the simulated data (try more genes or another seed): {e}"
                ) from e
            scv.pp.moments(adata, n_neighbors=30)
    finally:
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)
    return adata
