"""Numerical core of jaxvelo: imports jax and numpy only, never AnnData."""
