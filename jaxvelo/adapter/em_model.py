"""``scvelo.tools.ExpectationMaximizationModel.fit`` with jaxvelo's core (for the backend flag).

scVelo 0.3.4's class API (``tools/_em_model.py``) fits gene by gene with ``DynamicsRecovery``
into the model's ``_state_dict`` (``EMParams``) and ``_loss``, and leaves the AnnData alone
until ``export_results_adata``. :func:`fit` keeps that contract: genes are chosen by the
model's own ``_prepare_genes`` (steady-state model for velocity genes, its ``n_top_genes``),
:func:`jaxvelo.recover_dynamics` fits them on a copy of the AnnData with the model's settings,
and the copy's results fill the state dict exactly where upstream's loop and
``_align_dynamics`` would write.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import recover


def fit(
    model,
    copy: bool = True,
    use_raw: bool = False,
    return_model: bool | None = None,
    load_pars: bool = False,
    steady_state_prior=None,
    assignment_mode: str = "projection",
    show_progress_bar: bool = True,
    **kwargs,
):
    """``ExpectationMaximizationModel.fit`` (``_em_model.py`` ~222-330), fitted by jaxvelo.

    Returns the last fitted gene's model with ``return_model`` (default: fewer than 5 genes),
    else the model's AnnData if ``copy`` else None, as upstream (whose ``copy`` returns the
    AnnData without results: those reach it through ``export_results_adata``).
    """
    adata = model._adata
    if "Ms" not in adata.layers.keys() or "Mu" not in adata.layers.keys():
        use_raw = True
    model._use_raw = use_raw
    if model._fit_connected_states is None:
        model._fit_connected_states = not use_raw

    model._prepare_genes()  # upstream's gene choice, sets _var_names (and r2)
    if return_model is None:
        return_model = len(model._var_names) < 5

    work = adata.copy()
    dm = recover.recover_dynamics(
        work,
        var_names=list(model._var_names),
        max_iter=model._max_iter,
        assignment_mode=assignment_mode,
        t_max=model._t_max,
        fit_time=model._fit_time,
        fit_scaling=model._fit_scaling,
        fit_steady_states=model._fit_steady_states,
        fit_connected_states=model._fit_connected_states,
        fit_basal_transcription=model._fit_basal_transcription,
        use_raw=use_raw,
        load_pars=load_pars or None,
        return_model=bool(return_model),
        steady_state_prior=steady_state_prior,
        n_jobs=model._n_jobs,
        backend=model._backend,
        show_progress_bar=show_progress_bar,
        **kwargs,
    )

    sd = model._state_dict
    for field in dataclasses.fields(sd):
        if field.name == "r2":  # set by _prepare_genes as upstream
            continue
        key = f"fit_{field.name.lower()}"  # upstream's EMParams.from_adata key
        src = work.layers if field.metadata["is_matrix"] else work.var
        if key in src.keys():
            value = src[key]
            value = np.array(value if field.metadata["is_matrix"] else value.to_numpy())
            setattr(sd, field.name, value)
    model._loss = np.array(work.varm["loss"])
    return dm if return_model else adata if copy else None
