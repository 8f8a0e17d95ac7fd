"""Tests for the benchmark suite (``jaxvelo bench``, the repository's ``bench/``)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from jaxvelo import cli
from jaxvelo import datasets as jv_datasets

bench = cli._load_bench()
from bench import child, report, run, tiers  # noqa: E402  (bench/ is put on sys.path above)

N_CPUS = len(run.available_cpus())
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(argv: list[str]) -> run.Config:
    return run.config_from_args(cli.build_parser().parse_args(["bench", *argv]))


@pytest.fixture
def pancreas_file(tmp_path, monkeypatch) -> Path:
    """A stand-in for the raw pancreas h5ad (only its path/size/mtime are used here)."""
    p = tmp_path / "pancreas_3696.h5ad"
    p.write_bytes(b"not really h5ad")
    monkeypatch.setenv("JAXVELO_PANCREAS", str(p))
    return p


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def test_bench_package_is_the_repositorys():
    root = Path(cli.__file__).resolve().parent.parent
    assert Path(bench.__file__).resolve() == root / "bench" / "__init__.py"
    assert run.REPO_ROOT == root


def test_parse_bench_arguments(tmp_path, pancreas_file):
    args = cli.build_parser().parse_args(
        ["bench", "--tier", "small,large", "--threads", "1", "--repeats", "2", "--out",
         str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"), "--timeout", "30",
         "--keep-fits", "--tools", "scvelo,jaxvelo"]
    )  # fmt: skip
    assert (args.cmd, args.tier, args.threads, args.repeats) == ("bench", "small,large", "1", 2)
    cfg = run.config_from_args(args)
    assert [t.name for t in cfg.tiers] == ["small", "large"]
    assert (cfg.threads, cfg.repeats, cfg.quick, cfg.timeout, cfg.keep_fits) == (
        [1], 2, False, 30.0, True)  # fmt: skip
    assert cfg.out == tmp_path / "o" and cfg.cache_dir == tmp_path / "c"
    assert cfg.tools == ["scvelo", "jaxvelo"]
    assert cfg.data == pancreas_file


def test_bench_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXVELO_DATA_DIR", str(tmp_path / "cache"))
    cfg = _config(["--tier", "large"])
    assert cfg.repeats == 3 and cfg.threads == list(dict.fromkeys([1, N_CPUS]))
    assert cfg.tools == list(run.TOOLS)
    assert cfg.cache_dir == tmp_path / "cache" / "bench"
    assert cfg.out.parent == run.BENCH_ROOT / "results"
    assert cfg.data is None  # simulated tiers need no input file
    quick = _config(["--tier", "large", "--quick"])
    assert quick.repeats == 1 and quick.threads == [N_CPUS] and quick.quick
    assert _config(["--tier", "large", "--quick", "--repeats", "2", "--threads", "1"]).repeats == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tier", "huge"], "unknown tier"),
        (["--tier", "tiny", "--threads", str(N_CPUS + 1)], "exceeds"),
        (["--tier", "tiny", "--threads", "0"], ">= 1"),
        (["--tier", "tiny", "--threads", "a,b"], "integers"),
        (["--tier", "tiny", "--repeats", "0"], "--repeats"),
        (["--tier", "tiny", "--tools", "scvelo,velocyto"], "unknown tool"),
        (["--tier", "tiny", "--data", "/nonexistent/p.h5ad"], "not a file"),
        (["--tier", "tiny", "--timeout", "-1"], "--timeout"),
    ],
)
def test_bench_argument_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        _config(argv)


def test_pancreas_tier_without_data(monkeypatch):
    monkeypatch.setattr(jv_datasets, "shared_data_path", lambda: None)
    with pytest.raises(ValueError, match="pancreas_3696.h5ad"):
        _config(["--tier", "medium"])


def test_cli_reports_bad_arguments(capsys):
    assert cli.main(["bench", "--tier", "nope"]) == 2
    assert "unknown tier 'nope'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# tiers
# ---------------------------------------------------------------------------------------------
def test_tier_registry():
    assert tiers.public() == ["fixture", "small", "medium", "large", "ood_large", "xlarge"]
    sizes = {t.name: (t.source, t.cells, t.n_vars, t.var_names) for t in tiers.TIERS.values()}
    assert sizes == {
        "fixture": ("fixture", 100, None, "velocity_genes"),
        "small": ("pancreas", 1500, None, "velocity_genes"),
        "medium": ("pancreas", 3696, None, "velocity_genes"),
        "large": ("simulated", 9815, 200, "all"),
        "ood_large": ("simulated", 5780, 200, "all"),
        "xlarge": ("simulated", 50_000, 20, "all"),
        "tiny": ("simulated", 200, 6, "all"),
    }
    assert tiers.TIERS["tiny"].hidden and tiers.TIERS["medium"].n_obs is None
    assert [t.name for t in tiers.resolve("all")] == tiers.public()
    assert [t.name for t in tiers.resolve("tiny, small,tiny")] == ["tiny", "small"]
    assert [t.name for t in tiers.resolve("xlarge,all")][:2] == ["xlarge", "fixture"]
    with pytest.raises(ValueError, match="no tier"):
        tiers.resolve(" , ")


def test_tier_siblings():
    """``--bucket-reuse``'s other dataset: ~2% fewer cells, same size bucket."""
    from jaxvelo.core.batch import size_bucket

    assert tiers.sibling(tiers.TIERS["fixture"]) is None
    for name, cells in (("tiny", 196), ("small", 1473), ("medium", 3623), ("large", 9729),
                        ("xlarge", 49_153)):  # fmt: skip
        tier = tiers.TIERS[name]
        sib = tiers.sibling(tier)
        assert sib.n_obs == cells and sib.source == tier.source and sib.hidden
        assert size_bucket(cells) == size_bucket(tier.cells) and cells < tier.cells


def test_tier_cache_path(tmp_path):
    large, small = tiers.TIERS["large"], tiers.TIERS["small"]
    p = tiers.cache_path(large, tmp_path)
    assert p.parent == tmp_path and p.name.startswith("large-") and p.suffix == ".h5ad"
    assert tiers.cache_path(large, tmp_path) == p
    assert tiers.cache_path(tiers.TIERS["ood_large"], tmp_path) != p
    with pytest.raises(ValueError, match="--data"):
        tiers.cache_path(small, tmp_path)
    raw = tmp_path / "raw.h5ad"
    raw.write_bytes(b"a")
    first = tiers.cache_path(small, tmp_path, raw)
    raw.write_bytes(b"ab")  # another input file -> another cache entry
    assert tiers.cache_path(small, tmp_path, raw) != first


# ---------------------------------------------------------------------------------------------
# thread pinning and child helpers
# ---------------------------------------------------------------------------------------------
def test_child_env_pins_threads():
    base = {"XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_cpu_multi_thread_eigen=true",
            "JAX_COMPILATION_CACHE_DIR": "/somewhere", "JAXVELO_CACHE_DIR": "/old",
            "PYTHONPATH": "/elsewhere"}  # fmt: skip
    one = run.child_env(1, {"JAXVELO_CACHE_DIR": "/new"}, base=base)
    assert all(one[v] == "1" for v in run.THREAD_VARS)
    assert one["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_cpu_multi_thread_eigen=false"
    assert "JAX_COMPILATION_CACHE_DIR" not in one and one["JAXVELO_CACHE_DIR"] == "/new"
    assert one["PYTHONPATH"].split(os.pathsep) == [str(run.REPO_ROOT), "/elsewhere"]
    assert one["JAX_PLATFORMS"] == "cpu"
    two = run.child_env(2, base={})
    assert two["OMP_NUM_THREADS"] == "2" and "XLA_FLAGS" not in two
    assert "JAXVELO_CACHE_DIR" not in two


def test_child_helpers():
    assert child.clean_json({"a": [1.0, math.nan], "b": {"c": math.inf}}) == {
        "a": [1.0, None], "b": {"c": None}}  # fmt: skip
    mem = child.memory()
    assert mem["peak_rss_mb"] > 10 and mem["peak_rss_children_mb"] >= 0


# ---------------------------------------------------------------------------------------------
# report from a fake measurement list
# ---------------------------------------------------------------------------------------------
def _fit(tier, threads, tool, process, seconds, rep=0, n_obs=1500, rss=500.0, **kw):
    rec = {"role": "fit", "tier": tier, "threads": threads, "tool": tool, "process": process,
           "repeat": rep, "seconds": seconds, "n_obs": n_obs, "n_vars": 1000,
           "n_genes_fitted": 500, "peak_rss_mb": rss, "peak_rss_children_mb": 0.0,
           "versions": {"scvelo": "0.3.4"}}  # fmt: skip
    rec.update(kw)
    return rec


def _fake_results() -> dict:
    meas = []
    for rep, (s, f, w, c) in enumerate([(40, 100, 60, 65), (44, 110, 62, 70), (42, 90, 61, 60)]):
        meas += [
            _fit("small", 2, "scvelo", "run", {"run": s}, rep),
            _fit("small", 2, "jaxvelo", "first", {"first": f, "warm": w}, rep, cache_entries=3),
            _fit("small", 2, "jaxvelo", "cold", {"cold": c}, rep, rss=300.0 + rep),
            _fit("small", 2, "autozyme", "run", {"run": 10.0, "warm": 8.0}, rep),
        ]
    meas += [
        _fit("xlarge", 1, "scvelo", "run", {"run": 400.0}, n_obs=50_000),
        _fit("xlarge", 1, "jaxvelo", "first", {"first": 150.0, "warm": 100.0}, n_obs=50_000),
        {"role": "fit", "tier": "xlarge", "threads": 1, "tool": "jaxvelo", "process": "cold",
         "error": "exit status -9", "log_tail": "Killed"},
        {"role": "concordance", "tier": "small", "threads": 2, "tool": "jaxvelo",
         "n_genes_ref": 500, "n_genes_test": 500, "n_genes_differ": 0,
         "pearson": {"alpha": 1.0, "beta": 1.0, "gamma": 1.0, "t_": 0.9999, "likelihood": 1.0},
         "frac_within_1e6": 0.998, "max_rel_diff": {"alpha": 1e-8}, "velocity_pearson": None,
         "passed": True, "n_diverging": 1, "diverging_genes": ["Anp32b"]},
    ]  # fmt: skip
    return {
        "meta": {"date": "2026-01-01T00:00:00", "command": ["jaxvelo", "bench"],
                 "machine": {"cpu_model": "test CPU", "nproc": 2, "loadavg_start": [1, 1, 1]},
                 "config": {"threads": [1, 2], "repeats": 3, "pinning": "affinity"},
                 "notes": ["scvelo_rs: not importable in this environment; skipped"],
                 "versions": {"scvelo": "0.3.4"}},
        "tiers": {"small": {"description": "pancreas", "n_obs": 1500, "n_vars": 1000}},
        "measurements": meas,
    }  # fmt: skip


def test_summarize_fake_measurements():
    rows = report.summarize(_fake_results()["measurements"])
    assert [(r["tier"], r["threads"]) for r in rows] == [("small", 2), ("xlarge", 1)]
    small, xlarge = rows
    s, j, a = (small["tools"][k] for k in ("scvelo", "jaxvelo", "autozyme"))
    assert s["run_s"] == 42 and s["samples"]["run"] == [40, 44, 42]
    assert (j["first_s"], j["warm_s"], j["cold_s"]) == (100, 61, 65)
    assert j["compile_s"] == 40  # median of 40, 48, 29
    assert j["speedup_warm"] == pytest.approx(42 / 61) and j["speedup_cold"] == 42 / 65
    assert j["cache_entries"] == 3 and j["peak_rss_mb"] == 500 and j["peak_rss_cold_mb"] == 302
    assert a["speedup_run"] == 4.2 and a["warm_s"] == 8
    assert small["concordance"]["jaxvelo"]["diverging_genes"] == ["Anp32b"]
    assert small["n_genes_fitted"] == {"scvelo": 500, "jaxvelo": 500, "autozyme": 500}
    xj = xlarge["tools"]["jaxvelo"]
    assert xj["cold_s"] is None and xj["speedup_cold"] is None and xj["speedup_warm"] == 4
    assert xlarge["errors"] == ["jaxvelo/cold: exit status -9"] and xlarge["n_obs"] == 50_000


def test_write_results(tmp_path):
    files = report.write(tmp_path, _fake_results())
    names = {f.name for f in files}
    assert names == {"results.json", "results.md", "speedup.png", "runtime_vs_cells.png"}
    data = json.loads((tmp_path / "results.json").read_text())
    assert {"meta", "tiers", "measurements", "summary"} <= data.keys()
    assert data["summary"][0]["tools"]["jaxvelo"]["speedup_cold"] == pytest.approx(42 / 65)
    md = (tmp_path / "results.md").read_text()
    assert "| small | 1500 × 500 | 2 | 42.0 | 100.0 | 65.0 | 61.0 | 40.0 |" in md
    assert "| xlarge | 50000 × 500 | 1 | 400.0 | 150.0 | – | 100.0 | 50.0 |" in md
    assert "| 500 / 500 (302) |" in md and "/ 4.00× | 500 / 500 (–) |" in md
    for heading in ("## Peers", "## Concordance with scVelo", "## Notes", "## Tiers"):
        assert heading in md
    assert "1 diverging: Anp32b" in md and "scvelo_rs: not importable" in md
    assert "xlarge / 1 thr: jaxvelo/cold: exit status -9" in md
    for png in ("speedup.png", "runtime_vs_cells.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC


def test_bucket_reuse_report():
    """``--bucket-reuse`` records: the sibling's first run (``prime``) and the tier's cold
    call from its cache (``cold_bucket``); reused when the cold call added no entry."""
    meas = []
    for rep, (c, b, entries) in enumerate([(20, 21, 1), (22, 19, 1), (21, 23, 1)]):
        meas += [
            _fit("medium", 2, "scvelo", "run", {"run": 180.0}, rep),
            _fit("medium", 2, "jaxvelo", "first", {"first": 45, "warm": 20}, rep, cache_entries=1),
            _fit("medium", 2, "jaxvelo", "cold", {"cold": c}, rep),
            _fit("medium", 2, "jaxvelo", "prime", {"prime": 44}, rep, cache_entries=1),
            _fit(
                "medium",
                2,
                "jaxvelo",
                "cold_bucket",
                {"cold_bucket": b},
                rep,
                cache_entries=entries,
            ),  # fmt: skip
        ]
    (row,) = report.summarize(meas)
    j = row["tools"]["jaxvelo"]
    assert (j["cold_s"], j["cold_bucket_s"], j["speedup_cold_bucket"]) == (21, 21, 180 / 21)
    assert j["bucket_reused"] is True and j["first_s"] == 45  # the prime is not a first run
    md = report.markdown({"meta": {}, "summary": [row],
                          "tiers": {"medium_sibling": {"n_obs": 3623}}})  # fmt: skip
    assert "| medium | 2 | 3623 | 21.0 | 21.0 | 8.57× / 8.57× | yes |" in md
    meas[-1]["cache_entries"] = 2  # the last cold call compiled a program of its own
    assert report.summarize(meas)[0]["tools"]["jaxvelo"]["bucket_reused"] is False


def test_write_results_without_measurements(tmp_path):
    report.write(tmp_path, {"meta": {}, "measurements": []})
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == []
    assert (tmp_path / "speedup.png").read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------------------------------------
# end to end, real subprocesses, on the hidden 200-cell x 6-gene tier
# ---------------------------------------------------------------------------------------------
def _run_tiny(tmp_path, *extra: str) -> tuple[int, Path]:
    out = tmp_path / "out"
    argv = ["bench", "--tier", "tiny", "--threads", "1", "--repeats", "1", "--out", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--timeout", "900", *extra]  # fmt: skip
    return cli.main(argv), out


def _check_outputs(out: Path) -> dict:
    for name in ("results.json", "results.md", "speedup.png", "runtime_vs_cells.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())
    assert {"meta", "tiers", "measurements", "summary"} <= data.keys()
    assert data["meta"]["config"]["threads"] == [1]
    assert data["tiers"]["tiny"]["n_obs"] == 200 and data["tiers"]["tiny"]["n_vars"] == 6
    assert not [m for m in data["measurements"] if m.get("error")]
    return data


def test_end_to_end_scvelo_only(tmp_path):
    rc, out = _run_tiny(tmp_path, "--tools", "scvelo")
    assert rc == 0
    data = _check_outputs(out)
    (fit,) = [m for m in data["measurements"] if m["role"] == "fit"]
    assert fit["cpus"] == run.available_cpus()[:1] and fit["n_genes_fitted"] == 6
    assert fit["seconds"]["run"] > 0 and fit["peak_rss_mb"] > 0
    row = data["summary"][0]
    assert (row["tier"], row["threads"], row["n_obs"]) == ("tiny", 1, 200)
    assert "| tiny | 200 × 6 | 1 |" in (out / "results.md").read_text()
    # the second run reads the preprocessed tier from the cache
    rc, out = _run_tiny(tmp_path, "--tools", "scvelo")
    assert rc == 0 and json.loads((out / "results.json").read_text())["tiers"]["tiny"]["cached"]


@pytest.mark.slow
def test_end_to_end_with_jaxvelo(tmp_path):
    """Real scVelo and jaxvelo runs; minutes while a fresh process compiles jaxvelo's program.
    With ``--bucket-reuse``: the 196-cell sibling's first run fills a cache from which the
    200-cell tier's cold call runs without a new program."""
    rc, out = _run_tiny(tmp_path, "--tools", "scvelo,jaxvelo", "--bucket-reuse")
    assert rc == 0
    data = _check_outputs(out)
    j = data["summary"][0]["tools"]["jaxvelo"]
    for key in ("first_s", "cold_s", "warm_s", "compile_s", "speedup_cold", "speedup_warm",
                "peak_rss_mb", "cold_bucket_s", "speedup_cold_bucket"):  # fmt: skip
        assert j[key] is not None and j[key] > 0, key
    assert j["bucket_reused"] is True
    assert data["tiers"]["tiny_sibling"]["n_obs"] == 196
    assert "## Cold from another dataset's cache" in (out / "results.md").read_text()
    c = data["summary"][0]["concordance"]["jaxvelo"]
    assert c["n_genes_differ"] == 0 and {"pearson", "frac_within_1e6", "passed"} <= c.keys()
    assert not (out / "fits").exists()  # removed after the concordance without --keep-fits


def test_gpu_check_gate_counts_per_gene():
    # bench/gpu_check.py's concordance per gene: the worst relative difference over the fit
    # columns (and fit_t when the reference has it); NaN matching NaN is agreement.
    import anndata as ad
    import numpy as np
    import pandas as pd

    from bench import gpu_check

    genes = ["g0", "g1", "g2", "g3"]
    ref_var = np.array([[1.0, 2.0], [1.0, np.nan], [3.0, 4.0], [5.0, 6.0]])
    got_var = ref_var.copy()
    got_var[2, 1] *= 1 + 1e-9  # within 1e-6, not bitwise
    got_var[3, 0] *= 1 + 1e-3  # beyond
    var = pd.DataFrame(got_var, index=genes, columns=["fit_alpha", "fit_beta"])
    adata = ad.AnnData(np.zeros((3, 4), np.float32), var=var)
    t = np.arange(12.0).reshape(3, 4) + 1
    adata.layers["fit_t"] = t
    ref = {"genes": np.array(genes), "cols": np.array(["fit_alpha", "fit_beta"]), "var": ref_var}
    r = gpu_check.gate(adata, ref)
    assert r == {"genes": 4, "bitwise": 2, "within_1e-6": 3, "worst_rel": r["worst_rel"],
                 "fitted_same": True}  # fmt: skip
    assert abs(r["worst_rel"] - 1e-3) < 1e-12
    t_off = t.copy()
    t_off[1, 0] *= 1 + 1e-4  # gene g0's time moves: g0 is no longer bitwise nor within
    r = gpu_check.gate(adata, {**ref, "fit_t": t_off})
    assert (r["bitwise"], r["within_1e-6"]) == (1, 2)
