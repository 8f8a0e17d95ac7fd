"""The one ``jit(vmap(...))`` boundary: padding, chunking, dispatch and the on-disk
cache of compiled programs.

Genes are padded to a fixed batch size (copies of the chunk's first gene, dropped
afterwards) so that every chunk reuses one compiled program and results do not depend on
the batch size. x64 is enabled only inside :func:`fit_genes` (``jax.enable_x64`` is a
context manager), never globally.

Compiled programs are serialised to ``$JAXVELO_CACHE_DIR`` (default: ``jaxvelo`` in the
user's cache folder, ``$XDG_CACHE_HOME`` or ``~/.cache``; ``JAXVELO_CACHE_DIR=none``
disables it), keyed by everything that determines the program: the fit configuration,
array shapes and dtypes, jax/jaxlib versions, the backend, and a hash of this package's
numerical core. A returning user skips both tracing and XLA compilation.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import os
import pickle
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from .assign import Neighbors, use_host_kernels
from .em import FitConfig, GeneData, GeneResult, Loaded, fit_gene
from .gradient import GradientConfig, fit_gene_gradient
from .npmath import numpy_exp_log
from .numerics import native_f32_division


def _program(cfg, has_nbrs: bool, init_vals: tuple | None) -> Callable:
    """The batched fit of one device: ``vmap`` over the genes of a batch."""

    def one(gd, nbrs, ld):
        nb = nbrs if has_nbrs else None
        if isinstance(cfg, GradientConfig):
            return fit_gene_gradient(gd, nb, cfg, init_vals)
        return fit_gene(gd, nb, cfg, init_vals, ld)

    ld_axes = Loaded(0, 0, 0, 0, 0) if cfg.load_pars else None
    # GeneData.n, the real cell count, is one value for the batch (None: not padded)
    return jax.jit(jax.vmap(one, in_axes=(GeneData(0, 0, 0, None), None, ld_axes)))


def n_devices() -> int:
    """Devices the gene batches are spread over: all devices of the default backend
    (one unless e.g. ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` on CPU);
    ``JAXVELO_DEVICES=n`` uses the first ``n``."""
    n = len(jax.devices())
    env = os.environ.get("JAXVELO_DEVICES", "").strip()
    if env:
        try:
            n = max(1, min(n, int(env)))
        except ValueError as e:
            raise ValueError(f"JAXVELO_DEVICES must be an integer, got {env!r}") from e
    return n


MAX_BATCH = 64  # genes per batch at most: larger batches gain little on CPU
# Genes x cells per batch beyond which wider batches measured slower, but not below
# WORKING_SET_MIN_GENES genes. Since the CPU kernels (d66ee21), two batches in flight on two
# cores run fastest when each batch's cell arrays stay small (cache-resident): warm calls,
# medians of 3, 2 threads: 1500 cells 4.06 s with 56-gene batches, 3.82 (32), 3.49 (16);
# 3696 cells 12.2 s (64), 11.4 (32), 11.2 (24), 11.1 (16); 9815 cells 9.4 s (40), 8.9 (24),
# 8.65 (16). Below ~16 genes the per-operation overhead grows instead (100 cells: 0.79 s with
# 64-gene batches, 0.83 with 32, 0.94 with 16), hence a floor rather than a smaller bound;
# 50,000 cells: batches of 10 were ~30% faster than of 5 (the floor only caps from above
# there: 20 genes still run as 2 batches of 10). See docs/design.md.
WORKING_SET_GENE_CELLS = 24_000
WORKING_SET_MIN_GENES = 16
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of working memory for the batches in flight
# Working memory (XLA temporaries) of a batch: ``cells * (genes * BYTES_PER_GENE_CELL +
# BYTES_PER_CELL)``, from the compiled programs' ``memory_analysis()`` (exact mode, bdfa457:
# 418-424 B per added gene and cell at 1500 and 50,000 cells, plus 600-700 B per cell for
# the cell-only arrays; 413-462 B per gene and cell in all from 100 cells x 64 genes to
# 50,000 x 5; gradient mode ~450 + ~350), rounded up; see docs/design.md.
BYTES_PER_GENE_CELL = {"exact": 512, "gradient": 512}
BYTES_PER_CELL = 1024


def working_bytes(genes: int, cells: int, mode: str = "exact") -> int:
    """Bytes of XLA temporaries one batch of ``genes`` genes and ``cells`` cells needs
    (an upper bound of the compiled program's ``memory_analysis().temp_size_in_bytes``)."""
    return max(1, cells) * (max(0, genes) * BYTES_PER_GENE_CELL[mode] + BYTES_PER_CELL)


def _parse_bytes(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(float(t))
    except ValueError as e:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 2G, 512M)") from e


def memory_budget() -> int:
    """Bytes the batches in flight may use for their working memory:
    ``$JAXVELO_MEMORY_BUDGET`` (e.g. ``2G``, ``512M``), default 1 GiB."""
    env = os.environ.get("JAXVELO_MEMORY_BUDGET", "").strip()
    n = _parse_bytes(env) if env else DEFAULT_MEMORY_BUDGET
    if n <= 0:
        raise ValueError(f"JAXVELO_MEMORY_BUDGET must be positive, got {env!r}")
    return n


def auto_batch_size(
    n_genes: int,
    n_obs: int,
    workers: int,
    mode: str = "exact",
    budget: int | None = None,
    platform: str | None = None,
) -> int:
    """Genes per batch for ``n_genes`` genes of ``n_obs`` cells on ``workers`` threads.

    On CPU (``platform``, default the default backend's): at most :data:`MAX_BATCH`, at
    most :data:`WORKING_SET_GENE_CELLS` genes x cells (but :data:`WORKING_SET_MIN_GENES`
    genes allowed) -- caps that keep a batch's cell arrays cache-resident -- and at most
    what fits the memory budget (:func:`memory_budget` shared by the ``workers`` batches in
    flight, each needing :func:`working_bytes`). Elsewhere (GPU) only the memory budget
    caps a batch: there a batch's cost is set by its sequence of kernel launches far more
    than by its width, so the fewest batches win (docs/benchmarks.md, GPU check). Then the
    fewest batches, a multiple of ``workers`` so that every thread has work, of equal
    size (rounded up to a multiple of 8 above 16 genes, so that similar gene counts share
    compiled programs). The rounding up of the size can leave fewer batches than that
    multiple, the last one partly padded: 611 genes at the cap of 16 run as 39 batches,
    not 40. Balancing the threads with smaller batches instead (14: 44 batches) measured
    slower on the pancreas (docs/design.md).
    """
    budget = memory_budget() if budget is None else budget
    platform = jax.default_backend() if platform is None else platform
    workers = max(1, int(workers))
    fixed = working_bytes(0, n_obs, mode)  # the cell-only arrays of a batch
    per_gene = working_bytes(1, n_obs, mode) - fixed
    cap = max(1, n_genes)
    if platform == "cpu":
        cap = min(MAX_BATCH, max(WORKING_SET_MIN_GENES, WORKING_SET_GENE_CELLS // max(1, n_obs)))
    cap = int(max(1, min(cap, (budget // workers - fixed) // per_gene)))
    n_batches = -(-max(1, n_genes) // cap)
    n_batches = -(-n_batches // workers) * workers
    size = -(-max(1, n_genes) // n_batches)
    if size > 16:
        size = -(-size // 8) * 8
    return max(1, min(size, cap))


def cache_dir() -> Path | None:
    """Where compiled programs are kept (``None``: on-disk cache disabled)."""
    env = os.environ.get("JAXVELO_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in ("", "0", "none", "off") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxvelo"


@functools.cache
def _core_hash() -> str:
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _spec(tree) -> list:
    return [(tuple(np.shape(x)), str(np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype))
            for x in jax.tree_util.tree_leaves(tree)]  # fmt: skip


def _key(cfg, has_nbrs, init_vals, host, gd, nb, ld) -> str:
    import jaxlib

    dev = jax.devices()[0]
    parts = (
        jax.__version__, jaxlib.__version__, dev.platform, getattr(dev, "device_kind", ""),
        _core_hash(), repr(cfg), has_nbrs, init_vals, host, numpy_exp_log(),
        native_f32_division(),
        _spec(gd), _spec(nb), _spec(ld), repr(jax.tree_util.tree_structure(nb)), COMPILER_OPTIONS,
    )  # fmt: skip
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


# Programs kept in memory for warm calls (a few: each holds its compiled code).
_MEMORY: collections.OrderedDict[str, Callable] = collections.OrderedDict()
_MEMORY_SIZE = 4


def _executable(cfg, has_nbrs, init_vals, gd, nb, ld, n_dev: int = 1) -> list[Callable]:
    """The compiled program for these arguments, one per device (the first ``n_dev``):
    from memory, from the disk cache, or traced and compiled (then stored).

    Every device runs the same single-device program, so a gene's result does not depend
    on the device it ran on (or on the device count)."""
    host = use_host_kernels()
    if host:
        from . import host_kernels

        # custom-call targets the program refers to by name; waits for preload_kernels,
        # whose check of numpy's exp/log the key then reads (not run twice at once)
        host_kernels.register_all()
    key = _key(cfg, has_nbrs, init_vals, host, gd, nb, ld)
    return [_loaded(key, d, cfg, has_nbrs, init_vals, gd, nb, ld) for d in range(n_dev)]


def preload_kernels() -> None:
    """Start loading the CPU kernels in a background thread (where they are used: numba's
    start-up, its on-disk cache, the custom-call targets; ~0.35 s of a cold call), so that
    it overlaps the caller's work before the program is needed -- the gene selection, the
    data's extraction. The program's own ``register_all()`` waits for it (and raises what
    failed here)."""
    if not use_host_kernels():
        return

    def load():
        try:
            from . import host_kernels

            host_kernels.register_all()
        except Exception:  # raised again where the program needs the kernels
            pass

    threading.Thread(target=load, name="jaxvelo-kernels", daemon=True).start()


def _loaded(key, d, cfg, has_nbrs, init_vals, gd, nb, ld) -> Callable:
    """The program for device ``d``, kept in memory (a few, least recently used out)."""
    mkey = f"{key}/{d}"
    if mkey in _MEMORY:
        _MEMORY.move_to_end(mkey)
        return _MEMORY[mkey]
    fn = _cached_program(key, d, cfg, has_nbrs, init_vals, gd, nb, ld)
    _MEMORY[mkey] = fn
    while len(_MEMORY) > _MEMORY_SIZE:
        _MEMORY.popitem(last=False)
    _release_heap()
    return fn


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


def _release_heap() -> None:
    """Give the heap freed by compiling or loading a program back to the OS.

    Loading a serialised XLA:CPU program allocates ~1.6 GB transiently (the pancreas
    program); glibc keeps most of it in its arenas afterwards (RSS 1961 -> 1074 MiB after
    ``malloc_trim(0)``, measured), where it would add to every later peak."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _cached_program(key, d, cfg, has_nbrs, init_vals, gd, nb, ld) -> Callable:
    """Device ``d``'s program: from the disk cache, or traced and compiled (then stored).

    A stored program refers to the device it was compiled for, so each device has its own
    entry, loaded bound to that device (``execution_devices``): by default
    ``deserialize_and_load`` binds a program to all of the backend's devices, and with
    several (``--xla_force_host_platform_device_count``, a multi-GPU machine) executing it
    failed ("Expected args ... to have 2 shards")."""
    device = jax.devices()[d]
    folder = cache_dir()
    path = None if folder is None else folder / (f"{key}.xla" if d == 0 else f"{key}.d{d}.xla")
    if path is not None and path.exists():
        from jax.experimental.serialize_executable import deserialize_and_load

        in_tree = jax.tree_util.tree_structure(((gd, nb, ld), {}))
        out_tree = jax.tree_util.tree_structure(GeneResult(*range(len(GeneResult._fields))))
        try:
            fn = deserialize_and_load(path.read_bytes(), in_tree, out_tree,
                                      execution_devices=[device])  # fmt: skip
            os.utime(path)  # recently used: pruned last
            return fn
        except Exception:  # a stale or truncated entry: recompile and overwrite
            pass
    args = (gd, nb, ld) if d == 0 else jax.device_put((gd, nb, ld), device)
    with _one_frame_locations():
        lowered = _program(cfg, has_nbrs, init_vals).lower(*args)
    fn = lowered.compile(compiler_options=COMPILER_OPTIONS)
    if path is not None:
        _store(path, fn)
    return fn


# XLA options of the fit program. ``xla_allow_excess_precision`` (default on) lets XLA:GPU
# run ``SimplifyFPConversions``, which folds every convert chain ``f64 -> f32 -> f64`` to its
# input: it erased :func:`~jaxvelo.core.numerics.round32`, the emulation of upstream's
# float32 operations, and with it the agreement with scVelo on the H200 (XLA:CPU runs that
# pass only for oneDNN rewrites; its programs are unchanged, bit for bit).
COMPILER_OPTIONS = {"xla_allow_excess_precision": False}


def _one_frame_locations():
    """Lower with one source frame per operation instead of its whole Python call stack.

    JAX's default (``jax_include_full_tracebacks_in_locations``) records every
    operation's call stack (up to 100 frames) in the StableHLO's locations, which the
    lowering builds and XLA then parses and keeps in the program. With one frame (the
    user frame, still in the compiled program's metadata) the 3696-cell pancreas program
    lowered and compiled ~1 s faster (first run 48.98 -> 47.28 s, interleaved; 54.0 ->
    45.9 s in a noisier pair) and its serialised form went from 5.9 to 5.0 MB. An explicit
    ``JAX_INCLUDE_FULL_TRACEBACKS_IN_LOCATIONS`` in the environment is left in charge."""
    if "JAX_INCLUDE_FULL_TRACEBACKS_IN_LOCATIONS" in os.environ:
        return contextlib.nullcontext()
    try:
        from jax._src import config as jax_config

        return jax_config.include_full_tracebacks_in_locations(False)
    except (ImportError, AttributeError, TypeError):  # not in this JAX version
        return contextlib.nullcontext()


DEFAULT_CACHE_LIMIT = 2 << 30  # bytes on disk; least recently used programs go first


def cache_limit() -> int:
    """Size cap of the on-disk cache: ``$JAXVELO_CACHE_MAX`` (e.g. ``5G``), default 2 GiB."""
    env = os.environ.get("JAXVELO_CACHE_MAX", "").strip()
    return _parse_bytes(env) if env else DEFAULT_CACHE_LIMIT


def write_atomic(path: Path, data: bytes) -> None:
    """``data`` into ``path`` (its folder created) through a temporary file beside it and
    a rename: concurrent processes never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(data)
    os.replace(f.name, path)


def _store(path: Path, compiled) -> None:
    from jax.experimental.serialize_executable import serialize

    try:
        payload, _, _ = serialize(compiled)
        write_atomic(path, payload)
        _prune(path.parent, cache_limit(), keep=path)
    except (OSError, ValueError, NotImplementedError, pickle.PicklingError):
        pass  # caching is an optimisation; an unwritable folder must not fail the fit


def _prune(folder: Path, limit: int, keep: Path) -> None:
    """Delete the least recently used programs (by modification time, which a load
    refreshes) until the folder holds at most ``limit`` bytes; ``keep`` stays."""
    entries = []
    for f in folder.glob("*.xla"):
        try:
            st = f.stat()
        except OSError:
            continue
        entries.append((st.st_mtime, st.st_size, f))
    total = sum(size for _, size, _ in entries)
    for _, size, f in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if f == keep:
            continue
        try:
            f.unlink()
            total -= size
        except OSError:
            pass


def size_bucket(n: int) -> int:
    """``n`` rounded up to a size bucket: a multiple of 1/16 of the power of two below it
    (``n`` itself up to 16). Padding to it costs at most 1/16 (on average ~3%) more
    cells or entries, and datasets whose sizes fall in one bucket share a compiled
    program (issue: "cells padded to size buckets")."""
    n = int(n)
    if n <= 16:
        return max(n, 0)
    step = 1 << (n.bit_length() - 5)  # 2**(floor(log2 n) - 4)
    return -(-n // step) * step


def entries_bucket(nnz: int, n_real: int, n_cells: int) -> int:
    """Length of the neighbour lists' entry arrays for ``nnz`` entries of ``n_real``
    cells padded to ``n_cells``: ``n_cells`` times the mean degree rounded up to
    ``3 * 2**k`` (12, 24, 48, 96, ...). The steps sit between the usual ``n_neighbors``
    and their symmetrised graphs' mean degrees (each row has ``n_neighbors - 1`` entries
    at least and rarely 1.5 times as many): scVelo's 30 give 33.4 at 145 simulated
    cells, 42 on the pancreas -- all 48 -- so kNN graphs of one ``n_neighbors`` share a
    length. Entries past the real ones are never read (the loops run over ``ptr``):
    they cost memory only."""
    per = int(nnz) / max(int(n_real), 1)
    width = 12
    while width < per:
        width *= 2
    return max(int(n_cells), 1) * width


def neighbors_from_csr(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    n_cells: int | None = None,
    n_entries: int | None = None,
) -> Neighbors:
    """The neighbour lists of :class:`~jaxvelo.core.assign.Neighbors` from a CSR
    matrix's arrays (CSR storage order kept: scipy's summation order).

    ``n_cells``: rows in all (the padded cell count; the extra rows are empty);
    ``n_entries``: length of ``idx``/``val`` (at least the number of entries; the rest is
    unused padding).
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    n = len(indptr) - 1
    nnz = int(indptr[-1]) if n else 0
    n_cells = n if n_cells is None else int(n_cells)
    n_entries = max(nnz, 1) if n_entries is None else int(n_entries)
    if n_cells < n or n_entries < nnz:
        raise ValueError(
            f"neighbour lists of {n} rows and {nnz} entries do not fit "
            f"n_cells={n_cells}, n_entries={n_entries}"
        )
    if n_entries >= 2**31:
        raise ValueError(f"{n_entries} neighbour entries exceed int32 indices")
    ptr = np.full(n_cells + 1, nnz, dtype=np.int32)
    ptr[: n + 1] = indptr
    idx = np.zeros(n_entries, dtype=np.int32)
    idx[:nnz] = np.asarray(indices)[:nnz]
    val = np.zeros(n_entries, dtype=np.asarray(data).dtype)
    val[:nnz] = np.asarray(data)[:nnz]
    return Neighbors(ptr=ptr, idx=idx, val=val)


def pad_neighbors(nbrs: Neighbors, n_cells: int, n_entries: int) -> Neighbors:
    """``nbrs`` with empty rows up to ``n_cells`` and entries padded to ``n_entries``."""
    ptr = np.asarray(nbrs.ptr)
    nnz = int(ptr[-1])
    return neighbors_from_csr(ptr, np.asarray(nbrs.idx)[:nnz], np.asarray(nbrs.val)[:nnz],
                              n_cells, n_entries)  # fmt: skip


def cell_buckets() -> bool:
    """Whether :func:`fit_genes` pads cells to size buckets: ``$JAXVELO_CELL_BUCKETS``
    (``1``, default, or ``0``)."""
    env = os.environ.get("JAXVELO_CELL_BUCKETS", "1").strip().lower()
    if env in ("1", "true", "yes", "on", ""):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"JAXVELO_CELL_BUCKETS must be 0 or 1, got {env!r}")


def _padded_config(cfg, n_pad: int):
    """``cfg`` for a cell axis padded to ``n_pad`` (the real count is a value of the data,
    :attr:`~jaxvelo.core.em.GeneData.n`, so one program serves a whole size bucket)."""
    if isinstance(cfg, GradientConfig):
        return dataclasses.replace(cfg, fit=_padded_config(cfg.fit, n_pad))
    return dataclasses.replace(cfg, n_obs=n_pad)


_CELL_FIELDS = ("t", "tau", "tau_")  # GeneResult fields with a cell axis


def _real_cells(v: np.ndarray, field: str, n_obs: int) -> np.ndarray:
    return v[:, :n_obs] if field in _CELL_FIELDS else v


def fit_genes(
    u: np.ndarray,
    s: np.ndarray,
    cfg: FitConfig,
    nbrs: Neighbors | None = None,
    prior: np.ndarray | None = None,
    batch_size: int | None = None,
    init_vals: tuple | None = None,
    progress: Callable[[int], None] | None = None,
    n_jobs: int = 1,
    loaded: Loaded | None = None,
) -> dict[str, np.ndarray]:
    """Fit every gene (column) of ``u``/``s`` (cells x genes, data dtype kept).

    ``loaded`` (with ``cfg.load_pars``): stored parameters per gene (leading gene axis;
    ``t`` as cells x genes) to start from instead of the initialisation.

    ``batch_size`` None: :func:`auto_batch_size` (memory budget, balanced batches).
    Batches run on ``n_jobs`` threads at once (the compiled program releases the GIL) and
    are dealt to the devices in turn (:func:`n_devices`; one thread per device at least);
    results do not depend on ``n_jobs``, the device count or (exact mode) ``batch_size``.

    Cells are padded to a size bucket (:func:`size_bucket`; off with
    ``JAXVELO_CELL_BUCKETS=0``, see :func:`cell_buckets`): padded cells have no counts, no
    prior and no neighbours and take part in no cell group, so results are bitwise those
    of the unpadded fit, and datasets of similar size share one compiled program. Not in
    the gradient mode (its gradients' sums over cells are XLA reductions whose order
    depends on the padded length: last-bit differences).

    Returns a dict of numpy arrays with a leading gene axis (fields of
    :class:`~jaxvelo.core.em.GeneResult`).
    """
    n_obs, n_genes = u.shape
    if prior is None:
        prior = np.zeros((n_obs,), bool)
    prior = np.asarray(prior, bool)
    n_real = None
    # The gradient mode keeps its cell count: reverse-mode sums over the cells are XLA
    # reductions, whose order depends on the array's length (last-bit differences).
    if cell_buckets() and not isinstance(cfg, GradientConfig):
        n_pad = size_bucket(n_obs)
        pad = ((0, n_pad - n_obs), (0, 0))
        u, s, prior = np.pad(u, pad), np.pad(s, pad), np.pad(prior, pad[0])
        if nbrs is not None:
            nnz = int(np.asarray(nbrs.ptr)[-1])
            nbrs = pad_neighbors(nbrs, n_pad, entries_bucket(nnz, n_obs, n_pad))
        if loaded is not None:
            loaded = loaded._replace(t=np.pad(np.asarray(loaded.t, np.float64), pad))
        cfg = _padded_config(cfg, n_pad)
        n_real = np.int32(n_obs)
    n_cells = u.shape[0]
    prior_g = np.broadcast_to(prior[:, None], (n_cells, n_genes))
    if cache_dir() is not None:
        cache_limit()  # a malformed $JAXVELO_CACHE_MAX fails here, not silently later
    n_dev = n_devices()
    workers = max(int(n_jobs), n_dev)
    if batch_size is None:
        mode = "gradient" if isinstance(cfg, GradientConfig) else "exact"
        batch_size = auto_batch_size(n_genes, n_cells, workers, mode)
    batch_size = max(1, min(int(batch_size), n_genes))
    starts = list(range(0, n_genes, batch_size))

    def batch(start):
        cols = np.arange(start, min(start + batch_size, n_genes))
        pad = np.concatenate([cols, np.full(batch_size - len(cols), cols[0])])
        gd = GeneData(
            u=np.ascontiguousarray(u[:, pad].T),
            s=np.ascontiguousarray(s[:, pad].T),
            prior=np.ascontiguousarray(prior_g[:, pad].T),
            n=n_real,
        )
        ld = None
        if loaded is not None:
            ld = Loaded(
                pars=np.ascontiguousarray(np.asarray(loaded.pars, np.float64)[pad]),
                t=np.ascontiguousarray(np.asarray(loaded.t, np.float64)[:, pad].T),
                steady_u=np.asarray(loaded.steady_u, np.float64)[pad],
                steady_s=np.asarray(loaded.steady_s, np.float64)[pad],
                pval_steady=np.asarray(loaded.pval_steady, np.float64)[pad],
            )
        return cols, gd, ld

    with jax.enable_x64(True):
        # device_put, not jnp.asarray: no small conversion program compiled per array
        # (~0.2 s of a cold call on 19 neighbour arrays)
        nb = None if nbrs is None else jax.device_put(nbrs)
        if cfg.load_pars != (loaded is not None):
            raise ValueError("`loaded` must be given exactly when cfg.load_pars is set.")
        _, gd0, ld0 = batch(0)
        n_dev = min(n_dev, len(starts))
        fns = _executable(cfg, nbrs is not None, init_vals, gd0, nb, ld0, n_dev)
        devs = jax.devices()[:n_dev]
        nbs = [nb] if n_dev == 1 else [jax.device_put(nb, d) for d in devs]

        def run(i):
            d = i % n_dev  # batches are dealt to the devices in turn
            with jax.enable_x64(True):  # thread-local: re-entered in worker threads
                cols, gd, ld = batch(starts[i])
                if n_dev > 1:
                    gd, ld = jax.device_put((gd, ld), devs[d])
                res = jax.device_get(fns[d](gd, nbs[d], ld))
            if progress is not None:
                progress(len(cols))
            return [_real_cells(np.asarray(v)[: len(cols)], k, n_obs)
                    for k, v in zip(GeneResult._fields, res, strict=True)]  # fmt: skip

        if workers > 1 and len(starts) > 1:
            with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(run, range(len(starts))))
        else:
            results = [run(i) for i in range(len(starts))]
    return {k: np.concatenate([r[i] for r in results]) for i, k in enumerate(GeneResult._fields)}
