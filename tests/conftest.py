"""Test-wide settings: CPU, quiet logs, fast compiles (tiny models, few steps)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

# Compile time dominates these tiny runs; the optimisations do not change what is tested.
jax.config.update("jax_disable_most_optimizations", True)
