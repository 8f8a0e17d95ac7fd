"""numpy's float64 ``np.exp`` / ``np.log`` in the fit: numpy's own loops, called.

numpy's Linux x86-64 wheels compute float64 exp/log by Intel's SVML on CPUs with AVX512_SKX,
by their own AVX512F kernels or by libm elsewhere; on the CPU backend jaxvelo calls numpy's
loop itself through a custom call (``host_kernels.register_numpy_exp_log``), so it gets
whichever numpy runs; other backends use XLA's ``exp``/``log``. XLA:CPU's ``exp`` is its
own polynomial and differs from numpy's in ~15% of results by an ulp, its ``log`` (glibc) in
~0.03%: hence the ODE solution and ``tau_inv`` now match upstream bit for bit here where they
matched to ~1e-13 before.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _bitwise import assert_bitwise
from scvelo.core import SplicingDynamics
from scvelo.tools import _em_model_utils as up

from jaxvelo.core import host_kernels, kinetics, npmath

pytestmark = pytest.mark.skipif(
    not host_kernels.numpy_exp_log_available(),
    reason="numpy's exp/log loops are not usable in this process (numpy without the "
    "ufunc loop API, or the run-time check failed): XLA's exp/log are used",
)


def _inputs(seed: int):
    rng = np.random.default_rng(seed)
    xe = np.concatenate([[0.0, -0.0, 1.0, -745.2, 709.8, np.inf, -np.inf, np.nan, 5e-324],
                         rng.normal(0, 20, 5003), -rng.exponential(3, 2001)])  # fmt: skip
    xl = np.concatenate([[0.0, -0.0, 1.0, -2.0, 5e-324, 1e308, np.inf, np.nan],
                         np.exp(rng.normal(0, 20, 5003)), rng.uniform(0.9, 1.1, 2001)])  # fmt: skip
    return xe, xl


@pytest.mark.parametrize("seed", [0, 1])
def test_exp_log_are_numpys_bits_eager_jit_vmap(seed):
    xe, xl = _inputs(seed)
    with np.errstate(all="ignore"):
        we, wl = np.exp(xe), np.log(xl)
    assert_bitwise(npmath.np_exp64(jnp.asarray(xe)), we)
    assert_bitwise(npmath.np_log64(jnp.asarray(xl)), wl)
    assert_bitwise(jax.jit(npmath.np_exp64)(xe), we)
    assert_bitwise(jax.jit(npmath.np_log64)(xl), wl)
    # batched: rows of another shape, and a (G, 1)-shaped per-gene scalar
    n = 7 * (xe.size // 7)
    assert_bitwise(jax.vmap(npmath.np_exp64)(xe[:n].reshape(7, -1)), we[:n].reshape(7, -1))
    assert_bitwise(jax.jit(jax.vmap(npmath.np_log64))(xl[:5]), wl[:5])
    # numpy scalars go through the same loop
    with np.errstate(all="ignore"):
        scal = [np.log(np.float64(v)) for v in xl[:40]]
    assert_bitwise(jax.jit(npmath.np_log64)(xl[:40]), scal)


def test_xla_exp_differs_from_numpy_here():
    """Why the custom call exists: XLA:CPU's float64 exp is not numpy's."""
    x = np.random.default_rng(3).normal(0, 5, 20_000)
    with pytest.raises(AssertionError):
        assert_bitwise(jax.jit(jnp.exp)(x), np.exp(x))


def test_switch_off_gives_xla(monkeypatch):
    x = np.random.default_rng(4).normal(0, 5, 20_000)
    monkeypatch.setenv("JAXVELO_NUMPY_EXP_LOG", "0")
    assert not host_kernels.numpy_exp_log_available()
    assert_bitwise(npmath.np_exp64(jnp.asarray(x)), jax.jit(jnp.exp)(x))
    monkeypatch.setenv("JAXVELO_HOST_KERNELS", "0")
    monkeypatch.delenv("JAXVELO_NUMPY_EXP_LOG")
    assert_bitwise(npmath.np_exp64(jnp.asarray(x)), jax.jit(jnp.exp)(x))


def test_derivatives_are_jaxs_rules():
    """The gradient mode differentiates through the ODE solution: d exp = exp dx, d log =
    dx / x, evaluated on the custom call's values."""
    x = jnp.asarray(np.linspace(-3.0, 4.0, 11))
    g = jax.grad(lambda v: jnp.sum(npmath.np_exp64(v)))(x)
    assert_bitwise(g, np.exp(np.asarray(x)))
    y = jnp.asarray(np.linspace(0.1, 9.0, 11))
    g = jax.grad(lambda v: jnp.sum(npmath.np_log64(v)))(y)
    assert_bitwise(g, 1.0 / np.asarray(y))
    _, t = jax.jvp(npmath.np_exp64, (x,), (jnp.full_like(x, 2.0),))
    assert_bitwise(t, 2.0 * np.exp(np.asarray(x)))


def test_solution_and_tau_inv_are_upstreams_bits():
    """With numpy's exp/log the ODE solution and its inversion are upstream's bit for bit
    (before: 1-ulp differences in ~1-2% of values, compared to 1e-12 in test_kernels)."""
    rng = np.random.default_rng(1)
    for _ in range(40):
        alpha, beta, gamma = rng.uniform(0.05, 5, 3)
        u0, s0 = rng.uniform(0, 3, 2)
        t = np.linspace(0, 20, 57)
        dyn = SplicingDynamics(alpha=alpha, beta=beta, gamma=gamma, initial_state=[u0, s0])
        ru, rs = dyn.get_solution(t, stacked=False)
        ju, js = kinetics.solution(jnp.asarray(t), alpha, beta, gamma, u0, s0)
        assert_bitwise(ju, ru)
        assert_bitwise(js, rs)
        u, s = rng.gamma(2.0, 0.5, 300), rng.gamma(2.0, 1.0, 300)
        with np.errstate(all="ignore"):
            ref = up.tau_inv(u, s, 0, 0, alpha, beta, gamma)
        got = kinetics.tau_inv(jnp.asarray(u), jnp.asarray(s), 0, 0, alpha, beta, gamma)
        assert_bitwise(got, ref)


@pytest.mark.parametrize("branch", ["on", "off"])
@pytest.mark.parametrize("t32", [False, True])
@pytest.mark.parametrize("rates32", [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 1, 0), (1, 0, 1),
                                     (0, 1, 1), (1, 1, 1)])  # fmt: skip
def test_solution_float32_operands(rates32, t32, branch):
    """``kinetics.solution``'s float32 flags against upstream with numpy float32 operands:
    the rates, and the time points (key ``t``: ``np.linspace(0, t_)`` for a float32 ``t_``,
    whose 'on' curve has float32 ``exp(-gamma * t)`` for a float32 gamma -- the fixture's
    Ranbp3/Tgm2). 'on': ``u0 = s0 = 0`` (ints); 'off': ``alpha = 0`` (int) and the switch
    state float32 with alpha (the flag stands for both)."""
    a32, b32, g32 = map(bool, rates32)
    rng = np.random.default_rng(sum(rates32) + 8 * t32)

    def cast(v, f32):
        return np.float32(v) if f32 else np.float64(v)

    flags = {"beta": b32, "gamma": g32, "t": t32}
    for _ in range(20):
        alpha, beta, gamma = cast(rng.uniform(0.05, 5), a32), cast(rng.uniform(0.05, 5), b32), \
            cast(rng.uniform(0.05, 5), g32)  # fmt: skip
        t = np.linspace(0, cast(rng.uniform(1, 20), t32), 237)
        if branch == "on":
            u0 = s0 = 0
            flags.update(alpha=a32, u0=True, s0=True)
        else:
            u0, s0 = cast(rng.uniform(0, 3), a32), cast(rng.uniform(0, 3), a32)
            alpha = 0
            flags.update(alpha=True, u0=a32, s0=a32)
        dyn = SplicingDynamics(alpha=alpha, beta=beta, gamma=gamma, initial_state=[u0, s0])
        ru, rs = dyn.get_solution(t, stacked=False)
        f32 = {k: jnp.asarray(v) for k, v in flags.items()}
        ju, js = jax.jit(kinetics.solution)(jnp.asarray(t, jnp.float64), *map(float, (
            alpha, beta, gamma, u0, s0)), f32=f32)  # fmt: skip
        assert_bitwise(ju, np.asarray(ru, np.float64))
        assert_bitwise(js, np.asarray(rs, np.float64))


def test_verification_is_recorded_per_build(monkeypatch, tmp_path):
    """The run-time check of numpy's loops runs once per numpy build, CPU and kernel: a pass
    leaves a stamp in the cache folder that later processes read instead of checking; no
    cache folder, no stamp (checked every time); a failed check records nothing."""
    monkeypatch.setenv("JAXVELO_CACHE_DIR", str(tmp_path))
    calls = []

    def check(ok):
        def run():
            calls.append(ok)
            return ok

        return run

    host_kernels._numpy_verified.cache_clear()
    try:
        monkeypatch.setattr(host_kernels, "_numpy_check", check(True))
        assert host_kernels._numpy_verified() and calls == [True]
        stamp = host_kernels._verified_stamp()
        assert stamp.parent == tmp_path and list(tmp_path.iterdir()) == [stamp]
        host_kernels._numpy_verified.cache_clear()
        monkeypatch.setattr(host_kernels, "_numpy_check", check(False))
        assert host_kernels._numpy_verified() and calls == [True]  # the stamp, not a check
        # another numpy build (here: its version) is another stamp, checked again
        monkeypatch.setattr(np, "__version__", np.__version__ + "+other")
        assert host_kernels._verified_stamp() != stamp
        host_kernels._numpy_verified.cache_clear()
        assert not host_kernels._numpy_verified() and calls == [True, False]
        assert len(list(tmp_path.iterdir())) == 1  # a failure is not recorded
        monkeypatch.setenv("JAXVELO_CACHE_DIR", "0")
        assert host_kernels._verified_stamp() is None
        host_kernels._numpy_verified.cache_clear()
        monkeypatch.setattr(host_kernels, "_numpy_check", check(True))
        assert host_kernels._numpy_verified() and calls == [True, False, True]
    finally:
        host_kernels._numpy_verified.cache_clear()
