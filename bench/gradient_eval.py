"""Measure the gradient mode against scVelo and jaxvelo's exact mode (docs/gradient.md).

``python -m bench.gradient_eval [--cells 3000] [--genes 200] [--pancreas PATH] [--out DIR]``

1. Ground truth: ``jaxvelo.datasets.simulated(cells, genes, seed=0)`` (scVelo's simulation with
   per-gene rates and switch times; ``var["true_*"]``, ``obs["true_t"]``). scVelo 0.3.4
   (``n_jobs`` = all CPUs), the exact mode and the gradient mode fit all genes. Per gene:
   Spearman of ``layers["fit_t"]`` with the true time, ``|log|`` error of ``gamma / beta``
   (``fit_gamma / fit_beta`` against ``true_gamma / true_beta``: free of the time unit, which
   the model cannot identify), and of ``beta`` and ``gamma`` after putting each gene's fitted
   time on the true time's unit (factor ``true_t_ / fit_t_``, the same for both rates).
2. The real pancreas (``--pancreas``, default ``../shared/data/pancreas_3696.h5ad`` when
   present; velocity genes): median ``fit_likelihood``; velocities
   (``scv.tl.velocity(mode="dynamical")``) and latent time compared with scVelo's.
3. Runtimes: each jaxvelo mode's first call in this process (a fresh, empty program cache,
   so including compilation) and a second, warm call; scVelo's one call. Same process, same
   cores, one after the other.

Writes ``results.json``, ``results.md`` and PNG figures to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path


def _fit_times(fn, adata, calls: int = 2):
    """Fit fresh copies ``calls`` times; the first fitted copy and the wall times."""
    out, times = None, []
    for _ in range(calls):
        a = adata.copy()
        t0 = time.perf_counter()
        fn(a)
        times.append(time.perf_counter() - t0)
        out = out if out is not None else a
    return out, times


def _per_gene_truth(fit, truth):
    import numpy as np
    from scipy.stats import spearmanr

    g = np.flatnonzero(fit.var["fit_alpha"].notna().values)
    true_t = truth.obs["true_t"].values
    rho = np.array([spearmanr(fit.layers["fit_t"][:, j], true_t)[0] for j in g])
    v, tv = fit.var.iloc[g], truth.var.iloc[g]
    ratio = np.abs(np.log((v.fit_gamma / v.fit_beta).values
                          / (tv.true_gamma / tv.true_beta).values))  # fmt: skip
    k = (tv.true_t_ / v.fit_t_).values  # fitted time unit -> true unit, per gene
    beta = np.abs(np.log(v.fit_beta.values / k / tv.true_beta.values))
    gamma = np.abs(np.log(v.fit_gamma.values / k / tv.true_gamma.values))
    return {"genes": g.tolist(), "spearman_t": rho.tolist(), "logerr_ratio": ratio.tolist(),
            "logerr_beta": beta.tolist(), "logerr_gamma": gamma.tolist()}  # fmt: skip


def _summary(d: dict) -> dict:
    import numpy as np

    return {k: float(np.nanmedian(v)) for k, v in d.items() if k != "genes"}


def _velocity_compare(ref, test):
    """Velocity (dynamical) and latent-time agreement of ``test`` with ``ref``."""
    import numpy as np
    import scvelo as scv
    from scipy.stats import pearsonr, spearmanr

    out = {}
    for a in (ref, test):
        scv.tl.velocity(a, mode="dynamical")
        scv.tl.velocity_graph(a, n_jobs=1, show_progress_bar=False)
        scv.tl.latent_time(a)
    genes = np.flatnonzero(ref.var["velocity_genes"].values & test.var["velocity_genes"].values)
    vr, vt = ref.layers["velocity"][:, genes], test.layers["velocity"][:, genes]
    ok = np.isfinite(vr) & np.isfinite(vt)
    out["velocity_genes_both"] = len(genes)
    out["velocity_pearson_all"] = float(pearsonr(vr[ok], vt[ok])[0])
    per = [pearsonr(vr[:, j], vt[:, j])[0] for j in range(len(genes))
           if np.std(vr[:, j]) > 0 and np.std(vt[:, j]) > 0]  # fmt: skip
    out["velocity_pearson_gene_median"] = float(np.median(per))
    out["latent_time_spearman"] = float(
        spearmanr(ref.obs["latent_time"], test.obs["latent_time"])[0]
    )
    return out


def _fitter(name: str, var_names, n_jobs: int):
    """The call that fits a copy: ``scvelo`` (upstream), jaxvelo ``exact`` or ``gradient``."""
    import scvelo as scv

    import jaxvelo

    kw = dict(var_names=var_names, n_jobs=n_jobs, show_progress_bar=False)
    if name == "scvelo":
        return lambda a: scv.tl.recover_dynamics(a, **kw)
    method = "gradient" if name == "gradient" else "scvelo"
    return lambda a: jaxvelo.recover_dynamics(a, method=method, **kw)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gradient_eval", description=__doc__)
    p.add_argument("--cells", type=int, default=3000)
    p.add_argument("--genes", type=int, default=200)
    p.add_argument("--pancreas", default=None, help="raw pancreas_3696.h5ad ('none' skips)")
    p.add_argument("--out", default="bench/results/gradient")
    p.add_argument("--n-jobs", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["JAXVELO_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxvelo-gradeval-")
    warnings.filterwarnings("ignore")

    import numpy as np
    import scvelo as scv

    from jaxvelo import datasets

    scv.settings.verbosity = 0
    nj = args.n_jobs
    fits = {name: _fitter(name, "all", nj) for name in ("scvelo", "exact", "gradient")}
    res: dict = {"cells": args.cells, "genes": args.genes, "n_jobs": nj,
                 "cpus": os.cpu_count(), "simulated": {}, "pancreas": {}}  # fmt: skip
    print(f"simulating {args.cells} x {args.genes} ...", flush=True)
    sim = datasets.simulated(args.cells, args.genes, seed=0)
    fitted = {}
    for name, fn in fits.items():
        print(f"simulated: {name} ...", flush=True)
        fit, times = _fit_times(fn, sim, calls=1 if name == "scvelo" else 2)
        fitted[name] = fit
        truth = _per_gene_truth(fit, sim)
        lik = fit.var["fit_likelihood"].values
        res["simulated"][name] = {"times_s": times, **_summary(truth),
                                  "median_likelihood": float(np.nanmedian(lik)),
                                  "per_gene": truth}  # fmt: skip
        print(f"  {times} {_summary(truth)}", flush=True)

    panc = args.pancreas
    if panc is None:
        cand = Path(__file__).resolve().parents[2] / "shared" / "data" / "pancreas_3696.h5ad"
        panc = str(cand) if cand.exists() else "none"
    if panc != "none":
        a0 = datasets.pancreas(path=panc)
        from scvelo.tools.velocity import Velocity

        velo = Velocity(a0)
        velo.compute_deterministic(perc=[5, 95])
        names = list(a0.var_names[velo._velocity_genes])
        pfits = {}
        for name in ("scvelo", "gradient"):
            print(f"pancreas: {name} ...", flush=True)
            fn = _fitter(name, names, nj)
            fit, times = _fit_times(fn, a0, calls=1 if name == "scvelo" else 2)
            pfits[name] = fit
            lik = fit.var["fit_likelihood"].values
            res["pancreas"][name] = {"times_s": times,
                                     "median_likelihood": float(np.nanmedian(lik)),
                                     "genes": int(np.sum(np.isfinite(lik)))}  # fmt: skip
        ref, test = pfits["scvelo"], pfits["gradient"]
        both = np.isfinite(ref.var.fit_likelihood.values) & np.isfinite(
            test.var.fit_likelihood.values
        )
        res["pancreas"]["frac_genes_likelihood_ge"] = float(
            np.mean(test.var.fit_likelihood.values[both] >= ref.var.fit_likelihood.values[both])
        )
        pairs = [ref.var.fit_likelihood.values[both], test.var.fit_likelihood.values[both]]
        res["pancreas"]["likelihood_pairs"] = [x.tolist() for x in pairs]
        res["pancreas"].update(_velocity_compare(ref, test))

    (out / "results.json").write_text(json.dumps(res, indent=1))
    _figures(res, out)
    (out / "results.md").write_text(_table(res))
    print(_table(res))
    return 0


def _table(res: dict) -> str:
    sim = res["simulated"]
    lines = [
        f"Simulated {res['cells']} cells x {res['genes']} genes (seed 0), {res['n_jobs']} jobs:",
        "",
        "| fit | time first / warm (s) | median Spearman(fit_t, true t) | median abs log err "
        "gamma/beta | beta | gamma | median likelihood |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in sim.items():
        t = " / ".join(f"{x:.1f}" for x in r["times_s"])
        lines.append(f"| {name} | {t} | {r['spearman_t']:.4f} | {r['logerr_ratio']:.4f} | "
                     f"{r['logerr_beta']:.4f} | {r['logerr_gamma']:.4f} | "
                     f"{r['median_likelihood']:.4f} |")  # fmt: skip
    p = res.get("pancreas") or {}
    if p:
        lines += [
            "",
            "Real pancreas (3696 cells, velocity genes):",
            "",
            "| fit | time first / warm (s) | genes | median fit_likelihood |",
            "|---|---|---|---|",
        ]
        for name in ("scvelo", "gradient"):
            r = p[name]
            t = " / ".join(f"{x:.1f}" for x in r["times_s"])
            lines.append(f"| {name} | {t} | {r['genes']} | {r['median_likelihood']:.4f} |")
        lines += [
            "",
            f"- genes with gradient likelihood >= scVelo's: {p['frac_genes_likelihood_ge']:.1%}",
            f"- velocity Pearson with scVelo (all entries, {p['velocity_genes_both']} genes "
            f"velocity genes in both): {p['velocity_pearson_all']:.4f}; per-gene median "
            f"{p['velocity_pearson_gene_median']:.4f}",
            f"- latent time Spearman with scVelo: {p['latent_time_spearman']:.4f}",
        ]
    return "\n".join(lines) + "\n"


def _figures(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sim = res["simulated"]
    fig, ax = plt.subplots(1, 3, figsize=(13, 4))
    ref, gr = sim["scvelo"]["per_gene"], sim["gradient"]["per_gene"]
    common = sorted(set(ref["genes"]) & set(gr["genes"]))
    ir = {g: i for i, g in enumerate(ref["genes"])}
    ig = {g: i for i, g in enumerate(gr["genes"])}
    for k, (key, title) in enumerate([("spearman_t", "Spearman(fit_t, true time)"),
                                      ("logerr_ratio", "|log error| of gamma/beta")]):  # fmt: skip
        x = np.array([ref[key][ir[g]] for g in common])
        y = np.array([gr[key][ig[g]] for g in common])
        ax[k].scatter(x, y, s=6, alpha=0.6)
        lo, hi = np.nanmin([x, y]), np.nanmax([x, y])
        ax[k].plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax[k].set_xlabel("scVelo 0.3.4")
        ax[k].set_ylabel("jaxvelo gradient")
        ax[k].set_title(title + " per gene")
    names = list(sim)
    first = [sim[n]["times_s"][0] for n in names]
    warm = [sim[n]["times_s"][-1] for n in names]
    xs = np.arange(len(names))
    ax[2].bar(xs - 0.2, first, 0.4, label="first call")
    ax[2].bar(xs + 0.2, warm, 0.4, label="warm call")
    ax[2].set_xticks(xs, names)
    ax[2].set_ylabel("seconds")
    ax[2].set_title(f"runtime, {res['cells']} x {res['genes']}, {res['n_jobs']} jobs")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(out / "gradient_simulated.png", dpi=110)
    plt.close(fig)
    p = res.get("pancreas") or {}
    if p:
        x, y = (np.array(v) for v in p["likelihood_pairs"])
        fig, ax = plt.subplots(figsize=(4.5, 4.2))
        ax.scatter(x, y, s=6, alpha=0.6)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_xlabel("scVelo fit_likelihood")
        ax.set_ylabel("gradient fit_likelihood")
        ax.set_title("real pancreas, per gene")
        fig.tight_layout()
        fig.savefig(out / "gradient_pancreas.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
