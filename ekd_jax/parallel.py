"""Data parallelism: a one-axis device mesh over all processes, the batch sharded along it, the
state replicated.

This is jit-with-shardings, the successor of ``jax.pmap``: the train step is written for the
global batch and XLA partitions it over the mesh, inserting the gradient all-reduce itself.
BatchNorm statistics are therefore computed over the global batch (synchronised BN), which is
why results on 8 devices equal those on 1.

In a multi-process run (:mod:`ekd_jax.distributed`) the mesh holds every device of every process,
each host's devices next to each other, so each process holds a contiguous block of every global
batch. A process only ever materialises its own rows (:func:`process_rows`) and builds the global
arrays from them with ``jax.make_array_from_process_local_data``; ``jax.device_put`` of a whole
global batch would instead check on every step that all hosts hold equal values.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process, ordered by
    (process, device id), so each process's devices form one block). Built with ``Mesh`` directly
    so the axis is an ordinary (auto-sharded) axis — ``jax.make_mesh`` would default to explicit
    axes. Explicit ``devices`` are used in the order given."""
    if devices is None:
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(list(devices)), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def chunk_sharded(mesh: Mesh) -> NamedSharding:
    """K batches stacked along a leading axis (the steps of one call), each sharded like a batch."""
    return NamedSharding(mesh, P(None, DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(
            f"{what}={batch_size} is not divisible by the {n} devices of the mesh; "
            f"choose a multiple of {n}"
        )


@functools.lru_cache(maxsize=16)  # asked on every step, for one or two batch sizes
def _process_rows(mesh: Mesh, global_size: int) -> np.ndarray:
    index_map = batch_sharded(mesh).addressable_devices_indices_map((global_size,))
    spans = sorted({(s[0].start or 0, global_size if s[0].stop is None else s[0].stop) for s in index_map.values()})
    rows = np.concatenate([np.arange(a, b) for a, b in spans]) if spans else np.zeros(0, np.int64)
    rows.setflags(write=False)
    return rows


def process_rows(mesh: Mesh, global_size: int) -> np.ndarray:
    """The positions, within a batch-sharded global batch of ``global_size`` rows, that this
    process's devices hold, in the order ``jax.make_array_from_process_local_data`` expects its
    rows (all of ``range(global_size)`` in a single-process run)."""
    check_batch_size(global_size, mesh)
    return _process_rows(mesh, int(global_size))


def _from_process_rows(local: dict[str, np.ndarray], sharding: NamedSharding, axis: int,
                       global_size: int) -> dict[str, jax.Array]:
    """Global arrays from this process's rows along ``axis`` (of ``global_size`` in all); no communication."""
    def global_shape(v):
        shape = list(np.shape(v))
        shape[axis] = int(global_size)
        return tuple(shape)

    return {k: jax.make_array_from_process_local_data(sharding, v, global_shape(v)) for k, v in local.items()}


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, global_size: int) -> dict[str, jax.Array]:
    """This process's rows (``local``, ordered as :func:`process_rows` says) -> global arrays of
    ``global_size`` rows sharded along the batch axis: one transfer per local device, and no
    communication between processes."""
    return _from_process_rows(local, batch_sharded(mesh), 0, global_size)


def global_chunk(local: dict[str, np.ndarray], mesh: Mesh, global_size: int) -> dict[str, jax.Array]:
    """:func:`global_batch` for K batches stacked along a leading axis: ``local`` holds (K, this
    process's rows, ...) of each, the result (K, ``global_size``, ...) sharded as :func:`chunk_sharded`."""
    return _from_process_rows(local, chunk_sharded(mesh), 1, global_size)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """A whole global batch held on this host -> global arrays split along the batch axis; each
    process transfers only its own rows. (The training loop does not build whole batches: it loads
    only this process's rows, ``ekd_jax.feed``, and calls :func:`global_chunk`.)"""
    n = len(next(iter(batch.values())))
    rows = process_rows(mesh, n)
    if len(rows) == n:  # every row is this process's (single process): no copy
        return global_batch(batch, mesh, n)
    return global_batch({k: np.asarray(v)[rows] for k, v in batch.items()}, mesh, n)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host values -> arrays replicated over the mesh (every process must pass the same values)."""
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), np.shape(x)), tree
    )
