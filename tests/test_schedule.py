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


@pytest.mark.parametrize("high_pars", [False, True])
def test_schedule_holds_one_time_assignment(monkeypatch, high_pars):
    """The exact program has three time assignments (adjust_increments kernels): the first
    (in the data dtype), one for the whole initialize_scaling + fit schedule -- every
    Nelder-Mead stage, update() evaluation and mode -- and one for the two final
    statistics. Before the schedule ran as one loop with one evaluation site it had 16."""
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
    kernels = [ln for ln in text.splitlines() if "custom_call" in ln and "jaxvelo" in ln]
    assert len(kernels) == 3, len(kernels)
