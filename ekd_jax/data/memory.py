"""Sources loaded whole into host memory: ``digits``, ``npz:<path>`` and ``tfds:<name>``, each becoming
the same :class:`Dataset` of uint8 arrays, resized once, checked, and optionally subset (few-sample).

* ``tfds:<name>``  any TFDS image-classification dataset with ``image`` and ``label``
  features (``tfds:cifar100``, ``tfds:imagenet_resized/32x32``, ...). Prepared through
  TFDS on first use (:mod:`ekd_jax.data.tfds`: the internet and TensorFlow once), optionally
  under ``data.tfds_data_dir``.
* ``npz:<path>``   a NumPy archive with ``x_train, y_train, x_test, y_test`` (uint8 NHWC,
  or NHW for grayscale; integer labels) and optional ``class_names``: bring your own data.
* ``digits``       scikit-learn's bundled 8x8 handwritten digits: the offline default.

The host only slices uint8 batches (:meth:`Dataset.train_batch`, :meth:`Dataset.eval_batches`; in a
multi-process run only this process's rows of each); everything else happens on the device
(:mod:`ekd_jax.data.views`).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile
from typing import Any, Iterator

import numpy as np
from PIL import Image

from ekd_jax.data import batching, subsets, views
from ekd_jax.data import tfds as tfds_lib

NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: `==` on arrays is not a bool
class Dataset:
    """A whole classification dataset in host memory.

    ``mean``/``std`` are per-channel statistics in [0, 1] of the FULL training split (at
    the configured size), computed before any few-sample subsetting, so a subset does not
    change the normalisation and all subset sizes see the same input scale.
    """

    x_train: np.ndarray  # uint8 (N, H, W, C), C = 1 or 3
    y_train: np.ndarray  # int32 (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: tuple[str, ...] | None
    source: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    @property
    def train_size(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def test_size(self) -> int:
        return int(self.x_test.shape[0])

    def train_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole training split, (images, labels), indexed as :meth:`train_batch` indexes it."""
        return self.x_train, self.y_train

    def train_batch(
        self, batch_size: int, seed: int, step: int, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The uint8 images and int32 labels of global ``step`` (only the batch positions ``rows``,
        this process's, when given); depends only on (seed, step)."""
        idx = batching.process_batch_indices(self.train_size, batch_size, seed, step, rows)
        return self.x_train[idx], self.y_train[idx]

    def eval_batches(
        self, batch_size: int, rows: np.ndarray | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yields ``(x, y, mask)`` covering every test example once, all batches ``batch_size`` long.

        The last batch is zero-padded so the eval step compiles once; ``mask`` (float32, 1 for
        real examples) lets metrics ignore the padding. With ``rows`` (positions in the batch, this
        process's) only those rows of each batch are yielded: every process gets the same number
        of batches, padded the same way, whatever its share of the real examples.
        """
        x, y = self.x_test, self.y_test
        for b in range(batching.eval_batch_count(len(x), batch_size)):
            idx, real = batching.eval_indices(len(x), batch_size, b, rows)
            if real.all():
                yield x[idx], y[idx], np.ones(len(idx), np.float32)
                continue
            xb = np.zeros((len(idx), *x.shape[1:]), x.dtype)
            yb = np.zeros(len(idx), y.dtype)
            xb[real], yb[real] = x[idx[real]], y[idx[real]]
            yield xb, yb, real.astype(np.float32)

    def close(self) -> None:
        """Nothing to stop: the arrays are freed with the dataset."""


# --------------------------------------------------------------------------- loading


def load(d: Any) -> Dataset:
    """Loads the source of ``d`` (a validated :class:`ekd_jax.spec.DataSpec`) into memory, resized,
    checked against what only the data tells (image sizes, channel and class counts) and optionally
    subset."""
    if d.kind == "digits":
        x_train, y_train, x_test, y_test, names = _load_digits()
    elif d.kind == "npz":
        x_train, y_train, x_test, y_test, names = _load_npz(d.location)
    else:
        x_train, y_train, x_test, y_test, names = _load_tfds(d.location, d.tfds_data_dir, d.image_size)
    x_train, y_train, x_test, y_test = _validate_arrays(x_train, y_train, x_test, y_test)
    num_classes = _num_classes(y_train, y_test, names)

    if d.image_size is not None:
        x_train = _resize_images(x_train, d.image_size)
        x_test = _resize_images(x_test, d.image_size)
    views.check_downsample(d, x_train.shape[1:3])
    if d.mean:  # fixed statistics (the spec has checked them), e.g. ImageNet's
        mean, std = tuple(map(float, d.mean)), tuple(map(float, d.std))
        if len(mean) != x_train.shape[-1]:
            raise ValueError(
                f"data.mean={mean!r} is not valid: one value per channel of the images, which have "
                f"{x_train.shape[-1]}; fix --config.data.mean"
            )
    else:
        mean, std = channel_stats(x_train)

    keep = subsets.few_sample_subset(d, y_train, names)
    if keep is not None:
        x_train, y_train = x_train[keep], y_train[keep]

    return Dataset(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=num_classes,
        class_names=names,
        source=d.source,
        mean=mean,
        std=std,
    )


# --------------------------------------------------------------------------- sources


def _load_digits():
    """scikit-learn's 1,797 bundled 8x8 digits, a fixed stratified 80/20 split."""
    from sklearn import datasets, model_selection  # lazy: only this source needs it

    digits = datasets.load_digits()
    # Pixel values are 0..16; map 16 -> 255 so the images look like any other uint8 image.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    train_idx, test_idx = model_selection.train_test_split(
        np.arange(len(labels)),
        test_size=DIGITS_TEST_FRACTION,
        stratify=labels,
        random_state=DIGITS_SPLIT_SEED,
    )
    # Sorted, so the split is a fixed set of rows in the original order.
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    names = tuple(str(n) for n in digits.target_names)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], names


def npz_file(path: str) -> str:
    """The absolute path of an ``npz:<path>`` source; a ValueError naming it when it is no file.
    (The spec asks first, so that a missing file is refused before anything is made.)"""
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full):
        raise ValueError(
            f"data.source='npz:{path}': file not found: {full}. Check the path (relative paths "
            f"start at the current directory, {os.getcwd()}); fix --config.data.source"
        )
    return full


def _load_npz(path: str):
    """An ``np.savez`` archive; every problem becomes a ValueError that says what to fix."""
    where = f"data.source='npz:{path}'"
    full = npz_file(path)
    unreadable = (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError)
    fix = "Write it with np.savez / np.savez_compressed, with plain (non-object) arrays."
    try:
        archive = np.load(full, allow_pickle=False)
    except unreadable as e:
        raise ValueError(
            f"{where}: cannot read {full} as an .npz archive ({type(e).__name__}: {e}). {fix}"
        ) from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{where}: {full} holds a single .npy array, not an .npz archive. {fix}")
    with archive:
        present = sorted(archive.files)
        missing = [k for k in NPZ_ARRAYS if k not in present]
        if missing:
            raise ValueError(
                f"{where}: missing arrays {missing}; the file has {present}. Save all of "
                f"{list(NPZ_ARRAYS)} (class_names is optional)."
            )
        try:  # members are read lazily, so a damaged member only fails here
            arrays = {k: archive[k] for k in (*NPZ_ARRAYS, "class_names") if k in present}
        except unreadable as e:
            raise ValueError(
                f"{where}: cannot read the arrays of {full} ({type(e).__name__}: {e}). {fix}"
            ) from e
    names = arrays.get("class_names")
    if names is not None:
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise ValueError(
                f"{where}: class_names must be a 1-D string array, got shape {names.shape} "
                f"dtype {names.dtype}; save np.array(list_of_names, dtype=str)."
            )
        names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist())
    return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], names


def _load_tfds(name: str, data_dir: str | None, image_size: int | None):
    """The train and held-out splits of a TFDS dataset, whole, as uint8 numpy."""
    import tensorflow_datasets as tfds  # lazy: importing TensorFlow takes seconds

    where = f"data.source='tfds:{name}'"
    builder, held_out = tfds_lib.prepared_builder(name, data_dir)
    features = builder.info.features
    variable = None in features[tfds_lib.IMAGE_KEY].shape[:2]
    if variable and image_size is None:
        raise ValueError(
            f"{where}: images have varying sizes; set data.image_size (e.g. 64) so they can "
            "be resized to one size."
        )

    def read(split: str):
        ds = builder.as_dataset(
            split=split,
            shuffle_files=False,  # a fixed order, so subsets and batches are reproducible
            # Decode only what we keep (e.g. not caltech_birds2011's segmentation masks).
            decoders=tfds.decode.PartialDecoding({"image": True, "label": True}),
        )
        ds = ds.map(lambda ex: (ex["image"], ex["label"]))
        if variable:  # different sizes cannot be stacked: resize one at a time
            pairs = [(_resize_images(x[None], image_size)[0], y) for x, y in tfds.as_numpy(ds)]
            return np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs])
        chunks = list(tfds.as_numpy(ds.batch(8192)))
        return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])

    x_train, y_train = read("train")
    x_test, y_test = read(held_out)
    return x_train, y_train, x_test, y_test, tuple(features[tfds_lib.LABEL_KEY].names)


# --------------------------------------------------------------------------- checks & stats


def _validate_arrays(x_train, y_train, x_test, y_test):
    """Checks dtypes and shapes; returns NHWC uint8 images and int32 labels."""
    out = []
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype != np.uint8:
            raise ValueError(
                f"x_{split} must be uint8 images (0..255), got dtype {x.dtype}. Convert with "
                "np.clip(np.round(x * 255), 0, 255).astype(np.uint8) for [0,1] floats."
            )
        if x.ndim == 3:  # NHW grayscale
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.shape[0] == 0:
            raise ValueError(
                f"x_{split} must be non-empty NHWC images with 1 or 3 channels (or NHW "
                f"grayscale), got shape {x.shape}."
            )
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"y_{split} must be 1-D integer labels, got shape {y.shape} dtype {y.dtype}; "
                "use y.reshape(-1).astype(np.int32)."
            )
        if len(y) != len(x):
            raise ValueError(f"y_{split} has {len(y)} labels for {len(x)} images in x_{split}.")
        if y.min() < 0:
            raise ValueError(
                f"y_{split} has negative labels (min {y.min()}); labels must be 0..num_classes-1."
            )
        out += [x, y.astype(np.int32)]
    if out[0].shape[1:] != out[2].shape[1:]:
        raise ValueError(
            f"Train images are {out[0].shape[1:]} but test images are {out[2].shape[1:]} "
            "(H, W, C); they must agree: save both splits at one size and channel count."
        )
    return tuple(out)


def _num_classes(y_train, y_test, names) -> int:
    top = int(max(y_train.max(), y_test.max()))
    if names is None:
        return top + 1
    if top >= len(names):
        raise ValueError(
            f"class_names lists {len(names)} classes but the labels go up to {top}; give "
            "a name for every label 0..max."
        )
    return len(names)


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std in [0, 1] of uint8 NHWC images.

    A channel that never varies (std 0, e.g. a constant border colour or a grey image stored as
    RGB with one empty channel) gets std 1: normalising it then only centres it, where dividing
    by 0 would feed inf/NaN to the networks.
    """
    channels = images.shape[-1]
    counts = np.zeros((channels, 256), np.int64)
    # Histograms are exact and need no float copy of the whole (possibly huge) split.
    for start in range(0, images.shape[0], 4096):
        chunk = images[start : start + 4096]
        for c in range(channels):
            counts[c] += np.bincount(chunk[..., c].ravel(), minlength=256)
    values = np.arange(256) / 255.0
    total = counts.sum(axis=1)
    mean = counts @ values / total
    var = counts @ values**2 / total - mean**2
    std = np.sqrt(np.maximum(var, 0.0))
    std = np.where(std > 0.0, std, 1.0)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resizes uint8 NHWC images to size x size, once on the host (antialiased bilinear)."""
    if images.shape[1:3] == (size, size):
        return images
    # Pillow's bilinear filter widens with the scale factor, i.e. it antialiases when
    # shrinking, and it is deterministic on uint8.
    out = np.empty((images.shape[0], size, size, images.shape[-1]), np.uint8)
    for i, img in enumerate(images):
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        out[i] = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR)).reshape(
            size, size, -1
        )
    return out
