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


def test_concordance_counts_bitwise_genes():
    """``compare`` reports genes whose six gated values are bit for bit upstream's (NaN
    equal to NaN), and of those, whose time layers' columns are too; the gate ignores both."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    from jaxvelo.concordance import compare

    rng = np.random.default_rng(0)
    names = ("alpha", "beta", "gamma", "t_", "scaling", "likelihood")
    var = pd.DataFrame({f"fit_{k}": rng.uniform(0.5, 2, 4) for k in names},
                       index=[f"g{i}" for i in range(4)])  # fmt: skip
    var.loc["g3", "fit_likelihood"] = np.nan  # NaN in both: equal
    ref = ad.AnnData(np.zeros((5, 4)), var=var.copy())
    ref.layers["fit_t"] = rng.uniform(0, 5, (5, 4))
    ref.layers["fit_tau"] = rng.uniform(0, 5, (5, 4))
    test = ref.copy()
    test.var.loc["g1", "fit_gamma"] = np.nextafter(ref.var.loc["g1", "fit_gamma"], 9)  # 1 ulp
    test.layers["fit_t"][2, 2] = np.nextafter(ref.layers["fit_t"][2, 2], 9)
    c = compare(ref, test, velocity=False)
    assert c.frac_bitwise == 0.75  # g0, g2, g3
    assert c.frac_t_bitwise == 2 / 3  # g2's fit_t differs
    test.layers["fit_tau"][0, 0] = 0.0  # and g0's fit_tau
    assert compare(ref, test, velocity=False).frac_t_bitwise == 1 / 3
    assert c.frac_within_1e6 == 1.0 and c.passed
    assert "bitwise equal" in c.summary()
