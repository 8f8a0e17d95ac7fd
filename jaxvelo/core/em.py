"""The EM schedule of ``DynamicsRecovery`` (scvelo/tools/_em_model_core.py) for one gene.

``fit_gene`` is written for a single gene and batched once with ``jit(vmap(...))`` in
:mod:`jaxvelo.core.batch`. The upstream object's mutable attributes become the immutable
:class:`EMState`; ``update()``'s accept-if-improved logic becomes :func:`_update_outcome`
and :func:`_commit`, which return the next state, inside one schedule loop
(:func:`_run_schedule`). Parameter vectors use upstream's ``pars`` order
``[alpha, beta, gamma, t_, scaling]``."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from . import objective as obj
from .assign import (
    Assignment,
    ModeSwitch,
    Neighbors,
    SteadyCache,
    assign_timepoints,
    projection_grid_size_traced,
    use_host_kernels,
)
from .kinetics import linspace, solution, tau_inv, unspliced
from .nelder_mead import nm_consume, nm_init, nm_options, nm_propose
from .numerics import (
    compact,
    cond_any,
    divide,
    fma_barrier,
    np_mean,
    np_percentile,
    np_std,
    pairwise_sum,
    test_bimodality,
    true_divide,
    while_any,
)
from .numerics import round32 as r32

ALPHA, BETA, GAMMA, T_, SCALING = range(5)
PAR_NAMES = ("alpha", "beta", "gamma", "t_", "scaling")


@dataclass(frozen=True)
class FitConfig:
    """Static configuration of a fit (hashable: part of the compiled program's key).

    Attributes
    ----------
    n_obs
        Number of cells (the padded count where the cell axis is padded: the real count
        is then :attr:`GeneData.n`, a value of the data, not of the program).
    max_iter
        ``max_iter`` of ``recover_dynamics``; each Nelder-Mead stage gets
        ``int(max_iter / 5)`` iterations (utils ``simplex_kwargs``).
    assignment_mode
        Final assignment mode (None = inverse formula).
    fit_scaling
        True / False, or a float starting value (still fitted when truthy, PARITY.md).
    fit_steady_states, fit_time
        As upstream.
    high_pars_resolution
        Accept-if-improved update after every Nelder-Mead iteration (upstream callbacks).
    load_pars
        Start from stored parameters and times (:class:`Loaded`) instead of
        ``initialize()`` (``DynamicsRecovery(load_pars=True)``, core ~22-27).
    perc
        Upper percentile of the cell weights (``BaseDynamics(perc=99)``).
    """

    n_obs: int
    max_iter: int = 10
    assignment_mode: str | None = "projection"
    fit_scaling: bool | float = True
    fit_steady_states: bool = True
    fit_time: bool = True
    high_pars_resolution: bool = False
    perc: float = 99
    load_pars: bool = False

    @property
    def nm_maxiter(self) -> int:
        return int(self.max_iter / 5)

    @property
    def do_fit_scaling(self) -> bool:
        return bool(self.fit_scaling)

    @property
    def hist_len(self) -> int:
        """Upper bound on accepted updates: initial loss, 8 scaling tries, 5 alpha tries,
        one per stage (6) and the two final updates, plus callbacks."""
        n = 1 + 8 + 5 + 6 + 2
        if self.high_pars_resolution:
            n += 6 * max(self.nm_maxiter, 1)
        return n


class GeneData(NamedTuple):
    """One gene's observations (already basal-corrected) in the data dtype.

    ``n``: the real cell count when the cell axis is padded (the first ``n`` cells are
    real; padded cells have ``u = s = 0``, no prior and no neighbours) -- an array, so one
    compiled program serves every count up to the padded length; None: all cells."""

    u: Array  # (n_obs,)
    s: Array  # (n_obs,)
    prior: Array  # (n_obs,) bool steady-state prior (all False when None)
    n: Array | None = None  # () int32, the same for every gene (not batched)


class Loaded(NamedTuple):
    """Stored results a fit starts from (``BaseDynamics.load_pars``, utils ~821-860)."""

    pars: Array  # (5,) alpha, beta * scaling, gamma, t_, scaling (float64)
    t: Array  # (n_obs,) latent time or the fit_t layer (or the ``fit_time`` key's values)
    steady_u: Array  # ()
    steady_s: Array  # ()
    pval_steady: Array  # ()


class EMState(NamedTuple):
    """The mutable attributes of upstream's ``DynamicsRecovery`` during the fit."""

    pars: Array  # (5,) current [alpha, beta, gamma, t_, scaling]
    t: Array  # (n_obs,)
    tau: Array  # (n_obs,)
    o: Array  # (n_obs,) int32
    loss_last: Array  # () self.loss[-1]
    loss_hist: Array  # (H,) self.loss, NaN padded
    pars_hist: Array  # (5, H) self.pars, NaN padded
    n_hist: Array  # () int32 entries used
    steady_u: Array  # ()
    u0_: Array  # () self.u0_ (rescaled with scaling like upstream)
    ratio: Array  # () steady_state_ratio, NaN while unset
    f32: Array  # (5,) bool: the parameter is a numpy float32 upstream (PARITY.md)
    beta_int: Array  # () bool: beta is still the Python int 1 (core ~58)
    t32: Array  # () bool: t came from an all-float32 time assignment
    ratio32: Array  # () bool: steady_state_ratio is float32


class Static(NamedTuple):
    """Per-gene quantities fixed after initialisation."""

    u: Array
    s: Array
    w: obj.Subset  # weights
    wu: obj.Subset  # weights_upper
    std_u: Array
    std_s: Array
    data32: Array  # () bool: the layers are float32 (scv.pp.moments)
    valid: Array | None  # (n_obs,) bool: real cells (None: all; see GeneData.n)
    n: Array | int  # real cell count (len(t) upstream); both from _cells


def _cells(gd: GeneData) -> dict:
    """``valid``/``n`` of :class:`Static` for ``gd``: the real cells and their count."""
    if gd.n is None:
        return dict(valid=None, n=gd.u.shape[0])
    return dict(valid=jnp.arange(gd.u.shape[0]) < gd.n, n=gd.n)


def _grid(st: Static) -> Array | None:
    """Points of the projection grid: upstream's rule for the real cell count (None: for
    the cell axis's length, a static shape)."""
    return None if st.valid is None else projection_grid_size_traced(st.n)


def _real(st: Static, mask: Array) -> Array:
    """``mask`` restricted to the real cells (padded cells are in no cell group)."""
    return mask if st.valid is None else mask & st.valid


class GeneResult(NamedTuple):
    """Everything ``recover_dynamics`` writes for one gene (before ``beta /= scaling``)."""

    pars: Array  # (5,)
    t: Array
    tau: Array
    tau_: Array
    loss_hist: Array
    pars_hist: Array
    n_hist: Array
    likelihood: Array
    varx: Array
    std_u: Array
    std_s: Array
    pval_steady: Array
    steady_u: Array
    steady_s: Array


def _c32(state: EMState, i: int) -> Array:
    """Operand ``i`` keeps a float32 operation float32 (float32, or beta as Python int)."""
    return state.f32[i] | (state.beta_int if i == BETA else False)


def _vars(p: Array) -> tuple[Array, Array, Array, Array, Array]:
    """``(alpha, beta, gamma, scaling, t_)`` in the order of ``get_vars``."""
    return p[ALPHA], p[BETA], p[GAMMA], p[SCALING], p[T_]


def _overlay(state: EMState, idx: tuple[int, ...], x: Array) -> Array:
    """Parameters passed explicitly replace the current ones; ``get_vars`` treats a passed
    ``t_ == 0`` as unset (utils ~909)."""
    p = state.pars.at[jnp.asarray(idx)].set(x.astype(state.pars.dtype))
    return p.at[T_].set(jnp.where(p[T_] == 0, state.pars[T_], p[T_]))


def _assign(st: Static, p: Array, mode, nbrs, cfg: FitConfig, fl=None, cache=None) -> Assignment:
    """The time assignment of the parameters ``p``; ``fl``: the float32 flags, with the
    time flag meaning "the data layers are float32" (``st.data32``); ``cache``: the gene's
    :class:`~jaxvelo.core.assign.SteadyCache` (the result's ``cache`` is the new one)."""
    alpha, beta, gamma, scaling, t_ = _vars(p)
    u = true_divide(st.u, scaling)
    if fl is not None:
        u = r32(u, fl.scaling & st.data32)
        fl = fl._replace(t=st.data32)
    return assign_timepoints(
        u, st.s, alpha, beta, gamma, scaling, t_, st.std_u, st.std_s,
        nbrs, mode, cfg.fit_steady_states, fl, valid=st.valid, grid=_grid(st),
        steady_cache=cache,
    )  # fmt: skip


def _flags(f32, beta_int, t32, ratio32) -> obj.Flags:
    return obj.Flags(alpha=f32[ALPHA], beta=f32[BETA] | beta_int, gamma=f32[GAMMA],
                     t_=f32[T_], scaling=f32[SCALING], t=t32, ratio=ratio32)  # fmt: skip


def _se(st: Static, t, p, ratio, fl: obj.Flags = obj.NO_FLAGS):
    return obj.se(t, st.u, st.s, st.w, _vars(p), st.std_u, st.std_s, ratio, fl)


def _commit(state: EMState, ok, p, t, tau, o, loss, f32, beta_int, t32) -> EMState:
    """The ``if perform_update:`` block of ``update()`` (core ~365-378)."""
    # core ~366: ``scaling`` is never None after get_vars, so this always runs.
    factor = r32(state.pars[SCALING] / p[SCALING], state.f32[SCALING] & f32[SCALING])
    h = state.n_hist
    new = EMState(
        pars=p,
        t=t,
        tau=tau,
        o=o,
        loss_last=loss,
        loss_hist=state.loss_hist.at[h].set(loss),
        pars_hist=state.pars_hist.at[:, h].set(p),
        n_hist=h + 1,
        steady_u=state.steady_u * factor,
        u0_=state.u0_ * factor,
        ratio=state.ratio,
        f32=f32,
        beta_int=beta_int,
        t32=t32,
        ratio32=state.ratio32,
    )
    return _select(ok, new, state)


def _select(ok, a, b):
    return jax.tree_util.tree_map(lambda x, y: jnp.where(ok, x, y), a, b)


class Candidate(NamedTuple):
    """Parameters proposed to ``update()`` with their numpy dtypes."""

    pars: Array  # (5,)
    f32: Array  # (5,) bool
    beta_int: Array  # () bool


def _same(state: EMState) -> Candidate:
    return Candidate(state.pars, state.f32, state.beta_int)


class _Eval(NamedTuple):
    """One evaluation of ``update()``: a time assignment and its loss (``get_se``)."""

    t: Array
    tau: Array
    o: Array
    loss: Array


def _stored(state: EMState) -> _Eval:
    return _Eval(state.t, state.tau, state.o, state.loss_last)


def _stack3(e: _Eval) -> _Eval:
    return jax.tree_util.tree_map(lambda x: jnp.stack([x] * 3), e)


def _row(evals: _Eval, j) -> _Eval:
    return jax.tree_util.tree_map(lambda x: x[j], evals)


def _evaluate(state: EMState, st: Static, p, fl, mode, nbrs, cfg: FitConfig, refit,
              cache: SteadyCache | None = None) -> tuple[_Eval, SteadyCache | None]:  # fmt: skip
    """The time assignment of ``p`` (``get_time_assignment``; the stored one unless
    ``refit``) and its loss. ``refit``: a Python bool, or a per-gene flag (then the
    assignment runs only when some gene of the batch needs it, :func:`cond_any`).
    ``cache``: the gene's :class:`~jaxvelo.core.assign.SteadyCache`, returned updated
    where an assignment ran (with ``cache=None``, None)."""
    if isinstance(refit, bool):
        if refit:
            a = _assign(st, p, mode, nbrs, cfg, fl, cache)
            t, tau, o, cache = a.t, a.tau, a.o, a.cache
        else:
            t, tau, o = state.t, state.tau, state.o
    else:
        modes = mode.modes if isinstance(mode, ModeSwitch) else None
        index = mode.index if isinstance(mode, ModeSwitch) else None

        def assigned(st, p, fl, nbrs, index, t, tau, o, cache):
            a = _assign(st, p, mode if index is None else ModeSwitch(modes, index), nbrs, cfg, fl,
                        cache)  # fmt: skip
            return a.t, a.tau, a.o, a.cache

        def kept(st, p, fl, nbrs, index, t, tau, o, cache):
            return t, tau, o, cache

        t, tau, o, cache = cond_any(refit, assigned, kept, st, p, fl, nbrs, index, state.t,
                                    state.tau, state.o, cache)  # fmt: skip
    return _Eval(t, tau, o, _se(st, t, p, state.ratio, fl)), cache


def _recompute(cfg: FitConfig, modes, final) -> Array | bool:
    """Whether ``update()``'s re-assignment of the current parameters (core ~334-336) can
    differ from the stored one: only when the assignment mode changed since it was stored
    (the switch to the final mode, full_projection) or with load_pars, where the stored
    t is the loaded one, not an assignment of these parameters (utils ~851)."""
    if not cfg.fit_time:
        return False
    if modes[0] is not None or cfg.load_pars:
        return True
    if isinstance(final, bool):
        return bool(final and modes[1] is not None)
    return final if modes[1] is not None else False


class _Alt(NamedTuple):
    perform: Array
    best: _Eval  # the new evaluation if accepted, else the current one
    pars: Array
    f32: Array
    beta_int: Array
    t32: Array
    try_alt: Array
    p_alt: Array
    fl: obj.Flags


def _alternative(state: EMState, st: Static, cand: Candidate, r0: _Eval, r1: _Eval,
                 t32_c) -> _Alt:  # fmt: skip
    """The adjust-t_ alternative of ``update()`` (core ~337-353) from the evaluations of
    the proposed (``r0``) and the current (``r1``) parameters."""
    no = jnp.asarray(False)
    perform = r0.loss < state.loss_last
    on = _real(st, state.o == 1)
    b = jax.tree_util.tree_map(lambda x, y: jnp.where(perform, x, y), r0, r1)
    p = jnp.where(perform, cand.pars, state.pars)
    f32 = jnp.where(perform, cand.f32, state.f32)
    beta_int = jnp.where(perform, cand.beta_int, state.beta_int)
    t32 = jnp.where(perform, no, t32_c)
    t_ = p[T_]
    alt_t_ = jnp.max(jnp.where(on, b.t, -jnp.inf))
    try_alt = jnp.any(on) & (0 < alt_t_) & (alt_t_ < t_)
    # core ~342: np.max(t) / len(t) is float32 for a float32 t; * np.sum(...) -> float64
    # (the product is fenced: XLA would contract ``a + b * c`` into one FMA)
    # (padded cells take no part: len(t) is the real count)
    t_max = jnp.max(b.t) if st.valid is None else jnp.max(jnp.where(st.valid, b.t, -jnp.inf))
    step = r32(true_divide(t_max, st.n), t32) * jnp.sum(_real(st, b.t == t_))
    alt_t_ = alt_t_ + fma_barrier(step)
    # alt_t_ > 0 here, so get_vars keeps it
    p_alt = p.at[T_].set(jnp.where(try_alt, alt_t_, t_))
    fl = _flags(f32.at[T_].set(False), beta_int, no, state.ratio32)
    return _Alt(perform, b, p, f32, beta_int, t32, try_alt, p_alt, fl)


def _update_input(k, state: EMState, st: Static, cand: Candidate, r0: _Eval, r1: _Eval,
                  t32_c):  # fmt: skip
    """Parameters and float32 flags of ``update()``'s evaluation ``k``: 0 the proposed
    parameters, 1 the current ones, 2 the adjust-t_ alternative."""
    no = jnp.asarray(False)
    alt = _alternative(state, st, cand, r0, r1, t32_c)
    fl_new = _flags(cand.f32, cand.beta_int, no, state.ratio32)
    fl_cur = _flags(state.f32, state.beta_int, no, state.ratio32)

    def pick(a, b, c):
        return jnp.where(k == 0, a, jnp.where(k == 1, b, c))

    p = pick(cand.pars, state.pars, alt.p_alt)
    fl = jax.tree_util.tree_map(pick, fl_new, fl_cur, alt.fl)
    return p, fl


def _update_outcome(state: EMState, st: Static, cand: Candidate, rows: tuple, adjust_t_,
                    t32_c):  # fmt: skip
    """``update()``'s decision (core ~324-378) from its evaluations ``rows`` (0: the
    proposed parameters, 1: the current ones re-assigned, 2: the adjust-t_ alternative):
    the arguments of :func:`_commit`."""
    no = jnp.asarray(False)
    r0, r1, r2 = rows
    plain = (r0.loss < state.loss_last, cand.pars, r0.t, r0.tau, r0.o, r0.loss, cand.f32,
             cand.beta_int, no)  # fmt: skip
    if isinstance(adjust_t_, bool) and not adjust_t_:
        return plain
    a = _alternative(state, st, cand, r0, r1, t32_c)
    alpha, beta, gamma, _, t_ = _vars(a.pars)
    # unspliced(t_, 0, alpha, beta) on numpy scalars (float32 where they are)
    ut_cur = obj.switch_state(t_, alpha, beta, gamma, _flags(a.f32, a.beta_int, no, no))[0]
    ut_alt = unspliced(a.p_alt[T_], 0, alpha, beta)
    min_loss = jnp.minimum(a.best.loss, state.loss_last)
    take = a.try_alt & ((r2.loss * 0.99 <= min_loss) | (ut_cur * 0.99 < ut_alt))
    b = a.best
    with_alt = (
        a.perform | take,
        jnp.where(take, a.p_alt, a.pars),
        jnp.where(take, r2.t, b.t),
        jnp.where(take, r2.tau, b.tau),
        jnp.where(take, r2.o, b.o),
        jnp.where(take, r2.loss, b.loss),
        jnp.where(take, a.f32.at[T_].set(False), a.f32),
        a.beta_int,
        jnp.where(take, no, a.t32),
    )
    if isinstance(adjust_t_, bool):
        return with_alt
    return tuple(jnp.where(adjust_t_, w, q) for w, q in zip(with_alt, plain, strict=True))


def _next_eval(k, adjust_t_, recompute):
    """The evaluation after ``k`` (3: the update is decided): 0 -> 1 (re-assign the
    current parameters) or 2 (alternative t_) with ``adjust_t_``; 1 -> 2; 2 -> done."""
    after0 = jnp.where(adjust_t_, jnp.where(recompute, 1, 2), 3)
    return jnp.where(k == 0, after0, k + 1).astype(jnp.int32)


# ----------------------------------------------------------------------------- schedule
_SCALE, _ALPHA, _SAME, _NM = range(4)


class _Step(NamedTuple):
    """One ``update()`` of ``DynamicsRecovery`` (static): how its candidate is made,
    the assignment mode (index into ``(None, pre-training mode, final mode)``), its
    ``adjust_t_``, whether it re-assigns the current parameters, the Nelder-Mead stage."""

    kind: int
    arg: int
    mode: int
    adjust: bool
    recompute: bool
    stage: int = -1


class _Stage(NamedTuple):
    """One ``fit_*`` Nelder-Mead stage (core ~196-262), static."""

    idx: tuple
    mode: int
    tol: float | None
    refit: bool


def _schedule(cfg: FitConfig, modes, scaling_steps: bool, fit_steps: bool) -> tuple[list, list]:
    """The update() calls of ``initialize_scaling`` (core ~117-121, when
    ``scaling_steps``) and ``fit()`` (core ~124-151, when ``fit_steps``), in order."""
    steps: list[_Step] = []
    stages: list[_Stage] = []
    if scaling_steps and cfg.do_fit_scaling:
        rc = _recompute(cfg, (None, None), False)
        steps += [_Step(_SCALE, i, 0, True, rc) for i in range(8)]
    if not fit_steps:
        return steps, stages
    pre_rc, fin_rc = _recompute(cfg, modes, False), _recompute(cfg, modes, True)
    if cfg.max_iter > 0:
        steps += [_Step(_ALPHA, j, 1, True, pre_rc) for j in range(5)]
        pre_stages = [((T_, ALPHA), None)]
        if cfg.do_fit_scaling:
            pre_stages.append(((T_, BETA, SCALING), None))
        pre_stages += [((ALPHA, GAMMA), 1e-2), ((T_,), None), ((T_, ALPHA, BETA, GAMMA), 1e-2)]
        for idx, tol in pre_stages:
            stages.append(_Stage(idx, 1, tol, cfg.fit_time))
            steps.append(_Step(_NM, 0, 1, True, pre_rc, len(stages) - 1))
        steps.append(_Step(_SAME, 0, 2, False, fin_rc))  # update(adjust_t_=False), final mode
        stages.append(_Stage((T_, ALPHA, BETA, GAMMA), 2, 1e-2, False))
        steps.append(_Step(_NM, 0, 2, True, fin_rc, len(stages) - 1))
    steps.append(_Step(_SAME, 0, 2, True, fin_rc))  # the final update()
    return steps, stages


class _Machine(NamedTuple):
    """Per-gene position in the schedule (see :func:`_run_schedule`)."""

    em: EMState
    step: Array  # int32 index into the schedule
    upd: Array  # bool: evaluating an update() (else: running the step's Nelder-Mead)
    k: Array  # int32: the update()'s evaluation, :func:`_next_eval`
    evals: _Eval  # the update()'s evaluations, stacked (3, ...)
    cand: Candidate  # the update()'s proposed parameters
    back: Array  # bool: after this update() go back to the Nelder-Mead (callbacks)
    nm: tuple  # NMState per slot (stages with the same simplex size share one)
    sc0: Array  # initialize_scaling's z_vals centre
    alpha0: Array  # alpha when fit() starts (fit_t_and_alpha's grid centre)
    done: Array
    sc: SteadyCache | None  # the steady rows' sums of the gene's last assignment


def _nm_candidate(state: EMState, idx: tuple, x32, x) -> Candidate:
    """The parameters at the simplex point ``x`` of a stage on ``idx``: ``x`` has the
    simplex's dtype; np.array([...]) of numpy float32 scalars is float32, a Python int
    (beta) or any float64 makes it float64, and scipy keeps x0's dtype (PARITY.md)."""
    return Candidate(_overlay(state, idx, x), state.f32.at[jnp.asarray(idx)].set(x32),
                     state.beta_int & (BETA not in idx))  # fmt: skip


def _with_ratio(state: EMState) -> EMState:
    """``steady_state_ratio = gamma / beta`` (core ~121-122), float32 where both are."""
    ratio32 = _c32(state, GAMMA) & _c32(state, BETA)
    return state._replace(ratio=r32(state.pars[GAMMA] / state.pars[BETA], ratio32),
                          ratio32=ratio32)  # fmt: skip


def _nm_start(state: EMState, idx: tuple):
    """A stage's simplex from the current parameters: float32 when all of them are
    numpy float32 (``round32``, PARITY.md)."""
    i = jnp.asarray(idx)
    return nm_init(None, state.pars[i], None, jnp.all(state.f32[i]))


def _run_schedule(state: EMState, st: Static, nbrs, cfg: FitConfig, modes,
                  scaling_steps: bool, fit_steps: bool = True) -> EMState:  # fmt: skip
    """``initialize_scaling`` (with ``scaling_steps``; then the ``steady_state_ratio`` is
    set, core ~121-122) and ``DynamicsRecovery.fit`` (core ~124-151, with ``fit_steps``) as
    one loop with a single evaluation site.

    Every iteration each gene makes exactly one time assignment + loss evaluation: for the
    Nelder-Mead stage it is in (:func:`nm_propose` / :func:`nm_consume`; the objective is
    ``get_mse`` of the candidate) or for the ``update()`` it is in (:func:`_update_input`,
    :func:`_update_outcome`). Genes advance through the schedule independently, so a
    batch costs its gene with the most evaluations, not the sum over stages of each
    stage's slowest gene, and the compiled program holds one copy of the assignment
    instead of one per stage, update evaluation and mode. With ``high_pars_resolution``
    an update() with the best vertex follows every Nelder-Mead iteration (core ~266-306).
    """
    steps, stages = _schedule(cfg, modes, scaling_steps, fit_steps)
    n_steps = len(steps)
    set_ratio = scaling_steps  # the ratio is set after initialize_scaling (else: loaded)
    if not steps:  # initialize_scaling without fit_scaling: just the ratio
        return _with_ratio(state) if set_ratio else state
    n_scale = sum(s_.kind == _SCALE for s_ in steps)
    table = {f: jnp.asarray([getattr(s_, f) for s_ in steps]) for f in _Step._fields}
    modes3 = (None, *modes)
    opts = [nm_options(len(g.idx), cfg.nm_maxiter, None,
                       *((1e-4, 1e-4) if g.tol is None else (g.tol, g.tol)))
            for g in stages]  # fmt: skip
    # Stages with the same number of variables share one Nelder-Mead state ("slot"): a gene
    # is in one stage at a time and every stage starts a fresh simplex, so the loop body
    # holds one minimiser per simplex size (4 for the 6 stages of fit()) instead of one per
    # stage. Only the tolerances differ within a slot; they become per-gene values.
    sizes = sorted({o.n for o in opts})
    slot = [sizes.index(o.n) for o in opts]
    members = [[g for g in range(len(stages)) if slot[g] == j] for j in range(len(sizes))]
    for ms in members:
        assert len({(opts[g].maxiter, opts[g].maxfev) for g in ms}) == 1, "slot options differ"

    def slot_opts(j: int, stage):
        o = opts[members[j][0]]
        if len({(opts[g].xatol, opts[g].fatol) for g in members[j]}) == 1:
            return o

        def per_gene(field):  # the tolerance of the gene's stage (float64)
            vals = [getattr(opts[g], field) for g in members[j]]
            return functools.reduce(
                lambda acc, gv: jnp.where(stage == gv[0], gv[1], acc),
                zip(members[j][1:], vals[1:], strict=True),
                jnp.asarray(vals[0], jnp.float64),
            )

        return o._replace(xatol=per_gene("xatol"), fatol=per_gene("fatol"))

    lins4, lins5 = linspace(-1.0, 1.0, 4), linspace(-1.0, 1.0, 5)
    no = jnp.asarray(False)

    def enter(m: _Machine, em: EMState, s) -> _Machine:
        """Start step ``s`` (``s == n_steps``: finished) from the state ``em``."""
        sc = jnp.clip(s, 0, n_steps - 1)
        kind, arg, stage = table["kind"][sc], table["arg"][sc], table["stage"][sc]
        if set_ratio:
            em = _select(s == n_scale, _with_ratio(em), em)
        alpha0 = jnp.where(s == n_scale, em.pars[ALPHA], m.alpha0)
        # initialize_scaling's tries (core ~104-115): z_vals fixed per sweep of 4
        i = arg % 4
        sc0 = jnp.where((kind == _SCALE) & (i == 0), em.pars[SCALING], m.sc0)
        # float64 (np.linspace); the product is rounded before the sum, as numpy does (an
        # FMA here moved Krt7's fit by an ulp)
        z = sc0 + fma_barrier(lins4[i] * sc0 * jnp.where(arg < 4, 0.5, 0.1))
        beta = r32(em.pars[BETA] / em.pars[SCALING], _c32(em, BETA) & em.f32[SCALING]) * z
        c_scale = Candidate(em.pars.at[SCALING].set(z).at[BETA].set(beta),
                            em.f32.at[SCALING].set(False).at[BETA].set(False), no)  # fmt: skip
        # fit_t_and_alpha's alpha grid (core ~202-204, float64 candidates)
        j = jnp.clip(arg, 0, 4)
        c_alpha = Candidate(em.pars.at[ALPHA].set(alpha0 + true_divide(lins5[j] * alpha0, 10)),
                            em.f32.at[ALPHA].set(False), em.beta_int)  # fmt: skip
        cand = _same(em)
        for kd, c in ((_SCALE, c_scale), (_ALPHA, c_alpha)):
            cand = _select(kind == kd, c, cand)
        nm = list(m.nm)
        for g, spec in enumerate(stages):
            j = slot[g]
            nm[j] = _select((kind == _NM) & (stage == g), _nm_start(em, spec.idx), nm[j])
        nm = tuple(nm)
        return _Machine(em=em, step=s.astype(jnp.int32), upd=kind != _NM,
                        k=jnp.zeros((), jnp.int32), evals=m.evals, cand=cand, back=no,
                        nm=nm, sc0=sc0, alpha0=alpha0, done=s >= n_steps, sc=m.sc)  # fmt: skip

    def start_update(m: _Machine, em: EMState, cand: Candidate, back) -> _Machine:
        return m._replace(em=em, upd=jnp.asarray(True), k=jnp.zeros((), jnp.int32),
                          cand=cand, back=back)  # fmt: skip

    # ``st`` and ``nbrs`` are parameters, not closures: while_any's batching rule passes
    # them in (a custom_vmap function must not close over batched values)
    def body(m: _Machine, st=st, nbrs=nbrs) -> _Machine:
        em = m.em
        sc = jnp.clip(m.step, 0, n_steps - 1)
        mode, adjust = table["mode"][sc], table["adjust"][sc]
        recompute, stage = table["recompute"][sc], table["stage"][sc]
        t32_c = jnp.where(recompute, no, em.t32)

        # An update()'s evaluations are rows 0-2 of ``evals`` (row k written by evaluation
        # k). Rows from an earlier update are never cleared: row 0 is always written before
        # it is read, row 2 is read only with adjust_t_ (then written), and row 1, skipped
        # without ``recompute`` (_next_eval), reads as the stored assignment of ``em`` (em
        # is fixed during an update). Resetting the stack at every update() start cost
        # full (genes, 3, cells) copies and selects every iteration (~8% of a step).
        def rows_of(stack):
            return _row(stack, 0), _select(recompute, _row(stack, 1), _stored(em)), _row(stack, 2)

        # --- what to evaluate: the update()'s next evaluation or the stage's simplex point
        p, fl = _update_input(m.k, em, st, m.cand, *rows_of(m.evals)[:2], t32_c)
        refit = jnp.asarray(cfg.fit_time)
        pts = [nm_propose(nm) for nm in m.nm]
        for g, spec in enumerate(stages):
            here = ~m.upd & (stage == g)
            c = _nm_candidate(em, spec.idx, m.nm[slot[g]].round32, pts[slot[g]].point)
            g_refit = spec.refit and cfg.fit_time
            g_fl = _flags(c.f32, c.beta_int, no if g_refit else em.t32, em.ratio32)
            p = jnp.where(here, c.pars, p)
            fl = _select(here, g_fl, fl)
            refit = jnp.where(here, g_refit, refit)
        # --- the one evaluation
        ev, sc = _evaluate(em, st, p, fl, ModeSwitch(modes3, mode), nbrs, cfg, refit, m.sc)
        # --- Nelder-Mead bookkeeping (get_mse = get_se / n, np.mean)
        fval = true_divide(ev.loss, st.w.n)
        nm_new, nm_end, nm_done = list(m.nm), no, no
        nm_best = m.cand
        news = []
        for j in range(len(sizes)):
            here = ~m.upd & functools.reduce(jnp.logical_or, [stage == g for g in members[j]])
            new, end_iter = nm_consume(m.nm[j], pts[j], fval, slot_opts(j, stage))
            news.append(new)
            nm_new[j] = _select(here, new, m.nm[j])
            nm_end = jnp.where(here, end_iter, nm_end)
            nm_done = jnp.where(here, new.done, nm_done)
        for g, spec in enumerate(stages):
            here = ~m.upd & (stage == g)
            new = news[slot[g]]
            nm_best = _select(here, _nm_candidate(em, spec.idx, new.round32, new.sim[0]), nm_best)
        in_nm = m._replace(nm=tuple(nm_new))
        if cfg.high_pars_resolution:
            # the callback's update() after every pass (core ~266-306); the stage's own
            # update() follows once the minimisation has ended
            to_upd, back = nm_end | nm_done, nm_end
        else:
            to_upd, back = nm_done, no
        in_nm = _select(to_upd, start_update(in_nm, em, nm_best, back), in_nm)
        # --- update() bookkeeping
        # one row written per gene (kept as it was outside an update()); every path below
        # carries this same stack, so XLA selects none of it
        evals = jax.tree_util.tree_map(
            lambda x, y: x.at[m.k].set(jnp.where(m.upd, y, x[m.k])), m.evals, ev
        )
        k_next = _next_eval(m.k, adjust, recompute)
        decided = k_next == 3
        ok, *outcome = _update_outcome(em, st, m.cand, rows_of(evals), adjust, t32_c)
        # a finished gene (re-running the last update()) keeps its state: the loop does not
        # freeze finished genes (while_any), and only ``em`` is read after it
        em_new = _commit(em, ok & ~m.done, *outcome)
        pending = m._replace(evals=evals, k=k_next)
        # after a callback's update(): back to the stage, or on to its own update()
        stage_done = functools.reduce(
            lambda acc, g: jnp.where(stage == g, m.nm[slot[g]].done, acc), range(len(stages)), no
        )
        stage_best = m.cand
        for g, spec in enumerate(stages):
            nm_g = m.nm[slot[g]]
            stage_best = _select(stage == g, _nm_candidate(em_new, spec.idx, nm_g.round32,
                                                           nm_g.sim[0]), stage_best)  # fmt: skip
        resumed = _select(stage_done, start_update(m, em_new, stage_best, no),
                          m._replace(em=em_new, upd=no))  # fmt: skip
        advanced = enter(m, em_new, m.step + 1)
        after = _select(m.back, resumed, advanced)
        in_upd = _select(decided, after, pending)
        return _select(m.upd, in_upd, in_nm)._replace(evals=evals, sc=sc)

    nm0 = tuple(_nm_start(state, stages[ms[0]].idx) for ms in members)
    # the steady rows' cache: where the CPU kernel can skip rows (elsewhere every row is
    # smoothed anyway, and the cache would only be carried)
    sc = None
    if nbrs is not None and cfg.fit_steady_states and use_host_kernels():
        sc = SteadyCache.empty(st.u.shape[0], state.t.dtype)
    m0 = _Machine(em=state, step=jnp.zeros((), jnp.int32), upd=no, k=jnp.zeros((), jnp.int32),
                  evals=_stack3(_stored(state)), cand=_same(state), back=no, nm=nm0,
                  sc0=state.pars[SCALING], alpha0=state.pars[ALPHA], done=no, sc=sc)  # fmt: skip
    m = enter(m0, state, jnp.zeros((), jnp.int32))
    m = while_any(lambda m: ~m.done, lambda c, m: body(m, *c), m, (st, nbrs))
    return m.em


def _initial_values(gd: GeneData, cfg: FitConfig, init_vals):
    """``initialize_weights`` and the closed-form part of ``initialize`` (core ~31-100),
    in the data dtype (float32 for ``scv.pp.moments`` layers, as upstream under NEP 50)."""
    u, s = gd.u, gd.s
    n = u.shape[0]
    nonzero = (s > 0) & (u > 0)
    # initialize_weights (utils ~705-725)
    ub_s = np_percentile(*compact(s, nonzero), cfg.perc)
    ub_u = np_percentile(*compact(u, nonzero), cfg.perc)
    w = nonzero & jnp.where(ub_s > 0, s <= ub_s, True) & jnp.where(ub_u > 0, u <= ub_u, True)
    u_w, nw = compact(u, w)
    s_w, _ = compact(s, w)
    valid = jnp.arange(n) < nw
    u_max = jnp.max(jnp.where(valid, u_w, -jnp.inf))
    s_max = jnp.max(jnp.where(valid, s_w, -jnp.inf))
    w_upper = w & jnp.any(w) & (u > true_divide(u_max, 3)) & (s > true_divide(s_max, 3))

    std_u, std_s = np_std(u_w, nw), np_std(s_w, nw)
    std_u_raw, std_s_raw = std_u.astype(jnp.float64), std_s.astype(jnp.float64)
    degenerate = (std_u == 0) | (std_s == 0)
    std_u = jnp.where(degenerate, 1, std_u).astype(std_u.dtype)
    std_s = jnp.where(degenerate, 1, std_s).astype(std_s.dtype)
    if isinstance(cfg.fit_scaling, bool):
        scaling = divide(std_u, std_s) if cfg.fit_scaling else jnp.ones((), u.dtype)
    else:
        scaling = jnp.asarray(cfg.fit_scaling, u.dtype)
    u_ws = jnp.where(valid, true_divide(u_w, scaling), 0)

    perc = 98
    weights_s = valid & (s_w >= np_percentile(s_w, nw, perc))
    weights_u = valid & (u_ws >= np_percentile(u_ws, nw, perc))
    prior_w, _ = compact(gd.prior, w)
    weights_g = weights_s | (valid & prior_w.astype(bool))
    cu, cs = weights_g * u_ws, weights_g * s_w
    gamma = divide(pairwise_sum(cs * cu, nw), pairwise_sum(cs**2, nw)) + 1e-6
    gamma = jnp.where(
        gamma < divide(0.05, scaling),
        gamma * 1.2,
        jnp.where(gamma > divide(1.5, scaling), true_divide(gamma, 1.2), gamma),
    )
    u_inf = np_mean(*compact(u_ws, weights_u | weights_s))
    s_inf = np_mean(*compact(s_w, weights_s))
    beta = jnp.ones((), u.dtype)
    alpha = u_inf * beta
    if init_vals is not None:
        iv = jnp.asarray(init_vals, jnp.float64)
        alpha, beta, gamma = alpha * iv[0], beta * iv[1], gamma * iv[2]

    _, pval_u, means_u, ok_u = test_bimodality(u_ws, nw)
    _, pval_s, means_s, ok_s = test_bimodality(s_w, nw)
    ok = ok_u & ok_s  # core ~75-82: one try block around both tests
    pval_steady = jnp.where(ok, jnp.maximum(pval_u, pval_s), 1.0)
    steady_u = jnp.where(ok, means_u[1], 0)
    steady_s = jnp.where(ok, means_s[1], 0)

    bimodal = pval_steady < 1e-3
    u_inf_b = divide(u_inf + steady_u.astype(u_inf.dtype), 2)
    alpha_b = gamma * s_inf
    beta_b = divide(alpha_b, u_inf_b)
    u_inf = jnp.where(bimodal, u_inf_b, u_inf)
    alpha = jnp.where(bimodal, alpha_b, alpha)
    beta = jnp.where(bimodal, beta_b, beta)
    t_ = tau_inv(u_inf, s_inf, 0, 0, alpha, beta, gamma)
    f64 = jnp.float64
    return dict(
        native=(alpha, beta, gamma, t_, scaling, std_u, std_s), bimodal=bimodal,
        w=w, w_upper=w_upper, std_u=std_u.astype(f64), std_s=std_s.astype(f64),
        std_u_raw=std_u_raw, std_s_raw=std_s_raw,
        # a float ``fit_scaling`` is a Python float: weak in ``u / scaling`` (float32
        # arithmetic) but stored exactly in ``pars`` (core ~45)
        pars=jnp.stack([alpha.astype(f64), beta.astype(f64), gamma.astype(f64), t_.astype(f64),
                        scaling.astype(f64) if isinstance(cfg.fit_scaling, bool)
                        else jnp.asarray(float(cfg.fit_scaling), f64)]),  # fmt: skip
        u0_=u_inf.astype(f64), pval_steady=pval_steady.astype(f64),
        steady_u=steady_u.astype(f64), steady_s=steady_s.astype(f64),
    )  # fmt: skip


def _loaded_state(ld: Loaded, st: Static, nbrs, cfg: FitConfig) -> EMState:
    """``BaseDynamics.load_pars`` (utils ~821-860): the stored parameters (numpy float64
    scalars from ``adata.var``), ``u0_`` from ``t_``, the stored times as given
    (``get_time_assignment(t=t)``), and ``loss = [get_loss()]`` -- which re-assigns the
    times (inverse formula) when ``refit_time``. No ``initialize_scaling``."""
    f64 = jnp.float64
    alpha, beta, gamma, t_, scaling = (ld.pars[i] for i in range(5))
    pars = jnp.stack([alpha, beta, gamma, t_, scaling])
    u0_, _ = solution(t_, alpha, beta, gamma)
    t = ld.t.astype(f64)
    o = (t < t_).astype(jnp.int32)
    tau = fma_barrier(t * o) + fma_barrier((t - t_) * (1 - o))
    ratio = gamma / beta
    no = jnp.asarray(False)
    if cfg.fit_time:
        t_loss = _assign(st, pars, None, nbrs, cfg).t
    else:
        t_loss = t
    loss0 = _se(st, t_loss, pars, ratio)
    H = cfg.hist_len
    return EMState(
        pars=pars, t=t, tau=tau, o=o, loss_last=loss0,
        loss_hist=jnp.full((H,), jnp.nan, f64).at[0].set(loss0),
        pars_hist=jnp.full((5, H), jnp.nan, f64).at[:, 0].set(pars),
        n_hist=jnp.asarray(1, jnp.int32), steady_u=ld.steady_u.astype(f64), u0_=u0_,
        ratio=ratio, f32=jnp.zeros(5, bool), beta_int=no, t32=no, ratio32=no,
    )  # fmt: skip


def fit_gene(
    gd: GeneData,
    nbrs: Neighbors | None,
    cfg: FitConfig,
    init_vals=None,
    ld: Loaded | None = None,
) -> GeneResult:
    """Initialise (or load, ``ld``) and fit one gene exactly as
    ``DynamicsRecovery(...).fit(assignment_mode)``."""
    iv = _initial_values(gd, cfg, init_vals)
    if ld is not None:
        return _fit_loaded(gd, iv, nbrs, cfg, ld)
    state, st = initial_state(gd, nbrs, cfg, init_vals, iv, cfg.hist_len, run_scaling=False)
    mode = cfg.assignment_mode if cfg.max_iter > 0 else None
    pre = mode if mode == "full_projection" else None
    return _finish(state, st, nbrs, cfg, pre, mode, iv, scaling=True)


def initial_state(
    gd: GeneData,
    nbrs: Neighbors | None,
    cfg: FitConfig,
    init_vals,
    iv: dict,
    hist_len: int,
    run_scaling: bool = True,
) -> tuple[EMState, Static]:
    """``DynamicsRecovery.__init__`` up to the fit: ``initialize()`` with its first time
    assignment (in the data dtype) and loss, then (``run_scaling``) ``initialize_scaling`` and
    the ``steady_state_ratio`` (core ~31-122; without, :func:`_run_schedule` runs them).
    ``iv``: :func:`_initial_values`; ``hist_len``: length of the loss/pars histories."""
    f64 = jnp.float64
    st = Static(
        u=gd.u.astype(f64), s=gd.s.astype(f64), w=obj.make_subset(iv["w"]),
        wu=obj.make_subset(iv["w_upper"]), std_u=iv["std_u"], std_s=iv["std_s"],
        data32=jnp.asarray(gd.u.dtype == jnp.float32), **_cells(gd),
    )  # fmt: skip
    H = hist_len
    pars = iv["pars"]
    nan = jnp.asarray(jnp.nan, f64)
    # The first time assignment runs in the data dtype: all float32 for float32 moments
    # (PARITY.md, docs/upstream_precision.md section 1).
    alpha, beta, gamma, t_, scaling, std_u, std_s = iv["native"]
    a = assign_timepoints(true_divide(gd.u, scaling), gd.s, alpha, beta, gamma, scaling, t_,
                          std_u, std_s, nbrs, None, cfg.fit_steady_states, valid=st.valid,
                          grid=_grid(st))  # fmt: skip
    a = Assignment(*(x.astype(f64) if x.dtype != jnp.int32 else x for x in a[:5]))
    is32 = gd.u.dtype == jnp.float32 and init_vals is None
    data32 = jnp.asarray(gd.u.dtype == jnp.float32)
    # fit_scaling=True: std_u / std_s of float32 data is float32; fit_scaling=False: the
    # Python int 1 (core ~45), which keeps float32 operands float32 just the same
    fit_sc32 = is32 and isinstance(cfg.fit_scaling, bool)
    f32 = jnp.stack([jnp.asarray(is32), iv["bimodal"] & is32, jnp.asarray(is32),
                     jnp.asarray(is32), jnp.asarray(fit_sc32)])  # fmt: skip
    beta_int = jnp.asarray(init_vals is None) & ~iv["bimodal"]
    loss0 = _se(st, a.t, pars, nan, _flags(f32, beta_int, data32, jnp.asarray(False)))
    state = EMState(
        pars=pars, t=a.t, tau=a.tau, o=a.o, loss_last=loss0,
        loss_hist=jnp.full((H,), jnp.nan, f64).at[0].set(loss0),
        pars_hist=jnp.full((5, H), jnp.nan, f64).at[:, 0].set(pars),
        n_hist=jnp.asarray(1, jnp.int32), steady_u=iv["steady_u"], u0_=iv["u0_"], ratio=nan,
        f32=f32, beta_int=beta_int, t32=data32, ratio32=jnp.asarray(False),
    )  # fmt: skip
    if run_scaling:
        state = _run_schedule(state, st, nbrs, cfg, (None, None), True, fit_steps=False)
    return state, st


def _fit_loaded(gd: GeneData, iv: dict, nbrs, cfg: FitConfig, ld: Loaded) -> GeneResult:
    # initialize_weights sets std_u/std_s (no degenerate-std fix: that is in initialize())
    st = Static(
        u=gd.u.astype(jnp.float64), s=gd.s.astype(jnp.float64), w=obj.make_subset(iv["w"]),
        wu=obj.make_subset(iv["w_upper"]), std_u=iv["std_u_raw"], std_s=iv["std_s_raw"],
        data32=jnp.asarray(gd.u.dtype == jnp.float32), **_cells(gd),
    )  # fmt: skip
    state = _loaded_state(ld, st, nbrs, cfg)
    mode = cfg.assignment_mode if cfg.max_iter > 0 else None
    pre = mode if mode == "full_projection" else None
    iv = {**iv, "pval_steady": ld.pval_steady.astype(jnp.float64),
          "steady_s": ld.steady_s.astype(jnp.float64)}  # fmt: skip
    return _finish(state, st, nbrs, cfg, pre, mode, iv)


def _finish(state, st, nbrs, cfg, pre, mode, iv, scaling: bool = False) -> GeneResult:
    """(``scaling``: ``initialize_scaling`` and) ``fit()``'s schedule and its final
    statistics (core ~117-151). ``mode``: fit() sets the assignment mode only when
    max_iter > 0 (core ~126-145)."""
    state = _run_schedule(state, st, nbrs, cfg, (pre, mode), scaling)
    return final_result(state, st, nbrs, cfg, mode, iv)


def final_result(state: EMState, st: Static, nbrs, cfg: FitConfig, mode, iv: dict) -> GeneResult:
    """The statistics ``fit()`` leaves after its schedule (core ~146-151): the final
    ``tau``/``tau_`` (``get_divergence(mode="tau")``), likelihood and variance."""
    v = _vars(state.pars)
    fl = _flags(state.f32, state.beta_int, state.t32, state.ratio32)
    lik = obj.likelihood(state.t, st.u, st.s, st.wu, v, st.std_u, st.std_s, state.ratio, st.n,
                         fl)  # fmt: skip
    if cfg.fit_time:
        # get_divergence(mode="tau") and the variance's re-assignment (get_variance ->
        # get_time_assignment(refit_time=True)) assign the same parameters the same way:
        # one assignment, with the fit's float32 flags (a parameter still float32 upstream,
        # e.g. a never-updated gamma, makes ``-1 / gamma`` in tau_inv float32)
        final = _assign(st, state.pars, mode, nbrs, cfg, fl)
        t_var = final.t
    else:
        final = _assign(st, state.pars, mode, nbrs, cfg)  # get_divergence(mode="tau")
        t_var = state.t
    fl_var = fl._replace(t=state.t32 & (not cfg.fit_time))
    varx = obj.variance(t_var, st.u, st.s, st.wu, v, st.std_u, st.std_s, state.ratio, fl_var)
    return GeneResult(
        pars=state.pars, t=state.t, tau=final.tau_full, tau_=final.tau_full_,
        loss_hist=state.loss_hist, pars_hist=state.pars_hist, n_hist=state.n_hist,
        likelihood=lik, varx=varx, std_u=st.std_u, std_s=st.std_s,
        pval_steady=iv["pval_steady"], steady_u=state.steady_u, steady_s=iv["steady_s"],
    )  # fmt: skip
