"""XLA CPU options the project sets by default, only where the user has not set them.

Measured effect of each option: docs/performance.md. They only touch XLA's CPU backend, so they
are harmless on GPU/TPU. Set ``EKD_JAX_XLA_DEFAULTS=0`` to leave XLA_FLAGS exactly as given.
Must run before JAX initialises its backends: ``ekd_jax/__init__.py`` calls it on import.
"""

from __future__ import annotations

import os

# flag name -> value (docs/performance.md has the measurements and commands).
# YNNPACK fusions: jaxlib 0.10.2 by default hands convolutions, dots and reductions to YNNPACK;
# its convolutions are much slower than XLA's own (Eigen) ones for the CIFAR zoo, its reductions
# (BatchNorm statistics) faster. Keep the reductions only.
CPU_DEFAULTS: dict[str, str] = {
    "--xla_cpu_experimental_ynn_fusion_type": "reduce",
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
