"""Data parallelism: a one-axis device mesh, the batch sharded along it, the state replicated.

This is jit-with-shardings, the successor of ``jax.pmap``: the train step is written for the
global batch and XLA partitions it over the mesh, inserting the gradient all-reduce itself.
BatchNorm statistics are therefore computed over the global batch (synchronised BN), which is
why results on 8 devices equal those on 1.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all). Built with ``Mesh`` directly so the axis is
    an ordinary (auto-sharded) axis — ``jax.make_mesh`` would default to explicit axes."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(
            f"{what}={batch_size} is not divisible by the {n} devices of the mesh; "
            f"choose a multiple of {n}"
        )


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Moves a host batch to the devices, split along the batch axis (one transfer per device)."""
    sharding = batch_sharded(mesh)
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, replicated(mesh))
