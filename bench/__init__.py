"""jaxvelo's side-by-side benchmark suite, run as ``jaxvelo bench`` (see ``docs/benchmarks.md``).

Lives next to the package in the repository, not inside it: it is not installed with
``pip install .``; ``jaxvelo bench`` finds it from an editable install or a clone.

- ``tiers``  — the tier registry (datasets, sizes, which genes are fitted) and their cache files.
- ``child``  — what runs in each fresh subprocess: prepare a tier, one fit (timings, peak RSS),
  concordance of two fits; each writes one JSON line.
- ``run``    — the parent: plans the runs, pins threads, alternates the subprocesses, collects.
- ``report`` — medians and speed-ups, ``results.json``, ``results.md`` and the PNG charts.

Nothing here imports jax, scVelo or AnnData at import time (only the children do).
"""

from __future__ import annotations
