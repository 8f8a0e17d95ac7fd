"""The benchmark tiers: which data, how many cells and genes, which genes are fitted.

Each tier is preprocessed once (by :func:`prepare`, in a subprocess) and stored as an h5ad file
in the tier cache, so that every run, tool and thread count reads the same file. The cache file
name carries a fingerprint of everything the data depends on (the recipe version, the tier's
sizes and seed, and for the pancreas tiers the input file's path, size and modification time).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = ["RECIPE_VERSION", "SEED", "TIERS", "Tier", "cache_path", "prepare", "public", "resolve",
           "sibling"]  # fmt: skip

RECIPE_VERSION = 1  # bump when a recipe changes: old cache files are then ignored
SEED = 0  # simulated tiers: jaxvelo.datasets.simulated(n_obs, n_vars, seed=SEED)


@dataclass(frozen=True)
class Tier:
    """One benchmark dataset.

    ``source`` is ``"pancreas"`` (the shared pancreas counts; ``n_obs=None`` keeps all cells,
    otherwise the seeded subset of ``jaxvelo.datasets.pancreas``), ``"fixture"`` (scVelo 0.3.4's
    raw ``pancreas_100obs`` test fixture from its sdist, ``jaxvelo.datasets.fixture``:
    ``filter_and_normalize(min_shared_counts=5)``, ``log1p``, ``moments(30, 30)``, the speed
    issue's small-data case, where scVelo is overhead-bound) or ``"simulated"``
    (``jaxvelo.datasets.simulated(n_obs, n_vars, seed=SEED)``). ``var_names`` is what
    ``recover_dynamics`` is asked to fit. ``hidden`` tiers (for tests) are not part of ``all``.
    """

    name: str
    source: str
    n_obs: int | None
    n_vars: int | None
    var_names: str
    description: str
    hidden: bool = False

    @property
    def cells(self) -> int:
        """Number of cells (the full pancreas has 3696)."""
        return self.n_obs if self.n_obs is not None else 3696

    def as_dict(self) -> dict:
        d = asdict(self)
        d["cells"] = self.cells
        return d


TIERS: dict[str, Tier] = {
    t.name: t
    for t in (
        Tier("fixture", "fixture", 100, None, "velocity_genes",
             "scVelo 0.3.4's raw pancreas_100obs fixture (sdist); filter_and_normalize(5), "
             "log1p, moments(30, 30); velocity genes"),
        Tier("small", "pancreas", 1500, None, "velocity_genes",
             "pancreas, seeded 1500-cell subset; filter_and_normalize(20), log1p, "
             "moments(30, 30); velocity genes"),
        Tier("medium", "pancreas", None, None, "velocity_genes",
             "pancreas, all 3696 cells; same recipe; velocity genes"),
        Tier("large", "simulated", 9815, 200, "all",
             "scvelo.datasets.simulation, 9815 cells x 200 genes; all genes"),
        Tier("ood_large", "simulated", 5780, 200, "all",
             "scvelo.datasets.simulation, 5780 cells x 200 genes; all genes"),
        Tier("xlarge", "simulated", 50_000, 20, "all",
             "scvelo.datasets.simulation, 50000 cells x 20 genes; all genes"),
        Tier("tiny", "simulated", 200, 6, "all",
             "scvelo.datasets.simulation, 200 cells x 6 genes; all genes (tests only)",
             hidden=True),
    )
}  # fmt: skip


def public() -> list[str]:
    """Names of the tiers that ``--tier all`` runs, in order of size."""
    return [name for name, t in TIERS.items() if not t.hidden]


def resolve(spec: str) -> list[Tier]:
    """Tiers named by ``spec``: ``"all"`` or a comma-separated list (order kept, no repeats)."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        for name in public() if part == "all" else [part]:
            if name not in TIERS:
                raise ValueError(
                    f"unknown tier {name!r}; choose from {', '.join(public())} or 'all'"
                )
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError("no tier given")
    return [TIERS[n] for n in names]


def sibling(tier: Tier) -> Tier | None:
    """Another dataset of ``tier``'s source in the same cell-count bucket
    (:func:`jaxvelo.core.batch.size_bucket`): ~2% fewer cells (a different seeded pancreas
    subset, or a smaller simulation) -- for ``--bucket-reuse``, which times a cold call from
    a compilation cache that only this sibling filled. None for the fixed fixture, or where
    the bucket holds no other count."""
    from jaxvelo.core.batch import size_bucket

    if tier.source == "fixture":
        return None
    n = tier.cells
    b = size_bucket(n)
    m = n - max(1, n // 50)
    while m < n and size_bucket(m) != b:
        m += 1
    if m >= n:
        return None
    what = "seeded pancreas subset" if tier.source == "pancreas" else "simulation"
    desc = f"{tier.description} -- as a {m}-cell {what} (same size bucket)"
    return replace(tier, name=f"{tier.name}_sibling", n_obs=m, hidden=True, description=desc)


def _fingerprint(tier: Tier, data: Path | None) -> str:
    parts = [f"recipe={RECIPE_VERSION}", f"seed={SEED}", repr(sorted(asdict(tier).items()))]
    try:
        parts.append("scvelo=" + importlib.metadata.version("scvelo"))
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        pass
    if tier.source == "pancreas":
        if data is None:
            raise ValueError(f"tier {tier.name!r} needs the pancreas counts (--data)")
        st = Path(data).stat()
        parts += [str(Path(data).resolve()), str(st.st_size), str(st.st_mtime_ns)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def cache_path(tier: Tier, cache_dir: str | os.PathLike, data: Path | None = None) -> Path:
    """Where the preprocessed ``tier`` is (or will be) stored inside ``cache_dir``."""
    return Path(cache_dir) / f"{tier.name}-{_fingerprint(tier, data)}.h5ad"


def prepare(tier: Tier, data: str | os.PathLike | None = None) -> AnnData:
    """Build the preprocessed AnnData of ``tier`` (``data``: the raw pancreas h5ad)."""
    from jaxvelo import datasets

    if tier.source == "pancreas":
        return datasets.pancreas(n_obs=tier.n_obs, path=data)
    if tier.source == "fixture":
        return datasets.fixture("pancreas_100obs", min_shared_counts=5)
    if tier.source == "simulated":
        return datasets.simulated(tier.n_obs, tier.n_vars, seed=SEED)
    raise ValueError(f"unknown source {tier.source!r}")  # pragma: no cover
