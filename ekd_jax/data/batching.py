"""Which examples each batch holds: training batches as a function of (seed, step) alone, this process's
rows of them, and the padded evaluation batches. Indices only; every source reads its own examples.

Every training batch follows from ``(seed, step)`` alone, which makes resuming exact, and the global batch
is the same however it is split between processes, so a run's result does not depend on the process count.
"""

from __future__ import annotations

import functools

import numpy as np


def steps_per_epoch(train_size: int, batch_size: int) -> int:
    """Full batches per epoch; the remainder is dropped (a different one each epoch)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if batch_size > train_size:
        raise ValueError(
            f"batch_size {batch_size} is larger than the training set ({train_size} "
            "examples), so an epoch has no full batch; lower the batch size (or use more "
            "training data: samples_per_class / train_fraction)."
        )
    return train_size // batch_size


@functools.lru_cache(maxsize=4)  # every step of an epoch asks for the same permutation
def _cached_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.default_rng((seed, epoch)).permutation(n)
    perm.setflags(write=False)  # shared through the cache: nobody may shuffle it in place
    return perm


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the n training examples in ``epoch``: a function of (seed, epoch) only."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}.")
    return _cached_permutation(int(n), int(seed), int(epoch))


def batch_indices(train_size: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The training-split indices of global ``step``'s whole batch: a function of (seed, step)."""
    epoch, i = divmod(step, steps_per_epoch(train_size, batch_size))
    return epoch_permutation(train_size, seed, epoch)[i * batch_size : (i + 1) * batch_size]


def process_batch_indices(
    train_size: int, batch_size: int, seed: int, step: int, rows: np.ndarray | None = None
) -> np.ndarray:
    """The training-split indices this process loads for global ``step``: the ``rows`` (positions
    in the global batch its devices hold, ``parallel.process_rows``) of the (seed, step) batch.

    The one place where a global batch is split between processes. The global batch is the same
    however it is split, so a run's result does not depend on the process count; any source that
    can read examples by index (in memory, a random-access file) reuses it.
    """
    idx = batch_indices(train_size, batch_size, seed, step)
    return idx if rows is None else idx[rows]


def eval_batch_count(test_size: int, batch_size: int) -> int:
    """How many evaluation batches cover ``test_size`` examples (the last one padded)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    return -(-test_size // batch_size)


def eval_indices(test_size: int, batch_size: int, b: int,
                 rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(indices, real) of evaluation batch ``b``: the held-out indices at its positions ``rows`` (this
    process's; all ``batch_size`` when None) and which of them are examples rather than padding.

    Every batch is ``batch_size`` long, the last one padded past the end of the split, so the eval step
    compiles once and every process runs the same number of batches, padded the same way, whatever its
    share of the real examples; the padding gets mask 0 and never counts.
    """
    positions = np.arange(batch_size) if rows is None else np.asarray(rows)
    idx = b * batch_size + positions
    return idx, idx < test_size
