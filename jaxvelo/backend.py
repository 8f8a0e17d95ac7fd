"""Route scVelo's dynamical model to jaxvelo, and back.

While enabled, every module-level reference that scVelo's loaded modules hold to
``scvelo.tools._em_model_core.recover_dynamics`` is replaced with one wrapper that calls
:func:`jaxvelo.recover_dynamics`: ``scvelo.tl.recover_dynamics`` (the same module as
``scvelo.tools``) and ``_em_model_core.recover_dynamics`` itself, which
``scvelo.tl.differential_kinetic_test`` calls. The class API
``scvelo.tools.ExpectationMaximizationModel.fit`` (scVelo 0.3.4, ``tools/_em_model.py``) is
replaced with a method that fits with jaxvelo (:func:`jaxvelo.adapter.em_model.fit`).
The wrappers keep upstream's name, docstring and signature (``functools.wraps``).

:func:`disable` puts the original objects back (``scv.tl.recover_dynamics is original``),
including any copy of the wrapper a scVelo module imported while enabled. References held
outside scVelo's modules (``from scvelo.tl import recover_dynamics`` in user code) are not
touched.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

__all__ = ["disable", "enable", "enabled", "is_enabled"]


class _Patch(NamedTuple):
    """The original scVelo objects and the jaxvelo wrappers that replace them."""

    recover: Callable  # scvelo.tools._em_model_core.recover_dynamics
    recover_wrapper: Callable
    em_class: type  # scvelo.tools._em_model.ExpectationMaximizationModel
    fit: Callable  # its ``fit`` (from the class __dict__)
    fit_wrapper: Callable


_lock = threading.RLock()
_patch: _Patch | None = None


def _scvelo_modules() -> Iterator[Any]:
    """Loaded scVelo modules, each once (``scvelo.tl`` is ``scvelo.tools``)."""
    seen: set[int] = set()
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "scvelo" or name.startswith("scvelo.")):
            continue
        if id(mod) in seen or not isinstance(getattr(mod, "__dict__", None), dict):
            continue
        seen.add(id(mod))
        yield mod


def _replace(old: Callable, new: Callable) -> None:
    for mod in _scvelo_modules():
        for key, value in list(vars(mod).items()):
            if value is old:
                setattr(mod, key, new)


def _wrappers(recover: Callable, fit: Callable) -> tuple[Callable, Callable]:
    @functools.wraps(recover)
    def recover_dynamics(*args, **kwargs):
        from .adapter import recover as _recover

        return _recover.recover_dynamics(*args, **kwargs)

    @functools.wraps(fit)
    def em_fit(self, *args, **kwargs):
        from .adapter import em_model

        return em_model.fit(self, *args, **kwargs)

    recover_dynamics.__jaxvelo__ = True  # type: ignore[attr-defined]
    em_fit.__jaxvelo__ = True  # type: ignore[attr-defined]
    return recover_dynamics, em_fit


def enable() -> None:
    """Make scVelo's ``recover_dynamics`` and ``ExpectationMaximizationModel.fit`` use jaxvelo.

    Idempotent: enabling twice changes nothing.
    """
    global _patch
    with _lock:
        if _patch is not None:
            return
        import scvelo.tools  # noqa: F401  (loads _em_model_core and _em_model)

        core = sys.modules["scvelo.tools._em_model_core"]
        em = sys.modules["scvelo.tools._em_model"]
        recover = core.recover_dynamics
        cls = em.ExpectationMaximizationModel
        fit = cls.__dict__["fit"]
        recover_wrapper, fit_wrapper = _wrappers(recover, fit)
        _replace(recover, recover_wrapper)
        cls.fit = fit_wrapper
        _patch = _Patch(recover, recover_wrapper, cls, fit, fit_wrapper)


def disable() -> None:
    """Restore scVelo's original objects (identity). Idempotent."""
    global _patch
    with _lock:
        if _patch is None:
            return
        _replace(_patch.recover_wrapper, _patch.recover)
        _patch.em_class.fit = _patch.fit
        _patch = None


def is_enabled() -> bool:
    """Whether scVelo's dynamical model currently runs jaxvelo."""
    return _patch is not None


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """``with jaxvelo.enabled(): ...`` runs scVelo's dynamical model with jaxvelo.

    On leaving (also by an exception) the state from before the ``with`` is restored:
    disabled again, or still enabled when it was enabled already.
    """
    was = is_enabled()
    enable()
    try:
        yield
    finally:
        if was:
            enable()
        else:
            disable()
