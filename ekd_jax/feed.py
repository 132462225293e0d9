"""What the training loop hands each call of the compiled training program: the batches of K steps.

A chunk is steps ``first .. first + n - 1`` (n <= K) of the run, stacked along a leading axis of length K
(the rest zero, never read) so that one compiled program serves every chunk. Each process builds only its
rows of every batch, as one step at a time did (``parallel.global_chunk``): the global chunk is the same
for any process count. With ``data.on_device`` the training split is copied to every device once
(:attr:`Feed.resident`) and a chunk is only the batches' example indices; the program gathers the images
there.

The loop asks for chunk c + 1 right after dispatching chunk c, so its host work and transfer overlap the
device's work on chunk c (:func:`ekd_jax.train.train_epoch`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ekd_jax import parallel
from ekd_jax.data import batching


class Feed:
    """The chunks of one run: ``source`` (``ekd_jax.data.load``) read by (seed, step), ``k`` steps per call."""

    def __init__(self, source, batch_size: int, seed: int, k: int, mesh, on_device: bool = False):
        self.source, self.batch_size, self.seed, self.k, self.mesh = source, batch_size, seed, k, mesh
        self.rows = parallel.process_rows(mesh, batch_size)  # this process's share of every global batch
        self.resident: dict[str, jax.Array] = {}
        if on_device:
            x, y = source.train_arrays()
            self.resident = parallel.replicate({"image": x, "label": y}, mesh)

    def chunk(self, first: int, n: int) -> dict[str, jax.Array]:
        """Steps ``first .. first + n - 1`` as global (K, batch, ...) arrays on the mesh."""
        steps = range(first, first + n)
        if self.resident:
            local = {"index": self._stack([batching.process_batch_indices(
                self.source.train_size, self.batch_size, self.seed, s, self.rows).astype(np.int32) for s in steps])}
        else:
            xs, ys = zip(*(self.source.train_batch(self.batch_size, self.seed, s, self.rows) for s in steps))
            local = {"image": self._stack(xs), "label": self._stack(ys)}
        return parallel.global_chunk(local, self.mesh, self.batch_size)

    def abstract(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The shapes and shardings of a chunk (to compile the program before the first one is made)."""
        sharding = parallel.chunk_sharded(self.mesh)
        lead = (self.k, self.batch_size)
        if self.resident:
            return {"index": jax.ShapeDtypeStruct(lead, jnp.int32, sharding=sharding)}
        return {"image": jax.ShapeDtypeStruct((*lead, *self.source.image_shape), jnp.uint8, sharding=sharding),
                "label": jax.ShapeDtypeStruct(lead, jnp.int32, sharding=sharding)}

    def _stack(self, arrays) -> np.ndarray:
        """n arrays -> (K, ...): the steps' arrays, then zeros up to K."""
        out = np.zeros((self.k, *np.shape(arrays[0])), np.asarray(arrays[0]).dtype)
        out[: len(arrays)] = arrays
        return out
