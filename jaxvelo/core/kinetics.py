"""Closed-form splicing kinetics: the ODE solution, its inversion and time vectorization.

Every function is a line-for-line port of scVelo 0.3.4 and keeps upstream's order of
floating-point operations (so that float64 results agree to the last bit where XLA does not
contract or reassociate). Python scalar constants stay weakly typed, so float32 inputs stay
float32 exactly as NumPy 2 (NEP 50) keeps them in upstream.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import Array

from .npmath import np_exp32, np_exp64, np_log32, np_log64
from .numerics import divide, true_divide, where_lazy
from .numerics import fma_barrier as fb
from .numerics import round32 as _r32


def _exp(x: Array) -> Array:
    """``np.exp``: numpy's own (not correctly rounded) float32 kernel for float32 input,
    numpy's float64 one for float64 input (on CPU numpy's own loops, :mod:`.npmath`)."""
    x = jnp.asarray(x)
    return np_exp32(x) if x.dtype == jnp.float32 else np_exp64(x)


def _log(x: Array) -> Array:
    """``np.log``: numpy's own float32 kernel for float32 input, its float64 one (see
    :func:`_exp`) for float64 input."""
    x = jnp.asarray(x)
    return np_log32(x) if x.dtype == jnp.float32 else np_log64(x)


def invert(x: Array) -> Array:
    """``1 / x`` with ``x == 0`` mapped to NaN.

    Port of ``scvelo.core._arithmetic.invert``: ``1 / x * (x != 0)`` gives ``inf * 0 = nan``.
    """
    return jnp.where(x != 0, divide(1, x), jnp.nan).astype(jnp.result_type(x, 1.0))


def clipped_log(
    x: Array, lb: float = 0, ub: float = 1, eps: float = 1e-6, f32: Array | None = None
) -> Array:
    """``log(clip(x, lb + eps, ub - eps))`` (``scvelo.core._arithmetic.clipped_log``).

    ``f32`` (float64 ``x`` only): where set, ``x`` is a numpy float32 array upstream, so the
    Python-float bounds become float32 and numpy's float32 log applies (None or Python
    ``False``: nowhere).
    """
    y = _log(jnp.clip(x, lb + eps, ub - eps))
    if f32 is None or f32 is False or jnp.asarray(x).dtype != jnp.float64:
        return y
    lo, hi = float(np.float32(lb + eps)), float(np.float32(ub - eps))
    return where_lazy(f32, lambda v: np_log32(jnp.clip(v, lo, hi)), x, y)


def unspliced(tau: Array, u0: Array, alpha: Array, beta: Array) -> Array:
    """Unspliced abundance at ``tau`` (``_em_model_utils.unspliced``)."""
    expu = _exp(-beta * tau)
    return fb(u0 * expu) + fb(divide(alpha, beta) * (1 - expu))


def spliced(tau: Array, s0: Array, u0: Array, alpha: Array, beta: Array, gamma: Array) -> Array:
    """Spliced abundance at ``tau`` (``_em_model_utils.spliced``)."""
    c = (alpha - fb(u0 * beta)) * invert(gamma - beta)
    expu, exps = _exp(-beta * tau), _exp(-gamma * tau)
    return fb(s0 * exps) + fb(divide(alpha, gamma) * (1 - exps)) + fb(c * (exps - expu))


def solution(
    t: Array,
    alpha: Array,
    beta: Array,
    gamma: Array,
    u0: Array = 0,
    s0: Array = 0,
    f32: dict | None = None,
) -> tuple[Array, Array]:
    """``SplicingDynamics(alpha, beta, gamma, [u0, s0]).get_solution(t, stacked=False)``.

    Port of ``scvelo/core/_models.py`` ``get_solution``: note the order ``expu`` then ``exps``
    and ``c`` computed after ``unspliced`` (same values as :func:`spliced`).

    ``f32`` optionally marks scalar arguments that are numpy float32 upstream (keys
    ``alpha, beta, gamma, u0, s0``): the scalar-only sub-expressions (``alpha / beta``,
    ``alpha / gamma``, ``gamma - beta``, ``c``) are then rounded to float32 as NumPy 2
    computes them before they meet the float64 time array. Key ``t`` (per gene): the
    float64 ``t`` holds a numpy float32 array upstream (``np.linspace(0, t_)`` for a float32
    ``t_``, utils ~193), so each array operation whose operands are all float32
    (``-gamma * t``, its ``exp``, ``1 - exps``, ...) is float32 too (NEP 50) -- emulated by
    rounding the float64 result (round32). Unflagged, every rounding below is a no-op.
    """
    f = f32 or {}
    a, b, g = f.get("alpha", False), f.get("beta", False), f.get("gamma", False)
    fu0, fs0 = f.get("u0", False), f.get("s0", False)
    tt = f.get("t", False)
    bt, gt = _and(b, tt), _and(g, tt)
    # fb(): no fused multiply-add where numpy rounds the product (XLA contracts a*b + c)
    expu = _exp32_where(_r32(-beta * t, bt), bt)
    exps = _exp32_where(_r32(-gamma * t, gt), gt)
    u0e = _r32(fb(u0 * expu), _and(fu0, bt))
    ab = _r32(divide(alpha, beta), _and(a, b))
    u = _r32(u0e + fb(_r32(ab * _r32(1 - expu, bt), _and(a, bt))), _and(fu0, a, bt))
    gb = _and(g, b)
    inv = _r32(invert(_r32(gamma - beta, gb)), gb)
    u0b = _r32(u0 * beta, _and(fu0, b))
    c32 = _and(a, fu0, g, b)
    c = _r32(_r32(alpha - fb(u0b), _and(a, fu0, b)) * inv, c32)
    s0e = _r32(fb(s0 * exps), _and(fs0, gt))
    s1 = _r32(_r32(divide(alpha, gamma), _and(a, g)) * _r32(1 - exps, gt), _and(a, gt))
    s = _r32(s0e + fb(s1), _and(fs0, a, gt))
    s = _r32(s + fb(_r32(c * _r32(exps - expu, _and(gt, b)), _and(c32, gt, b))),
             _and(fs0, a, gt, c32, b))  # fmt: skip
    return u, s


def _and(*flags):
    """``flags[0] & flags[1] & ...``, staying Python ``False`` (a no-op flag: no rounding
    traced) when any flag is."""
    if any(f is False or f is None for f in flags):
        return False
    out = flags[0]
    for f in flags[1:]:
        out = out & f
    return out


def _exp32_where(x: Array, flag) -> Array:
    """``np.exp(x)``: where ``x`` (float64) holds a float32 array upstream (``flag``), numpy's
    float32 kernel; elsewhere the kernel of ``x``'s dtype (:func:`_exp`)."""
    return _exp(x) if flag is False else where_lazy(flag, np_exp32, x, np_exp64(x))


def tau_inv(
    u: Array,
    s: Array | None = None,
    u0: Array | None = None,
    s0: Array | None = None,
    alpha: Array | None = None,
    beta: Array | None = None,
    gamma: Array | None = None,
    f32: dict | None = None,
) -> Array:
    """Invert the ODE solution for the time ``tau`` (``_em_model_utils.tau_inv``).

    With scalar ``beta``/``gamma`` upstream evaluates exactly one branch: the ``u``-only
    inversion when ``gamma >= beta`` (or when ``s`` is None), else the ``(u, s)`` inversion.
    Here both branches' arguments are formed and the log is taken of the selected one.

    ``f32`` optionally marks scalar arguments that are numpy float32 upstream (keys
    ``alpha, beta, gamma, u0, s0``; Python ints count as float32-preserving): the
    scalar-only operations among them are then rounded to float32 as NumPy 2 computes
    them. The array operations are float64 whenever ``u`` is.
    """
    f = f32 or {}
    a, b, g = f.get("alpha", False), f.get("beta", False), f.get("gamma", False)
    fu0, fs0 = f.get("u0", False), f.get("s0", False)
    # the arrays u and s themselves are float32 upstream (float32 u / float32 scaling)
    u32, s32 = f.get("u32", False), f.get("s32", False)
    uinf = _r32(divide(alpha, beta), _and(a, b))
    q32 = _and(u32, a, b, fu0)  # every operand of (u - uinf) / (u0 - uinf) is float32
    num_u = _r32(u - uinf, _and(u32, a, b))
    q = _r32(true_divide(num_u, _r32(u0 - uinf, _and(fu0, a, b))), q32)
    if s is None or gamma is None:
        return _r32(_r32(divide(-1, beta), b) * clipped_log(q, f32=q32), _and(q32, b))
    gb, ag, abg = _and(g, b), _and(a, g), _and(a, b, g)
    beta_ = _r32(beta * _r32(invert(_r32(gamma - beta, gb)), gb), gb)
    prod = fb(_r32(beta_ * _r32(divide(alpha, beta), _and(a, b)), abg))
    xinf = _r32(_r32(divide(alpha, gamma), ag) - prod, abg)
    prod0 = fb(_r32(beta_ * u0, _and(gb, fu0)))
    den = _r32(_r32(s0 - prod0, _and(gb, fu0, fs0)) - xinf, _and(abg, fu0, fs0))
    n32 = _and(s32, u32, gb)
    num = _r32(_r32(s - fb(_r32(beta_ * u, _and(u32, gb))), n32) - xinf, _and(n32, abg))
    d32 = _and(n32, abg, fu0, fs0)
    q_us = _r32(true_divide(num, den), d32)
    # One log per cell: the branch is per gene, so log(where(c, q, q_us)) is the selected
    # branch's log bit for bit (both share clipped_log's bounds), at half the cost.
    use_u = gamma >= beta
    log32 = False if q32 is False and d32 is False else jnp.where(use_u, q32, d32)
    log = clipped_log(jnp.where(use_u, q, q_us), f32=log32)
    tau_u = _r32(_r32(divide(-1, beta), b) * log, _and(q32, b))
    tau_us = _r32(_r32(divide(-1, gamma), g) * log, _and(d32, g))
    return jnp.where(use_u, tau_u, tau_us)


def vectorize(
    t: Array, t_: Array, alpha: Array, beta: Array, gamma: Array
) -> tuple[Array, Array, Array, Array]:
    """Per-cell ``(tau, alpha, u0, s0)`` of the on/off phases (``_em_model_utils.vectorize``).

    Upstream ``o = (t < t_)`` as int; ``tau = t * o + (t - t_) * (1 - o)``; the off phase
    starts from the switching state ``(u0_, s0_)`` reached at ``t_``.
    """
    o = (t < t_).astype(jnp.int32)
    tau = t * o + (t - t_) * (1 - o)
    u0_ = unspliced(t_, 0, alpha, beta)
    s0_ = spliced(t_, 0, 0, alpha, beta, gamma)
    u0 = 0 * o + u0_ * (1 - o)
    s0 = 0 * o + s0_ * (1 - o)
    alpha_v = alpha * o + 0 * (1 - o)
    return tau, alpha_v, u0, s0


def linspace(start: Array, stop: Array, num: int | Array, size: int | None = None) -> Array:
    """``np.linspace(start, stop, num)`` with NumPy's arithmetic (numpy/_core/function_base.py).

    ``y = arange(num) * ((stop - start) / (num - 1)) + start`` and ``y[-1] = stop`` exactly;
    JAX's own linspace interpolates differently and differs in the last bits.

    ``size``: a static length for a traced ``num`` (at most ``size``): the first ``num``
    entries are ``np.linspace``'s, the rest ``+inf``.
    """
    start = jnp.asarray(start)
    stop = jnp.asarray(stop)
    if size is not None:
        dt = jnp.result_type(start, stop, 1.0)
        num = jnp.asarray(num, jnp.int32)
        step = true_divide(stop - start, num - 1)  # int32 -> dt exactly, as a Python int
        i = jnp.arange(size)
        y = (jnp.arange(size, dtype=dt) * step + start).astype(dt)
        y = jnp.where(i == num - 1, stop.astype(dt), y)
        return jnp.where(i < num, y, jnp.asarray(jnp.inf, dt))
    dt = jnp.result_type(start, stop, float(num))
    step = true_divide(stop - start, num - 1)  # XLA would multiply by 1 / (num - 1)
    y = jnp.arange(num, dtype=dt) * step + start
    return y.at[-1].set(stop).astype(dt)
