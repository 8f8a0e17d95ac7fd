"""Audit of upstream scVelo 0.3.4 ``recover_dynamics``: which dtype each step runs in.

Instruments (monkeypatches, nothing installed is edited) ``DynamicsRecovery`` (initialize,
initialize_scaling, every Nelder-Mead stage, ``update``), ``minimize`` as imported by
``scvelo.tools._em_model_core``, ``compute_divergence`` / ``assign_tau`` in
``scvelo.tools._em_model_utils`` and the connectivities matrix handed to the fits (a proxy whose
``dot`` records dtypes), then runs the default ``scv.tl.recover_dynamics(adata)`` on

* ``fixture``: scVelo's raw ``pancreas_100obs`` fixture through ``jaxvelo.datasets.fixture``;
* ``pancreas1500``: the 1500-cell pancreas tier (``jaxvelo.datasets.pancreas(1500)``).

Also times an uninstrumented ``recover_dynamics(adata, n_jobs=1)`` on a fresh copy and checks
that the instrumented run wrote bitwise the same results.

    python bench/audit_precision.py [--datasets fixture,pancreas1500] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

STAGES = [
    "fit_t_and_alpha",
    "fit_scaling_",
    "fit_rates",
    "fit_t_",
    "fit_t_and_rates",
    "fit_t_and_rates(refit_time=False)",
]
VARS = ["alpha", "beta", "gamma", "scaling", "t_"]


def tname(x) -> str:
    """'f32', 'f64', 'int', 'pyfloat', or the numpy dtype / type name."""
    if isinstance(x, bool | np.bool_):
        return "bool"
    if isinstance(x, int):
        return "int"
    if isinstance(x, float) and not isinstance(x, np.floating):
        return "pyfloat"
    dt = getattr(x, "dtype", None)
    if dt is None:
        return type(x).__name__
    return {"float32": "f32", "float64": "f64"}.get(dt.name, dt.name)


def arr_t(x) -> str:
    d = np.asarray(x).dtype.name
    return {"float32": "f32", "float64": "f64"}.get(d, d)


# ---------------------------------------------------------------------------------------------
# recorder
# ---------------------------------------------------------------------------------------------
class Recorder:
    def __init__(self, conn_checks: int = 150):
        self.genes: list[dict] = []
        self.gene: dict | None = None
        self.stage = "outside"
        self.phase = ""
        self.cd_stack: list[dict] = []
        self.cd_counts: collections.Counter = collections.Counter()
        self.dot_counts: collections.Counter = collections.Counter()
        self.conn_checks = conn_checks
        self.dot_checks: collections.Counter = collections.Counter()
        self.n_unspliced = 0

    def label(self) -> str:
        return self.stage + (f":{self.phase}" if self.phase else "")


R = Recorder()


def snapshot(dm) -> dict:
    out = {v: tname(getattr(dm, v, None)) for v in VARS}
    out["u0_"], out["s0_"] = tname(dm.u0_), tname(dm.s0_)
    return out


class ConnProxy:
    """Wraps the float32 connectivities; records dtypes of every ``dot`` and checks how it sums."""

    def __init__(self, conn):
        self.conn = conn
        self.conn64 = conn.astype(np.float64)
        csr = conn.tocsr()
        csr.sort_indices()
        nnz = np.diff(csr.indptr)
        k = int(nnz.max())
        self.pad_idx = np.zeros((csr.shape[0], k), dtype=np.int64)
        self.pad_val = np.zeros((csr.shape[0], k), dtype=np.float32)
        for i in range(csr.shape[0]):
            a, b = csr.indptr[i], csr.indptr[i + 1]
            self.pad_idx[i, : b - a] = csr.indices[a:b]
            self.pad_val[i, : b - a] = csr.data[a:b]
        self.nnz = nnz

    def __getattr__(self, name):
        return getattr(self.conn, name)

    def _seq_f32(self, x):
        """Row sums accumulated in float32, in ascending column order: y += a*x (no FMA)."""
        x = np.asarray(x, dtype=np.float32)
        x2 = x.reshape(x.shape[0], -1)
        acc = np.zeros((self.pad_idx.shape[0], x2.shape[1]), dtype=np.float32)
        for k in range(self.pad_idx.shape[1]):
            live = k < self.nnz
            term = self.pad_val[live, k][:, None] * x2[self.pad_idx[live, k]]
            acc[live] = acc[live] + term
        return acc.reshape((acc.shape[0],) + x.shape[1:])

    def dot(self, x):
        out = self.conn.dot(x)
        ctx = R.cd_stack[-1]["ctx"] if R.cd_stack else "final conn.dot(T)"
        key = (ctx, arr_t(x), arr_t(out))
        R.dot_counts[key] += 1
        dt = arr_t(x)
        if R.dot_checks[dt] < R.conn_checks and np.asarray(x).ndim == 2:
            R.dot_checks[dt] += 1
            x64 = np.asarray(x, dtype=np.float64)
            ref64 = self.conn64.dot(x64)
            fin = np.isfinite(out)
            res = {
                "eq_f64_accum_then_cast": bool(
                    np.array_equal(out[fin], ref64.astype(out.dtype)[fin])
                ),
            }
            if dt == "f32":
                seq = self._seq_f32(x)
                res["eq_f32_sequential_accum"] = bool(np.array_equal(out[fin], seq[fin]))
            R.dot_checks[(dt, tuple(sorted(res.items())))] += 1
        return out


def install() -> list[tuple[object, str, object]]:
    """Patches upstream in place; returns (owner, name, original) triples for ``uninstall``."""
    import scvelo.tools._em_model_core as core
    import scvelo.tools._em_model_utils as utils

    DR = core.DynamicsRecovery
    names = {
        core: ["get_connectivities", "minimize", "unspliced"],
        utils: ["compute_divergence", "assign_tau"],
        DR: [
            "__init__",
            "initialize",
            "get_time_assignment",
            "initialize_scaling",
            "fit",
            "update",
            "get_dists",
            "fit_t_and_alpha",
            "fit_scaling_",
            "fit_rates",
            "fit_t_",
            "fit_t_and_rates",
        ],
    }
    _missing = object()  # inherited (BaseDynamics) methods: delete the override afterwards
    saved = [(o, n, o.__dict__.get(n, _missing)) for o, ns in names.items() for n in ns]

    # --- connectivities proxy ----------------------------------------------------------------
    orig_get_conn = core.get_connectivities

    def get_connectivities(adata, *a, **k):
        c = orig_get_conn(adata, *a, **k)
        return None if c is None else ConnProxy(c)

    core.get_connectivities = get_connectivities

    # --- per-gene lifecycle ------------------------------------------------------------------
    orig_init = DR.__init__

    def __init__(self, adata, gene, *a, **k):
        R.gene = {"gene": str(gene), "stages": {}, "updates": [], "cd_first": None}
        R.genes.append(R.gene)
        R.stage, R.phase = "initialize", ""
        orig_init(self, adata, gene, *a, **k)
        R.stage, R.phase = "after_init", ""

    DR.__init__ = __init__

    orig_initialize = DR.initialize

    def initialize(self):
        orig_initialize(self)
        g = R.gene
        g["init_after"] = snapshot(self)
        g["init_after"]["std_u"], g["init_after"]["std_s"] = tname(self.std_u), tname(self.std_s)
        g["init_after"]["steady_state_ratio"] = tname(self.steady_state_ratio)
        g["pval_steady_branch"] = bool(self.pval_steady < 1e-3)

    DR.initialize = initialize

    orig_gta = DR.get_time_assignment

    def get_time_assignment(self, *a, **k):
        g = R.gene
        if R.stage == "initialize" and "init_before_scaling" not in g:
            # the values initialize() just set, before its first time assignment
            snap = snapshot(self)
            snap["std_u"], snap["std_s"] = tname(self.std_u), tname(self.std_s)
            snap["u/scaling"] = arr_t(self.u / self.scaling)
            g["init_before_scaling"] = snap
            out = orig_gta(self, *a, **k)
            g["first_assignment_t"] = arr_t(out[0])
            return out
        return orig_gta(self, *a, **k)

    DR.get_time_assignment = get_time_assignment

    orig_init_scaling = DR.initialize_scaling

    def initialize_scaling(self, sight=0.5):
        R.stage, R.phase = f"initialize_scaling({sight})", "linspace"
        try:
            return orig_init_scaling(self, sight=sight)
        finally:
            R.stage, R.phase = "initialize", ""

    DR.initialize_scaling = initialize_scaling

    def wrap_stage(name):
        orig = getattr(DR, name)

        def stage(self, **kwargs):
            label = name + ("(refit_time=False)" if kwargs.get("refit_time") is False else "")
            R.stage, R.phase = label, ("linspace" if name == "fit_t_and_alpha" else "")
            R.gene["stages"][label] = {"state_before": snapshot(self)}
            try:
                return orig(self, **kwargs)
            finally:
                R.gene["stages"][label]["state_after"] = snapshot(self)
                R.stage = {
                    "fit_t_and_rates": "update(adjust_t_=False)",
                    "fit_t_and_rates(refit_time=False)": "final update()",
                }.get(label, "between")
                R.phase = ""

        setattr(DR, name, stage)

    for n in ["fit_t_and_alpha", "fit_scaling_", "fit_rates", "fit_t_", "fit_t_and_rates"]:
        wrap_stage(n)

    orig_fit = DR.fit

    def fit(self, *a, **k):
        try:
            return orig_fit(self, *a, **k)
        finally:
            R.gene["final"] = snapshot(self)
            R.stage = "after_fit"

    DR.fit = fit

    # --- Nelder-Mead ---------------------------------------------------------------------------
    orig_min = core.minimize

    def minimize(fun, x0, *a, **k):
        rec = R.gene["stages"].setdefault(R.stage, {})
        rec["x0"] = arr_t(np.atleast_1d(x0))
        fvals = []

        def f(x):
            v = fun(x)
            fvals.append((arr_t(x), tname(v)))
            return v

        R.phase = "nm"
        res = orig_min(f, x0, *a, **k)
        R.phase = "post"
        rec.update(
            nit=int(res.nit),
            nfev=int(res.nfev),
            x=arr_t(res.x),
            eval_x=sorted({e[0] for e in fvals}),
            eval_f=sorted({e[1] for e in fvals}),
        )
        return res

    core.minimize = minimize

    # --- update() -------------------------------------------------------------------------------
    orig_unspliced = core.unspliced

    def unspliced(*a, **k):
        R.n_unspliced += 1
        return orig_unspliced(*a, **k)

    core.unspliced = unspliced

    orig_get_dists = DR.get_dists

    def get_dists(self, *a, **k):
        udiff, sdiff, reg = orig_get_dists(self, *a, **k)
        key = f"get_dists|{R.stage}|udiff,sdiff,reg"
        R.cd_counts[(key, f"{arr_t(udiff)}/{arr_t(sdiff)}/{tname(reg)}")] += 1
        return udiff, sdiff, reg

    DR.get_dists = get_dists

    orig_update = DR.update

    def update(
        self,
        t=None,
        t_=None,
        alpha=None,
        beta=None,
        gamma=None,
        scaling=None,
        u0_=None,
        s0_=None,
        adjust_t_=True,
    ):
        before = snapshot(self)
        old = {v: getattr(self, v) for v in VARS}
        prop = dict(
            zip(VARS, self.get_vars(alpha, beta, gamma, scaling, t_, u0_, s0_), strict=True)
        )
        passed = {
            v: tname(x)
            for v, x in zip(VARS, [alpha, beta, gamma, scaling, t_], strict=True)
            if x is not None
        }
        n_u = R.n_unspliced
        ok = orig_update(self, t, t_, alpha, beta, gamma, scaling, u0_, s0_, adjust_t_)
        alt_eval = R.n_unspliced > n_u
        alt = bool(ok and self.t_ is not prop["t_"])
        base = None
        if ok:
            base = all(getattr(self, v) is prop[v] for v in VARS if v != "t_")
            if alt and all(prop[v] is old[v] for v in VARS if v != "t_"):
                base = None  # only t_ proposed: cannot tell, and it does not matter
        after = snapshot(self)
        R.gene["updates"].append(
            {
                "stage": R.stage,
                "phase": R.phase,
                "passed": passed,
                "accepted": bool(ok),
                "alt_evaluated": alt_eval,
                "alt_taken": alt,
                "base_accepted": base,
                "alt_t_": tname(self.t_) if alt else None,
                "before": before,
                "after": after,
                "adjust_t_": adjust_t_,
            }
        )
        return ok

    DR.update = update

    # --- compute_divergence / assign_tau ------------------------------------------------------
    orig_cd = utils.compute_divergence

    def compute_divergence(u, s, alpha, beta, gamma, scaling=1, *a, **k):
        mode = k.get("mode")
        sig = (
            arr_t(u),
            arr_t(s),
            tname(alpha),
            tname(beta),
            tname(gamma),
            tname(scaling),
            tname(k.get("t_")),
            tname(k.get("std_u")),
        )
        ctx = f"{R.stage}|{mode}|u,s,alpha,beta,gamma,scaling,t_,std_u={'/'.join(sig)}"
        R.cd_stack.append({"ctx": ctx})
        try:
            out = orig_cd(u, s, alpha, beta, gamma, scaling, *a, **k)
        finally:
            R.cd_stack.pop()
        outt = "/".join(arr_t(o) for o in out) if isinstance(out, list | tuple) else arr_t(out)
        R.cd_counts[(ctx, outt)] += 1
        if R.gene is not None and R.gene["cd_first"] is None:
            R.gene["cd_first"] = {"sig": sig, "out": outt, "mode": mode}
        return out

    utils.compute_divergence = compute_divergence

    orig_assign_tau = utils.assign_tau

    def assign_tau(u, s, alpha, beta, gamma, t_=None, u0_=None, s0_=None, assignment_mode=None):
        out = orig_assign_tau(u, s, alpha, beta, gamma, t_, u0_, s0_, assignment_mode)
        proj = assignment_mode in {"full_projection", "partial_projection"} or (
            assignment_mode == "projection" and beta < gamma
        )
        R.cd_counts[
            (f"assign_tau|{R.stage}|projection={proj}", f"{arr_t(out[0])}/{arr_t(out[1])}")
        ] += 1
        return out

    utils.assign_tau = assign_tau
    return saved


def uninstall(saved) -> None:
    for owner, name, orig in saved:
        if callable(orig) or not isinstance(owner, type):
            setattr(owner, name, orig)
        else:
            delattr(owner, name)


# ---------------------------------------------------------------------------------------------
# dtype-path predictor: is the path determined by init dtypes + accept/reject outcomes?
# ---------------------------------------------------------------------------------------------
def promote(*ts: str) -> str:
    """dtype of ``np.array([...])`` of these scalars (a Python int/float makes it float64)."""
    return "f64" if any(t in ("f64", "pyfloat", "int") for t in ts) else "f32"


STAGE_VARS = {
    "fit_t_and_alpha": ["t_", "alpha"],
    "fit_scaling_": ["t_", "beta", "scaling"],
    "fit_rates": ["alpha", "gamma"],
    "fit_t_": ["t_"],
    "fit_t_and_rates": ["t_", "alpha", "beta", "gamma"],
    "fit_t_and_rates(refit_time=False)": ["t_", "alpha", "beta", "gamma"],
}


def predict(g: dict) -> tuple[int, int]:
    """Replays g's update() calls with dtype rules only; returns (checks, mismatches)."""
    st = {v: g["init_before_scaling"][v] for v in VARS}
    checks = bad = 0
    x0 = {}
    for upd in g["updates"]:
        stage, phase = upd["stage"], upd["phase"]
        if stage in STAGE_VARS and phase == "post":  # x0 is built right before minimize
            x0[stage] = promote(*[st[v] for v in STAGE_VARS[stage]])
            obs = g["stages"].get(stage, {}).get("x0")
            checks += 1
            bad += obs != x0[stage]
        # the dtype of each candidate, from where it comes
        cand = {}
        if stage.startswith("initialize_scaling"):
            cand = {"scaling": "f64", "beta": "f64"}  # scaling + linspace * scaling * sight
        elif stage == "fit_t_and_alpha" and phase == "linspace":
            cand = {"alpha": "f64"}  # alpha + linspace * alpha / 10
        elif phase == "post":
            cand = {v: x0[stage] for v in STAGE_VARS[stage]}  # res.x[i]
        if set(cand) != set(upd["passed"]):
            raise AssertionError((stage, phase, cand, upd["passed"]))
        checks += 1
        bad += any(cand[v] != upd["passed"][v] for v in cand)
        if upd["accepted"]:
            if upd["base_accepted"] is not False:
                st.update(cand)
            if upd["alt_taken"]:
                st["t_"] = "f64"  # t[on].max() + max(t)/len(t) * np.int64 -> float64
        checks += 1
        observed = {v: upd["after"][v] for v in VARS}
        if st != observed:
            bad += 1
            st = observed  # resynchronise so one miss is counted once
    return checks, bad


# ---------------------------------------------------------------------------------------------
def summarize(name: str, genes: list[dict]) -> dict:
    out: dict = {"dataset": name, "n_genes": len(genes)}
    C = collections.Counter

    init_keys = [
        "u/scaling",
        "std_u",
        "std_s",
        "scaling",
        "alpha",
        "beta",
        "gamma",
        "t_",
        "u0_",
        "s0_",
    ]
    out["init_before_scaling"] = {
        k: dict(C(g["init_before_scaling"][k] for g in genes)) for k in init_keys
    }
    after_keys = ["scaling", "alpha", "beta", "gamma", "t_", "u0_", "s0_", "steady_state_ratio"]
    out["init_after"] = {k: dict(C(g["init_after"][k] for g in genes)) for k in after_keys}
    out["first_assignment_t"] = dict(C(g["first_assignment_t"] for g in genes))
    out["pval_steady_branch"] = dict(C(g["pval_steady_branch"] for g in genes))

    stages = {}
    for s in STAGES:
        recs = [g["stages"][s] for g in genes if s in g["stages"] and "x0" in g["stages"][s]]
        ups = [u for g in genes for u in g["updates"] if u["stage"] == s]
        per_gene_acc = [sum(u["accepted"] for u in g["updates"] if u["stage"] == s) for g in genes]
        stages[s] = {
            "x0": dict(C(r["x0"] for r in recs)),
            "eval_x": dict(C("/".join(r["eval_x"]) for r in recs)),
            "eval_f": dict(C("/".join(r["eval_f"]) for r in recs)),
            "nit": dict(sorted(C(r["nit"] for r in recs).items())),
            "nfev": dict(sorted(C(r["nfev"] for r in recs).items())),
            "updates": len(ups),
            "accepted": {
                ph: f"{sum(u['accepted'] for u in ups if u['phase'] == ph)}/"
                f"{sum(1 for u in ups if u['phase'] == ph)}"
                for ph in sorted({u["phase"] for u in ups})
            },
            "accepted_per_gene": dict(sorted(C(per_gene_acc).items())),
            "alt_evaluated": sum(u["alt_evaluated"] for u in ups),
            "alt_taken": sum(u["alt_taken"] for u in ups),
            "alt_taken_after_rejection": sum(
                u["alt_taken"] and u["base_accepted"] is False for u in ups
            ),
        }
    out["stages"] = stages

    other = collections.defaultdict(lambda: [0, 0, 0, 0])
    for g in genes:
        for u in g["updates"]:
            if u["stage"] in STAGES:
                continue
            r = other[u["stage"]]
            r[0] += 1
            r[1] += u["accepted"]
            r[2] += u["alt_evaluated"]
            r[3] += u["alt_taken"]
    out["other_updates(n, accepted, alt_evaluated, alt_taken)"] = dict(other)

    # promotions to float64: which accepted update changed a variable's dtype
    promo = C()
    for g in genes:
        for u in g["updates"]:
            for v in VARS + ["u0_"]:
                if u["before"][v] != u["after"][v]:
                    src = "alt_t_" if (v == "t_" and u["alt_taken"]) else u["phase"] or "-"
                    promo[f"{u['stage']}:{src}: {v} {u['before'][v]}->{u['after'][v]}"] += 1
    out["dtype_changes"] = dict(sorted(promo.items()))
    out["alt_t_dtype"] = dict(C(u["alt_t_"] for g in genes for u in g["updates"] if u["alt_taken"]))

    paths = C(
        " ".join(
            f"{s.replace('(refit_time=False)', '*')}={g['stages'].get(s, {}).get('x0', '-')}"
            for s in STAGES
        )
        for g in genes
    )
    out["x0_dtype_paths"] = dict(paths.most_common())
    out["final_dtypes"] = {v: dict(C(g["final"][v] for g in genes)) for v in VARS}

    checks = bad = 0
    for g in genes:
        c, b = predict(g)
        checks, bad = checks + c, bad + b
    out["predictor(checks, mismatches)"] = [checks, bad]
    return out


def time_assignment_summary(out: dict) -> dict:
    """compute_divergence calls per (stage, mode, inputs all float32?) -> output dtypes."""
    agg: collections.Counter = collections.Counter()
    for k, v in out["compute_divergence(ctx, out dtypes): calls"].items():
        if k.startswith(("assign_tau", "get_dists")):
            continue
        ctx, res = k.rsplit(" -> ", 1)
        stage, mode, sig = ctx.split("|")
        f32 = all(x in ("f32", "int") for x in sig.split("=")[1].split("/"))
        agg[f"{stage} | {mode} | inputs {'all f32/int' if f32 else 'some f64'} -> {res}"] += v
    dots: collections.Counter = collections.Counter()
    for k, v in out["conn.dot(ctx, in, out): calls"].items():
        dots[k.split(" :: ")[1]] += v
    return {"compute_divergence": dict(sorted(agg.items())), "conn.dot in->out": dict(dots)}


def timed(adata) -> dict:
    """Uninstrumented recover_dynamics(n_jobs=1) on a copy: wall and CPU seconds."""
    import scvelo as scv

    scv.settings.verbosity = 0
    base = adata.copy()
    t0, c0 = time.perf_counter(), time.process_time()
    scv.tl.recover_dynamics(base, n_jobs=1, show_progress_bar=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"adata": base, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}


def run(name: str, adata, json_detail: bool) -> dict:
    import scvelo as scv

    tm = timed(adata)
    base = tm.pop("adata")

    R.__init__()
    saved = install()
    try:
        inst = adata.copy()
        t0 = time.perf_counter()
        scv.tl.recover_dynamics(inst)  # the default call
        wall_inst = time.perf_counter() - t0
    finally:
        uninstall(saved)

    same = all(
        np.array_equal(base.var[c].values, inst.var[c].values, equal_nan=True)
        for c in base.var.columns
        if c.startswith("fit_")
    ) and all(
        np.array_equal(base.layers[k], inst.layers[k], equal_nan=True)
        for k in ("fit_t", "fit_tau", "fit_tau_")
    )
    out = summarize(name, R.genes)
    out.update(
        shape=list(adata.shape),
        wall_s_n_jobs1=tm["wall_s"],
        cpu_s_n_jobs1=tm["cpu_s"],
        wall_s_instrumented=round(wall_inst, 2),
        instrumented_results_bitwise_equal=bool(same),
    )
    out["compute_divergence(ctx, out dtypes): calls"] = {
        f"{k[0]} -> {k[1]}": v for k, v in sorted(R.cd_counts.items())
    }
    out["conn.dot(ctx, in, out): calls"] = {
        f"{k[0]} :: {k[1]} -> {k[2]}": v for k, v in sorted(R.dot_counts.items())
    }
    out["conn.dot accumulation checks"] = {
        str(k): v for k, v in R.dot_checks.items() if isinstance(k, tuple)
    }
    out["time_assignment_summary"] = time_assignment_summary(out)
    if json_detail:
        out["genes"] = R.genes
    return out


def _load_datasets():
    """jaxvelo/datasets.py loaded on its own (independent of the rest of the package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "jaxvelo" / "datasets.py"
    spec = importlib.util.spec_from_file_location("_jaxvelo_datasets", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="fixture,pancreas1500")
    ap.add_argument("--json", default=None, help="write the summary (and per-gene detail) here")
    ap.add_argument("--detail", action="store_true", help="include per-gene records in --json")
    ap.add_argument("--timing-only", action="store_true", help="only time recover_dynamics")
    args = ap.parse_args(argv)

    datasets = _load_datasets()
    warnings.filterwarnings("ignore")
    results = []
    for name in args.datasets.split(","):
        if name == "fixture":
            adata = datasets.fixture("pancreas_100obs")
        elif name.startswith("pancreas"):
            n = name.removeprefix("pancreas")
            adata = datasets.pancreas(int(n) if n else None)
        else:
            raise SystemExit(f"unknown dataset {name!r}")
        if args.timing_only:
            res = {"dataset": name, "shape": list(adata.shape), **timed(adata)}
            del res["adata"]
        else:
            res = run(name, adata, args.detail)
        results.append(res)
        print(json.dumps({k: v for k, v in res.items() if k != "genes"}, indent=1, default=str))
        sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
