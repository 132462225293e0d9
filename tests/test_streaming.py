"""The grain stream (ekd_jax/data/stream.py): ArrayRecord files written here, read by index.

Batches are a pure function of (seed, step) for any worker count and any split between processes;
few-sample subsets and (with an identity crop) whole batches equal the in-memory path's; evaluation
covers every example once with padding masks; a training run on the stream interrupted mid-epoch and
resumed ends bitwise-identical to an uninterrupted one.
"""

import json
import pathlib
import sys

import numpy as np
import pytest

from ekd_jax import data, train
from ekd_jax.config import base_config
from ekd_jax.data import tfds as data_tfds
from ekd_jax.spec.validate import validate, validate_data

pytest.importorskip("grain")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import quickstart  # noqa: E402

CLASSES = 4
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def _varied_images(n, seed):
    """n smooth random RGB images (4x4 random colours, bilinearly enlarged) of sizes 10..29 x 12..33."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = int(rng.integers(10, 30)), int(rng.integers(12, 34))
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        out.append(np.asarray(coarse.resize((w, h), Image.Resampling.BILINEAR)))
    return out


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    """40 training images in two files (one PNG, one JPEG) and 10 test images; labels i % 4."""
    d = tmp_path_factory.mktemp("varied")
    train_images, test_images = _varied_images(40, 0), _varied_images(10, 1)
    labels = [i % CLASSES for i in range(40)]
    data.stream.write_arrayrecord(d / "train-00000.array_record", train_images[:20], labels[:20], "PNG")
    data.stream.write_arrayrecord(d / "train-00001.array_record", train_images[20:], labels[20:], "JPEG")
    data.stream.write_arrayrecord(d / "test-00000.array_record", test_images, [(3 * i) % CLASSES for i in range(10)])
    return f"arrayrecord:{d}/{{split}}-*.array_record", train_images, test_images


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    """The same 8x8 images (40 train, unbalanced classes, 10 test) as ArrayRecord (lossless PNG) and .npz."""
    d = tmp_path_factory.mktemp("square")
    rng = np.random.default_rng(2)
    x_train = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    y_train = rng.permutation(np.repeat(np.arange(CLASSES), [13, 11, 9, 7])).astype(np.int32)
    x_test = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    y_test = (np.arange(10) % CLASSES).astype(np.int32)
    data.stream.write_arrayrecord(d / "train.array_record", x_train, y_train)
    data.stream.write_arrayrecord(d / "test.array_record", x_test, y_test)
    np.savez(d / "same.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return d, x_train, y_train, x_test, y_test


def _fields(source, **overrides):
    """The data block of these tests: 16x16 crops (no padding: the stream crops on the host), fixed statistics."""
    return {**dict(source=source, image_size=16, crop_padding=0, mean=MEAN, std=STD), **overrides}


def _cfg(source, **overrides):
    """The data spec, validated as a run's is before anything is loaded."""
    return validate_data(_fields(source, **overrides))


def _block(source, **overrides):
    """The same as a config's data block (the defaults and these fields), for the tests that go through a config."""
    block = base_config().data
    block.update(_fields(source, **overrides))
    return block


class _Counting:
    """A record source that remembers which records were read."""

    def __init__(self, source):
        self.source, self.read = source, []

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        self.read.append(int(i))
        return self.source[i]


# --------------------------------------------------------------------------- records and host transforms


def test_records_round_trip_and_bad_records_are_named(varied, tmp_path):
    source, train_images, _ = varied
    ds = data.load(_cfg(source))
    assert (ds.train_size, ds.test_size, ds.num_classes, ds.image_shape) == (40, 10, CLASSES, (16, 16, 3))
    assert (ds.mean, ds.std, ds.class_names) == (MEAN, STD, None)
    encoded, label = data.stream.parse_example(ds.train_source[7])
    assert label == 7 % CLASSES
    np.testing.assert_array_equal(data.stream.decode_image(encoded), train_images[7])  # the PNG file: lossless
    jpeg = data.stream.decode_image(data.stream.parse_example(ds.train_source[27])[0])
    assert jpeg.shape == train_images[27].shape and np.abs(jpeg.astype(int) - train_images[27]).mean() < 8
    np.testing.assert_array_equal(data.stream.read_labels(ds.train_source, "x"), np.arange(40) % CLASSES)
    with pytest.raises(ValueError, match=r"not a serialized tf.train.Example with one bytes feature 'image'"):
        data.stream.parse_example(b"\x00\x01 not a record")
    other = data.stream._example_proto().Example()
    other.features.feature["img"].bytes_list.value.append(b"x")
    with pytest.raises(ValueError, match=r"it has features \['img'\]"):
        data.stream.parse_example(other.SerializeToString())
    grey = data.stream.decode_image(data.stream.encode_image(np.full((5, 6, 1), 77, np.uint8)))
    assert grey.shape == (5, 6, 3) and (grey == 77).all()  # converted to RGB


def test_random_resized_crop_boxes_shapes_and_range():
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    fractions = []
    for i in range(300):
        rng = data.stream.example_rng(0, i, 3)
        h_img, w_img = int(40 + i % 17), int(50 + i % 23)
        top, left, h, w = data.stream.crop_box(h_img, w_img, rng, scale, ratio)
        assert 0 <= top and top + h <= h_img and 0 <= left and left + w <= w_img and h > 0 and w > 0
        fractions.append(h * w / (h_img * w_img))
        # Rounding the sides to whole pixels moves area and aspect only a little.
        assert 0.08 * 0.8 <= fractions[-1] <= 1.0
        assert 0.75 * 0.85 <= w / h <= 4 / 3 / 0.85
    assert min(fractions) < 0.2 and max(fractions) > 0.8  # the whole scale range is drawn
    # Impossible constraints fall back to torchvision's central crop of the nearest aspect ratio.
    assert data.stream.crop_box(20, 20, np.random.default_rng(0), (1.0, 1.0), (2.0, 2.0)) == (5, 0, 10, 20)
    img = np.random.default_rng(1).integers(0, 256, (37, 51, 3), dtype=np.uint8)
    out = data.stream.random_resized_crop(img, 16, data.stream.example_rng(3, 4, 5), scale, ratio)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert img.min() <= out.min() and out.max() <= img.max()  # bilinear: no overshoot
    np.testing.assert_array_equal(out, data.stream.random_resized_crop(img, 16, data.stream.example_rng(3, 4, 5), scale, ratio))
    assert not np.array_equal(out, data.stream.random_resized_crop(img, 16, data.stream.example_rng(3, 4, 6), scale, ratio))
    square = img[:16, :16]
    np.testing.assert_array_equal(data.stream.random_resized_crop(square, 16, np.random.default_rng(0), (1, 1), (1, 1)), square)
    # Evaluation: shorter side to `resize`, then the centre crop; a centred marker survives whole.
    tall = np.zeros((60, 30, 3), np.uint8)
    tall[26:34, 11:19] = 255
    view = data.stream.resize_centre_crop(tall, 20, 10)
    assert view.shape == (10, 10, 3)
    marker = view[..., 0] > 127
    assert marker[3:7, 3:7].all() and not marker[0].any() and not marker[-1].any()
    assert data.stream.resize_centre_crop(tall[:30], 30, 30).shape == (30, 30, 3)


# --------------------------------------------------------------------------- batches


def test_batches_are_a_pure_function_of_seed_and_step(varied):
    source, _, _ = varied
    ds = data.load(_cfg(source))
    labels = data.stream.read_labels(ds.train_source, "x")
    steps = list(range(7))  # 40 // 8 = 5 steps an epoch: crosses into the second epoch
    seq = [ds.train_batch(8, 0, s) for s in steps]
    for x, y in seq:
        assert x.shape == (8, 16, 16, 3) and x.dtype == np.uint8 and y.dtype == np.int32
    # Each epoch reads every record once, in the order of data.process_batch_indices.
    keys = [ds.train_transform(8, 0).keys(s) for s in steps]
    assert sorted(np.concatenate(keys[:5]).tolist()) == list(range(40))
    for s in steps:
        np.testing.assert_array_equal(keys[s], data.process_batch_indices(40, 8, 0, s))
        np.testing.assert_array_equal(seq[s][1], labels[keys[s]])
    fresh = data.load(_cfg(source))
    for s in (6, 2, 3, 0):  # out of order, as a resumed run asks
        x, y = fresh.train_batch(8, 0, s)
        np.testing.assert_array_equal(x, seq[s][0])
        np.testing.assert_array_equal(y, seq[s][1])
    other = fresh.train_batch(8, 1, 0)
    assert not np.array_equal(other[1], seq[0][1]) or not np.array_equal(other[0], seq[0][0])
    # Epoch 1 shows the same records as epoch 0 at other positions, with other crops.
    assert not np.array_equal(seq[5][0], seq[0][0])


def test_worker_processes_give_the_same_batches(varied):
    source, _, _ = varied
    in_process = data.load(_cfg(source))
    workers = data.load(_cfg(source, workers=2))
    try:
        for s in range(5):  # one epoch, from grain's two worker processes
            for a, b in zip(in_process.train_batch(8, 3, s), workers.train_batch(8, 3, s)):
                np.testing.assert_array_equal(a, b)
        assert workers._open is None  # the epoch's iterator (and its processes) closed at its last step
        ref = list(in_process.eval_batches(4))
        got = list(workers.eval_batches(4))
        assert len(got) == len(ref) == 3
        for a, b in zip(ref, got):
            for u, v in zip(a, b):
                np.testing.assert_array_equal(u, v)
    finally:
        workers.close()


def test_two_processes_read_exactly_the_global_batch(varied):
    source, _, _ = varied
    whole = data.load(_cfg(source))
    procs = [data.load(_cfg(source)) for _ in range(2)]
    for p in procs:
        p.train_source = _Counting(p.train_source)
    rows = [np.arange(0, 3), np.arange(3, 8)]  # uneven shares, as process_rows may give
    for s in (0, 1, 6):
        x, y = whole.train_batch(8, 5, s)
        for p, r in zip(procs, rows):
            p.train_source.read.clear()
            xp, yp = p.train_batch(8, 5, s, r)
            np.testing.assert_array_equal(xp, x[r])  # crops keyed by the global position
            np.testing.assert_array_equal(yp, y[r])
            # ... and the process read only the records of its own rows.
            assert p.train_source.read == data.process_batch_indices(40, 8, 5, s, r).tolist()


def test_few_sample_subset_and_batches_equal_the_in_memory_path(square):
    d, x_train, y_train, _, _ = square
    identity = dict(image_size=8, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    for few in (dict(samples_per_class=5, subset_seed=3), dict(train_fraction=0.4), {}):
        stream = data.load(_cfg(f"arrayrecord:{d}/{{split}}.array_record", **identity, **few))
        memory = data.load(_cfg(f"npz:{d}/same.npz", **identity, **few))
        assert stream.train_size == memory.train_size and stream.num_classes == memory.num_classes == CLASSES
        if few:
            np.testing.assert_array_equal(memory.x_train, x_train[stream.subset])
            np.testing.assert_array_equal(memory.y_train, y_train[stream.subset])
            assert few.get("samples_per_class") is None or np.bincount(y_train[stream.subset]).tolist() == [5] * CLASSES
        else:
            assert stream.subset is None
        # The identity crop of 8x8 images: the stream's batches are the in-memory ones, bit for bit.
        for s, rows in ((0, None), (3, np.arange(2, 6))):
            for a, b in zip(stream.train_batch(8, 9, s, rows), memory.train_batch(8, 9, s, rows)):
                np.testing.assert_array_equal(a, b)


def test_evaluation_covers_every_example_once_with_masks(varied):
    source, _, test_images = varied
    ds = data.load(_cfg(source, eval_resize=20))
    test_labels = [(3 * i) % CLASSES for i in range(10)]
    rows = [np.arange(0, 2), np.arange(2, 4)]
    per_process = [list(ds.eval_batches(4, r)) for r in rows]
    assert [len(b) for b in per_process] == [3, 3]  # the same number of batches on every process
    masks = np.concatenate([np.concatenate([b[2] for b in batches]) for batches in zip(*per_process)])
    labels = np.concatenate([np.concatenate([b[1] for b in batches]) for batches in zip(*per_process)])
    images = np.concatenate([np.concatenate([b[0] for b in batches]) for batches in zip(*per_process)])
    np.testing.assert_array_equal(masks, [1] * 10 + [0] * 2)
    np.testing.assert_array_equal(labels[:10], test_labels)
    assert (images[10:] == 0).all() and (labels[10:] == 0).all()
    np.testing.assert_array_equal(images[4], data.stream.resize_centre_crop(test_images[4], 20, 16))
    whole = list(ds.eval_batches(4))
    np.testing.assert_array_equal(np.concatenate([b[0] for b in whole]), images)


def test_tfds_mock_source_streams(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    # mock_data stands in for TFDS's preparation (tests/test_tfds_builder.py runs the real one): the probe
    # of the download host that comes before it would look for a real download.
    monkeypatch.setattr(data_tfds, "check_hosts_reachable", lambda builder: None)
    with tfds.testing.mock_data(num_examples=12):
        ds = data.load(_cfg("tfds:cifar10", streaming=True, tfds_data_dir=str(tmp_path)))
        few = data.load(_cfg("tfds:cifar10", streaming=True, train_fraction=0.5))
    assert (ds.train_size, ds.test_size, ds.num_classes, ds.image_shape) == (12, 12, 10, (16, 16, 3))
    assert len(ds.class_names) == 10  # the ClassLabel's names (mocked: "0".."9")
    x, y = ds.train_batch(4, 0, 1)
    assert x.shape == (4, 16, 16, 3) and ((0 <= y) & (y < 10)).all()
    ds.train_batch(4, 0, 2)
    np.testing.assert_array_equal(x, ds.train_batch(4, 0, 1)[0])  # asked again, out of order
    labels = data.stream.read_labels(ds.train_source, "x")
    np.testing.assert_array_equal(y, labels[data.process_batch_indices(12, 4, 0, 1)])
    keep = data.class_balanced_subset(labels, train_fraction=0.5)
    np.testing.assert_array_equal(few.subset, keep)
    batches = list(ds.eval_batches(5))
    assert len(batches) == 3 and sum(float(b[2].sum()) for b in batches) == 12


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, key", [
    (dict(crop_scale=(0.0, 1.0)), "crop_scale"),
    (dict(crop_scale=(0.5, 0.2)), "crop_scale"),
    (dict(crop_ratio=(2.0, 1.0)), "crop_ratio"),
    (dict(workers=-1), "workers"),
    (dict(eval_resize=8), "eval_resize"),
    (dict(mean=(0.5, 0.5)), "std"),
    (dict(mean=(0.5, 0.5), std=(0.2, 0.2)), "mean"),
    (dict(std=(0.2, 0.0, 0.2)), "std"),
    (dict(crop_padding=4), "crop_padding"),
    (dict(image_size=None), "image_size"),
    (dict(source="digits", streaming=True), "streaming"),
    (dict(source="arrayrecord:/data/train-*.array_record"), "source"),
    (dict(source="arrayrecord:/nonexistent/{split}-*.array_record"), "source"),
])
def test_bad_stream_fields_are_refused_with_one_line(varied, overrides, key):
    c = quickstart.get_config("tiny")
    c.data = _block(varied[0])
    validate(c)
    c.data.update_from_flattened_dict(overrides)
    with pytest.raises(ValueError) as e:
        validate(c)
    msg = str(e.value)
    assert msg.startswith(f"data.{key}=") and " is not valid: " in msg and msg.endswith(f"; fix --config.data.{key}")
    assert "\n" not in msg


def test_missing_test_files_and_fixed_statistics_in_memory(square, tmp_path):
    d = square[0]
    (tmp_path / "train.array_record").write_bytes((d / "train.array_record").read_bytes())
    with pytest.raises(ValueError, match=r"no held-out files match '.*test.array_record' or '.*validation.array_record'"):
        _cfg(f"arrayrecord:{tmp_path}/{{split}}.array_record")
    (tmp_path / "validation.array_record").write_bytes((d / "test.array_record").read_bytes())
    assert data.load(_cfg(f"arrayrecord:{tmp_path}/{{split}}.array_record")).test_size == 10
    # The in-memory path takes fixed statistics too (and measures them without).
    fixed = data.load(_cfg(f"npz:{d}/same.npz", crop_padding=4, image_size=8))
    measured = data.load(_cfg(f"npz:{d}/same.npz", crop_padding=4, image_size=8, mean=(), std=()))
    assert fixed.mean == MEAN and fixed.std == STD and measured.mean == data.channel_stats(square[1])[0]
    with pytest.raises(ValueError, match=r"data.mean=\(0.5,\) is not valid: one value per channel .* 3; fix"):
        data.load(_cfg(f"npz:{d}/same.npz", mean=(0.5,), std=(0.2,)))


def test_imagenet_config_selects_the_stream_with_its_recipe():
    import imagenet

    c = imagenet.get_config()
    spec = validate(c)  # nothing is opened: TFDS is only asked when the data is loaded
    assert spec.data.is_stream and c.data.crop_padding == 0 and c.data.flip
    assert (c.data.image_size, c.data.eval_resize) == (224, 256)
    assert tuple(c.data.crop_scale) == (0.08, 1.0) and tuple(c.data.crop_ratio) == (3 / 4, 4 / 3)
    assert tuple(c.data.mean) == (0.485, 0.456, 0.406) and tuple(c.data.std) == (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- training


def test_training_on_the_stream_resumes_bitwise(square, tmp_path, monkeypatch, capsys):
    """Few-sample and low-resolution views on the stream; a run that dies in its second epoch and is
    started again ends with exactly the uninterrupted run's networks and metrics."""
    d = square[0]
    c = quickstart.get_config("tiny")
    c.data = _block(f"arrayrecord:{d}/{{split}}.array_record", image_size=8, samples_per_class=5,
                    student_downsample=2, eval_resize=10)
    c.batch_size, c.eval_batch_size, c.num_epochs, c.async_checkpoint, c.log_every_steps = 8, 8, 2, False, 1
    c.checkpoint_every_s = 0.0  # the first epoch's checkpoint is what the run resumes from
    ref = train.train_and_evaluate(c, str(tmp_path / "ref"))
    assert (ref["train_size"], ref["test_size"], ref["steps"]) == (20, 10, 4)
    assert ref["student_input_shape"] == [8, 8, 3] and ref["teacher_input_shape"] == [8, 8, 3]

    class Died(Exception):
        pass

    real = data.Stream.train_batch

    def dies_at_step_3(self, batch_size, seed, step, rows=None):
        if step == 3:
            raise Died
        return real(self, batch_size, seed, step, rows)

    monkeypatch.setattr(data.Stream, "train_batch", dies_at_step_3)
    with pytest.raises(Died):
        train.train_and_evaluate(c, str(tmp_path / "run"))
    monkeypatch.setattr(data.Stream, "train_batch", real)
    capsys.readouterr()
    again = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert "resuming after epoch 1" in capsys.readouterr().out
    for k in ("teacher_params_sha256", "student_params_sha256", "teacher_top1", "student_top1", "steps"):
        assert again[k] == ref[k], k
    read = lambda p: [{k: v for k, v in json.loads(line).items() if k != "images_per_s"}  # noqa: E731
                      for line in (p / "metrics.jsonl").read_text().splitlines()]
    assert read(tmp_path / "run") == read(tmp_path / "ref")
    # Every test image was scored: accuracies are counts over the 10 test images.
    assert ref["student_top1"] * 10 == pytest.approx(round(ref["student_top1"] * 10))
    # ekd-evaluate scores the saved networks on the stream's test split as training did.
    from ekd_jax import evaluate

    scored = evaluate.evaluate_run(tmp_path / "ref", plot=False, write=False)
    assert scored["test_size"] == 10
    for which in ("teacher", "student"):
        assert scored[which]["top1"] == pytest.approx(ref[f"{which}_top1"], abs=1e-6), which
