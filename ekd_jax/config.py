"""The config every experiment starts from: ``base_config()``, the run spec's options with their defaults
(declared once, in :mod:`ekd_jax.spec`) as an ``ml_collections.ConfigDict``.

A config file (``configs/*.py``) calls :func:`base_config` and overrides what it needs; the command line
overrides any option with ``--config.<key>=<value>``. The trainer turns the result into a frozen, checked
:class:`ekd_jax.spec.Spec` (``ekd_jax.spec.validate``). Only config files and the command lines import
this module.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from ekd_jax import spec as spec_lib


def base_config() -> ml_collections.ConfigDict:
    """Every option of a run at its default (:class:`ekd_jax.spec.Spec`)."""
    return _block(spec_lib.Spec())


def _block(value) -> ml_collections.ConfigDict:
    out = ml_collections.ConfigDict()
    for name, hint in spec_lib.field_types(type(value)).items():
        v = getattr(value, name)
        if dataclasses.is_dataclass(v):
            out[name] = _block(v)
        elif v is None:
            # A placeholder keeps the type, so that `--config.data.image_size=32` works from the command
            # line although the default is None (= not set).
            out[name] = config_dict.placeholder(spec_lib.optional_type(hint))
        else:
            out[name] = v
    return out
