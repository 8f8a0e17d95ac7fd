"""The EM schedule's single evaluation site: run-time assignment modes (``ModeSwitch``),
lazy per-gene branches (``cond_any``) and the size of the compiled program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scvelo.core import SplicingDynamics

from jaxvelo.core import assign
from jaxvelo.core.numerics import cond_any

MODES = (None, "projection", "full_projection")


def _gene(seed: int, n: int = 400):
    rng = np.random.default_rng(seed)
    u, s = rng.gamma(2.0, 0.5, n), rng.gamma(2.0, 1.0, n)
    u[rng.random(n) < 0.1] = 0
    alpha, beta, gamma = rng.uniform(0.5, 3, 3)
    t_ = rng.uniform(2, 10)
    u0_, s0_ = SplicingDynamics(alpha=alpha, beta=beta, gamma=gamma).get_solution(t_, False)
    return [jnp.asarray(x) for x in (u, s, alpha, beta, gamma, t_, u0_, s0_)]


@pytest.mark.parametrize("modes", [MODES, (None, "projection"), ("partial_projection", None)])
def test_mode_switch_equals_static_modes_under_vmap(modes):
    """Genes at different schedule steps (a batched mode index) get bitwise what each
    static mode gives."""
    genes = [_gene(seed) for seed in range(6)]
    batched = [jnp.stack(x) for x in zip(*genes, strict=True)]
    index = jnp.arange(6, dtype=jnp.int32) % len(modes)
    with jax.enable_x64(True):
        genes = [[x.astype(jnp.float64) for x in g] for g in genes]
        batched = [x.astype(jnp.float64) for x in batched]

        def switched(ops, i):
            return assign.assign_tau(*ops, assign.ModeSwitch(modes, i))

        got = jax.jit(jax.vmap(switched))(batched, index)
        for g, ops in enumerate(genes):
            want = jax.jit(assign.assign_tau, static_argnums=8)(*ops, modes[int(index[g])])
            for a, b in zip(got, want, strict=True):
                np.testing.assert_array_equal(np.asarray(a[g]), np.asarray(b))


def test_cond_any_values_and_laziness():
    calls = []

    def expensive(x, y):
        jax.debug.callback(lambda: calls.append(1))
        return jnp.sin(x) * y

    def cheap(x, y):
        return x + y

    x = jnp.linspace(0.0, 1.0, 12).reshape(4, 3)
    y = jnp.asarray(2.0)  # unbatched operand
    f = jax.jit(jax.vmap(lambda p, x: cond_any(p, expensive, cheap, x, y)))
    pred = jnp.asarray([True, False, True, False])
    got = f(pred, x)
    np.testing.assert_array_equal(got, jnp.where(pred[:, None], jnp.sin(x) * y, x + y))
    jax.effects_barrier()
    assert calls, "the expensive branch is needed by two genes"
    calls.clear()
    np.testing.assert_array_equal(f(jnp.zeros(4, bool), x), x + y)
    jax.effects_barrier()
    assert not calls, "no gene needs the expensive branch: it must not run"
    # an unbatched predicate stays an ordinary cond
    g = jax.jit(jax.vmap(lambda x: cond_any(jnp.asarray(True), expensive, cheap, x, y)))
    np.testing.assert_array_equal(g(x), jnp.sin(x) * y)
    # discard: the members without pred are the caller's to ignore, so where some member
    # needs the expensive branch it runs for all of them, without the cheap one or a select
    h = jax.jit(jax.vmap(lambda p, x: cond_any(p, expensive, cheap, x, y, discard=True)))
    np.testing.assert_array_equal(h(pred, x), jnp.sin(x) * y)
    np.testing.assert_array_equal(h(jnp.zeros(4, bool), x), x + y)
    text = h.lower(pred, x).as_text()
    assert "select" not in text and "add" in text  # cheap (x + y) only when none needs it


@pytest.mark.parametrize("high_pars", [False, True])
def test_schedule_holds_one_time_assignment(monkeypatch, high_pars):
    """The exact program has three time assignments (adjust_increments kernels): the first
    (in the data dtype), one for the whole initialize_scaling + fit schedule -- every
    Nelder-Mead stage, update() evaluation and mode -- and one for the final statistics
    (the final tau and the variance's re-assignment). Before the schedule ran as one loop
    with one evaluation site it had 16."""
    from jaxvelo.core import batch
    from jaxvelo.core.em import FitConfig, GeneData

    monkeypatch.setenv("JAXVELO_HOST_KERNELS", "1")
    n = 60
    rng = np.random.default_rng(0)
    gd = GeneData(u=rng.random((2, n), np.float32), s=rng.random((2, n), np.float32),
                  prior=np.zeros((2, n), bool))  # fmt: skip
    cfg = FitConfig(n_obs=n, high_pars_resolution=high_pars)
    with jax.enable_x64(True):
        text = batch._program(cfg, False, None).lower(gd, None, None).as_text()
    kernels = [ln for ln in text.splitlines() if "custom_call" in ln and "adjust_increments" in ln]
    assert len(kernels) == 3, len(kernels)


@pytest.mark.parametrize(
    "size, needed",
    [(20, [3]), (20, [0, 7, 8, 19]), (20, list(range(20))), (20, []), (5, [1, 2]),
     (17, list(range(0, 17, 2)))],
)  # fmt: skip
def test_cond_any_chunked_runs_only_needed_members(size, needed):
    """With ``chunk``, the expensive branch runs on ceil(needed / chunk) sub-batches of
    ``chunk`` members (every member when the batch is not larger than a chunk), and every
    member gets bitwise what ``jnp.where`` of both branches gives."""
    chunk = 8
    members = []

    def expensive(x, y):
        jax.debug.callback(lambda v: members.append(np.size(v)), x[0])
        return jnp.exp(jnp.sin(x) * y), jnp.sum(x) * y

    def cheap(x, y):
        return x + y, -y

    x = jnp.linspace(0.0, 3.0, size * 5).reshape(size, 5)
    y = jnp.asarray(1.5)  # unbatched operand
    pred = jnp.zeros(size, bool).at[jnp.asarray(needed, int)].set(True)
    f = jax.jit(jax.vmap(lambda p, x: cond_any(p, expensive, cheap, x, y, chunk=chunk)))
    got = f(pred, x)
    want = [jnp.where(pred[:, None], jnp.exp(jnp.sin(x) * y), x + y),
            jnp.where(pred, jnp.sum(x, axis=1) * y, -y)]  # fmt: skip
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    jax.effects_barrier()
    if size <= chunk:
        assert sum(members) == (size if needed else 0)
    else:
        assert sum(members) == -(-len(needed) // chunk) * chunk


def test_materialize_is_the_identity():
    from jaxvelo.core.numerics import materialize

    x = jnp.asarray([1.5, -0.0, jnp.inf, jnp.nan, 3e-310])
    n = jnp.asarray(7)
    f = jax.jit(jax.vmap(lambda x, n: materialize((x * 2, n), jnp.minimum(n, 0))))
    a, b = f(jnp.stack([x, -x]), jnp.stack([n, n]))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(jnp.stack([x * 2, -x * 2])))
    np.testing.assert_array_equal(np.asarray(b), [7, 7])


@pytest.mark.parametrize("mode", ["projection", "full_projection"])
def test_host_kernels_and_xla_versions_give_the_same_fit(monkeypatch, mode):
    """The CPU custom calls (adjust_increments, row sorts, smoothing, the projection's
    nearest grid point) and the XLA versions that every other backend runs give bitwise
    the same fit of real-shaped data: simulated genes with scVelo's moments and kNN graph.
    The third run is the GPU's lowering on CPU: XLA versions and float32 quotients taken
    in float64 (``numerics.divide``). exp/log are XLA's in all three (numpy's own float64
    loops on the CPU are another result by design: see the test below)."""
    from jaxvelo import datasets
    from jaxvelo.core import batch
    from jaxvelo.core.em import FitConfig

    monkeypatch.setenv("JAXVELO_NUMPY_EXP_LOG", "0")
    a = datasets.simulated(300, 3, seed=5)
    conn = a.obsp["connectivities"].tocsr()
    nb = batch.neighbors_from_csr(conn.indptr, conn.indices, conn.data)
    u, s = np.asarray(a.layers["Mu"]), np.asarray(a.layers["Ms"])
    cfg = FitConfig(n_obs=a.n_obs, assignment_mode=mode)
    out = {}
    for host, division in (("1", "native"), ("0", "native"), ("0", "float64")):
        monkeypatch.setenv("JAXVELO_HOST_KERNELS", host)
        monkeypatch.setenv("JAXVELO_F32_DIVISION", division)
        out[host, division] = batch.fit_genes(u, s, cfg, nbrs=nb, batch_size=3)
    ref = out["1", "native"]
    assert np.isfinite(ref["pars"]).all()
    for variant in (("0", "native"), ("0", "float64")):
        assert out[variant].keys() == ref.keys()
        for k in ref:
            np.testing.assert_array_equal(out[variant][k], ref[k], err_msg=f"{variant} {k}")


@pytest.mark.parametrize("kind", ["full_projection", "load_pars", "gradient"])
def test_padded_cells_give_the_unpadded_fit(monkeypatch, kind):
    """Cells padded to a size bucket (here 290 -> 304: no counts, no prior, no neighbours,
    the real count a traced value) change nothing: every output bitwise as the unpadded
    fit -- the projection on a grid for the real count inside a longer buffer, the
    adjust-t_ alternative's ``max(t) / len(t)``, the likelihood's ``len(u)``, loaded
    times. The gradient mode is not padded (reverse-mode sums over cells are XLA
    reductions whose order depends on the length: padded, its parameters moved by
    1 ulp), so the setting leaves it unchanged too."""
    from jaxvelo import datasets
    from jaxvelo.core import batch
    from jaxvelo.core.em import FitConfig, Loaded
    from jaxvelo.core.gradient import GradientConfig

    a = datasets.simulated(290, 3, seed=6)
    assert batch.size_bucket(a.n_obs) == 304
    conn = a.obsp["connectivities"].tocsr()
    nb = batch.neighbors_from_csr(conn.indptr, conn.indices, conn.data)
    u, s = np.asarray(a.layers["Mu"]), np.asarray(a.layers["Ms"])
    prior = np.zeros(a.n_obs, bool)
    prior[::7] = True
    cfg = FitConfig(n_obs=a.n_obs, assignment_mode="full_projection")
    kw = {}
    if kind == "gradient":
        cfg = GradientConfig(fit=FitConfig(n_obs=a.n_obs), rounds=2, steps=3)
    if kind == "load_pars":
        monkeypatch.setenv("JAXVELO_CELL_BUCKETS", "0")
        first = batch.fit_genes(u, s, cfg, nbrs=nb, batch_size=3)
        pars = first["pars"].copy()
        kw["loaded"] = Loaded(
            pars=pars, t=first["t"].T, steady_u=first["steady_u"], steady_s=first["steady_s"],
            pval_steady=first["pval_steady"],
        )  # fmt: skip
        cfg = FitConfig(n_obs=a.n_obs, load_pars=True)
    out = {}
    for buckets in ("0", "1"):
        monkeypatch.setenv("JAXVELO_CELL_BUCKETS", buckets)
        out[buckets] = batch.fit_genes(u, s, cfg, nbrs=nb, prior=prior, batch_size=3, **kw)
    ref = out["0"]
    assert np.isfinite(ref["pars"]).all() and ref["t"].shape == (3, a.n_obs)
    for k in ref:
        assert out["1"][k].shape == ref[k].shape
        np.testing.assert_array_equal(out["1"][k], ref[k], err_msg=k)


def test_gpu_program_has_no_float32_division(monkeypatch):
    """The program every non-CPU backend gets divides float32 operands only in float64
    (``numerics.divide``): XLA:GPU's float32 division is div.full.f32, not numpy's IEEE
    quotient. On CPU the float32 divisions stay (IEEE there), so the count is not zero."""
    import re

    from jaxvelo import datasets
    from jaxvelo.core import batch
    from jaxvelo.core.em import FitConfig, GeneData

    a = datasets.simulated(200, 2, seed=3)
    conn = a.obsp["connectivities"].tocsr()
    nb = batch.neighbors_from_csr(conn.indptr, conn.indices, conn.data)
    n = a.n_obs
    gd = GeneData(u=np.asarray(a.layers["Mu"][:, :2].T, np.float32),
                  s=np.asarray(a.layers["Ms"][:, :2].T, np.float32),
                  prior=np.zeros((2, n), bool))  # fmt: skip
    f32_divides = re.compile(r"stablehlo\.divide .*: tensor<[0-9x]*f32>")
    counts = {}
    for host, division in (("1", "native"), ("0", "float64")):
        monkeypatch.setenv("JAXVELO_HOST_KERNELS", host)
        monkeypatch.setenv("JAXVELO_F32_DIVISION", division)
        with jax.enable_x64(True):
            nbj = jax.tree_util.tree_map(jnp.asarray, nb)
            text = batch._program(FitConfig(n_obs=n), True, None).lower(gd, nbj, None).as_text()
        counts[division] = len(f32_divides.findall(text))
        assert "stablehlo.divide" in text
    assert counts["native"] > 0
    assert counts["float64"] == 0
