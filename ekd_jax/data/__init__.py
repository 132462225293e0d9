"""Datasets for ekd_jax: every source behind one small interface, :class:`Source`.

One option, ``data.source`` of the run spec (:class:`ekd_jax.spec.DataSpec`), picks where the images come from:

* ``digits``, ``npz:<path>``, ``tfds:<name>``: loaded whole into memory (:mod:`ekd_jax.data.memory`);
* ``arrayrecord:<pattern>``, and ``tfds:<name>`` with ``data.streaming=True``: datasets larger than
  memory, read by index through a grain stream (:mod:`ekd_jax.data.stream`), never loaded.

:func:`load` opens either as a :class:`Source`. The host only produces uint8 batches
(:meth:`Source.train_batch`, :meth:`Source.eval_batches`; in a multi-process run only this process's
rows of each); augmentation, normalisation and the student's low-resolution view are pure ``jnp``
functions (:func:`make_views`) meant to run on the device inside the jitted step. Every training batch
and its augmentation follow from ``(seed, step)`` alone, which makes resuming exact.

The package, each module importing only those below it (and none of them TFDS, TensorFlow, grain or
array_record at import time: those are extras, imported where they are used):

* ``memory``   in-memory sources: the :class:`Dataset`, ``.npz`` and bundled digits, TFDS read whole;
* ``stream``   the grain stream: the :class:`Stream`, ArrayRecord files and records, host-side crops;
* ``tfds``     TFDS's builder of a ``tfds:<name>`` source, prepared, and its failures as one line (both paths);
* ``batching`` which examples a training batch (by seed and step) and an evaluation batch hold;
* ``subsets``  the few-sample class-balanced subset (both paths);
* ``views``    what each network sees of a batch, on the device.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import numpy as np

from ekd_jax.data import memory, stream
from ekd_jax.data.batching import (
    batch_indices,
    epoch_permutation,
    process_batch_indices,
    steps_per_epoch,
)
from ekd_jax.data.memory import Dataset, channel_stats, npz_file
from ekd_jax.data.stream import Stream, arrayrecord_splits
from ekd_jax.data.subsets import class_balanced_subset
from ekd_jax.data.views import (
    augment,
    check_downsample,
    degrade,
    make_views,
    normalize,
    student_input_shape,
    teacher_input_shape,
)

__all__ = [
    "Dataset", "Source", "Stream", "arrayrecord_splits", "augment", "batch_indices", "channel_stats",
    "check_downsample", "class_balanced_subset", "degrade", "epoch_permutation", "load", "make_views",
    "normalize", "npz_file", "process_batch_indices", "steps_per_epoch", "student_input_shape",
    "teacher_input_shape",
]


class Source(Protocol):
    """What the training loop, the evaluation and the command lines read of a dataset, whichever its kind."""

    source: str  # the data.source it was opened from
    num_classes: int
    class_names: tuple[str, ...] | None
    # Per-channel statistics in [0, 1] the views normalise with: fixed (data.mean / data.std) or measured
    # on the whole training split before any few-sample subset.
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image a batch holds."""

    @property
    def train_size(self) -> int:
        """Training examples (after a few-sample subset)."""

    @property
    def test_size(self) -> int:
        """Held-out examples."""

    def train_batch(self, batch_size: int, seed: int, step: int,
                    rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images and int32 labels of global ``step``'s batch (only the positions ``rows``, this
        process's, when given); a function of (seed, step) alone."""

    def train_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole training split (images, labels) as ``train_batch`` indexes it, for ``data.on_device``;
        in-memory sources only (the spec refuses ``on_device`` for a stream)."""

    def eval_batches(self, batch_size: int,
                     rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(x, y, mask)`` covering every held-out example once, every batch ``batch_size`` long (the last
        zero-padded, mask 0), only the positions ``rows`` of each when given: every process runs the same
        number of batches."""

    def close(self) -> None:
        """Stops what the source holds open (a stream's worker processes); nothing in memory."""


def load(d) -> Source:
    """The source that ``d`` (the data spec, :class:`ekd_jax.spec.DataSpec`, validated) names: a stream
    for a source larger than memory, else the whole dataset in memory, resized, checked and maybe subset."""
    return stream.load(d) if d.is_stream else memory.load(d)
