"""Batch sizing from the memory budget, the device count, and the on-disk cache's size cap
(fast: nothing is compiled here)."""

from __future__ import annotations

import os
import time

import pytest

from jaxvelo.core import batch
from jaxvelo.core.batch import MAX_BATCH, auto_batch_size, working_bytes


@pytest.mark.parametrize(
    "genes, cells, workers, expected",
    [
        (611, 3696, 2, 16),  # the pancreas: 39 batches of 16 (cache-resident batches)
        (559, 1500, 2, 16),  # its 1500-cell subset: 36 of 16
        (200, 5780, 2, 15),  # 14 batches of 15, not 13 of 16 (odd) or 16 of 16 padded
        (20, 50_000, 2, 10),  # within the budget, the same number of batches per worker
        (200, 9815, 2, 15),  # at most 24k genes x cells per batch, but 16 genes at least
        (2000, 50_000, 2, 16),  # ... 16 genes at least
        (2000, 200_000, 2, 3),  # the memory budget decides: 2 x 3 x 200,000 cells fit 1 GiB
        (1327, 100, 2, 64),  # few cells: wide batches (per-operation overhead)
        (1000, 500, 2, 48),  # 24k / 500 cells
        (5, 100, 1, 5),
        (3, 3696, 2, 2),  # both workers get a batch
        (1, 10, 4, 1),
    ],
)
def test_auto_batch_size(genes, cells, workers, expected):
    assert auto_batch_size(genes, cells, workers, budget=1 << 30, platform="cpu") == expected


@pytest.mark.parametrize(
    "genes, cells, workers, expected",
    [
        (612, 3696, 1, 312),  # the pancreas on one GPU: 2 batches (1 GiB / 1.9 MB per gene)
        (612, 3696, 2, 160),  # two devices: 4 batches, 2 each
        (1327, 100, 1, 1327),  # scVelo's 100-cell fixture: one batch
        (20, 50_000, 1, 20),  # 50,000 cells: 20 genes fit one batch
        (2000, 50_000, 1, 39),  # the budget decides
    ],
)
def test_auto_batch_size_off_the_cpu(genes, cells, workers, expected):
    # GPU: no MAX_BATCH / working-set cap (those keep CPU batches cache-resident), only the
    # memory budget, so the fewest batches run
    b = auto_batch_size(genes, cells, workers, budget=1 << 30, platform="gpu")
    assert b == expected
    assert workers * working_bytes(b, cells) <= 1 << 30


@pytest.mark.parametrize("mode", ["exact", "gradient"])
@pytest.mark.parametrize("budget", [1 << 26, 1 << 28, 1 << 30, 1 << 33])
@pytest.mark.parametrize("cells", [100, 3696, 50_000, 200_000])
@pytest.mark.parametrize("workers", [1, 2, 16])
def test_auto_batch_size_respects_the_budget(mode, budget, cells, workers):
    for genes in (1, 7, 64, 611, 5000):
        b = auto_batch_size(genes, cells, workers, mode, budget=budget, platform="cpu")
        assert 1 <= b <= min(MAX_BATCH, genes)
        if b > 1:  # one gene per batch is the floor, whatever the budget
            assert workers * working_bytes(b, cells, mode) <= budget
        n_batches = -(-genes // b)
        # no worker idles while another has two batches more than it
        assert n_batches >= min(workers, genes) or b == 1


def test_memory_budget_environment(monkeypatch):
    monkeypatch.setenv("JAXVELO_MEMORY_BUDGET", "512M")
    assert batch.memory_budget() == 512 << 20
    monkeypatch.setenv("JAXVELO_MEMORY_BUDGET", "2GiB")
    assert batch.memory_budget() == 2 << 30
    monkeypatch.setenv("JAXVELO_MEMORY_BUDGET", "1000000")
    assert batch.memory_budget() == 1_000_000
    monkeypatch.setenv("JAXVELO_MEMORY_BUDGET", "lots")
    with pytest.raises(ValueError, match="memory size"):
        batch.memory_budget()
    monkeypatch.setenv("JAXVELO_MEMORY_BUDGET", "-1G")
    with pytest.raises(ValueError, match="positive"):
        batch.memory_budget()
    monkeypatch.delenv("JAXVELO_MEMORY_BUDGET")
    assert batch.memory_budget() == batch.DEFAULT_MEMORY_BUDGET


def test_device_count_environment(monkeypatch):
    monkeypatch.setenv("JAXVELO_DEVICES", "1")
    assert batch.n_devices() == 1
    monkeypatch.setenv("JAXVELO_DEVICES", "64")  # at most the devices there are
    import jax

    assert batch.n_devices() == len(jax.devices())
    monkeypatch.setenv("JAXVELO_DEVICES", "two")
    with pytest.raises(ValueError, match="JAXVELO_DEVICES"):
        batch.n_devices()


def test_cache_prune_keeps_recent_entries(tmp_path):
    now = time.time()
    for i in range(5):
        f = tmp_path / f"{i}.xla"
        f.write_bytes(b"x" * 100)
        os.utime(f, (now - 100 + i, now - 100 + i))  # 0 oldest ... 4 newest
    (tmp_path / "other.txt").write_bytes(b"y" * 1000)  # not a program: never touched
    batch._prune(tmp_path, limit=250, keep=tmp_path / "0.xla")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["0.xla", "4.xla", "other.txt"]


def test_cache_limit_environment(monkeypatch):
    monkeypatch.setenv("JAXVELO_CACHE_MAX", "5G")
    assert batch.cache_limit() == 5 << 30
    monkeypatch.delenv("JAXVELO_CACHE_MAX")
    assert batch.cache_limit() == batch.DEFAULT_CACHE_LIMIT


def test_programs_lower_with_one_frame_locations(monkeypatch):
    """The fit program is lowered with one source frame per operation, not JAX's default
    full call stack (a larger module for the lowering and XLA to build and parse)."""
    import jax
    import jax.numpy as jnp
    from jax._src import config as jax_config

    def lowered_text():
        def nested(x):  # a fresh function each time: JAX caches lowerings per function
            return jnp.sin(x) * 2

        def f(x):
            return nested(x) + 1

        return jax.jit(f).lower(jnp.ones(3)).as_text(debug_info=True)

    monkeypatch.delenv("JAX_INCLUDE_FULL_TRACEBACKS_IN_LOCATIONS", raising=False)
    with jax_config.include_full_tracebacks_in_locations(True):
        assert "callsite(" in lowered_text()  # JAX's default records call stacks
        with batch._one_frame_locations():
            short = lowered_text()
        assert "callsite(" not in short and "test_batch.py" in short  # the user frame stays
        monkeypatch.setenv("JAX_INCLUDE_FULL_TRACEBACKS_IN_LOCATIONS", "1")
        with batch._one_frame_locations():  # an explicit setting is left in charge
            assert "callsite(" in lowered_text()


@pytest.mark.parametrize(
    "n, expected",
    [(0, 0), (1, 1), (16, 16), (17, 17), (100, 100), (150, 152), (145, 152), (1500, 1536),
     (3696, 3712), (50_000, 51_200), (2**20, 2**20), (2**20 + 1, 2**20 + 2**16)],
)  # fmt: skip
def test_size_bucket(n, expected):
    assert batch.size_bucket(n) == expected


def test_size_bucket_pads_at_most_a_sixteenth():
    for n in range(17, 5000):
        b = batch.size_bucket(n)
        assert n <= b <= n + n / 16 and batch.size_bucket(b) == b


def test_entries_bucket():
    # scVelo's 30 neighbours: 33-45 entries per cell -> 48 per padded cell
    assert batch.entries_bucket(155_132, 3696, 3712) == 3712 * 48  # the pancreas
    assert batch.entries_bucket(5064, 150, 152) == batch.entries_bucket(4838, 145, 152) == 152 * 48
    assert batch.entries_bucket(0, 10, 10) == 120 and batch.entries_bucket(0, 0, 0) >= 1
    assert batch.entries_bucket(20 * 100, 100, 100) == 100 * 24  # 15 neighbours
    assert batch.entries_bucket(60 * 100, 100, 104) == 104 * 96  # 50 neighbours


def test_cell_buckets_environment(monkeypatch):
    monkeypatch.delenv("JAXVELO_CELL_BUCKETS", raising=False)
    assert batch.cell_buckets()
    monkeypatch.setenv("JAXVELO_CELL_BUCKETS", "0")
    assert not batch.cell_buckets()
    monkeypatch.setenv("JAXVELO_CELL_BUCKETS", "maybe")
    with pytest.raises(ValueError, match="JAXVELO_CELL_BUCKETS"):
        batch.cell_buckets()
