from __future__ import annotations

import os

# The kernels' tests jit small functions with XLA's default options; the fit program is
# compiled without excess precision (jaxvelo.core.batch.COMPILER_OPTIONS), and so is
# everything here: on a GPU, XLA's default folds the float64 -> float32 -> float64 pairs
# that emulate upstream's float32 roundings (no effect on CPU). Set before the backend starts.
if "xla_allow_excess_precision" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false"
    ).strip()

import jax  # noqa: E402

# Tests compare against numpy/scipy in float64; the library itself never flips this
# globally (it uses ``jax.enable_x64`` as a context manager).
jax.config.update("jax_enable_x64", True)
