"""Compiled CPU kernels for the steps of the time assignment that XLA:CPU runs slowly.

``adjust_increments``, row sorts (percentiles, KDE grid), the connectivity smoothing,
the projection's nearest grid point and numpy's pairwise summation run as numba functions
behind XLA custom calls on the CPU backend; the GPU runs the XLA versions
(``JAXVELO_HOST_KERNELS=0`` forces them here), which give the same values
(``tests/test_schedule.py``). ``exp``/``log`` call numpy's own loops (see "numpy's own exp
and log" below).

XLA's CPU sort is ~40x slower than numpy's, and ``adjust_increments`` sorts the assigned
times twice and the gaps once per evaluation. On the CPU backend it therefore runs as a
numba-compiled function registered as an XLA custom call (``jax.ffi``): no Python, no
GIL, one call per gene batch, and -- unlike a Python callback -- the compiled program
only refers to the kernel by name, so it can be serialised and reused across processes
(:mod:`jaxvelo.core.cache`).

The kernel is a faithful port of ``_em_model_utils.adjust_increments`` (utils ~127-157)
*including numpy's dtype flow*, so that results are bitwise numpy's (tested against
upstream's function in ``tests/test_kernels.py``):

- ``np.diff(tau_ord, prepend=0)`` concatenates an int64 ``0`` with ``tau_ord``: the gaps
  are float64 even for float32 times;
- ``np.percentile(gaps, 99.5)``: numpy's 'linear' method, ``_lerp`` with its
  ``t >= 0.5`` branch, in float64;
- ``tau_new[tau >= ti] -= dti``: comparison in the times' dtype, subtraction of a float64
  scalar computed in float64 and rounded to the times' dtype, sequentially in gap order.

Most genes need no sort at all (:func:`_adjust_bucketed`): the gaps that decide the
percentile and the removals are the ones between buckets of a linear-time bucketing, when
enough of them exceed every gap inside a bucket (checked; else the kernel sorts).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading

import numba as nb
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

# Imported lazily (by :func:`jaxvelo.core.assign.adjust_increments` on the CPU backend):
# numba is only needed there. Module-level functions so that numba's on-disk cache hits.


_SIGN = np.uint64(1) << np.uint64(63)
_EXP64 = np.uint64(0x7FF0000000000000)  # +inf; larger magnitudes are NaNs
_ONES64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_SIGN32 = np.uint64(1) << np.uint64(31)
_EXP32 = np.uint64(0x7F800000)
_ONES32 = np.uint64(0xFFFFFFFF)


@nb.njit(cache=True, nogil=True)
def _lsd(src, dst):
    """LSD radix sort of the unsigned keys ``src`` (8-bit digits; passes whose digit is
    the same for every key are skipped); ``dst`` is scratch of the same size. Returns
    the array (``src`` or ``dst``) holding the sorted keys."""
    n = src.shape[0]
    counts = np.zeros((8, 256), np.int64)
    for i in range(n):
        k = src[i]
        for p in range(8):
            counts[p, (k >> np.uint64(8 * p)) & np.uint64(255)] += 1
    pos = np.empty(256, np.int64)
    for p in range(8):
        sh = np.uint64(8 * p)
        if n == 0 or counts[p, (src[0] >> sh) & np.uint64(255)] == n:
            continue
        acc = 0
        for d in range(256):
            pos[d] = acc
            acc += counts[p, d]
        for i in range(n):
            k = src[i]
            d = (k >> sh) & np.uint64(255)
            dst[pos[d]] = k
            pos[d] += 1
        src, dst = dst, src
    return src


@nb.njit(cache=True, nogil=True)
def _sort_patterns(bits, sign, exp, ones):
    """Bit patterns of IEEE floats (zero-extended to uint64; ``sign``/``exp``: the sign bit
    and +inf's pattern, ``ones``: all bits of the width) in ``np.sort`` order. Keys map
    IEEE order to unsigned order (negative: all bits flipped; else the sign bit set) with
    integer operations only -- XLA runs custom calls with denormals flushed, so no
    floating-point conversion may touch the values. NaNs sort last as in numpy (their
    payload is not kept: callers treat any NaN alike). Equal values are indistinguishable
    in the output except ``-0.0`` before ``+0.0``, which compare equal in every later use.
    """
    n = bits.shape[0]
    keys = np.empty(n, np.uint64)
    for i in range(n):
        u = np.uint64(bits[i])
        if (u & ~sign) > exp:  # NaN
            keys[i] = ones
        elif u & sign:
            keys[i] = ~u & ones
        else:
            keys[i] = u | sign
    s = _lsd(keys, np.empty(n, np.uint64))
    for i in range(n):
        k = s[i]
        s[i] = k & ~sign if k & sign else ~k & ones
    return s


@nb.njit(cache=True, nogil=True)
def _sort64(x):
    """``np.sort(x)`` for float64 ``x`` by the LSD radix sort (:func:`_lsd`, several times
    faster than numba's quicksort on the unpredictable orders of assigned times) of the
    bit patterns (:func:`_sort_patterns`)."""
    return _sort_patterns(x.view(np.uint64), _SIGN, _EXP64, _ONES64).view(np.float64)


@nb.njit(cache=True, nogil=True)
def _sort32(x):
    """``np.sort(x)`` for float32 ``x`` (:func:`_sort64` on the 32-bit patterns)."""
    s = _sort_patterns(x.view(np.uint32), _SIGN32, _EXP32, _ONES32)
    return s.astype(np.uint32).view(np.float32)


def _sort_row(x):
    """``np.sort`` of one float row on its bit patterns (dispatched on the dtype)."""
    return np.sort(x)


@overload(_sort_row)
def _sort_row_impl(x):
    if x.dtype == types.float32:
        return lambda x: _sort32(x)
    return lambda x: _sort64(x)


@nb.njit(cache=True, nogil=True)
def _upper_order_stats(x, k):
    """``(s[k], s[k + 1])`` of ``s = np.sort(x)`` (NaN-free ``x``, ``k + 1 < len(x)``)
    without sorting: one pass keeping the ``len(x) - k`` largest values in a small sorted
    buffer (the 99.5th percentile needs the top ~0.5%)."""
    n = x.shape[0]
    m = n - k
    buf = np.empty(m, np.float64)
    for i in range(m):  # insertion sort of the first m values
        v = x[i]
        j = i
        while j > 0 and buf[j - 1] > v:
            buf[j] = buf[j - 1]
            j -= 1
        buf[j] = v
    for i in range(m, n):
        v = x[i]
        if v > buf[0]:  # v enters the top m, buf[0] leaves
            j = 1
            while j < m and buf[j] < v:
                buf[j - 1] = buf[j]
                j += 1
            buf[j - 1] = v
    return buf[0], buf[1]


@nb.njit(cache=True, nogil=True)
def _percentile995(x):
    # np.percentile(x, 99.5) for float64 x without NaN (numpy 2 'linear' method:
    # numpy/lib/_function_base_impl.py _quantile, _get_indexes, _get_gamma, _lerp)
    n = x.shape[0]
    q = 99.5 / 100
    vi = (n - 1) * q
    prev = np.floor(vi)
    if vi >= n - 1:  # above bounds: previous = next = the maximum, gamma = vi + 1
        a = np.max(x)
        b = a
        gamma = vi - (-1.0)
    else:
        a, b = _upper_order_stats(x, int(prev))
        gamma = vi - prev
    return _lerp(a, b, gamma)


@nb.njit(cache=True, nogil=True)
def _lerp(a, b, gamma):
    # numpy's _lerp (numpy/lib/_function_base_impl.py), float64
    diff = b - a
    if gamma >= 0.5:
        return b - diff * (1 - gamma)
    return a + diff * gamma


@nb.njit(cache=True, nogil=True)
def _gaps(x):
    # np.sort(x), np.diff(sorted, prepend=0) -- float64 (int64 prepend promotes)
    s = _sort_row(x)
    d = np.empty(s.shape[0], np.float64)
    prev = 0.0
    for i in range(s.shape[0]):
        d[i] = np.float64(s[i]) - prev
        prev = np.float64(s[i])
    return s, d


@nb.njit(cache=True, nogil=True)
def _subtract(out, vals, mask, s, d, ub, r32=False):
    # for i in where(d > ub): out[mask & (vals >= s[i])] -= d[i]   (sequential, in order)
    # Cell by cell: the big gaps' thresholds s[i] ascend, so a cell's subtractions are
    # those of a prefix of them, applied in the same ascending order (each rounded to
    # out's dtype, and to float32 with r32: float64 out holding upstream's float32 times)
    # -- the same values, in O(cells + subtractions) instead of O(cells x big gaps).
    big = np.flatnonzero(d > ub)
    k = big.shape[0]
    if k == 0:
        return
    thr = s[big]
    dd = d[big]
    for c in range(vals.shape[0]):
        if mask[c]:
            v = vals[c]
            i = 0
            while i < k and v >= thr[i]:
                out[c] = np.float64(out[c]) - dd[i]
                if r32:
                    out[c] = np.float32(out[c])
                i += 1


# The sort-free path below is branch-free where the data decide (masks, empty buckets):
# on real assigned times those branches are unpredictable and cost more than the work.


@nb.njit(cache=True, nogil=True)
def _compact(x, mask, dst):
    """``dst[:count] = x[mask]`` as float64 (``dst`` at least as long as ``x``)."""
    c = 0
    for i in range(x.shape[0]):
        dst[c] = np.float64(x[i])
        c += mask[i]
    return c


@nb.njit(cache=True, nogil=True)
def _cross_gaps(v, n, bmin, bmax, thr, gap):
    """The gaps of ``np.diff(np.sort(v[:n]), prepend=0)`` that cross buckets, unsorted.

    The values go to n buckets by a map that does not decrease with the value. In sorted
    order the buckets follow each other, so the gap from one non-empty bucket to the next
    is exactly ``min(next) - max(previous)`` (the first gap is ``min - 0``) and every other
    gap lies inside a bucket, where it is at most that bucket's ``max - min``. Writes the
    crossing gaps and the sorted values ending them, in ascending order, to ``gap``/``thr``
    (``bmin``/``bmax``: scratch). Returns ``(ok, count, bound, lo, scale)`` with the bound
    on all other gaps and the map's parameters (bucket ``min(int((x - lo) * scale), n - 1)``);
    ``ok`` is False for NaN or infinite values or a degenerate range."""
    if n == 0:
        return True, 0, 0.0, 0.0, 0.0
    lo, hi, nan = v[0], v[0], 0.0
    for i in range(n):
        lo = min(lo, v[i])
        hi = max(hi, v[i])
        nan += v[i] * 0.0  # NaN for a NaN or an infinity
    scale = n / (hi - lo) if hi > lo else 0.0
    if nan != 0.0 or not np.isfinite(scale):
        return False, 0, 0.0, 0.0, 0.0
    bmin[:n] = np.inf
    bmax[:n] = -np.inf
    for i in range(n):
        x = v[i]
        j = min(int((x - lo) * scale), n - 1)  # does not decrease with x
        bmin[j] = min(bmin[j], x)
        bmax[j] = max(bmax[j], x)
    c = 0
    bound = 0.0
    prev = 0.0  # prepend=0
    for j in range(n):
        a, b = bmin[j], bmax[j]
        full = a <= b
        thr[c] = a  # kept only where the bucket is not empty
        gap[c] = a - prev
        c += full
        bound = max(bound, b - a)  # -inf for an empty bucket
        prev = b if full else prev
    return True, c, bound, lo, scale


@nb.njit(cache=True, nogil=True)
def _subtract_gaps(out, vals, mask, thr, gap, count, ub, lo, scale, n, cnt, big, r32=False):
    # for i in where(gap > ub): out[mask & (vals >= thr[i])] -= gap[i]   (in order)
    # thr/gap/lo/scale/n from _cross_gaps on the n values vals[mask]. Each threshold is the
    # minimum of a bucket of its monotone map j(x), so for a value x of the group
    # x >= thr[i] exactly when j(x) >= j(thr[i]) (a value in a later bucket exceeds every
    # value of an earlier one; a bucket's values are >= its minimum). With cnt[j + 1] the
    # number of big gaps ending in buckets <= j, a cell's subtractions are the first
    # cnt[j(x) + 1] big gaps, applied in the same ascending order, each rounded to out's
    # dtype (and to float32 with r32, see _subtract): one pass over the cells instead of
    # one per big gap (5-30 of them at 50,000 cells). cnt (n + 1 int64) and big: scratch.
    k = 0
    cnt[: n + 1] = 0
    for i in range(count):
        if gap[i] > ub:
            big[k] = gap[i]
            k += 1
            cnt[min(int((thr[i] - lo) * scale), n - 1) + 1] += 1
    if k == 0:
        return
    for j in range(n):
        cnt[j + 1] += cnt[j]
    for c in range(vals.shape[0]):
        on = mask[c]
        t = (np.float64(vals[c]) - lo) * scale if on else 0.0
        m = cnt[min(int(t), n - 1) + 1] if on else 0
        for i in range(m):
            out[c] = np.float64(out[c]) - big[i]
            if r32:
                out[c] = np.float32(out[c])


@nb.njit(cache=True, nogil=True)
def _adjust_bucketed(out, tau, on, out_, tau_, off, scratch, r32=False):
    """``_adjust``'s result for one gene from the crossing gaps alone (:func:`_cross_gaps`)
    when that is provably exact; returns False (outputs untouched) otherwise.

    With N gaps in all, the 99.5th percentile interpolates the order statistics k and k+1
    (k = floor(0.995 (N - 1))): if at least N - k crossing gaps are >= the bound on the
    others, the top N - k gaps of all are the top N - k crossing gaps, so the percentile is
    theirs; and every other gap is <= bound <= percentile <= 3 * percentile, so the gaps
    that are removed (> 3 * percentile) are all crossing gaps too -- the same values and
    subtractions, in the same order, as with the full sort. Holds unless the values are
    very clumped (then the kernel sorts). ``scratch``: float64 (9, cells + 1); ``r32``:
    round the 'on' group's subtractions to float32 (see :func:`_subtract`)."""
    va, vb, bmin, bmax, ta, ga, tb, gb, cross = scratch
    na = _compact(tau, on, va)
    nb_ = _compact(tau_, off, vb)
    n_all = na + nb_
    if n_all < 2:
        return False
    ok_a, ca, bound_a, lo_a, scale_a = _cross_gaps(va, na, bmin, bmax, ta, ga)
    ok_b, cb, bound_b, lo_b, scale_b = _cross_gaps(vb, nb_, bmin, bmax, tb, gb)
    if not (ok_a and ok_b):
        return False
    bound = max(bound_a, bound_b)
    vi = (n_all - 1) * (99.5 / 100)
    prev = np.floor(vi)
    need = n_all - int(prev)  # order statistics k..N-1 (>= 2 as vi < N - 1)
    cross[:ca] = ga[:ca]
    cross[ca : ca + cb] = gb[:cb]
    count = 0
    for i in range(ca + cb):
        count += cross[i] >= bound
    if count < need:
        return False
    lo, hi = _upper_order_stats(cross[: ca + cb], ca + cb - need)
    ub = 3 * _lerp(lo, hi, vi - prev)
    cnt = bmin.view(np.int64)  # bmin/bmax are free again: scratch of the subtractions
    _subtract_gaps(out, tau, on, ta, ga, ca, ub, lo_a, scale_a, na, cnt, bmax, r32)
    _subtract_gaps(out_, tau_, off, tb, gb, cb, ub, lo_b, scale_b, nb_, cnt, bmax)
    return True


@nb.njit(cache=True, nogil=True)
def _adjust(tau, on, tau_, off, out, out_, r32):
    # compute_divergence ~294-300 per gene (row): both groups share the threshold; r32[g]:
    # gene g's 'on' times are upstream's float32 array (see _subtract)
    scratch = np.empty((9, tau.shape[1] + 1), np.float64)
    for g in range(tau.shape[0]):
        out[g, :] = tau[g, :]
        out_[g, :] = tau_[g, :]
        if _adjust_bucketed(out[g], tau[g], on[g], out_[g], tau_[g], off[g], scratch, r32[g]):
            continue
        a = tau[g][on[g]]
        b = tau_[g][off[g]]
        if a.shape[0] == 0 and b.shape[0] == 0:
            continue
        sa, da = _gaps(a)
        sb, db = _gaps(b)
        if a.shape[0] > 0 and b.shape[0] > 0:
            allg = np.concatenate((da, db))
        elif a.shape[0] > 0:
            allg = da
        else:
            allg = db
        if np.any(np.isnan(allg)):
            continue  # np.percentile -> nan: no gap exceeds it
        ub = 3 * _percentile995(allg)
        _subtract(out[g], tau[g], on[g], sa, da, ub, r32[g])
        _subtract(out_[g], tau_[g], off[g], sb, db, ub)


@intrinsic
def _ptr(typingctx, addr):
    """An address (int64) as a ``void*``."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(types.int64), codegen


# XLA typed FFI (xla/ffi/api/c_api.h, API 0.x), read as 8-byte words on 64-bit hosts:
#   XLA_FFI_CallFrame: struct_size, extension_start, api, ctx, stage (enum, padded),
#     args {struct_size, extension_start, size, types, args}  (words 5..9),
#     rets {struct_size, extension_start, size, types, rets}  (words 10..14), attrs, future
#   XLA_FFI_Buffer: struct_size, extension_start, dtype (enum, padded), data, rank, dims
#   XLA_FFI_Extension_Base: struct_size, type (enum, padded), next
#   XLA_FFI_Metadata_Extension: XLA_FFI_Extension_Base, metadata
#   XLA_FFI_Metadata: struct_size, api_version {struct_size, extension_start,
#     major (int32), minor (int32)}, traits (uint32), state_type_id
_FFI_MAJOR, _FFI_MINOR = 0, 3  # the headers this handler follows
_EXT_METADATA, _STAGE_EXECUTE = 1, 3


@nb.njit(cache=True, nogil=True)
def _ffi_frame(frame):
    """(is_execute, tau, on, tau_, off, out, out_, G, n) addresses of a call frame; fills
    the metadata extension (API version, no traits) when XLA asks for it."""
    f = nb.carray(frame, (15,), dtype=np.int64)
    if f[1] != 0:
        ext = nb.carray(_ptr(f[1]), (4,), dtype=np.int64)
        if (ext[1] & 0xFFFFFFFF) == _EXT_METADATA:
            md = _ptr(ext[3])
            w = nb.carray(md, (5,), dtype=np.int64)
            h = nb.carray(md, (10,), dtype=np.int32)
            w[1] = 28  # XLA_FFI_Api_Version_STRUCT_SIZE
            w[2] = 0
            h[6] = _FFI_MAJOR
            h[7] = _FFI_MINOR
            h[8] = 0  # traits
            return False, f
    return (f[4] & 0xFFFFFFFF) == _STAGE_EXECUTE, f


@intrinsic
def _typed_ptr(typingctx, addr, like):
    """An address (int64) as a pointer to ``like``'s type."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return types.CPointer(like)(types.int64, like), codegen


@nb.njit(cache=True, nogil=True)
def _ffi_array(list_addr, i, like):
    """Buffer ``i`` of an args/rets list as a (genes, cells) array of ``like``'s type."""
    bufs = nb.carray(_ptr(list_addr), (i + 1,), dtype=np.int64)
    b = nb.carray(_ptr(bufs[i]), (6,), dtype=np.int64)
    dims = nb.carray(_ptr(b[5]), (2,), dtype=np.int64)
    return nb.carray(_typed_ptr(b[3], like), (dims[0], dims[1]))


@nb.njit(cache=True, nogil=True)
def _ffi_vector(list_addr, i, like):
    """Buffer ``i`` of an args/rets list as a rank-1 array of ``like``'s type."""
    bufs = nb.carray(_ptr(list_addr), (i + 1,), dtype=np.int64)
    b = nb.carray(_ptr(bufs[i]), (6,), dtype=np.int64)
    dims = nb.carray(_ptr(b[5]), (1,), dtype=np.int64)
    return nb.carray(_typed_ptr(b[3], like), (dims[0],))


@nb.njit(cache=True, nogil=True)
def _ffi_flat(list_addr, i, like):
    """Buffer ``i`` of an args/rets list, any rank, as a flat array of ``like``'s type."""
    bufs = nb.carray(_ptr(list_addr), (i + 1,), dtype=np.int64)
    b = nb.carray(_ptr(bufs[i]), (6,), dtype=np.int64)
    size = 1
    if b[4] > 0:
        dims = nb.carray(_ptr(b[5]), (b[4],), dtype=np.int64)
        for d in dims:
            size *= d
    return nb.carray(_typed_ptr(b[3], like), (size,))


@nb.njit(cache=True, nogil=True)
def _ffi_run(frame, like):
    # operands tau, on (bool), tau_, off (bool) -- (genes, cells) with tau's dtype =
    # like's -- and r32 (genes,) bool; results tau_new, tau_new_. Returns NULL (success).
    run, f = _ffi_frame(frame)
    if run:
        no = np.bool_(False)
        _adjust(_ffi_array(f[9], 0, like), _ffi_array(f[9], 1, no),
                _ffi_array(f[9], 2, like), _ffi_array(f[9], 3, no),
                _ffi_array(f[14], 0, like), _ffi_array(f[14], 1, like),
                _ffi_vector(f[9], 4, no))  # fmt: skip
    return _ptr(0)


def _ffi_f64(frame):  # a cfunc: _cfunc
    return _ffi_run(frame, np.float64(0))


def _ffi_f32(frame):  # a cfunc: _cfunc
    return _ffi_run(frame, np.float32(0))


@nb.njit(cache=True, nogil=True)
def _ffi_sort_run(frame, like):
    # operand x, result sorted x, both (rows, n) of like's dtype; np.sort along the last
    # axis on the bit patterns (no float conversion: see _sort64)
    run, f = _ffi_frame(frame)
    if run:
        x, out = _ffi_array(f[9], 0, like), _ffi_array(f[14], 0, like)
        for g in range(x.shape[0]):
            out[g, :] = _sort_row(x[g])
    return _ptr(0)


def _ffi_sort_f64(frame):  # a cfunc: _cfunc
    return _ffi_sort_run(frame, np.float64(0))


def _ffi_sort_f32(frame):  # a cfunc: _cfunc
    return _ffi_sort_run(frame, np.float32(0))


# --- smoothing: connectivities.dot(res.T).T ------------------------------------------

_SMOOTH_BLOCK = 16  # columns per pass: cells x 16 float64 is ~470 KB at 3696 cells (in L2)
_SMOOTH_ALIGN = 128  # bytes: a row of 16 float64 (two cache lines, an adjacent pair)


@contextlib.contextmanager
def _slp_vectorized():
    """Compile with LLVM's SLP vectorizer, which numba leaves off by default
    (``numba.core.config.SLP_VECTORIZE``): it turns the 16 independent accumulators of
    :func:`_smooth_rows` into vector registers (~3x faster). It only packs identical
    per-lane operations (no reassociation, no contraction), so results are unchanged."""
    old = nb.config.SLP_VECTORIZE
    nb.config.SLP_VECTORIZE = 1
    try:
        yield
    finally:
        nb.config.SLP_VECTORIZE = old


def _madd(s, a, x):
    """``(s[0] + a * x[0], ...)`` for the 16 or 8 sums of a smoothing block (numba only)."""
    raise NotImplementedError("compiled by numba only (see _madd_impl)")


with _slp_vectorized():
    # One term more of W sums at once: W separate products and additions (no contraction,
    # no reassociation), which the SLP vectorizer packs into vector registers; inlined, so
    # a kernel's sums stay in registers across its loop.
    @nb.njit(cache=True, nogil=True, inline="always")
    def _madd16(s, a, x):  # (s[0] + a * x[0], ..., s[15] + a * x[15])
        # fmt: off
        return (
            s[0] + a * x[0], s[1] + a * x[1], s[2] + a * x[2], s[3] + a * x[3], s[4] + a * x[4],
            s[5] + a * x[5], s[6] + a * x[6], s[7] + a * x[7], s[8] + a * x[8], s[9] + a * x[9],
            s[10] + a * x[10], s[11] + a * x[11], s[12] + a * x[12], s[13] + a * x[13],
            s[14] + a * x[14], s[15] + a * x[15],
        )
        # fmt: on

    @nb.njit(cache=True, nogil=True, inline="always")
    def _madd8(s, a, x):  # _madd16 for 8 sums
        # fmt: off
        return (
            s[0] + a * x[0], s[1] + a * x[1], s[2] + a * x[2], s[3] + a * x[3], s[4] + a * x[4],
            s[5] + a * x[5], s[6] + a * x[6], s[7] + a * x[7],
        )
        # fmt: on

    @overload(_madd, inline="always")
    def _madd_impl(s, a, x):
        # the width is the sums tuple's length, known when the caller is compiled
        return {16: _madd16.py_func, 8: _madd8.py_func}[s.count]

    @nb.njit(cache=True, nogil=True)
    def _smooth_rows(t, ptr, idx, val, out, zero):
        # scipy's csr_matvecs (sparsetools/csr.h) for every row and W = len(zero) columns:
        # y = 0; y += a * x over a row's entries in storage order, in the upcast dtype of
        # (float32 data, x) -- here t's dtype, since val is float32. t holds the columns
        # cells-first (cells x W), out takes the sums (W x cells). W is 16, or 8 for a last
        # block of 1-8 columns: the kernel's cost goes with the cache lines it gathers, and
        # a 16-wide copy read two per neighbour for any remainder. One row at a time, in the
        # cells' order: the out-of-order core overlaps a row's loads and products with the
        # previous row's additions by itself. Measured alone (AMD EPYC VM, 16 columns, in
        # one process; the same kernel's time varied up to 1.4x between processes): as
        # fast as two rows in one loop (two chains of additions, 4b705bb) on the pancreas
        # graph (1.85-2.8 against 1.9-2.7 ns per entry), faster at 50,000 cells (5.7
        # against 6.1); four rows in one loop were slower at both sizes. A store loop over
        # a runtime width (w <= W columns) instead of out's W rows cost ~12%; reordering
        # the rows lost the locality of adjacent cells' neighbours (docs/design.md).
        for i in range(ptr.shape[0] - 1):
            s = zero
            for k in range(ptr[i], ptr[i + 1]):
                s = _madd(s, val[k], t[idx[k]])
            for c in range(len(zero)):
                out[c, i] = s[c]

    @nb.njit(cache=True, nogil=True)
    def _aligned_rows(buf, n, width):
        # (n, width) rows of buf starting on a _SMOOTH_ALIGN boundary (buf has room for
        # it): the cells-first copy. numba aligns arrays to 32 bytes, so a 128-byte row of
        # 16 float64 spanned three 64-byte lines half the time, and every gathered
        # neighbour row cost 50% more lines (a ~1.6x slower kernel at 3696 cells, alone).
        off = (_SMOOTH_ALIGN - buf.ctypes.data % _SMOOTH_ALIGN) % _SMOOTH_ALIGN
        k = off // buf.itemsize
        return buf[k : k + n * width].reshape((n, width))

    @nb.njit(cache=True, nogil=True)
    def _smooth_run(frame, like):
        # operands: R parts x_k (G, n) of like's dtype, then the neighbour lists
        # (assign.Neighbors): ptr (n + 1,) int32, idx (nnz,) int32, val (nnz,) float32;
        # optionally then earlier sums prev (G * K, n) and keep (G, R) int32. Result
        # (R * G, n) like x, part-major: its row k * G + g smooths row g of part k, or
        # is row g * K + keep[g, k] of prev where keep[g, k] >= 0 (the caller's earlier
        # sums of the same input, assign.smooth's cache: copied, not computed). Separate
        # parts spare the program a stacked, transposed copy of the rows.
        run, f = _ffi_frame(frame)
        if run:
            out = _ffi_array(f[14], 0, like)
            G, n = _ffi_array(f[9], 0, like).shape
            C = out.shape[0]
            R = C // G
            ptr = _ffi_vector(f[9], R, np.int32(0))
            idx = _ffi_vector(f[9], R + 1, np.int32(0))
            val = _ffi_vector(f[9], R + 2, np.float32(0))
            # the result's rows to compute, in order: blocks of them
            cols = np.arange(C)
            m = C
            if f[7] == R + 5:  # prev and keep given
                prev = _ffi_array(f[9], R + 3, like)
                keep = _ffi_array(f[9], R + 4, np.int32(0))
                K = prev.shape[0] // G
                m = 0
                for c in range(C):
                    j = keep[c % G, c // G]
                    if j >= 0:
                        out[c] = prev[(c % G) * K + j]
                    else:
                        cols[m] = c
                        m += 1
            room = _SMOOTH_ALIGN // out.itemsize  # elements, for the shift to the boundary
            buf = np.zeros(n * _SMOOTH_BLOCK + room, out.dtype)
            # the sums of a block whose rows are not W adjacent rows of the result
            tail = np.empty((_SMOOTH_BLOCK, n), out.dtype)
            z8 = (like, like, like, like, like, like, like, like)  # y = 0 in like's dtype
            for c0 in range(0, m, _SMOOTH_BLOCK):
                w = min(_SMOOTH_BLOCK, m - c0)
                W = 8 if w <= 8 else _SMOOTH_BLOCK  # a last block of 1-8 columns: 8 wide
                t = _aligned_rows(buf, n, W)
                for b in range(w):
                    c = cols[c0 + b]
                    x = _ffi_array(f[9], c // G, like)
                    g = c % G
                    for j in range(n):
                        t[j, b] = x[g, j]
                # straight into the result when the block's rows are adjacent (a kernel
                # storing through a row index per column was ~7% slower, alone)
                direct = w == W and cols[c0 + w - 1] - cols[c0] == w - 1
                o = out[cols[c0] : cols[c0] + W] if direct else tail[:W]
                if W == 8:
                    _smooth_rows(t, ptr, idx, val, o, z8)
                else:
                    _smooth_rows(t, ptr, idx, val, o, z8 + z8)
                if not direct:
                    for b in range(w):
                        out[cols[c0 + b]] = tail[b]
        return _ptr(0)

    def _ffi_smooth_f64(frame):  # a cfunc: _cfunc
        return _smooth_run(frame, np.float64(0))

    def _ffi_smooth_f32(frame):  # a cfunc: _cfunc
        return _smooth_run(frame, np.float32(0))


# --- projection: the nearest grid point of each cell -----------------------------------

_NEAREST_LANES = 8  # cells whose running minima stay in registers (see _nearest8)


with _slp_vectorized():

    @nb.njit(cache=True, nogil=True)
    def _nearest8(u, s, gu, gs, arg, g, c0):
        # assign._project for the cells c0..c0+7 of gene g: the first grid point j
        # minimising (gu[j] - u)**2 + (gs[j] - s)**2 (each square rounded, then the sum)
        # by a running strict minimum from j = 0, in the arrays' dtype. The 8 minima and
        # indices stay in registers (SLP packs the lanes): no loads or stores per grid
        # point but the grid's own, ~1.45x faster than keeping them in an L1 array.
        m = gu.shape[1]
        a, b = gu[g, 0], gs[g, 0]
        # fmt: off
        u0, u1, u2, u3 = u[g, c0], u[g, c0 + 1], u[g, c0 + 2], u[g, c0 + 3]
        u4, u5, u6, u7 = u[g, c0 + 4], u[g, c0 + 5], u[g, c0 + 6], u[g, c0 + 7]
        s0, s1, s2, s3 = s[g, c0], s[g, c0 + 1], s[g, c0 + 2], s[g, c0 + 3]
        s4, s5, s6, s7 = s[g, c0 + 4], s[g, c0 + 5], s[g, c0 + 6], s[g, c0 + 7]
        d0 = (a - u0) * (a - u0) + (b - s0) * (b - s0)
        d1 = (a - u1) * (a - u1) + (b - s1) * (b - s1)
        d2 = (a - u2) * (a - u2) + (b - s2) * (b - s2)
        d3 = (a - u3) * (a - u3) + (b - s3) * (b - s3)
        d4 = (a - u4) * (a - u4) + (b - s4) * (b - s4)
        d5 = (a - u5) * (a - u5) + (b - s5) * (b - s5)
        d6 = (a - u6) * (a - u6) + (b - s6) * (b - s6)
        d7 = (a - u7) * (a - u7) + (b - s7) * (b - s7)
        z = np.int32(0)
        k0, k1, k2, k3, k4, k5, k6, k7 = z, z, z, z, z, z, z, z
        for j in range(1, m):
            a, b = gu[g, j], gs[g, j]
            jj = np.int32(j)
            e = (a - u0) * (a - u0) + (b - s0) * (b - s0)
            t = e < d0
            d0 = e if t else d0
            k0 = jj if t else k0
            e = (a - u1) * (a - u1) + (b - s1) * (b - s1)
            t = e < d1
            d1 = e if t else d1
            k1 = jj if t else k1
            e = (a - u2) * (a - u2) + (b - s2) * (b - s2)
            t = e < d2
            d2 = e if t else d2
            k2 = jj if t else k2
            e = (a - u3) * (a - u3) + (b - s3) * (b - s3)
            t = e < d3
            d3 = e if t else d3
            k3 = jj if t else k3
            e = (a - u4) * (a - u4) + (b - s4) * (b - s4)
            t = e < d4
            d4 = e if t else d4
            k4 = jj if t else k4
            e = (a - u5) * (a - u5) + (b - s5) * (b - s5)
            t = e < d5
            d5 = e if t else d5
            k5 = jj if t else k5
            e = (a - u6) * (a - u6) + (b - s6) * (b - s6)
            t = e < d6
            d6 = e if t else d6
            k6 = jj if t else k6
            e = (a - u7) * (a - u7) + (b - s7) * (b - s7)
            t = e < d7
            d7 = e if t else d7
            k7 = jj if t else k7
        arg[g, c0], arg[g, c0 + 1], arg[g, c0 + 2], arg[g, c0 + 3] = k0, k1, k2, k3
        arg[g, c0 + 4], arg[g, c0 + 5], arg[g, c0 + 6], arg[g, c0 + 7] = k4, k5, k6, k7
        # fmt: on

    @nb.njit(cache=True, nogil=True)
    def _nearest(u, s, gu, gs, arg):
        # _nearest8 over each gene's (row's) cells; the last n % 8 cells through an
        # 8-cell scratch padded with copies of the first of them
        n = u.shape[1]
        full = n - n % _NEAREST_LANES
        uu = np.empty((1, _NEAREST_LANES), u.dtype)
        ss = np.empty((1, _NEAREST_LANES), s.dtype)
        at = np.empty((1, _NEAREST_LANES), np.int32)
        for g in range(u.shape[0]):
            for c0 in range(0, full, _NEAREST_LANES):
                _nearest8(u, s, gu, gs, arg, g, c0)
            if full < n:
                uu[0, :] = u[g, full]
                ss[0, :] = s[g, full]
                uu[0, : n - full] = u[g, full:]
                ss[0, : n - full] = s[g, full:]
                _nearest8(uu, ss, gu[g : g + 1], gs[g : g + 1], at, 0, 0)
                arg[g, full:] = at[0, : n - full]

    @nb.njit(cache=True, nogil=True)
    def _nearest_run(frame, like):
        # operands u, s (genes, cells) and gu, gs (genes, grid) of like's dtype; result the
        # grid index (genes, cells) int32
        run, f = _ffi_frame(frame)
        if run:
            _nearest(_ffi_array(f[9], 0, like), _ffi_array(f[9], 1, like),
                     _ffi_array(f[9], 2, like), _ffi_array(f[9], 3, like),
                     _ffi_array(f[14], 0, np.int32(0)))  # fmt: skip
        return _ptr(0)

    def _ffi_nearest_f64(frame):  # a cfunc: _cfunc
        return _nearest_run(frame, np.float64(0))

    def _ffi_nearest_f32(frame):  # a cfunc: _cfunc
        return _nearest_run(frame, np.float32(0))


# --- numpy's pairwise summation ---------------------------------------------------------

_PW_BLOCKSIZE = 128


@nb.njit(cache=True, nogil=True)
def _pairwise_leaf(a, lo, n):
    # numpy/_core/src/umath/loops_utils.h.src, @TYPE@_pairwise_sum for n <= 128, in the
    # array's dtype: n < 8 sequential, else eight strided accumulators. numpy starts the
    # sequential branch at -0.0; -0.0 + a[0] is a[0] bit for bit, so it starts at a[lo].
    if n < 8:
        res = a[lo]
        for i in range(lo + 1, lo + n):
            res += a[i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    end = lo + n - n % 8
    for i in range(lo + 8, end, 8):
        r0, r1, r2, r3 = r0 + a[i], r1 + a[i + 1], r2 + a[i + 2], r3 + a[i + 3]
        r4, r5, r6, r7 = r4 + a[i + 4], r5 + a[i + 5], r6 + a[i + 6], r7 + a[i + 7]
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    for i in range(end, lo + n):
        res += a[i]
    return res


@nb.njit(cache=True, nogil=True)
def _pairwise(a, n, tasks, vals):
    # numpy's recursion (n > 128: split at n2 = n / 2 rounded down to a multiple of 8,
    # pairwise(a, n2) + pairwise(a + n2, n - n2)) with explicit stacks, left before right
    # (numba's cached recursive functions do not link). tasks: (lo, n) pairs, n = -1
    # marks "add the top two values"; each split pushes 3 and pops 1 entry.
    tasks[0, 0], tasks[0, 1] = 0, n
    tp, sp = 1, 0
    while tp > 0:
        tp -= 1
        lo, m = tasks[tp, 0], tasks[tp, 1]
        if m < 0:
            vals[sp - 2] = vals[sp - 2] + vals[sp - 1]
            sp -= 1
        elif m <= _PW_BLOCKSIZE:
            vals[sp] = _pairwise_leaf(a, lo, m)
            sp += 1
        else:
            n2 = m // 2
            n2 -= n2 % 8
            tasks[tp, 0], tasks[tp, 1] = 0, -1
            tasks[tp + 1, 0], tasks[tp + 1, 1] = lo + n2, m - n2
            tasks[tp + 2, 0], tasks[tp + 2, 1] = lo, n2
            tp += 3
    return vals[0]


@nb.njit(cache=True, nogil=True)
def _pairwise_rows(x, n, out):
    # out[g] = np.add.reduce(x[g, :n[g]]) = 0.0 + pairwise(x[g, :n[g]]): a zero total is +0.0
    tasks = np.empty((192, 2), np.int64)  # depth <= 63 splits for any int64 length
    vals = np.empty(64, x.dtype)
    for g in range(x.shape[0]):
        m = min(max(n[g], 0), x.shape[1])
        if m == 0:
            out[g] = 0
            continue
        total = _pairwise(x[g], m, tasks, vals)
        out[g] = abs(total) if total == 0 else total


@nb.njit(cache=True, nogil=True)
def _pairwise_at_rows(x, idx, n, out):
    # out[g] = np.add.reduce(x[g, idx[g, :n[g]]]): the selected elements gathered in order
    tasks = np.empty((192, 2), np.int64)
    vals = np.empty(64, x.dtype)
    buf = np.empty(x.shape[1], x.dtype)
    for g in range(x.shape[0]):
        m = min(max(n[g], 0), x.shape[1])
        if m == 0:
            out[g] = 0
            continue
        for i in range(m):
            buf[i] = x[g, idx[g, i]]
        total = _pairwise(buf, m, tasks, vals)
        out[g] = abs(total) if total == 0 else total


@nb.njit(cache=True, nogil=True)
def _pairwise_run(frame, like):
    # operands x (rows, N) of like's dtype, n (rows,) int32 and optionally idx (rows, N)
    # int32 (sum x[idx[:n]] instead of x[:n]); result (rows,) like x
    run, f = _ffi_frame(frame)
    if run:
        x = _ffi_array(f[9], 0, like)
        n = _ffi_vector(f[9], 1, np.int32(0))
        out = _ffi_vector(f[14], 0, like)
        if f[7] == 3:
            _pairwise_at_rows(x, _ffi_array(f[9], 2, np.int32(0)), n, out)
        else:
            _pairwise_rows(x, n, out)
    return _ptr(0)


def _ffi_pairwise_f64(frame):  # a cfunc: _cfunc
    return _pairwise_run(frame, np.float64(0))


def _ffi_pairwise_f32(frame):  # a cfunc: _cfunc
    return _pairwise_run(frame, np.float32(0))


# --- numpy's own exp and log ----------------------------------------------------------------
# float32 and float64 ``np.exp``/``np.log`` of the fit are numpy's own inner loops, called
# from the compiled program: numpy's loop for a dtype is whatever this numpy build dispatches
# to on this CPU (float32: its AVX512F/AVX2 kernels ``simd_exp_FLOAT``/``simd_log_FLOAT``, or
# libm; float64 on AVX512_SKX Linux wheels: Intel's SVML ``__svml_exp8_ha``/``__svml_log8_ha``,
# else its AVX512F kernels or libm), so the results are numpy's by construction -- on any CPU
# numpy runs on -- and checked at run time (:func:`numpy_exp_log_available`). XLA's float64
# ``exp`` is its own polynomial (~15% of results an ulp from numpy's), its ``log`` glibc's
# (~0.03%); XLA:CPU lowers ``log`` to four scalar libm calls per vector (~5 ns per value against
# ~1 ns). The float32 kernels are ported to XLA in :mod:`.npmath` (the GPU's path): as XLA
# code they were ~4,300 of the medium program's 32,600 instructions (compile time).
#
# The loops come from numpy's ufunc API for such callers (NEP 43, numpy >= 1.24):
# ``ufunc._resolve_dtypes_and_context`` + ``ufunc._get_strided_loop`` fill a
# ``numpy_1.24_ufunc_call_info`` capsule with the strided loop, its context and auxdata. Their
# addresses differ per process, so the compiled kernels (cached on disk by numba) read them
# from a table that is given to numba's linker under a symbol name, as a function's would be.
_NP_LOOPS = (("exp", "f4"), ("log", "f4"), ("exp", "f8"), ("log", "f8"))  # loop index k
_LOOP_TABLE = "jaxvelo_numpy_loop_table"
_MXCSR_DAZ_FTZ = (1 << 6) | (1 << 15)  # denormals-are-zero, flush-to-zero


class _CallInfo(ctypes.Structure):
    # numpy/_core/src/umath/ufunc_object.c, ``ufunc_call_info``
    _fields_ = [("strided_loop", ctypes.c_void_p), ("context", ctypes.c_void_p),
                ("auxdata", ctypes.c_void_p), ("requires_pyapi", ctypes.c_bool),
                ("no_floatingpoint_errors", ctypes.c_bool)]  # fmt: skip


@functools.cache
def _numpy_loops() -> tuple | None:
    """numpy's strided loops of ``_NP_LOOPS`` as a table of (loop, context, auxdata)
    addresses, made known to numba's linker (:data:`_LOOP_TABLE`); None where this numpy
    does not offer them. The capsules returned with it keep the loops' context alive."""
    import llvmlite.binding as llvm

    get = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
        ("PyCapsule_GetPointer", ctypes.pythonapi)
    )
    table = np.zeros(3 * len(_NP_LOOPS), np.int64)
    capsules = []
    try:
        for k, (name, dt) in enumerate(_NP_LOOPS):
            ufunc = getattr(np, name)
            _, capsule = ufunc._resolve_dtypes_and_context((np.dtype(dt), None))
            ufunc._get_strided_loop(capsule)
            info = _CallInfo.from_address(get(capsule, b"numpy_1.24_ufunc_call_info"))
            if info.requires_pyapi or not info.strided_loop:
                return None
            table[3 * k : 3 * k + 3] = info.strided_loop, info.context or 0, info.auxdata or 0
            capsules.append(capsule)
    except (AttributeError, TypeError, ValueError):
        return None
    llvm.add_symbol(_LOOP_TABLE, table.ctypes.data)
    return table, capsules


@intrinsic
def _numpy_loop(typingctx, k, src, dst):
    """Run numpy's loop ``k`` (:data:`_NP_LOOPS`) on the 1-D arrays ``src`` -> ``dst`` (of
    the loop's dtype, same length, any strides): ``loop(context, {src, dst}, {n}, strides,
    auxdata)``, the ``PyArrayMethod_StridedLoop`` signature. Returns the loop's status."""

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        i32, i64, i8p = ir.IntType(32), ir.IntType(64), ir.IntType(8).as_pointer()
        table = builder.module.globals.get(_LOOP_TABLE)
        if table is None:  # an external declaration, resolved by the linker
            table = ir.GlobalVariable(builder.module, ir.ArrayType(i64, 3 * len(_NP_LOOPS)),
                                      _LOOP_TABLE)  # fmt: skip
        base = builder.mul(args[0], ir.Constant(i64, 3))

        def entry(j):
            at = builder.add(base, ir.Constant(i64, j))
            return builder.load(builder.gep(table, [ir.Constant(i32, 0), at]))

        s = context.make_array(signature.args[1])(context, builder, args[1])
        d = context.make_array(signature.args[2])(context, builder, args[2])
        data = cgutils.alloca_once(builder, i8p, size=2)
        builder.store(builder.bitcast(s.data, i8p), data)
        builder.store(builder.bitcast(d.data, i8p), builder.gep(data, [ir.Constant(i32, 1)]))
        dims = cgutils.alloca_once(builder, i64)
        builder.store(cgutils.unpack_tuple(builder, s.shape, 1)[0], dims)
        steps = cgutils.alloca_once(builder, i64, size=2)
        builder.store(cgutils.unpack_tuple(builder, s.strides, 1)[0], steps)
        builder.store(cgutils.unpack_tuple(builder, d.strides, 1)[0],
                      builder.gep(steps, [ir.Constant(i32, 1)]))  # fmt: skip
        fnty = ir.FunctionType(i32, [i8p, i8p.as_pointer(), i64.as_pointer(),
                                     i64.as_pointer(), i8p])  # fmt: skip
        loop = builder.inttoptr(entry(0), fnty.as_pointer())
        ctx, aux = builder.inttoptr(entry(1), i8p), builder.inttoptr(entry(2), i8p)
        return builder.call(loop, [ctx, data, dims, steps, aux])

    return types.int32(types.int64, src, dst), codegen


@intrinsic
def _mxcsr(typingctx, value):
    """Set the SSE control/status register to ``value`` (int32, or -1: leave it) and
    return its previous value."""

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        i32, i8p = ir.IntType(32), ir.IntType(8).as_pointer()
        slot = cgutils.alloca_once(builder, i32)
        st = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p]),
                                            "llvm.x86.sse.stmxcsr")  # fmt: skip
        ld = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p]),
                                            "llvm.x86.sse.ldmxcsr")  # fmt: skip
        builder.call(st, [builder.bitcast(slot, i8p)])
        old = builder.load(slot)
        with builder.if_then(builder.icmp_signed("!=", args[0], ir.Constant(i32, -1))):
            builder.store(args[0], slot)
            builder.call(ld, [builder.bitcast(slot, i8p)])
        return old

    return types.int32(types.int32), codegen


_CHUNK = 512  # values per float32 round trip of a float64 array


@nb.njit(cache=True, nogil=True)
def _numpy_apply(x, out, k, via32):
    """``out[:] = f(x)`` for numpy's loop ``k``. ``via32``: float64 arrays through a
    float32 loop, holding float32 values: rounded to float32 and back exactly, as
    ``astype`` does, in chunks. Runs in the caller's floating-point mode (see
    :func:`_numpy_run`)."""
    n = x.size
    if n == 0:
        return
    if not via32:
        _numpy_loop(k, x, out)
        return
    buf = np.empty(_CHUNK, np.float32)
    res = np.empty(_CHUNK, np.float32)
    for i in range(0, n, _CHUNK):
        m = min(_CHUNK, n - i)
        for j in range(m):
            buf[j] = np.float32(x[i + j])
        _numpy_loop(k, buf[:m], res[:m])
        for j in range(m):
            out[i + j] = np.float64(res[j])


@nb.njit(cache=True, nogil=True)
def _numpy_run(frame, like, k0, via32):
    # operands x (any shape) of like's dtype, op (1,) int32 (0: exp, 1: log); result like x.
    # k0: 0 numpy's float32 loops, 2 its float64 loops; via32: see _numpy_apply
    run, f = _ffi_frame(frame)
    if run:
        k = k0 + np.int64(_ffi_flat(f[9], 1, np.int32(0))[0])
        # XLA:CPU runs with denormals-are-zero and flush-to-zero; numpy does not (a
        # subnormal input or result would read or come out as 0)
        old = _mxcsr(np.int32(-1))
        _mxcsr(np.int32(old & ~_MXCSR_DAZ_FTZ))
        _numpy_apply(_ffi_flat(f[9], 0, like), _ffi_flat(f[14], 0, like), k, via32)
        _mxcsr(old)
    return _ptr(0)


# Compiled lazily (numba needs the table's symbol to link them): see _register_numpy.
def _ffi_numpy32_f32(frame):
    return _numpy_run(frame, np.float32(0), 0, False)


def _ffi_numpy32_f64(frame):
    return _numpy_run(frame, np.float64(0), 0, True)


def _ffi_numpy64_f64(frame):
    return _numpy_run(frame, np.float64(0), 2, False)


def numpy_exp_log(x: np.ndarray, op: int, precision: str = "float64") -> np.ndarray:
    """``np.exp(x)`` (``op`` 0) or ``np.log(x)`` (1) computed by the compiled kernel of the
    custom calls: numpy's ``precision`` loop on ``x`` (float32 or float64; a float64 array
    through the float32 loop must hold float32 values). What :func:`numpy_exp_log_available`
    checks against numpy's own calls."""
    if _numpy_loops() is None:  # also what lets numba link the kernel
        raise RuntimeError("numpy's exp/log loops are not available in this process")
    x = np.ascontiguousarray(x)
    if x.dtype not in (np.float32, np.float64) or op not in (0, 1):
        raise TypeError(f"expected a float32/float64 array and op 0 or 1, got {x.dtype}, {op}")
    k = {"float32": 0, "float64": 2}[precision] + op
    if k >= 2 and x.dtype != np.float64:
        raise TypeError("numpy's float64 loop needs a float64 array")
    out = np.empty_like(x)
    _numpy_apply(x.reshape(-1), out.reshape(-1), np.int64(k), k < 2 and x.dtype == np.float64)
    return out


def numpy_exp_log_available() -> bool:
    """Whether exp/log in the fit run as custom calls of numpy's own loops on the CPU
    backend (:func:`register_numpy_exp_log`): numpy offers them and the kernel reproduces
    ``np.exp``/``np.log`` bit for bit (:func:`_numpy_verified`). ``JAXVELO_NUMPY_EXP_LOG=0``
    turns it off: XLA's float64 exp/log and the XLA port of numpy's float32 kernels
    (:mod:`.npmath`), which every non-CPU backend runs."""
    import os

    return os.environ.get("JAXVELO_NUMPY_EXP_LOG", "1") != "0" and _numpy_verified()


def _exp_log_probes() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(exp inputs, log inputs) per dtype: random values, both ends of the ranges,
    subnormals, signed zeros, infinities and NaNs."""
    rng = np.random.default_rng(0)
    e64 = np.concatenate([[0.0, -0.0, 1.0, -745.2, -745.1, 709.7, 709.8, np.inf, -np.inf,
                           np.nan, 5e-324], rng.normal(0, 30, 100_003)])  # fmt: skip
    l64 = np.concatenate([[0.0, -0.0, 1.0, -1.0, 5e-324, 1e308, np.inf, np.nan, 1 - 1e-16],
                          np.exp(rng.normal(0, 30, 100_003)),
                          rng.uniform(0.9, 1.1, 20_000)])  # fmt: skip
    e32 = np.concatenate(
        [
            [0, -0.0, 1, -103.9, -100, -87.34, 88.72, 88.73, np.inf, -np.inf, np.nan, 1e-45],
            rng.uniform(-105, 90, 100_003),
        ]
    ).astype(np.float32)
    with np.errstate(all="ignore"):
        l32 = np.concatenate([[0, -0.0, 1, -1, 1e-45, 1e-40, 3e38, np.inf, np.nan],
                              np.exp2(rng.uniform(-149, 128, 100_003)),
                              rng.uniform(0.5, 2, 20_000)]).astype(np.float32)  # fmt: skip
    return {"float32": (e32, l32), "float64": (e64, l64)}


def _verified_stamp():
    """The file that records a passed :func:`_numpy_verified` for this numpy build, CPU
    and kernel (None: no on-disk cache, ``JAXVELO_CACHE_DIR=0``). The check costs ~0.3 s
    per process (numba loads the test kernel, ~1.2 M values per dtype); a returning
    process reads the stamp instead. Its name hashes everything the outcome depends on:
    numpy's version and extension module (path, size, mtime), the CPU features numpy
    dispatches on (and the variables that restrict them), numba, llvmlite, Python and
    the core's source (``batch._core_hash``, also in the programs' keys). A path."""
    import hashlib
    import platform
    import sys

    import llvmlite

    from .batch import _core_hash, cache_dir

    folder = cache_dir()
    if folder is None:
        return None
    core = np._core._multiarray_umath
    st = os.stat(core.__file__)
    parts = (
        np.__version__, core.__file__, st.st_size, st.st_mtime_ns,
        sorted(getattr(core, "__cpu_features__", {}).items()),
        getattr(core, "__cpu_baseline__", None), getattr(core, "__cpu_dispatch__", None),
        os.environ.get("NPY_DISABLE_CPU_FEATURES"), os.environ.get("NPY_ENABLE_CPU_FEATURES"),
        nb.__version__, llvmlite.__version__, sys.version, platform.machine(), _core_hash(),
    )  # fmt: skip
    key = hashlib.sha256(repr(parts).encode()).hexdigest()[:32]
    return folder / f"numpy-exp-log-{key}.ok"


@functools.cache
def _numpy_verified() -> bool:
    """numpy's loops are there and the kernel gives ``np.exp``/``np.log``'s bits on arrays
    of every length up to 33, long arrays, numpy scalars and special values -- for float32
    arrays, float64 arrays holding float32 values, and float64 arrays. Checked once per
    numpy build, CPU and kernel: a pass is recorded (:func:`_verified_stamp`)."""
    if _numpy_loops() is None:
        return False
    stamp = _verified_stamp()
    if stamp is not None and stamp.exists():
        return True
    if not _numpy_check():
        return False
    if stamp is not None:
        from .batch import write_atomic

        try:
            write_atomic(stamp, b"numpy's exp/log loops verified against the kernel\n")
        except OSError:  # a read-only cache: check again next time
            pass
    return True


def _numpy_check() -> bool:
    """The check of :func:`_numpy_verified`, run where no stamp records a pass."""
    with np.errstate(all="ignore"):
        for precision, (xe, xl) in _exp_log_probes().items():
            u = np.uint32 if precision == "float32" else np.uint64
            for op, x, f in ((0, xe, np.exp), (1, xl, np.log)):
                want = f(x)
                inputs = [x] if precision == "float64" else [x, x.astype(np.float64)]
                for arg in inputs:
                    for n in (*range(1, 34), x.size):
                        got = numpy_exp_log(arg[:n], op, precision).astype(want.dtype)
                        if not np.array_equal(got.view(u), want[:n].view(u)):
                            return False
                scal = np.array([f(v) for v in x[:64]], x.dtype)
                if not np.array_equal(scal.view(u), want[:64].view(u)):
                    return False
    return True


_CALLS = {np.dtype(np.float64): _ffi_f64, np.dtype(np.float32): _ffi_f32}
_SORTS = {np.dtype(np.float64): _ffi_sort_f64, np.dtype(np.float32): _ffi_sort_f32}
_NEARESTS = {np.dtype(np.float64): _ffi_nearest_f64, np.dtype(np.float32): _ffi_nearest_f32}
_SMOOTHS = {np.dtype(np.float64): _ffi_smooth_f64, np.dtype(np.float32): _ffi_smooth_f32}
_PAIRWISE = {np.dtype(np.float64): _ffi_pairwise_f64, np.dtype(np.float32): _ffi_pairwise_f32}
# compiled with LLVM's SLP vectorizer (_slp_vectorized)
_SLP = (_ffi_smooth_f64, _ffi_smooth_f32, _ffi_nearest_f64, _ffi_nearest_f32)


@functools.cache
def _cfunc(fn):
    """``fn`` as a numba cfunc ``void* (void*)`` -- compiled on first use, or loaded from
    numba's on-disk cache -- so that importing this module compiles nothing and each
    kernel can be compiled in its own process (:func:`warm_cache`)."""
    slp = _slp_vectorized() if fn in _SLP else contextlib.nullcontext()
    with slp:
        return nb.cfunc(types.voidptr(types.voidptr), cache=True, nogil=True)(fn)


def target_name(dtype) -> str:
    return f"jaxvelo_adjust_increments_{np.dtype(dtype).name}"


def _register(name: str, fn) -> str:
    import jax

    new_capsule = ctypes.pythonapi.PyCapsule_New
    new_capsule.restype = ctypes.py_object
    new_capsule.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)
    capsule = new_capsule(fn.address, b"xla._CUSTOM_CALL_TARGET", None)
    jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    return name


@functools.cache
def register(dtype) -> str:
    """Compile (numba, cached on disk) and register the adjust_increments custom call
    for ``dtype``."""
    return _register(target_name(dtype), _cfunc(_CALLS[np.dtype(dtype)]))


@functools.cache
def register_sort(dtype) -> str:
    """Compile and register the row sort custom call (``np.sort`` along the last axis,
    NaNs last) for ``dtype``."""
    return _register(f"jaxvelo_sort_rows_{np.dtype(dtype).name}",
                     _cfunc(_SORTS[np.dtype(dtype)]))  # fmt: skip


@functools.cache
def register_smooth(dtype) -> str:
    """Compile and register the smoothing custom call (``connectivities.dot(x.T).T`` on
    the CSR neighbour lists, :func:`jaxvelo.core.assign.smooth`) for ``dtype``."""
    return _register(f"jaxvelo_smooth_{np.dtype(dtype).name}", _cfunc(_SMOOTHS[np.dtype(dtype)]))


@functools.cache
def register_nearest(dtype) -> str:
    """Compile and register the projection's nearest-grid-point custom call
    (:func:`jaxvelo.core.assign._project`) for ``dtype``."""
    return _register(f"jaxvelo_nearest_{np.dtype(dtype).name}",
                     _cfunc(_NEARESTS[np.dtype(dtype)]))  # fmt: skip


@functools.cache
def register_pairwise(dtype) -> str:
    """Compile and register the pairwise-sum custom call (``np.add.reduce`` of each row's
    first ``n`` elements, :func:`jaxvelo.core.numerics.pairwise_sum`) for ``dtype``."""
    return _register(f"jaxvelo_pairwise_sum_{np.dtype(dtype).name}",
                     _cfunc(_PAIRWISE[np.dtype(dtype)]))  # fmt: skip


_NUMPY_TARGETS = {  # (precision, input dtype): the kernel
    ("float32", np.dtype(np.float32)): _ffi_numpy32_f32,
    ("float32", np.dtype(np.float64)): _ffi_numpy32_f64,
    ("float64", np.dtype(np.float64)): _ffi_numpy64_f64,
}


@functools.cache
def register_numpy_exp_log(precision: str, dtype) -> str:
    """Compile (numba, cached on disk) and register the custom call of numpy's own
    ``precision`` exp/log loops on ``dtype`` input (only where
    :func:`numpy_exp_log_available`)."""
    if not numpy_exp_log_available():
        raise RuntimeError("numpy's exp/log loops are not usable in this process")
    fn = _cfunc(_NUMPY_TARGETS[precision, np.dtype(dtype)])
    return _register(f"jaxvelo_numpy_exp_log_{precision}_{np.dtype(dtype).name}", fn)


# Every cfunc, with its compile time from scratch (seconds, a 2-core AMD EPYC VM: numba's
# type inference and LLVM; the callees of each are compiled with it) -- to spread them
# over processes, longest first.
_COMPILE_S = {
    _ffi_f64: 11.6, _ffi_f32: 7.5, _ffi_nearest_f64: 2.4, _ffi_smooth_f64: 2.3,
    _ffi_smooth_f32: 2.1, _ffi_nearest_f32: 2.0, _ffi_pairwise_f32: 1.4,
    _ffi_pairwise_f64: 1.3, _ffi_sort_f64: 1.3, _ffi_sort_f32: 0.9,
    _ffi_numpy32_f64: 0.6, _ffi_numpy32_f32: 0.5, _ffi_numpy64_f64: 0.3,
}  # fmt: skip


def _uncached(fns) -> list:
    """The cfuncs among ``fns`` that numba's on-disk cache has no index file for (a
    present but stale index -- another numba, another CPU -- is found by numba itself,
    which then compiles in this process, as without :func:`warm_cache`)."""
    from numba.core.caching import FunctionCache

    return [fn for fn in fns
            if not os.path.exists(FunctionCache(fn)._cache_file._index_path)]  # fmt: skip


def _compile_cfuncs(names: list[str]) -> None:
    """Compile the named cfuncs of this module into numba's cache (a worker of
    :func:`warm_cache`)."""
    if any(n.startswith("_ffi_numpy") for n in names):
        _numpy_loops()  # publishes the loop table these link against
    for name in names:
        _cfunc(globals()[name])


def warm_cache(workers: int | None = None) -> int:
    """Compile the kernels missing from numba's on-disk cache in ``workers`` processes
    at once (default: the CPUs this process may run on), longest first.

    From scratch the 13 kernels take ~40 s of numba compilation in one process (once per
    installed version and CPU; afterwards they load in ~0.5 s); over two processes ~32 s on
    a 2-vCPU VM (each worker starts numba and compiles the shared callees again), bounded
    by the float64 ``adjust_increments`` (~14 s) with more CPUs. Processes rather than
    threads: numba compiles under a global lock. Each
    worker is a fresh interpreter (``python -c``, not ``multiprocessing``, which would
    re-import the caller's ``__main__``). Returns the number of kernels compiled; 0 where
    the cache is complete, with ``JAXVELO_NUMBA_WORKERS=1``, or when the cache location
    cannot be read (this process then compiles what it needs, as before)."""
    import subprocess
    import sys

    if workers is None:
        env = os.environ.get("JAXVELO_NUMBA_WORKERS", "").strip()
        affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere all CPUs
        workers = int(env) if env else len(affinity(0)) if affinity else os.cpu_count() or 1
    fns = [fn for fn in _COMPILE_S  # numpy's exp/log kernels only where numpy has loops
           if not fn.__name__.startswith("_ffi_numpy") or _numpy_loops() is not None]  # fmt: skip
    try:
        todo = _uncached(fns)
    except Exception:  # numba's cache internals moved: leave it to numba
        return 0
    if workers < 2 or len(todo) < 2:
        return 0
    loads = [[] for _ in range(min(workers, len(todo)))]
    for fn in sorted(todo, key=_COMPILE_S.get, reverse=True):  # longest first
        min(loads, key=lambda w: sum(map(_COMPILE_S.get, w))).append(fn)
    code = "from jaxvelo.core import host_kernels as h; h._compile_cfuncs({!r})"
    procs = []
    try:
        for w in loads:
            procs.append(subprocess.Popen(
                [sys.executable, "-c", code.format([f.__name__ for f in w])],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
    except OSError:  # no usable interpreter to start (embedded Python): compile here
        pass
    for proc in procs:
        proc.wait()  # a failed worker leaves its kernels to this process
    return len(todo) if procs else 0


_REGISTER_LOCK = threading.Lock()
_REGISTERED: set[bool] = set()  # the JAXVELO_NUMPY_EXP_LOG switch states registered for


def register_all() -> None:
    """Compile or load every kernel and register its custom-call target (before a program
    that refers to them is compiled or loaded); once per process and state of the
    ``JAXVELO_NUMPY_EXP_LOG`` switch (numpy's exp/log targets are registered only where
    used). Thread-safe: a call while another runs
    (:func:`jaxvelo.core.batch.preload_kernels`) waits for it."""
    switch = os.environ.get("JAXVELO_NUMPY_EXP_LOG", "1") != "0"
    if switch in _REGISTERED:
        return
    with _REGISTER_LOCK:
        if switch in _REGISTERED:
            return
        warm_cache()
        if numpy_exp_log_available():
            for precision, dtype in _NUMPY_TARGETS:
                register_numpy_exp_log(precision, dtype)
        for dt in (np.float32, np.float64):
            register_pairwise(dt)
            register(dt)
            register_sort(dt)
            register_smooth(dt)
            register_nearest(dt)
        _REGISTERED.add(switch)
