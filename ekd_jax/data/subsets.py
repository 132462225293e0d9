"""Few-sample training: the class-balanced subset of a training split that a run keeps, from its labels
alone, so that the in-memory sources and the stream (and every method trained with one seed) keep the
same images."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def class_balanced_subset(
    labels: np.ndarray,
    *,
    samples_per_class: int = 0,
    train_fraction: float = 1.0,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> np.ndarray | None:
    """Sorted indices of a class-balanced subset, or None when both modes are off.

    ``samples_per_class=n`` keeps n images of every class present; ``train_fraction=f``
    keeps round-half-up(f * count), at least 1, of each class. The choice depends only on
    the labels and ``seed`` (``np.random.default_rng(seed)``), so every method trained with
    the same seed sees the same images.
    """
    if samples_per_class and train_fraction != 1.0:
        raise ValueError("Set samples_per_class or train_fraction, not both.")
    if not samples_per_class and train_fraction == 1.0:
        return None
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction!r}.")
    classes, counts = np.unique(labels, return_counts=True)
    if samples_per_class:
        smallest = int(np.argmin(counts))
        if samples_per_class > counts[smallest]:
            c = int(classes[smallest])
            label = f"{c} ({class_names[c]!r})" if class_names else str(c)
            raise ValueError(
                f"samples_per_class={samples_per_class} is larger than class {label}, which "
                f"has only {counts[smallest]} training images; use at most {counts[smallest]}."
            )
    rng = np.random.default_rng(seed)
    keep = []
    for c, count in zip(classes, counts):
        k = samples_per_class or max(1, math.floor(train_fraction * count + 0.5))
        keep.append(rng.choice(np.flatnonzero(labels == c), size=k, replace=False))
    return np.sort(np.concatenate(keep))


def few_sample_subset(d, labels: np.ndarray, class_names: Sequence[str] | None = None) -> np.ndarray | None:
    """:func:`class_balanced_subset` of ``labels`` with the data spec ``d``'s few-sample options."""
    return class_balanced_subset(labels, samples_per_class=d.samples_per_class, train_fraction=d.train_fraction,
                                 seed=d.subset_seed, class_names=class_names)
