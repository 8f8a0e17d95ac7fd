"""Gradient mode: the dynamical model fitted by Adam (optax) instead of Nelder-Mead.

Not a port: scVelo has no such mode. It fits the same model (``fit_alpha``, ``fit_beta``,
``fit_gamma``, ``fit_t_``, ``fit_scaling`` and the per-cell times of ``DynamicsRecovery``)
by alternating

1. the exact time assignment of the exact mode (:func:`jaxvelo.core.assign.assign_timepoints`,
   projection by default) at the current parameters -- the E-step, no gradient through it;
2. ``steps`` Adam steps on the log-parameters, by autodiff through the closed-form ODE
   solution, minimising upstream's objective (``get_se``: scaled squared distances of the
   weighted cells plus the steady-state-ratio regulariser) with each cell's phase (on/off)
   and time within the phase held fixed -- the M-step. The off phase starts from the
   switching state reached at ``t_``, so ``t_`` moves with the rates.

A round's new parameters are re-assigned and accepted only if the loss with the new
assignment is lower than the current one (``update()``'s accept-if-improved rule), otherwise
the gene's step size is halved. The fit starts from the exact mode's initialisation
(``initialize`` and ``initialize_scaling``), so it never ends with a higher loss than that
start. Every gene of a batch runs the same number of steps (no lockstep waste).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from jax import Array

from .assign import Neighbors
from .em import (
    ALPHA,
    BETA,
    GAMMA,
    SCALING,
    T_,
    EMState,
    FitConfig,
    GeneData,
    GeneResult,
    Static,
    _assign,
    _commit,
    _initial_values,
    _se,
    final_result,
    initial_state,
)
from .kinetics import solution
from .numerics import pairwise_sum_differentiable

__all__ = ["GradientConfig", "fit_gene_gradient", "phase_loss"]


@dataclass(frozen=True)
class GradientConfig:
    """Static configuration of a gradient fit (hashable: part of the program's key).

    Attributes
    ----------
    fit
        The exact mode's configuration: initialisation (``perc``, ``fit_scaling``), the
        time assignment (``assignment_mode``, ``fit_steady_states``) and ``n_obs``.
    rounds
        Time assignments (E-steps), each followed by ``steps`` Adam steps.
    steps
        Adam steps per round (M-step).
    learning_rate
        Adam's step size on the log-parameters; halved for a gene whose round is rejected.
    gradient_scaling
        Also take gradient steps on ``scaling`` (default False: ``scaling`` keeps the value
        of ``initialize_scaling``'s search). Measured on simulated ground truth
        (docs/gradient.md): ``scaling`` trades against the ``gamma / beta`` ratio in the
        objective, and fitting it by gradient lowers the loss but drifts the ratio
        (median |log| error 0.30 against 0.06 with it fixed; scVelo 0.08).
    """

    fit: FitConfig
    rounds: int = 8
    steps: int = 50
    learning_rate: float = 0.05
    gradient_scaling: bool = False

    @property
    def load_pars(self) -> bool:  # the batch layer's interface; no load_pars here
        return False

    @property
    def hist_len(self) -> int:
        """Initial loss, the 8 ``initialize_scaling`` tries, one per round."""
        return 1 + 8 + self.rounds


def _phase_solution(pars: Array, tau: Array, on: Array) -> tuple[Array, Array]:
    """``(u, s)`` of the model at phase time ``tau`` (``on``: induction from 0; else
    repression from the switching state at ``t_``), by the exact mode's ODE solution in
    float64 (``vectorize``'s split, with the phase given instead of derived from ``t``)."""
    alpha, beta, gamma, t_ = pars[ALPHA], pars[BETA], pars[GAMMA], pars[T_]
    u0_, s0_ = solution(t_, alpha, beta, gamma)
    return solution(tau, jnp.where(on, alpha, 0.0), beta, gamma,
                    jnp.where(on, 0.0, u0_), jnp.where(on, 0.0, s0_))  # fmt: skip


def phase_loss(pars, u, s, tau, on, n, std_u, std_s, ratio) -> Array:
    """Mean of ``get_se``'s terms over the first ``n`` cells at fixed phases and phase times
    (``udiff = (u_model * scaling - u) / std_u`` as in ``get_dists``; the regulariser
    ``(gamma / beta - ratio) * s / std_s`` once ``ratio`` is set, utils ~817-819).

    Summed by :func:`~jaxvelo.core.numerics.pairwise_sum_differentiable` (numpy's pairwise
    order by the XLA version, which JAX differentiates), a fixed order: XLA's own
    reductions may order a sum differently for other batch shapes, and results must not
    depend on the batch size or on how genes are split over devices."""
    ut, st = _phase_solution(pars, tau, on)
    udiff = (ut * pars[SCALING] - u) / std_u
    sdiff = (st - s) / std_s
    reg = jnp.where(jnp.isnan(ratio), 0.0, (pars[GAMMA] / pars[BETA] - ratio) * s / std_s)
    d = udiff**2 + sdiff**2 + reg**2
    valid = jnp.arange(d.shape[0]) < n
    return pairwise_sum_differentiable(jnp.where(valid, d, 0.0), n) / jnp.maximum(n, 1)


def _m_step(state: EMState, st: Static, cfg: GradientConfig, lr: Array) -> Array:
    """``cfg.steps`` Adam steps from ``state.pars`` at the state's phases; new parameters."""
    idx, n = st.w.idx, st.w.n
    on = state.o[idx] == 1
    t = state.t[idx]
    tau = jnp.where(on, t, t - state.pars[T_])  # phase time (tau or tau_)
    u, s = st.u[idx], st.s[idx]
    fitted = jnp.ones(5, bool).at[SCALING].set(cfg.fit.do_fit_scaling and cfg.gradient_scaling)

    def loss(theta):
        return phase_loss(jnp.exp(theta), u, s, tau, on, n, st.std_u, st.std_s, state.ratio)

    opt = optax.apply_if_finite(optax.adam(1.0), max_consecutive_errors=cfg.steps)
    theta0 = jnp.log(state.pars)

    def step(_, carry):
        theta, opt_state = carry
        g = jax.grad(loss)(theta)
        g = jnp.where(fitted, g, 0.0)
        upd, opt_state = opt.update(g, opt_state, theta)
        return theta + lr * jnp.where(fitted, upd, 0.0), opt_state

    theta, _ = jax.lax.fori_loop(0, cfg.steps, step, (theta0, opt.init(theta0)))
    p = jnp.exp(theta)
    return jnp.where(jnp.all(jnp.isfinite(p)), p, state.pars)


def fit_gene_gradient(
    gd: GeneData, nbrs: Neighbors | None, cfg: GradientConfig, init_vals=None
) -> GeneResult:
    """Fit one gene in gradient mode (see the module docstring); same outputs as the
    exact mode's :func:`jaxvelo.core.em.fit_gene`."""
    fc = cfg.fit
    iv = _initial_values(gd, fc, init_vals)
    state, st = initial_state(gd, nbrs, fc, init_vals, iv, cfg.hist_len)
    mode = fc.assignment_mode
    no = jnp.asarray(False)
    f32 = jnp.zeros(5, bool)

    def round_(_, carry):
        state, lr = carry
        p = _m_step(state, st, cfg, lr)
        a = _assign(st, p, mode, nbrs, fc)
        loss = _se(st, a.t, p, state.ratio)
        ok = loss < state.loss_last
        state = _commit(state, ok, p, a.t, a.tau, a.o, loss, f32, no, no)
        return state, jnp.where(ok, lr, lr / 2)

    lr0 = jnp.asarray(cfg.learning_rate, jnp.float64)
    if cfg.rounds > 0:
        state, _ = jax.lax.fori_loop(0, cfg.rounds, round_, (state, lr0))
    return final_result(state, st, nbrs, fc, mode, iv)
