"""Concordance of jaxvelo's fit with upstream scVelo's on the same AnnData.

The gate of the core issue: identical set of fitted genes; Pearson >= 0.999 on
``fit_alpha, fit_beta, fit_gamma, fit_t_, fit_likelihood``; >= 99% of fitted genes within
1e-6 relative on all of alpha, beta, gamma, t_, scaling and likelihood; Pearson >= 0.999 of
the ``velocity`` layer of ``scv.tl.velocity(mode="dynamical")``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

PEARSON_PARS = ("alpha", "beta", "gamma", "t_", "likelihood")
EXACT_PARS = ("alpha", "beta", "gamma", "t_", "scaling", "likelihood")
TIME_LAYERS = ("fit_t", "fit_tau", "fit_tau_")


@dataclass
class Concordance:
    """Concordance figures; ``passed`` applies the gate."""

    n_genes_ref: int
    n_genes_test: int
    n_genes_differ: int
    pearson: dict[str, float]
    frac_within_1e6: float
    max_rel_diff: dict[str, float]
    diverging_genes: list[str] = field(default_factory=list)
    velocity_pearson: float | None = None
    # not part of the gate: genes whose alpha/beta/gamma/t_/scaling/likelihood are upstream's
    # bit for bit, and of those whose time layers (fit_t, fit_tau, fit_tau_: those both fits
    # have) are too
    frac_bitwise: float | None = None
    frac_t_bitwise: float | None = None

    @property
    def passed(self) -> bool:
        ok = self.n_genes_differ == 0 and self.frac_within_1e6 >= 0.99
        ok &= all(self.pearson[k] >= 0.999 for k in PEARSON_PARS)
        if self.velocity_pearson is not None:
            ok &= self.velocity_pearson >= 0.999
        return bool(ok)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d

    def summary(self) -> str:
        lines = [
            f"fitted genes: reference {self.n_genes_ref}, jaxvelo {self.n_genes_test}, "
            f"differing {self.n_genes_differ}",
            "Pearson: " + ", ".join(f"{k} {v:.7f}" for k, v in self.pearson.items()),
            f"genes within 1e-6 relative on {'/'.join(EXACT_PARS)}: "
            f"{100 * self.frac_within_1e6:.2f}%",
            "max relative difference: "
            + ", ".join(f"{k} {v:.1e}" for k, v in self.max_rel_diff.items()),
        ]
        if self.velocity_pearson is not None:
            lines.append(f"velocity Pearson: {self.velocity_pearson:.7f}")
        if self.diverging_genes:
            lines.append(f"diverging genes ({len(self.diverging_genes)}): "
                         + ", ".join(self.diverging_genes[:20]))  # fmt: skip
        if self.frac_bitwise is not None:
            lines.append(f"genes bitwise equal on {'/'.join(EXACT_PARS)}: "
                         f"{100 * self.frac_bitwise:.2f}%"
                         + ("" if self.frac_t_bitwise is None else
                            f" (and on {'/'.join(TIME_LAYERS)}: "
                            f"{100 * self.frac_t_bitwise:.2f}%)"))  # fmt: skip
        lines.append("gate: " + ("PASSED" if self.passed else "FAILED"))
        return "\n".join(lines)


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Equal values, NaN equal to NaN."""
    return (a == b) | (np.isnan(a) & np.isnan(b))


def _rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    scale = np.maximum(np.abs(a), np.abs(b))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.abs(a - b) / np.where(scale == 0, 1, scale)
    both_nan = np.isnan(a) & np.isnan(b)
    return np.where(both_nan, 0.0, np.where(np.isnan(r), np.inf, r))


def compare(ref, test, velocity: bool = True) -> Concordance:
    """Compare two fitted AnnData objects (``ref`` from upstream, ``test`` from jaxvelo)."""
    fr = np.isfinite(ref.var["fit_alpha"].to_numpy(float))
    ft = np.isfinite(test.var["fit_alpha"].to_numpy(float))
    both = fr & ft
    pearson, maxrel = {}, {}
    rel_all = np.zeros(both.sum())
    bitwise = np.ones(both.sum(), bool)
    for name in dict.fromkeys(PEARSON_PARS + EXACT_PARS):
        a = ref.var[f"fit_{name}"].to_numpy(float)[both]
        b = test.var[f"fit_{name}"].to_numpy(float)[both]
        if name in PEARSON_PARS:
            ok = np.isfinite(a) & np.isfinite(b)
            pearson[name] = float(np.corrcoef(a[ok], b[ok])[0, 1]) if ok.sum() > 1 else np.nan
        r = _rel(a, b)
        maxrel[name] = float(r.max()) if len(r) else 0.0
        if name in EXACT_PARS:
            rel_all = np.maximum(rel_all, r)
            bitwise &= _same(a, b)
    within = rel_all <= 1e-6
    names = np.asarray(ref.var_names)[both]
    order = np.argsort(-rel_all)
    diverging = [str(names[i]) for i in order if not within[i]]
    frac_t = None
    layers = [k for k in TIME_LAYERS if k in ref.layers and k in test.layers]
    if layers and bitwise.any():
        cols = np.flatnonzero(both)[bitwise]
        same_t = np.ones(len(cols), bool)
        for k in layers:
            a, b = (np.asarray(x.layers[k][:, cols], float) for x in (ref, test))
            same_t &= np.all(_same(a, b), axis=0)
        frac_t = float(same_t.mean())
    vp = None
    if velocity:
        vp = velocity_pearson(ref, test)
    return Concordance(
        n_genes_ref=int(fr.sum()),
        n_genes_test=int(ft.sum()),
        n_genes_differ=int((fr != ft).sum()),
        pearson=pearson,
        frac_within_1e6=float(within.mean()) if len(within) else 1.0,
        max_rel_diff=maxrel,
        diverging_genes=diverging,
        velocity_pearson=vp,
        frac_bitwise=float(bitwise.mean()) if len(bitwise) else 1.0,
        frac_t_bitwise=frac_t,
    )


def velocity_pearson(ref, test) -> float:
    """Pearson of ``scv.tl.velocity(mode="dynamical")`` layers over finite entries."""
    import scvelo as scv

    verbosity = scv.settings.verbosity
    scv.settings.verbosity = 0
    try:
        vr = scv.tl.velocity(ref, mode="dynamical", copy=True).layers["velocity"]
        vt = scv.tl.velocity(test, mode="dynamical", copy=True).layers["velocity"]
    finally:
        scv.settings.verbosity = verbosity
    vr, vt = np.asarray(vr, float).ravel(), np.asarray(vt, float).ravel()
    ok = np.isfinite(vr) & np.isfinite(vt)
    return float(np.corrcoef(vr[ok], vt[ok])[0, 1])
