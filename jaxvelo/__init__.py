"""jaxvelo: scVelo's dynamical model as a gene-batched JAX fitter.

``jaxvelo.recover_dynamics`` is a drop-in for ``scvelo.tl.recover_dynamics`` (scVelo 0.3.4);
``jaxvelo.enable()`` / ``with jaxvelo.enabled():`` make scVelo itself use it.
"""

from __future__ import annotations

from .adapter.recover import recover_dynamics
from .backend import disable, enable, enabled, is_enabled

__version__ = "0.1.0.dev0"

__all__ = ["__version__", "disable", "enable", "enabled", "is_enabled", "recover_dynamics"]
