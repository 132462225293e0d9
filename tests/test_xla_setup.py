"""The project's XLA CPU defaults: applied only where the user has set nothing."""

import os


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


FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def test_flag_only_where_the_jaxlib_knows_it(monkeypatch):
    """XLA aborts on a flag it does not know: jaxlib 0.8.0 did not have this one, 0.8.1 did."""
    monkeypatch.delenv("EKD_JAX_XLA_DEFAULTS", raising=False)
    for version, added in [((0, 7, 2), False), ((0, 8, 0), False), ((0, 8, 1), True), ((0, 9, 0, 1), True),
                           (xla_setup.CHECKED_UP_TO_JAXLIB, True), (None, False),
                           ((*xla_setup.CHECKED_UP_TO_JAXLIB[:-1], xla_setup.CHECKED_UP_TO_JAXLIB[-1] + 1), False)]:
        monkeypatch.setattr(xla_setup, "jaxlib_version", lambda v=version: v)
        monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1")
        want = "--xla_foo=1 --xla_cpu_experimental_ynn_fusion_type=reduce" if added else "--xla_foo=1"
        assert xla_setup.apply_cpu_defaults() == want == os.environ["XLA_FLAGS"], version
        monkeypatch.delenv("XLA_FLAGS")
        xla_setup.apply_cpu_defaults()
        assert os.environ.get("XLA_FLAGS") == (want.split(" ", 1)[1] if added else None), version
    # A user's own value is kept whatever the jaxlib.
    monkeypatch.setenv("XLA_FLAGS", f"{FLAG}=")
    assert xla_setup.apply_cpu_defaults() == f"{FLAG}="


def test_version_parsing_and_the_installed_jaxlib():
    assert xla_setup._parse_version("0.10.2") == (0, 10, 2)
    assert xla_setup._parse_version("0.9.0.1") == (0, 9, 0, 1)
    assert xla_setup._parse_version("0.11.0.dev20260101+abc") == (0, 11, 0)
    assert xla_setup._parse_version("unknown") is None
    import jaxlib

    assert xla_setup.jaxlib_version() == xla_setup._parse_version(jaxlib.__version__)
    assert xla_setup.jaxlib_version() >= min(xla_setup.SINCE_JAXLIB.values())
