"""Test-wide settings: CPU, quiet logs, fast compiles (tiny models, few steps).

Most tests compile with XLA's optimisations off: compile time dominates these tiny runs. The tests
whose property could depend on the optimised program (the bitwise SIGKILL resume, one device
equals eight) run with them on: their subprocesses set JAX_DISABLE_MOST_OPTIMIZATIONS=0, and
in-process code that must match them takes the ``xla_optimizations`` fixture.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture
def xla_optimizations():
    """XLA's optimisations on for the test's compiles (the flag is read when a program compiles and
    is not part of jit's cache key: only functions first compiled inside the test are optimised;
    train_and_evaluate builds and compiles its steps afresh on every call)."""
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", True)
