"""The CIFAR model zoo (RepDistiller architectures) and its registry.

Contract: ``create_model(name, num_classes, **kw)`` returns a ``flax.linen.Module`` whose
``apply(variables, x, train=..., preact=..., mutable=...)`` gives ``(logits, features)``;
``features`` is the reference ``is_feat`` list in NHWC (stage maps, last entry the pooled vector).
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

import flax.linen as nn

from ekd_jax.models import mobilenetv2, resnet, shufflenet, vgg, wrn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
for _family in (resnet, wrn, vgg, mobilenetv2, shufflenet):
    _REGISTRY.update(_family.MODELS)

# Stage maps that guided modules / feature methods pair: features[1:-1] (the reference's
# feat[1:-1], used by AT/NST/VID): every entry but the stem output and the pooled vector.
STAGE_SLICE = slice(1, -1)


def available_models() -> list[str]:
    """Names accepted by :func:`create_model` (the keys of the reference zoo)."""
    return sorted(_REGISTRY, key=str.lower)


def create_model(name: str, num_classes: int, **kw: Any) -> nn.Module:
    """Builds a zoo model; ``kw`` (e.g. ``dtype``) is passed to the family's constructor."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}.{hint} Available models: {', '.join(available_models())}"
        )
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return _REGISTRY[name](num_classes=num_classes, **kw)


__all__ = ["available_models", "create_model", "STAGE_SLICE"]
