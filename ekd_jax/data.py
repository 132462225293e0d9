"""Datasets for ekd_jax: sources, few-sample subsets, low-resolution views, on-device augmentation.

One config string, ``data.source``, picks where the images come from:

* ``tfds:<name>``  any TFDS image-classification dataset with ``image`` and ``label``
  features (``tfds:cifar100``, ``tfds:imagenet_resized/32x32``, ...). Prepared through
  TFDS on first use (needs the internet and TensorFlow once), optionally under
  ``data.tfds_data_dir``.
* ``npz:<path>``   a NumPy archive with ``x_train, y_train, x_test, y_test`` (uint8 NHWC,
  or NHW for grayscale; integer labels) and optional ``class_names``: bring your own data.
* ``digits``       scikit-learn's bundled 8x8 handwritten digits: the offline default.
* ``arrayrecord:<pattern>`` (and ``tfds:<name>`` with ``data.streaming=True``): datasets larger
  than memory, read by index through a grain stream (:mod:`ekd_jax.streaming`), never loaded.

Every other source becomes the same in-memory :class:`Dataset` of uint8 arrays. The host only
slices uint8 batches (:func:`train_batch`, :func:`eval_batches`; in a multi-process run only
this process's rows of each, :func:`process_batch_indices`); augmentation,
normalisation and the student's low-resolution view are pure ``jnp`` functions
(:func:`make_views`) meant to run on the device inside the jitted step. Every training
batch and its augmentation follow from ``(seed, step)`` alone, which makes resuming exact.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import errno
import functools
import math
import os
import pickle
import re
import socket
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_dict
from PIL import Image

SOURCE_FORMS = ("digits", "tfds:<name>", "npz:<path>", "arrayrecord:<pattern>")
LOWRES_MODES = ("upsample", "native")
DOWNSAMPLE_FACTORS = (1, 2, 4, 8)
NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def default_config() -> ml_collections.ConfigDict:
    """The ``data`` block of a training config, with the offline defaults."""
    return ml_collections.ConfigDict(
        dict(
            source="digits",
            # Placeholders keep the type, so `--config.data.image_size=32` works from the
            # command line although the default is None (= the source's native size).
            image_size=config_dict.placeholder(int),
            samples_per_class=0,  # few-sample: n training images per class (0 = off)
            train_fraction=1.0,  # few-sample: this fraction of each class (1.0 = off)
            subset_seed=0,
            student_downsample=1,  # low resolution: the student sees images / this factor
            lowres_mode="upsample",  # 'upsample' back to full size, or keep 'native' small size
            crop_padding=4,  # random crop with this zero padding (0 = no crop)
            flip=True,
            tfds_data_dir=config_dict.placeholder(str),
            # Fixed per-channel normalisation statistics in [0, 1] units (e.g. ImageNet's); empty =
            # measured on the training split (in memory; the stream needs fixed ones).
            mean=(),
            std=(),
            # Datasets larger than memory (ekd_jax/streaming.py): read tfds:<name> by index with grain
            # (arrayrecord:<pattern> sources always are); decode and random-resized crop on the host.
            streaming=False,
            crop_scale=(0.08, 1.0),  # stream: random-resized crop's area fraction (min, max)
            crop_ratio=(3 / 4, 4 / 3),  # stream: its aspect ratio (min, max)
            eval_resize=config_dict.placeholder(int),  # stream: shorter side before the centre crop (None = image_size)
            workers=0,  # stream: grain worker processes (0 = in the training process)
        )
    )


_DEFAULTS = default_config().to_dict()


def _get(cfg: Any, name: str) -> Any:
    """A config field from a ConfigDict, dataclass, namespace or mapping; default if absent."""
    if isinstance(cfg, collections.abc.Mapping):
        return cfg.get(name, _DEFAULTS[name])
    return getattr(cfg, name, _DEFAULTS[name])


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


# --------------------------------------------------------------------------- loading


def load_dataset(cfg: Any) -> Dataset:
    """Loads ``cfg.source`` into memory, resized, validated and optionally subset (a streamed source,
    ``arrayrecord:`` or ``data.streaming``, is opened instead: an ``ekd_jax.streaming.StreamDataset``)."""
    kind, arg = _parse_source(_get(cfg, "source"))
    check_config(cfg)
    image_size = _get(cfg, "image_size")
    if kind == "arrayrecord" or _get(cfg, "streaming"):  # larger than memory: read by index, never loaded
        from ekd_jax import streaming

        return streaming.load(cfg)

    if kind == "digits":
        x_train, y_train, x_test, y_test, names = _load_digits()
    elif kind == "npz":
        x_train, y_train, x_test, y_test, names = _load_npz(arg)
    else:
        x_train, y_train, x_test, y_test, names = _load_tfds(
            arg, _get(cfg, "tfds_data_dir"), image_size
        )
    x_train, y_train, x_test, y_test = _validate_arrays(x_train, y_train, x_test, y_test)
    num_classes = _num_classes(y_train, y_test, names)

    if image_size is not None:
        x_train = _resize_images(x_train, image_size)
        x_test = _resize_images(x_test, image_size)
    _check_downsample(cfg, x_train.shape[1:3])
    mean, std = channel_stats(x_train)
    if _get(cfg, "mean"):  # fixed statistics (config.validate has checked them), e.g. ImageNet's
        mean, std = tuple(map(float, _get(cfg, "mean"))), tuple(map(float, _get(cfg, "std")))
        if len(mean) != x_train.shape[-1]:
            raise ValueError(
                f"data.mean={mean!r} is not valid: one value per channel of the images, which have "
                f"{x_train.shape[-1]}; fix --config.data.mean"
            )

    keep = class_balanced_subset(
        y_train,
        samples_per_class=_get(cfg, "samples_per_class"),
        train_fraction=_get(cfg, "train_fraction"),
        seed=_get(cfg, "subset_seed"),
        class_names=names,
    )
    if keep is not None:
        x_train, y_train = x_train[keep], y_train[keep]

    return Dataset(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=num_classes,
        class_names=names,
        source=_get(cfg, "source"),
        mean=mean,
        std=std,
    )


def _parse_source(source: Any) -> tuple[str, str]:
    if isinstance(source, str):
        if source == "digits":
            return "digits", ""
        kind, sep, arg = source.partition(":")
        if sep and kind in ("tfds", "npz", "arrayrecord") and arg.strip():
            return kind, arg.strip()
    raise ValueError(
        f"Unknown data.source {source!r}. Valid forms: {', '.join(SOURCE_FORMS)} "
        "(e.g. 'tfds:cifar100', 'npz:/data/mine.npz', 'digits')."
    )


def check_config(cfg: Any) -> None:
    """Checks the fields that do not need the data, before any (slow) loading."""
    kind, arg = _parse_source(_get(cfg, "source"))
    if kind == "npz":
        _npz_file(arg)  # a missing file is refused before the workdir is even made
    image_size = _get(cfg, "image_size")
    if image_size is not None and (not _is_int(image_size) or image_size < 1):
        raise ValueError(
            f"data.image_size must be a positive int or None (native size), got {image_size!r}."
        )
    n = _get(cfg, "samples_per_class")
    frac = _get(cfg, "train_fraction")
    if not _is_int(n) or n < 0:
        raise ValueError(f"data.samples_per_class must be an int >= 0 (0 = off), got {n!r}.")
    if not 0.0 < frac <= 1.0:
        raise ValueError(
            f"data.train_fraction must be in (0, 1] (1.0 = the whole training split), got {frac!r}."
        )
    if n > 0 and frac != 1.0:
        raise ValueError(
            f"data.samples_per_class={n} and data.train_fraction={frac} are both set; "
            "choose one few-sample mode and leave the other off (0 / 1.0)."
        )
    subset_seed = _get(cfg, "subset_seed")
    if not _is_int(subset_seed) or subset_seed < 0:
        raise ValueError(
            f"data.subset_seed={subset_seed!r} is not valid: an integer >= 0 (it seeds "
            "np.random.default_rng); fix --config.data.subset_seed"
        )
    padding = _get(cfg, "crop_padding")
    if not _is_int(padding) or padding < 0:
        raise ValueError(f"data.crop_padding must be an int >= 0 (0 = no crop), got {padding!r}.")
    _check_downsample(cfg, None if image_size is None else (image_size, image_size))
    from ekd_jax import streaming  # the stream's fields and the fixed statistics

    streaming.check_config(cfg)


def _check_downsample(cfg: Any, hw: Sequence[int] | None) -> None:
    factor, mode = _get(cfg, "student_downsample"), _get(cfg, "lowres_mode")
    if mode not in LOWRES_MODES:
        raise ValueError(f"Unknown data.lowres_mode {mode!r}; use one of {LOWRES_MODES}.")
    if not _is_int(factor) or factor not in DOWNSAMPLE_FACTORS:
        raise ValueError(
            f"data.student_downsample must be one of {DOWNSAMPLE_FACTORS}, got {factor!r}."
        )
    if hw is not None and any(s % factor for s in hw):
        raise ValueError(
            f"data.student_downsample={factor} does not divide the image size "
            f"{tuple(hw)}; pick a factor that divides it or set data.image_size to a "
            f"multiple of {factor}."
        )


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


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


def _npz_file(path: str) -> str:
    """The absolute path of an ``npz:<path>`` source; a ValueError naming it when it is no file."""
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
    full = _npz_file(path)
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
    """The train and test splits of a TFDS dataset, whole, as uint8 numpy."""
    import tensorflow_datasets as tfds  # lazy: importing TensorFlow takes seconds

    where = f"data.source='tfds:{name}'"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        # TFDS's own message lists every dataset it knows; a pointer to the catalog reads better.
        raise ValueError(
            f"{where}: TFDS has no dataset {name!r}; see "
            "https://www.tensorflow.org/datasets/catalog (e.g. 'cifar100', "
            "'imagenet_resized/32x32', with an optional ':<version>')."
        ) from e
    _prepare_tfds(builder, name, where)

    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise ValueError(
            f"{where}: needs 'image' and 'label' features, the dataset has {sorted(features)}."
        )
    label = features["label"]
    if not isinstance(label, tfds.features.ClassLabel):
        raise ValueError(f"{where}: 'label' is a {type(label).__name__}, not a ClassLabel.")
    variable = None in features["image"].shape[:2]
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
    x_test, y_test = read(_test_split(builder.info.splits, where))
    return x_train, y_train, x_test, y_test, tuple(label.names)


def _prepare_tfds(builder, name: str, where: str, file_format: str | None = None) -> None:
    """``builder.download_and_prepare()`` (nothing to do once prepared); any failure becomes a ValueError of
    one line, ``<where>: <cause>; <fix>``, which the command lines print as ``error: ...``. ``file_format``
    is the format the caller reads (the stream's 'array_record'), for the fix's `tfds build` command."""
    import tensorflow_datasets as tfds

    # TFDS draws its download and extraction bars on stderr. Like the training bar (train.py), only on a
    # terminal: in a log or a pipe they are lines of noise, around the one error line of a failed first use.
    if not sys.stderr.isatty():
        tfds.disable_progress_bar()
    try:
        # (Not builder.is_prepared(): it logs a warning for the folder a failed first use leaves behind.)
        # A dataset TFDS cannot download itself (imagenet2012) is left to TFDS, which names the files it needs.
        if not (os.path.exists(os.path.join(builder.data_dir, "dataset_info.json"))
                or getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)):
            _check_hosts_reachable(builder)
        builder.download_and_prepare()
    except Exception as e:  # noqa: BLE001  (TFDS raises whatever its download, extraction or writing hit)
        raise ValueError(f"{where}: {_tfds_failure(e, builder, name, file_format)}") from e


DOWNLOAD_PROBE_TIMEOUT_S = 15


def _check_hosts_reachable(builder) -> None:
    """Opens one connection to each host (or its proxy) that a download still missing from TFDS's download
    folder needs, and lets a failure through, to be named like the downloader's own. TFDS's downloader
    retries a refused or unresolvable connection ten times with a doubling pause (3.5 minutes in all,
    logging each retry); an offline first use should say so at once."""
    from tensorflow_datasets.core.download import resource

    downloads = os.path.join(builder.data_dir_root, "downloads")
    # A finished download, or the file put in TFDS's manual folder (which TFDS takes instead of downloading).
    missing = [url for url, info in (builder.url_infos or {}).items()
               if not os.path.exists(os.path.join(downloads, builder.name, resource.get_dl_fname(url, info.checksum)))
               and not os.path.exists(os.path.join(downloads, "manual", info.filename or os.path.basename(url)))]
    proxies = urllib.request.getproxies()
    for url in missing:
        target = urllib.parse.urlparse(url)
        proxy = proxies.get(target.scheme)
        via = urllib.parse.urlparse(proxy if "://" in str(proxy) else f"http://{proxy}") if proxy else None
        if via is not None and not urllib.request.proxy_bypass(target.hostname):
            host, port = via.hostname, via.port or 80
        else:
            via, host, port = None, target.hostname, target.port or (443 if target.scheme == "https" else 80)
        try:
            socket.create_connection((host, port), timeout=DOWNLOAD_PROBE_TIMEOUT_S).close()
        except OSError as e:
            raise _Unreachable(target.hostname, via is not None) from e


class _Unreachable(ConnectionError):
    """A download host (or the proxy to it) that :func:`_check_hosts_reachable` could not connect to."""

    def __init__(self, host: str, proxy: bool):
        super().__init__(f"{host} cannot be reached" + (" through the proxy of HTTPS_PROXY / HTTP_PROXY" if proxy else ""))
        self.host, self.proxy = host, proxy


def _tfds_failure(e: BaseException, builder, name: str, file_format: str | None = None) -> str:
    """``<cause>; <fix>`` of a failed preparation of TFDS dataset ``name``, on one line.

    The cause is looked for along the whole exception chain: TFDS lets the downloader's exception through
    (requests wrapping urllib3 wrapping the socket's), so the outermost one rarely names the cause.
    """
    chain = _exception_chain(e)
    build = f"`tfds build {name}" + (f" --file_format={file_format}`" if file_format else "`")
    elsewhere = (f"prepare it on a machine with internet ({build}, or this same run) and copy that TFDS folder "
                 "(~/tensorflow_datasets unless a data_dir was given) here as --config.data.tfds_data_dir")
    # NonMatchingChecksumError is not exported by TFDS (it lives in core.download.download_manager).
    checksum = next((x for x in chain if type(x).__name__ == "NonMatchingChecksumError"), None)
    if checksum is not None:
        found = re.search(r"Artifact (\S+), downloaded to (\S+), has wrong checksum", str(checksum))
        url, path = found.groups() if found else ("its download", "the downloaded file")
        return (f"{path} is not the file TFDS expects for {url} (checksum mismatch: an interrupted or altered "
                f"download, or a host that changed the file); delete it and run again to download it afresh, "
                f"or {elsewhere}")
    full = next((x for x in chain if _disk_full(x)), None)
    if full is not None:
        return (f"not enough free disk space in {builder.data_dir_root} ({_one_line(full)}); free some space "
                "there or give a folder on a disk with room as --config.data.tfds_data_dir")
    unreachable = _unreachable(chain)
    if unreachable is not None:
        return (f"{unreachable}; the first use of a TFDS dataset downloads it once, which needs the internet: "
                f"connect this machine once and run again, or {elsewhere}, or train on "
                "data.source='npz:<path>' or 'digits'")
    manual = next((x for x in chain if isinstance(x, AssertionError) and "Manual directory" in str(x)), None)
    if manual is not None:  # imagenet2012 and the other datasets TFDS may not download itself
        return (f"TFDS cannot download this dataset itself ({_one_line(manual, limit=600)}); "
                "put the files there and run again")
    # Last: a module missing deep in the chain of another failure is not its cause.
    missing = next((x for x in chain if isinstance(x, ModuleNotFoundError)), None)
    if missing is not None:
        return (f"TFDS needs the Python module {missing.name!r} to prepare a dataset, and it is not installed; "
                "pip install 'ekd_jax[tfds]' (TFDS, TensorFlow and the modules they need to prepare one)")
    return (f"TFDS could not prepare it in {builder.data_dir} ({_one_line(e, limit=500)}); fix that and run again (a "
            "prepared dataset is reused), or train on data.source='npz:<path>' or 'digits'")


def _exception_chain(e: BaseException) -> list[BaseException]:
    """``e`` and every exception behind it: causes, contexts, and those that requests and urllib3
    keep in ``args`` or ``reason`` instead of chaining them."""
    out, todo, seen = [], [e], set()
    while todo:
        x = todo.pop(0)
        if not isinstance(x, BaseException) or id(x) in seen:
            continue
        seen.add(id(x))
        out.append(x)
        todo += [x.__cause__, x.__context__, getattr(x, "reason", None), *x.args]
    return out


def _disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # TFDS checks the space it needs before it starts (a bare IOError); TensorFlow's file layer keeps
    # only the operating system's text.
    return str(e).startswith("Not enough disk space") or "No space left on device" in str(e)


def _unreachable(chain: list[BaseException]) -> str | None:
    """'<host> cannot be reached ...' when the chain holds a failure to connect, else None."""
    kinds = [socket.gaierror, ConnectionError, TimeoutError, urllib.error.URLError]
    # TFDS downloads with requests over urllib3: its dependencies, not ours, so they are not imported
    # here, only looked up (a module that raised is imported).
    if (requests := sys.modules.get("requests")) is not None:
        kinds += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    urllib3 = sys.modules.get("urllib3")
    if urllib3 is not None:
        kinds += [urllib3.exceptions.NewConnectionError, urllib3.exceptions.ProxyError]
    # A certificate problem is a requests ConnectionError too, but the host was reached.
    failed = [x for x in chain if isinstance(x, tuple(kinds))]
    if not failed or any(isinstance(x, ssl.SSLError) for x in chain):
        return None
    probe = next((x for x in chain if isinstance(x, _Unreachable)), None)
    url = next((x.request.url for x in chain if getattr(getattr(x, "request", None), "url", None)), "")
    host = probe.host if probe else urllib.parse.urlparse(url).hostname or "the download host"
    proxy = probe.proxy if probe else urllib3 is not None and any(isinstance(x, urllib3.exceptions.ProxyError) for x in chain)
    via = " through the proxy of HTTPS_PROXY / HTTP_PROXY" if proxy else ""
    return f"{host} cannot be reached{via} to download it (no internet? {_one_line(failed[-1])})"


def _one_line(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line (whitespace collapsed), cut at ``limit`` characters."""
    text = " ".join(str(e).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _test_split(splits, where: str) -> str:
    # Some datasets (imagenet_resized) publish their held-out labels as 'validation' only.
    # An empty split dict (metadata not written yet, or mocked) means: trust 'test'.
    if not splits or "test" in splits:
        return "test"
    if "validation" in splits:
        return "validation"
    raise ValueError(f"{where}: has no 'test' or 'validation' split, only {sorted(splits)}.")


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


# --------------------------------------------------------------------------- few-sample


def class_balanced_subset(
    labels: np.ndarray,
    *,
    samples_per_class: int = 0,
    train_fraction: float = 1.0,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> np.ndarray | None:
    """Sorted indices of a class-balanced subset, or None when both modes are off.

    ``samples_per_class=n`` keeps n images of every class present; ``train_fraction=f``
    keeps round-half-up(f * count), at least 1, of each class. The choice depends only on
    the labels and ``seed`` (``np.random.default_rng(seed)``), so every method trained with
    the same seed sees the same images.
    """
    if samples_per_class and train_fraction != 1.0:
        raise ValueError("Set samples_per_class or train_fraction, not both.")
    if not samples_per_class and train_fraction == 1.0:
        return None
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction!r}.")
    classes, counts = np.unique(labels, return_counts=True)
    if samples_per_class:
        smallest = int(np.argmin(counts))
        if samples_per_class > counts[smallest]:
            c = int(classes[smallest])
            label = f"{c} ({class_names[c]!r})" if class_names else str(c)
            raise ValueError(
                f"samples_per_class={samples_per_class} is larger than class {label}, which "
                f"has only {counts[smallest]} training images; use at most {counts[smallest]}."
            )
    rng = np.random.default_rng(seed)
    keep = []
    for c, count in zip(classes, counts):
        k = samples_per_class or max(1, math.floor(train_fraction * count + 0.5))
        keep.append(rng.choice(np.flatnonzero(labels == c), size=k, replace=False))
    return np.sort(np.concatenate(keep))


# --------------------------------------------------------------------------- host batching


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
    can read examples by index (this in-memory one, a random-access file) reuses it.
    """
    idx = batch_indices(train_size, batch_size, seed, step)
    return idx if rows is None else idx[rows]


def train_batch(
    ds: Dataset, batch_size: int, seed: int, step: int, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 images and int32 labels of global ``step`` (only the batch positions ``rows``,
    this process's, when given); depends only on (seed, step)."""
    if not isinstance(ds, Dataset):  # a stream (ekd_jax.streaming) reads and crops the same rows itself
        return ds.train_batch(batch_size, seed, step, rows)
    idx = process_batch_indices(ds.train_size, batch_size, seed, step, rows)
    return ds.x_train[idx], ds.y_train[idx]


def eval_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, rows: np.ndarray | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yields ``(x, y, mask)`` covering every example once, all batches ``batch_size`` long.

    The last batch is zero-padded so the eval step compiles once; ``mask`` (float32, 1 for
    real examples) lets metrics ignore the padding. With ``rows`` (positions in the batch, this
    process's) only those rows of each batch are yielded: every process gets the same number
    of batches, padded the same way, whatever its share of the real examples.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if hasattr(x, "eval_batches"):  # a streamed split (ekd_jax.streaming.TestSplit): same batches, read from files
        yield from x.eval_batches(batch_size, rows)
        return
    positions = np.arange(batch_size) if rows is None else np.asarray(rows)
    for start in range(0, len(x), batch_size):
        idx = start + positions
        real = idx < len(x)
        if real.all():
            yield x[idx], y[idx], np.ones(len(idx), np.float32)
            continue
        xb = np.zeros((len(idx), *x.shape[1:]), x.dtype)
        yb = np.zeros(len(idx), y.dtype)
        xb[real], yb[real] = x[idx[real]], y[idx[real]]
        yield xb, yb, real.astype(np.float32)


# --------------------------------------------------------------------------- device side


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
    result stays in the input's range.
    """
    if mode not in LOWRES_MODES:
        raise ValueError(f"Unknown lowres_mode {mode!r}; use one of {LOWRES_MODES}.")
    if factor == 1:
        return x01
    n, h, w, c = x01.shape
    if h % factor or w % factor:
        raise ValueError(f"Downsample factor {factor} does not divide the image size {(h, w)}.")
    small = jax.image.resize(x01, (n, h // factor, w // factor, c), "linear", antialias=True)
    if mode == "native":
        return small
    return jax.image.resize(small, (n, h, w, c), "linear")


def make_views(
    images: jax.Array,
    key: jax.Array | None,
    cfg: Any,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
) -> tuple[jax.Array, jax.Array]:
    """(teacher_x, student_x), normalised float32 NHWC, from one uint8 batch.

    In training both views come from the SAME random crop/flip; the student's is then
    degraded. In evaluation nothing is random and the student's test images are degraded
    the same way. ``cfg`` (the data config) is read as Python values, i.e. static under jit.
    """
    if train:
        if key is None:
            raise ValueError("make_views(train=True) needs a PRNG key for the augmentation.")
        x01 = augment(images, key, _get(cfg, "crop_padding"), _get(cfg, "flip"))
    else:
        x01 = _to_unit(jnp.asarray(images))
    factor, mode = _get(cfg, "student_downsample"), _get(cfg, "lowres_mode")
    _check_downsample(cfg, x01.shape[1:3])
    teacher = normalize(x01, mean, std)
    if factor == 1:
        return teacher, teacher
    return teacher, normalize(degrade(x01, factor, mode), mean, std)


def teacher_input_shape(cfg: Any, image_shape: Sequence[int]) -> list[int]:
    """[H, W, C] the teacher network is fed (always the full image)."""
    del cfg  # the teacher always sees the images as loaded
    return list(image_shape)


def student_input_shape(cfg: Any, image_shape: Sequence[int]) -> list[int]:
    """[H, W, C] the student network is fed: smaller only in 'native' low-resolution mode."""
    h, w, c = image_shape
    _check_downsample(cfg, (h, w))
    factor = _get(cfg, "student_downsample")
    if _get(cfg, "lowres_mode") == "native":
        return [h // factor, w // factor, c]
    return [h, w, c]


def _to_unit(images: jax.Array) -> jax.Array:
    return images.astype(jnp.float32) / 255.0
