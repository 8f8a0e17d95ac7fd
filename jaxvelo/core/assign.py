"""Time assignment: inverse formula, projection argmin, ``adjust_increments`` and the
``assign_timepoints`` mode of ``compute_divergence`` (scvelo/tools/_em_model_utils.py).

All functions act on one gene; cells are a fixed axis and ragged subsets are masks.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from .kinetics import linspace, solution, tau_inv
from .numerics import (
    all_batched,
    cond_any,
    divide,
    fma_barrier,
    np_percentile_masked,
    true_divide,
)
from .numerics import fma_barrier as fb
from .numerics import round32 as r32

_UNROLL = 8  # loop bodies per while-loop iteration in the per-cell loops
_PROJ_CHUNK = 8  # genes per pass of the lazily run projection (see _switched)


class Neighbors(NamedTuple):
    """Row-normalised kNN connectivities as CSR.

    ``scvelo.preprocessing.neighbors.get_connectivities`` as CSR
    (:func:`jaxvelo.core.batch.neighbors_from_csr`): row ``i`` has entries ``val[k]`` at
    columns ``idx[k]`` for ``ptr[i] <= k < ptr[i + 1]``, in CSR storage order (scipy's
    summation order). ``idx``/``val`` may be longer than ``ptr[-1]`` (unused padding) and
    rows may be empty (padded cells): the shapes depend only on the padded cell count and
    the padded number of entries, so datasets of similar size share compiled programs.
    """

    ptr: Array  # (n_obs + 1,) int32
    idx: Array  # (nnz,) int32
    val: Array  # (nnz,) float32, as upstream casts the connectivities


@jax.jit  # traced once per shape (each program smooths at several sites)
def _smooth_cells_first(nbrs: Neighbors, x: Array) -> Array:
    """``connectivities.dot(x)`` for ``x`` of shape (n_obs, C), C contiguous columns.

    scipy's ``csr_matvecs`` accumulates ``y += a * x`` row by row in CSR order, starting
    from zero, in the upcast dtype of (float32 connectivities, x). Step ``k`` adds every
    row's ``k``-th entry (rows with fewer entries keep their sum), which keeps that
    summation order for every row; ``0 + a * x`` is ``a * x`` (the terms are never -0
    here: connectivities and squared distances are non-negative). Each step gathers
    whole rows of ``x`` (C = genes x rows under ``vmap``), which vectorises. The steps
    run to the largest degree, a value of the data (not of the program's shapes)."""
    dtype = jnp.result_type(nbrs.val, x)
    start = nbrs.ptr[:-1]
    deg = nbrs.ptr[1:] - start

    def body(k, acc):
        ok = k < deg
        e = jnp.where(ok, start + k, 0)  # in range where ok (< ptr[-1] <= len(idx))
        # XLA's CPU backend would contract ``acc + a * x`` into one fused multiply-add
        # (one rounding where scipy rounds twice); the barrier keeps scipy's rounding.
        term = fma_barrier(nbrs.val[e].astype(dtype)[:, None] * x[nbrs.idx[e]])
        return jnp.where(ok[:, None], acc + term, acc)

    acc = jnp.zeros(x.shape, dtype)
    if nbrs.idx.shape[0] == 0:
        return acc
    return jax.lax.fori_loop(0, jnp.max(deg, initial=0), body, acc)


def _smooth_host(nbrs: Neighbors, parts: list[Array], reuse=None) -> Array:
    """``connectivities.dot(x.T).T`` for ``x`` the rows of ``parts`` (R arrays of shape
    (G, n_obs)) stacked part-major -- row ``k * G + g`` is row ``g`` of part ``k`` -- as
    the numba custom call of :mod:`.host_kernels` (CPU): per block of 16 rows, a
    cells-first copy and scipy's row loop over the CSR neighbour lists (one row at a time,
    in the cells' order), with the 16 sums in vector registers -- no transposes or
    gathers in the program; the degree-bucketed XLA loop it replaced was ~3-4x slower on
    XLA:CPU.
    Bitwise the same values as :func:`_smooth_cells_first`.

    The parts are separate operands (read by the kernel where they lie), so the program
    never stacks them: XLA:CPU computed the stacked, transposed rows in a scalar loop.

    ``reuse`` (optional): ``(prev, keep)``, earlier sums ``prev`` (G, K, n_obs) and
    ``keep`` (G, R) int32: row ``g`` of part ``k`` is ``prev[g, keep[g, k]]`` where that
    index is >= 0, copied instead of computed (the caller vouches that it smoothed the
    same values; see :func:`smooth`)."""
    from . import host_kernels

    g, n = parts[0].shape
    name = host_kernels.register_smooth(parts[0].dtype)
    ops = [nbrs.ptr.astype(jnp.int32), nbrs.idx.astype(jnp.int32), nbrs.val]
    if reuse is not None:
        prev, keep = reuse
        ops += [prev.reshape(-1, n).astype(parts[0].dtype), keep.astype(jnp.int32)]
    out = jax.ShapeDtypeStruct((len(parts) * g, n), parts[0].dtype)
    return jax.ffi.ffi_call(name, out)(*parts, *ops)


def _smooth_parts(nbrs: Neighbors, parts: list[Array], reuse=None) -> Array:
    """``connectivities.dot(x.T).T`` for ``x`` the part-major stack of ``parts`` (see
    :func:`_smooth_host`), shape (R, G, n_obs): the host kernel where it applies (CPU,
    float32 connectivities, float rows; it copies the rows ``reuse`` names), else the XLA
    loop cells-first (which computes every row: ``reuse`` names rows whose sums are the
    same, so only the cost differs)."""
    dtype = parts[0].dtype
    g, n = parts[0].shape
    if (use_host_kernels() and dtype in (jnp.float32, jnp.float64)
            and all(p.dtype == dtype for p in parts)
            and nbrs.val.dtype == jnp.float32):  # fmt: skip
        return _smooth_host(nbrs, parts, reuse).reshape(len(parts), g, n)
    x = jnp.concatenate(parts, axis=0)
    return _smooth_cells_first(nbrs, x.T).T.reshape(len(parts), g, n)


@jax.custom_batching.custom_vmap
def _smooth(nbrs: Neighbors, rows: tuple[Array, ...], reuse) -> Array:
    reuse = None if reuse is None else (reuse[0][None], reuse[1][None])
    return _smooth_parts(nbrs, [r[None] for r in rows], reuse)[:, 0]


@_smooth.def_vmap
def _smooth_batched(axis_size, in_batched, nbrs, rows, reuse):
    nb_batched, rows_batched, reuse_batched = in_batched
    if any(jax.tree_util.tree_leaves(nb_batched)):
        axes = jax.tree_util.tree_map(lambda b: 0 if b else None, in_batched)
        return jax.vmap(_smooth.fun, in_axes=axes)(nbrs, rows, reuse), True
    if not any(jax.tree_util.tree_leaves((rows_batched, reuse_batched))):
        return _smooth(nbrs, rows, reuse), False

    def full(x, b):
        return x if b else jnp.broadcast_to(x, (axis_size, *x.shape))

    # all genes and rows in one pass: R parts (genes, cells) -> (R, genes, cells)
    parts = [full(r, b) for r, b in zip(rows, rows_batched, strict=True)]
    if reuse is not None:
        reuse = tuple(full(x, b) for x, b in zip(reuse, reuse_batched, strict=True))
    # (genes, R, cells): XLA takes each row as a slice of the part-major result
    return jnp.swapaxes(_smooth_parts(nbrs, parts, reuse), 0, 1), True


def smooth(nbrs: Neighbors | None, res: Array | list[Array] | tuple[Array, ...],
           reuse: tuple[Array, Array] | None = None) -> Array:  # fmt: skip
    """``connectivities.dot(res.T).T`` for ``res`` of shape (rows, n_obs) -- or a list of
    rows, which is never stacked in the program -- bitwise as scipy. Under ``vmap`` over
    genes, all genes and rows are smoothed in one pass over the neighbour lists (see
    :func:`_smooth_cells_first`).

    ``reuse``: ``(prev, keep)`` with ``prev`` (K, n_obs) sums of an earlier call and
    ``keep`` (rows,) int32: where ``keep[k] >= 0``, row ``k``'s input is bit for bit the
    input whose sums are ``prev[keep[k]]`` -- the caller's promise -- and the CPU kernel
    copies them instead of smoothing again (a gene's steady-state rows, which most of its
    evaluations leave unchanged: :class:`SteadyCache`)."""
    if nbrs is None:
        return jnp.stack(res) if isinstance(res, list | tuple) else res
    return _smooth(nbrs, tuple(res), reuse)


def projection_grid_size(n_obs: int) -> int:
    # _em_model_utils.assign_tau ~192: num = np.clip(int(len(u) / 5), 200, 500)
    return int(min(max(int(n_obs / 5), 200), 500))


def _nearest_call(u: Array, s: Array, gu: Array, gs: Array) -> Array:
    from . import host_kernels

    name = host_kernels.register_nearest(u.dtype)
    return jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(u.shape, jnp.int32))(u, s, gu, gs)


@jax.custom_batching.custom_vmap
def _nearest_host(u, s, gu, gs):
    return _nearest_call(u[None], s[None], gu[None], gs[None])[0]


@_nearest_host.def_vmap
def _nearest_host_batched(axis_size, in_batched, u, s, gu, gs):
    return _nearest_call(*all_batched(axis_size, in_batched, (u, s, gu, gs))), True


def _project(u: Array, s: Array, gu: Array, gs: Array, tpoints: Array) -> Array:
    """``tpoints[((xt[None] - x_obs[:, None]) ** 2).sum(2).argmin(1)]`` without the
    (cells x grid x 2) temporary: a running first-minimum over grid points. On CPU the
    numba custom call of :mod:`.host_kernels` (one pass over the grid per 8 cells, their
    running minima in registers; XLA splits the loop body into two fusions that each
    recompute the distances, ~3.5x slower); elsewhere the XLA loop. Both give the same
    indices."""
    dt = {x.dtype for x in (u, s, gu, gs)}
    if use_host_kernels() and len(dt) == 1 and u.dtype in (jnp.float32, jnp.float64):
        return tpoints[_nearest_host(u, s, gu, gs)]

    def body(j, carry):
        best, arg = carry
        d = fb((gu[j] - u) ** 2) + fb((gs[j] - s) ** 2)
        better = d < best
        return jnp.where(better, d, best), jnp.where(better, j, arg)

    best0 = fb((gu[0] - u) ** 2) + fb((gs[0] - s) ** 2)
    # np.argmin returns the first NaN; NaN distances do not occur for finite parameters.
    init = (best0, jnp.zeros(u.shape, jnp.int32))
    _, arg = jax.lax.fori_loop(1, gu.shape[0], body, init, unroll=_UNROLL)
    return tpoints[arg]


def _inverse(u, s, alpha, beta, gamma, t_, u0_, s0_, f32, num=None):
    """``assign_tau``'s inverse-formula branch (utils ~196-203); ``num`` (the projection
    grid's size) is not used."""
    f_on = None if f32 is None else {**f32, "u0": True, "s0": True}  # ints 0
    tau = tau_inv(u, s, 0, 0, alpha, beta, gamma, f_on)
    tau = jnp.clip(tau, 0, t_)
    f_off = None if f32 is None else {**f32, "alpha": True}  # alpha = 0 (int)
    tau_ = tau_inv(u, s, u0_, s0_, 0, beta, gamma, f_off)
    tau_max = jnp.max(jnp.where(s > 0, tau_, -jnp.inf))
    tau_ = jnp.clip(tau_, 0, tau_max)
    return tau, tau_


def _projection(u, s, alpha, beta, gamma, t_, u0_, s0_, f32, num=None):
    """``assign_tau``'s projection branch (utils ~185-195) on a grid of ``num`` points.

    ``num`` None: upstream's rule for the length of ``u``. A traced ``num`` (the rule for
    the real cell count of a padded cell axis): the grids have the static length of the
    padded axis, their points past ``num`` at ``+inf``, which are never nearer to a cell
    than a real point (the first minimum is kept), so the indices are unchanged."""
    size = projection_grid_size(u.shape[0])
    if num is None:
        num, size = size, None
    u_min = jnp.min(jnp.where(s > 0, u, jnp.inf))
    t0 = tau_inv(u_min, u0=u0_, alpha=0, beta=beta)
    tpoints = linspace(0, t_, num, size)
    tpoints_ = linspace(0, t0, num, size)[1:]
    f_on = None if f32 is None else {**f32, "u0": True, "s0": True}
    f_off = None if f32 is None else {**f32, "alpha": True}
    if f32 is not None and tpoints.dtype == jnp.float64:
        # utils ~193: np.linspace(0, t_) is float32 for a float32 t_, and with it the
        # 'on' curve's float32 operations (kinetics.solution's "t" flag)
        t32 = f32["t_"]
        tp32 = linspace(jnp.asarray(0, jnp.float32), t_.astype(jnp.float32), num, size)
        tpoints = jnp.where(t32, tp32.astype(tpoints.dtype), tpoints)
        f_on = {**f_on, "t": t32}
    gu, gs = solution(tpoints, alpha, beta, gamma, f32=f_on)
    gu_, gs_ = solution(tpoints_, 0, beta, gamma, u0_, s0_, f32=f_off)
    if size is not None:  # the grid points past num: never nearest
        gu, gs = _beyond(gu, num), _beyond(gs, num)
        gu_, gs_ = _beyond(gu_, num - 1), _beyond(gs_, num - 1)
    return _project(u, s, gu, gs, tpoints), _project(u, s, gu_, gs_, tpoints_)


def _beyond(g: Array, num) -> Array:
    """``g`` with its entries from ``num`` on at ``+inf``."""
    return jnp.where(jnp.arange(g.shape[0]) < num, g, jnp.asarray(jnp.inf, g.dtype))


def projection_grid_size_traced(n: Array) -> Array:
    """:func:`projection_grid_size` of a traced (non-negative) cell count."""
    return jnp.clip(jnp.asarray(n, jnp.int32) // 5, 200, 500)


def assign_tau(
    u: Array,
    s: Array,
    alpha: Array,
    beta: Array,
    gamma: Array,
    t_: Array,
    u0_: Array,
    s0_: Array,
    assignment_mode: str | ModeSwitch | None,
    f32: dict | None = None,
    grid: Array | None = None,
) -> tuple[Array, Array]:
    """``_em_model_utils.assign_tau``: (tau, tau_) by projection or by the inverse formula.

    ``"projection"`` projects only when ``beta < gamma`` (utils ~189-191); each branch
    runs for the genes that take it. A :class:`ModeSwitch` picks the mode at run time.
    ``grid``: points of the projection grid (None: upstream's rule for ``len(u)``; an
    array: that many points of a grid as long as the rule gives for ``len(u)``).
    """
    # the grid size travels as an operand (a traced count may not be closed over)
    ops = (u, s, alpha, beta, gamma, t_, u0_, s0_, f32, grid)
    if isinstance(assignment_mode, ModeSwitch):
        return _switched(assignment_mode, ops)
    kind = _kind(assignment_mode)
    if kind == "inverse":
        return _inverse(*ops)
    if kind == "projection":
        # each branch only for the genes that take it (lazily, the projection 8 genes
        # at a time: see _switched)
        use = _projects(assignment_mode, beta, gamma)
        tau_p, tau_p_ = cond_any(use, _projection, _zeros, *ops, chunk=_PROJ_CHUNK)
        tau_i, tau_i_ = cond_any(~use, _inverse, _zeros, *ops, discard=True)
        return jnp.where(use, tau_p, tau_i), jnp.where(use, tau_p_, tau_i_)
    return _projection(*ops)


def _projects(assignment_mode, beta: Array, gamma: Array) -> Array | bool:
    """Whether :func:`assign_tau` takes the projection branch (per gene): the one rule,
    also for ``assign_tau``'s own choice and the float32 flags that follow it."""
    if isinstance(assignment_mode, ModeSwitch):
        index = jnp.asarray(assignment_mode.index)
        hit = [(index == i) & _projects(m, beta, gamma)
               for i, m in enumerate(assignment_mode.modes)]  # fmt: skip
        return functools.reduce(jnp.logical_or, hit, jnp.asarray(False))
    kind = _kind(assignment_mode)
    return beta < gamma if kind == "projection" else kind == "full"


def _zeros(*ops):
    """A pair of zero time arrays shaped and typed like an assignment of ``ops``."""
    shape = jnp.shape(ops[0])
    dtype = jnp.result_type(ops[0], ops[2], ops[3], ops[4], ops[5])
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


class ModeSwitch(NamedTuple):
    """An assignment mode chosen at run time: ``modes[index]``.

    ``index`` may be unbatched (a step of the EM schedule) or batched (genes at different
    steps); either way one copy of the time assignment serves all the modes in the
    compiled program, and the projection runs only when some gene's mode needs it.
    """

    modes: tuple
    index: Array


def _kind(mode: str | None) -> str:
    if mode == "projection":
        return "projection"  # projection where beta < gamma, else the inverse formula
    if mode in ("full_projection", "partial_projection"):
        return "full"
    return "inverse"


def _switched(ms: ModeSwitch, ops: tuple) -> tuple[Array, Array]:
    """``assign_tau`` in mode ``ms.modes[ms.index]``: the inverse formula and the
    projection each run (lazily, :func:`cond_any`) only where the chosen mode needs them;
    then the mode's result is selected."""
    kinds = tuple(_kind(m) for m in ms.modes)
    if len(set(kinds)) == 1:
        return assign_tau(*ops[:8], ms.modes[0], ops[8], ops[9])
    index = jnp.asarray(ms.index)
    use_proj = _projects("projection", ops[3], ops[4])  # beta < gamma

    def needed(kind: str, where_proj):
        hit = [index == i for i, k in enumerate(kinds) if k == kind]
        hit += [(index == i) & where_proj for i, k in enumerate(kinds) if k == "projection"]
        return functools.reduce(jnp.logical_or, hit, jnp.asarray(False))

    # select() reads inv only where it was needed: no per-gene select against zeros
    inv = cond_any(needed("inverse", ~use_proj), _inverse, _zeros, *ops, discard=True)
    # the projection (a 500-point grid per cell) runs only for the genes whose mode needs
    # it, gathered 8 at a time: at a given iteration few genes of a batch are in the
    # final stage, and "projection" projects only where beta < gamma (utils ~189-191)
    proj = cond_any(needed("full", use_proj), _projection, _zeros, *ops, chunk=_PROJ_CHUNK)

    def select(kind):
        if kind == "inverse":
            return inv
        if kind == "full":
            return proj
        return tuple(jnp.where(use_proj, p, i) for p, i in zip(proj, inv, strict=True))

    out = select(kinds[0])
    for i, k in enumerate(kinds[1:], 1):
        out = tuple(jnp.where(index == i, n, o) for n, o in zip(select(k), out, strict=True))
    return out


def _sorted_gaps(x: Array, mask: Array) -> tuple[Array, Array, Array]:
    """Sorted masked values (``+inf`` padded), ``np.diff(sorted, prepend=0)``, validity.

    The gaps are float64 whatever ``x``'s dtype: numpy concatenates the Python int
    ``prepend`` (int64) with the values, so float32 times give float64 gaps, a float64
    percentile and float64 subtractions (utils ~137-155; the host kernel's ``_gaps``)."""
    xs = jnp.sort(jnp.where(mask, x, jnp.inf))
    x64 = xs.astype(jnp.float64)
    dx = jnp.diff(x64, prepend=jnp.zeros((1,), x64.dtype))
    valid = jnp.arange(x.shape[0]) < jnp.sum(mask)
    return xs, dx, valid


def _subtract_gaps(x: Array, mask: Array, xs: Array, dx: Array, big: Array, to32=False) -> Array:
    """``for i in where(big): x_new[x >= xs[i]] -= dx[i]`` in ascending ``i``.

    Upstream (utils ~150, ~155) subtracts sequentially and tests on the original values;
    the loop keeps that order of subtractions (it matters in the last bits). ``to32``: ``x``
    (float64) holds upstream's float32 array, each difference is rounded to float32.
    """
    n = x.shape[0]
    pos = jnp.arange(n)

    def cond(carry):
        i_prev, _ = carry
        return jnp.any(big & (pos > i_prev))

    def body(carry):
        i_prev, x_new = carry
        i = jnp.argmax(big & (pos > i_prev))
        # float32 tau_new -= float64 dti: computed in float64, rounded to float32
        sub = (x_new.astype(dx.dtype) - dx[i]).astype(x_new.dtype)
        sub = r32(sub, to32)
        x_new = jnp.where(mask & (x >= xs[i]), sub, x_new)
        return i, x_new

    _, x_new = jax.lax.while_loop(cond, body, (jnp.asarray(-1, pos.dtype), x))
    return x_new


def _adjust_increments_xla(tau: Array, on: Array, tau_: Array, off: Array, to32=False):
    xs, dx, valid = _sorted_gaps(tau, on)
    xs_, dx_, valid_ = _sorted_gaps(tau_, off)
    any_on, any_off = jnp.any(on), jnp.any(off)
    # A missing group contributes no gaps (utils ~140 vs ~145: single-group threshold).
    gaps = jnp.concatenate([dx, dx_])
    gmask = jnp.concatenate([valid & any_on, valid_ & any_off])
    ub = 3 * np_percentile_masked(gaps, gmask, 99.5)
    tau_new = _subtract_gaps(tau, on, xs, dx, valid & (dx > ub), to32)
    tau_new_ = _subtract_gaps(tau_, off, xs_, dx_, valid_ & (dx_ > ub))
    return tau_new, tau_new_


def use_host_kernels() -> bool:
    """Whether sort-bound kernels run as the numba custom call of :mod:`.host_kernels`
    (CPU backend: XLA's CPU sort is ~40x slower than numpy's) instead of XLA (GPU/TPU: no
    host code in the program). Set ``JAXVELO_HOST_KERNELS=0`` to force the XLA versions."""
    if os.environ.get("JAXVELO_HOST_KERNELS", "1") == "0":
        return False
    return jax.default_backend() == "cpu"


def adjust_increments(
    tau: Array, on: Array, tau_: Array, off: Array, to32=False
) -> tuple[Array, Array]:
    """Masked port of ``_em_model_utils.adjust_increments`` as called in
    ``compute_divergence`` (utils ~294-300).

    Removes gaps larger than ``3 * np.percentile(gaps, 99.5)`` from the sorted times of the
    'on' cells (``tau[on]``) and of the 'off' cells (``tau_[off]``); with both present the
    threshold comes from the stacked gaps of both (utils ~145). Cells outside the masks keep
    their values. On CPU this is a numba kernel called as an XLA custom call, once per gene
    batch (:mod:`.host_kernels`); elsewhere the XLA port (:func:`_adjust_increments_xla`).
    Both are tested bitwise against upstream's function.

    ``to32`` (per gene): float64 ``tau`` holding upstream's *float32* times (the projection
    grid ``np.linspace(0, t_)`` of a float32 ``t_``): upstream's ``tau_new[tau >= ti] -=
    dti`` then rounds each difference to float32.
    """
    if not use_host_kernels():
        return _adjust_increments_xla(tau, on, tau_, off, to32)
    return _adjust_host(tau, on, tau_, off, jnp.asarray(to32, bool))


def _adjust_call(
    tau: Array, on: Array, tau_: Array, off: Array, to32: Array
) -> tuple[Array, Array]:
    """The numba custom call on (genes, cells) arrays (:mod:`.host_kernels`)."""
    from . import host_kernels

    name = host_kernels.register(tau.dtype)
    out = jax.ShapeDtypeStruct(tau.shape, tau.dtype)
    call = jax.ffi.ffi_call(name, (out, out))
    return call(tau, on.astype(bool), tau_.astype(tau.dtype), off.astype(bool), to32.astype(bool))


@jax.custom_batching.custom_vmap
def _adjust_host(tau, on, tau_, off, to32):
    res = _adjust_call(tau[None], on[None], tau_[None], off[None], to32[None])
    return res[0][0], res[1][0]


@_adjust_host.def_vmap
def _adjust_host_batched(axis_size, in_batched, tau, on, tau_, off, to32):
    args = all_batched(axis_size, in_batched, (tau, on, tau_, off, to32))
    return _adjust_call(*args), (True, True)


def _argmin_rows(res: Array) -> Array:
    """``np.argmin(res, axis=0)`` over a few rows (first minimum; the first NaN wins), as
    elementwise comparisons: XLA:CPU's variadic (value, index) reduce does not vectorise."""
    best, arg = res[0], jnp.zeros(res.shape[1:], jnp.int32)
    for k in range(1, res.shape[0]):
        better = (res[k] < best) | (jnp.isnan(res[k]) & ~jnp.isnan(best))
        best, arg = jnp.where(better, res[k], best), jnp.where(better, k, arg)
    return arg


class SteadyCache(NamedTuple):
    """A gene's smoothed steady-state rows (``distx_steady_``, ``distx_steady``) from its
    last time assignment, with the bit patterns of everything each row is computed from
    besides the gene's fixed data: ``scaling`` and its float32 flag for the first,
    ``alpha``, ``beta``, ``gamma``, ``scaling`` and their flags for the second. An
    assignment whose key matches reuses the row's sums (:func:`smooth`'s ``reuse``): the
    same input bits give the same sums. Upstream's schedule leaves ``scaling`` unchanged
    in ~77% of a gene's assignments and all four in ~45% (pancreas genes, counted)."""

    y: Array  # (2, n_obs) the smoothed rows
    key: Array  # (2, 8) int64
    ok: Array  # () bool: y and key are set

    @staticmethod
    def empty(n_obs: int, dtype) -> SteadyCache:
        return SteadyCache(jnp.zeros((2, n_obs), dtype), jnp.zeros((2, 8), jnp.int64),
                           jnp.asarray(False))  # fmt: skip


def _bits(*xs) -> Array:
    """The bit patterns of scalars (floats and bools) as one int64 vector of 8."""
    v = [jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float64), jnp.int64) for x in xs]
    return jnp.stack(v + [jnp.zeros((), jnp.int64)] * (8 - len(v)))


class Assignment(NamedTuple):
    """Result of one time assignment (``mode="assign_timepoints"``, plus ``mode="tau"``)."""

    t: Array  # (n_obs,) time
    tau: Array  # (n_obs,) 'on' time, zeroed where not on (assign_timepoints)
    o: Array  # (n_obs,) int32 state, 1 on / 0 off
    tau_full: Array  # (n_obs,) adjusted tau before zeroing (mode="tau")
    tau_full_: Array  # (n_obs,) adjusted tau_ before zeroing (mode="tau")
    cache: SteadyCache | None = None  # the steady rows' sums (with ``steady_cache``)


def assign_timepoints(
    u: Array,
    s: Array,
    alpha: Array,
    beta: Array,
    gamma: Array,
    scaling: Array,
    t_: Array,
    std_u: Array,
    std_s: Array,
    nbrs: Neighbors | None,
    assignment_mode: str | ModeSwitch | None,
    fit_steady_states: bool = True,
    fl=None,
    valid: Array | None = None,
    grid: Array | None = None,
    steady_cache: SteadyCache | None = None,
) -> Assignment:
    """``compute_divergence(mode="assign_timepoints")`` for ``u`` already divided by scaling.

    Follows utils ~250-440: ``(u0_, s0_)`` from ``t_``; ``assign_tau``; ``std_u /= scaling``;
    on/off by the smoothed 2-row distances, ``adjust_increments``; then the 4-row argmin with
    steady states, ``tau_ *= o == 0``, ``tau *= o == 1`` *before* remapping 2->1 and 3->0.

    ``fl`` (:class:`jaxvelo.core.objective.Flags`, float64 inputs only) marks the inputs
    that are numpy float32 upstream, with ``fl.t`` meaning "the data layers are float32".
    Upstream's float32 ``s`` and ``std_s`` make ``(s / std_s) ** 2`` of the steady-state
    distances float32 arithmetic (and ``s - s_inf`` too when ``s_inf`` is float32); those
    operations are emulated by rounding. The rest is float64 once any input is.

    ``valid`` (None: all): the real cells of a padded cell axis; padded cells (no
    neighbours, ``u = s = 0``) join neither group of ``adjust_increments``, so its gaps
    and percentile are those of the real cells. ``grid``: points of the projection grid
    (see :func:`assign_tau`). ``steady_cache`` (with neighbours and steady states): the
    gene's :class:`SteadyCache`, whose rows are reused where their keys match; the
    result's ``cache`` is the new one. ``u`` must then be the gene's data divided by
    ``scaling`` under the ``fl`` that the key records (as :func:`jaxvelo.core.em._assign`
    makes it).
    """
    f32 = None
    if fl is None:
        u0_, s0_ = solution(t_, alpha, beta, gamma)
    else:
        from .objective import switch_state

        u0_, s0_ = switch_state(t_, alpha, beta, gamma, fl)
        f32 = {"alpha": fl.alpha, "beta": fl.beta, "gamma": fl.gamma, "t_": fl.t_,
               "u32": fl.t & fl.scaling, "s32": fl.t,
               "u0": fl.alpha & fl.beta & fl.t_,
               "s0": fl.alpha & fl.beta & fl.gamma & fl.t_}  # fmt: skip
    tau, tau_ = assign_tau(u, s, alpha, beta, gamma, t_, u0_, s0_, assignment_mode, f32, grid)
    std_u = divide(std_u, scaling)
    if fl is not None:
        std_u = r32(std_u, fl.t & fl.scaling)  # float32 std_u / float32 scaling

    # constraint_time_increments (utils ~284-302)
    # np.linspace(0, t_) is float32 for a float32 t_ (utils ~193), and so are the projected
    # 'on' times: upstream's solution at them and its subtractions in adjust_increments
    # are then float32 too
    to32 = False if f32 is None else f32["t_"] & _projects(assignment_mode, beta, gamma)
    f_on = None if f32 is None else {**f32, "u0": True, "s0": True, "t": to32}  # ints 0
    f_off = None if f32 is None else {**f32, "alpha": True}  # alpha = 0 (int)
    ut, st = solution(tau, alpha, beta, gamma, f32=f_on)
    ut_, st_ = solution(tau_, 0, beta, gamma, u0_, s0_, f32=f_off)
    distu, distu_ = true_divide(u - ut, std_u), true_divide(u - ut_, std_u)
    dists, dists_ = true_divide(s - st, std_s), true_divide(s - st_, std_s)
    rows2 = [fb(distu_**2) + fb(dists_**2), fb(distu**2) + fb(dists**2)]
    res = smooth(nbrs, rows2)
    on = res[1] < res[0]  # np.argmin over 2 rows: ties go to row 0 ('off')
    off = ~on
    if valid is not None:
        on, off = on & valid, off & valid
    tau, tau_ = adjust_increments(tau, on, tau_, off, to32)

    ut, st = solution(tau, alpha, beta, gamma, f32=f_on)
    ut_, st_ = solution(tau_, 0, beta, gamma, u0_, s0_, f32=f_off)
    distu, distu_ = true_divide(u - ut, std_u), true_divide(u - ut_, std_u)
    dists, dists_ = true_divide(s - st, std_s), true_divide(s - st_, std_s)
    distx = fb(distu**2) + fb(dists**2)
    distx_ = fb(distu_**2) + fb(dists_**2)
    if fit_steady_states:
        u_inf, s_inf = divide(alpha, beta), divide(alpha, gamma)
        if fl is None:
            distx_steady = fb(true_divide(u - u_inf, std_u) ** 2) + fb(
                true_divide(s - s_inf, std_s) ** 2
            )
            distx_steady_ = fb(true_divide(u, std_u) ** 2) + fb(true_divide(s, std_s) ** 2)
        else:
            d32 = fl.t  # float32 data (s) and std_s
            u32 = fl.t & fl.scaling  # u / scaling and std_u / scaling are float32 too
            ag, ab = fl.alpha & fl.gamma, fl.alpha & fl.beta
            s_inf = r32(s_inf, ag)
            u_inf = r32(u_inf, ab)
            ds = r32(s - s_inf, d32 & ag)
            sq_s = r32(r32(true_divide(ds, std_s), d32 & ag) ** 2, d32 & ag)
            du = r32(u - u_inf, u32 & ab)
            sq_u = r32(r32(true_divide(du, std_u), u32 & ab) ** 2, u32 & ab)
            distx_steady = r32(fb(sq_u) + fb(sq_s), u32 & ab & d32 & ag)
            sq_s_ = r32(r32(true_divide(s, std_s), d32) ** 2, d32)
            sq_u_ = r32(r32(true_divide(u, std_u), u32) ** 2, u32)
            distx_steady_ = r32(fb(sq_u_) + fb(sq_s_), u32 & d32)
        rows = [distx_, distx, distx_steady_, distx_steady]
    else:
        rows = [distx_, distx]
    cache = None
    if steady_cache is not None and fit_steady_states and nbrs is not None:
        # what each steady row is computed from besides the gene's fixed data (u before
        # the division by scaling, s, std_u, std_s, float32 layers): SteadyCache
        f = (False,) * 4 if fl is None else (fl.alpha, fl.beta, fl.gamma, fl.t & fl.scaling)
        key = jnp.stack([_bits(scaling, f[3]), _bits(alpha, beta, gamma, scaling, *f)])
        same = steady_cache.ok & jnp.all(key == steady_cache.key, axis=1)
        keep = jnp.stack([jnp.int32(-1), jnp.int32(-1),
                          jnp.where(same[0], 0, -1), jnp.where(same[1], 1, -1)])  # fmt: skip
        res = smooth(nbrs, rows, reuse=(steady_cache.y, keep.astype(jnp.int32)))
        cache = SteadyCache(res[2:].astype(steady_cache.y.dtype), key, jnp.asarray(True))
    else:
        res = smooth(nbrs, rows)
    o4 = _argmin_rows(res)
    tau_z = tau * (o4 == 1)
    tau_z_ = tau_ * (o4 == 0)
    # utils ~433-437: 2 (lower steady state) -> on, 3 (upper steady state) -> off
    o = jnp.where(o4 == 2, 1, jnp.where(o4 == 3, 0, o4)).astype(jnp.int32)
    t = tau_z * (o == 1) + (tau_z_ + t_) * (o == 0)
    return Assignment(t=t, tau=tau_z, o=o, tau_full=tau, tau_full_=tau_, cache=cache)
