"""ekd_jax: Evolutionary Knowledge Distillation (Zhang et al., arXiv 2103.13811) in JAX/Flax."""

from ekd_jax import xla_setup as _xla_setup

# Before anything imports jax's backends: project CPU defaults unless the user set their own.
_xla_setup.apply_cpu_defaults()

__version__ = "0.1.0"
