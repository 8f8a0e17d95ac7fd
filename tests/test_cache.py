"""The on-disk cache of compiled programs (``JAXVELO_CACHE_DIR``): a second process loads
the program instead of tracing and compiling it, with identical results."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxvelo.core import batch

_CHILD = r"""
import json, os, sys, time, numpy as np
from jaxvelo import datasets
from jaxvelo.core import batch
from jaxvelo.core.em import FitConfig
a = datasets.simulated(int(os.environ.get("N", "150")), 4, seed=3)
u, s = np.asarray(a.layers["Mu"]), np.asarray(a.layers["Ms"])
nb = None
if os.environ.get("NB") == "1":
    c = a.obsp["connectivities"].tocsr()
    nb = batch.neighbors_from_csr(c.indptr, c.indices, c.data)
traced = []
orig = batch._program
batch._program = lambda *a, **k: traced.append(1) or orig(*a, **k)
t = time.perf_counter()
res = batch.fit_genes(u, s, FitConfig(n_obs=a.n_obs), nb, batch_size=int(os.environ["BS"]))
fn = next(iter(batch._MEMORY.values()))
genes, cells = fn.args_info[0][0].u.shape
print(json.dumps({"traced": len(traced), "seconds": time.perf_counter() - t,
                  "temp": fn.memory_analysis().temp_size_in_bytes,
                  "model": batch.working_bytes(genes, cells),
                  "pars": res["pars"].tolist(), "loss": np.nan_to_num(res["loss_hist"]).tolist()}))
"""


def _run(cache: str, batch_size: int = 4, **env) -> dict:
    env = {**os.environ, "JAXVELO_CACHE_DIR": cache, "BS": str(batch_size), **env}
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_second_process_loads_cached_program(tmp_path):
    first = _run(str(tmp_path))
    entries = list(tmp_path.glob("*.xla"))
    assert first["traced"] == 1 and len(entries) == 1
    second = _run(str(tmp_path))
    assert second["traced"] == 0  # loaded from disk: no tracing, no XLA compilation
    assert second["pars"] == first["pars"] and second["loss"] == first["loss"]
    assert second["seconds"] < first["seconds"]
    # the batch-size model bounds the compiled program's working memory (from a compiled and
    # from a loaded program: the same analysis)
    assert 0 < first["temp"] == second["temp"] <= first["model"]


@pytest.mark.slow
def test_datasets_of_one_size_bucket_share_a_program(tmp_path):
    """Cells padded to size buckets: 150 and 145 simulated cells (both padded to 152, with
    their kNN graphs) run one compiled program -- the second process loads the first's --
    and the loaded program gives the second dataset's own fit, bitwise."""
    first = _run(str(tmp_path), N="150", NB="1")
    assert first["traced"] == 1 and len(list(tmp_path.glob("*.xla"))) == 1
    second = _run(str(tmp_path), N="145", NB="1")
    assert second["traced"] == 0 and len(list(tmp_path.glob("*.xla"))) == 1
    fresh = _run("none", N="145", NB="1")
    assert fresh["traced"] == 1
    assert second["pars"] == fresh["pars"] and second["loss"] == fresh["loss"]
    assert second["pars"] != first["pars"]
    unpadded = _run("none", N="145", NB="1", JAXVELO_CELL_BUCKETS="0")
    assert unpadded["pars"] == fresh["pars"] and unpadded["loss"] == fresh["loss"]


@pytest.mark.slow
def test_cached_program_on_two_devices(tmp_path):
    """With several devices (two XLA host devices here, or several GPUs) each device's
    program is stored and loaded bound to that device: the second process neither traces
    nor compiles for any device, and the genes dealt over both devices get the one-device
    results."""
    two = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAXVELO_DEVICES": "2"}
    first = _run(str(tmp_path), batch_size=2, **two)  # 2 batches: one on each device
    assert first["traced"] == 2 and len(list(tmp_path.glob("*.xla"))) == 2
    second = _run(str(tmp_path), batch_size=2, **two)
    assert second["traced"] == 0
    one = _run(str(tmp_path), batch_size=2)  # one device, the same stored program
    assert one["traced"] == 0
    assert second["pars"] == first["pars"] == one["pars"]
    assert second["loss"] == first["loss"] == one["loss"]


def test_cache_dir_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXVELO_CACHE_DIR", str(tmp_path))
    assert batch.cache_dir() == tmp_path
    for off in ("none", "0", ""):
        monkeypatch.setenv("JAXVELO_CACHE_DIR", off)
        assert batch.cache_dir() is None
    monkeypatch.delenv("JAXVELO_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert batch.cache_dir() == tmp_path / "jaxvelo"


@pytest.mark.skipif(not batch.use_host_kernels(), reason="the CPU kernels are not used here")
def test_kernels_preload_in_background_once(monkeypatch):
    """``preload_kernels`` loads the kernels in a background thread; the program's own
    ``register_all`` waits for it instead of loading them again, and what failed in the
    background is raised there, in the caller's thread."""
    import threading
    import time

    from jaxvelo.core import host_kernels

    monkeypatch.delenv("JAXVELO_NUMPY_EXP_LOG", raising=False)
    monkeypatch.setattr(host_kernels, "_REGISTERED", set())
    monkeypatch.setattr(host_kernels, "_REGISTER_LOCK", threading.Lock())
    calls = []
    started = threading.Event()

    def slow_warm_cache():
        calls.append(threading.current_thread().name)
        started.set()
        time.sleep(0.3)
        return 0

    monkeypatch.setattr(host_kernels, "warm_cache", slow_warm_cache)
    batch.preload_kernels()
    assert started.wait(30)  # the background thread holds the lock
    host_kernels.register_all()
    assert calls == ["jaxvelo-kernels"] and host_kernels._REGISTERED
    host_kernels.register_all()  # once per process
    assert calls == ["jaxvelo-kernels"]
    # again where numpy's exp/log are switched off (their targets were not registered)
    monkeypatch.setenv("JAXVELO_NUMPY_EXP_LOG", "0")
    host_kernels.register_all()
    host_kernels.register_all()
    assert calls == ["jaxvelo-kernels", "MainThread"]
    monkeypatch.delenv("JAXVELO_NUMPY_EXP_LOG")

    monkeypatch.setattr(host_kernels, "_REGISTERED", set())

    def broken():
        calls.append(threading.current_thread().name)
        raise RuntimeError("no kernels")

    monkeypatch.setattr(host_kernels, "warm_cache", broken)
    batch.preload_kernels()
    for _ in range(300):  # until the background attempt has failed
        if len(calls) > 2 and not host_kernels._REGISTER_LOCK.locked():
            break
        time.sleep(0.01)
    with pytest.raises(RuntimeError, match="no kernels"):
        host_kernels.register_all()
    assert calls[2:] == ["jaxvelo-kernels", "MainThread"]
