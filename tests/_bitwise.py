"""Shared test helper: bitwise equality of floating-point results."""

from __future__ import annotations

import numpy as np


def assert_bitwise(got, want) -> None:
    """Same dtype, shape and bytes (NaN sign and payload, signed zeros, subnormals all
    count)."""
    got = np.atleast_1d(np.asarray(got))
    want = np.atleast_1d(np.asarray(want))
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    u = np.dtype(f"u{got.dtype.itemsize}")
    bad = got.view(u) != want.view(u)
    assert not bad.any(), f"{bad.sum()} differ, e.g. {got[bad][:5]} vs {want[bad][:5]}"
