"""TFDS's real cifar10 / cifar100 builders, offline: miniature archives in the official binary layout
stand in for the downloads; TFDS itself extracts them, runs the builders and writes both file formats the
project reads (tfrecord for the in-memory path, ArrayRecord for the stream); the command line prepares
cifar100 and trains on it; a preparation that fails is one ``error:`` line.

The download override is TFDS's own download folder. TFDS keeps a finished download as
``<data_dir>/downloads/<dataset>/<name from the URL and its registered checksum>`` with an ``.INFO`` file
beside it, and takes a file found there as already downloaded (it does not hash it again). The archives
are put there the way TFDS records a download (``resource.write_info_file``), so any process, the command
line's included, prepares from them with no patch; everything after the download is TFDS's own code.

The failures are real ones too: downloads through a proxy on a port nothing listens on (TFDS's downloader,
requests, honours HTTPS_PROXY), the miniature archive in TFDS's manual folder (checked against the real
archive's checksum), a damaged archive, ImageNet's manual download, a module that cannot be imported.
"""

import errno
import io
import json
import os
import pathlib
import socket
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from ekd_jax import data
from ekd_jax.data import tfds as data_tfds
from ekd_jax.spec.validate import validate_data

tfds = pytest.importorskip("tensorflow_datasets")
from tensorflow_datasets.core.download import resource as tfds_resource  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SPLITS = {"cifar10": (40, 20), "cifar100": (48, 24)}  # images written: (train, test)
CLASSES = {"cifar10": 10, "cifar100": 100}
FORMATS = ("tfrecord", "array_record")  # the in-memory path's and the stream's
STREAM = dict(streaming=True, image_size=32, crop_padding=0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
              crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))  # an identity crop: the stream yields the images


# --------------------------------------------------------------------------- the archives


def _written(name: str) -> dict:
    """The images, labels and label names of the miniature ``name``: fixed random pixels, every class of
    cifar10 present; cifar100's coarse label (which the project does not read) is its fine label // 5."""
    rng = np.random.default_rng(CLASSES[name])
    n_train, n_test = SPLITS[name]
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        out[f"x_{split}"] = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        out[f"y_{split}"] = rng.permutation(np.arange(n) % 10) if name == "cifar10" else rng.integers(0, 100, n)
    prefix = "ten" if name == "cifar10" else "fine"
    out["names"] = [f"{prefix}_{i:02d}" for i in range(CLASSES[name])]
    return out


def _records(x: np.ndarray, *labels: np.ndarray) -> bytes:
    """The CIFAR binary format: per image its label byte(s), then 1024 red, 1024 green, 1024 blue bytes."""
    return b"".join(bytes(int(lab[i]) for lab in labels) + img.transpose(2, 0, 1).tobytes() for i, img in enumerate(x))


def _archive(path: pathlib.Path, name: str, w: dict) -> None:
    """``cifar-10-binary.tar.gz`` / ``cifar-100-binary.tar.gz`` as www.cs.toronto.edu serves them."""
    if name == "cifar10":
        folder, n = "cifar-10-batches-bin/", len(w["x_train"]) // 5
        batches = [slice(i * n, (i + 1) * n) for i in range(5)]  # the five training files
        files = {f"data_batch_{i + 1}.bin": _records(w["x_train"][b], w["y_train"][b]) for i, b in enumerate(batches)}
        files["test_batch.bin"] = _records(w["x_test"], w["y_test"])
        files["batches.meta.txt"] = "\n".join(w["names"]) + "\n\n"
    else:
        folder = "cifar-100-binary/"
        files = {f"{s}.bin": _records(w[f"x_{s}"], w[f"y_{s}"] // 5, w[f"y_{s}"]) for s in ("train", "test")}
        files["coarse_label_names.txt"] = "\n".join(f"coarse_{i:02d}" for i in range(20)) + "\n"
        files["fine_label_names.txt"] = "\n".join(w["names"]) + "\n"
    with tarfile.open(path, "w:gz") as tar:
        for member, blob in files.items():
            blob = blob.encode() if isinstance(blob, str) else blob
            info = tarfile.TarInfo(folder + member)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def _as_downloaded(data_dir: pathlib.Path, name: str, archive: pathlib.Path) -> None:
    """Puts ``archive`` in ``data_dir``'s download folder as TFDS's finished download of ``name``'s URL."""
    builder = tfds.builder(name, data_dir=str(data_dir))
    ((url, info),) = builder.url_infos.items()  # the official URL and the checksum TFDS registers for it
    path = data_dir / "downloads" / builder.name / tfds_resource.get_dl_fname(url, info.checksum)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(archive.read_bytes())
    tfds_resource.write_info_file(url=url, path=path, dataset_name=builder.name, original_fname=info.filename,
                                  url_info=info)


@pytest.fixture(scope="module")
def prepared(built_once):
    """``(folder, written)``: the archives in ``folder``, and both datasets prepared by the project's two
    paths from them, TFDS's tfrecord in ``folder/tfrecord``, its ArrayRecord in ``folder/array_record``."""
    written = {name: _written(name) for name in SPLITS}

    def build(folder):
        for name in SPLITS:
            _archive(folder / f"{name}.tar.gz", name, written[name])
            for fmt in FORMATS:
                _as_downloaded(folder / fmt, name, folder / f"{name}.tar.gz")
                data.load(_cfg(name, folder / fmt, **(STREAM if fmt == "array_record" else {})))

    return built_once("tfds_cifar_builders", build), written


def _cfg(name, data_dir, **overrides):
    """The data spec, validated as a run's is before anything is loaded."""
    return validate_data(dict(source=f"tfds:{name}", tfds_data_dir=str(data_dir), **overrides))


def _rows(x, y) -> list:
    """A split as the sorted list of its (pixels, label) rows: TFDS stores examples in an order of its own
    (shuffled by key), so the rows read back are compared as a multiset, exactly."""
    return sorted(zip((img.tobytes() for img in np.asarray(x)), np.asarray(y).tolist()))


# --------------------------------------------------------------------------- both data paths


@pytest.mark.parametrize("name", SPLITS)
def test_in_memory_path_reads_back_exactly_what_was_written(prepared, name):
    folder, written = prepared
    w = written[name]
    ds = data.load(_cfg(name, folder / "tfrecord"))
    assert (ds.train_size, ds.test_size, ds.num_classes) == (*SPLITS[name], CLASSES[name])
    assert ds.class_names == tuple(w["names"])  # read from the archive's label file, not TFDS's defaults
    assert ds.x_train.dtype == np.uint8 and ds.image_shape == (32, 32, 3)
    assert _rows(ds.x_train, ds.y_train) == _rows(w["x_train"], w["y_train"])
    assert _rows(ds.x_test, ds.y_test) == _rows(w["x_test"], w["y_test"])
    assert (folder / "tfrecord" / name / "3.0.2" / f"{name}-train.tfrecord-00000-of-00001").is_file()


@pytest.mark.parametrize("name", SPLITS)
def test_stream_reads_back_exactly_what_was_written_and_equals_the_in_memory_path(prepared, name):
    """Every ArrayRecord record decodes to a written image and label; read by index, records are the in-memory
    path's rows in the same order, so the batches of any (seed, step) and a few-sample subset are equal."""
    pytest.importorskip("grain")
    folder, written = prepared
    w = written[name]
    ds = data.load(_cfg(name, folder / "array_record", **STREAM))
    mem = data.load(_cfg(name, folder / "tfrecord"))
    assert isinstance(ds, data.Stream)
    assert (ds.train_size, ds.test_size, ds.num_classes) == (*SPLITS[name], CLASSES[name])
    assert ds.class_names == tuple(w["names"])
    for split, source in (("train", ds.train_source), ("test", ds.test_source)):
        records = [data.stream.parse_example(source[i]) for i in range(len(source))]
        images = np.stack([data.stream.decode_image(image) for image, _ in records])
        labels = np.array([label for _, label in records])
        assert _rows(images, labels) == _rows(w[f"x_{split}"], w[f"y_{split}"])
        np.testing.assert_array_equal(images, getattr(mem, f"x_{split}"))  # same order as the tfrecord files
        np.testing.assert_array_equal(labels, getattr(mem, f"y_{split}"))
    for step in (0, 4, 6):  # epochs 0 and 1 (5 / 6 full batches of 8 an epoch)
        x, y = ds.train_batch(8, 7, step)
        want = mem.train_batch(8, 7, step)
        np.testing.assert_array_equal(x, want[0])
        np.testing.assert_array_equal(y, want[1])
    got = list(ds.eval_batches(16))
    for b, want in zip(got, mem.eval_batches(16), strict=True):
        for part, expected in zip(b, want, strict=True):
            np.testing.assert_array_equal(part, expected)
    few = data.load(_cfg(name, folder / "array_record", train_fraction=0.5, **STREAM))
    few_mem = data.load(_cfg(name, folder / "tfrecord", train_fraction=0.5))
    np.testing.assert_array_equal(few.subset, data.class_balanced_subset(mem.y_train, train_fraction=0.5))
    assert few.train_size == few_mem.train_size < ds.train_size
    for got_part, want_part in zip(few.train_batch(4, 1, 2), few_mem.train_batch(4, 1, 2), strict=True):
        np.testing.assert_array_equal(got_part, want_part)


# --------------------------------------------------------------------------- the command line


def _cli(workdir, data_dir, *args, env=None, preamble=""):
    """The training command line (``python -m ekd_jax.main``) on tfds:cifar100 in ``data_dir``; ``preamble``:
    Python run first in the same interpreter, then the module as ``-m`` runs it."""
    argv = ["--config", str(REPO / "configs/quickstart.py:tiny"), "--workdir", str(workdir),
            "--config.data.source=tfds:cifar100", f"--config.data.tfds_data_dir={data_dir}", *args]
    run = ["-m", "ekd_jax.main"]
    if preamble:
        run = ["-c", f"{preamble}\nimport runpy\nrunpy.run_module('ekd_jax.main', run_name='__main__', alter_sys=True)"]
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, *run, *argv], env=env, capture_output=True, text=True, cwd=REPO, timeout=300)


def test_cli_prepares_cifar100_from_the_download_and_trains_one_epoch(prepared, tmp_path):
    """The command line's own first use: TFDS prepares cifar100 from the download folder alone (no prepared
    copy there), then one epoch trains on all 48 images and evaluates on the 24 held out."""
    folder, written = prepared
    w, data_dir = written["cifar100"], tmp_path / "tfds"
    _as_downloaded(data_dir, "cifar100", folder / "cifar100.tar.gz")
    r = _cli(tmp_path / "run", data_dir, "--config.num_epochs=1", "--config.data.train_fraction=1.0",
             "--config.batch_size=4", "--config.eval_batch_size=16")  # 12 steps: the LR milestones fall apart
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (s["data_source"], s["num_classes"], s["train_size"], s["test_size"]) == ("tfds:cifar100", 100, 48, 24)
    assert s["steps"] == 48 // 4 and s["teacher_input_shape"] == [8, 8, 3]
    meta = json.loads((tmp_path / "run" / "student" / "network.json").read_text())
    assert meta["num_classes"] == 100 and meta["class_names"] == w["names"]
    ds = data.load(_cfg("cifar100", data_dir))  # what that run prepared, read back here
    assert _rows(ds.x_train, ds.y_train) == _rows(w["x_train"], w["y_train"])
    assert _rows(ds.x_test, ds.y_test) == _rows(w["x_test"], w["y_test"])


def test_offline_first_use_is_one_error_line(tmp_path):
    """A first use that cannot download: every request goes through a proxy on a local port nothing listens
    on (held, so nothing can), the way an offline machine refuses it, fast and on any machine."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        proxy = f"http://127.0.0.1:{closed.getsockname()[1]}"
        env = {k: proxy for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")}
        env.update(NO_PROXY="", no_proxy="", ALL_PROXY="", all_proxy="")
        for stream in ((), [f"--config.data.{k}={v}" for k, v in STREAM.items()]):
            t0 = time.time()
            r = _cli(tmp_path / "run", tmp_path / "tfds", *stream, env=env)
            # At once: not after the 3.5 minutes of TFDS's downloader retrying (ekd_jax probes the host first).
            assert time.time() - t0 < 60, time.time() - t0
            assert r.returncode == 2, r.stderr[-3000:]
            (line,) = r.stderr.splitlines()
            assert line.startswith("error: data.source='tfds:cifar100': www.cs.toronto.edu cannot be reached through "
                                   "the proxy"), line
            assert "ConnectionRefusedError" in line and "downloads it once, which needs the internet" in line
            assert "--config.data.tfds_data_dir" in line and "'npz:<path>' or 'digits'" in line
            assert ("--file_format=array_record`" in line) == bool(stream)


# --------------------------------------------------------------------------- other failures


@pytest.mark.parametrize("stream", [False, True])
def test_checksum_mismatch_is_named(prepared, tmp_path, stream):
    """A file in TFDS's manual folder is hashed and checked against the registered checksum: the miniature
    archive is not the real one, so both paths refuse it, naming the file and the fix."""
    folder, _ = prepared
    manual = tmp_path / "downloads" / "manual" / "cifar-100-binary.tar.gz"
    manual.parent.mkdir(parents=True)
    manual.write_bytes((folder / "cifar100.tar.gz").read_bytes())
    with pytest.raises(ValueError) as e:
        data.load(_cfg("cifar100", tmp_path, **(STREAM if stream else {})))
    msg = str(e.value)
    assert msg.startswith(f"data.source='tfds:cifar100': {manual} is not the file TFDS expects for "
                          "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz (checksum mismatch"), msg
    assert "delete it and run again" in msg and "\n" not in msg


def test_any_other_failure_keeps_tfds_message_on_one_line(tmp_path):
    """A download TFDS cannot extract (a truncated or damaged archive in its download folder)."""
    (tmp_path / "damaged.tar.gz").write_bytes(b"not a tar.gz archive\nat all")
    _as_downloaded(tmp_path / "tfds", "cifar10", tmp_path / "damaged.tar.gz")
    with pytest.raises(ValueError) as e:
        data.load(_cfg("cifar10", tmp_path / "tfds"))
    msg = str(e.value)
    assert msg.startswith(f"data.source='tfds:cifar10': TFDS could not prepare it in {tmp_path}/tfds/cifar10/3.0.2 "
                          "(ExtractError: Error while extracting "), msg
    assert msg.endswith("; fix that and run again (a prepared dataset is reused), or train on data.source='npz:<path>' "
                        "or 'digits'")
    assert "\n" not in msg


def test_dataset_that_needs_a_manual_download(tmp_path):
    with pytest.raises(ValueError) as e:
        data.load(_cfg("imagenet2012", tmp_path, **STREAM))  # the stream: what ImageNet is read with
    msg = str(e.value)
    assert msg.startswith("data.source='tfds:imagenet2012': TFDS cannot download this dataset itself "
                          f"(AssertionError: Manual directory {tmp_path}/downloads/manual does not exist"), msg
    assert "ILSVRC2012_img_train.tar" in msg and "\n" not in msg


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full (Linux's always-full device)")
def test_full_disk_is_named(tmp_path):
    """A cause no test can provoke inside TFDS, from the exception it raises: a write to /dev/full fails with
    ENOSPC, as a write to a full disk does."""
    with pytest.raises(OSError) as full:
        with open("/dev/full", "wb", buffering=0) as f:
            f.write(b"x")
    assert full.value.errno == errno.ENOSPC
    msg = data_tfds.failure(full.value, tfds.builder("cifar100", data_dir=str(tmp_path)), "cifar100")
    assert msg == (f"not enough free disk space in {tmp_path} (OSError: [Errno 28] No space left on device); free "
                   "some space there or give a folder on a disk with room as --config.data.tfds_data_dir")


def test_missing_module_is_named(tmp_path):
    """What the fresh install without importlib_resources hit: TFDS imports it only while it prepares."""
    r = _cli(tmp_path / "run", tmp_path / "tfds", preamble="import sys\nsys.modules['importlib_resources'] = None")
    assert r.returncode == 2, r.stderr[-3000:]
    (line,) = r.stderr.splitlines()
    assert line == ("error: data.source='tfds:cifar100': TFDS needs the Python module 'importlib_resources' to "
                    "prepare a dataset, and it is not installed; pip install 'ekd_jax[tfds]' (TFDS, TensorFlow and "
                    "the modules they need to prepare one)")
