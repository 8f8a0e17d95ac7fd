"""Medians, speed-ups and the written results: ``results.json``, ``results.md``, PNG charts.

Works on the list of records the children wrote (plus the parent's tags ``tier``, ``threads``,
``tool``, ``repeat``, ``process``), so it can be exercised on a hand-made list.

Definitions (per tier and thread count; all times exclude imports and reading the data):

- ``run_s``    scVelo / a peer: median over repeats of one call in a fresh process.
- ``first_s``  jaxvelo: first call in a fresh process with an empty ``JAXVELO_CACHE_DIR``.
- ``warm_s``   second call in that same process (everything compiled and in memory).
- ``cold_s``   first call in a fresh process whose ``JAXVELO_CACHE_DIR`` the first run filled.
- ``compile_s`` median over repeats of ``first - warm`` from the same process: an estimate of
  compilation (plus one-time tracing and start-up work), not a measurement of XLA alone.
- ``speedup_<x>`` = scVelo's ``run_s`` / the tool's ``<x>_s``.
- ``peak_rss_mb``: the largest ``ru_maxrss`` of the tool's processes (imports and data
  included); ``peak_rss_children_mb``: of its worker processes (scVelo's loky workers);
  ``peak_rss_cold_mb`` (jaxvelo): of its cold processes alone (no compilation).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .child import clean_json

__all__ = ["LABELS", "markdown", "markdown_table", "plot", "summarize", "write"]

# which timings each tool reports, in display order
LABELS = {"scvelo": ("run",), "jaxvelo": ("first", "cold", "warm", "cold_bucket")}
PEER_LABELS = ("run", "warm")
TOOL_NAMES = {
    "scvelo": "scVelo 0.3.4",
    "jaxvelo": "jaxvelo",
    "autozyme": "autozyme",
    "scvelo_rs": "scvelo-rs",
}


def _median(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else None


def _div(a, b) -> float | None:
    return a / b if a is not None and b else None


def _unique(seq) -> list:
    return list(dict.fromkeys(seq))


def summarize(records: list[dict]) -> list[dict]:
    """One row per (tier, threads): medians, speed-ups, peak RSS and concordance per tool."""
    fits = [r for r in records if r.get("role") == "fit"]
    conc = [r for r in records if r.get("role") == "concordance"]
    rows = []
    for tier, threads in _unique((r["tier"], r["threads"]) for r in fits + conc):
        here = [r for r in fits if r["tier"] == tier and r["threads"] == threads]
        ok = [r for r in here if not r.get("error")]
        row: dict = {
            "tier": tier,
            "threads": threads,
            "n_obs": next((r["n_obs"] for r in ok), None),
            "n_vars": next((r["n_vars"] for r in ok), None),
            "n_genes_fitted": {},
            "tools": {},
            "concordance": {},
            "errors": [
                f"{r.get('tool')}/{r.get('process')}: {r['error']}" for r in here if r.get("error")
            ],
        }
        for tool in _unique(r["tool"] for r in here):
            recs = [r for r in ok if r["tool"] == tool]
            labels = LABELS.get(tool, PEER_LABELS)
            samples = {
                lab: [r["seconds"][lab] for r in recs if lab in r["seconds"]] for lab in labels
            }
            entry: dict = {f"{lab}_s": _median(samples[lab]) for lab in labels}
            entry["samples"] = samples
            entry["peak_rss_mb"] = max((r["peak_rss_mb"] for r in recs), default=None)
            entry["peak_rss_children_mb"] = max(
                (r.get("peak_rss_children_mb") or 0 for r in recs), default=None
            )
            if tool == "jaxvelo":
                pairs = [
                    r["seconds"]["first"] - r["seconds"]["warm"]
                    for r in recs
                    if {"first", "warm"} <= r["seconds"].keys()
                ]
                entry["compile_s"] = _median(pairs)
                entry["cache_entries"] = next(
                    (r.get("cache_entries") for r in recs if r.get("process") == "first"), None
                )
                # a returning user's process (no compilation): the memory that matters
                entry["peak_rss_cold_mb"] = max(
                    (r["peak_rss_mb"] for r in recs if r.get("process") == "cold"), default=None
                )
                # --bucket-reuse: did the sibling's program serve the tier (no new entry)?
                primed = [r.get("cache_entries") for r in recs if r.get("process") == "prime"]
                bucket = [r.get("cache_entries") for r in recs
                          if r.get("process") == "cold_bucket"]  # fmt: skip
                if bucket:
                    entry["bucket_reused"] = len(primed) == len(bucket) and all(
                        p is not None and p == b for p, b in zip(primed, bucket, strict=True)
                    )
            fitted = next((r.get("n_genes_fitted") for r in recs), None)
            if fitted is not None:
                row["n_genes_fitted"][tool] = fitted
            row["tools"][tool] = entry
        ref = row["tools"].get("scvelo", {}).get("run_s")
        for tool, entry in row["tools"].items():
            if tool == "scvelo":
                continue
            for lab in LABELS.get(tool, PEER_LABELS):
                entry[f"speedup_{lab}"] = _div(ref, entry.get(f"{lab}_s"))
        for r in conc:
            if r["tier"] == tier and r["threads"] == threads:
                keep = (
                    "error",
                    "n_genes_ref",
                    "n_genes_test",
                    "n_genes_differ",
                    "pearson",
                    "frac_within_1e6",
                    "frac_bitwise",
                    "frac_t_bitwise",
                    "max_rel_diff",
                    "velocity_pearson",
                    "passed",
                    "n_diverging",
                    "diverging_genes",
                )
                row["concordance"][r["tool"]] = {k: r[k] for k in keep if k in r}
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------------------------
def _f(x, fmt: str = ".1f", suffix: str = "") -> str:
    return "–" if x is None else f"{x:{fmt}}{suffix}"


def _x(v) -> str:
    """A speed-up: ``12.3×``, ``1.25×``, ``0.00127×``."""
    if v is None:
        return "–"
    return f"{v:.1f}×" if v >= 10 else f"{v:.2f}×" if v >= 0.1 else f"{v:.3g}×"


def _genes(row: dict) -> str:
    fitted = row["n_genes_fitted"]
    n = fitted.get("scvelo", next(iter(fitted.values()), None))
    return f"{_f(row['n_obs'], 'd')} × {_f(n, 'd')}"


def markdown_table(summary: list[dict]) -> str:
    """Runtime table: scVelo against jaxvelo, one line per tier and thread count."""
    head = (
        "| tier | cells × genes fitted | threads | scVelo (s) | jaxvelo first run (s) "
        "| cold (s) | warm (s) | compile ≈ (s) | speed-up first / cold / warm "
        "| peak RSS scVelo / jaxvelo (cold process) (MiB) |"
    )
    lines = [head, "|" + "---|" * 10]
    for row in summary:
        s = row["tools"].get("scvelo", {})
        j = row["tools"].get("jaxvelo", {})
        rss_s = s.get("peak_rss_mb")
        if s.get("peak_rss_children_mb"):
            rss_s = (rss_s or 0) + s["peak_rss_children_mb"]
        speed = " / ".join(_x(j.get(f"speedup_{k}")) for k in ("first", "cold", "warm"))
        lines.append(
            f"| {row['tier']} | {_genes(row)} | {row['threads']} | {_f(s.get('run_s'))} "
            f"| {_f(j.get('first_s'))} | {_f(j.get('cold_s'))} | {_f(j.get('warm_s'))} "
            f"| {_f(j.get('compile_s'))} | {speed} "
            f"| {_f(rss_s, '.0f')} / {_f(j.get('peak_rss_mb'), '.0f')} "
            f"({_f(j.get('peak_rss_cold_mb'), '.0f')}) |"
        )
    return "\n".join(lines)


def _bucket_table(summary: list[dict], tiers: dict) -> str | None:
    """``--bucket-reuse``: the tier's cold call from a cache only its sibling filled."""
    rows = []
    for row in summary:
        j = row["tools"].get("jaxvelo", {})
        if j.get("cold_bucket_s") is None:
            continue
        sib = tiers.get(f"{row['tier']}_sibling", {})
        rows.append(
            f"| {row['tier']} | {row['threads']} | {sib.get('n_obs', '?')} | "
            f"{_f(j.get('cold_s'))} | {_f(j.get('cold_bucket_s'))} | "
            f"{_x(j.get('speedup_cold'))} / {_x(j.get('speedup_cold_bucket'))} | "
            f"{'yes' if j.get('bucket_reused') else 'no'} |"
        )
    if not rows:
        return None
    head = (
        "| tier | threads | sibling's cells | cold (s) | cold from the sibling's cache (s) "
        "| speed-up cold / from sibling | program reused (no new cache entry) |\n"
        "|---|---|---|---|---|---|---|"
    )
    return head + "\n" + "\n".join(rows)


def _peers_table(summary: list[dict]) -> str | None:
    lines = []
    for row in summary:
        for tool, e in row["tools"].items():
            if tool in LABELS:
                continue
            lines.append(
                f"| {row['tier']} | {row['threads']} | {TOOL_NAMES.get(tool, tool)} "
                f"| {_f(e.get('run_s'))} | {_f(e.get('warm_s'))} "
                f"| {_x(e.get('speedup_run'))} / {_x(e.get('speedup_warm'))} "
                f"| {_f(e.get('peak_rss_mb'), '.0f')} |"
            )
    if not lines:
        return None
    head = (
        "| tier | threads | tool | run (s) | warm (s) | speed-up run / warm vs scVelo "
        "| peak RSS (MiB) |\n|---|---|---|---|---|---|---|"
    )
    return head + "\n" + "\n".join(lines)


def _concordance_table(summary: list[dict]) -> str | None:
    lines = []
    for row in summary:
        for tool, c in row["concordance"].items():
            if c.get("error"):
                lines.append(
                    f"| {row['tier']} | {row['threads']} | {tool} "
                    f"| failed: {c['error']} | | | | | |"
                )
                continue
            p = c.get("pearson", {})
            pear = " / ".join(
                _f(p.get(k), ".7f") for k in ("alpha", "beta", "gamma", "t_", "likelihood")
            )
            div = c.get("n_diverging") or 0
            names = ", ".join(c.get("diverging_genes") or [])
            frac = c.get("frac_within_1e6")
            bits = c.get("frac_bitwise")
            lines.append(
                f"| {row['tier']} | {row['threads']} | {TOOL_NAMES.get(tool, tool)} "
                f"| {c.get('n_genes_ref')} / {c.get('n_genes_test')} ({c.get('n_genes_differ')}) "
                f"| {pear} | {_f(None if frac is None else 100 * frac, '.2f', '%')} "
                f"| {_f(None if bits is None else 100 * bits, '.2f', '%')} "
                f"| {_f(c.get('velocity_pearson'), '.7f')} "
                f"| {'passed' if c.get('passed') else 'failed'}"
                f"{f' ({div} diverging: {names})' if div else ''} |"
            )
    if not lines:
        return None
    head = (
        "| tier | threads | tool | genes fitted scVelo / tool (differing) "
        "| Pearson α / β / γ / t_ / likelihood | genes within 1e-6 | genes bitwise "
        "| velocity Pearson | gate |\n|---|---|---|---|---|---|---|---|---|"
    )
    return head + "\n" + "\n".join(lines)


def markdown(results: dict) -> str:
    """The whole ``results.md``."""
    meta = results.get("meta", {})
    m = meta.get("machine", {})
    cfg = meta.get("config", {})
    versions = ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
    load = lambda key: ", ".join(f"{x:.2f}" for x in (m.get(key) or [])) or "–"  # noqa: E731
    out = [
        f"# jaxvelo benchmark — {meta.get('date', '')}",
        "",
        f"- machine: {m.get('cpu_model')}, {m.get('nproc')} CPUs ({m.get('cpus_available')} "
        f"available), {m.get('mem_total_gib')} GiB; {m.get('platform')}; Python {m.get('python')}",
        f"- load average (1/5/15 min) at start: {load('loadavg_start')}; at end: "
        f"{load('loadavg_end')}",
        f"- commit: {meta.get('git_commit')}; versions: {versions or '–'}",
        f"- command: `{' '.join(meta.get('command', []))}`",
        f"- threads {cfg.get('threads')}, repeats {cfg.get('repeats')}"
        f"{' (--quick)' if cfg.get('quick') else ''}; pinning: {cfg.get('pinning')}",
        "",
        f"## Runtime (median of {cfg.get('repeats')} repeat(s); imports and data loading excluded)",
        "",
        markdown_table(results.get("summary", [])),
        "",
        "*first run*: fresh process, empty `JAXVELO_CACHE_DIR` (includes compilation); *cold*: "
        "fresh process, cache filled by the first run; *warm*: second call in the first-run "
        "process; *compile ≈* median of first − warm; speed-up = scVelo / jaxvelo; scVelo's "
        "RSS adds its worker processes' peak. Definitions: `docs/benchmarks.md`.",
    ]
    reuse = _bucket_table(results.get("summary", []), results.get("tiers", {}))
    if reuse:
        out += ["", "## Cold from another dataset's cache (same cell-count bucket)", "", reuse]
    peers = _peers_table(results.get("summary", []))
    if peers:
        out += ["", "## Peers", "", peers]
    conc = _concordance_table(results.get("summary", []))
    if conc:
        out += ["", "## Concordance with scVelo (`jaxvelo.concordance.compare`)", "", conc]
    tiers = results.get("tiers", {})
    if tiers:
        out += ["", "## Tiers", ""]
        for name, t in tiers.items():
            out.append(
                f"- **{name}**: {t.get('description')}; {t.get('n_obs')} cells × "
                f"{t.get('n_vars')} genes after preprocessing"
                f"{' (from the cache)' if t.get('cached') else ''}"
            )
    notes = list(meta.get("notes", []))
    for row in results.get("summary", []):
        notes += [f"{row['tier']} / {row['threads']} thr: {e}" for e in row.get("errors", [])]
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# charts
# ---------------------------------------------------------------------------------------------
def _unique_tiers(summary: list[dict]) -> dict[int, str]:
    out: dict[int, list[str]] = {}
    for row in summary:
        if row["n_obs"] and row["tier"] not in out.get(row["n_obs"], []):
            out.setdefault(row["n_obs"], []).append(row["tier"])
    return {n: "/".join(names) for n, names in out.items()}


def plot(summary: list[dict], out: Path) -> list[Path]:
    """``speedup.png`` and ``runtime_vs_cells.png`` (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out = Path(out)
    files = []

    # speed-up per tier and thread count
    series = [("jaxvelo", "cold"), ("jaxvelo", "warm")]
    series += _unique((t, "run") for row in summary for t in row["tools"] if t not in LABELS)
    groups = [f"{row['tier']}\n{row['threads']} thr" for row in summary]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(groups) + 2), 4.2))
    width = 0.8 / max(len(series), 1)
    for i, (tool, lab) in enumerate(series):
        vals = [row["tools"].get(tool, {}).get(f"speedup_{lab}") for row in summary]
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(
            xs, [v or 0 for v in vals], width, label=f"{TOOL_NAMES.get(tool, tool)} {lab}"
        )
        for b, v in zip(bars, vals, strict=True):
            if v:
                ax.annotate(
                    _x(v),
                    (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("speed-up over scVelo 0.3.4 (×)")
    ax.set_title("recover_dynamics: speed-up over scVelo (median)")
    if not summary:
        ax.text(0.5, 0.5, "no data", ha="center", transform=ax.transAxes)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(out / "speedup.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    # runtime against number of cells
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = "os^Dvx"
    lines = [("scvelo", "run")] + [("jaxvelo", lab) for lab in LABELS["jaxvelo"]]
    lines += [s for s in series if s[0] not in LABELS]
    threads_all = _unique(row["threads"] for row in summary)
    for li, (tool, lab) in enumerate(lines):
        for ti, threads in enumerate(threads_all):
            pts = sorted(
                (row["n_obs"], row["tools"][tool][f"{lab}_s"])
                for row in summary
                if row["threads"] == threads
                and row["n_obs"]
                and row["tools"].get(tool, {}).get(f"{lab}_s")
            )
            if not pts:
                continue
            ax.plot(
                *zip(*pts, strict=True),
                marker=markers[ti % len(markers)],
                color=f"C{li}",
                ls="-" if ti == 0 else ":",
                label=f"{TOOL_NAMES.get(tool, tool)} {lab}, {threads} thr",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for n_obs, names in _unique_tiers(summary).items():
        ax.axvline(n_obs, color="0.85", lw=0.8, zorder=0)
        ax.annotate(
            names,
            (n_obs, 0.02),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            rotation=90,
            va="bottom",
            ha="right",
            color="0.4",
        )
    ax.set_xlabel("cells (genes fitted differ per tier; see results.md)")
    ax.set_ylabel("seconds")
    ax.set_title("recover_dynamics runtime against number of cells")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    files.append(out / "runtime_vs_cells.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    return files


def write(out: str | Path, results: dict) -> list[Path]:
    """Write ``results.json``, ``results.md`` and the charts into ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if "summary" not in results:
        results = dict(results, summary=summarize(results.get("measurements", [])))
    files = [out / "results.json", out / "results.md"]
    files[0].write_text(
        json.dumps(clean_json(results), indent=2, allow_nan=False, default=str) + "\n"
    )
    files[1].write_text(markdown(results))
    return files + plot(results["summary"], out)
