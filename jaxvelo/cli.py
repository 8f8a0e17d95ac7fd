"""Command line: ``jaxvelo fit IN.h5ad -o OUT.h5ad`` and ``jaxvelo demo``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings


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
    jaxvelo.recover_dynamics(adata, show_progress_bar=not args.quiet, **_kwargs(args))
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jaxvelo`` console script."""
    parser = argparse.ArgumentParser(prog="jaxvelo", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    pf = sub.add_parser("fit", help="fit scVelo's dynamical model to an h5ad file")
    pf.add_argument("input")
    pf.add_argument("-o", "--output", required=True)
    pf.add_argument("-q", "--quiet", action="store_true")
    _fit_options(pf)
    pd = sub.add_parser("demo", help="fit a default dataset and compare with scVelo")
    pd.add_argument("--dataset", default="simulated",
                    help="simulated (default, no download), pancreas (../shared), or an "
                         "scVelo fixture name such as pancreas_100obs")  # fmt: skip
    pd.add_argument("--data", default=None, help="path to an h5ad file instead")
    pd.add_argument("--n-obs", type=int, default=None)
    pd.add_argument("--n-vars", type=int, default=100)
    pd.add_argument("--no-reference", action="store_true", help="skip the scVelo run")
    _fit_options(pd)
    args = parser.parse_args(argv)
    if args.cmd == "demo" and args.dataset == "simulated" and args.n_obs is None:
        args.n_obs = 1000
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    return {"fit": _cmd_fit, "demo": _cmd_demo}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
