"""The EM schedule of ``DynamicsRecovery`` (scvelo/tools/_em_model_core.py) for one gene.

``fit_gene`` is written for a single gene and batched once with ``jit(vmap(...))`` in
:mod:`jaxvelo.core.batch`. The upstream object's mutable attributes become the immutable
:class:`EMState`; ``update()``'s accept-if-improved logic becomes :func:`update`, which
returns the next state. Parameter vectors use upstream's ``pars`` order
``[alpha, beta, gamma, t_, scaling]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from . import objective as obj
from .assign import Assignment, Neighbors, assign_timepoints
from .kinetics import linspace, solution, tau_inv, unspliced
from .nelder_mead import nelder_mead
from .numerics import (
    compact,
    fma_barrier,
    np_mean,
    np_percentile,
    np_std,
    pairwise_sum,
    test_bimodality,
    true_divide,
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
        Number of cells.
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
    """One gene's observations (already basal-corrected) in the data dtype."""

    u: Array  # (n_obs,)
    s: Array  # (n_obs,)
    prior: Array  # (n_obs,) bool steady-state prior (all False when None)


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


def _assign(st: Static, p: Array, mode: str | None, nbrs, cfg: FitConfig, fl=None) -> Assignment:
    alpha, beta, gamma, scaling, t_ = _vars(p)
    u = true_divide(st.u, scaling)
    if fl is not None:
        u = r32(u, fl.scaling & st.data32)
        fl = fl._replace(t=st.data32)
    return assign_timepoints(
        u, st.s, alpha, beta, gamma, scaling, t_, st.std_u, st.std_s,
        nbrs, mode, cfg.fit_steady_states, fl,
    )  # fmt: skip


def _time(state: EMState, st: Static, p, mode, nbrs, cfg, refit: bool, fl=None):
    """``get_time_assignment``: re-assign (``refit_time``) or the stored ``(t, tau, o)``."""
    if refit:
        a = _assign(st, p, mode, nbrs, cfg, fl)
        return a.t, a.tau, a.o
    return state.t, state.tau, state.o


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


def _time_sel(state, st, p, modes, final, nbrs, cfg, refit, fl=None):
    """``_time`` with the assignment mode chosen by ``final`` (an unbatched flag, so
    ``lax.cond`` runs one branch) when the pre-training and final modes differ."""
    pre_mode, final_mode = modes
    if pre_mode == final_mode or isinstance(final, bool):
        mode = final_mode if final is True else pre_mode
        return _time(state, st, p, mode, nbrs, cfg, refit, fl)
    return jax.lax.cond(
        final,
        lambda: _time(state, st, p, final_mode, nbrs, cfg, refit, fl),
        lambda: _time(state, st, p, pre_mode, nbrs, cfg, refit, fl),
    )


def update(
    state: EMState,
    st: Static,
    cand: Candidate,
    nbrs,
    cfg: FitConfig,
    modes: tuple[str | None, str | None],
    final: Array | bool = False,
    adjust_t_: Array | bool = True,
) -> EMState:
    """``DynamicsRecovery.update`` (core ~311-378) for the proposed parameters ``cand``.

    ``modes = (pre-training mode, final mode)``; ``final`` selects one, ``adjust_t_`` is
    upstream's flag (both may be unbatched traced flags of the schedule loop). When the new
    parameters are rejected upstream recomputes the current assignment and loss
    (core ~334-336); both are deterministic functions of the current parameters and equal
    the stored ``(t, tau, o)`` and ``loss[-1]``, which are reused here.
    """
    no = jnp.asarray(False)
    refit = cfg.fit_time
    loss_prev = state.loss_last
    p_new = cand.pars
    fl_new = _flags(cand.f32, cand.beta_int, no, state.ratio32)
    t, tau, o = _time_sel(state, st, p_new, modes, final, nbrs, cfg, refit, fl_new)
    loss = _se(st, t, p_new, state.ratio, fl_new)
    perform = loss < loss_prev

    def plain(_):
        return perform, p_new, t, tau, o, loss, cand.f32, cand.beta_int, no

    def current():
        """Upstream re-assigns the current parameters in the *current* mode (core ~334-336).
        That equals the stored assignment unless the mode changed since it was made: the
        switch to the final assignment mode (and full_projection's first fit stages)."""
        fl_cur = _flags(state.f32, state.beta_int, no, state.ratio32)

        def recompute():
            t_c, tau_c, o_c = _time_sel(state, st, state.pars, modes, final, nbrs, cfg, refit,
                                        fl_cur)  # fmt: skip
            return t_c, tau_c, o_c, _se(st, t_c, state.pars, state.ratio, fl_cur), no

        def stored():
            return state.t, state.tau, state.o, loss_prev, state.t32

        if not refit:
            return stored()
        if modes[0] is not None or cfg.load_pars:
            # load_pars: the stored t is the loaded one, not an assignment of these
            # parameters (utils ~851), so re-assign as upstream does
            return recompute()
        if isinstance(final, bool):
            return recompute() if (final and modes[1] is not None) else stored()
        if modes[1] is None:
            return stored()
        return jax.lax.cond(final, recompute, stored)

    def with_alt(_):
        on = state.o == 1
        t_c, tau_c, o_c, loss_c, t32_c = current()
        p = jnp.where(perform, p_new, state.pars)
        t_b = jnp.where(perform, t, t_c)
        tau_b = jnp.where(perform, tau, tau_c)
        o_b = jnp.where(perform, o, o_c)
        loss_b = jnp.where(perform, loss, loss_c)
        f32 = jnp.where(perform, cand.f32, state.f32)
        beta_int = jnp.where(perform, cand.beta_int, state.beta_int)
        t32 = jnp.where(perform, no, t32_c)
        alpha, beta, gamma, scaling, t_ = _vars(p)

        alt_t_ = jnp.max(jnp.where(on, t_b, -jnp.inf))
        try_alt = jnp.any(on) & (0 < alt_t_) & (alt_t_ < t_)
        # core ~342: np.max(t) / len(t) is float32 for a float32 t; * np.sum(...) -> float64
        # (the product is fenced: XLA would contract ``a + b * c`` into one FMA)
        step = r32(true_divide(jnp.max(t_b), cfg.n_obs), t32) * jnp.sum(t_b == t_)
        alt_t_ = alt_t_ + fma_barrier(step)
        # alt_t_ > 0 here, so get_vars keeps it
        p_alt = p.at[T_].set(jnp.where(try_alt, alt_t_, t_))
        alt_fl = _flags(f32.at[T_].set(False), beta_int, no, state.ratio32)
        alt_t, alt_tau, alt_o = _time_sel(state, st, p_alt, modes, final, nbrs, cfg, refit,
                                          alt_fl)  # fmt: skip
        alt_loss = _se(st, alt_t, p_alt, state.ratio, alt_fl)
        # unspliced(t_, 0, alpha, beta) on numpy scalars (float32 where they are)
        ut_cur = obj.switch_state(t_, alpha, beta, gamma, _flags(f32, beta_int, no, no))[0]
        ut_alt = unspliced(p_alt[T_], 0, alpha, beta)
        min_loss = jnp.minimum(loss_b, loss_prev)
        take = try_alt & ((alt_loss * 0.99 <= min_loss) | (ut_cur * 0.99 < ut_alt))
        return (
            perform | take,
            jnp.where(take, p_alt, p),
            jnp.where(take, alt_t, t_b),
            jnp.where(take, alt_tau, tau_b),
            jnp.where(take, alt_o, o_b),
            jnp.where(take, alt_loss, loss_b),
            jnp.where(take, f32.at[T_].set(False), f32),
            beta_int,
            jnp.where(take, no, t32),
        )

    if isinstance(adjust_t_, bool):
        out = with_alt(None) if adjust_t_ else plain(None)
    else:
        out = jax.lax.cond(adjust_t_, with_alt, plain, None)
    return _commit(state, *out)


def _nm_stage(
    state: EMState,
    st: Static,
    idx: tuple[int, ...],
    nbrs,
    cfg: FitConfig,
    mode: str | None,
    tol: float | None,
    refit_objective: bool = True,
    modes: tuple = (None, None),
    final: Array | bool = False,
) -> tuple[Candidate, EMState]:
    """One ``fit_*`` stage (core ~196-262): Nelder-Mead on ``get_mse`` over the parameters
    ``idx``; returns the result as the candidate of the ``update()`` that follows.

    With ``high_pars_resolution`` upstream's ``cb_fit_*`` callbacks run ``update()`` with
    the best vertex after every Nelder-Mead iteration (core ~266-306); the objective then
    sees the updated state (e.g. a ``t_`` moved by the adjust-t_ alternative)."""
    if cfg.high_pars_resolution:
        return _nm_stage_cb(state, st, idx, nbrs, cfg, mode, tol, refit_objective, modes,
                            final)  # fmt: skip
    x0 = state.pars[jnp.asarray(idx)]
    # np.array([...]) of numpy float32 scalars is float32; a Python int (beta) or any
    # float64 makes it float64, and scipy keeps x0's dtype for the simplex (PARITY.md).
    x32 = jnp.all(state.f32[jnp.asarray(idx)])
    refit = refit_objective and cfg.fit_time
    f32_x = state.f32.at[jnp.asarray(idx)].set(x32)
    beta_int_x = state.beta_int & (BETA not in idx)
    fl = _flags(f32_x, beta_int_x, jnp.asarray(False) if refit else state.t32, state.ratio32)

    def mse(x):
        p = _overlay(state, idx, x)
        t, _, _ = _time(state, st, p, mode, nbrs, cfg, refit, fl)
        return obj.mse(t, st.u, st.s, st.w, _vars(p), st.std_u, st.std_s, state.ratio, fl)

    tol_kw = {} if tol is None else {"xatol": tol, "fatol": tol}
    res, _ = nelder_mead(mse, x0, maxiter=cfg.nm_maxiter, round32=x32, **tol_kw)
    return Candidate(_overlay(state, idx, res.x), f32_x, beta_int_x), state


def _nm_stage_cb(state, st, idx, nbrs, cfg, mode, tol, refit_objective, modes, final):
    """:func:`_nm_stage` with upstream's per-iteration ``update()`` callbacks."""
    x0 = state.pars[jnp.asarray(idx)]
    x32 = jnp.all(state.f32[jnp.asarray(idx)])
    refit = refit_objective and cfg.fit_time

    def candidate(cur, x):
        # x has the simplex's dtype (scipy hands the callback a copy of sim[0])
        return Candidate(_overlay(cur, idx, x), cur.f32.at[jnp.asarray(idx)].set(x32),
                         cur.beta_int & (BETA not in idx))  # fmt: skip

    def mse(x, cur):
        c = candidate(cur, x)
        fl = _flags(c.f32, c.beta_int, jnp.asarray(False) if refit else cur.t32, cur.ratio32)
        t, _, _ = _time(cur, st, c.pars, mode, nbrs, cfg, refit, fl)
        return obj.mse(t, st.u, st.s, st.w, _vars(c.pars), st.std_u, st.std_s, cur.ratio, fl)

    def callback(x, cur):
        return update(cur, st, candidate(cur, x), nbrs, cfg, modes, final, True)

    tol_kw = {} if tol is None else {"xatol": tol, "fatol": tol}
    res, state = nelder_mead(mse, x0, maxiter=cfg.nm_maxiter, round32=x32, callback=callback,
                             cb_state=state, fun_uses_cb_state=True, **tol_kw)  # fmt: skip
    return candidate(state, res.x), state


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
        scaling = std_u / std_s if cfg.fit_scaling else jnp.ones((), u.dtype)
    else:
        scaling = jnp.asarray(cfg.fit_scaling, u.dtype)
    u_ws = jnp.where(valid, true_divide(u_w, scaling), 0)

    perc = 98
    weights_s = valid & (s_w >= np_percentile(s_w, nw, perc))
    weights_u = valid & (u_ws >= np_percentile(u_ws, nw, perc))
    prior_w, _ = compact(gd.prior, w)
    weights_g = weights_s | (valid & prior_w.astype(bool))
    cu, cs = weights_g * u_ws, weights_g * s_w
    gamma = pairwise_sum(cs * cu, nw) / pairwise_sum(cs**2, nw) + 1e-6
    gamma = jnp.where(
        gamma < 0.05 / scaling,
        gamma * 1.2,
        jnp.where(gamma > 1.5 / scaling, true_divide(gamma, 1.2), gamma),
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
    u_inf_b = (u_inf + steady_u.astype(u_inf.dtype)) / 2
    alpha_b = gamma * s_inf
    beta_b = alpha_b / u_inf_b
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


def _initialize_scaling(state: EMState, st: Static, nbrs, cfg: FitConfig) -> EMState:
    """``initialize_scaling(sight=0.5)`` then ``(sight=0.1)`` (core ~117-121): 8 updates in
    one loop (one compiled ``update`` body)."""
    if not cfg.do_fit_scaling:
        return state
    lins = linspace(-1.0, 1.0, 4)

    def step(i, carry):
        state, sc0 = carry
        sc0 = jnp.where(i % 4 == 0, state.pars[SCALING], sc0)  # z_vals fixed per sweep
        sight = jnp.where(i < 4, 0.5, 0.1)
        z = sc0 + lins[i % 4] * sc0 * sight  # float64 (np.linspace)
        ratio32 = _c32(state, BETA) & state.f32[SCALING]
        beta = r32(state.pars[BETA] / state.pars[SCALING], ratio32) * z
        cand = Candidate(
            state.pars.at[SCALING].set(z).at[BETA].set(beta),
            state.f32.at[SCALING].set(False).at[BETA].set(False),
            jnp.asarray(False),
        )
        return update(state, st, cand, nbrs, cfg, (None, None)), sc0

    state, _ = jax.lax.fori_loop(0, 8, step, (state, state.pars[SCALING]))
    return state


def _fit_schedule(state: EMState, st: Static, nbrs, cfg: FitConfig, modes) -> EMState:
    """``DynamicsRecovery.fit`` (core ~124-151) as one loop over its update() calls.

    Each step proposes a candidate (an alpha try, a Nelder-Mead stage, or the current
    parameters) and runs the shared ``update``. The step kind is an unbatched index, so
    under ``vmap`` ``lax.switch`` executes one branch and each stage compiles once.
    """
    pre, final_mode = modes
    alpha0 = state.pars[ALPHA]
    lins = linspace(-1.0, 1.0, 5)

    def alpha_try(state, j):  # fit_t_and_alpha, core ~202-204 (float64 candidates)
        p = state.pars.at[ALPHA].set(alpha0 + true_divide(lins[j] * alpha0, 10))
        return Candidate(p, state.f32.at[ALPHA].set(False), state.beta_int), state

    def stage(idx, mode, tol, refit=True, final=False):
        return lambda state, j: _nm_stage(state, st, idx, nbrs, cfg, mode, tol, refit, modes,
                                          final)  # fmt: skip

    branches = [alpha_try, lambda state, j: (_same(state), state)]
    steps: list[tuple[int, int, bool, bool]] = []  # (branch, arg, final, adjust_t_)
    if cfg.max_iter > 0:
        steps += [(0, j, False, True) for j in range(5)]
        stages = [((T_, ALPHA), pre, None)]
        if cfg.do_fit_scaling:
            stages.append(((T_, BETA, SCALING), pre, None))
        stages += [((ALPHA, GAMMA), pre, 1e-2), ((T_,), pre, None),
                   ((T_, ALPHA, BETA, GAMMA), pre, 1e-2)]  # fmt: skip
        for idx, mode, tol in stages:
            branches.append(stage(idx, mode, tol))
            steps.append((len(branches) - 1, 0, False, True))
        steps.append((1, 0, True, False))  # update(adjust_t_=False) in the final mode
        branches.append(stage((T_, ALPHA, BETA, GAMMA), final_mode, 1e-2, refit=False,
                              final=True))  # fmt: skip
        steps.append((len(branches) - 1, 0, True, True))
    steps.append((1, 0, True, True))  # final update()

    table = [jnp.asarray([s_[k] for s_ in steps]) for k in range(4)]

    def step(i, state):
        kind, arg, final, adjust = (tbl[i] for tbl in table)
        cand, state = jax.lax.switch(kind, branches, state, arg)
        return update(state, st, cand, nbrs, cfg, modes, final.astype(bool),
                      adjust.astype(bool))  # fmt: skip

    return jax.lax.fori_loop(0, len(steps), step, state)


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
    state, st = initial_state(gd, nbrs, cfg, init_vals, iv, cfg.hist_len)
    mode = cfg.assignment_mode if cfg.max_iter > 0 else None
    pre = mode if mode == "full_projection" else None
    return _finish(state, st, nbrs, cfg, pre, mode, iv)


def initial_state(
    gd: GeneData, nbrs: Neighbors | None, cfg: FitConfig, init_vals, iv: dict, hist_len: int
) -> tuple[EMState, Static]:
    """``DynamicsRecovery.__init__`` up to the fit: ``initialize()`` with its first time
    assignment (in the data dtype) and loss, then ``initialize_scaling`` (core ~31-121).
    ``iv``: :func:`_initial_values`; ``hist_len``: length of the loss/pars histories."""
    f64 = jnp.float64
    st = Static(
        u=gd.u.astype(f64), s=gd.s.astype(f64), w=obj.make_subset(iv["w"]),
        wu=obj.make_subset(iv["w_upper"]), std_u=iv["std_u"], std_s=iv["std_s"],
        data32=jnp.asarray(gd.u.dtype == jnp.float32),
    )  # fmt: skip
    H = hist_len
    pars = iv["pars"]
    nan = jnp.asarray(jnp.nan, f64)
    # The first time assignment runs in the data dtype: all float32 for float32 moments
    # (PARITY.md, docs/upstream_precision.md section 1).
    alpha, beta, gamma, t_, scaling, std_u, std_s = iv["native"]
    a = assign_timepoints(true_divide(gd.u, scaling), gd.s, alpha, beta, gamma, scaling, t_,
                          std_u, std_s, nbrs, None, cfg.fit_steady_states)  # fmt: skip
    a = Assignment(*(x.astype(f64) if x.dtype != jnp.int32 else x for x in a))
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

    state = _initialize_scaling(state, st, nbrs, cfg)
    ratio32 = _c32(state, GAMMA) & _c32(state, BETA)
    state = state._replace(ratio=r32(state.pars[GAMMA] / state.pars[BETA], ratio32),
                           ratio32=ratio32)  # fmt: skip
    return state, st


def _fit_loaded(gd: GeneData, iv: dict, nbrs, cfg: FitConfig, ld: Loaded) -> GeneResult:
    # initialize_weights sets std_u/std_s (no degenerate-std fix: that is in initialize())
    st = Static(
        u=gd.u.astype(jnp.float64), s=gd.s.astype(jnp.float64), w=obj.make_subset(iv["w"]),
        wu=obj.make_subset(iv["w_upper"]), std_u=iv["std_u_raw"], std_s=iv["std_s_raw"],
        data32=jnp.asarray(gd.u.dtype == jnp.float32),
    )  # fmt: skip
    state = _loaded_state(ld, st, nbrs, cfg)
    mode = cfg.assignment_mode if cfg.max_iter > 0 else None
    pre = mode if mode == "full_projection" else None
    iv = {**iv, "pval_steady": ld.pval_steady.astype(jnp.float64),
          "steady_s": ld.steady_s.astype(jnp.float64)}  # fmt: skip
    return _finish(state, st, nbrs, cfg, pre, mode, iv)


def _finish(state, st, nbrs, cfg, pre, mode, iv) -> GeneResult:
    """``fit()``'s schedule and its final statistics (core ~124-151). ``mode``: fit() sets
    the assignment mode only when max_iter > 0 (core ~126-145)."""
    state = _fit_schedule(state, st, nbrs, cfg, (pre, mode))
    return final_result(state, st, nbrs, cfg, mode, iv)


def final_result(state: EMState, st: Static, nbrs, cfg: FitConfig, mode, iv: dict) -> GeneResult:
    """The statistics ``fit()`` leaves after its schedule (core ~146-151): the final
    ``tau``/``tau_`` (``get_divergence(mode="tau")``), likelihood and variance."""
    final = _assign(st, state.pars, mode, nbrs, cfg)  # get_divergence(mode="tau")
    v = _vars(state.pars)
    fl = _flags(state.f32, state.beta_int, state.t32, state.ratio32)
    lik = obj.likelihood(state.t, st.u, st.s, st.wu, v, st.std_u, st.std_s, state.ratio, cfg.n_obs,
                         fl)  # fmt: skip
    t_var, _, _ = _time(state, st, state.pars, mode, nbrs, cfg, cfg.fit_time, fl)
    fl_var = fl._replace(t=state.t32 & (not cfg.fit_time))
    varx = obj.variance(t_var, st.u, st.s, st.wu, v, st.std_u, st.std_s, state.ratio, fl_var)
    return GeneResult(
        pars=state.pars, t=state.t, tau=final.tau_full, tau_=final.tau_full_,
        loss_hist=state.loss_hist, pars_hist=state.pars_hist, n_hist=state.n_hist,
        likelihood=lik, varx=varx, std_u=st.std_u, std_s=st.std_s,
        pval_steady=iv["pval_steady"], steady_u=state.steady_u, steady_s=iv["steady_s"],
    )  # fmt: skip
