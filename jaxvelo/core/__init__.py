"""Numerical core of jaxvelo: jax and numpy (numba for the CPU custom call), never AnnData."""
