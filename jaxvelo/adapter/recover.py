"""``jaxvelo.recover_dynamics``: scVelo 0.3.4's signature and outputs, jaxvelo's core.

This is the AnnData edge. It validates input, resolves genes with scVelo's own code
(``Velocity.compute_deterministic`` for velocity genes), extracts dense per-gene arrays,
runs the batched core, and writes exactly what ``scvelo.tl.recover_dynamics`` writes
(``_em_model_core.py`` ~540-660), then ``align_dynamics``. All results are computed before
the first write, so a failure leaves the AnnData untouched.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
from scipy.sparse import issparse

from ..core.batch import fit_genes, neighbors_from_csr
from ..core.em import FitConfig

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


def _extract(adata, key: str, cols: np.ndarray) -> np.ndarray:
    X = _layer(adata, key)
    X = X[:, cols]
    X = _dense(X)
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise TypeError(f"layer {key!r} must be numeric, got dtype {X.dtype}.")
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
    fit_connected_states, fit_basal_transcription, use_raw, load_pars, return_model,
    plot_results, steady_state_prior, add_key, copy, n_jobs, backend, show_progress_bar
        As in scVelo 0.3.4 (``add_key`` is ignored there too: keys are always ``fit_*``).
    batch_size
        Genes per compiled batch (default 64); results do not depend on it.
    **kwargs
        ``DynamicsRecovery`` keyword arguments (``high_pars_resolution``, ``init_vals``,
        ``perc``).

    Returns
    -------
    ``adata`` if ``copy`` else None (or the last gene's model with ``return_model``).
    Writes to ``adata.var``: ``fit_alpha, fit_beta, fit_gamma, fit_t_, fit_scaling,
    fit_std_u, fit_std_s, fit_likelihood, fit_u0, fit_s0, fit_pval_steady, fit_steady_u,
    fit_steady_s, fit_variance, fit_alignment_scaling`` (and ``fit_r2`` for velocity genes);
    ``adata.layers``: ``fit_t, fit_tau, fit_tau_``; ``adata.varm["loss"]``;
    ``adata.uns["recover_dynamics"]``.
    """
    from scvelo.core import get_n_jobs
    from scvelo.preprocessing.moments import get_connectivities

    t0 = time.perf_counter()
    unsupported = {"load_pars": load_pars, "fit_time": fit_time is not True}
    for name, val in unsupported.items():
        if val:
            raise NotImplementedError(f"`{name}` is not supported by jaxvelo yet.")
    if return_model:
        raise NotImplementedError("`return_model=True` is not supported by jaxvelo yet.")
    if plot_results:
        raise NotImplementedError("`plot_results=True` is not supported by jaxvelo yet.")
    high_pars_resolution = kwargs.pop("high_pars_resolution", False)
    init_vals = kwargs.pop("init_vals", None)
    perc = kwargs.pop("perc", 99)
    if kwargs:
        raise TypeError(f"unexpected keyword arguments: {sorted(kwargs)}")
    if high_pars_resolution:
        raise NotImplementedError("`high_pars_resolution` is not supported by jaxvelo yet.")
    if assignment_mode not in _ASSIGNMENT_MODES:
        raise ValueError(
            f"`assignment_mode` must be one of {_ASSIGNMENT_MODES}, got {assignment_mode!r}."
        )
    _check_int("max_iter", max_iter, 0)
    if n_top_genes is not None:
        _check_int("n_top_genes", n_top_genes, 1)
    if data.n_obs == 0:
        raise ValueError("the AnnData has no cells.")

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
    if fit_connected_states is None:
        fit_connected_states = not use_raw

    writes = _Writes()
    var_names = _resolve_var_names(adata, var_names, use_raw, writes)
    if len(var_names) == 0:
        raise ValueError("No variable names left to fit.")
    ukey, skey = ("unspliced", "spliced") if use_raw else ("Mu", "Ms")
    if n_top_genes is not None and len(var_names) > n_top_genes:
        cols = adata.var_names.get_indexer(var_names)
        X = _dense(_layer(adata, skey)[:, cols])
        var_names = var_names[np.argsort(np.sum(X, 0))[::-1][:n_top_genes]]

    if return_model is None and len(var_names) < 5:
        # upstream's default (core ~528) returns the last gene's DynamicsRecovery here
        logger.warning(
            "fewer than 5 genes: scVelo would return the last gene's model "
            "(return_model defaults to True there); jaxvelo writes the results to the "
            "AnnData and returns %s (return_model is not supported yet).",
            "the copy" if copy else "None",
        )
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
        prior = np.asarray(steady_state_prior, dtype=bool)
        if prior.shape != (adata.n_obs,):
            raise ValueError("`steady_state_prior` must be a boolean mask over cells.")

    conn = get_connectivities(adata) if fit_connected_states else None
    nbrs = None if conn is None else neighbors_from_csr(conn.indptr, conn.indices, conn.data)
    cfg = FitConfig(
        n_obs=adata.n_obs,
        max_iter=int(max_iter),
        assignment_mode=None if assignment_mode == "inverse" else assignment_mode,
        fit_scaling=fit_scaling,
        fit_steady_states=bool(fit_steady_states),
        fit_time=True,
        high_pars_resolution=bool(high_pars_resolution),
        perc=perc,
    )
    fit_cols = np.flatnonzero(recoverable)
    bar = None
    if show_progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(fit_cols), unit="gene", desc="recover_dynamics")
    res = fit_genes(
        u[:, fit_cols], s[:, fit_cols], cfg, nbrs=nbrs, prior=prior,
        batch_size=batch_size or 64,
        init_vals=None if init_vals is None else tuple(np.ravel(init_vals).tolist()),
        progress=None if bar is None else bar.update,
    )  # fmt: skip
    if bar is not None:
        bar.close()

    idx = cols[fit_cols]
    _write_results(adata, writes, res, idx, u0[fit_cols], s0[fit_cols], conn, t_max, cfg)
    writes.add(
        "uns",
        "recover_dynamics",
        {
            "fit_connected_states": fit_connected_states,
            "fit_basal_transcription": fit_basal_transcription,
            "use_raw": use_raw,
        },
    )
    writes.apply(adata)
    logger.info("    finished (%.2fs)", time.perf_counter() - t0)
    return adata if copy else None


def _write_results(adata, writes: _Writes, res, idx, u0, s0, conn, t_max, cfg) -> None:
    """``recover_dynamics`` ~600-660 and ``align_dynamics`` ~700-770 on copies."""
    n_vars = adata.n_vars
    pars = _read_pars(adata, _PAR_NAMES, n_vars)
    alpha, beta, gamma, t_, scaling, std_u, std_s, likelihood = pars[:8]
    pu0, ps0, pval, steady_u, steady_s, varx = pars[8:]
    shape = adata.shape
    had_t = "fit_t" in adata.layers.keys()
    T = np.array(adata.layers["fit_t"], dtype=float) if had_t else np.full(shape, np.nan)
    Tau = (
        np.array(adata.layers["fit_tau"], dtype=float)
        if "fit_tau" in adata.layers.keys()
        else np.full(shape, np.nan)
    )
    Tau_ = (
        np.array(adata.layers["fit_tau_"], dtype=float)
        if "fit_tau_" in adata.layers.keys()
        else np.full(shape, np.nan)
    )
    T[:, idx], Tau[:, idx], Tau_[:, idx] = res["t"].T, res["tau"].T, res["tau_"].T
    p = res["pars"]
    alpha[idx], beta[idx], gamma[idx], t_[idx], scaling[idx] = p.T
    pu0[idx], ps0[idx], pval[idx] = u0, s0, res["pval_steady"]
    steady_u[idx], steady_s[idx] = res["steady_u"], res["steady_s"]
    beta[idx] /= scaling[idx]
    steady_u[idx] *= scaling[idx]
    std_u[idx], std_s[idx] = res["std_u"], res["std_s"]
    likelihood[idx], varx[idx] = res["likelihood"], res["varx"]
    if had_t:
        T[:, idx] = T[:, idx] if conn is None else conn.dot(T[:, idx])
    else:
        T = T if conn is None else conn.dot(T)

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
    if t_max is not False:
        alpha, beta, gamma, t_, mz, T, Tau, Tau_ = _align(
            alpha, beta, gamma, t_, mz, T, Tau, Tau_, idx, t_max
        )
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


def _align(alpha, beta, gamma, t_, mz, T, Tau, Tau_, idx, t_max):
    """``align_dynamics(mode="align_total_time")`` for newly fitted genes (core ~700-770).

    ``mz[idx] = 1`` for the newly fitted genes, then ``m = t_max / T_max`` with
    ``T_max`` the on-span plus off-span of the (smoothed) times over the fraction of cells
    not at ``t_`` or 0 (float equality, core ~727); ``mz == 1`` is written as NaN.
    """
    m = np.ones(len(alpha))
    mz = np.array(mz)
    mz[idx] = 1
    Ti = T[:, idx]
    T_max = np.max(Ti * (Ti < t_[idx]), axis=0)
    T_max += np.max((Ti - t_[idx]) * (Ti > t_[idx]), axis=0)
    denom = 1 - np.sum((Ti == t_[idx]) | (Ti == 0), axis=0) / len(T)
    denom += denom == 0
    T_max = T_max / denom
    T_max += T_max == 0
    t_max = 20 if t_max is None else t_max
    m[idx] = t_max / T_max
    mz *= m
    m_ = m[idx]
    alpha[idx] = alpha[idx] / m_
    beta[idx] = beta[idx] / m_
    gamma[idx] = gamma[idx] / m_
    T[:, idx], t_[idx] = T[:, idx] * m_, t_[idx] * m_
    Tau[:, idx], Tau_[:, idx] = Tau[:, idx] * m_, Tau_[:, idx] * m_
    mz[mz == 1] = np.nan
    return alpha, beta, gamma, t_, mz, T, Tau, Tau_
