"""XLA CPU options the project sets by default, only where the user has not set them.

Measured effect of each option: docs/performance.md. They only touch XLA's CPU backend, so they
are harmless on GPU/TPU. Set ``EKD_JAX_XLA_DEFAULTS=0`` to leave XLA_FLAGS exactly as given.
Must run before JAX initialises its backends: ``ekd_jax/__init__.py`` calls it on import.

XLA aborts the process on a flag it does not know ("Unknown flag in XLA_FLAGS"), so each default
is only added where the installed jaxlib is known to accept it: from the first jaxlib that has it
(:data:`SINCE_JAXLIB`) up to the newest one it was checked on (:data:`CHECKED_UP_TO_JAXLIB`).
"""

from __future__ import annotations

import os
import re

# flag name -> value (docs/performance.md has the measurements and commands).
# YNNPACK fusions: jaxlib 0.10.2 by default hands convolutions, dots and reductions to YNNPACK;
# its convolutions are much slower than XLA's own (Eigen) ones for the CIFAR zoo, its reductions
# (BatchNorm statistics) faster. Keep the reductions only.
CPU_DEFAULTS: dict[str, str] = {
    "--xla_cpu_experimental_ynn_fusion_type": "reduce",
}

# flag name -> the first jaxlib whose XLA accepts it. Checked by running
# XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=reduce python -c "import jax; jax.numpy.ones(1)":
# jaxlib 0.8.0 aborts with "Unknown flag in XLA_FLAGS", 0.8.1 runs (and rejects a bad value, so
# it parses the flag); the name is in the binaries of 0.8.1, 0.8.2, 0.8.3, 0.9.0, 0.9.2, 0.10.0.
SINCE_JAXLIB: dict[str, tuple[int, ...]] = {
    "--xla_cpu_experimental_ynn_fusion_type": (0, 8, 1),
}
# The newest jaxlib the defaults were run with (the test suite's); past it they are not set.
CHECKED_UP_TO_JAXLIB: tuple[int, ...] = (0, 10, 2)


def _parse_version(text: str) -> tuple[int, ...] | None:
    """'0.10.2' -> (0, 10, 2); '0.9.0.1' -> (0, 9, 0, 1); '0.11.0.dev20260101' -> (0, 11, 0)."""
    match = re.match(r"\d+(\.\d+)*", text.strip())
    return tuple(int(p) for p in match.group(0).split(".")) if match else None


def jaxlib_version() -> tuple[int, ...] | None:
    """The installed jaxlib's version (importing ``jaxlib`` reads version.py only), or None."""
    try:
        import jaxlib
    except ImportError:
        return None
    return _parse_version(str(getattr(jaxlib, "__version__", "")))


def jaxlib_accepts(name: str, version: tuple[int, ...] | None = None) -> bool:
    """Whether XLA in the installed jaxlib (or in jaxlib ``version``) accepts the flag ``name``."""
    version = jaxlib_version() if version is None else version
    if version is None:  # no jaxlib: jax cannot start anyway; add nothing
        return False
    if version < SINCE_JAXLIB.get(name, (0,)):
        return False
    # A newer jaxlib may have dropped an experimental flag, and XLA would abort: not set there
    # until the suite has run with it (then raise CHECKED_UP_TO_JAXLIB).
    return version <= CHECKED_UP_TO_JAXLIB


def apply_cpu_defaults() -> str:
    """Adds each default flag to XLA_FLAGS unless that flag is already there or the installed
    jaxlib does not know it; returns XLA_FLAGS."""
    if os.environ.get("EKD_JAX_XLA_DEFAULTS", "1") == "0":
        return os.environ.get("XLA_FLAGS", "")
    flags = os.environ.get("XLA_FLAGS", "")
    for name, value in CPU_DEFAULTS.items():
        if name not in flags and jaxlib_accepts(name):
            flags = f"{flags} {name}={value}".strip()
    if flags or "XLA_FLAGS" in os.environ:
        os.environ["XLA_FLAGS"] = flags
    return flags
