"""ekd_jax: Evolutionary Knowledge Distillation (Zhang et al., arXiv 2103.13811) in JAX/Flax."""

__version__ = "0.1.0"
