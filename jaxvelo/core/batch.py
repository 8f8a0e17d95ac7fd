"""The one ``jit(vmap(...))`` boundary: padding, chunking and dispatch of gene batches.

Genes are padded to a fixed batch size (copies of the chunk's first gene, dropped
afterwards) so that every chunk reuses one compiled program and results do not depend on
the batch size. x64 is enabled only inside :func:`fit_genes` (``jax.enable_x64`` is a
context manager), never globally.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import numpy as np

from .assign import Neighbors
from .em import FitConfig, GeneData, GeneResult, fit_gene


@functools.lru_cache(maxsize=32)
def _compiled(cfg: FitConfig, has_nbrs: bool, init_vals: tuple | None) -> Callable:
    def one(gd, nbrs):
        return fit_gene(gd, nbrs if has_nbrs else None, cfg, init_vals)

    return jax.jit(jax.vmap(one, in_axes=(GeneData(0, 0, 0), None)))


def neighbors_from_csr(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> Neighbors:
    """Padded neighbour lists (CSR storage order kept) from a CSR matrix's arrays."""
    n = len(indptr) - 1
    deg = np.diff(indptr)
    K = max(int(deg.max()) if n else 0, 1)
    idx = np.repeat(np.arange(n, dtype=np.int32)[:, None], K, axis=1)
    val = np.zeros((n, K), dtype=data.dtype)
    pos = np.arange(K)[None, :] < deg[:, None]
    idx[pos] = indices
    val[pos] = data
    return Neighbors(idx=idx, val=val)


def fit_genes(
    u: np.ndarray,
    s: np.ndarray,
    cfg: FitConfig,
    nbrs: Neighbors | None = None,
    prior: np.ndarray | None = None,
    batch_size: int = 64,
    init_vals: tuple | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Fit every gene (column) of ``u``/``s`` (cells x genes, data dtype kept).

    Returns a dict of numpy arrays with a leading gene axis (fields of
    :class:`~jaxvelo.core.em.GeneResult`).
    """
    n_obs, n_genes = u.shape
    if prior is None:
        prior = np.zeros((n_obs,), bool)
    prior_g = np.broadcast_to(np.asarray(prior, bool)[:, None], (n_obs, n_genes))
    batch_size = max(1, min(int(batch_size), n_genes))
    out: dict[str, list[np.ndarray]] = {k: [] for k in GeneResult._fields}
    with jax.enable_x64(True):
        fn = _compiled(cfg, nbrs is not None, init_vals)
        nb = None if nbrs is None else Neighbors(*(jax.numpy.asarray(a) for a in nbrs))
        for start in range(0, n_genes, batch_size):
            cols = np.arange(start, min(start + batch_size, n_genes))
            pad = np.concatenate([cols, np.full(batch_size - len(cols), cols[0])])
            gd = GeneData(
                u=np.ascontiguousarray(u[:, pad].T),
                s=np.ascontiguousarray(s[:, pad].T),
                prior=np.ascontiguousarray(prior_g[:, pad].T),
            )
            res = jax.device_get(fn(gd, nb))
            for k, v in zip(GeneResult._fields, res, strict=True):
                out[k].append(np.asarray(v)[: len(cols)])
            if progress is not None:
                progress(len(cols))
    return {k: np.concatenate(v) for k, v in out.items()}
