"""Command line: ``jaxvelo fit IN.h5ad -o OUT.h5ad``, ``jaxvelo demo`` and ``jaxvelo bench``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path


def _none_or(kind):
    def parse(text: str):
        if text.lower() in ("none", "null"):
            return None
        if kind is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
        return kind(text)

    return parse


def _fit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--var-names", default="velocity_genes",
                   help="'velocity_genes' (default), 'all', a boolean var column or a "
                        "comma-separated list of genes")  # fmt: skip
    p.add_argument("--n-top-genes", type=int, default=None)
    p.add_argument("--max-iter", type=int, default=10)
    p.add_argument("--assignment-mode", type=_none_or(str), default="projection")
    p.add_argument("--t-max", default=None, help="number, or 'false' to skip alignment")
    p.add_argument("--fit-scaling", type=_none_or(bool), default=True)
    p.add_argument("--fit-steady-states", type=_none_or(bool), default=True)
    p.add_argument("--fit-connected-states", type=_none_or(bool), default=None)
    p.add_argument("--fit-basal-transcription", type=_none_or(bool), default=None)
    p.add_argument("--use-raw", action="store_true")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--n-jobs", type=int, default=None)


def _kwargs(args) -> dict:
    var_names = args.var_names
    if "," in var_names:
        var_names = [v for v in var_names.split(",") if v]
    t_max = args.t_max
    if t_max is not None:
        t_max = False if str(t_max).lower() == "false" else float(t_max)
    return dict(
        var_names=var_names,
        n_top_genes=args.n_top_genes,
        max_iter=args.max_iter,
        assignment_mode=args.assignment_mode,
        t_max=t_max,
        fit_scaling=args.fit_scaling,
        fit_steady_states=args.fit_steady_states,
        fit_connected_states=args.fit_connected_states,
        fit_basal_transcription=args.fit_basal_transcription,
        use_raw=args.use_raw,
        batch_size=args.batch_size,
        n_jobs=args.n_jobs,
    )


def _cmd_fit(args) -> int:
    import anndata

    import jaxvelo

    adata = anndata.read_h5ad(args.input)
    t = time.perf_counter()
    jaxvelo.recover_dynamics(adata, show_progress_bar=not args.quiet, method=args.method,
                             **_kwargs(args))  # fmt: skip
    dt = time.perf_counter() - t
    n = int((~adata.var["fit_alpha"].isna()).sum())
    adata.write_h5ad(args.output)
    print(f"fitted {n} genes in {dt:.2f} s -> {args.output}")
    return 0


def _load_demo_data(args):
    from . import datasets

    if args.data:
        import anndata

        adata = anndata.read_h5ad(args.data)
        if "Ms" not in adata.layers:
            adata = datasets.preprocess(adata)
        return adata, args.data
    if args.dataset == "simulated":
        return datasets.simulated(args.n_obs, args.n_vars, seed=0), (
            f"simulated {args.n_obs} cells x {args.n_vars} genes"
        )
    if args.dataset == "pancreas":
        return datasets.pancreas(n_obs=args.n_obs), f"pancreas ({args.n_obs or 3696} cells)"
    return datasets.fixture(args.dataset), f"scVelo fixture {args.dataset}"


def _cmd_demo(args) -> int:
    import scvelo as scv

    import jaxvelo
    from jaxvelo.concordance import compare

    adata, label = _load_demo_data(args)
    print(f"dataset: {label} -> {adata.n_obs} cells x {adata.n_vars} genes after preprocessing")
    kw = _kwargs(args)
    kw.pop("batch_size")
    ref = adata.copy()
    test = adata.copy()
    scv.settings.verbosity = 0
    t = time.perf_counter()
    jaxvelo.recover_dynamics(test, show_progress_bar=False, batch_size=args.batch_size, **kw)
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    jaxvelo.recover_dynamics(adata.copy(), show_progress_bar=False, batch_size=args.batch_size,
                             **kw)  # fmt: skip
    t_warm = time.perf_counter() - t
    print(f"jaxvelo: first call {t_first:.2f} s (includes compilation), second call {t_warm:.2f} s")
    if args.no_reference:
        return 0
    t = time.perf_counter()
    scv.tl.recover_dynamics(ref, show_progress_bar=False, **kw)
    t_ref = time.perf_counter() - t
    print(f"scVelo 0.3.4: {t_ref:.2f} s  (speed-up warm {t_ref / t_warm:.1f}x)")
    print(compare(ref, test).summary())
    return 0


def _load_bench():
    """Import the repository's ``bench`` package (it is not installed with jaxvelo).

    ``bench/`` sits next to the ``jaxvelo/`` package directory in a clone; an editable install
    (``pip install -e .``) imports jaxvelo from there, so the repository root is two levels
    above this file. The root goes first on ``sys.path`` (the children get it through
    ``PYTHONPATH``), and the imported module is checked to be that directory's.
    """
    root = Path(__file__).resolve().parent.parent
    init = root / "bench" / "__init__.py"
    if not init.is_file():
        raise SystemExit(
            "jaxvelo bench: the benchmark suite is the repository's bench/ directory, which is "
            f"not next to this jaxvelo ({root}). Run it from a git clone installed with "
            "`pip install -e .`."
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import bench
    import bench.run

    if Path(bench.__file__).resolve() != init:
        raise SystemExit(f"jaxvelo bench: `import bench` found {bench.__file__}, not {init}")
    return bench


def _cmd_bench(args) -> int:
    bench = _load_bench()
    try:
        cfg = bench.run.config_from_args(args)
    except ValueError as e:
        print(f"jaxvelo bench: error: {e}", file=sys.stderr)
        return 2
    return bench.run.run(cfg)


def _bench_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tier",
        default="small",
        help="fixture (scVelo's 100-cell pancreas fixture), small (1500-cell pancreas, "
        "default), medium (3696-cell pancreas), "
        "large (simulated 9815 x 200), ood_large (simulated 5780 x 200), "
        "xlarge (simulated 50000 x 20), a comma-separated list, or all",
    )
    p.add_argument(
        "--threads",
        default=None,
        help="comma-separated thread counts, e.g. 1,2 (default: 1 and all CPUs; "
        "with --quick all CPUs only)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="repeats per tier and thread count; medians are reported (default 3, 1 with --quick)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="one repeat and one thread count (all CPUs) unless given",
    )
    p.add_argument(
        "--data",
        default=None,
        help="raw pancreas_3696.h5ad for the pancreas tiers (default: "
        "$JAXVELO_PANCREAS or ../shared/data)",
    )
    p.add_argument(
        "--out", default=None, help="output directory (default bench/results/<date>_<time>)"
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where preprocessed tiers are kept (default <data cache>/bench, "
        "see $JAXVELO_DATA_DIR)",
    )
    p.add_argument(
        "--tools",
        default=None,
        help="comma-separated subset of scvelo,jaxvelo,autozyme,scvelo_rs "
        "(default all; peers that cannot be imported are skipped)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds after which a single step is stopped (default none)",
    )
    p.add_argument("--keep-fits", action="store_true",
                   help="keep the fitted h5ad files (fits/) used for the concordance")  # fmt: skip
    p.add_argument("--bucket-reuse", action="store_true",
                   help="also time jaxvelo's cold call from a cache filled only by another "
                        "dataset of the same cell-count bucket (~2%% fewer cells)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The ``jaxvelo`` argument parser (subcommands ``fit``, ``demo``, ``bench``)."""
    parser = argparse.ArgumentParser(prog="jaxvelo", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    pf = sub.add_parser("fit", help="fit scVelo's dynamical model to an h5ad file")
    pf.add_argument("input")
    pf.add_argument("-o", "--output", required=True)
    pf.add_argument("-q", "--quiet", action="store_true")
    _fit_options(pf)
    pf.add_argument("--method", choices=["scvelo", "gradient"], default="scvelo",
                    help="scvelo: exact (default); gradient: optax (docs/gradient.md)")  # fmt: skip
    pd = sub.add_parser("demo", help="fit a default dataset and compare with scVelo")
    pd.add_argument("--dataset", default="simulated",
                    help="simulated (default, no download), pancreas (../shared), or an "
                         "scVelo fixture name such as pancreas_100obs")  # fmt: skip
    pd.add_argument("--data", default=None, help="path to an h5ad file instead")
    pd.add_argument("--n-obs", type=int, default=None)
    pd.add_argument("--n-vars", type=int, default=100)
    pd.add_argument("--no-reference", action="store_true", help="skip the scVelo run")
    _fit_options(pd)
    pb = sub.add_parser(
        "bench",
        help="side-by-side benchmark against scVelo 0.3.4 (needs the repository's bench/)",
        description="Times jaxvelo (first run, cold, warm) against scVelo 0.3.4 and importable "
        "peers in fresh, thread-pinned subprocesses; writes results.json, results.md and PNG "
        "charts. See docs/benchmarks.md.",
    )
    _bench_options(pb)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jaxvelo`` console script."""
    args = build_parser().parse_args(argv)
    if args.cmd == "demo" and args.dataset == "simulated" and args.n_obs is None:
        args.n_obs = 1000
    if args.cmd == "bench":
        args.command = ["jaxvelo"] + list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    return {"fit": _cmd_fit, "demo": _cmd_demo, "bench": _cmd_bench}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
