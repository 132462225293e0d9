"""Test-wide settings: CPU, quiet logs, fast compiles (tiny models, few steps).

Most tests compile with XLA's optimisations off: compile time dominates these tiny runs. The tests
whose property could depend on the optimised program (the bitwise SIGKILL resume, one device
equals eight) run with them on: their subprocesses set JAX_DISABLE_MOST_OPTIMIZATIONS=0, and
in-process code that must match them takes the ``xla_optimizations`` fixture.

One persistent compilation cache serves the whole session (the xdist workers and every subprocess
they start inherit its directory through the environment): many tests compile the same tiny
programs, and a resumed or repeated CLI run would otherwise compile everything again. A cached
executable is the program a fresh compile builds (the cache key holds the HLO, the compile options,
XLA's flags and the devices), so no property under test depends on whether it was a hit.
"""

import atexit
import fcntl
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the controller (or a plain run) makes it, workers inherit
    _cache = tempfile.mkdtemp(prefix="ekd_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

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


@pytest.fixture(scope="session")
def built_once(tmp_path_factory, worker_id):
    """``built_once(name, build)`` -> a folder that ``build(folder)`` filled once for the session.

    xdist hands a module's tests to whichever worker is free, so a module-scoped fixture would be
    built by each worker that runs one of its tests; this one is built by the first worker that
    asks (under a lock), and the others wait for it and read it. What it holds is read-only to the
    tests (they copy it to change it)."""
    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent  # the folder every worker's basetemp is in

    def get(name: str, build) -> "os.PathLike":
        folder, done = root / name, root / f"{name}.done"
        with open(root / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
                build(folder)
                done.touch()
        return folder

    return get
