"""The project's XLA CPU defaults: applied only where the user has set nothing."""

from ekd_jax import xla_setup


def test_cpu_defaults_fill_in_but_never_override(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type= --xla_foo=1")
    monkeypatch.delenv("EKD_JAX_XLA_DEFAULTS", raising=False)
    assert xla_setup.apply_cpu_defaults() == "--xla_cpu_experimental_ynn_fusion_type= --xla_foo=1"
    monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1")
    assert xla_setup.apply_cpu_defaults() == "--xla_foo=1 --xla_cpu_experimental_ynn_fusion_type=reduce"
    monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1")
    monkeypatch.setenv("EKD_JAX_XLA_DEFAULTS", "0")
    assert xla_setup.apply_cpu_defaults() == "--xla_foo=1"
