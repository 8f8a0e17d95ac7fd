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
import functools
import hashlib
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from .assign import Neighbors, use_host_kernels
from .em import FitConfig, GeneData, GeneResult, Loaded, fit_gene


def _program(cfg: FitConfig, has_nbrs: bool, init_vals: tuple | None) -> Callable:
    def one(gd, nbrs, ld):
        return fit_gene(gd, nbrs if has_nbrs else None, cfg, init_vals, ld)

    ld_axes = Loaded(0, 0, 0, 0, 0) if cfg.load_pars else None
    return jax.jit(jax.vmap(one, in_axes=(GeneData(0, 0, 0), None, ld_axes)))


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
        _core_hash(), repr(cfg), has_nbrs, init_vals, host, _spec(gd), _spec(nb), _spec(ld),
        repr(jax.tree_util.tree_structure(nb)),
    )  # fmt: skip
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


# Programs kept in memory for warm calls (a few: each holds its compiled code).
_MEMORY: collections.OrderedDict[str, Callable] = collections.OrderedDict()
_MEMORY_SIZE = 4


def _executable(cfg, has_nbrs, init_vals, gd, nb, ld) -> Callable:
    """The compiled program for these arguments: from memory, from the disk cache, or
    traced and compiled (then stored)."""
    host = use_host_kernels()
    key = _key(cfg, has_nbrs, init_vals, host, gd, nb, ld)
    if key in _MEMORY:
        _MEMORY.move_to_end(key)
        return _MEMORY[key]
    if host:
        from . import host_kernels

        host_kernels.register_all()  # custom-call targets the program refers to by name
    in_tree = jax.tree_util.tree_structure(((gd, nb, ld), {}))
    out_tree = jax.tree_util.tree_structure(GeneResult(*range(len(GeneResult._fields))))
    folder = cache_dir()
    path = None if folder is None else folder / f"{key}.xla"
    fn = None
    if path is not None and path.exists():
        from jax.experimental.serialize_executable import deserialize_and_load

        try:
            fn = deserialize_and_load(path.read_bytes(), in_tree, out_tree)
        except Exception:  # a stale or truncated entry: recompile and overwrite
            fn = None
    if fn is None:
        fn = _program(cfg, has_nbrs, init_vals).lower(gd, nb, ld).compile()
        if path is not None:
            _store(path, fn)
    _MEMORY[key] = fn
    while len(_MEMORY) > _MEMORY_SIZE:
        _MEMORY.popitem(last=False)
    return fn


def _store(path: Path, compiled) -> None:
    from jax.experimental.serialize_executable import serialize

    try:
        payload, _, _ = serialize(compiled)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as f:
            f.write(payload)
        os.replace(f.name, path)  # atomic: concurrent processes never see half a file
    except (OSError, ValueError, NotImplementedError, pickle.PicklingError):
        pass  # caching is an optimisation; an unwritable folder must not fail the fit


def _degree_buckets(deg: np.ndarray, max_buckets: int) -> list[int]:
    """Upper degree bounds of at most ``max_buckets`` groups of rows that minimise the
    padded work ``sum(rows_in_group * max_degree_in_group)`` (dynamic programme over the
    distinct degrees)."""
    values, counts = np.unique(deg, return_counts=True)
    m = len(values)
    below = np.concatenate([[0], np.cumsum(counts)])  # rows with degree < values[j]
    inf = np.iinfo(np.int64).max // 4
    # cost[b][j]: best cost of covering values[:j] with b groups; arg for backtracking
    cost = np.full((max_buckets + 1, m + 1), inf, dtype=np.int64)
    arg = np.zeros((max_buckets + 1, m + 1), dtype=np.int64)
    cost[0, 0] = 0
    for b in range(1, max_buckets + 1):
        for j in range(1, m + 1):
            i = np.arange(j)
            c = cost[b - 1, i] + (below[j] - below[i]) * int(values[j - 1])
            k = int(np.argmin(c))
            cost[b, j], arg[b, j] = c[k], i[k]
    b = int(np.argmin(cost[:, m]))
    bounds, j = [], m
    while j > 0:
        bounds.append(int(values[j - 1]))
        j = int(arg[b, j])
        b -= 1
    return bounds[::-1]


def neighbors_from_csr(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, max_buckets: int = 6
) -> Neighbors:
    """Degree-bucketed neighbour lists (CSR storage order kept) from a CSR matrix's arrays.

    Rows are grouped into at most ``max_buckets`` buckets of similar degree so that the
    padded smoothing work stays close to the number of non-zeros (kNN graphs have a long
    tail of high-degree rows).
    """
    indptr = np.asarray(indptr)
    n = len(indptr) - 1
    deg = np.diff(indptr)
    rows_l, idx_l, val_l = [], [], []
    lo = -1
    for hi in _degree_buckets(deg, max_buckets) if n else []:
        rows = np.flatnonzero((deg > lo) & (deg <= hi)).astype(np.int32)
        lo = hi
        K = max(hi, 1)
        idx = np.repeat(rows[:, None], K, axis=1)
        val = np.zeros((len(rows), K), dtype=data.dtype)
        pos = np.arange(K)[None, :] < deg[rows][:, None]
        src = indptr[rows][:, None] + np.arange(K)[None, :]
        idx[pos] = indices[src[pos]]
        val[pos] = data[src[pos]]
        rows_l.append(rows)
        idx_l.append(idx)
        val_l.append(val)
    order = np.concatenate(rows_l) if rows_l else np.zeros(0, np.int32)
    inv = np.empty(n, dtype=np.int32)
    inv[order] = np.arange(n, dtype=np.int32)
    return Neighbors(rows=tuple(rows_l), idx=tuple(idx_l), val=tuple(val_l), inv=inv)


def fit_genes(
    u: np.ndarray,
    s: np.ndarray,
    cfg: FitConfig,
    nbrs: Neighbors | None = None,
    prior: np.ndarray | None = None,
    batch_size: int = 64,
    init_vals: tuple | None = None,
    progress: Callable[[int], None] | None = None,
    n_jobs: int = 1,
    loaded: Loaded | None = None,
) -> dict[str, np.ndarray]:
    """Fit every gene (column) of ``u``/``s`` (cells x genes, data dtype kept).

    ``loaded`` (with ``cfg.load_pars``): stored parameters per gene (leading gene axis;
    ``t`` as cells x genes) to start from instead of the initialisation.

    Batches run on ``n_jobs`` threads at once (the compiled program releases the GIL);
    results do not depend on ``n_jobs`` or ``batch_size``.

    Returns a dict of numpy arrays with a leading gene axis (fields of
    :class:`~jaxvelo.core.em.GeneResult`).
    """
    n_obs, n_genes = u.shape
    if prior is None:
        prior = np.zeros((n_obs,), bool)
    prior_g = np.broadcast_to(np.asarray(prior, bool)[:, None], (n_obs, n_genes))
    batch_size = max(1, min(int(batch_size), n_genes))
    starts = list(range(0, n_genes, batch_size))

    def batch(start):
        cols = np.arange(start, min(start + batch_size, n_genes))
        pad = np.concatenate([cols, np.full(batch_size - len(cols), cols[0])])
        gd = GeneData(
            u=np.ascontiguousarray(u[:, pad].T),
            s=np.ascontiguousarray(s[:, pad].T),
            prior=np.ascontiguousarray(prior_g[:, pad].T),
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
        nb = None if nbrs is None else jax.tree_util.tree_map(jax.numpy.asarray, nbrs)
        if cfg.load_pars != (loaded is not None):
            raise ValueError("`loaded` must be given exactly when cfg.load_pars is set.")
        _, gd0, ld0 = batch(0)
        fn = _executable(cfg, nbrs is not None, init_vals, gd0, nb, ld0)

        def run(start):
            with jax.enable_x64(True):  # thread-local: re-entered in worker threads
                cols, gd, ld = batch(start)
                res = jax.device_get(fn(gd, nb, ld))
            if progress is not None:
                progress(len(cols))
            return [np.asarray(v)[: len(cols)] for v in res]

        if n_jobs > 1 and len(starts) > 1:
            with concurrent.futures.ThreadPoolExecutor(max_workers=int(n_jobs)) as pool:
                results = list(pool.map(run, starts))
        else:
            results = [run(st) for st in starts]
    return {k: np.concatenate([r[i] for r in results]) for i, k in enumerate(GeneResult._fields)}
