"""Datasets larger than memory: a grain stream that reads examples by index from random-access files.

The in-memory sources (:mod:`ekd_jax.data.memory`) load a whole dataset as uint8 arrays; this one never
holds more than a few batches. It reads from a random-access source of serialized examples:

* ``data.source='tfds:<name>'`` with ``data.streaming=True``: a TFDS dataset prepared in TFDS's
  ArrayRecord format, read with ``builder.as_data_source`` (prepared on first use, as
  ``tfds.data_source`` does: ``file_format='array_record'``; :mod:`ekd_jax.data.tfds`);
* ``data.source='arrayrecord:<pattern>'`` (always streamed): your ArrayRecord files, ``<pattern>`` a
  glob with ``{split}`` in it, e.g. ``arrayrecord:/data/mine/{split}-*.array_record``; ``{split}``
  is replaced by ``train`` for training and by ``test`` (or, without test files, ``validation``)
  for evaluation.

**Record format** (both): each record is a serialized ``tf.train.Example`` with a bytes feature
``image`` (one encoded image: JPEG, PNG or anything Pillow opens, any size, converted to RGB) and an
int64 feature ``label`` (the class index, from 0) -- exactly what TFDS writes for its
image-classification datasets; other features are ignored. :func:`write_arrayrecord` writes such
files; they are parsed with TFDS's TensorFlow-free protobuf classes (no TensorFlow needed).

**Which examples.** The batch of global step ``s`` is ``batching.process_batch_indices`` of (seed, s), as
in memory: each process reads only its rows of the global batch (the same global batch for any
process count), and a resumed run reads exactly the batches it would have read. A few-sample run
(``data.samples_per_class`` / ``data.train_fraction``) keeps the same class-balanced indices as the
in-memory path (``subsets.class_balanced_subset`` of the training labels). The labels come from the
records: an ``arrayrecord:`` source reads every record of both splits once at start (its class count
is the largest label + 1); a TFDS source takes the class count and names from its ``ClassLabel`` and
reads the training labels (one pass) only for a few-sample subset.

**Where the work happens.** Decoding and the random-resized crop (torchvision's
``RandomResizedCrop``: area fraction ``data.crop_scale``, aspect ratio ``data.crop_ratio``, bilinear,
to ``data.image_size``) run on the host in grain map transforms -- in ``data.workers`` worker
processes, or in the training process with ``data.workers=0``. The crop of the example at position p
of step s's global batch is drawn from ``np.random.default_rng([seed, s, p])``, so it depends on
neither the process count nor the worker count. The horizontal flip and the normalisation stay on
device (``views.make_views``, with ``data.crop_padding=0``: no pad-and-crop), with the fixed
statistics ``data.mean`` / ``data.std`` (a stream cannot measure its training split). Evaluation
resizes the shorter side to ``data.eval_resize`` and takes the centre ``data.image_size`` crop, on
the host; its batches are padded and masked exactly like the in-memory ones (``batching.eval_indices``).

grain, array_record and TFDS are imported inside the functions only (the ``ekd_jax[stream]`` extra).
"""

from __future__ import annotations

import functools
import glob
import io
import math
import os
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from ekd_jax.data import batching, subsets
from ekd_jax.data import tfds as tfds_lib

SPLIT = "{split}"
TRAIN_SPLIT = "train"
TEST_SPLITS = ("test", "validation")  # the first with files is the held-out split
IMAGE_KEY, LABEL_KEY = tfds_lib.IMAGE_KEY, tfds_lib.LABEL_KEY
CHANNELS = 3  # the stream yields RGB (grey and CMYK images are converted)
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop: tries before the central-crop fallback
LABEL_CHUNK = 1024  # records per element of the label pass


# --------------------------------------------------------------------------- files


def _fail(key: str, value: Any, what: str) -> None:
    raise ValueError(f"data.{key}={value!r} is not valid: {what}; fix --config.data.{key}")


def arrayrecord_splits(pattern: str) -> tuple[list[str], list[str]]:
    """The sorted train and test files of an ``arrayrecord:`` pattern; a ValueError naming what is missing.
    (The spec asks first, so that a pattern matching nothing is refused before anything is made.)"""
    where = f"arrayrecord:{pattern}"
    if SPLIT not in pattern:
        _fail("source", where, f"the file pattern needs {SPLIT} where the split name goes, e.g. "
              "arrayrecord:/data/mine/{split}-*.array_record")

    def files(split: str) -> list[str]:
        return sorted(glob.glob(os.path.expanduser(pattern.replace(SPLIT, split))))

    train = files(TRAIN_SPLIT)
    if not train:
        _fail("source", where, f"no files match {pattern.replace(SPLIT, TRAIN_SPLIT)!r} (relative paths start at "
              f"{os.getcwd()})")
    for split in TEST_SPLITS:
        test = files(split)
        if test:
            return train, test
    _fail("source", where, "no held-out files match " + " or ".join(repr(pattern.replace(SPLIT, s)) for s in TEST_SPLITS))
    raise AssertionError  # unreachable: _fail raises


# --------------------------------------------------------------------------- record format


@functools.lru_cache(maxsize=1)
def _example_proto():
    from tensorflow_datasets.proto import tf_example_pb2  # lazy: TFDS's copy of tf.train.Example, no TensorFlow

    return tf_example_pb2


def encode_example(image: bytes, label: int) -> bytes:
    """One record: a serialized ``tf.train.Example`` with ``image`` (encoded bytes) and ``label`` (int64)."""
    example = _example_proto().Example()
    example.features.feature[IMAGE_KEY].bytes_list.value.append(bytes(image))
    example.features.feature[LABEL_KEY].int64_list.value.append(int(label))
    return example.SerializeToString()


def parse_example(record: bytes) -> tuple[bytes, int]:
    """(encoded image, label) of one record; a ValueError that names the expected format otherwise."""
    fmt = (f"a serialized tf.train.Example with one bytes feature {IMAGE_KEY!r} (an encoded image) and one "
           f"int64 feature {LABEL_KEY!r}")
    try:
        features = _example_proto().Example.FromString(record).features.feature
    except Exception as e:  # noqa: BLE001  (protobuf's DecodeError; protobuf is only TFDS's dependency)
        raise ValueError(f"a record is not {fmt} ({type(e).__name__}: {e})") from e
    image = features[IMAGE_KEY].bytes_list.value if IMAGE_KEY in features else ()
    label = features[LABEL_KEY].int64_list.value if LABEL_KEY in features else ()
    if len(image) != 1 or len(label) != 1:
        raise ValueError(f"a record is not {fmt}: it has features {sorted(features)}")
    return image[0], int(label[0])


def encode_image(image: np.ndarray, image_format: str = "PNG") -> bytes:
    """uint8 HWC (or HW) pixels -> encoded bytes (Pillow's ``image_format``: PNG, JPEG, ...)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3)):
        raise ValueError(f"images must be uint8 HW, HW1 or HW3 arrays, got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image).save(buf, format=image_format)
    return buf.getvalue()


def write_arrayrecord(path: str | os.PathLike, images: Sequence[Any], labels: Sequence[int],
                      image_format: str = "PNG") -> None:
    """Writes one ArrayRecord file of the stream's records: each image either encoded bytes (kept as
    they are) or uint8 pixels (encoded as ``image_format``), with its label."""
    from array_record.python import array_record_module  # lazy: ekd_jax[stream]

    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    # group_size:1 (what TFDS writes): every record is its own chunk, the fastest random access.
    writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1")
    try:
        for image, label in zip(images, labels):
            encoded = image if isinstance(image, bytes) else encode_image(image, image_format)
            writer.write(encode_example(encoded, int(label)))
    finally:
        writer.close()


def decode_image(encoded: bytes) -> np.ndarray:
    """Encoded bytes -> uint8 RGB (H, W, 3)."""
    with Image.open(io.BytesIO(encoded)) as img:
        return np.asarray(img.convert("RGB"))


# --------------------------------------------------------------------------- host transforms


def example_rng(seed: int, step: int, position: int) -> np.random.Generator:
    """The crop randomness of the example at ``position`` of global ``step``'s batch."""
    return np.random.default_rng([int(seed), int(step), int(position)])


def crop_box(height: int, width: int, rng: np.random.Generator, scale: Sequence[float],
             ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random-resized crop, as torchvision's ``RandomResizedCrop.get_params``:
    an area fraction uniform in ``scale`` and a log-uniform aspect ratio in ``ratio``, up to 10 tries,
    then the largest central crop of an aspect ratio within ``ratio``."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(CROP_ATTEMPTS):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator, scale: Sequence[float],
                        ratio: Sequence[float]) -> np.ndarray:
    """A random crop (:func:`crop_box`) of uint8 RGB ``image``, resized to size x size (bilinear,
    antialiased when shrinking: Pillow's filter, as torchvision's PIL path)."""
    top, left, h, w = crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
    out = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    return np.asarray(out)


def resize_centre_crop(image: np.ndarray, resize: int, size: int) -> np.ndarray:
    """Evaluation's view: the shorter side resized to ``resize`` (bilinear), then the centre size x size,
    as torchvision's ``Resize(resize)`` + ``CenterCrop(size)``."""
    h, w = image.shape[:2]
    nh, nw = (resize, int(resize * w / h)) if h <= w else (int(resize * h / w), resize)
    pil = Image.fromarray(image)
    if (nh, nw) != (h, w):
        pil = pil.resize((nw, nh), Image.Resampling.BILINEAR)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return np.asarray(pil)[top : top + size, left : left + size]


# --------------------------------------------------------------------------- grain transforms
# Plain picklable callables (grain's MapDataset.map takes any callable): grain sends them to its
# worker processes, which import this module.


def _read(source, key: int, where: str) -> tuple[np.ndarray, int]:
    record = source[int(key)]
    try:
        encoded, label = parse_example(record)
        return decode_image(encoded), label
    except (ValueError, OSError) as e:  # Pillow raises OSError/UnidentifiedImageError on bad bytes
        raise ValueError(f"{where}: record {int(key)}: {e}") from e


class TrainBatch:
    """Global step -> this process's rows of its training batch: uint8 (rows, S, S, 3) random-resized
    crops and int32 labels. A function of (seed, step) and the rows only."""

    def __init__(self, source, where: str, subset: np.ndarray | None, train_size: int, batch_size: int,
                 seed: int, rows: np.ndarray, size: int, scale: Sequence[float], ratio: Sequence[float]):
        self.source, self.where, self.subset = source, where, subset
        self.train_size, self.batch_size, self.seed = train_size, batch_size, seed
        self.rows, self.size, self.scale, self.ratio = np.asarray(rows), size, tuple(scale), tuple(ratio)

    def keys(self, step: int) -> np.ndarray:
        """The record indices this process reads at ``step`` (rows of the (seed, step) batch)."""
        idx = batching.process_batch_indices(self.train_size, self.batch_size, self.seed, step, self.rows)
        return idx if self.subset is None else self.subset[idx]

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        keys = self.keys(step)
        images = np.empty((len(keys), self.size, self.size, CHANNELS), np.uint8)
        labels = np.empty(len(keys), np.int32)
        for i, (key, position) in enumerate(zip(keys, self.rows)):
            image, labels[i] = _read(self.source, key, self.where)
            images[i] = random_resized_crop(image, self.size, example_rng(self.seed, step, position), self.scale, self.ratio)
        return images, labels


class EvalBatch:
    """Batch number b -> this process's ``rows`` of the b-th evaluation batch, ``(x, y, mask)``, padded
    with zeros (mask 0) past the end of the split, exactly as in memory (``batching.eval_indices``)."""

    def __init__(self, source, where: str, n: int, batch_size: int, rows: np.ndarray | None, resize: int,
                 size: int):
        self.source, self.where, self.n, self.batch_size = source, where, n, batch_size
        self.rows, self.resize, self.size = rows, resize, size

    def __call__(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx, real = batching.eval_indices(self.n, self.batch_size, b, self.rows)
        images = np.zeros((len(idx), self.size, self.size, CHANNELS), np.uint8)
        labels = np.zeros(len(idx), np.int32)
        for i in np.flatnonzero(real):
            image, labels[i] = _read(self.source, idx[i], self.where)
            images[i] = resize_centre_crop(image, self.resize, self.size)
        return images, labels, real.astype(np.float32)


class LabelChunk:
    """Chunk number c -> the labels of records [c * LABEL_CHUNK, (c + 1) * LABEL_CHUNK) (images not decoded)."""

    def __init__(self, source, where: str):
        self.source, self.where = source, where

    def __call__(self, c: int) -> np.ndarray:
        keys = range(c * LABEL_CHUNK, min(len(self.source), (c + 1) * LABEL_CHUNK))
        out = np.empty(len(keys), np.int64)
        for i, key in enumerate(keys):
            try:
                out[i] = parse_example(self.source[key])[1]
            except ValueError as e:
                raise ValueError(f"{self.where}: record {key}: {e}") from e
        return out


def _pipeline(items: range, fn, workers: int):
    """An iterator over ``fn(i) for i in items``, in order: a grain MapDataset mapped in ``workers``
    processes (each prefetching one element ahead; at most one per element after the first), or in
    this process when ``workers`` is 0. The caller closes it (grain's worker processes stop then)."""
    import grain  # lazy: ekd_jax[stream]

    ds = grain.MapDataset.range(items.start, items.stop).map(fn)
    workers = min(workers, len(items) - 1)  # starting a process for a single element only delays it
    if workers <= 0:
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
    from absl import flags

    # grain 0.2.18 reads an absl flag when it starts workers, which fails before the flags are parsed
    # (a notebook, a test: google/grain#1355, fixed after 0.2.18); the command lines parse them anyway.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    return iter(ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=1)))


def read_labels(source, where: str, workers: int = 0) -> np.ndarray:
    """Every record's label (one pass over the records; images are not decoded)."""
    it = _pipeline(range(-(-len(source) // LABEL_CHUNK)), LabelChunk(source, where), workers)
    try:
        chunks = [np.array(c) for c in it]
    finally:
        it.close()
    return np.concatenate(chunks) if chunks else np.zeros(0, np.int64)


# --------------------------------------------------------------------------- the stream


class Stream:
    """What :func:`ekd_jax.data.load` returns for a streamed source: the facts of an in-memory
    :class:`ekd_jax.data.memory.Dataset` the loop reads (sizes, classes, shape, statistics) and the same
    batches (:meth:`train_batch`, :meth:`eval_batches`), read from files instead of arrays.

    ``train_source`` / ``test_source`` are random-access sequences of records (``len``, ``[i]``).
    Training batches come from one grain iterator per epoch, opened at the step asked for and
    prefetching the steps after it; a step asked out of order (a resume) opens a new one there.
    """

    def __init__(self, d: Any, train_source, test_source, num_classes: int, class_names: tuple[str, ...] | None,
                 subset: np.ndarray | None = None):
        self.source = d.source
        self.train_source, self.test_source = train_source, test_source
        self.num_classes, self.class_names = int(num_classes), class_names
        self.subset = subset  # record indices of a few-sample subset (sorted), or None = every record
        self.mean, self.std = tuple(float(m) for m in d.mean), tuple(float(s) for s in d.std)
        self.size, self.workers = int(d.image_size), int(d.workers)
        self.scale, self.ratio = tuple(d.crop_scale), tuple(d.crop_ratio)
        self.eval_resize = self.size if d.eval_resize is None else int(d.eval_resize)
        self._open: dict | None = None  # the current epoch's training iterator and where it stands

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, CHANNELS)

    @property
    def train_size(self) -> int:
        return len(self.train_source) if self.subset is None else len(self.subset)

    @property
    def test_size(self) -> int:
        return len(self.test_source)

    def train_transform(self, batch_size: int, seed: int, rows: np.ndarray | None = None) -> TrainBatch:
        """The map from a global step to this process's rows of its batch (what the workers run)."""
        rows = np.arange(batch_size) if rows is None else np.asarray(rows)
        return TrainBatch(self.train_source, f"{self.source} (train split)", self.subset, self.train_size, batch_size,
                          seed, rows, self.size, self.scale, self.ratio)

    def train_batch(self, batch_size: int, seed: int, step: int,
                    rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images and int32 labels of global ``step`` (this process's ``rows`` of it), a function
        of (seed, step) only, as in memory."""
        key = (batch_size, seed, None if rows is None else tuple(np.asarray(rows).tolist()))
        o = self._open
        if o is None or o["key"] != key or o["next"] != step:
            self.close()
            spe = batching.steps_per_epoch(self.train_size, batch_size)
            end = (step // spe + 1) * spe  # to the end of this epoch, where evaluation comes
            it = _pipeline(range(step, end), self.train_transform(batch_size, seed, rows), self.workers)
            o = self._open = {"key": key, "next": step, "end": end, "it": it}
        x, y = next(o["it"])
        # Plain arrays: from worker processes these are views of shared memory, freed once dropped.
        x, y = np.array(x), np.array(y)
        o["next"] += 1
        if o["next"] == o["end"]:
            self.close()
        return x, y

    def eval_batches(self, batch_size: int, rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, ...]]:
        """``(x, y, mask)`` batches covering every held-out example once, padded and masked as in memory
        (this process's ``rows`` of each): centre crops of the images, read and resized on the host."""
        n = self.test_size
        count = batching.eval_batch_count(n, batch_size)
        fn = EvalBatch(self.test_source, f"{self.source} (held-out split)", n, batch_size, rows, self.eval_resize,
                       self.size)
        it = _pipeline(range(count), fn, self.workers)
        try:
            for x, y, mask in it:
                yield np.array(x), np.array(y), np.array(mask)  # plain arrays (see train_batch)
        finally:
            it.close()

    def close(self) -> None:
        """Stops the open training iterator (and its worker processes), if any."""
        if self._open is not None:
            it, self._open = self._open["it"], None
            it.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown: nothing left to stop)
            pass


# --------------------------------------------------------------------------- loading


def load(d: Any) -> Stream:
    """Opens the streamed source of ``d`` (a validated :class:`ekd_jax.spec.DataSpec`): the random-access
    sources, the class count, and the few-sample subset; reads no image."""
    few = d.samples_per_class or d.train_fraction != 1.0
    where = d.source
    if d.kind == "tfds":
        train_source, test_source, num_classes, names = _open_tfds(d.location, d.tfds_data_dir)
    else:
        train_source, test_source = _open_arrayrecord(d.location)
    if len(train_source) == 0 or len(test_source) == 0:
        raise ValueError(f"data.source={where!r}: a split has no records "
                         f"({len(train_source)} training, {len(test_source)} held-out)")
    train_labels = read_labels(train_source, where, d.workers) if few or d.kind == "arrayrecord" else None
    if d.kind == "arrayrecord":  # no metadata: the class count is the largest label + 1
        test_labels = read_labels(test_source, where, d.workers)
        for split, labels in (("training", train_labels), ("held-out", test_labels)):
            if labels.min() < 0:
                raise ValueError(f"data.source={where!r}: {split} records have negative labels (min {labels.min()}); "
                                 "labels must be 0..num_classes-1")
        num_classes, names = int(max(train_labels.max(), test_labels.max())) + 1, None
    subset = subsets.few_sample_subset(d, train_labels, names) if few else None
    return Stream(d, train_source, test_source, num_classes, names, subset)


def _open_arrayrecord(pattern: str):
    import grain  # lazy: ekd_jax[stream]

    train, test = arrayrecord_splits(pattern)
    return grain.sources.ArrayRecordDataSource(train), grain.sources.ArrayRecordDataSource(test)


def _open_tfds(name: str, data_dir: str | None):
    """(train source, held-out source, num_classes, class names) of a TFDS dataset in ArrayRecord
    format, prepared first if needed; records come as raw bytes (decoded by this module)."""
    import tensorflow_datasets as tfds  # lazy: ekd_jax[stream] / [tfds]

    where = f"data.source='tfds:{name}'"
    builder, held_out = tfds_lib.prepared_builder(name, data_dir, file_format="array_record")
    raw = tfds.decode.DeserializeMethod.RAW_BYTES
    try:
        train, test = (builder.as_data_source(split=s, deserialize_method=raw) for s in (TRAIN_SPLIT, held_out))
    except NotImplementedError as e:  # prepared earlier in a format without random access (tfrecord)
        raise ValueError(
            f"{where}: the copy in {builder.data_dir} cannot be read by index ({e}); prepare it as ArrayRecord "
            f"(`tfds build {name} --file_format=array_record`) or choose another data.tfds_data_dir"
        ) from e
    label = builder.info.features[LABEL_KEY]
    return train, test, int(label.num_classes), tuple(label.names)
