"""Bitwise ports of the numpy / scipy reductions that scVelo's dynamical model relies on.

Every function works on ONE gene: a fixed-length 1-D array ``x`` (length ``N``, static)
whose first ``n`` entries are the data (``n`` traced), or ``x`` plus a boolean mask.
All functions are ``jax.jit``- and ``jax.vmap``-compatible: no Python branching on traced
values, no data-dependent shapes.  Batch over genes with ``jax.vmap``.

Why not ``jnp.sum`` / ``jnp.mean`` / ``jnp.percentile``?  jaxvelo must reproduce upstream
scVelo to ~1e-6 relative, and the EM fit is chaotic enough (argmin over time grids,
thresholds on p-values and percentiles) that a one-ulp difference in an early statistic can
move the final parameters far more than that.  numpy's reductions have a specific
summation order (pairwise, see :func:`pairwise_sum`) and specific dtype rules (NumPy 2 /
NEP 50: float32 stays float32 against Python scalars, but promotes against ``np.intp``
counts); XLA's reductions use a different, backend-dependent order.  So each numpy
routine is re-implemented here with numpy's exact operation order and dtypes.

Three XLA properties shape the code (verified on XLA:CPU, jax 0.10.2; tests guard them):

* XLA always allows LLVM to contract ``a + b * c`` into a fused multiply-add
  (``xla/service/cpu/cpu_compiler.cc``, ``CompilerTargetOptions``: "Always allow FMA
  fusion"); numpy rounds the product first.  ``optimization_barrier``,
  ``reduce_precision`` and bitcast round-trips are all optimised away before codegen.
  :func:`fma_barrier` (a NaN-preserving select) is what survives; every product that
  feeds an addition goes through it.
* XLA's algebraic simplifier rewrites ``A / broadcast(b)`` as ``A * (1 / b)`` (two
  roundings) -- including per-gene scalars once ``jax.vmap`` broadcasts them.
  :func:`true_divide` hides the broadcast; every division whose bits matter uses it.
* XLA:CPU flushes subnormal results to zero; numpy does not.  Results that are (or pass
  through) subnormal numbers can therefore differ.  scRNA-seq statistics never do.

Precision notes: sums, means, standard deviations, percentiles and ``np.linspace`` are
bitwise equal to numpy for float32 and float64.  :func:`gaussian_kde_eval` is not bitwise
(it involves ``exp``/``pow`` from glibc and a BLAS ``ddot`` whose order depends on the
CPU), but agrees to ~1e-13 relative.  On an H200 (jax 0.11.2) the pairwise sum was bitwise
and float32 division was not (:func:`native_f32_division`); the bitwise tests in
tests/test_numerics.py are the check to run there (docs/benchmarks.md, "GPU").  Callers must run
under ``jax.enable_x64(True)`` (float32 statistics are divided in float64 by numpy, and the
KDE is float64).
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "where_lazy",
    "all_batched",
    "cond_any",
    "PW_BLOCKSIZE",
    "compact",
    "fma_barrier",
    "materialize",
    "gaussian_kde_eval",
    "np_linspace",
    "np_mean",
    "np_percentile",
    "np_percentile_masked",
    "np_std",
    "np_var",
    "pairwise_sum",
    "pairwise_sum_at",
    "pairwise_sum_differentiable",
    "bimodality_from_kde",
    "test_bimodality",
    "true_divide",
    "round32",
    "stable_partition",
]

#: numpy/_core/src/umath/loops_utils.h.src: ``#define PW_BLOCKSIZE 128``.
PW_BLOCKSIZE = 128

# scipy/stats/_stats.pyx (gaussian_kernel_estimate_inner): ``math.pow((2 * PI), (- d / 2.))``
# evaluated by the C library pow in double; Python's math.pow calls the same libm pow.
_KDE_NORM_1D = math.pow(2 * math.pi, -1 / 2.0)


# ----------------------------------------------------------------------------- helpers


def fma_barrier(p: jax.Array) -> jax.Array:
    """Return ``p`` unchanged, but opaque to FMA contraction.

    XLA:CPU compiles with ``llvm::FPOpFusion::Fast`` unconditionally, so ``a + b * c``
    becomes ``fma(b, c, a)`` (one rounding) whereas numpy rounds ``b * c`` first.  A
    select on ``p == p`` cannot be folded by XLA or LLVM (it maps NaN payloads to the
    canonical NaN, which is its only effect) and sits between the multiply and the add.

    Parameters
    ----------
    p : jax.Array
        A product that is about to be added to something.

    Returns
    -------
    jax.Array
        ``p``, bit for bit (NaNs become the default NaN).
    """
    p = jnp.asarray(p)
    # lax.select, not jnp.where: the same operation without jnp's jitted wrapper, which
    # costs ~1 ms of tracing per call (there are ~850 calls in a program)
    return lax.select(p == p, p, lax.full_like(p, jnp.nan))


def materialize(x, zero: jax.Array):
    """Return ``x`` (an array or a pytree of arrays), computed into its own buffers before
    its consumers run.

    XLA:CPU fuses an elementwise producer into a consuming gather, which then evaluates
    the whole expression once per gathered element in a scalar loop (the loss terms
    before their compaction: 2-3x slower than computing them contiguously, vectorised,
    and gathering the result). XLA removes ``optimization_barrier`` before fusion on CPU,
    but cannot see through a while loop whose trip count is only known at run time and
    whose body changes the values: ``zero`` is its trip count, a traced integer that is
    never positive but which XLA cannot know (e.g. ``min(k, 0)`` for any traced ``k``);
    the loop never runs.
    """

    def body(c):
        k, v = c
        return k - 1, jax.tree_util.tree_map(lambda a: a + k.astype(a.dtype), v)

    return lax.while_loop(lambda c: c[0] > 0, body, (jnp.asarray(zero), x))[1]


def round32(x: jax.Array, flag) -> jax.Array:
    """``x`` rounded to float32 where ``flag``: one numpy float32 operation emulated in float64.

    For ``+ - * /`` (and sqrt) on float32 operands, the float64 result rounded to float32
    equals numpy's float32 result (53 >= 2 * 24 + 2, so double rounding is innocuous). Lets
    genes of one batch follow different float32/float64 paths, as upstream's do. A no-op for
    non-float64 ``x`` and for ``flag`` None/False.
    """
    x = jnp.asarray(x)
    if flag is None or flag is False or x.dtype != jnp.float64:
        return x
    return jnp.where(flag, x.astype(jnp.float32).astype(jnp.float64), x)


def where_lazy(flag, fn, x: jax.Array, otherwise: jax.Array) -> jax.Array:
    """``jnp.where(flag, fn(x), otherwise)``, evaluating ``fn`` only when needed.

    For the float32 emulation (e.g. numpy's float32 log on a float64 array): under
    ``vmap`` over genes a per-gene ``flag`` would turn ``lax.cond`` into a select that
    always pays for ``fn``. The batching rule instead branches once on "does any gene of
    the batch need ``fn``", so batches without float32 operands skip it. The values are
    those of ``jnp.where`` in every case.
    """
    return cond_any(flag, lambda v, o: fn(v), lambda v, o: o, x, otherwise)


def cond_any(pred, true_fn, false_fn, *operands, chunk: int | None = None,
             discard: bool = False):  # fmt: skip
    """``lax.cond(pred, true_fn, false_fn, *operands)`` that stays lazy under ``vmap``.

    With a batched ``pred``, ``lax.cond`` becomes a select that runs both branches for
    every member. Here the batching rule runs ``true_fn`` only when some member of the
    batch needs it (then selecting per member), else just ``false_fn``. Unbatched
    operands stay unbatched. The branches must not close over batched values: pass them
    as ``operands``. The values are those of ``jnp.where(pred, true_fn(...),
    false_fn(...))`` in every case.

    With ``chunk``, ``true_fn`` runs only for the members that need it: they are gathered
    ``chunk`` at a time (a loop over ``ceil(count / chunk)`` sub-batches) and scattered
    back over ``false_fn``'s results. For an expensive ``true_fn`` that few members need
    at a time; ``true_fn`` must be elementwise in the batch (a member's result does not
    depend on the others' or on the batch size, as everywhere in the core).

    With ``discard`` (a caller that never reads the members where ``pred`` is False),
    those members are left unspecified when some member needs ``true_fn``: its results
    for the whole batch, without running ``false_fn`` or the per-member select (a full
    pass over every cell-sized output).
    """
    if isinstance(pred, (bool, np.bool_)):
        return true_fn(*operands) if pred else false_fn(*operands)

    @jax.custom_batching.custom_vmap
    def lazy(pred, ops):
        return lax.cond(pred, lambda: true_fn(*ops), lambda: false_fn(*ops))

    @lazy.def_vmap
    def _rule(axis_size, in_batched, pred, ops):
        p_b, o_b = in_batched
        axes = jax.tree_util.tree_map(lambda b: 0 if b else None, o_b)

        def run(fn):
            out = jax.vmap(lambda o: fn(*o), in_axes=(axes,), axis_size=axis_size)(ops)
            return out

        if not p_b:
            out = lax.cond(pred, lambda: run(true_fn), lambda: run(false_fn))
            return out, jax.tree_util.tree_map(lambda _: True, out)

        def both():
            if discard:
                return run(true_fn)
            a, b = run(true_fn), run(false_fn)
            return jax.tree_util.tree_map(
                lambda x, y: jnp.where(pred.reshape((-1,) + (1,) * (x.ndim - 1)), x, y), a, b
            )

        if chunk is not None and axis_size > chunk:
            out = _compacted(axis_size, chunk, pred, true_fn, run(false_fn), ops, o_b)
        else:
            out = lax.cond(jnp.any(pred), both, lambda: run(false_fn))
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return lazy(jnp.asarray(pred, bool), operands)


def while_any(cond_fn, body_fn, init, consts=()):
    """``lax.while_loop(cond_fn, lambda c: body_fn(consts, c), init)`` whose batching rule
    loops while any member's ``cond_fn`` holds, without freezing the finished members.

    Under ``vmap`` JAX's own rule selects every leaf of the carry between the body's
    result and the old value, per member, on every iteration (full copies of every
    cell-sized array of the carry), and traces the body twice. Here the body runs on every
    member until all are finished: ``body_fn`` must itself leave what the caller reads of
    a finished member's carry unchanged (bitwise). The body must not close over batched
    values: pass them in ``consts``.
    """

    @jax.custom_batching.custom_vmap
    def loop(consts, init):
        return lax.while_loop(cond_fn, lambda c: body_fn(consts, c), init)

    @loop.def_vmap
    def _rule(axis_size, in_batched, consts, init):
        c_b, i_b = in_batched
        leaves, tree = jax.tree_util.tree_flatten(init)
        init = tree.unflatten(all_batched(axis_size, jax.tree_util.tree_leaves(i_b), leaves))
        axes = jax.tree_util.tree_map(lambda b: 0 if b else None, c_b)
        body = jax.vmap(body_fn, in_axes=(axes, 0), axis_size=axis_size)
        out = lax.while_loop(lambda c: jnp.any(jax.vmap(cond_fn)(c)),
                             lambda c: body(consts, c), init)  # fmt: skip
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return loop(consts, init)


def stable_partition(mask: jax.Array) -> jax.Array:
    """``argsort(~mask, stable=True)``: the positions where ``mask`` (in order), then the
    others (in order), as int32. Two prefix sums and a scatter of a permutation instead
    of a sort (XLA:CPU's sort costs ~15 ms for 56 x 3696 cells)."""
    mask = jnp.asarray(mask, bool)
    count = jnp.sum(mask, dtype=jnp.int32)
    kept = jnp.cumsum(mask, dtype=jnp.int32) - 1
    rest = jnp.cumsum(~mask, dtype=jnp.int32) - 1 + count
    pos = jnp.where(mask, kept, rest)
    n = mask.shape[0]
    return jnp.zeros(n, jnp.int32).at[pos].set(jnp.arange(n, dtype=jnp.int32),
                                               unique_indices=True)  # fmt: skip


def _compacted(size: int, chunk: int, pred, fn, base, ops, batched):
    """``where(pred, vmap(fn)(ops), base)`` running ``fn`` only on the members where
    ``pred``, ``chunk`` members per pass (see :func:`cond_any`)."""
    n_chunks = -(-size // chunk)
    count = jnp.sum(pred, dtype=jnp.int32)
    # members that need fn first, in order; unused slots point past the end (dropped)
    order = stable_partition(pred)
    order = jnp.concatenate([order, jnp.full((n_chunks * chunk - size,), size, jnp.int32)])
    order = jnp.where(jnp.arange(n_chunks * chunk) < count, order, size)
    axes = jax.tree_util.tree_map(lambda b: 0 if b else None, batched)

    def body(c, out):
        sel = lax.dynamic_slice(order, (c * chunk,), (chunk,))
        take = jnp.minimum(sel, size - 1)  # unused slots compute a copy of the last member
        sub = jax.tree_util.tree_map(lambda x, b: x[take] if b else x, ops, batched)
        res = jax.vmap(lambda o: fn(*o), in_axes=(axes,), axis_size=chunk)(sub)
        return jax.tree_util.tree_map(lambda o, r: o.at[sel].set(r, mode="drop"), out, res)

    return lax.fori_loop(0, (count + chunk - 1) // chunk, body, base)


def native_f32_division() -> bool:
    """Whether float32 divisions are left to the backend or computed in float64.

    numpy's float32 quotient is correctly rounded. XLA:CPU's is too, but XLA:GPU lowers
    float32 division to PTX ``div.full.f32`` (it sets ``-nvptx-prec-divf32=1``; up to 2 ulp
    off), so elsewhere than on CPU :func:`divide` takes the float64 quotient of the two
    float32 operands and rounds it once to float32 -- the correctly rounded result, as
    double rounding is innocuous for division (53 >= 2 * 24 + 2). On an H200 ~29% of
    random float32 quotients differed from numpy's (docs/benchmarks.md, "GPU").
    ``JAXVELO_F32_DIVISION=float64`` (or ``native``) overrides the choice, e.g. to run the
    GPU's program on CPU in tests.
    """
    env = os.environ.get("JAXVELO_F32_DIVISION", "").strip().lower()
    if env in ("float64", "native"):
        return env == "native"
    if env:
        raise ValueError(f"JAXVELO_F32_DIVISION must be 'native' or 'float64', got {env!r}")
    return jax.default_backend() == "cpu"


def divide(a, b) -> jax.Array:
    """``a / b`` with numpy's correctly rounded float32 quotient on every backend.

    float64 (and float32 on CPU) is plain ``a / b``; a float32 quotient elsewhere is the
    float64 quotient rounded once (:func:`native_f32_division`). Operands are first cast to
    the result dtype, as NEP 50 does with Python scalars (``0.05 / float32`` is float32).
    """
    dtype = jnp.result_type(a, b)
    if dtype != jnp.float32 or native_f32_division():
        return a / b
    # The operands pass fma_barrier: LLVM's InstCombine folds ``fptrunc(fdiv(fpext a, fpext
    # b))`` back to a float32 ``fdiv`` (exact for IEEE division, so legal), which NVPTX then
    # lowers to div.full.f32 again; with the selects in between the quotient stays float64
    # (XLA:CPU's optimised LLVM IR: ``fdiv <8 x float>`` without them, ``<8 x double>`` with).
    f64 = jnp.float64
    a64 = fma_barrier(jnp.asarray(a, dtype).astype(f64))
    b64 = fma_barrier(jnp.asarray(b, dtype).astype(f64))
    return (a64 / b64).astype(dtype)


def true_divide(a: jax.Array, b: jax.Array | float) -> jax.Array:
    """``a / b`` with IEEE division even when ``b`` is a broadcast scalar.

    XLA's algebraic simplifier rewrites ``A / broadcast(b)`` as ``A * broadcast(1 / b)``
    (two roundings), which also hits per-gene scalars once ``jax.vmap`` batches them.
    Selecting the divisor elementwise on ``a != a`` (where the quotient is NaN anyway)
    hides the broadcast.

    Parameters
    ----------
    a, b : jax.Array
        Dividend and divisor (broadcastable; result dtype as ``a / b``).

    Returns
    -------
    jax.Array
        The correctly rounded quotient.
    """
    a = jnp.asarray(a)
    dtype = jnp.result_type(a, b)
    a, b = jnp.broadcast_arrays(a.astype(dtype), jnp.asarray(b, dtype))
    return divide(a, jnp.where(a != a, jnp.ones((), dtype), b))


def _f64() -> type:
    """float64 (the caller runs with x64 enabled; numpy divides float32 sums in float64)."""
    return jnp.float64


def _as_count(n: jax.Array | int) -> jax.Array:
    return jnp.asarray(n, jnp.int32)


def compact(x: jax.Array, mask: jax.Array, fill: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Stable compaction: move ``x[mask]`` to the front, preserving order.

    Parameters
    ----------
    x : jax.Array
        1-D array, shape ``(N,)``.
    mask : jax.Array
        Boolean array, shape ``(N,)``.
    fill : float, default 0.0
        Value written to ``y[n:]``.

    Returns
    -------
    y : jax.Array
        Shape ``(N,)``, dtype of ``x``; ``y[:n] == x[mask]`` (numpy boolean indexing
        order), ``y[n:] == fill``.
    n : jax.Array
        ``mask.sum()`` as int32.

    Notes
    -----
    O(N): an exclusive prefix sum gives each kept element its destination; the scatter
    has unique indices, so it is deterministic on every backend.
    """
    mask = jnp.asarray(mask, bool)
    size = x.shape[0]
    pos = jnp.cumsum(mask.astype(jnp.int32)) - 1
    dest = jnp.where(mask, pos, size)  # out of bounds -> dropped
    y = jnp.full((size,), fill, dtype=x.dtype).at[dest].set(x, mode="drop")
    return y, jnp.sum(mask, dtype=jnp.int32)


# ------------------------------------------------------------------ pairwise summation


@functools.cache
def _pw_max_depth(size: int) -> int:
    """Deepest recursion of numpy's pairwise sum over all lengths ``0..size``.

    The right child ``n - n2`` is not monotone in ``n`` (it drops by 7 at multiples of
    16), so the depth for ``n < size`` can exceed the depth for ``size``; take the max.
    """
    if size <= PW_BLOCKSIZE:
        return 0
    lengths = np.arange(size + 1)
    left = lengths // 2 - (lengths // 2) % 8  # n2 = n / 2; n2 -= n2 % 8
    right = lengths - left
    depth = np.zeros(size + 1, dtype=np.int64)
    big = lengths > PW_BLOCKSIZE
    while True:  # fixed point; converges in max-depth iterations
        new = np.where(big, 1 + np.maximum(depth[right], depth[left]), 0)
        if np.array_equal(new, depth):
            return int(depth.max())
        depth = new


def _pw_leaf_sums(x: jax.Array, start: jax.Array, length: jax.Array) -> jax.Array:
    """numpy's pairwise sum for leaves of length <= PW_BLOCKSIZE (vectorised over leaves).

    Port of numpy/_core/src/umath/loops_utils.h.src, ``@TYPE@_pairwise_sum``, the two
    non-recursive branches::

        if (n < 8) { res = -0.0; for (i = 0; i < n; i++) res += a[i]; }
        else {  /* n <= PW_BLOCKSIZE */
            r[0..7] = a[0..7];
            for (i = 8; i < n - (n % 8); i += 8) r[j] += a[i + j];   /* j = 0..7 */
            res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
            for (; i < n; i++) res += a[i];
        }

    Masked-out terms are replaced by ``+0.0`` instead of being skipped: ``v + 0.0 == v``
    bit for bit except for ``v == -0.0``, and the sign of a zero partial sum can only
    show in a zero total, which :func:`pairwise_sum` normalises to ``+0.0`` as numpy does.
    """
    dtype = x.dtype
    width = PW_BLOCKSIZE
    xp = jnp.concatenate([x, jnp.zeros((width,), dtype)])
    offs = jnp.arange(width, dtype=jnp.int32)
    vals = fma_barrier(xp[start[:, None] + offs[None, :]])  # (L, 128)
    zero = jnp.zeros((), dtype)
    m = length[:, None]
    full = m & ~7  # n - n % 8 (n >= 0): end of the 8-strided part

    # 8 <= n <= 128: eight strided accumulators over the blocks below ``full``.
    blocks = jnp.where(offs < full, vals, zero).reshape(-1, width // 8, 8)
    r = lax.fori_loop(
        1, width // 8, lambda b, acc: acc + blocks[:, b, :], blocks[:, 0, :], unroll=False
    )
    res = ((r[:, 0] + r[:, 1]) + (r[:, 2] + r[:, 3])) + ((r[:, 4] + r[:, 5]) + (r[:, 6] + r[:, 7]))
    # ... then the (< 8) elements from ``full`` to ``n`` sequentially.
    tail_blk = jnp.minimum(full >> 3, width // 8 - 1)[:, :, None]
    tail = jnp.take_along_axis(vals.reshape(-1, width // 8, 8), tail_blk, axis=1)[:, 0, :]
    tail = jnp.where(offs[:8] < (m - full), tail, zero)
    # n < 8: sequential over the first (< 8) elements.
    head = jnp.where(offs[:8] < m, vals[:, :8], zero)
    seq = head[:, 0]
    for j in range(1, 7):
        seq = seq + head[:, j]
        res = res + tail[:, j - 1]
    res = res + tail[:, 6]
    return jnp.where(length < 8, seq, res)


def pairwise_sum(x: jax.Array, n: jax.Array | int) -> jax.Array:
    """``np.add.reduce(x[:n])``, bit for bit, for float32 and float64.

    Parameters
    ----------
    x : jax.Array
        1-D float array, shape ``(N,)``; only ``x[:n]`` is read.
    n : int or jax.Array
        Number of leading elements to sum, ``0 <= n <= N`` (traced is fine).

    Returns
    -------
    jax.Array
        0-d array of ``x.dtype``.

    Notes
    -----
    numpy's float add-reduction calls ``@TYPE@_pairwise_sum`` (numpy/_core/src/umath/
    loops_utils.h.src) on the whole contiguous array, accumulating in the array dtype:
    ``n < 8`` sequential; ``n <= 128`` eight strided accumulators; otherwise split at
    ``n2 = n // 2 - (n // 2) % 8`` and recurse.  The reduction result is
    ``0.0 + pairwise(x)`` (identity-initialised output), which only matters for the sign
    of a zero result.  Verified against numpy 2.4.6 (AVX-512 machine) for every length
    1..300 and random lengths up to 20000, float32 and float64: the SIMD add loop uses
    this scalar pairwise routine for reductions, with no 8192-element buffer blocking.

    Implementation: the recursion tree is unrolled statically to the maximum depth any
    ``n <= N`` needs; each node carries a traced ``(start, length)``; nodes of length
    <= 128 pass through unchanged (with an empty sibling).  Leaves are summed in one
    vectorised gather, then combined bottom-up.  Work O(N), depth O(log N).

    On the CPU backend the same recursion runs as a numba custom call
    (:mod:`.host_kernels`, one call per gene batch): the XLA version, which gathers every
    leaf into a 128-wide block, was ~10% of the exact program's compile time (run time of a
    pancreas batch: ~3% less with the custom call); both give numpy's bits.
    """
    x = jnp.asarray(x)
    return _pairwise_sum(x, _as_count(n), _host_1d(x))


def _host_1d(x: jax.Array) -> bool:
    """Whether a 1-D float array goes to a host kernel (CPU backend, not disabled)."""
    from .assign import use_host_kernels

    return x.ndim == 1 and x.dtype in (jnp.float32, jnp.float64) and use_host_kernels()


def pairwise_sum_differentiable(x: jax.Array, n: jax.Array | int) -> jax.Array:
    """:func:`pairwise_sum` by the XLA version on every backend: JAX can differentiate it
    (the gradient mode's loss); the custom call it cannot. Same bits."""
    return _pairwise_sum(jnp.asarray(x), _as_count(n), False)


def _pairwise_call(x: jax.Array, n: jax.Array, *idx: jax.Array) -> jax.Array:
    from . import host_kernels

    name = host_kernels.register_pairwise(x.dtype)
    return jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(n.shape, x.dtype))(x, n, *idx)


@jax.custom_batching.custom_vmap
def _pairwise_host(x: jax.Array, n: jax.Array, *idx: jax.Array) -> jax.Array:
    """``x`` (..., N), ``n`` (...), optional ``idx`` like ``x``: one custom call over all
    leading positions."""
    rows = [v.reshape(-1, x.shape[-1]) for v in (x, *idx)]
    return _pairwise_call(rows[0], n.reshape(-1).astype(jnp.int32), *rows[1:]).reshape(n.shape)


def all_batched(axis_size: int, in_batched, args) -> list:
    """A custom-call batching rule's operands with the unbatched ones broadcast along the
    batch axis (the kernels take every operand per gene)."""
    return [x if b else jnp.broadcast_to(x, (axis_size, *x.shape))
            for x, b in zip(args, in_batched, strict=True)]  # fmt: skip


@_pairwise_host.def_vmap
def _pairwise_host_batched(axis_size, in_batched, x, n, *idx):
    return _pairwise_host(*all_batched(axis_size, in_batched, (x, n, *idx))), True


def pairwise_sum_at(x: jax.Array, idx: jax.Array, n: jax.Array) -> jax.Array:
    """``pairwise_sum(x[idx], n)``, i.e. ``np.add.reduce(x[idx[:n]])`` bit for bit.

    On the CPU backend the custom call gathers the ``n`` selected elements itself; the
    XLA version computes ``x`` into its own buffer first (:func:`materialize`) and then
    gathers (``idx`` int32, same length as ``x``)."""
    x = jnp.asarray(x)
    n = _as_count(n)
    if _host_1d(x):
        return _pairwise_host(x, n, jnp.asarray(idx, jnp.int32))
    return pairwise_sum(materialize(x, jnp.minimum(n, 0))[idx], n)


@functools.partial(jax.jit, static_argnums=2)  # traced once per shape: many sums per program
def _pairwise_sum(x: jax.Array, n: jax.Array, host: bool) -> jax.Array:
    return _pairwise_host(x, n) if host else _pairwise_xla(x, n)


def _pairwise_xla(x: jax.Array, n: jax.Array) -> jax.Array:
    size = x.shape[0]
    n = jnp.clip(_as_count(n), 0, size)
    depth = _pw_max_depth(size)
    starts = n[None] * 0
    lengths = n[None]
    splits = []
    for _ in range(depth):
        split = lengths > PW_BLOCKSIZE
        n2 = (lengths >> 1) & ~7  # n2 = n / 2; n2 -= n2 % 8  (n >= 0)
        left_len = jnp.where(split, n2, lengths)
        right_start = starts + jnp.where(split, n2, lengths)
        right_len = jnp.where(split, lengths - n2, 0)
        starts = jnp.stack([starts, right_start], axis=1).reshape(-1)
        lengths = jnp.stack([left_len, right_len], axis=1).reshape(-1)
        splits.append(split)
    sums = _pw_leaf_sums(x, starts, lengths)
    for split in reversed(splits):
        pair = sums.reshape(-1, 2)
        sums = jnp.where(split, pair[:, 0] + pair[:, 1], pair[:, 0])
    total = sums[0]
    # ``0.0 + total``: XLA would fold the add, so spell out its only effect (-0.0 -> 0.0).
    return jnp.where(total == 0, jnp.zeros((), x.dtype), total)


# ------------------------------------------------------------------ mean / var / std


def _div_count(s: jax.Array, count: jax.Array) -> jax.Array:
    """``s.dtype.type(s / rcount)`` as in numpy/_core/_methods.py.

    ``rcount`` is an ``np.intp`` (not a Python int), so NEP 50 promotes float32 / intp to
    float64; the quotient is then cast back.  (Double rounding is harmless for division,
    but the float64 path also keeps counts >= 2**24 exact.)
    """
    f64 = _f64()
    return true_divide(s.astype(f64), count.astype(f64)).astype(s.dtype)


def np_mean(x: jax.Array, n: jax.Array | int) -> jax.Array:
    """``np.mean(x[:n])``, bit for bit (float32 and float64).

    Parameters
    ----------
    x : jax.Array
        1-D float array, shape ``(N,)``.
    n : int or jax.Array
        Number of valid leading elements.

    Returns
    -------
    jax.Array
        0-d array of ``x.dtype`` (NaN for ``n == 0``, like numpy's warning path).

    Notes
    -----
    numpy/_core/_methods.py ``_mean``: ``umr_sum`` (pairwise, input dtype) then
    ``ret.dtype.type(ret / rcount)``.
    """
    n = _as_count(n)
    return _div_count(pairwise_sum(x, n), n)


def np_var(x: jax.Array, n: jax.Array | int, ddof: int = 0) -> jax.Array:
    """``np.var(x[:n], ddof=ddof)``, bit for bit (float32 and float64).

    Notes
    -----
    numpy/_core/_methods.py ``_var``: ``arrmean = umr_sum(arr, keepdims=True)`` then
    ``true_divide(arrmean, rcount, out=arrmean, casting='unsafe')`` (float64 loop for
    float32 + intp, cast back); ``x = arr - arrmean``; ``square``; ``umr_sum``; divide by
    ``max(rcount - ddof, 0)`` the same way.  All elementwise work in the input dtype.
    """
    x = jnp.asarray(x)
    n = _as_count(n)
    mean = _div_count(pairwise_sum(x, n), n)
    dev = x - mean
    sq = fma_barrier(dev * dev)  # um.square; never fused into the sum
    return _div_count(pairwise_sum(sq, n), jnp.maximum(n - ddof, 0))


def np_std(x: jax.Array, n: jax.Array | int, ddof: int = 0) -> jax.Array:
    """``np.std(x[:n], ddof=ddof)``, bit for bit (float32 and float64).

    Notes
    -----
    numpy/_core/_methods.py ``_std``: ``ret.dtype.type(um.sqrt(ret))`` on ``_var``'s
    result, i.e. a correctly rounded sqrt in the input dtype.
    """
    return jnp.sqrt(np_var(x, n, ddof=ddof))


# ------------------------------------------------------------------------ percentile


def _percentile_from_sorted(
    s: jax.Array, n: jax.Array, q: float | jax.Array, has_nan: jax.Array
) -> jax.Array:
    """numpy's 'linear' quantile from order statistics ``s[:n]`` (ascending)."""
    dtype = s.dtype
    f64 = _f64()
    # numpy/lib/_function_base_impl.py ``percentile``: ``q = np.true_divide(q, 100)``
    # (float64).  A Python number is divided here in Python: identical IEEE division,
    # and XLA cannot rewrite it as a multiplication by 0.01.
    if isinstance(q, (int, float)):
        q64 = jnp.asarray(q / 100, f64)
    else:
        q64 = true_divide(jnp.asarray(q, f64), 100.0)
    # _QuantileMethods['linear']: ``(n - 1) * quantiles`` (float64).
    last = n - 1
    vi = fma_barrier(last.astype(f64) * q64)
    # _get_indexes: floor; indexes with ``vi >= n - 1`` are set to -1 (the maximum).
    prev = jnp.floor(vi)
    above = vi >= last.astype(f64)
    prev_f = jnp.where(above, -1.0, prev)
    i_prev = jnp.where(above, last, prev.astype(jnp.int32))
    i_next = jnp.where(above, last, prev.astype(jnp.int32) + 1)
    # _get_gamma: ``virtual_indexes - previous_indexes`` with the *modified* previous
    # index (so gamma = vi + 1 above the bounds; harmless since a == b there).
    gamma = vi - prev_f
    size = s.shape[0]
    a = s[jnp.clip(i_prev, 0, size - 1)]
    b = s[jnp.clip(i_next, 0, size - 1)]
    # ``_quantile(weak_q=True)`` (q a Python scalar, as in scVelo) does
    # ``gamma = float(gamma)``, so _lerp runs in the input dtype with a weak Python float:
    #   diff_b_a = b - a
    #   lerp = add(a, diff_b_a * t)
    #   subtract(b, diff_b_a * (1 - t), out=lerp, where=t >= 0.5)
    # (numpy/lib/_function_base_impl.py ``_lerp``).  ``t`` and ``1 - t`` (computed in
    # float64) are cast to the input dtype before the multiply (NEP 50).
    diff = b - a
    t = gamma.astype(dtype)
    omt = (1.0 - gamma).astype(dtype)
    lo = a + fma_barrier(diff * t)
    hi = b - fma_barrier(diff * omt)
    res = jnp.where(gamma >= 0.5, hi, lo)
    # Slices with a NaN return NaN (``result[slices_having_nans] = np.nan``); an empty
    # slice, where numpy raises, returns NaN too.
    bad = has_nan | (n <= 0)
    return jnp.where(bad, jnp.asarray(jnp.nan, dtype), res)


def _sort_call(x: jax.Array) -> jax.Array:
    from . import host_kernels

    name = host_kernels.register_sort(x.dtype)
    return jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(x.shape, x.dtype))(x)


@jax.custom_batching.custom_vmap
def _sort_host(x):
    return _sort_call(x[None])[0]


@_sort_host.def_vmap
def _sort_host_batched(axis_size, in_batched, x):
    if not in_batched[0]:
        return _sort_host(x), False
    return _sort_call(x.reshape(-1, x.shape[-1])).reshape(x.shape), True


def sort(x: jax.Array) -> jax.Array:
    """``jnp.sort`` of a 1-D float array (NaNs last, ``-0.0`` before ``0.0``). On the CPU
    backend the numba radix sort of :mod:`.host_kernels` as a custom call, one call per
    gene batch (XLA:CPU's sort is ~40x slower than numpy's); elsewhere ``jnp.sort``.
    Sorted values are the same either way (NaN payloads aside)."""
    x = jnp.asarray(x)
    return _sort_host(x) if _host_1d(x) else jnp.sort(x)


def np_percentile(x: jax.Array, n: jax.Array | int, q: float | jax.Array) -> jax.Array:
    """``np.percentile(x[:n], q)`` (method 'linear'), bit for bit.

    Parameters
    ----------
    x : jax.Array
        1-D float array, shape ``(N,)``.
    n : int or jax.Array
        Number of valid leading elements.
    q : float or jax.Array
        Percentile(s) in ``[0, 100]``; scalar or array (result broadcasts like ``q``).

    Returns
    -------
    jax.Array
        Dtype of ``x``.  This is numpy's result for a *Python* ``q`` (``weak_q``: the lerp
        runs in the input dtype).  numpy returns float64 for a float32 ``x`` when ``q`` is
        a numpy float64 scalar or array instead; cast ``x`` to float64 for that case.

    Notes
    -----
    numpy/lib/_function_base_impl.py ``_quantile``: virtual index ``(n - 1) * q / 100``,
    order statistics via ``partition`` and ``_lerp``.  Order statistics are taken from a
    sort with ``+inf`` padding.  Ties between ``-0.0`` and ``0.0`` may resolve to a zero
    of the other sign than numpy's introselect.
    """
    x = jnp.asarray(x)
    size = x.shape[0]
    n = jnp.clip(_as_count(n), 0, size)
    valid = jnp.arange(size) < n
    s = sort(jnp.where(valid, x, jnp.inf))
    has_nan = jnp.any(valid & jnp.isnan(x))
    return _percentile_from_sorted(s, n, q, has_nan)


def np_percentile_masked(x: jax.Array, mask: jax.Array, q: float | jax.Array) -> jax.Array:
    """``np.percentile(x[mask], q)`` without compaction (order statistics ignore order).

    See :func:`np_percentile` for parameters and dtype semantics.
    """
    x = jnp.asarray(x)
    mask = jnp.asarray(mask, bool)
    n = jnp.sum(mask, dtype=jnp.int32)
    s = sort(jnp.where(mask, x, jnp.inf))
    has_nan = jnp.any(mask & jnp.isnan(x))
    return _percentile_from_sorted(s, n, q, has_nan)


# -------------------------------------------------------------------------- linspace


def np_linspace(start: jax.Array, stop: jax.Array, num: int) -> jax.Array:
    """``np.linspace(start, stop, num)`` for two 0-d float arrays of the same dtype.

    Notes
    -----
    numpy/_core/function_base.py ``linspace`` (endpoint=True): ``delta = stop - start``,
    ``step = delta / div`` (``div = num - 1`` a Python int: stays in the input dtype),
    ``y = arange(num) * step`` -- or ``arange(num) / div * delta`` when ``step == 0``
    (gh-5437) -- then ``y += start`` and ``y[-1] = stop``.  All in the input dtype, so
    float32 endpoints give a float32 grid.
    """
    start = jnp.asarray(start)
    stop = jnp.asarray(stop, start.dtype)
    dtype = start.dtype
    div = num - 1
    y = jnp.arange(num, dtype=dtype)
    delta = stop - start
    if div <= 0:  # num in (0, 1): step is undefined, ``y = y * delta + start``
        return fma_barrier(y * delta) + start
    step = true_divide(delta, div)
    y = jnp.where(step == 0, fma_barrier(true_divide(y, div) * delta), fma_barrier(y * step))
    y = y + start
    return y.at[-1].set(stop)


# ------------------------------------------------------------------------------- KDE


def _kde_fit(x: jax.Array, n: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Bandwidth of ``scipy.stats.gaussian_kde(x[:n])`` (d = 1, Scott's rule).

    Returns ``(inv_cho, norm, weight, ok)``: the float64 reciprocal of the kernel's
    Cholesky factor, the kernel normalisation ``(2 pi)^(-1/2) / cho``, the data weight
    ``1 / n`` and whether scipy would construct the KDE without raising.
    """
    f64 = _f64()
    size = x.shape[0]
    valid = jnp.arange(size) < n
    xd = x.astype(f64)  # np.cov: ``dtype = np.result_type(m, np.float64)``
    # gaussian_kde.weights: ``ones(n) / n``; neff: ``1 / np_vecdot(w, w)``.
    w = 1.0 / n.astype(f64)
    wv = jnp.broadcast_to(w, (size,))
    # np.cov(dataset, rowvar=1, bias=False, aweights=w) (numpy/lib/_function_base_impl.py):
    #   avg, w_sum = average(X, axis=1, weights=w, returned=True)
    #       scl = w.sum();  avg = np.multiply(X, w).sum(axis) / scl   (pairwise sums)
    #   fact = w_sum - ddof * sum(w * aweights) / w_sum               (ddof = 1)
    #   X -= avg;  c = dot(X, (X * w).T);  c *= np.true_divide(1, fact)
    # The three pairwise sums share one (vmapped) reduction tree.  They are exact, so the
    # "constant data" decision below (avg == x exactly?) is numpy's.
    rows = jnp.stack([wv, fma_barrier(wv * wv), fma_barrier(xd * w)])
    scl, ww, xw = jax.vmap(pairwise_sum, in_axes=(0, None))(rows, n)
    avg = xw / scl
    fact = scl - ww / scl
    fact = jnp.where(fact <= 0, 0.0, fact)
    dev = jnp.where(valid, xd - avg, 0.0)
    # ``dot`` is BLAS ddot (OpenBLAS picks its kernel per CPU at run time, with FMA): its
    # order is not portable, so any order will do -- last-ulp differences only.
    cov = jnp.sum(dev * fma_barrier(dev * w))
    cov = cov * (1.0 / fact)
    # scipy raises (a ValueError, LinAlgError included) for n < 2 ("`dataset` input
    # should have multiple elements") and when the Cholesky factorisation fails
    # (cov == 0: all values equal *and* the weighted mean reproduces them exactly; a
    # constant array whose float64 mean is off by an ulp does NOT raise) or when
    # scipy.linalg.cholesky's check_finite sees NaN/inf.
    ok = (n >= 2) & (cov > 0) & jnp.isfinite(cov)
    # _compute_covariance: factor = neff ** (-1 / (d + 4)); cho_cov = cholesky(cov) * factor
    # (dpotrf of a 1x1 matrix is sqrt).  neff uses BLAS ddot in scipy too (np.vecdot).
    factor = jnp.power(1.0 / ww, -1.0 / 5)
    cho = jnp.sqrt(cov) * factor
    # gaussian_kernel_estimate: ``solve_triangular(cho_cov, points.T, lower=True)``;
    # OpenBLAS trsm multiplies by the reciprocal of the diagonal (verified: equals
    # ``points * (1 / c)`` bitwise, not ``points / c``).  norm: ``norm /= cho_cov[i, i]``.
    inv_cho = 1.0 / cho
    norm = _KDE_NORM_1D / cho
    return inv_cho, norm, w, ok


def gaussian_kde_eval(x: jax.Array, n: jax.Array | int, grid: jax.Array) -> jax.Array:
    """``scipy.stats.gaussian_kde(x[:n])(grid)`` (scipy 1.17.1, 1-D, Scott's rule).

    Parameters
    ----------
    x : jax.Array
        1-D float32 or float64 data, shape ``(N,)``.
    n : int or jax.Array
        Number of valid leading elements.
    grid : jax.Array
        1-D evaluation points, shape ``(M,)``.

    Returns
    -------
    jax.Array
        Shape ``(M,)``, float64 -- also for float32 input: scipy's output dtype is
        ``np.common_type(covariance, points)`` and the covariance is float64 (``np.cov``
        promotes), so the Cython kernel runs in double.  All-NaN where scipy raises
        (``n < 2`` or a singular covariance, see ``_kde_fit``).

    Notes
    -----
    scipy/stats/_kde.py (``gaussian_kde.__init__``, ``_compute_covariance``,
    ``evaluate``) and scipy/stats/_stats.pyx (``gaussian_kernel_estimate``)::

        points_ = solve_triangular(cho_cov, points.T).T; xi_ = ...
        norm = pow(2 pi, -d / 2.) / cho_cov[0, 0]
        for i: for j: r = points_[i] - xi_[j]; arg = exp(-(r * r) / 2.) * norm
                      estimate[j] += values_[i] * arg

    mirrored operation by operation.  Not bitwise: ``exp`` and ``pow`` are glibc's in
    scipy and XLA's here (<= 1 ulp apart), the two ``ddot`` reductions are BLAS's, and
    the sum over data points is a tree instead of sequential.  Typical agreement is a
    few ulp; worst case ~1e-13 relative where the exponent is large (tails).
    """
    est, ok = _kde_eval(x, n, grid)
    return jnp.where(ok, est, jnp.nan)


def _kde_eval(x: jax.Array, n: jax.Array | int, grid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """:func:`gaussian_kde_eval` without the NaN masking, plus the ``ok`` flag."""
    f64 = _f64()
    x = jnp.asarray(x)
    size = x.shape[0]
    n = jnp.clip(_as_count(n), 0, size)
    inv_cho, norm, w, ok = _kde_fit(x, n)
    valid = jnp.arange(size) < n
    xs = fma_barrier(x.astype(f64) * inv_cho)
    gs = fma_barrier(jnp.asarray(grid).astype(f64) * inv_cho)
    r = xs[:, None] - gs[None, :]
    arg = fma_barrier(r * r)
    kern = fma_barrier(jnp.exp(-arg / 2.0) * norm)
    terms = jnp.where(valid[:, None], fma_barrier(w * kern), 0.0)
    return jnp.sum(terms, axis=0), ok


# ------------------------------------------------------------------------ bimodality


def test_bimodality(
    x: jax.Array, n: jax.Array | int, bins: int = 30
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Port of ``scvelo.tools.utils.test_bimodality(x[:n], bins, kde=True)`` (0.3.4).

    Parameters
    ----------
    x : jax.Array
        1-D float32 or float64 data, shape ``(N,)`` (scVelo passes float32 moments).
    n : int or jax.Array
        Number of valid leading elements.
    bins : int, default 30
        Grid size (static).

    Returns
    -------
    t_stat : jax.Array
        float64 scalar.
    p_val : jax.Array
        float64 scalar, ``norm.sf(t_stat)``.
    means : jax.Array
        Shape ``(2,)``, dtype of ``x`` (the grid dtype).
    ok : jax.Array
        False where upstream raises ``ValueError`` (``n < 2``, or ``gaussian_kde``'s
        singular covariance: all values equal and the float64 weighted mean reproduces
        them exactly, e.g. all zeros).  scVelo then uses ``pval = 1`` and
        ``means = [0, 0]``; the other outputs are meaningless (NaN) in that case.

    Notes
    -----
    Upstream (scvelo/tools/utils.py)::

        lb, ub = np.min(x), np.percentile(x, 99.9)
        grid = np.linspace(lb, ub if ub <= lb else np.max(x), bins)
        kde_grid = gaussian_kde(x)(grid)
        idx = int(bins / 2) - 2; idx += np.argmin(kde_grid[idx:idx + 4])
        peak_0 = kde_grid[:idx].argmax(); peak_1 = kde_grid[idx:].argmax()
        kde_peak = kde_grid[idx:][peak_1]; kde_mid = kde_grid[idx:].mean()
        t_stat = (kde_peak - kde_mid) / np.clip(np.std(kde_grid) / np.sqrt(bins), 1, None)
        p_val = norm.sf(t_stat)
        means = [(grid_0[peak_0] + grid_0[min(peak_0 + 1, len(grid_0) - 1)]) / 2, ...]

    ``grid`` is bitwise numpy's; ``kde_grid`` is within ~1e-13 relative of scipy's (see
    :func:`gaussian_kde_eval`), so ``argmin``/``argmax`` match except on near-ties;
    ``norm.sf`` is ``jax.scipy.stats.norm.sf`` (<= ~2e-15 relative to scipy's ``ndtr``;
    XLA flushes results below ~2.2e-308 to 0 where scipy returns subnormals).
    """
    f64 = _f64()
    x = jnp.asarray(x)
    size = x.shape[0]
    n = jnp.clip(_as_count(n), 0, size)
    valid = jnp.arange(size) < n
    s = sort(jnp.where(valid, x, jnp.inf))
    has_nan = jnp.any(valid & jnp.isnan(x))
    lb = s[0]
    mx = s[jnp.maximum(n - 1, 0)]
    ub = _percentile_from_sorted(s, n, 99.9, has_nan)
    grid = np_linspace(lb, jnp.where(ub <= lb, ub, mx), bins)
    kde, ok = _kde_eval(x, n, grid)
    t_stat, p_val, means = bimodality_from_kde(kde, grid)
    nan = jnp.asarray(jnp.nan, f64)
    return (
        jnp.where(ok, t_stat, nan),
        jnp.where(ok, p_val, nan),
        jnp.where(ok, means, jnp.asarray(jnp.nan, means.dtype)),
        ok,
    )


test_bimodality.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def bimodality_from_kde(kde: jax.Array, grid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The part of :func:`test_bimodality` after ``kde_grid = gaussian_kde(x)(grid)``.

    Bitwise equal to upstream given the same ``kde`` (float64) and ``grid``, except
    ``p_val`` (``jax.scipy.stats.norm.sf``, ~1e-15 relative to scipy).

    Parameters
    ----------
    kde : jax.Array
        KDE values on the grid, shape ``(bins,)``.
    grid : jax.Array
        Evaluation grid, shape ``(bins,)``.

    Returns
    -------
    t_stat, p_val : jax.Array
        float64 scalars.
    means : jax.Array
        Shape ``(2,)``, grid dtype.
    """
    f64 = _f64()
    bins = kde.shape[0]
    idx0 = int(bins / 2) - 2
    idx = idx0 + jnp.argmin(kde[idx0 : idx0 + 4]).astype(jnp.int32)
    pos = jnp.arange(bins, dtype=jnp.int32)
    neg = jnp.asarray(-jnp.inf, f64)
    peak_0 = jnp.argmax(jnp.where(pos < idx, kde, neg)).astype(jnp.int32)
    tail = kde[jnp.minimum(idx + pos, bins - 1)]  # kde_grid[idx:], padded
    n_tail = bins - idx
    peak_1 = jnp.argmax(jnp.where(pos < n_tail, tail, neg)).astype(jnp.int32)
    kde_peak = tail[peak_1]
    kde_mid = np_mean(tail, n_tail)
    sd = np_std(kde, bins)
    # np.clip(a, 1, None) -> um.maximum(a, 1): NaN propagates (jnp.maximum does too).
    denom = jnp.maximum(true_divide(sd, np.sqrt(bins)), 1.0)
    t_stat = true_divide(kde_peak - kde_mid, denom)
    p_val = jax.scipy.stats.norm.sf(t_stat)

    # means: float32 + float32 then / 2 (Python int, NEP 50) in the grid dtype.
    m0 = divide(grid[peak_0] + grid[jnp.minimum(peak_0 + 1, idx - 1)], 2)
    m1 = divide(grid[idx + peak_1] + grid[idx + jnp.minimum(peak_1 + 1, n_tail - 1)], 2)
    return t_stat, p_val, jnp.stack([m0, m1])
