"""The one evaluation path, shared by training (the joint state) and ``ekd_jax.evaluate`` (saved
networks): masked sums inside jit, accumulated on device over padded batches, divided on the host.

Every batch has the same shape (the last one padded and masked), so every process and device runs
the same number of identical programs, and the padding never counts.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ekd_jax import losses, parallel


def classification_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array, prefix: str = "",
                        num_classes: int | None = None) -> dict[str, jax.Array]:
    """Sums over the real (mask 1) examples: correct top-1 and top-5, cross-entropy, and with
    ``num_classes`` the confusion matrix (true class per row). Keys are ``prefix + name``; add
    ``count_sum(mask)`` once per batch for :func:`means`."""
    mask = mask.astype(jnp.float32)
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    out = {
        f"{prefix}top1": jnp.sum(losses.topk_correct(logits, labels, 1) * mask),
        f"{prefix}top5": jnp.sum(losses.topk_correct(logits, labels, 5) * mask),
        f"{prefix}loss": jnp.sum(ce * mask),
    }
    if num_classes is not None:
        pred = jax.nn.one_hot(jnp.argmax(logits, -1), num_classes)
        true = jax.nn.one_hot(labels, num_classes) * mask[:, None]
        out[f"{prefix}confusion"] = true.T @ pred
    return out


def count_sum(mask: jax.Array) -> dict[str, jax.Array]:
    return {"count": jnp.sum(mask.astype(jnp.float32))}


def accumulate(sums_fn: Callable[[Any, dict], dict[str, jax.Array]], first: Any,
               batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], batch_size: int,
               mesh) -> dict[str, np.ndarray]:
    """Runs the jitted ``sums_fn(first, batch)`` over ``batches`` (this process's rows of every padded
    evaluation batch, ``(x, y, mask)``: ``source.eval_batches(batch_size, parallel.process_rows(mesh,
    batch_size))``), each made a global batch sharded over ``mesh`` with keys image/label/mask; ``sums_fn``
    returns sums including 'count', the real examples. Returns the totals on the host. The sums are over
    the global batch (replicated), so every process returns the same totals."""
    totals = None
    for xb, yb, mask in batches:
        out = sums_fn(first, parallel.global_batch({"image": xb, "label": yb, "mask": mask}, mesh, batch_size))
        totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
    return {k: np.asarray(v) for k, v in jax.device_get(totals).items()}


def means(totals: dict[str, np.ndarray]) -> dict[str, float]:
    """Scalar totals divided by the example count (matrices such as a confusion are left out)."""
    n = float(totals["count"])
    return {k: float(v) / n for k, v in totals.items() if k != "count" and np.ndim(v) == 0}
