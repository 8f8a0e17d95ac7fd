"""Shared test helper: upstream scVelo's ``recover_dynamics``, quietly."""

from __future__ import annotations

import warnings


def upstream_recover(adata, **kw):
    """``scv.tl.recover_dynamics(adata, show_progress_bar=False, **kw)`` without scVelo's log
    lines and warnings (verbosity restored afterwards)."""
    import scvelo as scv

    verbosity = scv.settings.verbosity
    scv.settings.verbosity = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return scv.tl.recover_dynamics(adata, show_progress_bar=False, **kw)
    finally:
        scv.settings.verbosity = verbosity
