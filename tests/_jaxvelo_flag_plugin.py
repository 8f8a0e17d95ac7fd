"""pytest plugin: run a foreign test session (scVelo's own tests) with ``jaxvelo.enable()``.

Loaded by ``tests/test_backend.py`` with ``-p _jaxvelo_flag_plugin`` in a subprocess. Records,
per test, its outcome and how often jaxvelo's core and upstream's ``DynamicsRecovery.fit``
ran, as JSON in ``$JAXVELO_FLAG_REPORT``. With ``JAXVELO_NP2_SHIM=1`` it also works around
scVelo 0.3.4's NumPy 2 bug in ``leastsq_generalized`` (``tools/optimization.py`` ~184 assigns a
length-1 array to an array element, "setting an array element with a sequence"), which breaks
``scv.tl.velocity`` in its stochastic mode independently of the dynamical model.
"""

from __future__ import annotations

import inspect
import json
import os
import sys

_records: dict[str, dict] = {}
_current: list[str | None] = [None]


def _record() -> dict:
    return _records.setdefault(str(_current[0]), {"jaxvelo": 0, "upstream": 0})


def _np2_shim() -> None:
    import scvelo.tools.velocity  # noqa: F401

    opt = sys.modules["scvelo.tools.optimization"]
    old = "gamma[i] = np.linalg.pinv(A.T.dot(A)).dot(A.T.dot(y[:, i]))"
    src = inspect.getsource(opt.leastsq_generalized)
    if old not in src:
        raise RuntimeError("scVelo's leastsq_generalized changed; the NumPy 2 shim is stale")
    src = src.replace(
        old, "gamma[i] = np.ravel(np.linalg.pinv(A.T.dot(A)).dot(A.T.dot(y[:, i])))[0]"
    )
    namespace = dict(vars(opt))
    exec(compile(src, opt.__file__, "exec"), namespace)
    for name in ("scvelo.tools.velocity", "scvelo.tools._steady_state_model"):
        sys.modules[name].leastsq_generalized = namespace["leastsq_generalized"]


def pytest_configure(config) -> None:
    from scvelo.tools._em_model_core import DynamicsRecovery

    import jaxvelo
    from jaxvelo.adapter import recover

    if os.environ.get("JAXVELO_NP2_SHIM") == "1":
        _np2_shim()
    fit_genes = recover.fit_genes

    def counting_fit_genes(*args, **kwargs):
        _record()["jaxvelo"] += 1
        return fit_genes(*args, **kwargs)

    upstream_fit = DynamicsRecovery.fit

    def counting_upstream_fit(self, *args, **kwargs):
        _record()["upstream"] += 1
        return upstream_fit(self, *args, **kwargs)

    recover.fit_genes = counting_fit_genes
    DynamicsRecovery.fit = counting_upstream_fit
    jaxvelo.enable()


def pytest_runtest_setup(item) -> None:
    _current[0] = item.nodeid


def pytest_runtest_logreport(report) -> None:
    rec = _records.setdefault(report.nodeid, {"jaxvelo": 0, "upstream": 0})
    if report.when == "call" or report.outcome != "passed":
        rec["outcome"] = report.outcome
        if report.failed:
            rec["error"] = str(report.longrepr)[-2000:]


def pytest_unconfigure(config) -> None:
    path = os.environ.get("JAXVELO_FLAG_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(_records, f, indent=1)
