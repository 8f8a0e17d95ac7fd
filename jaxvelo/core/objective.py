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

from .npmath import np_exp32, np_exp64, np_log64
from .numerics import fma_barrier as fb
from .numerics import pairwise_sum, pairwise_sum_at, stable_partition, true_divide
from .numerics import round32 as r32


class Subset(NamedTuple):
    """A weighted subset of cells: ``cells[idx[:n]]`` in increasing cell order."""

    idx: Array  # (n_obs,) int32 gather index, valid entries first
    n: Array  # () int32 number of selected cells


def make_subset(mask: Array) -> Subset:
    """Gather index of a boolean mask (stable: selected cells first, in order)."""
    idx = stable_partition(mask)
    return Subset(idx=idx, n=jnp.sum(mask).astype(jnp.int32))


class Flags(NamedTuple):
    """Which inputs are numpy float32 upstream (see docs/upstream_precision.md).

    ``beta`` is also set while beta is the Python int 1 (int op float32 stays float32).
    Operations between float32 scalars (and float32 arrays with float32 scalars) are
    float32 in NumPy 2; the objective's arrays are float64 otherwise (``vectorize`` builds
    an int64 mask).
    """

    alpha: Array | bool = False
    beta: Array | bool = False
    gamma: Array | bool = False
    t_: Array | bool = False
    scaling: Array | bool = False
    t: Array | bool = False  # the time array came from a float32 assignment
    ratio: Array | bool = False  # steady_state_ratio is float32


NO_FLAGS = Flags()  # everything float64


def exp_r32(x: Array, flag) -> Array:
    """``np.exp`` of a float64 or (where ``flag``) a numpy float32 value: numpy's float32
    exp is not correctly rounded, so its SIMD kernel is ported (:mod:`.npmath`)."""
    return jnp.where(flag, np_exp32(x), np_exp64(x))


def switch_state(t_, alpha, beta, gamma, fl: Flags) -> tuple[Array, Array]:
    """``unspliced(t_, 0, alpha, beta)`` and ``spliced(t_, 0, 0, alpha, beta, gamma)`` on
    numpy scalars, in float32 where the operands are (``vectorize``, utils ~458-459)."""
    bt = fl.beta & fl.t_
    gt = fl.gamma & fl.t_
    expu = exp_r32(r32(-beta * t_, bt), bt)
    exps = exp_r32(r32(-gamma * t_, gt), gt)
    ab = fl.alpha & fl.beta
    u0_ = r32(r32(alpha / beta, ab) * r32(1 - expu, bt), ab & bt)
    gb = fl.gamma & fl.beta
    inv = r32(1 / r32(gamma - beta, gb), gb)
    inv = jnp.where(gamma - beta != 0, inv, jnp.nan)
    c = r32(alpha * inv, fl.alpha & gb)
    ag = fl.alpha & fl.gamma
    term1 = r32(r32(alpha / gamma, ag) * r32(1 - exps, gt), ag & gt)
    all32 = fl.alpha & fl.beta & fl.gamma & fl.t_
    term2 = r32(c * r32(exps - expu, bt & gt), all32)
    s0_ = r32(term1 + term2, all32)
    return u0_, s0_


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
    fl: Flags = NO_FLAGS,
) -> tuple[Array, Array, Array]:
    """``BaseDynamics.get_dists`` on already selected cells: ``(udiff, sdiff, reg)``.

    ``u`` is the raw (unscaled) unspliced abundance, divided by ``scaling`` here as in
    ``get_reads``. ``ratio`` is ``steady_state_ratio``; pass NaN while it is unset
    (``reg = 0`` until ``initialize`` sets it, utils ~817-819). ``fl`` says which inputs
    upstream holds as float32; the float32 operations are emulated by rounding.
    """
    # fb() keeps XLA from fusing a product into the following addition (FMA) and
    # true_divide from turning a division by a per-gene scalar into a multiplication,
    # so that float64 results equal numpy's bit for bit.
    uu = r32(true_divide(u, scaling), fl.scaling)
    # vectorize (utils ~450-466) with its int64 mask: arrays become float64
    o = (t < t_).astype(jnp.int32)
    tau = fb(t * o) + fb(r32(t - t_, fl.t & fl.t_) * (1 - o))
    u0_, s0_ = switch_state(t_, alpha, beta, gamma, fl)
    u0 = u0_ * (1 - o)
    s0 = s0_ * (1 - o)
    alpha_v = alpha * o
    # SplicingDynamics.get_solution on arrays; only invert(gamma - beta) is scalar
    expu = np_exp64(-beta * tau)
    exps = np_exp64(-gamma * tau)
    ut = fb(u0 * expu) + fb(true_divide(alpha_v, beta) * (1 - expu))
    gb = fl.gamma & fl.beta
    inv = r32(1 / r32(gamma - beta, gb), gb)
    inv = jnp.where(gamma - beta != 0, inv, jnp.nan)
    c = (alpha_v - fb(u0 * beta)) * inv
    st = fb(s0 * exps) + fb(true_divide(alpha_v, gamma) * (1 - exps)) + fb(c * (exps - expu))
    udiff = true_divide(ut - uu, std_u) * scaling
    sdiff = true_divide(st - s, std_s)
    r = fl.gamma & fl.beta & fl.ratio
    reg = r32(r32(r32(gamma / beta, gb) - ratio, r) * s, r)
    reg = r32(true_divide(reg, std_s), r)
    reg = jnp.where(jnp.isnan(ratio), 0, reg)
    return udiff, sdiff, reg


def _gathered(sub: Subset, *arrays: Array) -> list[Array]:
    return [a[sub.idx] for a in arrays]


def se(t, u, s, sub: Subset, pars, std_u, std_s, ratio, fl: Flags = NO_FLAGS) -> Array:
    """``get_se``: ``np.sum(udiff**2 + sdiff**2 + reg**2)`` over the weighted cells.

    ``pars = (alpha, beta, gamma, scaling, t_)``.
    """
    alpha, beta, gamma, scaling, t_ = pars
    # The terms are computed for all cells (contiguous, vectorised) and then compacted:
    # computed after the gather, XLA fuses them into it as a scalar loop (2-3x slower).
    # Elementwise, so the selected cells' terms are the same bits either way.
    udiff, sdiff, reg = dists(t, u, s, alpha, beta, gamma, scaling, t_, std_u, std_s, ratio, fl)
    r = fl.gamma & fl.beta & fl.ratio
    distx = fb(udiff**2) + fb(sdiff**2)
    distx = distx + fb(r32(reg**2, r))
    return pairwise_sum_at(distx, sub.idx, sub.n)


def mse(t, u, s, sub: Subset, pars, std_u, std_s, ratio, fl: Flags = NO_FLAGS) -> Array:
    """``get_mse``: the mean of :func:`se`'s terms (``np.mean`` = pairwise sum / count)."""
    return true_divide(se(t, u, s, sub, pars, std_u, std_s, ratio, fl), sub.n)


def _masked_mean(x: Array, n: Array) -> Array:
    return true_divide(pairwise_sum(x, n), n)


def loglikelihood(
    t, u, s, sub: Subset, pars, std_u, std_s, ratio, n_obs: int | Array, fl: Flags = NO_FLAGS
) -> Array:
    """``get_loglikelihood(weighted="upper")`` with ``noise_model="normal"`` (utils ~1110-1135).

    ``n = clip(len(distx) - len(self.u) * 0.01, 2, None)``; ``varx += varx == 0``; the
    distance includes ``reg**2``.
    """
    alpha, beta, gamma, scaling, t_ = pars
    tw, uw, sw = _gathered(sub, t, u, s)
    udiff, sdiff, reg = dists(tw, uw, sw, alpha, beta, gamma, scaling, t_, std_u, std_s, ratio,
                              fl)  # fmt: skip
    distx = fb(udiff**2) + fb(sdiff**2) + fb(r32(reg**2, fl.gamma & fl.beta & fl.ratio))
    eucl_distx = jnp.sqrt(distx)
    # a Python int or the traced real count of a padded cell axis: the same float64 product
    n = jnp.clip(sub.n - fb(jnp.asarray(n_obs, jnp.float64) * 0.01), 2, None)  # no FMA
    valid = jnp.arange(distx.shape[0]) < sub.n
    signed = jnp.where(valid, jnp.sign(sdiff) * eucl_distx, 0)
    # the square is rounded before the subtraction, as numpy does (fb: no FMA)
    varx = _masked_mean(distx, sub.n) - fb(_masked_mean(signed, sub.n) ** 2)
    varx = varx + (varx == 0)
    loglik = -1 / 2 / n * pairwise_sum(distx, sub.n) / varx
    loglik = loglik - 1 / 2 * np_log64(2 * jnp.pi * varx)
    return loglik


def likelihood(
    t, u, s, sub: Subset, pars, std_u, std_s, ratio, n_obs: int | Array, fl: Flags = NO_FLAGS
) -> Array:
    """``get_likelihood``: ``exp(get_loglikelihood(weighted="upper"))``."""
    return np_exp64(loglikelihood(t, u, s, sub, pars, std_u, std_s, ratio, n_obs, fl))


def variance(t, u, s, sub: Subset, pars, std_u, std_s, ratio, fl: Flags = NO_FLAGS) -> Array:
    """``get_variance(weighted="upper")``: ``mean(distx) - mean(sign(sdiff) sqrt(distx))**2``
    with ``distx`` *without* the regularisation term (utils ~1177)."""
    alpha, beta, gamma, scaling, t_ = pars
    tw, uw, sw = _gathered(sub, t, u, s)
    udiff, sdiff, _ = dists(tw, uw, sw, alpha, beta, gamma, scaling, t_, std_u, std_s, ratio, fl)
    distx = fb(udiff**2) + fb(sdiff**2)
    valid = jnp.arange(distx.shape[0]) < sub.n
    signed = jnp.where(valid, jnp.sign(sdiff) * jnp.sqrt(distx), 0)
    return _masked_mean(distx, sub.n) - fb(_masked_mean(signed, sub.n) ** 2)
