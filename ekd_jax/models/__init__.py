"""The model zoo (the CIFAR zoo of RepDistiller, the ImageNet zoo of torchvision/mdistiller) and its registry.

Contract: ``create_model(name, num_classes, **kw)`` returns a ``flax.linen.Module`` whose
``apply(variables, x, train=..., preact=..., mutable=...)`` gives ``(logits, features)``;
``features`` is the reference ``is_feat`` list in NHWC (stem map, stage maps, last entry the pooled
vector). The ImageNet models' names end in ``_imagenet`` (``resnet18_imagenet``, ...): they are
not the CIFAR ``resnet*``/``ResNet50`` (imagenet_resnet.py, mobilenetv1.py).
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from ekd_jax.models import imagenet_resnet, mobilenetv1, mobilenetv2, resnet, shufflenet, vgg, wrn

ZOOS = {"cifar": (resnet, wrn, vgg, mobilenetv2, shufflenet), "imagenet": (imagenet_resnet, mobilenetv1)}
_ZOO_LABEL = {"cifar": "CIFAR", "imagenet": "ImageNet"}

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_ZOO_OF: dict[str, str] = {}
for _zoo, _families in ZOOS.items():
    for _family in _families:
        for _name, _ctor in _family.MODELS.items():
            assert _name not in _REGISTRY, f"model name {_name!r} registered twice"
            _REGISTRY[_name], _ZOO_OF[_name] = _ctor, _zoo

# Stage maps that guided modules / feature methods pair: features[1:-1] (the reference's
# feat[1:-1], used by AT/NST/VID): every entry but the stem output and the pooled vector.
STAGE_SLICE = slice(1, -1)

# A run's ``dtype`` option (and a saved network's) -> the compute dtype its modules are built with.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def available_models(zoo: str | None = None) -> list[str]:
    """Names accepted by :func:`create_model`: all, or one zoo's (``'cifar'`` / ``'imagenet'``)."""
    if zoo is not None and zoo not in ZOOS:
        raise ValueError(f"unknown zoo {zoo!r}; use one of {tuple(ZOOS)} or None (all)")
    return sorted((n for n in _REGISTRY if zoo is None or _ZOO_OF[n] == zoo), key=str.lower)


def _spelling(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", str(name).lower())


def suggest_models(name: str, n: int = 2) -> list[str]:
    """Registered names that an unknown ``name`` most likely meant, best first (at most ``n``).

    Compared ignoring case and separators (``resnet-56`` -> ``resnet56``); a torchvision-style name
    also gets its ImageNet model (``resnet18`` -> ``resnet18_imagenet``, ``resnet50`` -> both
    ``resnet50_imagenet`` and the CIFAR ``ResNet50``), then the closest spellings.
    """
    key = _spelling(name)
    by_spelling = {_spelling(m): m for m in _REGISTRY}
    out = [by_spelling[k] for k in (key + "imagenet", key) if k in by_spelling]
    out += [by_spelling[k] for k in difflib.get_close_matches(key, list(by_spelling), n=n)]
    return list(dict.fromkeys(out))[:n]


def _labelled(name: str) -> str:
    return f"{name!r} ({_ZOO_LABEL[_ZOO_OF[name]]})"


def create_model(name: str, num_classes: int, **kw: Any) -> nn.Module:
    """Builds a zoo model; ``kw`` (e.g. ``dtype``) is passed to the family's constructor."""
    if name not in _REGISTRY:
        close = suggest_models(name)
        hint = f" Did you mean {' or '.join(_labelled(c) for c in close)}?" if close else ""
        zoos = "; ".join(f"{_ZOO_LABEL[z]}: {', '.join(available_models(z))}" for z in ZOOS)
        raise ValueError(f"unknown model {name!r}.{hint} Available models: {zoos}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return _REGISTRY[name](num_classes=num_classes, **kw)


__all__ = ["available_models", "create_model", "suggest_models", "DTYPES", "STAGE_SLICE", "ZOOS"]
