from __future__ import annotations

import jax

# Tests compare against numpy/scipy in float64; the library itself never flips this
# globally (it uses ``jax.enable_x64`` as a context manager).
jax.config.update("jax_enable_x64", True)
