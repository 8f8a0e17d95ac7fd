"""Package structure: the numerical core stays free of AnnData/scVelo."""

from __future__ import annotations

import subprocess
import sys


def test_core_imports_no_anndata():
    code = (
        "import sys, jaxvelo.core.em, jaxvelo.core.batch; "
        "bad = [m for m in ('anndata', 'scvelo', 'scanpy') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_version_and_api():
    import jaxvelo

    assert jaxvelo.__version__
    assert callable(jaxvelo.recover_dynamics)
