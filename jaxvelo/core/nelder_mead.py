"""Step-for-step JAX port of scipy's Nelder–Mead simplex minimiser.

This module reproduces ``scipy.optimize.minimize(fun, x0, method="Nelder-Mead")``
of **scipy 1.17.1** (``scipy/optimize/_optimize.py``, ``_minimize_neldermead``,
non-adaptive, no bounds, no ``initial_simplex``) bit for bit, as a pure,
``jit``-able and ``vmap``-able state machine. Line numbers below ("l. 866")
refer to that file.

Design
------
``NMState`` is a small pytree; :func:`nm_init` builds the initial simplex,
:func:`nm_step` performs **exactly one** (guarded) objective evaluation and the
bookkeeping scipy does around it, and :func:`nelder_mead` drives the steps with
``jax.lax.while_loop``. One evaluation per step means ``fun`` is traced once,
and under ``jax.vmap`` every batch member advances in lock-step through its own
scipy control flow (finished members are frozen, so their ``nit``/``nfev`` stay
scipy's). The initial ``N + 1`` evaluations of scipy's
``for k in range(N + 1): fsim[k] = func(sim[k])`` (l. 849-851) are the first
``N + 1`` steps.

Faithfulness notes (each checked against scipy 1.17.1 and numpy 2.4 here)
-------------------------------------------------------------------------
* **dtypes.** ``x0`` keeps its floating dtype (l. 758-760; integers become
  float64); the simplex and all vertex arithmetic stay in that dtype with the
  coefficients acting as weak Python scalars (NEP 50). ``fsim`` is float64
  (``np.full(..., np.inf, dtype=float)``, l. 845); function values are stored
  into it. The convergence test compares a float32 ``max|sim[1:] - sim[0]|``
  with ``xatol`` *in float32* (NEP 50), which weak typing reproduces. This module
  therefore needs 64-bit JAX (``jax.enable_x64``); it raises otherwise. float32
  and float64 ``x0`` are reproduced exactly; float16/bfloat16 are accepted but
  not bit-exact (XLA may keep excess precision between fused ops).
* **maxfev guard.** scipy wraps ``fun`` in
  ``_wrap_scalar_function_maxfun_validation`` (l. 548-566): a call made when
  ``ncalls >= maxfun`` raises ``_MaxFuncCallError`` *before* evaluating and
  without counting. The exception is swallowed (init: l. 852; iteration:
  l. 929), so an iteration cut short keeps every partial update made before the
  refused call (in a shrink, ``sim[j]`` is already overwritten but ``fsim[j]``
  is stale, l. 922-927), does **not** increment ``iterations``, is still sorted
  (l. 931-933) and still reported to the callback (l. 936-938); the ``while``
  condition then ends the loop and ``status`` is 1. :func:`nm_step` emulates
  exactly this.
* **Loop.** ``iterations = 1`` after the initial evaluations (l. 864); the loop
  runs ``while fcalls < maxfun and iterations < maxiter`` (l. 866); the
  convergence test comes first in the body (l. 868-870) and breaks *without*
  sorting or calling back; ``iterations += 1`` only after a complete
  reflection/expansion/contraction/shrink (l. 928); ``nit`` is ``iterations``
  (so ``maxiter`` 0, 1 or 2 give ``nit`` 1, 1, 2). ``maxiter``/``maxfev``
  defaults follow l. 815-829.
* **Callback.** scipy calls the callback once per pass through the loop body
  that did not break on convergence — including a pass cut short by the maxfev
  guard — after sorting, with ``np.copy(sim[0])`` (l. 936-938 and
  ``_wrap_callback``). :func:`nm_step` does the same (StopIteration-style halting
  is not supported).
* **Sorting.** ``np.argsort(fsim)`` (l. 931) uses numpy's default
  (``quicksort``) kind, which for float64 on this x86-64 machine (AVX-512, numpy
  2.4.6) dispatches to x86-simd-sort's ``avx512_argsort``: if the array has a NaN
  it falls back to ``std::sort`` with NaNs last, which for ``n <= 16`` is
  libstdc++'s insertion sort, i.e. **stable**; otherwise arrays of ``n <= 8``
  are sorted by the 8-lane bitonic key/index network ``sort_zmm_64bit`` (padded
  with +inf), whose compare-exchange swaps only on strict ``<``. That network is
  **not stable** (e.g. ``np.argsort([1., 1., 0., 0.]) == [3, 2, 1, 0]``); for
  lengths 2..3 it coincides with a stable sort, for 4 and 5 it differs in 5 of 75
  and 86 of 541 tie patterns. :func:`numpy_argsort` reproduces both paths
  exactly (verified against ``np.argsort`` on every weak ordering of length
  1..7 with finite, ±0, ±inf and NaN values). Hosts whose numpy does not take the
  AVX-512 path (e.g. AVX2-only CPUs) may order ties differently.
* **Final value.** ``fval = np.min(fsim)`` (l. 941): for ``len <= 8`` numpy
  folds left with ``acc = acc if (acc < x or isnan(acc)) else x`` (NaN
  propagates; among equal values the *last* wins, which matters only for
  ``±0``). Reproduced by :func:`_numpy_min`.
* **Rounding.** numpy evaluates ``xbar = np.add.reduce(sim[:-1], 0) / N``
  (l. 872) as ``((0.0 + sim[0]) + sim[1]) + ...`` followed by a correctly
  rounded division. XLA rewrites ``x / N`` into ``x * (1 / N)`` and contracts
  ``a * b - c`` into FMAs, so the vertex formulas are written in forms whose
  results do not depend on either rewrite: products are exact (powers of two,
  or ``3 * x`` spelled ``2 * x + x``), and the division by ``N`` is corrected
  to the correctly rounded quotient with an exact residual
  (:func:`_div_small_int`). Only subnormal coordinates could still differ
  (``0.5 * x`` is inexact there, and XLA's CPU backend flushes subnormals).
* **Size.** ``N <= 7`` (the argsort emulation covers ``len(fsim) <= 8``, numpy's
  single-register network).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .numerics import round32 as _r32

__all__ = [
    "NMOptions",
    "NMResult",
    "NMState",
    "nelder_mead",
    "nm_converged",
    "nm_init",
    "nm_options",
    "nm_result",
    "nm_step",
    "numpy_argsort",
]

# Non-adaptive coefficients, ``_minimize_neldermead`` l. 768-772.
_RHO = 1
_CHI = 2
_PSI = 0.5
_SIGMA = 0.5
# Initial-simplex offsets, l. 774-775.
_NONZDELT = 0.05
_ZDELT = 0.00025

# Phases of the step state machine: which point the *next* evaluation is for.
INIT, REFLECT, EXPAND, OUTSIDE, INSIDE, SHRINK = range(6)

_INT_INF = 2**31 - 1  # counters are int32; limits this large behave as "no limit"

# x86-simd-sort ``sort_zmm_64bit`` (key/index variant used by ``argsort_n``):
# six stages of compare-exchanges on 8 lanes, lower lane receives the minimum.
# Lane permutations: shuffle<1,1,1,1> (i^1), NETWORK_64BIT_1 (3-i within halves),
# NETWORK_64BIT_2 (7-i), NETWORK_64BIT_3 (i^2); masks 0xAA, 0xCC, 0xAA, 0xF0, 0xCC, 0xAA.
_XSS_SORT_ZMM_64BIT = (
    ((0, 1), (2, 3), (4, 5), (6, 7)),
    ((0, 3), (1, 2), (4, 7), (5, 6)),
    ((0, 1), (2, 3), (4, 5), (6, 7)),
    ((0, 7), (1, 6), (2, 5), (3, 4)),
    ((0, 2), (1, 3), (4, 6), (5, 7)),
    ((0, 1), (2, 3), (4, 5), (6, 7)),
)
_MAX_SORT_LEN = 8


class NMOptions(NamedTuple):
    """Static (hashable) options of one Nelder–Mead run.

    Attributes
    ----------
    n : int
        Number of variables ``N``.
    maxiter : float
        Iteration limit (an ``int``, or ``math.inf`` for none).
    maxfev : float
        Function-evaluation limit (an ``int``, or ``math.inf`` for none).
    xatol, fatol : float
        Absolute tolerances of the convergence test.
    """

    n: int
    maxiter: float
    maxfev: float
    xatol: float
    fatol: float


class NMState(NamedTuple):
    """Carry of the Nelder–Mead state machine (a pytree).

    Attributes
    ----------
    sim : Array, shape (N + 1, N)
        Simplex vertices, in ``x0``'s dtype.
    fsim : Array, shape (N + 1,)
        Function values, float64 (``inf`` where not yet evaluated).
    fxr : Array, shape ()
        Value at the reflection point of the current iteration (float64).
    iterations : Array, shape (), int32
        scipy's ``iterations`` counter (1 after the initial evaluations).
    fcalls : Array, shape (), int32
        Number of evaluations performed (scipy's ``fcalls[0]``).
    phase : Array, shape (), int32
        Which point the next step evaluates (``INIT`` ... ``SHRINK``).
    k : Array, shape (), int32
        Vertex index for the ``INIT`` and ``SHRINK`` phases.
    done : Array, shape (), bool
        True once scipy's loop has ended; :func:`nm_step` is then the identity.
    cb_state : Any
        User pytree threaded through the callback.
    round32 : Array, shape (), bool
        Emulate a float32 ``x0`` on a float64 simplex: every vertex operation is
        rounded to float32 (see :func:`_r32`). Lets genes of one batch take
        different dtype paths, as upstream's do (docs/upstream_precision.md).
    """

    sim: jax.Array
    fsim: jax.Array
    fxr: jax.Array
    iterations: jax.Array
    fcalls: jax.Array
    phase: jax.Array
    k: jax.Array
    done: jax.Array
    cb_state: Any
    round32: jax.Array


class NMResult(NamedTuple):
    """Result, with the fields of scipy's ``OptimizeResult`` (l. 962-964).

    Attributes
    ----------
    x : Array, shape (N,)
        ``sim[0]``, in ``x0``'s dtype.
    fun : Array, shape ()
        ``np.min(fsim)`` (float64).
    nit : Array, shape (), int32
        ``iterations``.
    nfev : Array, shape (), int32
        Number of function evaluations.
    status : Array, shape (), int32
        0 converged, 1 maximum number of evaluations, 2 maximum number of
        iterations (l. 944-955).
    sim, fsim : Array
        ``final_simplex``.
    """

    x: jax.Array
    fun: jax.Array
    nit: jax.Array
    nfev: jax.Array
    status: jax.Array
    sim: jax.Array
    fsim: jax.Array

    @property
    def success(self) -> jax.Array:
        """``status == 0``."""
        return self.status == 0


# --------------------------------------------------------------------------- #
# options
# --------------------------------------------------------------------------- #
def _as_limit(v: float) -> float:
    if v is None or v == math.inf or v >= _INT_INF:
        return math.inf
    return int(v)


def nm_options(
    n: int,
    maxiter: float | None = None,
    maxfev: float | None = None,
    xatol: float = 1e-4,
    fatol: float = 1e-4,
) -> NMOptions:
    """Resolve scipy's ``maxiter``/``maxfev`` defaults.

    Parameters
    ----------
    n : int
        Number of variables.
    maxiter, maxfev : int, math.inf or None
        As in ``options=`` of ``minimize(method="Nelder-Mead")``. If both are
        None both default to ``200 * n``; if one is None it becomes unlimited
        unless the other is unlimited, in which case it defaults to ``200 * n``
        (``_minimize_neldermead`` l. 815-829).
    xatol, fatol : float
        Convergence tolerances (``minimize(tol=t)`` sets both to ``t``,
        ``scipy/optimize/_minimize.py`` l. 670-674).

    Returns
    -------
    NMOptions
    """
    n = int(n)
    if maxiter is None and maxfev is None:
        maxiter = maxfev = n * 200
    elif maxiter is None:
        maxiter = n * 200 if maxfev == np.inf else math.inf
    elif maxfev is None:
        maxfev = n * 200 if maxiter == np.inf else math.inf
    return NMOptions(n, _as_limit(maxiter), _as_limit(maxfev), float(xatol), float(fatol))


def _require_x64() -> None:
    if jax.dtypes.canonicalize_dtype(jnp.float64) != np.dtype(np.float64):
        raise RuntimeError(
            "jaxvelo.core.nelder_mead needs 64-bit JAX (scipy keeps fsim in float64): "
            "run inside `with jax.enable_x64(True):` or set jax_enable_x64."
        )


# --------------------------------------------------------------------------- #
# numpy-faithful primitives
# --------------------------------------------------------------------------- #
def numpy_argsort(f: jax.Array) -> jax.Array:
    """``np.argsort(f)`` for a float64 vector of length 1..8, ties included.

    Reproduces numpy 2.4's default-kind argsort on AVX-512 x86-64 (x86-simd-sort
    ``avx512_argsort``): with a NaN present, a stable sort with NaNs last
    (``std_argsort_withnan`` → libstdc++ insertion sort for ``n <= 16``);
    otherwise the ``sort_zmm_64bit`` bitonic network on (key, index) pairs,
    swapping only when the upper lane's key is strictly smaller.

    Parameters
    ----------
    f : Array, shape (n,)
        Values to sort (``n`` static, at most 8).

    Returns
    -------
    Array, shape (n,), int32
        The permutation ``np.argsort(f)`` returns.
    """
    n = f.shape[0]
    if n > _MAX_SORT_LEN:
        raise NotImplementedError(
            f"numpy_argsort emulates np.argsort for n <= {_MAX_SORT_LEN} (N <= 7), got {n}"
        )
    # One pass of the network's compare-exchanges on (key, index) scalars. With a
    # NaN present the comparator is the strict total order (isnan, value, index),
    # for which any sorting network yields the stable order; lanes >= n would be
    # maximal padding that never moves, so their comparators are dropped.
    keys = [f[i] for i in range(n)]
    nans = [jnp.isnan(v) for v in keys]
    idx = [jnp.asarray(i, jnp.int32) for i in range(n)]
    anynan = functools.reduce(jnp.logical_or, nans)
    for stage in _XSS_SORT_ZMM_64BIT:
        for lo, hi in stage:
            if hi >= n:
                continue
            kl, kh, nl, nh, il, ih = keys[lo], keys[hi], nans[lo], nans[hi], idx[lo], idx[hi]
            lex = jnp.where(
                nh != nl, nl, jnp.where(nh, ih < il, (kh < kl) | ((kh == kl) & (ih < il)))
            )
            swap = jnp.where(anynan, lex, kh < kl)
            keys[lo], keys[hi] = jnp.where(swap, kh, kl), jnp.where(swap, kl, kh)
            nans[lo], nans[hi] = jnp.where(swap, nh, nl), jnp.where(swap, nl, nh)
            idx[lo], idx[hi] = jnp.where(swap, ih, il), jnp.where(swap, il, ih)
    # The permutation leaves as one packed int32 (3 bits per position), unpacked by shifts:
    # stacked directly, XLA:CPU fuses the network into the concatenation and the fused loop
    # cost ~70 us per 64-gene step at n = 5 (one-core trace, 100 cells; ~3 such sites per
    # step); the packed form, fused the same way, ~17 us. (An optimization_barrier on the
    # code does not change this: XLA:CPU removes barriers before fusion.)
    code = functools.reduce(
        jnp.bitwise_or, [jnp.left_shift(v, jnp.int32(3 * k)) for k, v in enumerate(idx)]
    )
    return jnp.stack([(code >> jnp.int32(3 * k)) & jnp.int32(7) for k in range(n)])


def _numpy_min(f: jax.Array) -> jax.Array:
    """``np.min(f)`` for ``len(f) <= 8``: left fold keeping the last of equal values."""
    acc = f[0]
    for i in range(1, f.shape[0]):
        x = f[i]
        acc = jnp.where((acc < x) | jnp.isnan(acc), acc, x)
    return acc


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Knuth's branch-free TwoSum: ``s + e == a + b`` exactly."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e


def _div_small_int(s: jax.Array, n: int) -> jax.Array:
    """Correctly rounded ``s / n`` for ``n`` in 1..8 (float32 or float64 ``s``).

    XLA rewrites division by a broadcast scalar into multiplication by the
    reciprocal, which is one ulp off for about a third of the inputs when ``n``
    is not a power of two. With ``n = 2**a * m`` (``m`` odd), the approximate
    quotient ``q0`` is corrected once with its exact residual: ``m * q0 = p + e``
    exactly (TwoSum of ``2**j * q0`` and ``±q0``, all exact), ``s - p * 2**a`` is
    exact (Sterbenz) and so is the final ``- e * 2**a``. The true quotient is
    ``q0 + r / n``; since it cannot lie within ``ulp / (2 n)`` of a rounding
    midpoint, ``q0 + r / n`` rounds to ``RN(s / n)`` whatever the (tiny) error
    of ``r / n``. The work is done in float64 (narrower dtypes are rounded once
    more at the end, which is innocuous for division since ``53 >= 2 * 24 + 2``)
    with ``s`` rescaled by a power of two when huge or tiny, so that nothing
    overflows or goes subnormal (XLA's CPU backend flushes subnormals). Subnormal
    quotients may still differ from numpy.
    """
    a = (n & -n).bit_length() - 1
    m = n >> a
    if m == 1:
        return s / n  # x / 2**a == x * 2**-a exactly
    if m not in (3, 5, 7):
        raise NotImplementedError(f"exact division by {n} not implemented")
    t = s.astype(jnp.float64)
    mag = jnp.abs(t)
    small = mag < 2.0**-900
    big = mag > 2.0**1000
    t = jnp.where(small, t * 2.0**200, jnp.where(big, t * 2.0**-8, t))
    q0 = t / n
    if m == 3:
        p, e = _two_sum(q0 * 2, q0)
    elif m == 5:
        p, e = _two_sum(q0 * 4, q0)
    else:
        p, e = _two_sum(q0 * 8, -q0)
    if a:
        p, e = p * float(2**a), e * float(2**a)
    q = jnp.where(jnp.isfinite(t) & (t != 0), q0 + ((t - p) - e) / n, q0)  # keeps -0.0
    q = jnp.where(small, q * 2.0**-200, jnp.where(big, q * 2.0**8, q))
    return q.astype(s.dtype)


def _centroid(head: jax.Array, round32: jax.Array | bool = False) -> jax.Array:
    """``np.add.reduce(sim[:-1], 0) / N`` (l. 872), bit for bit.

    numpy's axis-0 reduction starts from the identity ``0.0`` and adds the rows
    in order (so an all ``-0.0`` column sums to ``+0.0``).
    """
    n = head.shape[0]
    acc = jnp.where(head[0] == 0, jnp.zeros_like(head[0]), head[0])  # 0.0 + row 0
    for i in range(1, n):
        acc = _r32(acc + head[i], round32)
    return _r32(_div_small_int(acc, n), round32)


# --------------------------------------------------------------------------- #
# state machine
# --------------------------------------------------------------------------- #
def _prepare_x0(x0: Any) -> jax.Array:
    x0 = jnp.ravel(jnp.atleast_1d(jnp.asarray(x0)))
    if jnp.issubdtype(x0.dtype, jnp.complexfloating):
        raise TypeError("complex x0 is not supported")
    if not jnp.issubdtype(x0.dtype, jnp.floating):
        x0 = x0.astype(jnp.float64)  # l. 759: non-inexact -> float64
    return x0


def nm_init(
    fun: Callable[..., Any] | None, x0: Any, cb_state: Any = None, round32: Any = False
) -> NMState:
    """Build scipy's initial simplex (l. 791-801); no evaluation happens here.

    Parameters
    ----------
    fun : callable or None
        Unused; accepted for symmetry with :func:`nm_step` (optimistix style).
    x0 : array_like, shape (N,) or scalar
        Starting point. Its floating dtype is kept; integers become float64.
    cb_state : pytree, optional
        Initial callback state.

    Returns
    -------
    NMState
        Phase ``INIT``: the first ``N + 1`` calls of :func:`nm_step` evaluate
        ``sim[0] ... sim[N]`` (l. 849-851).

    Notes
    -----
    ``sim[0] = x0`` and ``sim[k + 1] = x0`` with coordinate ``k`` replaced by
    ``(1 + 0.05) * x0[k]`` if ``x0[k] != 0`` else ``0.00025`` (so ``-0.0``
    counts as zero), computed in ``x0``'s dtype.
    """
    del fun
    _require_x64()
    x0 = _prepare_x0(x0)
    n = x0.shape[0]
    if n > _MAX_SORT_LEN - 1:
        raise NotImplementedError(f"N <= {_MAX_SORT_LEN - 1} variables supported, got {n}")
    round32 = jnp.asarray(round32, bool)
    diag = jnp.where(x0 != 0, (1 + _NONZDELT) * x0, jnp.asarray(_ZDELT, x0.dtype))
    if x0.dtype == jnp.float64:
        # float32 x0: the weak Python coefficients become float32 first (NEP 50)
        f32 = jnp.float32
        diag32 = jnp.where(
            x0 != 0,
            _r32(jnp.asarray(f32(1 + _NONZDELT), x0.dtype) * x0, True),
            jnp.asarray(f32(_ZDELT), x0.dtype),
        )
        diag = jnp.where(round32, diag32, diag)
    rows = jnp.arange(n)
    sim = jnp.tile(x0, (n + 1, 1)).at[rows + 1, rows].set(diag)
    i32 = jnp.int32
    return NMState(
        sim=sim,
        fsim=jnp.full((n + 1,), jnp.inf, dtype=jnp.float64),  # l. 845
        fxr=jnp.asarray(jnp.inf, jnp.float64),
        iterations=jnp.asarray(1, i32),  # l. 864 (read only after the init phase)
        fcalls=jnp.asarray(0, i32),
        phase=jnp.asarray(INIT, i32),
        k=jnp.asarray(0, i32),
        done=jnp.asarray(False),
        cb_state=cb_state,
        round32=round32,
    )


def _converged(
    sim: jax.Array, fsim: jax.Array, xatol: float, fatol: float, round32: Any = False
) -> jax.Array:
    # l. 868-870; ``max(...) <= tol`` == ``all(... <= tol)`` including NaN (False).
    # ``xatol`` is a weak Python float: compared in sim's dtype, like NEP 50 (or a float64
    # array, per gene, for a float64 simplex: the same comparison).
    dx = jnp.abs(sim[1:] - sim[0])
    xok = jnp.all(dx <= xatol)
    if sim.dtype == jnp.float64:
        if isinstance(xatol, float | int):
            x32 = float(np.float32(xatol))
        else:  # numpy's float32 rounding of the tolerance, as a float64 value
            x32 = jnp.asarray(xatol, jnp.float64).astype(jnp.float32).astype(jnp.float64)
        xok32 = jnp.all(_r32(dx, True) <= x32)
        xok = jnp.where(round32, xok32, xok)
    fok = jnp.all(jnp.abs(fsim[0] - fsim[1:]) <= fatol)
    return xok & fok


def nm_converged(state: NMState, xatol: float, fatol: float) -> jax.Array:
    """scipy's convergence test on the current (sorted) simplex (l. 868-870).

    Parameters
    ----------
    state : NMState
    xatol, fatol : float

    Returns
    -------
    Array, shape (), bool
        ``max|sim[1:] - sim[0]| <= xatol and max|fsim[0] - fsim[1:]| <= fatol``.
    """
    return _converged(state.sim, state.fsim, float(xatol), float(fatol), state.round32)


def _eval(
    fun: Callable[..., Any], x: jax.Array, cb_state: Any, fun_uses_cb_state: bool
) -> jax.Array:
    val = fun(x, cb_state) if fun_uses_cb_state else fun(x)
    # scipy stores the (scalar) value into the float64 ``fsim``; float32 -> float64 is exact.
    return jnp.reshape(jnp.asarray(val), ()).astype(jnp.float64)


class _Points(NamedTuple):
    """The candidate points of one pass (l. 872-925) and the point to evaluate now."""

    point: jax.Array
    xr: jax.Array
    xe: jax.Array
    xc: jax.Array
    xcc: jax.Array
    xs: jax.Array


def nm_propose(st: NMState) -> _Points:
    """The point the next (guarded) evaluation of :func:`nm_step` is made at.

    With :func:`nm_consume` this splits :func:`nm_step` around its one evaluation, so that
    a driver can evaluate the objective elsewhere (e.g. one evaluation site shared by
    several minimisations)."""
    sim = st.sim
    n = sim.shape[1]
    phase, k = st.phase, st.k
    # Candidate points, l. 872-925 (rho=1, chi=2, psi=0.5, sigma=0.5), written so
    # that XLA's FMA contraction cannot change their rounding.
    r = st.round32
    xbar = _centroid(sim[:-1], r)
    worst = sim[-1]
    xr = _r32(xbar * 2 - worst, r)  # (1 + rho) * xbar - rho * sim[-1]
    # (1 + rho * chi) * xbar - rho * chi * sim[-1]; 3 * xbar is rounded on its own in float32
    xe = _r32(_r32(xbar * 2 + xbar, r) - worst * 2, r)
    # (1 + psi * rho) * xbar - psi * rho * sim[-1]
    xc = _r32(_r32(xbar + xbar * 0.5, r) - worst * 0.5, r)
    xcc = _r32(xbar * 0.5 + worst * 0.5, r)  # (1 - psi) * xbar + psi * sim[-1]
    ki = jnp.clip(k, 0, n)
    kj = jnp.clip(k, 1, n)
    # sim[0] + sigma * (sim[j] - sim[0])
    xs = _r32(sim[0] + _r32(sim[kj] - sim[0], r) * _SIGMA, r)
    point = jnp.stack([sim[ki], xr, xe, xc, xcc, xs])[jnp.clip(phase, 0, 5)]
    return _Points(point, xr, xe, xc, xcc, xs)


def nm_consume(
    st: NMState, pts: _Points, fval: jax.Array, opts: NMOptions
) -> tuple[NMState, jax.Array]:
    """scipy's bookkeeping after the evaluation ``fval = fun(pts.point)``; returns the new
    state and whether a pass through scipy's loop body ended (where scipy calls the
    callback, with the new ``sim[0]``). ``st.cb_state`` is passed through."""
    sim, fsim = st.sim, st.fsim
    n = sim.shape[1]
    phase, k = st.phase, st.k
    i32 = jnp.int32
    xr, xe, xc, xcc, xs = pts.xr, pts.xe, pts.xc, pts.xcc, pts.xs
    kj = jnp.clip(k, 1, n)
    ki = jnp.clip(k, 0, n)
    fval = jnp.reshape(jnp.asarray(fval), ()).astype(jnp.float64)
    # maxfev guard (l. 548-566): refuse (and do not count) a call once fcalls >= maxfun.
    if opts.maxfev == math.inf:
        ok = jnp.asarray(True)
    else:
        ok = st.fcalls < opts.maxfev
    raised = ~ok
    fcalls = st.fcalls + ok.astype(i32)

    ph_i = phase == INIT
    ph_r = phase == REFLECT
    ph_e = phase == EXPAND
    ph_o = phase == OUTSIDE
    ph_in = phase == INSIDE
    ph_s = phase == SHRINK

    # reflection outcome (l. 876-919)
    c_exp = fval < fsim[0]
    c_acc_r = ~c_exp & (fval < fsim[-2])
    c_out = ~c_exp & ~c_acc_r & (fval < fsim[-1])
    acc_e = fval < st.fxr  # l. 885
    acc_o = fval <= st.fxr  # l. 902
    acc_in = fval < fsim[-1]  # l. 914

    # replace the worst vertex
    rep = ok & ((ph_r & c_acc_r) | ph_e | (ph_o & acc_o) | (ph_in & acc_in))
    last_x = jnp.where(
        ph_r, xr, jnp.where(ph_e, jnp.where(acc_e, xe, xr), jnp.where(ph_o, xc, xcc))
    )
    last_f = jnp.where(ph_e & ~acc_e, st.fxr, fval)
    sim1 = jnp.where(rep, sim.at[-1].set(last_x), sim)
    fsim1 = jnp.where(rep, fsim.at[-1].set(last_f), fsim)
    # initial evaluations
    fsim1 = jnp.where(ph_i & ok, fsim1.at[ki].set(fval), fsim1)
    # shrink: sim[j] is overwritten before func(sim[j]) is attempted (l. 922-927)
    sim1 = jnp.where(ph_s, sim1.at[kj].set(xs), sim1)
    fsim1 = jnp.where(ph_s & ok, fsim1.at[kj].set(fval), fsim1)

    start_shrink = ok & ((ph_o & ~acc_o) | (ph_in & ~acc_in))
    complete = ok & (
        (ph_r & c_acc_r) | ph_e | (ph_o & acc_o) | (ph_in & acc_in) | (ph_s & (k >= n))
    )
    end_iter = ~ph_i & (complete | raised)
    end_init = ph_i & (raised | (k >= n))
    ending = end_iter | end_init
    iterations = st.iterations + complete.astype(i32)  # l. 928

    next_phase = jnp.where(
        ph_i,
        INIT,
        jnp.where(
            ph_r,
            jnp.where(c_exp, EXPAND, jnp.where(c_out, OUTSIDE, INSIDE)),
            jnp.where(start_shrink | ph_s, SHRINK, phase),
        ),
    ).astype(i32)
    next_k = jnp.where(ph_i | ph_s, k + 1, jnp.where(start_shrink, 1, k)).astype(i32)
    fxr = jnp.where(ph_r, fval, st.fxr)

    # sort (l. 853-862 after init, l. 931-933 after each pass)
    perm = numpy_argsort(fsim1)
    sim2 = jnp.where(ending, sim1[perm], sim1)
    fsim2 = jnp.where(ending, fsim1[perm], fsim1)

    # loop condition (l. 866) then the convergence test (l. 868-870)
    cont = jnp.asarray(True)
    if opts.maxfev != math.inf:
        cont = cont & (fcalls < opts.maxfev)
    if opts.maxiter != math.inf:
        cont = cont & (iterations < opts.maxiter)
    stop = ~cont | _converged(sim2, fsim2, opts.xatol, opts.fatol, st.round32)

    new = NMState(
        sim=sim2,
        fsim=fsim2,
        fxr=fxr,
        iterations=iterations,
        fcalls=fcalls,
        phase=jnp.where(ending, REFLECT, next_phase).astype(i32),
        k=jnp.where(ending, 0, next_k).astype(i32),
        done=ending & stop,
        cb_state=st.cb_state,
        round32=st.round32,
    )
    return new, end_iter


def _active_step(
    fun: Callable[..., Any],
    st: NMState,
    opts: NMOptions,
    callback: Callable[[jax.Array, Any], Any] | None,
    fun_uses_cb_state: bool,
) -> NMState:
    pts = nm_propose(st)
    fval = _eval(fun, pts.point, st.cb_state, fun_uses_cb_state)
    new, end_iter = nm_consume(st, pts, fval, opts)
    # callback with sim[0] after each pass that did not break (l. 936-938)
    if callback is not None:
        cb_state = lax.cond(end_iter, lambda c: callback(new.sim[0], c), lambda c: c,
                            new.cb_state)  # fmt: skip
        new = new._replace(cb_state=cb_state)
    return new


def nm_step(
    fun: Callable[..., Any],
    state: NMState,
    options: NMOptions,
    callback: Callable[[jax.Array, Any], Any] | None = None,
    *,
    fun_uses_cb_state: bool = False,
) -> NMState:
    """Advance scipy's Nelder–Mead by exactly one (guarded) function evaluation.

    Parameters
    ----------
    fun : callable
        ``fun(x) -> scalar`` (or ``fun(x, cb_state)`` if ``fun_uses_cb_state``),
        traceable by JAX; ``x`` has ``x0``'s dtype.
    state : NMState
        Current state; returned unchanged when ``state.done``.
    options : NMOptions
        From :func:`nm_options`.
    callback : callable, optional
        ``callback(x_best, cb_state) -> cb_state``, called (like scipy's
        ``callback``) after each pass through the loop body, with the sorted
        ``sim[0]``.
    fun_uses_cb_state : bool
        Pass ``state.cb_state`` to ``fun`` (for objectives that read state the
        callback updates, as scVelo's ``update`` callback does).

    Returns
    -------
    NMState

    Notes
    -----
    Per phase: ``INIT`` evaluates ``sim[k]``; ``REFLECT`` evaluates ``xr`` and
    either accepts it (iteration complete) or moves to ``EXPAND`` / ``OUTSIDE``
    / ``INSIDE``, which evaluate ``xe`` / ``xc`` / ``xcc`` and either accept or
    start ``SHRINK``, which evaluates the ``N`` shrunk vertices one per step.
    Under ``jax.vmap`` the inactive branch is masked, so finished members keep
    their state (and their ``nit``/``nfev``).
    """
    return lax.cond(
        state.done,
        lambda s: s,
        lambda s: _active_step(fun, s, options, callback, fun_uses_cb_state),
        state,
    )


def nm_result(state: NMState, options: NMOptions) -> NMResult:
    """Assemble scipy's result fields from a finished state (l. 940-964).

    Parameters
    ----------
    state : NMState
    options : NMOptions

    Returns
    -------
    NMResult
    """
    i32 = jnp.int32
    if options.maxfev == math.inf:
        hit_fev = jnp.asarray(False)
    else:
        hit_fev = state.fcalls >= options.maxfev
    if options.maxiter == math.inf:
        hit_it = jnp.asarray(False)
    else:
        hit_it = state.iterations >= options.maxiter
    status = jnp.where(hit_fev, 1, jnp.where(hit_it, 2, 0)).astype(i32)
    return NMResult(
        x=state.sim[0],
        fun=_numpy_min(state.fsim),
        nit=state.iterations,
        nfev=state.fcalls,
        status=status,
        sim=state.sim,
        fsim=state.fsim,
    )


def nelder_mead(
    fun: Callable[..., Any],
    x0: Any,
    *,
    maxiter: float | None = None,
    maxfev: float | None = None,
    xatol: float = 1e-4,
    fatol: float = 1e-4,
    callback: Callable[[jax.Array, Any], Any] | None = None,
    cb_state: Any = None,
    fun_uses_cb_state: bool = False,
    round32: Any = False,
) -> tuple[NMResult, Any]:
    """``scipy.optimize.minimize(fun, x0, method="Nelder-Mead", ...)``, bit for bit.

    Parameters
    ----------
    fun : callable
        ``fun(x) -> scalar`` JAX function (``fun(x, cb_state)`` if
        ``fun_uses_cb_state``).
    x0 : array_like, shape (N,) or scalar
        Starting point (N <= 7); its floating dtype is kept.
    maxiter, maxfev : int, optional
        Static limits, scipy defaults (see :func:`nm_options`).
    xatol, fatol : float
        Static tolerances; ``minimize(..., tol=t)`` corresponds to
        ``xatol=fatol=t``.
    callback : callable, optional
        ``callback(x_best, cb_state) -> cb_state``, called where scipy calls its
        ``callback(x)``.
    cb_state : pytree, optional
        Initial callback state.
    fun_uses_cb_state : bool
        Call ``fun(x, cb_state)``.
    round32 : bool or traced bool
        With a float64 ``x0``: behave exactly as scipy with ``x0.astype(float32)``
        (``x0`` must hold float32 values); traced per batch member.

    Returns
    -------
    result : NMResult
    cb_state : pytree
        Final callback state.

    Notes
    -----
    Works under ``jax.jit`` and ``jax.vmap`` (over ``x0`` and data closed over by
    ``fun`` through an outer vmapped function). Needs 64-bit JAX.
    """
    state = nm_init(fun, x0, cb_state, round32)
    opts = nm_options(state.sim.shape[1], maxiter, maxfev, xatol, fatol)
    state = lax.while_loop(
        lambda s: ~s.done,
        lambda s: nm_step(fun, s, opts, callback, fun_uses_cb_state=fun_uses_cb_state),
        state,
    )
    return nm_result(state, opts), state.cb_state
