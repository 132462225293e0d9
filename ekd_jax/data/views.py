"""What each network sees of a uint8 batch, on the device: augmentation, normalisation and the student's
low-resolution view, as pure ``jnp`` functions meant to run inside the jitted step.

The host only hands over uint8 batches (:mod:`ekd_jax.data.memory`, :mod:`ekd_jax.data.stream`); every
float operation on images happens here. The data options these functions read (``crop_padding``,
``flip``, ``student_downsample``, ``lowres_mode``) are Python values, static under jit. Nothing of the
data package is imported here: any source's batches go through the same views.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

LOWRES_MODES = ("upsample", "native")


def check_downsample(d: Any, hw: Sequence[int]) -> None:
    """The student's factor ``d.student_downsample`` must divide the image size ``hw``. The spec asks
    with ``data.image_size`` before loading; the loader asks again with the data's own size."""
    factor = d.student_downsample
    if any(s % factor for s in hw):
        raise ValueError(
            f"data.student_downsample={factor} does not divide the image size "
            f"{tuple(hw)}; pick a factor that divides it or set data.image_size to a "
            f"multiple of {factor}."
        )


def augment(images: jax.Array, key: jax.Array, crop_padding: int, flip: bool) -> jax.Array:
    """Random zero-padded crop and horizontal flip, drawn per example; float32 in [0, 1].

    ``crop_padding`` and ``flip`` must be Python values (static under jit). The caller
    derives ``key`` as ``jax.random.fold_in(jax.random.key(seed), step)``.
    """
    images = jnp.asarray(images)
    n, h, w, c = images.shape
    crop_key, flip_key = jax.random.split(key)
    if crop_padding > 0:
        p = crop_padding
        padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
        offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * p + 1)
        images = jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c)))(
            padded, offsets
        )
    if flip:
        mirror = jax.random.bernoulli(flip_key, 0.5, (n,))
        images = jnp.where(mirror[:, None, None, None], images[:, :, ::-1], images)
    return _to_unit(images)


def normalize(x01: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """Per-channel standardisation of NHWC images in [0, 1]."""
    return (x01 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def degrade(x01: jax.Array, factor: int, mode: str) -> jax.Array:
    """The low-resolution view: shrink by ``factor`` (antialiased), then maybe grow back.

    ``mode='upsample'`` returns the input size (same network input, lost detail);
    ``'native'`` keeps the small size. Linear interpolation has no overshoot, so the
    result stays in the input's range. (The spec has checked the mode, the loader that the factor
    divides the image size.)
    """
    if factor == 1:
        return x01
    n, h, w, c = x01.shape
    small = jax.image.resize(x01, (n, h // factor, w // factor, c), "linear", antialias=True)
    if mode == "native":
        return small
    return jax.image.resize(small, (n, h, w, c), "linear")


def make_views(
    images: jax.Array,
    key: jax.Array | None,
    d: Any,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
) -> tuple[jax.Array, jax.Array]:
    """(teacher_x, student_x), normalised float32 NHWC, from one uint8 batch.

    In training both views come from the SAME random crop/flip; the student's is then
    degraded. In evaluation nothing is random and the student's test images are degraded
    the same way. ``d`` (the data spec, :class:`ekd_jax.spec.DataSpec`) is read as Python
    values, i.e. static under jit.
    """
    if train:
        if key is None:
            raise ValueError("make_views(train=True) needs a PRNG key for the augmentation.")
        x01 = augment(images, key, d.crop_padding, d.flip)
    else:
        x01 = _to_unit(jnp.asarray(images))
    factor, mode = d.student_downsample, d.lowres_mode
    check_downsample(d, x01.shape[1:3])
    teacher = normalize(x01, mean, std)
    if factor == 1:
        return teacher, teacher
    return teacher, normalize(degrade(x01, factor, mode), mean, std)


def teacher_input_shape(d: Any, image_shape: Sequence[int]) -> list[int]:
    """[H, W, C] the teacher network is fed (always the full image)."""
    del d  # the teacher always sees the images as loaded
    return list(image_shape)


def student_input_shape(d: Any, image_shape: Sequence[int]) -> list[int]:
    """[H, W, C] the student network is fed: smaller only in 'native' low-resolution mode."""
    h, w, c = image_shape
    check_downsample(d, (h, w))
    factor = d.student_downsample
    if d.lowres_mode == "native":
        return [h // factor, w // factor, c]
    return [h, w, c]


def _to_unit(images: jax.Array) -> jax.Array:
    return images.astype(jnp.float32) / 255.0
