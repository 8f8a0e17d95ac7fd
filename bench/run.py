"""The benchmark's parent process: plan, pin threads, run fresh subprocesses, collect.

For every tier the preprocessed data is built once (or taken from the tier cache). Then, for each
thread count and repeat, in this order and each in a fresh process (``bench.child``):

1. scVelo 0.3.4 — one timed ``scv.tl.recover_dynamics`` call (``run``);
2. jaxvelo, *first run* — ``JAXVELO_CACHE_DIR`` set to a new empty directory; a timed call
   (``first``: compilation included) and a second timed call in the same process (``warm``);
3. jaxvelo, *cold* — a new process with the same, now filled, ``JAXVELO_CACHE_DIR``; one timed
   call (``cold``); the directory is then deleted;
4. each importable peer (autozyme, scvelo-rs) — a timed call (``run``) and a second one in the
   same process (``warm``).

The first repeat of each thread count keeps the fitted AnnData of every tool; a last subprocess
per tool computes ``jaxvelo.concordance.compare(scvelo_fit, tool_fit)``. Imports and reading the
h5ad are never timed.

Threads are pinned two ways: each child sets its CPU affinity to the first ``N`` CPUs of the
parent's affinity mask before importing anything (the same as ``taskset -c 0..N-1``: all threads
and worker processes, loky's included, inherit it), and the thread-pool variables
(``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS``, ``NUMBA_NUM_THREADS``,
``RAYON_NUM_THREADS``, ...) are set to ``N`` so that no library starts more threads than it has
CPUs. XLA sizes its CPU thread pool from the affinity mask; with ``N == 1`` ``XLA_FLAGS`` also
gets ``--xla_cpu_multi_thread_eigen=false``. Both tools get ``n_jobs=N``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import report
from .tiers import TIERS, Tier, cache_path, resolve, sibling

__all__ = [
    "BENCH_ROOT",
    "Config",
    "PEERS",
    "THREAD_VARS",
    "TOOLS",
    "available_cpus",
    "child_env",
    "config_from_args",
    "run",
]

BENCH_ROOT = Path(__file__).resolve().parent
REPO_ROOT = BENCH_ROOT.parent
TOOLS = ("scvelo", "jaxvelo", "autozyme", "scvelo_rs")
PEERS = {"autozyme": "autozyme", "scvelo_rs": "scvelo_rs"}  # tool -> module that must import
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "NUMBA_NUM_THREADS",
    "RAYON_NUM_THREADS",
)
PINNING = (
    "CPU affinity of each child set to the first N CPUs before any import (as taskset -c); "
    + "=N, ".join(THREAD_VARS)
    + "=N; XLA_FLAGS += --xla_cpu_multi_thread_eigen=false when N=1; n_jobs=N"
)


@dataclass
class Config:
    """What ``jaxvelo bench`` runs (built by :func:`config_from_args`)."""

    tiers: list[Tier]
    threads: list[int]
    repeats: int
    out: Path
    cache_dir: Path
    data: Path | None = None
    quick: bool = False
    tools: list[str] = field(default_factory=lambda: list(TOOLS))
    timeout: float | None = None
    keep_fits: bool = False
    command: list[str] = field(default_factory=list)
    bucket_reuse: bool = False


def available_cpus() -> list[int]:
    """CPUs this process may run on (its affinity mask), in order."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))  # pragma: no cover


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(p) for p in str(text).split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise ValueError(f"thread counts must be >= 1, got {text!r}")
    return list(dict.fromkeys(vals))


def config_from_args(args) -> Config:
    """Validate the ``jaxvelo bench`` arguments and fill in the defaults.

    ``--threads``: default ``1,<all CPUs>`` (``<all CPUs>`` only with ``--quick``);
    ``--repeats``: default 3 (1 with ``--quick``); ``--out``: ``bench/results/<date-time>``;
    ``--cache-dir``: ``jaxvelo.datasets.data_dir() / "bench"``; ``--data``: the raw pancreas
    h5ad for the pancreas tiers, default ``jaxvelo.datasets.shared_data_path()``.
    """
    from jaxvelo import datasets

    tiers = resolve(args.tier)
    n_cpus = len(available_cpus())
    if args.threads is None:
        threads = [n_cpus] if args.quick else list(dict.fromkeys([1, n_cpus]))
    else:
        threads = _int_list(args.threads) if isinstance(args.threads, str) else list(args.threads)
    too_many = [n for n in threads if n > n_cpus]
    if too_many:
        raise ValueError(f"--threads {too_many} exceeds the {n_cpus} CPUs available here")
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1:
        raise ValueError("--repeats must be >= 1")
    tools = [t.strip() for t in (args.tools or ",".join(TOOLS)).split(",") if t.strip()]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown or not tools:
        raise ValueError(f"unknown tool(s) {unknown}; choose from {', '.join(TOOLS)}")
    data = Path(args.data).expanduser() if args.data else None
    if data is not None and not data.is_file():
        raise ValueError(f"--data {args.data!r} is not a file")
    if data is None and any(t.source == "pancreas" for t in tiers):
        data = datasets.shared_data_path()
        if data is None:
            names = ", ".join(t.name for t in tiers if t.source == "pancreas")
            raise ValueError(
                f"tier(s) {names} need {datasets.PANCREAS_FILENAME}: pass --data PATH, set "
                "JAXVELO_PANCREAS, or put it in ../shared/data next to the repository"
            )
    stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    out = Path(args.out) if args.out else BENCH_ROOT / "results" / stamp
    cache_dir = Path(args.cache_dir) if args.cache_dir else datasets.data_dir() / "bench"
    if args.timeout is not None and args.timeout <= 0:
        raise ValueError("--timeout must be positive")
    return Config(
        tiers=tiers,
        threads=threads,
        repeats=repeats,
        out=out,
        cache_dir=cache_dir,
        data=data,
        quick=bool(args.quick),
        tools=tools,
        timeout=args.timeout,
        keep_fits=bool(args.keep_fits),
        command=list(getattr(args, "command", None) or sys.argv),
        bucket_reuse=bool(getattr(args, "bucket_reuse", False)),
    )


def child_env(threads: int, extra: dict[str, str] | None = None, base=None) -> dict[str, str]:
    """Environment of a child pinned to ``threads`` threads (see the module docstring)."""
    env = dict(os.environ if base is None else base)
    for var in THREAD_VARS:
        env[var] = str(threads)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_cpu_multi_thread_eigen" not in f]
    if threads == 1:
        flags.append("--xla_cpu_multi_thread_eigen=false")
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    else:
        env.pop("XLA_FLAGS", None)
    env.setdefault("JAX_PLATFORMS", "cpu")
    # the compilation cache the children see is JAXVELO_CACHE_DIR only, set per step
    for var in ("JAX_COMPILATION_CACHE_DIR", "JAXVELO_CACHE_DIR"):
        env.pop(var, None)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    env.update(extra or {})
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class _Runner:
    """Starts the children one at a time, logs progress, keeps every record."""

    def __init__(self, cfg: Config, total: int):
        self.cfg = cfg
        self.total = total
        self.k = 0
        self.t0 = time.perf_counter()
        self.cpus = available_cpus()
        self.records: list[dict] = []
        for sub in ("logs", "raw"):
            (cfg.out / sub).mkdir(parents=True, exist_ok=True)

    def log(self, text: str, end: str = "\n") -> None:
        el = int(time.perf_counter() - self.t0)
        print(
            f"[{self.k:>3}/{self.total} {el // 60:02d}:{el % 60:02d}] {text}",
            end=end,
            file=sys.stderr,
            flush=True,
        )

    def step(
        self,
        label: str,
        spec: dict,
        threads: int,
        tags: dict,
        extra_env: dict[str, str] | None = None,
    ) -> dict:
        self.k += 1
        slug = "-".join(str(v) for v in tags.values() if v is not None)
        name = f"{self.k:03d}-{spec['role']}-{slug}".replace("/", "_")
        result = self.cfg.out / "raw" / f"{name}.json"
        logf = self.cfg.out / "logs" / f"{name}.log"
        spec = dict(spec, result=str(result), cpus=self.cpus[:threads])
        cmd = [sys.executable, "-m", "bench.child", json.dumps(spec)]
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        self.log(f"{label} ...", end=" ")
        t = time.perf_counter()
        with open(logf, "w") as lf:
            # own session: a timeout or Ctrl-C stops the child's workers (loky) too
            proc = subprocess.Popen(
                cmd,
                stdout=lf,
                stderr=subprocess.STDOUT,
                env=child_env(threads, extra_env),
                start_new_session=True,
            )
            try:
                rc = proc.wait(timeout=self.cfg.timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                rc = f"timeout after {self.cfg.timeout} s"
            except BaseException:
                _kill_group(proc)
                raise
        wall = time.perf_counter() - t
        if rc == 0 and result.is_file():
            rec = json.loads(result.read_text().splitlines()[-1])
        else:
            rec = {"role": spec["role"], "error": f"exit status {rc}", "log_tail": _tail(logf)}
        rec.update(
            tags,
            threads=threads,
            wall_s=wall,
            loadavg_1m=load,
            log=str(logf.relative_to(self.cfg.out)),
        )
        self.records.append(rec)
        print(_describe(rec), file=sys.stderr, flush=True)
        return rec


def _describe(rec: dict) -> str:
    if rec.get("error"):
        return f"FAILED ({rec['error']}; see {rec['log']})\n{rec.get('log_tail', '')}"
    if rec["role"] == "fit":
        return ", ".join(f"{k} {v:.1f} s" for k, v in rec["seconds"].items()) + (
            f", peak RSS {rec['peak_rss_mb']:.0f} MiB"
        )
    if rec["role"] == "concordance":
        return (
            f"genes differing {rec['n_genes_differ']}, within 1e-6 "
            f"{100 * rec['frac_within_1e6']:.2f}%, bitwise "
            f"{100 * (rec.get('frac_bitwise') or 0):.2f}%, gate "
            f"{'passed' if rec['passed'] else 'FAILED'}"
        )
    return f"done in {rec['wall_s']:.1f} s"


def _peers(cfg: Config, notes: list[str]) -> list[str]:
    tools = []
    for tool in cfg.tools:
        if tool in PEERS and importlib.util.find_spec(PEERS[tool]) is None:
            notes.append(f"{tool}: not importable in this environment; skipped")
            continue
        tools.append(tool)
    return tools


def _prepare_tier(runner: _Runner, tier: Tier) -> dict:
    cfg = runner.cfg
    data = cfg.data if tier.source == "pancreas" else None
    path = cache_path(tier, cfg.cache_dir, data)
    meta = path.with_suffix(".json")
    info = dict(tier.as_dict(), h5ad=str(path), data=str(data) if data else None)
    if path.is_file() and meta.is_file():
        runner.k += 1
        info.update(json.loads(meta.read_text()), cached=True)
        runner.log(f"{tier.name}: preprocessed data from the cache {path}")
        return info
    rec = runner.step(
        f"{tier.name}: preprocessing ({tier.description})",
        {"role": "prepare", "tier": tier.name, "data": info["data"], "out": str(path)},
        len(runner.cpus),
        {"tier": tier.name},
    )
    if rec.get("error"):
        return dict(info, error=rec["error"])
    sidecar = {k: rec[k] for k in ("n_obs", "n_vars")} | {"prepare_s": rec["seconds"]}
    meta.write_text(json.dumps(sidecar) + "\n")
    return dict(info, **sidecar, cached=False)


def _git_commit() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


def _meta(cfg: Config, tools: list[str], notes: list[str]) -> dict:
    return {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": cfg.command,
        "git_commit": _git_commit(),
        "machine": {
            "cpu_model": _cpu_model(),
            "nproc": os.cpu_count(),
            "cpus_available": len(available_cpus()),
            "mem_total_gib": _mem_total_gib(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "config": {
            "tiers": [t.name for t in cfg.tiers],
            "threads": cfg.threads,
            "repeats": cfg.repeats,
            "quick": cfg.quick,
            "tools_requested": cfg.tools,
            "tools_run": tools,
            "data": str(cfg.data) if cfg.data else None,
            "cache_dir": str(cfg.cache_dir),
            "pinning": PINNING,
        },
        "notes": notes,
    }


def run(cfg: Config) -> int:
    """Run the benchmark described by ``cfg``; write the results; 0 if every step succeeded."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    tools = _peers(cfg, notes)
    fitters = [t for t in tools if t != "jaxvelo"]
    reuse = cfg.bucket_reuse and "jaxvelo" in tools
    per_repeat = len(fitters) + (2 + 2 * reuse if "jaxvelo" in tools else 0)
    per_threads = cfg.repeats * per_repeat + ("scvelo" in tools) * (len(tools) - 1)
    total = len(cfg.tiers) * (1 + reuse + len(cfg.threads) * per_threads)
    runner = _Runner(cfg, total)
    results = {"meta": _meta(cfg, tools, notes), "tiers": {}, "measurements": runner.records}
    runner.log(
        f"benchmark: tiers {', '.join(t.name for t in cfg.tiers)}; threads "
        f"{cfg.threads}; repeats {cfg.repeats}; tools {', '.join(tools)}; -> {cfg.out}"
    )
    for note in notes:
        runner.log(f"note: {note}")
    interrupted = False
    try:
        _run_tiers(runner, tools, results, per_threads)
    except KeyboardInterrupt:
        interrupted = True
        notes.append("interrupted (Ctrl-C): the results cover the steps finished before")
        runner.log("interrupted; writing the results so far")
    results["meta"]["machine"]["loadavg_end"] = (
        list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    )
    results["meta"]["versions"] = _versions(runner.records)
    results["summary"] = report.summarize(runner.records)
    files = report.write(cfg.out, results)
    runner.log("wrote " + ", ".join(str(f) for f in files))
    print(report.markdown_table(results["summary"]), flush=True)
    failed = [r for r in runner.records if r.get("error")]
    if failed:
        runner.log(f"{len(failed)} step(s) failed; see the logs in {cfg.out / 'logs'}")
    return 130 if interrupted else 1 if failed else 0


def _run_tiers(runner: _Runner, tools: list[str], results: dict, per_threads: int) -> None:
    """All steps of all tiers (see the module docstring); records go to ``runner.records``."""
    cfg = runner.cfg
    notes = results["meta"]["notes"]
    fits_dir = cfg.out / "fits"
    for tier in cfg.tiers:
        info = _prepare_tier(runner, tier)
        results["tiers"][tier.name] = info
        if info.get("error"):
            notes.append(f"{tier.name}: preprocessing failed ({info['error']}); tier skipped")
            runner.k += len(cfg.threads) * per_threads
            continue
        base = {"h5ad": info["h5ad"], "var_names": tier.var_names}
        sib, sib_info = None, None
        if cfg.bucket_reuse and "jaxvelo" in tools:
            sib = sibling(tier)
            if sib is None:
                runner.k += 1 + len(cfg.threads) * cfg.repeats * 2
                notes.append(f"{tier.name}: --bucket-reuse skipped (no other dataset of its "
                             "size bucket)")  # fmt: skip
            else:
                sib_info = _prepare_tier(runner, sib)
                results["tiers"][sib.name] = sib_info
                if sib_info.get("error"):
                    notes.append(f"{sib.name}: preprocessing failed; --bucket-reuse skipped")
                    runner.k += len(cfg.threads) * cfg.repeats * 2
                    sib_info = None
        for threads in cfg.threads:
            fits: dict[str, Path] = {}
            for rep in range(cfg.repeats):
                where = f"{tier.name} · {threads} thr · repeat {rep + 1}/{cfg.repeats}"
                for tool in tools:
                    keep = None
                    if rep == 0:
                        fits_dir.mkdir(exist_ok=True)
                        keep = fits_dir / f"{tier.name}-{tool}-t{threads}.h5ad"
                    tags = {"tier": tier.name, "tool": tool, "repeat": rep}
                    spec = dict(
                        base,
                        role="fit",
                        tool=tool,
                        n_jobs=threads,
                        save_fit=str(keep) if keep else None,
                    )
                    if tool != "jaxvelo":
                        labels = ["run"] if tool == "scvelo" else ["run", "warm"]
                        rec = runner.step(
                            f"{where} · {tool}",
                            dict(spec, labels=labels),
                            threads,
                            dict(tags, process="run"),
                        )
                    else:
                        with _fresh_cache(f"jaxvelo-bench-{tier.name}-") as env:
                            rec = runner.step(
                                f"{where} · jaxvelo first run (empty cache) + warm",
                                dict(spec, labels=["first", "warm"]),
                                threads,
                                dict(tags, process="first"),
                                env,
                            )
                            if rec.get("cache_entries") == 0 and not any(
                                "wrote nothing" in n for n in notes
                            ):
                                notes.append(
                                    "JAXVELO_CACHE_DIR: the first run wrote nothing into the "
                                    "cache directory, so 'cold' re-compiled (no persistent "
                                    "compilation cache in effect)"
                                )
                            runner.step(
                                f"{where} · jaxvelo cold (filled cache)",
                                dict(spec, labels=["cold"], save_fit=None),
                                threads,
                                dict(tags, process="cold"),
                                env,
                            )
                        if sib_info is not None:
                            _cold_from_sibling(runner, where, spec, threads, tags, sib, sib_info)
                    if keep is not None and not rec.get("error"):
                        fits[tool] = keep
            if "scvelo" in fits:
                for tool in [t for t in tools if t != "scvelo"]:
                    if tool not in fits:
                        runner.k += 1
                        continue
                    runner.step(
                        f"{tier.name} · {threads} thr · concordance {tool} vs scVelo",
                        {
                            "role": "concordance",
                            "ref": str(fits["scvelo"]),
                            "test": str(fits[tool]),
                        },
                        threads,
                        {"tier": tier.name, "tool": tool},
                    )
            elif "scvelo" in tools:
                runner.k += len(tools) - 1
            if not cfg.keep_fits:
                for p in fits.values():
                    p.unlink(missing_ok=True)
        if not cfg.keep_fits and fits_dir.is_dir() and not any(fits_dir.iterdir()):
            fits_dir.rmdir()


def _cold_from_sibling(runner, where, spec, threads, tags, sib, sib_info) -> None:
    """``--bucket-reuse``: a new cache filled by a first run on ``sib`` (another dataset of
    the tier's size bucket; label ``prime``), then the tier's cold call from it (label
    ``cold_bucket``), with the cache's entry count before and after (a reused program adds
    none)."""
    with _fresh_cache("jaxvelo-bench-sibling-") as env:
        runner.step(
            f"{where} · jaxvelo first run on {sib.name} ({sib.cells} cells) fills a new cache",
            dict(spec, h5ad=sib_info["h5ad"], labels=["prime"], save_fit=None),
            threads,
            dict(tags, process="prime"),
            env,
        )
        runner.step(
            f"{where} · jaxvelo cold from {sib.name}'s cache",
            dict(spec, labels=["cold_bucket"], save_fit=None),
            threads,
            dict(tags, process="cold_bucket"),
            env,
        )


@contextlib.contextmanager
def _fresh_cache(prefix: str):
    """A new, empty ``JAXVELO_CACHE_DIR`` for a sequence of steps (their extra environment),
    deleted afterwards."""
    cache = tempfile.mkdtemp(prefix=prefix)
    try:
        yield {"JAXVELO_CACHE_DIR": cache}
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _versions(records: list[dict]) -> dict:
    out: dict[str, str] = {}
    for rec in records:
        for k, v in (rec.get("versions") or {}).items():
            if v:
                out.setdefault(k, v)
    return out


def tier_names() -> list[str]:
    """All registered tier names (hidden ones included)."""
    return list(TIERS)
