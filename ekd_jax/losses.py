"""Loss functions: small pure functions, every hyperparameter passed in.

All losses compute in float32 (inputs are cast), so bfloat16 compute stays numerically safe.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross-entropy over the batch, with optional label smoothing."""
    logits = _f32(logits)
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))


WEIGHTED_MEANS = ("kept", "batch")


def weighted_mean(per_sample: jax.Array, weights: jax.Array | None = None, over: str = "kept") -> jax.Array:
    """Mean of per-sample values (N,) under optional per-sample weights (N,) in [0, 1].

    ``over='kept'``: sum(w * x) / max(sum(w), 1) -- the mean over the samples the weights keep, so
    the weights choose *which* samples count, not how strongly the term weighs as the number of
    kept samples moves (with weights that are all 1 it is the plain batch mean).
    ``over='batch'``: mean(w * x) over the whole batch (the term shrinks with the kept fraction).
    """
    if weights is None:
        return jnp.mean(per_sample)
    w = _f32(weights)
    if over == "kept":
        return jnp.sum(per_sample * w) / jnp.maximum(jnp.sum(w), 1.0)
    if over == "batch":
        return jnp.mean(per_sample * w)
    raise ValueError(f"unknown weighted mean {over!r}; use one of {WEIGHTED_MEANS}")


def kl_divergence(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    tau: float,
    weights: jax.Array | None = None,
    over: str = "kept",
) -> jax.Array:
    """Hinton's temperature KL: KL(softmax(t/tau) || softmax(s/tau)), batch mean times tau^2.

    Equals PyTorch's ``KLDivLoss(reduction='batchmean')(log_softmax(s/tau), softmax(t/tau)) * tau**2``.
    The caller decides about stop-gradients. ``weights`` (N,) optionally weights each sample,
    averaged as :func:`weighted_mean` ``over`` says.
    """
    log_p_s = jax.nn.log_softmax(_f32(student_logits) / tau, axis=-1)
    log_p_t = jax.nn.log_softmax(_f32(teacher_logits) / tau, axis=-1)
    per_sample = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return weighted_mean(per_sample, weights, over) * tau**2


def l2_normalize_per_sample(f: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Divides each sample's whole feature map by its L2 norm."""
    f = _f32(f)
    flat = f.reshape(f.shape[0], -1)
    norm = jnp.sqrt(jnp.sum(flat * flat, axis=-1, keepdims=True) + eps)
    return (flat / norm).reshape(f.shape)


def _per_sample(sq: jax.Array, reduction: str) -> jax.Array:
    """(N, M) squared errors -> (N,): 'mean' or 'sum' over each sample's M entries."""
    if reduction == "mean":
        return jnp.mean(sq, axis=-1)
    if reduction == "sum":
        return jnp.sum(sq, axis=-1)
    raise ValueError(f"unknown feature reduction {reduction!r}; use 'mean' or 'sum'")


def feature_distance(
    student_f: jax.Array,
    teacher_f: jax.Array,
    normalize: bool = False,
    reduction: str = "mean",
    weights: jax.Array | None = None,
    over: str = "kept",
) -> jax.Array:
    """Squared-error distance between feature maps of equal shape.

    reduction='mean': mean over every element (PyTorch MSELoss).
    reduction='sum': sum over each sample's elements, then mean over the batch — keeps the term's
    scale independent of the map size, which matters once features are L2-normalised per sample
    (element-averaged normalised MSE is ~1e-3 and does nothing).
    ``weights`` (N,) optionally weights each sample, averaged as :func:`weighted_mean` ``over`` says.
    """
    if student_f.shape != teacher_f.shape:
        raise ValueError(f"feature shapes differ: student {student_f.shape} vs teacher {teacher_f.shape}")
    s, t = _f32(student_f), _f32(teacher_f)
    if normalize:
        s, t = l2_normalize_per_sample(s), l2_normalize_per_sample(t)
    sq = jnp.square(s - t).reshape(s.shape[0], -1)
    return weighted_mean(_per_sample(sq, reduction), weights, over)


def batch_similarity(f: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Row-normalised batch similarity of feature maps (N, ...) -> (N, N): G = A A^T with A the
    flattened maps, each row of G divided by its L2 norm (Tung & Mori, similarity-preserving KD)."""
    a = _f32(f).reshape(f.shape[0], -1)
    g = a @ a.T
    return g / jnp.sqrt(jnp.sum(g * g, axis=-1, keepdims=True) + eps)


def relation_distance(
    student_f: jax.Array,
    teacher_f: jax.Array,
    reduction: str = "mean",
    weights: jax.Array | None = None,
    over: str = "kept",
) -> jax.Array:
    """Squared distance between the two networks' batch-similarity matrices (:func:`batch_similarity`).

    Sample i's distance is the squared error of its row (how it relates to every sample of the
    batch): reduction='mean' averages the row's N entries, so the unweighted result is SP's
    ||G_S - G_T||_F^2 / N^2; 'sum' sums them. Rows average over the batch as :func:`weighted_mean`
    does. The maps may differ in channels and size (only the N x N matrices are compared).
    """
    if student_f.shape[0] != teacher_f.shape[0]:
        raise ValueError(f"batch sizes differ: student {student_f.shape[0]} vs teacher {teacher_f.shape[0]}")
    sq = jnp.square(batch_similarity(student_f) - batch_similarity(teacher_f))
    return weighted_mean(_per_sample(sq, reduction), weights, over)


def attention_map(f: jax.Array, p: float = 2.0) -> jax.Array:
    """Zagoruyko & Komodakis attention: mean_c |f|^p over channels, flattened, L2-normalised. (N, H*W)."""
    f = _f32(f)
    a = jnp.mean(jnp.abs(f) ** p, axis=-1).reshape(f.shape[0], -1)
    # a / max(||a||, eps) (PyTorch's F.normalize) with a finite gradient on an all-zero map,
    # where d||a|| is 0/0.
    return a / optax.safe_norm(a, 1e-12, axis=-1, keepdims=True)


def attention_transfer(student_f: jax.Array, teacher_f: jax.Array, p: float = 2.0) -> jax.Array:
    """AT loss (RepDistiller): mean over batch and positions of (at(s) - at(t))^2.

    Spatial sizes must agree; the caller resizes first (adaptive pooling of the larger map).
    """
    a_s, a_t = attention_map(student_f, p), attention_map(teacher_f, p)
    if a_s.shape != a_t.shape:
        raise ValueError(f"attention maps differ in size: {a_s.shape} vs {a_t.shape}")
    return jnp.mean(jnp.square(a_s - a_t))


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Per-example 1.0 if the label is among the top-k logits, else 0.0."""
    k = min(k, logits.shape[-1])
    _, idx = jax.lax.top_k(_f32(logits), k)
    return jnp.any(idx == labels[:, None], axis=-1).astype(jnp.float32)
