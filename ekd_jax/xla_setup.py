"""XLA CPU options the project sets by default, only where the user has not set them.

Measured effect of each option: docs/performance.md. They only touch XLA's CPU backend, so they
are harmless on GPU/TPU. Set ``EKD_JAX_XLA_DEFAULTS=0`` to leave XLA_FLAGS exactly as given.
Must run before JAX initialises its backends: ``ekd_jax/__init__.py`` calls it on import.
"""

from __future__ import annotations

import os

# flag name -> value. The YNN fusions are experimental and slow the thin convolutions of the
# CIFAR zoo on CPU (docs/performance.md); an empty list disables them.
CPU_DEFAULTS: dict[str, str] = {
    "--xla_cpu_experimental_ynn_fusion_type": "",
}


def apply_cpu_defaults() -> str:
    """Adds each default flag to XLA_FLAGS unless that flag is already there; returns XLA_FLAGS."""
    if os.environ.get("EKD_JAX_XLA_DEFAULTS", "1") == "0":
        return os.environ.get("XLA_FLAGS", "")
    flags = os.environ.get("XLA_FLAGS", "")
    for name, value in CPU_DEFAULTS.items():
        if name not in flags:
            flags = f"{flags} {name}={value}".strip()
    os.environ["XLA_FLAGS"] = flags
    return flags
