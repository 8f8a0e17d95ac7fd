"""One benchmark step in a fresh process: ``python -m bench.child SPEC_JSON``.

The parent (``bench.run``) starts this module with the thread environment variables already set
and ``SPEC_JSON`` naming the role, the CPUs to run on and the file to write the result to. The
first thing done here, before numpy, scVelo or jax are imported, is pinning the process (and so
every thread and worker process it starts) to those CPUs. The result is one JSON line.

Roles
-----
``prepare``      build a tier's preprocessed h5ad (``bench.tiers.prepare``) and store it.
``fit``          load the tier's h5ad (not timed), then call the tool's ``recover_dynamics``
                 ``calls`` times on fresh copies, each call timed; peak RSS; optionally save the
                 first call's result for the concordance step.
``concordance``  ``jaxvelo.concordance.compare(reference, test)`` of two saved fits.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time


# ---------------------------------------------------------------------------------------------
# process measurements (Linux /proc; zeros elsewhere)
# ---------------------------------------------------------------------------------------------
def _status_field(pid: int | str, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for d in entries:
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def memory() -> dict:
    """Peak RSS in MiB of this process, and of its worker processes (loky, for scVelo)."""
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    reaped_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    live_mb = sum(_status_field(p, "VmHWM") for p in _descendants(os.getpid())) / 1024
    return {
        "peak_rss_mb": round(self_mb, 1),
        "peak_rss_children_mb": round(max(reaped_mb, live_mb), 1),
    }


def clean_json(obj):
    """JSON without NaN/inf (as null) and with plain Python numbers."""
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean_json(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, str):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _quiet() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    try:
        import scanpy as sc
        import scvelo as scv

        scv.settings.verbosity = 0
        sc.settings.verbosity = 0
    except ImportError:  # pragma: no cover
        pass


def _write_h5ad(adata, path: str) -> None:
    tmp = f"{path}.part-{os.getpid()}"
    adata.write_h5ad(tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# roles
# ---------------------------------------------------------------------------------------------
def _prepare(spec: dict) -> dict:
    from bench import tiers

    name = spec["tier"]
    if name.endswith("_sibling") and name not in tiers.TIERS:  # --bucket-reuse
        tier = tiers.sibling(tiers.TIERS[name.removesuffix("_sibling")])
    else:
        tier = tiers.TIERS[name]
    t = time.perf_counter()
    adata = tiers.prepare(tier, spec.get("data"))
    seconds = time.perf_counter() - t
    os.makedirs(os.path.dirname(spec["out"]) or ".", exist_ok=True)
    _write_h5ad(adata, spec["out"])
    return {"n_obs": adata.n_obs, "n_vars": adata.n_vars, "seconds": seconds}


def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_tool(name: str):
    """``(recover_dynamics, versions)`` of a tool, with everything imported and initialised."""
    if name == "autozyme":
        import autozyme  # documented use: activate before importing scVelo

        autozyme.activate("scvelo")
    elif name == "scvelo_rs":
        import scvelo_rs.patch  # noqa: F401  (patches scv.tl.recover_dynamics)
    import scvelo as scv

    versions = {d: _version(d) for d in ("scvelo", "numpy", "scipy", "anndata")}
    if name == "jaxvelo":
        import jax

        import jaxvelo

        jax.devices()  # backend start-up counts as import, not as the first run
        versions.update(jaxvelo=jaxvelo.__version__, jax=jax.__version__)
        return jaxvelo.recover_dynamics, versions
    if name in ("autozyme", "scvelo_rs"):
        versions[name] = _version(name.replace("_", "-"))
    elif name != "scvelo":
        raise ValueError(f"unknown tool {name!r}")
    return scv.tl.recover_dynamics, versions


def _cache_entries() -> int | None:
    d = os.environ.get("JAXVELO_CACHE_DIR")
    if not d:
        return None
    return sum(len(files) for _, _, files in os.walk(d))


def _fit(spec: dict) -> dict:
    import anndata
    import numpy as np

    t = time.perf_counter()
    fn, versions = load_tool(spec["tool"])
    _quiet()
    import_s = time.perf_counter() - t
    adata = anndata.read_h5ad(spec["h5ad"])
    loaded_rss = memory()["peak_rss_mb"]
    seconds: dict[str, float] = {}
    n_fitted = None
    for i, label in enumerate(spec["labels"]):
        a = adata.copy()
        t = time.perf_counter()
        fn(a, var_names=spec["var_names"], n_jobs=spec["n_jobs"], show_progress_bar=False)
        seconds[label] = time.perf_counter() - t
        if i == 0:
            n_fitted = int(np.isfinite(a.var["fit_alpha"].to_numpy(float)).sum())
            if spec.get("save_fit"):
                _write_h5ad(a, spec["save_fit"])
        del a
    out = {
        "tool": spec["tool"],
        "versions": versions,
        "seconds": seconds,
        "import_s": import_s,
        "n_obs": adata.n_obs,
        "n_vars": adata.n_vars,
        "n_genes_fitted": n_fitted,
        "loaded_rss_mb": loaded_rss,
        "os_threads": _status_field("self", "Threads") or None,
    }
    if spec["tool"] == "jaxvelo":
        out["cache_entries"] = _cache_entries()
    return out


def _concordance(spec: dict) -> dict:
    import anndata

    from jaxvelo.concordance import compare

    _quiet()
    ref = anndata.read_h5ad(spec["ref"])
    test = anndata.read_h5ad(spec["test"])
    c = compare(ref, test).as_dict()
    c["n_diverging"] = len(c["diverging_genes"])
    c["diverging_genes"] = c["diverging_genes"][:20]
    return c


ROLES = {"prepare": _prepare, "fit": _fit, "concordance": _concordance}


def main(argv: list[str] | None = None) -> int:
    """Run the step described by ``argv[0]`` (JSON) and write its result line."""
    spec = json.loads((sys.argv[1:] if argv is None else argv)[0])
    if spec.get("cpus") and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, spec["cpus"])
    record = {"role": spec["role"], "pid": os.getpid()}
    if hasattr(os, "sched_getaffinity"):
        record["cpus"] = sorted(os.sched_getaffinity(0))
    record.update(ROLES[spec["role"]](spec))
    record.update(memory())
    with open(spec["result"], "w") as f:
        f.write(json.dumps(clean_json(record)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
