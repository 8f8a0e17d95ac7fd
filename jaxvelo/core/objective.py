"""The objective and the fit statistics of ``BaseDynamics`` (scvelo/tools/_em_model_utils.py):
``get_dists``, ``get_se`` / ``get_mse`` (the loss and the Nelder-Mead objective),
``get_loglikelihood`` / ``get_likelihood`` and ``get_variance``.

Weighted subsets (``u[weights]``) are represented by a per-gene gather index ``widx`` whose
first ``nw`` entries list the selected cells in order, so that sums reproduce numpy's
pairwise summation over the compacted array.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import Array

from .kinetics import solution, vectorize
from .numerics import pairwise_sum


class Subset(NamedTuple):
    """A weighted subset of cells: ``cells[idx[:n]]`` in increasing cell order."""

    idx: Array  # (n_obs,) int32 gather index, valid entries first
    n: Array  # () int32 number of selected cells


def make_subset(mask: Array) -> Subset:
    """Gather index of a boolean mask (stable: selected cells first, in order)."""
    idx = jnp.argsort(~mask, stable=True).astype(jnp.int32)
    return Subset(idx=idx, n=jnp.sum(mask).astype(jnp.int32))


def dists(
    t: Array,
    u: Array,
    s: Array,
    alpha: Array,
    beta: Array,
    gamma: Array,
    scaling: Array,
    t_: Array,
    std_u: Array,
    std_s: Array,
    ratio: Array,
) -> tuple[Array, Array, Array]:
    """``BaseDynamics.get_dists`` on already selected cells: ``(udiff, sdiff, reg)``.

    ``u`` is the raw (unscaled) unspliced abundance, divided by ``scaling`` here as in
    ``get_reads``. ``ratio`` is ``steady_state_ratio``; pass NaN while it is unset
    (``reg = 0`` until ``initialize`` sets it, utils ~817-819).
    """
    uu = u / scaling
    tau, alpha_v, u0, s0 = vectorize(t, t_, alpha, beta, gamma)
    ut, st = solution(tau, alpha_v, beta, gamma, u0, s0)
    udiff = (ut - uu) / std_u * scaling
    sdiff = (st - s) / std_s
    reg = jnp.where(jnp.isnan(ratio), 0, (gamma / beta - ratio) * s / std_s)
    return udiff, sdiff, reg


def _gathered(sub: Subset, *arrays: Array) -> list[Array]:
    return [a[sub.idx] for a in arrays]


def se(t, u, s, sub: Subset, pars, std_u, std_s, ratio) -> Array:
    """``get_se``: ``np.sum(udiff**2 + sdiff**2 + reg**2)`` over the weighted cells.

    ``pars = (alpha, beta, gamma, scaling, t_)``.
    """
    alpha, beta, gamma, scaling, t_ = pars
    tw, uw, sw = _gathered(sub, t, u, s)
    udiff, sdiff, reg = dists(tw, uw, sw, alpha, beta, gamma, scaling, t_, std_u, std_s, ratio)
    distx = udiff**2 + sdiff**2
    distx = distx + reg**2
    return pairwise_sum(distx, sub.n)


def mse(t, u, s, sub: Subset, pars, std_u, std_s, ratio) -> Array:
    """``get_mse``: the mean of :func:`se`'s terms (``np.mean`` = pairwise sum / count)."""
    return se(t, u, s, sub, pars, std_u, std_s, ratio) / sub.n


def _masked_mean(x: Array, n: Array) -> Array:
    return pairwise_sum(x, n) / n


def loglikelihood(t, u, s, sub: Subset, pars, std_u, std_s, ratio, n_obs: int) -> Array:
    """``get_loglikelihood(weighted="upper")`` with ``noise_model="normal"`` (utils ~1110-1135).

    ``n = clip(len(distx) - len(self.u) * 0.01, 2, None)``; ``varx += varx == 0``; the
    distance includes ``reg**2``.
    """
    alpha, beta, gamma, scaling, t_ = pars
    tw, uw, sw = _gathered(sub, t, u, s)
    udiff, sdiff, reg = dists(tw, uw, sw, alpha, beta, gamma, scaling, t_, std_u, std_s, ratio)
    distx = udiff**2 + sdiff**2 + reg**2
    eucl_distx = jnp.sqrt(distx)
    n = jnp.clip(sub.n - n_obs * 0.01, 2, None)
    valid = jnp.arange(distx.shape[0]) < sub.n
    signed = jnp.where(valid, jnp.sign(sdiff) * eucl_distx, 0)
    varx = _masked_mean(distx, sub.n) - _masked_mean(signed, sub.n) ** 2
    varx = varx + (varx == 0)
    loglik = -1 / 2 / n * pairwise_sum(distx, sub.n) / varx
    loglik = loglik - 1 / 2 * jnp.log(2 * jnp.pi * varx)
    return loglik


def likelihood(t, u, s, sub: Subset, pars, std_u, std_s, ratio, n_obs: int) -> Array:
    """``get_likelihood``: ``exp(get_loglikelihood(weighted="upper"))``."""
    return jnp.exp(loglikelihood(t, u, s, sub, pars, std_u, std_s, ratio, n_obs))


def variance(t, u, s, sub: Subset, pars, std_u, std_s, ratio) -> Array:
    """``get_variance(weighted="upper")``: ``mean(distx) - mean(sign(sdiff) sqrt(distx))**2``
    with ``distx`` *without* the regularisation term (utils ~1177)."""
    alpha, beta, gamma, scaling, t_ = pars
    tw, uw, sw = _gathered(sub, t, u, s)
    udiff, sdiff, _ = dists(tw, uw, sw, alpha, beta, gamma, scaling, t_, std_u, std_s, ratio)
    distx = udiff**2 + sdiff**2
    valid = jnp.arange(distx.shape[0]) < sub.n
    signed = jnp.where(valid, jnp.sign(sdiff) * jnp.sqrt(distx), 0)
    return _masked_mean(distx, sub.n) - _masked_mean(signed, sub.n) ** 2
