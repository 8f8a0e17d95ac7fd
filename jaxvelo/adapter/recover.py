"""``jaxvelo.recover_dynamics``: scVelo 0.3.4's signature and outputs, jaxvelo's core.

This is the AnnData edge. It validates input, resolves genes with scVelo's own code
(``Velocity.compute_deterministic`` for velocity genes), extracts dense per-gene arrays,
runs the batched core, and writes exactly what ``scvelo.tl.recover_dynamics`` writes
(``_em_model_core.py`` ~540-660), then ``align_dynamics``. All results are computed before
the first write, so a failure leaves the AnnData untouched.

With ``return_model`` the last fitted gene's model is returned as upstream's
``DynamicsRecovery`` object, filled with jaxvelo's results instead of being fitted again
(:func:`_model`); ``plot_results`` draws the parameter and loss traces (:func:`_plot_results`).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
from scipy.sparse import issparse

from ..core.batch import fit_genes, neighbors_from_csr, preload_kernels
from ..core.em import FitConfig, Loaded
from ..core.gradient import GradientConfig

logger = logging.getLogger("jaxvelo")

_PAR_NAMES = ["alpha", "beta", "gamma", "t_", "scaling", "std_u", "std_s"]
_PAR_NAMES += ["likelihood", "u0", "s0", "pval_steady", "steady_u", "steady_s", "variance"]
_ASSIGNMENT_MODES = (None, "inverse", "projection", "full_projection", "partial_projection")


class _Writes:
    """Collects every change to the AnnData and applies them at the end."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, Any, Any]] = []

    def add(self, where: str, key: Any, value: Any) -> None:
        self.ops.append((where, key, value))

    def apply(self, adata) -> None:
        for where, key, value in self.ops:
            getattr(adata, where)[key] = value


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if issparse(x) else x)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def _resolve_var_names(adata, var_names, use_raw: bool, writes: _Writes):
    """Gene selection as upstream (core ~510-530), with clear errors."""
    if isinstance(var_names, str) and var_names not in adata.var_names:
        if var_names in adata.var.keys():
            col = adata.var[var_names].values
            if col.dtype != bool:
                raise ValueError(f"var column {var_names!r} is not boolean.")
            var_names = adata.var_names[col]
        elif use_raw or var_names == "all":
            if var_names != "all":
                logger.warning(
                    "var_names=%r is neither a gene nor a var column: fitting all genes "
                    "(scVelo's rule with use_raw=True).",
                    var_names,
                )
            var_names = adata.var_names
        elif "_genes" in var_names:
            from scvelo.tools.velocity import Velocity

            velo = Velocity(adata, use_raw=use_raw)
            velo.compute_deterministic(perc=[5, 95])
            var_names = adata.var_names[velo._velocity_genes]
            writes.add("var", "fit_r2", velo._r2)
        else:
            raise ValueError(f"Variable name {var_names!r} not found in var_names or var keys.")
    if isinstance(var_names, str):
        var_names = [var_names]
    var_names = list(np.ravel(np.asarray(var_names, dtype=object)))
    if not all(isinstance(v, str) for v in var_names):
        raise TypeError("`var_names` must be gene names (str), a list of them, or a var key.")
    unknown = [v for v in var_names if v not in adata.var_names]
    if unknown and len(unknown) == len(var_names):
        raise ValueError(f"Variable names not found in adata.var_names: {unknown[:5]}.")
    if unknown:  # upstream drops them silently (core ~522)
        logger.warning(
            "%d requested var_names not in adata.var_names, skipped: %s",
            len(unknown),
            unknown[:10],
        )
    # make_unique_list keeps the first occurrence, order preserved (pandas.unique)
    seen: dict[str, None] = {}
    for v in var_names:
        if v in adata.var_names:
            seen.setdefault(v, None)
    return np.array(list(seen))


def _layer(adata, key: str) -> Any:
    if key not in adata.layers.keys():
        raise KeyError(f"layer {key!r} not found in adata.layers.")
    return adata.layers[key]


def _is_real(dtype) -> bool:
    return (
        dtype is not None
        and np.issubdtype(dtype, np.number)
        and not np.issubdtype(dtype, np.complexfloating)
    )


def _check_numeric(adata, key: str) -> None:
    dtype = getattr(_layer(adata, key), "dtype", None)
    if not _is_real(dtype):
        raise TypeError(f"layer {key!r} must be numeric (int or float), got dtype {dtype}.")


def _extract(adata, key: str, cols: np.ndarray) -> np.ndarray:
    X = _layer(adata, key)
    X = X[:, cols]
    X = _dense(X)
    if not _is_real(X.dtype):
        raise TypeError(f"layer {key!r} must be numeric (int or float), got dtype {X.dtype}.")
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float64)  # make_dense keeps ints; division promotes to float64
    if not np.all(np.isfinite(X)):
        raise ValueError(f"layer {key!r} contains NaN or inf for the genes to fit.")
    if np.any(X < 0):
        raise ValueError(f"layer {key!r} contains negative values for the genes to fit.")
    return np.array(X)


def _read_pars(adata, names, n_vars):
    out = []
    for name in names:
        key = f"fit_{name}"
        if key in adata.var.keys():
            out.append(np.array(adata.var[key].values, dtype=float, copy=True))
        else:
            out.append(np.full(n_vars, np.nan))
    return out


def recover_dynamics(
    data,
    var_names="velocity_genes",
    n_top_genes=None,
    max_iter=10,
    assignment_mode="projection",
    t_max=None,
    fit_time=True,
    fit_scaling=True,
    fit_steady_states=True,
    fit_connected_states=None,
    fit_basal_transcription=None,
    use_raw=False,
    load_pars=None,
    return_model=None,
    plot_results=False,
    steady_state_prior=None,
    add_key="fit",
    copy=False,
    n_jobs=None,
    backend="loky",
    show_progress_bar: bool = True,
    *,
    batch_size: int | None = None,
    method: str = "scvelo",
    **kwargs,
):
    """Recover the full splicing kinetics of the given genes (scVelo's dynamical model).

    Drop-in for ``scvelo.tl.recover_dynamics`` (scVelo 0.3.4): the same parameters and the
    same outputs, computed by jaxvelo's batched JAX core.

    Parameters
    ----------
    data
        AnnData with ``spliced``/``unspliced`` (and ``Ms``/``Mu``) layers.
    var_names
        Genes to fit: ``"velocity_genes"`` (default; derived with scVelo's steady-state model
        when no such column exists), ``"all"``, a boolean var column name, a gene name or
        a list of names.
    n_top_genes, max_iter, assignment_mode, t_max, fit_time, fit_scaling, fit_steady_states,
    fit_connected_states, fit_basal_transcription, use_raw, load_pars, steady_state_prior,
    add_key, copy, n_jobs, backend, show_progress_bar
        As in scVelo 0.3.4 (``add_key`` is ignored there too: keys are always ``fit_*``;
        ``n_jobs`` is the number of threads running gene batches at once and ``backend`` is
        ignored, neither changes the results; ``steady_state_prior`` may also be a list).
    return_model
        Return the last fitted gene's model, a ``scvelo.tools.DynamicsRecovery`` holding
        jaxvelo's fit (the results are written all the same, to the copy with ``copy``).
        Default (None): when fewer than 5 genes are fitted, as upstream.
    plot_results
        Draw the parameter (alpha, beta, gamma, t_, scaling) and loss traces of the first
        four fitted genes in a new matplotlib figure (what upstream's code intends; it
        raises IndexError there).
    batch_size
        Genes per compiled batch. Default: chosen from the memory budget
        (``$JAXVELO_MEMORY_BUDGET``, default 1 GiB for the batches in flight) and balanced
        over ``n_jobs``, at most 64 genes and 24k genes x cells (but 16 genes at least;
        ``jaxvelo.core.batch.auto_batch_size``). The exact
        mode's results do not depend on it.
    method
        ``"scvelo"`` (default): scVelo's EM with Nelder-Mead, exact. ``"gradient"``: the same
        model fitted by Adam (optax) through the closed-form ODE solution, alternating with
        the exact time assignment (:mod:`jaxvelo.core.gradient`, docs/gradient.md); not
        scVelo's numbers. ``max_iter`` is not used there; ``load_pars`` and
        ``high_pars_resolution`` are refused.
    **kwargs
        ``DynamicsRecovery`` keyword arguments (``high_pars_resolution``, ``init_vals``,
        ``perc``); with ``method="gradient"`` also ``rounds`` (time assignments, default 8),
        ``steps`` (Adam steps per round, default 50), ``learning_rate`` (default 0.05, on
        the log-parameters) and ``gradient_scaling`` (default False: ``scaling`` keeps the
        value of the initial scaling search; True takes gradient steps on it too, which
        lowers the loss but worsens the recovered gamma/beta, docs/gradient.md).

    Returns
    -------
    The model with ``return_model``, else ``adata`` if ``copy`` else None.
    Writes to ``adata.var``: ``fit_alpha, fit_beta, fit_gamma, fit_t_, fit_scaling,
    fit_std_u, fit_std_s, fit_likelihood, fit_u0, fit_s0, fit_pval_steady, fit_steady_u,
    fit_steady_s, fit_variance, fit_alignment_scaling`` (and ``fit_r2`` for velocity genes);
    ``adata.layers``: ``fit_t, fit_tau, fit_tau_``; ``adata.varm["loss"]``;
    ``adata.uns["recover_dynamics"]``.
    """
    from scvelo.core import get_n_jobs
    from scvelo.preprocessing.moments import get_connectivities

    t0 = time.perf_counter()
    high_pars_resolution = kwargs.pop("high_pars_resolution", False)
    init_vals = kwargs.pop("init_vals", None)
    perc = kwargs.pop("perc", 99)
    if method not in ("scvelo", "gradient"):
        raise ValueError(f"`method` must be 'scvelo' or 'gradient', got {method!r}.")
    grad_keys = ("rounds", "steps", "learning_rate", "gradient_scaling")
    grad_opts = {k: kwargs.pop(k) for k in grad_keys if k in kwargs}
    if grad_opts and method != "gradient":
        raise TypeError(f"{sorted(grad_opts)} only apply to method='gradient'.")
    if method == "gradient":
        _check_gradient_options(grad_opts, load_pars, high_pars_resolution, max_iter)
    if kwargs:
        raise TypeError(f"unexpected keyword arguments: {sorted(kwargs)}")
    if not load_pars and fit_time is not True and not (isinstance(fit_time, str) and fit_time):
        # utils ~962-992: without load_pars there are no stored times to keep; scVelo 0.3.4
        # fails with "TypeError: 'NoneType' object is not subscriptable" (a non-empty string
        # is truthy there and refits as True).
        raise ValueError(
            f"fit_time={fit_time!r} keeps the stored time assignment and needs load_pars=True "
            "(scVelo 0.3.4 raises TypeError here)."
        )
    if assignment_mode not in _ASSIGNMENT_MODES:
        raise ValueError(
            f"`assignment_mode` must be one of {_ASSIGNMENT_MODES}, got {assignment_mode!r}."
        )
    _check_int("max_iter", max_iter, 0)
    if n_top_genes is not None:
        _check_int("n_top_genes", n_top_genes, 1)
    if data.n_obs == 0:
        raise ValueError("the AnnData has no cells.")
    if data.n_vars == 0:
        raise ValueError("the AnnData has no genes.")

    adata = data.copy() if copy else data
    n_jobs = get_n_jobs(n_jobs=n_jobs)
    logger.info("recovering dynamics (jaxvelo, %d/%d cores)", n_jobs, os.cpu_count())

    if len(set(adata.var_names)) != len(adata.var_names):
        logger.warning("Duplicate var_names found. Making them unique.")
        adata.var_names_make_unique()

    for key in ("spliced", "unspliced"):
        _layer(adata, key)
    if "Ms" not in adata.layers.keys() or "Mu" not in adata.layers.keys():
        if not use_raw:
            logger.warning("layers 'Ms'/'Mu' not found: fitting raw counts (use_raw=True).")
        use_raw = True
    ukey, skey = ("unspliced", "spliced") if use_raw else ("Mu", "Ms")
    for key in (ukey, skey):
        _check_numeric(adata, key)
    if fit_connected_states is None:
        fit_connected_states = not use_raw

    preload_kernels()  # numba's kernels load while the genes are selected
    writes = _Writes()
    var_names = _resolve_var_names(adata, var_names, use_raw, writes)
    if len(var_names) == 0:
        raise ValueError("No variable names left to fit.")
    if n_top_genes is not None and len(var_names) > n_top_genes:
        cols = adata.var_names.get_indexer(var_names)
        X = _dense(_layer(adata, skey)[:, cols])
        var_names = var_names[np.argsort(np.sum(X, 0))[::-1][:n_top_genes]]
    if return_model is None:
        return_model = len(var_names) < 5  # core ~538

    cols = adata.var_names.get_indexer(var_names)
    u = _extract(adata, ukey, cols)
    s = _extract(adata, skey, cols)
    if fit_basal_transcription:
        u0, s0 = u.min(0), s.min(0)
        u, s = u - u0, s - s0
    else:
        u0 = s0 = np.zeros(len(cols))

    recoverable = np.sum((s > 0) & (u > 0), axis=0) > 2
    for gene in var_names[~recoverable]:
        logger.warning("%s not recoverable due to insufficient samples.", gene)
    if not recoverable.any():
        raise ValueError("None of the requested genes is recoverable (too few nonzero cells).")

    prior = None
    if steady_state_prior is not None:
        prior = np.asarray(steady_state_prior)
        if prior.shape != (adata.n_obs,) or not (
            prior.dtype == bool or np.issubdtype(prior.dtype, np.integer)
        ):
            raise ValueError("`steady_state_prior` must be a boolean mask over cells.")
        prior = prior.astype(bool)

    load = bool(load_pars) and "fit_alpha" in adata.var.keys()
    loaded, refit = None, True
    if load:
        loaded, refit = _loaded_pars(adata, cols[recoverable], fit_time)
    conn = get_connectivities(adata) if fit_connected_states else None
    nbrs = None if conn is None else neighbors_from_csr(conn.indptr, conn.indices, conn.data)
    cfg = FitConfig(
        n_obs=adata.n_obs,
        max_iter=int(max_iter),
        assignment_mode=None if assignment_mode == "inverse" else assignment_mode,
        fit_scaling=fit_scaling,
        fit_steady_states=bool(fit_steady_states),
        fit_time=refit,
        high_pars_resolution=bool(high_pars_resolution),
        perc=perc,
        load_pars=load,
    )
    if method == "gradient":
        cfg = GradientConfig(fit=cfg, **grad_opts)
    fit_cols = np.flatnonzero(recoverable)
    bar = None
    if show_progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(fit_cols), unit="gene", desc="recover_dynamics")
    try:
        res = fit_genes(
            u[:, fit_cols], s[:, fit_cols], cfg, nbrs=nbrs, prior=prior,
            batch_size=batch_size,
            init_vals=None if init_vals is None else tuple(np.ravel(init_vals).tolist()),
            progress=None if bar is None else bar.update, n_jobs=n_jobs, loaded=loaded,
        )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()

    idx = cols[fit_cols]
    names = var_names[fit_cols]
    m = _write_results(adata, writes, res, idx, u0[fit_cols], s0[fit_cols], conn, t_max, cfg)
    writes.add(
        "uns",
        "recover_dynamics",
        {
            "fit_connected_states": fit_connected_states,
            "fit_basal_transcription": fit_basal_transcription,
            "use_raw": use_raw,
            **(_gradient_uns(cfg) if method == "gradient" else {}),
        },
    )
    dm = None
    if return_model:
        dm = _model(
            adata,
            names[-1],
            {k: v[-1] for k, v in res.items()},
            m,
            use_raw=use_raw,
            perc=perc,
            max_iter=max_iter,
            fit_time=fit_time,
            fit_scaling=fit_scaling,
            fit_steady_states=fit_steady_states,
            conn=conn,
            fit_basal_transcription=fit_basal_transcription,
            high_pars_resolution=high_pars_resolution,
            steady_state_prior=steady_state_prior,
            init_vals=init_vals,
            assignment_mode=assignment_mode,
        )
    if plot_results:
        _plot_results(names, res, m)
    writes.apply(adata)
    logger.info("    finished (%.2fs)", time.perf_counter() - t0)
    if return_model:
        logger.info("outputs model fit of gene: %s", dm.gene)
        return dm
    return adata if copy else None


def _gradient_uns(cfg: GradientConfig) -> dict:
    return {"method": "gradient", "rounds": cfg.rounds, "steps": cfg.steps,
            "learning_rate": cfg.learning_rate,
            "gradient_scaling": cfg.gradient_scaling}  # fmt: skip


def _check_gradient_options(opts: dict, load_pars, high_pars_resolution, max_iter) -> None:
    if load_pars:
        raise ValueError("load_pars is not supported with method='gradient'.")
    if high_pars_resolution:
        raise ValueError(
            "high_pars_resolution is a Nelder-Mead option; not with method='gradient'."
        )
    if max_iter != 10:
        logger.warning("max_iter=%r is not used by method='gradient' (see rounds/steps).", max_iter)
    for key in ("rounds", "steps"):
        if key in opts:
            _check_int(key, opts[key], 0)
    if not isinstance(opts.get("gradient_scaling", False), bool):
        raise TypeError("`gradient_scaling` must be True or False.")
    lr = opts.get("learning_rate", 0.05)
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not (0 < lr < np.inf):
        raise ValueError(f"`learning_rate` must be a positive number, got {lr!r}.")


def _loaded_pars(adata, idx: np.ndarray, fit_time) -> tuple[Loaded, bool]:
    """Per gene what ``BaseDynamics.load_pars`` reads (utils ~821-860), and ``refit_time``.

    Parameters come from ``adata.var`` (``beta * scaling`` as upstream multiplies them), times
    from ``obs["latent_time"]`` when present, else the ``fit_t`` layer. A ``fit_time`` key (or
    array) replaces the times and disables refitting; cells that sat at the stored switch time
    then move ``t_`` to the mean of their new times.
    """
    need = ["fit_alpha", "fit_beta", "fit_gamma", "fit_t_", "fit_scaling", "fit_steady_u",
            "fit_steady_s", "fit_pval_steady"]  # fmt: skip
    missing = [k for k in need if k not in adata.var.keys()]
    if missing:
        raise ValueError(f"load_pars=True needs adata.var columns {missing}.")
    v = {k: np.asarray(adata.var[k].to_numpy()[idx], dtype=np.float64) for k in need}
    t_ = v["fit_t_"].copy()
    if "latent_time" in adata.obs.keys():
        t = np.repeat(np.asarray(adata.obs["latent_time"], np.float64)[:, None], len(idx), 1)
    elif "fit_t" in adata.layers.keys():
        t = _dense(adata.layers["fit_t"][:, idx]).astype(np.float64)
    else:
        raise ValueError("load_pars=True needs obs['latent_time'] or the 'fit_t' layer.")
    refit = True
    if not isinstance(fit_time, bool):
        if isinstance(fit_time, str):
            if fit_time not in adata.obs.keys():
                raise KeyError(f"fit_time={fit_time!r} is not a column of adata.obs.")
            new_t = np.asarray(adata.obs[fit_time], np.float64)
        else:
            new_t = np.asarray(fit_time, np.float64)
            if new_t.shape != (adata.n_obs,):
                raise ValueError("`fit_time` as times must have one value per cell.")
        refit = False
        for j in range(len(idx)):
            steady = t[:, j] == t_[j]
            if np.any(steady):
                t_[j] = np.mean(new_t[steady])
        t = np.repeat(new_t[:, None], len(idx), 1)
    else:
        refit = fit_time
    pars = np.stack([v["fit_alpha"], v["fit_beta"] * v["fit_scaling"], v["fit_gamma"], t_,
                     v["fit_scaling"]], axis=1)  # fmt: skip
    ld = Loaded(pars=pars, t=t, steady_u=v["fit_steady_u"], steady_s=v["fit_steady_s"],
                pval_steady=v["fit_pval_steady"])  # fmt: skip
    return ld, bool(refit)


def _initial_ratio(pars: np.ndarray) -> float:
    """``steady_state_ratio``: gamma / beta at the end of ``initialize()`` (core ~111).

    Not part of jaxvelo's result, so read off the parameter history. Until the end of
    ``fit_t_and_alpha`` every accepted update keeps gamma and beta / scaling
    (``initialize_scaling`` sets ``beta = beta / scaling * z``, core ~118); the next stages that
    touch beta (``fit_scaling_``, ``fit_t_and_rates``) move it off that ratio, and beta itself is
    constant from the end of ``initialize()`` to then. Upstream divides in float32 when both
    are float32 numbers.
    """
    _, beta0, gamma0, _, scaling0 = pars[:, 0]
    ratio = pars[1] / pars[4]
    keep = (pars[2] == gamma0) & np.isclose(ratio, beta0 / scaling0, rtol=1e-5, atol=0)
    end = len(keep) if keep.all() else int(np.argmin(keep))
    beta = pars[1, max(end - 1, 0)]
    if np.float32(gamma0) == gamma0 and np.float32(beta) == beta:
        return np.float32(gamma0) / np.float32(beta)
    return gamma0 / beta


def _model(adata, gene: str, r: dict, m, *, assignment_mode, **kwargs):
    """The ``DynamicsRecovery`` object upstream returns, filled with jaxvelo's fit of ``gene``.

    Built without fitting: ``BaseDynamics.__init__`` (data, weights, connectivities), then the
    attributes ``initialize()`` and ``fit()`` set (core ~30-150), then ``align_dynamics``'
    changes to the returned model (core ~785-797, quirks included). Differences: ``u0_, s0_``
    are the switching state at ``t_`` (as ``load_pars``), not upstream's stale initial
    estimate; ``o`` is ``t < t_`` (re-assigned with the final parameters where ``t == t_``).
    """
    from scvelo.core import SplicingDynamics
    from scvelo.tools._em_model_core import DynamicsRecovery
    from scvelo.tools._em_model_utils import BaseDynamics

    conn = kwargs.pop("conn")
    dm = DynamicsRecovery.__new__(DynamicsRecovery)
    BaseDynamics.__init__(dm, adata, gene, fit_connected_states=conn, **kwargs)
    n = int(r["n_hist"])
    alpha, beta, gamma, t_, scaling = (np.float64(x) for x in r["pars"])
    # upstream's types: std_u/std_s and steady_s are numpy scalars of the data's dtype
    # (BaseDynamics computed the same std; initialize() sets 1 for a zero std, core ~36-39)
    std_type = int if dm.std_u == 0 or dm.std_s == 0 else type(dm.std_u)
    dm.std_u, dm.std_s = std_type(r["std_u"]), std_type(r["std_s"])
    dm.pval_steady = np.float64(r["pval_steady"])
    s_type = dm.s.dtype.type if np.issubdtype(dm.s.dtype, np.floating) else np.float64
    dm.steady_u, dm.steady_s = np.float64(r["steady_u"]), s_type(r["steady_s"])
    dm.alpha, dm.beta, dm.gamma, dm.scaling, dm.t_ = alpha, beta, gamma, scaling, t_
    dm.alpha_ = 0
    sol = SplicingDynamics(alpha=alpha, beta=beta, gamma=gamma).get_solution(t_, stacked=False)
    dm.u0_, dm.s0_ = sol
    dm.pars = np.array(r["pars_hist"][:, :n], dtype=np.float64)
    dm.loss = [np.float64(x) for x in r["loss_hist"][:n]]
    dm.steady_state_ratio = _initial_ratio(dm.pars)
    if dm.init_vals is not None:
        dm.init_vals = np.array(dm.init_vals)
    dm.set_callbacks()
    if dm.max_iter > 0:
        dm.assignment_mode = assignment_mode
    dm.t = np.array(r["t"], dtype=np.float64)
    dm.tau, dm.tau_ = np.array(r["tau"], np.float64), np.array(r["tau_"], np.float64)
    o_final = dm.get_time_assignment()[2]
    dm.o = np.where(dm.t != t_, dm.t < t_, o_final).astype(int)
    dm.likelihood, dm.varx = np.float64(r["likelihood"]), np.float64(r["varx"])
    if m is not None:  # align_dynamics on the returned model (core ~785-797)
        dm.m = m
        dm.alpha = dm.alpha / dm.m[-1]
        dm.beta = dm.beta / dm.m[-1]
        dm.gamma = dm.gamma / dm.m[-1]
        dm.pars[:3] = dm.pars[:3] / dm.m[-1]
        dm.t = dm.t * dm.m[-1]
        dm.tau = dm.tau * dm.m[-1]
        dm.t_ = dm.t_ * dm.m[-1]
        dm.pars[4] = dm.pars[4] * dm.m[-1]  # sic: upstream rescales the scaling row, not t_
    return dm


def _plot_results(names, res, m) -> None:
    """Parameter and loss traces of the first four fitted genes (core ~640-660).

    Upstream's block never fills its list of parameter histories and loops over four genes
    regardless of how many were fitted, so it raises IndexError; this draws what it intends:
    one row per gene, columns alpha, beta, gamma, t_, scaling (the history of accepted
    updates, with the alignment factor applied to rates and t_) and loss.
    """
    import matplotlib.pyplot as pl
    from matplotlib import rcParams

    n_rows, n_cols = min(len(names), 4), 6
    fontsize = rcParams["font.size"]
    fig, axes = pl.subplots(
        nrows=n_rows, ncols=n_cols, figsize=[2 * n_cols, 1.5 * n_rows], squeeze=False
    )
    pl.subplots_adjust(wspace=0.7, hspace=0.5)
    titles = ["alpha", "beta", "gamma", "t_", "scaling", "loss"]
    for i in range(n_rows):
        n = int(res["n_hist"][i])
        P = np.array(res["pars_hist"][i][:, :n])
        if m is not None:
            mi = m[i]
            P *= np.array([1 / mi, 1 / mi, 1 / mi, mi, 1])[:, None]
        ax = axes[i]
        for j, pij in enumerate(P):
            ax[j].plot(pij)
        ax[len(P)].plot(res["loss_hist"][i][:n])
        ax[0].set_ylabel(str(names[i]), fontsize=fontsize)
        if i == 0:
            for j, name in enumerate(titles):
                ax[j].set_title(name, fontsize=fontsize)


def _write_results(adata, writes: _Writes, res, idx, u0, s0, conn, t_max, cfg):
    """``recover_dynamics`` ~600-660 and ``align_dynamics`` ~700-770 on copies.

    Returns the alignment factors of the fitted genes (``m[idx]``), None with ``t_max=False``.
    """
    n_vars = adata.n_vars
    pars = _read_pars(adata, _PAR_NAMES, n_vars)
    alpha, beta, gamma, t_, scaling, std_u, std_s, likelihood = pars[:8]
    pu0, ps0, pval, steady_u, steady_s, varx = pars[8:]
    # the fitted genes' columns (cells x fitted genes), computed on compact copies and
    # written into the layers once
    Tc = np.array(res["t"].T, dtype=float, order="C")  # conn.dot of a C-ordered copy, as before
    Tau_c, Tau__c = np.asarray(res["tau"], float).T, np.asarray(res["tau_"], float).T
    p = res["pars"]
    alpha[idx], beta[idx], gamma[idx], t_[idx], scaling[idx] = p.T
    pu0[idx], ps0[idx], pval[idx] = u0, s0, res["pval_steady"]
    steady_u[idx], steady_s[idx] = res["steady_u"], res["steady_s"]
    beta[idx] /= scaling[idx]
    steady_u[idx] *= scaling[idx]
    std_u[idx], std_s[idx] = res["std_u"], res["std_s"]
    likelihood[idx], varx[idx] = res["likelihood"], res["varx"]
    if conn is not None:
        # core ~608-611: T[:, idx] = conn.dot(T[:, idx]) with an earlier fit_t layer, else
        # T = conn.dot(T) over all genes -- whose unfitted columns are NaN, and stay NaN
        # (every row of conn has its diagonal), so only the fitted columns are computed
        # (csr_matvecs treats each column alone: the same bits)
        Tc = conn.dot(Tc)

    # varm["loss"] (core ~620-635)
    n_hist = res["n_hist"]
    cur_len = adata.varm["loss"].shape[1] if "loss" in adata.varm.keys() else 2
    max_len = max(int(n_hist.max()), cur_len)
    loss = np.full((n_vars, max_len), np.nan)
    if "loss" in adata.varm.keys():
        loss[:, :cur_len] = adata.varm["loss"]
    hist = np.full((len(idx), max_len), np.nan)
    width = min(max_len, res["loss_hist"].shape[1])
    hist[:, :width] = res["loss_hist"][:, :width]
    for r, n in enumerate(n_hist):
        hist[r, n:] = np.nan
    loss[idx] = hist

    mz = (
        np.array(adata.var["fit_alignment_scaling"].values, dtype=float, copy=True)
        if "fit_alignment_scaling" in adata.var.keys()
        else np.ones(n_vars)
    )
    m = None
    if t_max is not False:
        mz, Tc, Tau_c, Tau__c, m = _align(alpha, beta, gamma, t_, mz, Tc, Tau_c, Tau__c, idx, t_max)
    layers = []
    for key, cols in (("fit_t", Tc), ("fit_tau", Tau_c), ("fit_tau_", Tau__c)):
        full = (np.array(adata.layers[key], dtype=float) if key in adata.layers.keys()
                else np.full(adata.shape, np.nan))  # fmt: skip
        full[:, idx] = cols
        layers.append(full)
    T, Tau, Tau_ = layers
    vals = [alpha, beta, gamma, t_, scaling, std_u, std_s, likelihood, pu0, ps0, pval]
    vals += [steady_u, steady_s, varx]
    for name, v in zip(_PAR_NAMES, vals, strict=True):
        writes.add("var", f"fit_{name}", v)
    if t_max is not False:
        writes.add("var", "fit_alignment_scaling", mz)
    writes.add("layers", "fit_t", T)
    writes.add("layers", "fit_tau", Tau)
    writes.add("layers", "fit_tau_", Tau_)
    writes.add("varm", "loss", loss)
    return m


def _align(alpha, beta, gamma, t_, mz, T, Tau, Tau_, idx, t_max):
    """``align_dynamics(mode="align_total_time")`` for newly fitted genes (core ~700-770)
    on their columns ``T``, ``Tau``, ``Tau_`` (cells x fitted genes).

    ``mz[idx] = 1`` for the newly fitted genes, then ``m = t_max / T_max`` with
    ``T_max`` the on-span plus off-span of the (smoothed) times over the fraction of cells
    not at ``t_`` or 0 (float equality, core ~727); ``mz == 1`` is written as NaN.
    ``alpha``, ``beta``, ``gamma`` and ``t_`` are scaled in place (all genes' arrays);
    returns ``(mz, T, Tau, Tau_, m)`` with the scaled columns and the fitted genes' ``m``
    (upstream's ``mz *= m`` multiplies the other genes by 1: unchanged).
    """
    mz = np.array(mz)
    mz[idx] = 1
    ti = t_[idx]
    T_max = np.max(T * (T < ti), axis=0)
    T_max += np.max((T - ti) * (T > ti), axis=0)
    denom = 1 - np.sum((T == ti) | (T == 0), axis=0) / len(T)
    denom += denom == 0
    T_max = T_max / denom
    T_max += T_max == 0
    t_max = 20 if t_max is None else t_max
    m_ = t_max / T_max
    mz[idx] *= m_
    alpha[idx] = alpha[idx] / m_
    beta[idx] = beta[idx] / m_
    gamma[idx] = gamma[idx] / m_
    t_[idx] = ti * m_
    mz[mz == 1] = np.nan
    return mz, T * m_, Tau * m_, Tau_ * m_, m_
