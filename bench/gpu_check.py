"""The GPU check: the same jaxvelo code on a GPU, timed, and compared with scVelo 0.3.4.

A GPU machine here has no network and no scVelo, and what travels to it is capped (64 MiB),
so the check runs in two places:

``prepare`` (on the CPU host, with scVelo): fit a tier's h5ad with scVelo, then write a slim
copy of the fitted genes (``Ms``/``Mu``, the connectivities, empty count layers) and scVelo's
``fit_*`` columns (and ``fit_t`` unless ``--no-fit-t``) to a folder::

    python -m bench.gpu_check prepare TIER.h5ad OUTDIR/NAME [--var-names all] [--no-fit-t]

``run`` (on the GPU machine): fit the slim copy with ``jaxvelo.recover_dynamics`` once per
``label:batch`` (batch 0: the default size), each timed, and record the concordance with
scVelo's columns per gene (bitwise, within 1e-6 relative, worst) into a JSON file::

    JAXVELO_CACHE_DIR=/tmp/jc python -m bench.gpu_check run OUT.json OUTDIR/NAME first:0 warm:0

(a ``cold`` run is the same command with the cache filled, in a new process).

On the GPU machine of this workplace (Python 3.12, jax with CUDA, numba, no anndata, no
scVelo, no network), what worked (2026-11-27): download the wheels of anndata and its
missing dependencies for CPython 3.12 here (anndata, array-api-compat, legacy-api-wrap,
natsort, scverse-misc, zarr, numcodecs, donfig, google-crc32c; ``pip download --no-deps
--only-binary=:all: --python-version 3.12 ...``) into an ignored ``.whl/``, put the slim
copies into an ignored folder, carry both, ``pip install --no-deps --target /tmp/site
.whl/*.whl`` there and run with ``PYTHONPATH=/tmp/site:$PWD`` (a medium and a 50,000-cell
slim copy, without the medium ``fit_t``, fit the 64 MiB that travels). ``run`` stands in
for scVelo's two helpers that ``recover_dynamics`` imports where scVelo is missing
(:func:`_scvelo_shim`).

``diag`` (either place): how many results of each numerical primitive the fit relies on
differ from numpy's on this backend (1e6 values each), with and without the fit program's
compiler options -- what located the GPU's differences in docs/benchmarks.md ("GPU")::

    python -m bench.gpu_check diag OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def prepare(src: str, dest: str, var_names: str, fit_t: bool) -> None:
    import anndata as ad
    import scipy.sparse as sp
    import scvelo as scv

    adata = ad.read_h5ad(src)
    ref = adata.copy()
    t0 = time.perf_counter()
    scv.tl.recover_dynamics(ref, var_names=var_names, n_jobs=2, show_progress_bar=False)
    seconds = time.perf_counter() - t0
    genes = ref.var_names[np.isfinite(ref.var["fit_alpha"].to_numpy())]
    empty = sp.csr_matrix((adata.n_obs, len(genes)), dtype=np.float32)
    slim = ad.AnnData(empty.copy(), obs=adata.obs[[]].copy(), var=adata.var.loc[genes, []].copy())
    for key in ("Ms", "Mu"):
        slim.layers[key] = np.asarray(adata[:, genes].layers[key])
    slim.layers["spliced"], slim.layers["unspliced"] = empty.copy(), empty.copy()
    slim.obsp["connectivities"] = adata.obsp["connectivities"]
    slim.uns["neighbors"] = adata.uns["neighbors"]
    slim.write_h5ad(f"{dest}_slim.h5ad", compression="gzip")
    cols = [c for c in ref.var.columns if c.startswith("fit_") and c != "fit_r2"]
    extra = {}
    if fit_t:
        extra["fit_t"] = np.asarray(ref[:, genes].layers["fit_t"], np.float64)
    np.savez_compressed(f"{dest}_ref.npz", genes=np.asarray(genes, str), cols=np.asarray(cols),
                        var=ref.var.loc[genes, cols].to_numpy(np.float64), scvelo_s=seconds,
                        **extra)  # fmt: skip
    print(f"scVelo {seconds:.1f} s, {len(genes)} genes -> {dest}_slim.h5ad, {dest}_ref.npz")


def _rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    rel = np.abs(a - b) / np.maximum(np.abs(b), 1e-300)
    rel[(a == b) | (np.isnan(a) & np.isnan(b))] = 0
    return np.where(np.isnan(rel), np.inf, rel)


def gate(adata, ref) -> dict:
    genes, cols = list(ref["genes"]), list(ref["cols"])
    v = adata.var.loc[genes, cols].to_numpy(np.float64)
    worst = _rel(v, ref["var"]).max(1)
    if "fit_t" in ref:
        t = np.asarray(adata[:, genes].layers["fit_t"], np.float64)
        worst = np.maximum(worst, _rel(t, ref["fit_t"]).max(0))
    return {"genes": len(genes), "bitwise": int((worst == 0).sum()),
            "within_1e-6": int((worst <= 1e-6).sum()), "worst_rel": float(worst.max()),
            "fitted_same": bool(np.array_equal(np.isfinite(v[:, 0]),
                                               np.isfinite(ref["var"][:, 0])))}  # fmt: skip


def _scvelo_shim() -> None:
    """Where scVelo is not installed (the GPU machine): the two scVelo 0.3.4 helpers that
    ``jaxvelo.recover_dynamics`` imports, transcribed (``scvelo/core/_parallelize.py``
    ``get_n_jobs``; ``scvelo/preprocessing/moments.py`` ``get_connectivities`` for the
    default call: ``mode="connectivities"``, no neighbour selection or recursion)."""
    try:
        import scvelo  # noqa: F401
    except ImportError:
        pass
    else:
        return
    import types

    def get_n_jobs(n_jobs):
        cpus = os.cpu_count()
        if n_jobs is None or (n_jobs < 0 and cpus + 1 + n_jobs <= 0):
            return 1
        return cpus if n_jobs > cpus else cpus + 1 + n_jobs if n_jobs < 0 else n_jobs

    def get_connectivities(adata, mode="connectivities", n_neighbors=None,
                           recurse_neighbors=False):  # fmt: skip
        if n_neighbors is not None or recurse_neighbors or mode != "connectivities":
            raise NotImplementedError("the GPU check's scVelo shim covers the default call")
        if "neighbors" not in adata.uns.keys():
            return None
        c = adata.obsp[mode] if mode in adata.obsp.keys() else adata.uns["neighbors"][mode]
        c = c > 0
        c.setdiag(1)
        c = c.multiply(1.0 / c.sum(1))
        return c.tocsr().astype(np.float32)

    names = ("scvelo", "scvelo.core", "scvelo.preprocessing", "scvelo.preprocessing.moments")
    mods = {name: types.ModuleType(name) for name in names}
    mods["scvelo.core"].get_n_jobs = get_n_jobs
    mods["scvelo.preprocessing.moments"].get_connectivities = get_connectivities
    sys.modules.update(mods)


def run(out: str, data: str, specs: list[str]) -> None:
    t0 = time.perf_counter()
    _scvelo_shim()
    import anndata as ad
    import jax

    import jaxvelo

    rec = json.load(open(out)) if os.path.exists(out) else {}
    rec.setdefault("env", {"jax": jax.__version__, "backend": jax.default_backend(),
                           "devices": [str(d) for d in jax.devices()],
                           "import_s": time.perf_counter() - t0})  # fmt: skip
    ref = np.load(f"{data}_ref.npz")
    name = os.path.basename(data)
    for spec in specs:
        label, size = spec.split(":")
        adata = ad.read_h5ad(f"{data}_slim.h5ad")
        t0 = time.perf_counter()
        jaxvelo.recover_dynamics(adata, var_names="all", show_progress_bar=False,
                                 batch_size=int(size) or None)  # fmt: skip
        r = {"seconds": time.perf_counter() - t0, "batch_size": int(size) or "default"}
        r.update(gate(adata, ref))
        stats = jax.devices()[0].memory_stats() or {}
        r["peak_device_bytes"] = stats.get("peak_bytes_in_use")
        r["scvelo_cpu_s"] = float(ref["scvelo_s"])
        rec[f"{name}/{label}"] = r
        print(name, label, json.dumps(r), flush=True)
        with open(out, "w") as f:
            json.dump(rec, f, indent=1)


def diag(out: str) -> None:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    from jaxvelo.core import batch, npmath
    from jaxvelo.core import numerics as nm

    opts = batch.COMPILER_OPTIONS

    def comp(f, *args, options=None):
        fn = jax.jit(f).lower(*args).compile(compiler_options=options or {})
        return np.asarray(fn(*args))

    def nd(got, want):
        u = np.dtype(f"u{got.dtype.itemsize}")
        return int((np.atleast_1d(got).view(u) != np.atleast_1d(want).view(u)).sum())

    rng = np.random.default_rng(0)
    n = 1_000_000
    r = {"backend": jax.default_backend()}
    x = rng.uniform(-60, 5, n)
    y = np.exp(rng.uniform(-15, 8, n))
    z = rng.uniform(-0.9, 5, n)
    p = rng.uniform(0.1, 3, n)
    r["exp64"] = nd(comp(jnp.exp, x), np.exp(x))
    r["log64"] = nd(comp(jnp.log, y), np.log(y))
    r["log1p64"] = nd(comp(jnp.log1p, z), np.log1p(z))
    r["expm1_64"] = nd(comp(jnp.expm1, x), np.expm1(x))
    r["sqrt64"] = nd(comp(jnp.sqrt, y), np.sqrt(y))
    r["pow64"] = nd(comp(jnp.power, y, p), np.power(y, p))
    x32 = rng.uniform(-100, 80, n).astype(np.float32)
    y32 = np.exp(rng.uniform(-80, 80, n)).astype(np.float32)
    for tag, o in (("default", None), ("fit_options", opts)):
        r[f"np_exp32_{tag}"] = nd(comp(npmath.np_exp32, x32, options=o), np.exp(x32))
        r[f"np_log32_{tag}"] = nd(comp(npmath.np_log32, y32, options=o), np.log(y32))
        r[f"round32_{tag}"] = nd(comp(lambda v: nm.round32(v * 1.0000001, True), x, options=o),
                                 (x * 1.0000001).astype(np.float32).astype(np.float64))  # fmt: skip
    a, b, c = (rng.standard_normal(n) for _ in range(3))
    a32, b32, c32 = (v.astype(np.float32) for v in (a, b, c))
    r["contracted64"] = nd(comp(lambda a, b, c: a + b * c, a, b, c, options=opts), a + b * c)
    r["fma_barrier64"] = nd(comp(lambda a, b, c: a + nm.fma_barrier(b * c), a, b, c,
                                 options=opts), a + b * c)  # fmt: skip
    r["fma_barrier32"] = nd(comp(lambda a, b, c: a + nm.fma_barrier(b * c), a32, b32, c32,
                                 options=opts), a32 + b32 * c32)  # fmt: skip
    r["plain_div32"] = nd(comp(lambda a, b: a / b, a32, c32, options=opts), a32 / c32)
    r["divide32"] = nd(comp(nm.divide, a32, c32, options=opts), a32 / c32)
    s = rng.standard_normal(4000)
    r["pairwise_sum"] = nd(comp(nm.pairwise_sum, s, np.int32(3999), options=opts),
                           np.add.reduce(s[:3999]))  # fmt: skip
    print(json.dumps(r))
    with open(out, "w") as f:
        json.dump(r, f, indent=1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench.gpu_check", description=__doc__.split("\n")[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("src")
    pp.add_argument("dest", help="path prefix: DEST_slim.h5ad and DEST_ref.npz are written")
    pp.add_argument("--var-names", default="velocity_genes")
    pp.add_argument("--no-fit-t", action="store_true", help="leave fit_t out (smaller)")
    pr = sub.add_parser("run")
    pr.add_argument("out")
    pr.add_argument("data", help="the path prefix given to prepare")
    pr.add_argument("specs", nargs="+", help="label:batch_size (0 = default)")
    pd = sub.add_parser("diag")
    pd.add_argument("out")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.src, args.dest, args.var_names, not args.no_fit_t)
    elif args.cmd == "run":
        run(args.out, args.data, args.specs)
    else:
        diag(args.out)


if __name__ == "__main__":
    sys.exit(main())
