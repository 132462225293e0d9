"""ekd_jax.data: sources, few-sample subsets, batching, augmentation and low-resolution views."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ekd_jax import data
from ekd_jax.data import tfds as data_tfds
from ekd_jax.spec import DataSpec
from ekd_jax.spec.validate import validate_data

HW = 12  # npz fixture size: divisible by 2 and 4 but not by 8
CLASS_COUNTS = (10, 20, 30)  # training images per class in the npz fixture
NAMES = ("cat", "dog", "emu")


def _cfg(**overrides):
    """The data spec with ``overrides``, validated as a run's is before anything is loaded."""
    return validate_data(overrides)


def _arrays(seed=0, grayscale=False):
    rng = np.random.default_rng(seed)
    shape = (HW, HW) if grayscale else (HW, HW, 3)
    y_train = np.repeat(np.arange(len(CLASS_COUNTS)), CLASS_COUNTS).astype(np.int64)
    y_test = np.arange(25) % len(CLASS_COUNTS)
    return dict(
        x_train=rng.integers(0, 256, (len(y_train), *shape), dtype=np.uint8),
        y_train=y_train,
        x_test=rng.integers(0, 256, (len(y_test), *shape), dtype=np.uint8),
        y_test=y_test,
    )


@pytest.fixture
def npz_path(tmp_path):
    """uint8 RGB NHWC with class names; int64 labels, as users commonly save them."""
    path = tmp_path / "rgb.npz"
    np.savez(path, **_arrays(), class_names=np.array(NAMES))
    return str(path)


@pytest.fixture(scope="module")
def digits():
    return data.load(DataSpec())


def _index_dataset(n, hw=4):
    """A Dataset whose every pixel of image i equals i, so a batch tells which rows it holds."""
    x = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, hw, hw, 1)).copy()
    y = (np.arange(n) % 5).astype(np.int32)
    return data.Dataset(x, y, x[:3], y[:3], 5, None, "test", (0.5,), (0.25,))


# --------------------------------------------------------------------------- config & sources


def test_default_config_fields():
    assert dataclasses.asdict(DataSpec()) == dict(
        source="digits",
        image_size=None,
        samples_per_class=0,
        train_fraction=1.0,
        subset_seed=0,
        student_downsample=1,
        lowres_mode="upsample",
        crop_padding=4,
        flip=True,
        tfds_data_dir=None,
        mean=(),
        std=(),
        streaming=False,
        crop_scale=(0.08, 1.0),
        crop_ratio=(3 / 4, 4 / 3),
        eval_resize=None,
        workers=0,
        on_device=False,
    )


def test_digits_is_a_fixed_stratified_split(digits):
    assert digits.image_shape == (8, 8, 1)
    assert digits.x_train.dtype == digits.x_test.dtype == np.uint8
    assert digits.y_train.dtype == digits.y_test.dtype == np.int32
    assert digits.train_size + digits.test_size == 1797
    assert digits.num_classes == 10 and digits.class_names == tuple("0123456789")
    assert digits.x_train.max() == 255  # 16 maps to 255
    train_counts = np.bincount(digits.y_train, minlength=10)
    test_counts = np.bincount(digits.y_test, minlength=10)
    np.testing.assert_allclose(test_counts, 0.2 * (train_counts + test_counts), atol=1)
    again = data.load(DataSpec())
    np.testing.assert_array_equal(again.x_train, digits.x_train)
    np.testing.assert_array_equal(again.y_test, digits.y_test)
    x01 = digits.x_train / 255.0
    np.testing.assert_allclose(digits.mean, x01.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(digits.std, x01.std(axis=(0, 1, 2)), rtol=1e-12)


def test_digits_resized_once_at_load(digits):
    big = data.load(_cfg(image_size=32))
    assert big.image_shape == (32, 32, 1) and big.x_test.shape[1:] == (32, 32, 1)
    np.testing.assert_array_equal(big.y_train, digits.y_train)
    np.testing.assert_array_equal(big.x_train, data.load(_cfg(image_size=32)).x_train)
    # Bilinear resizing moves the average brightness only a little.
    assert abs(big.mean[0] - digits.mean[0]) < 0.02


@pytest.mark.parametrize("name, classes", [("cifar10", 10), ("cifar100", 100)])
def test_tfds_sources_with_mock_data(name, classes, tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    _no_download_probe(monkeypatch)
    with tfds.testing.mock_data(num_examples=20):
        ds = data.load(_cfg(source=f"tfds:{name}", tfds_data_dir=str(tmp_path)))
        small = data.load(_cfg(source=f"tfds:{name}", image_size=16))
    assert ds.x_train.shape == ds.x_test.shape == (20, 32, 32, 3)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
    assert ds.num_classes == classes and len(ds.class_names) == classes
    assert 0 <= ds.y_train.min() and ds.y_train.max() < classes
    assert small.image_shape == (16, 16, 3) and small.test_size == 20
    assert ds.source == f"tfds:{name}"


def _no_download_probe(monkeypatch):
    """mock_data stands in for TFDS's preparation (tests/test_tfds_builder.py runs the real one): the probe
    of the download host that comes before it would look for a real download."""
    monkeypatch.setattr(data_tfds, "check_hosts_reachable", lambda builder: None)


def test_tfds_images_of_varying_size_need_image_size(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    _no_download_probe(monkeypatch)
    with tfds.testing.mock_data(num_examples=4):
        with pytest.raises(ValueError, match="varying sizes; set data.image_size"):
            data.load(_cfg(source="tfds:caltech_birds2011"))
        ds = data.load(_cfg(source="tfds:caltech_birds2011", image_size=24))
    assert ds.x_train.shape == (4, 24, 24, 3) and ds.num_classes == 200


def test_npz_rgb_source(npz_path):
    ds = data.load(_cfg(source=f"npz:{npz_path}"))
    ref = _arrays()
    np.testing.assert_array_equal(ds.x_train, ref["x_train"])
    np.testing.assert_array_equal(ds.y_test, ref["y_test"])
    assert ds.y_train.dtype == np.int32 and ds.image_shape == (HW, HW, 3)
    assert ds.class_names == NAMES and ds.num_classes == 3


def test_npz_grayscale_nhw_source(tmp_path):
    arrays = _arrays(grayscale=True)
    arrays["y_test"] = arrays["y_test"].copy()
    arrays["y_test"][0] = 6  # a label only the test split has still counts
    np.savez(tmp_path / "gray.npz", **arrays)
    ds = data.load(_cfg(source=f"npz:{tmp_path / 'gray.npz'}", image_size=8))
    assert ds.x_train.shape == (sum(CLASS_COUNTS), 8, 8, 1)
    assert ds.class_names is None and ds.num_classes == 7
    assert len(ds.mean) == len(ds.std) == 1


# --------------------------------------------------------------------------- errors


def _bad(**changes):
    arrays = _arrays()
    arrays.update(changes)
    return {k: v for k, v in arrays.items() if v is not None}


NPZ_ERRORS = {
    "missing array": (_bad(y_test=None), r"missing arrays \['y_test'\]; the file has "
                      r"\['x_test', 'x_train', 'y_train'\]"),
    "float images": (_bad(x_train=np.zeros((60, HW, HW, 3), np.float32)), "must be uint8"),
    "four channels": (_bad(x_train=np.zeros((60, HW, HW, 4), np.uint8)), "1 or 3 channels"),
    "2-D labels": (_bad(y_train=np.zeros((60, 1), np.int32)), "y_train must be 1-D integer"),
    "float labels": (_bad(y_train=np.zeros(60, np.float32)), "y_train must be 1-D integer"),
    "length mismatch": (_bad(y_train=np.zeros(59, np.int32)), "59 labels for 60 images"),
    "negative label": (_bad(y_test=-np.ones(25, np.int32)), "y_test has negative labels"),
    "shapes disagree": (_bad(x_test=np.zeros((25, 8, 8, 3), np.uint8)), "they must agree"),
    "names too short": (_bad(class_names=np.array(["a", "b"])),
                        "class_names lists 2 classes but the labels go up to 2"),
}


@pytest.mark.parametrize("case", sorted(NPZ_ERRORS))
def test_npz_content_errors(case, tmp_path):
    arrays, message = NPZ_ERRORS[case]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        data.load(_cfg(source=f"npz:{tmp_path / 'bad.npz'}"))


def test_npz_file_errors(tmp_path):
    with pytest.raises(ValueError, match="file not found: .*nowhere.npz"):
        data.load(_cfg(source=f"npz:{tmp_path / 'nowhere.npz'}"))
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip archive")
    with pytest.raises(ValueError, match="cannot read .*junk.npz as an .npz archive"):
        data.load(_cfg(source=f"npz:{tmp_path / 'junk.npz'}"))
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(ValueError, match="single .npy array, not an .npz archive"):
        data.load(_cfg(source=f"npz:{tmp_path / 'one.npy'}"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(source="cifar10"), r"Unknown data.source 'cifar10'. Valid forms: digits, "
         r"tfds:<name>, npz:<path>"),
        (dict(source="tfds:"), "Valid forms"),
        (dict(source="hdf5:x.h5"), "Valid forms"),
        (dict(train_fraction=0.0), r"train_fraction must be in \(0, 1\]"),
        (dict(train_fraction=1.5), r"train_fraction must be in \(0, 1\]"),
        (dict(samples_per_class=2, train_fraction=0.5), "both set; choose one"),
        (dict(samples_per_class=-1), "samples_per_class must be an int >= 0"),
        (dict(lowres_mode="bicubic"), "Unknown data.lowres_mode 'bicubic'"),
        (dict(student_downsample=3), r"student_downsample must be one of \(1, 2, 4, 8\)"),
        (dict(image_size=12, student_downsample=8), r"does not divide the image size \(12, 12\)"),
        (dict(crop_padding=-1), "crop_padding must be an int >= 0"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        data.load(_cfg(**overrides))


def test_errors_found_after_loading(npz_path):
    # Native 12x12 images: only known once the file is read.
    with pytest.raises(ValueError, match=r"student_downsample=8 does not divide .*\(12, 12\)"):
        data.load(_cfg(source=f"npz:{npz_path}", student_downsample=8))
    with pytest.raises(ValueError, match=r"larger than class 0 \('cat'\), which has only 10"):
        data.load(_cfg(source=f"npz:{npz_path}", samples_per_class=11))
    with pytest.raises(ValueError, match="larger than the training set"):
        data.steps_per_epoch(50, 51)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        data.make_views(np.zeros((2, 4, 4, 1), np.uint8), None, _cfg(), (0.5,), (0.5,), True)


# --------------------------------------------------------------------------- few-sample


@pytest.mark.parametrize(
    "overrides, counts",
    [
        (dict(samples_per_class=4), [4, 4, 4]),
        (dict(samples_per_class=10), [10, 10, 10]),
        (dict(train_fraction=0.25), [3, 5, 8]),  # 2.5 -> 3, 5, 7.5 -> 8 (half up)
        (dict(train_fraction=0.01), [1, 1, 1]),  # never an empty class
    ],
)
def test_subset_has_exact_class_counts(npz_path, overrides, counts):
    full = data.load(_cfg(source=f"npz:{npz_path}"))
    sub = data.load(_cfg(source=f"npz:{npz_path}", **overrides))
    assert np.bincount(sub.y_train).tolist() == counts
    # The test split and the normalisation statistics are those of the full data.
    np.testing.assert_array_equal(sub.x_test, full.x_test)
    assert sub.mean == full.mean and sub.std == full.std
    # Every kept image is a distinct training image with its own label.
    rows = {full.x_train[i].tobytes(): full.y_train[i] for i in range(full.train_size)}
    assert len({x.tobytes() for x in sub.x_train}) == sub.train_size
    assert all(rows[x.tobytes()] == y for x, y in zip(sub.x_train, sub.y_train))


def test_subset_is_determined_by_its_seed(npz_path):
    labels = _arrays()["y_train"]
    a, b, c = (data.class_balanced_subset(labels, samples_per_class=5, seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert data.class_balanced_subset(labels) is None  # both modes off
    first = data.load(_cfg(source=f"npz:{npz_path}", samples_per_class=5, subset_seed=3))
    second = data.load(_cfg(source=f"npz:{npz_path}", samples_per_class=5, subset_seed=3))
    other = data.load(_cfg(source=f"npz:{npz_path}", samples_per_class=5, subset_seed=4))
    np.testing.assert_array_equal(first.x_train, second.x_train)
    assert not np.array_equal(first.x_train, other.x_train)


# --------------------------------------------------------------------------- host batching


def test_steps_per_epoch_drops_the_remainder():
    assert data.steps_per_epoch(50, 8) == 6
    assert data.steps_per_epoch(50, 10) == 5
    assert data.steps_per_epoch(50, 50) == 1


@pytest.mark.parametrize("batch_size", [10, 8])
def test_train_batch_covers_each_example_once_per_epoch(batch_size):
    ds = _index_dataset(50)
    steps = data.steps_per_epoch(50, batch_size)
    orders = []
    for epoch in range(3):
        batches = [ds.train_batch(batch_size, 7, epoch * steps + i) for i in range(steps)]
        ids = np.concatenate([x[:, 0, 0, 0] for x, _ in batches])
        assert len(ids) == steps * batch_size and len(set(ids.tolist())) == len(ids)
        orders.append(ids)
    if 50 % batch_size == 0:  # no remainder to drop: the epoch is exactly the dataset
        assert all(sorted(o.tolist()) == list(range(50)) for o in orders)
    assert not np.array_equal(orders[0], orders[1])  # reshuffled every epoch
    x, y = ds.train_batch(batch_size, 7, 13)
    np.testing.assert_array_equal(y, x[:, 0, 0, 0] % 5)  # images and labels stay paired
    assert y.dtype == np.int32 and x.dtype == np.uint8


def test_train_batch_depends_only_on_seed_and_step():
    ds = _index_dataset(50)
    a = ds.train_batch(8, 0, 23)[0]
    # A resumed run asks for step 23 first, without having seen steps 0..22.
    np.testing.assert_array_equal(a, ds.train_batch(8, 0, 23)[0])
    assert not np.array_equal(a, ds.train_batch(8, 1, 23)[0])
    perm = data.epoch_permutation(50, 0, 3)
    assert sorted(perm.tolist()) == list(range(50)) and not perm.flags.writeable


def test_eval_batches_cover_every_test_example_once(digits):
    batch_size = 64  # 360 test images: 5 full batches and one of 40
    assert digits.test_size % batch_size != 0
    batches = list(digits.eval_batches(batch_size))
    assert len(batches) == -(-digits.test_size // batch_size)
    assert all(x.shape == (batch_size, 8, 8, 1) and y.shape == m.shape == (batch_size,)
               for x, y, m in batches)
    masks = np.concatenate([m for _, _, m in batches])
    assert masks.dtype == np.float32 and masks.sum() == digits.test_size
    real = masks.astype(bool)
    np.testing.assert_array_equal(np.concatenate([x for x, _, _ in batches])[real], digits.x_test)
    np.testing.assert_array_equal(np.concatenate([y for _, y, _ in batches])[real], digits.y_test)
    assert np.all(batches[-1][0][40:] == 0) and np.all(batches[-1][2][40:] == 0)


# --------------------------------------------------------------------------- device side


def _key(seed, step):
    return jax.random.fold_in(jax.random.key(seed), step)


# One compiled function per (padding, flip) instead of many small eager ops: keeps tests fast.
_augment = jax.jit(data.augment, static_argnums=(2, 3))


def _as_uint8(x01):
    # XLA may divide by 255 as a multiply by 1/255 (1 ulp off), so compare pixel values.
    return np.round(np.asarray(x01) * 255).astype(np.uint8)


def test_augment_is_reproducible_from_seed_and_step():
    images = np.random.default_rng(0).integers(0, 256, (16, HW, HW, 3), dtype=np.uint8)
    a = _augment(images, _key(0, 5), 4, True)
    assert a.dtype == jnp.float32 and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    np.testing.assert_array_equal(a, _augment(images, _key(0, 5), 4, True))
    assert not np.array_equal(a, _augment(images, _key(0, 6), 4, True))
    assert not np.array_equal(a, _augment(images, _key(1, 5), 4, True))
    np.testing.assert_array_equal(_as_uint8(_augment(images, _key(0, 5), 0, False)), images)


def test_augment_crops_and_flips_each_example_independently():
    p = 2
    image = np.random.default_rng(1).integers(1, 256, (HW, HW, 3), dtype=np.uint8)
    out = _as_uint8(_augment(np.stack([image] * 32), _key(3, 0), p, True))
    padded = np.pad(image, ((p, p), (p, p), (0, 0)))  # zero padding, as in the augmentation
    windows = {}
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            window = padded[dy : dy + HW, dx : dx + HW]
            windows[(dy, dx, False)] = window
            windows[(dy, dx, True)] = window[:, ::-1]
    matches = [[k for k, w in windows.items() if np.array_equal(w, o)] for o in out]
    assert all(len(m) == 1 for m in matches)  # each output is one flipped/shifted window
    found = [m[0] for m in matches]
    assert len(set(found)) > 1  # the same image, different crops/flips within one batch
    assert {flip for _, _, flip in found} == {False, True}


def test_degrade_keeps_range_and_constants():
    x = jnp.full((2, 16, 16, 3), 0.3, jnp.float32)
    np.testing.assert_allclose(data.degrade(x, 4, "native"), 0.3, atol=1e-6)
    np.testing.assert_allclose(data.degrade(x, 4, "upsample"), 0.3, atol=1e-6)
    noise = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
    assert data.degrade(noise, 1, "native") is noise
    low = data.degrade(noise, 2, "upsample")
    assert float(low.min()) >= 0.0 and float(low.max()) <= 1.0
    assert float(low.std()) < float(noise.std())  # detail is lost


@pytest.mark.parametrize("mode", ["upsample", "native"])
@pytest.mark.parametrize("factor", [2, 4])
def test_low_resolution_views(npz_path, mode, factor):
    cfg = _cfg(source=f"npz:{npz_path}", student_downsample=factor, lowres_mode=mode)
    base = _cfg(source=f"npz:{npz_path}")
    ds = data.load(cfg)
    x, key = ds.x_test[:8], _key(0, 1)
    want = [8, *data.student_input_shape(cfg, ds.image_shape)]
    assert want == ([8, HW // factor, HW // factor, 3] if mode == "native" else [8, HW, HW, 3])
    assert data.teacher_input_shape(cfg, ds.image_shape) == [HW, HW, 3]
    for train in (False, True):
        teacher, student = data.make_views(x, key, cfg, ds.mean, ds.std, train)
        plain_teacher, plain_student = data.make_views(x, key, base, ds.mean, ds.std, train)
        assert plain_student is plain_teacher  # factor 1: the student sees the teacher's input
        np.testing.assert_array_equal(teacher, plain_teacher)  # the teacher view is untouched
        assert list(student.shape) == want
        # The student sees the SAME (augmented) image, degraded, with the same statistics.
        x01 = data.augment(x, key, 4, True) if train else x / np.float32(255)
        expected = data.normalize(data.degrade(x01, factor, mode), ds.mean, ds.std)
        np.testing.assert_allclose(student, expected, rtol=1e-5, atol=1e-5)


def test_make_views_inside_jit_matches_eager(digits):
    cfg = _cfg(student_downsample=2, lowres_mode="native")
    x, _ = digits.train_batch(32, 0, 0)
    views = jax.jit(lambda x, k: data.make_views(x, k, cfg, digits.mean, digits.std, True))
    teacher, student = views(x, _key(0, 0))
    eager = data.make_views(x, _key(0, 0), cfg, digits.mean, digits.std, True)
    np.testing.assert_allclose(teacher, eager[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(student, eager[1], rtol=1e-5, atol=1e-5)
    assert teacher.shape == (32, 8, 8, 1) and student.shape == (32, 4, 4, 1)


def test_channel_stats_are_exact_and_a_constant_channel_is_only_centred():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
    x[..., 2] = 77  # a channel that never varies
    mean, std = data.channel_stats(x)
    f = x.astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, f.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(std[:2], f[..., :2].std(axis=(0, 1, 2)), rtol=1e-10)
    assert std[2] == 1.0  # not 0: normalising divides by it
    views = data.normalize(jnp.asarray(f, jnp.float32), mean, std)
    assert bool(jnp.all(jnp.isfinite(views))) and float(jnp.max(jnp.abs(views[..., 2]))) < 1e-6
