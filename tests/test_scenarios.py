"""Whole-run scenarios: train_and_evaluate, then evaluate and export, for settings the other tests
only exercise one step at a time (a native low-resolution student, aux_head guides, bfloat16,
FitNet and AT after a teacher run), and an export of one model of every family of the zoo.

All on the quickstart ``:tiny`` setting (digits at 8x8, ~360 training images, batch 32).
"""

import importlib.util
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import helpers
from ekd_jax import data, evaluate, export, models, rundir, train
from ekd_jax.spec import DataSpec
from ekd_jax.spec.validate import validate_data

ROOT = pathlib.Path(__file__).resolve().parents[1]
# float32 on CPU: the export bakes the variables in as constants, so XLA may constant-fold and
# reorder a few operations differently from the jitted Flax apply; the logits agree to rounding.
F32_ATOL = 1e-5


def _quickstart_tiny(**overrides):
    spec = importlib.util.spec_from_file_location("quickstart_config", ROOT / "configs" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("tiny")
    c.num_epochs = 1
    c.update_from_flattened_dict(overrides)
    return c


def _records(workdir):
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _checkpoint_states(workdir) -> dict:
    """{step: the JointState tree (plain dicts of arrays)} of every checkpoint the run kept."""
    out = {}
    for d in sorted((pathlib.Path(workdir) / "checkpoints").iterdir(), key=lambda p: p.name):
        if d.name.isdigit():
            with ocp.StandardCheckpointer() as c:
                out[int(d.name)] = c.restore((d / "state").absolute())
    return out


def _student_view(meta, images):
    """The run's evaluation view of the student, from ekd_jax.data (not from ekd_jax.export)."""
    cfg = DataSpec(student_downsample=meta["student_downsample"], lowres_mode=meta["lowres_mode"])
    return data.make_views(images, None, cfg, meta["mean"], meta["std"], train=False)[1]


def _flax_student_logits(workdir, images):
    """The saved student as the framework runs it: restored, fed the run's evaluation view."""
    module, variables, meta = rundir.restore_network(pathlib.Path(workdir) / "student")
    apply = jax.jit(lambda v, x: module.apply(v, _student_view(meta, x), train=False)[0])
    return np.asarray(apply(variables, images)), module, variables, meta


def _export_logits(out_dir, images):
    exp = jax.export.deserialize((pathlib.Path(out_dir) / export.EXPORT_FILE).read_bytes())
    return np.asarray(exp.call(images)), exp


def _matmul_types(stablehlo: str) -> list[set[str]]:
    """Element types (operands and result) of every convolution and dot in a StableHLO module."""
    found = []
    for line in stablehlo.splitlines():
        if "stablehlo.convolution" in line or "stablehlo.dot_general" in line:
            signature = line.rsplit(" : ", 1)[1]
            found.append(set(re.findall(r"x(bf16|f16|f32|f64)>", signature)))
    return found


def _float_dtypes(tree) -> set:
    return {x.dtype for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def _digits_test_split():
    ds = data.load(validate_data(_quickstart_tiny().data))
    return ds.x_test, ds.y_test


# --------------------------------------------------------------------------- EKD, native low resolution


def test_ekd_native_lowres_student_through_train_evaluate_and_export(tmp_path):
    """EKD with a x2 native student: the student network is fed 4x4 (the teacher 8x8); evaluate
    reproduces summary.json's accuracies exactly; the export takes the raw 8x8 uint8 images, degrades
    them inside and equals the framework's student on them."""
    config = _quickstart_tiny(**{"data.student_downsample": 2, "data.lowres_mode": "native"})
    s = train.train_and_evaluate(config, str(tmp_path))
    assert s["teacher_input_shape"] == [8, 8, 1] and s["student_input_shape"] == [4, 4, 1]
    (rec,) = _records(tmp_path)
    assert rec["train/student/guided"] > 0 and rec["train/student/kd"] > 0

    result = evaluate.evaluate_run(tmp_path, plot=False, write=False)
    n = s["test_size"]
    for who in ("teacher", "student"):
        assert round(result[who]["top1"] * n) == round(s[f"{who}_top1"] * n), who
        assert round(result[who]["top5"] * n) == round(s[f"{who}_top5"] * n), who
    assert result["student"]["input_shape"] == [4, 4, 1]

    info = export.export_student(tmp_path, tmp_path / "export", platforms=("cpu",), saved_model=False)
    assert info["input"]["shape"] == [None, 8, 8, 1]
    assert info["preprocessing_inside"]["network_input_shape"] == [4, 4, 1]
    assert info["preprocessing_inside"]["student_downsample"] == 2
    x, y = _digits_test_split()
    want, module, variables, meta = _flax_student_logits(tmp_path, x)
    got, _ = _export_logits(tmp_path / "export", x)
    assert got.shape == want.shape == (n, 10)
    np.testing.assert_allclose(got, want, rtol=0, atol=F32_ATOL)
    assert int(np.sum(got.argmax(-1) == y)) == round(s["student_top1"] * n)
    # Not vacuous: the same network fed the un-degraded 8x8 images (it pools globally, so it runs)
    # gives other logits; the export must have degraded them.
    x01 = data.normalize(np.asarray(x, np.float32) / 255, meta["mean"], meta["std"])
    full_res = np.asarray(module.apply(variables, x01, train=False)[0])
    assert np.max(np.abs(full_res - want)) > 100 * F32_ATOL


# --------------------------------------------------------------------------- aux_head guides


def test_aux_head_guides_train_through_train_and_evaluate(tmp_path):
    """guided.type=aux_head over a whole run: both sides' heads exist and learn, the teacher-side
    heads' label CE and the student's guided KL are recorded, and the epoch loss is the sum of its terms."""
    s = train.train_and_evaluate(_quickstart_tiny(num_epochs=2, checkpoint_every_s=0.0, **{"guided.type": "aux_head"}),
                                 str(tmp_path))
    records = _records(tmp_path)
    assert len(records) == 2
    final = records[-1]
    assert final["train/teacher/aux_ce"] > 0 and final["train/student/guided"] > 0
    terms = [k for k in final if k.startswith(("train/teacher/", "train/student/")) and not k.endswith("train_top1")]
    # (teacher/coevo_kl: the default co-evolution, loss.gamma = 1)
    assert set(terms) == {"train/teacher/ce", "train/teacher/aux_ce", "train/teacher/coevo_kl", "train/student/ce",
                          "train/student/kd", "train/student/guided"}
    assert final["train/loss"] == pytest.approx(sum(final[k] for k in terms), rel=1e-5)

    states = _checkpoint_states(tmp_path)
    assert sorted(states) == [r["step"] for r in records]  # keep=2: both epochs' checkpoints
    first, last = (states[k]["params"]["guide"] for k in sorted(states))
    # One head per stage pair on each side; resnet8/resnet8 has 3 pairs.
    assert sorted(last) == sorted([f"teacher_head{k}" for k in range(3)] + [f"student_head{k}" for k in range(3)])
    for name in last:  # every head learnt during the second epoch
        changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != b)), first[name], last[name])
        assert any(jax.tree_util.tree_leaves(changed)), name
    # The final checkpoint's teacher is the run's teacher.
    last_state = states[max(states)]
    t = {"params": last_state["params"]["teacher"], "batch_stats": last_state["batch_stats"]["teacher"]}
    assert train.tree_sha256(t) == s["teacher_params_sha256"]


# --------------------------------------------------------------------------- bfloat16


# The bfloat16 export's tolerance on the logits, relative to their size (1 + max |logit|). Both sides
# compute the same bfloat16 network, but the export bakes the variables in as constants and XLA folds
# and fuses that program differently from the jitted Flax apply (variables as arguments). Every
# conv/matmul output is rounded to bfloat16 (8 significant bits: a step of 2^-8 = 0.4% of the value),
# so a different order of the roundings moves a logit by up to a few such steps: 1e-2 allows ~2.5
# steps of the largest logit. Measured here: 6e-4 (max |diff| 1.5e-3 at logits up to 1.3). float32
# (F32_ATOL) agrees to 1e-5 instead; the float32 apply of the same weights is ~10x further off.
BF16_RTOL = 1e-2


def test_bfloat16_run_and_its_export(tmp_path):
    """dtype=bfloat16 over a whole run: the state stays float32, the saved student and its export
    compute every convolution and matmul in bfloat16, and the export equals the framework's bf16
    student within BF16_RTOL."""
    s = train.train_and_evaluate(_quickstart_tiny(dtype="bfloat16"), str(tmp_path))
    # Params, BN statistics and SGD state stay float32 (the checkpoint holds the whole state).
    (state,) = _checkpoint_states(tmp_path).values()
    for part in ("params", "batch_stats", "opt_state"):
        assert _float_dtypes(state[part]) == {np.dtype(np.float32)}, part
    meta = json.loads((tmp_path / "student" / "network.json").read_text())
    assert meta["dtype"] == "bfloat16"

    x, y = _digits_test_split()
    want, module, variables, _ = _flax_student_logits(tmp_path, x)
    assert _float_dtypes(variables) == {np.dtype(np.float32)}
    # The restored student computes in bfloat16: every convolution and matmul of its program.
    lowered = jax.jit(lambda v, x: module.apply(v, x, train=False)[0]).lower(variables, jnp.zeros((2, 8, 8, 1)))
    types = _matmul_types(lowered.as_text())
    assert len(types) == 10 and all(t == {"bf16"} for t in types)  # resnet8: 9 convs + the classifier

    info = export.export_student(tmp_path, tmp_path / "export", platforms=("cpu",), saved_model=False)
    assert info["compute_dtype"] == "bfloat16"
    got, exp = _export_logits(tmp_path / "export", x)
    assert got.dtype == np.float32
    types = _matmul_types(exp.mlir_module())
    assert len(types) == 10 and all(t == {"bf16"} for t in types)  # the export computes in bf16 too
    scale = 1.0 + float(np.max(np.abs(want)))
    np.testing.assert_allclose(got, want, rtol=0, atol=BF16_RTOL * scale)
    # Not float32 in disguise: the same weights in float32 differ from the bf16 logits by far more
    # than the export differs from them.
    f32 = models.create_model(meta["model"], meta["num_classes"])
    f32_logits = np.asarray(jax.jit(lambda v, x: f32.apply(v, _student_view(meta, x), train=False)[0])(variables, x))
    assert np.max(np.abs(f32_logits - want)) > 2 * np.max(np.abs(got - want))
    # The framework's student scores as the run's own evaluation did (a near-tie of a barely trained
    # student may flip under another program's bfloat16 rounding: 1% of the test images allowed).
    n = s["test_size"]
    assert abs(int(np.sum(want.argmax(-1) == y)) - round(s["student_top1"] * n)) <= 0.01 * n


# --------------------------------------------------------------------------- FitNet and AT


@pytest.fixture(scope="module")
def teacher_run(built_once):
    wd = built_once("scenarios_teacher", lambda wd: train.train_and_evaluate(_quickstart_tiny(method="teacher"), str(wd)))
    return wd, json.loads((wd / "summary.json").read_text())


@pytest.mark.parametrize("method,term", [("fitnet", "student/hint"), ("at", "student/at")])
def test_offline_feature_methods_after_a_teacher_run(teacher_run, tmp_path, method, term):
    """fitnet / at from a finished teacher run: the teacher is bitwise the checkpointed one (and its
    accuracy the same in every epoch), the student learns, and the method's term is recorded and > 0."""
    t_wd, t = teacher_run
    # A teacher-only run never touches its student: its digest is that of the initial student,
    # the same (seed, model, shapes) the offline run starts from.
    config = _quickstart_tiny(method=method, num_epochs=2, **{"teacher.checkpoint": str(t_wd)})
    _, _, init, _ = helpers.build(config, image_shape=(8, 8, 1), num_classes=10)
    init_student = train.tree_sha256({"params": init.params["student"], "batch_stats": init.batch_stats["student"]})
    assert t["student_params_sha256"] == init_student

    s = train.train_and_evaluate(config, str(tmp_path))
    assert s["method"] == method
    assert s["teacher_params_sha256"] == t["teacher_params_sha256"]
    assert s["student_params_sha256"] != init_student
    records = _records(tmp_path)
    assert len(records) == 2
    assert {r["teacher/top1"] for r in records} == {t["teacher_top1"]}
    assert all(r[f"train/{term}"] > 0 and r["train/student/ce"] > 0 for r in records)
    terms = [k for k in records[-1] if k.startswith("train/student/") and not k.endswith("train_top1")]
    assert sorted(terms) == sorted([f"train/{term}", "train/student/ce"])
    assert not [k for k in records[-1] if k.startswith("train/teacher/") and not k.endswith("train_top1")]


# --------------------------------------------------------------------------- export, every family


def _saved_network(workdir, name, hw=16, channels=3, num_classes=10):
    """A student/ folder as a run writes it, for an initialised network whose BN statistics have
    moved off their initial values (one train-mode pass), so that eval-mode BN is not the identity."""
    model = models.create_model(name, num_classes)
    x = jax.random.normal(jax.random.key(1), (8, hw, hw, channels))
    variables = model.init(jax.random.key(0), x, train=False)
    _, upd = model.apply(variables, x * 2.0 + 0.5, train=True, mutable=["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": upd["batch_stats"]}
    shape = [hw, hw, channels]
    meta = rundir.network_meta(name, num_classes, None, shape, shape, [0.5] * channels, [0.25] * channels,
                               data_source="synthetic")
    rundir.save_network(workdir / "student", jax.device_get(variables), meta)
    return variables


@pytest.mark.parametrize("name", ["vgg8", "MobileNetV2", "ShuffleV2", "wrn_16_1"])
def test_export_of_every_model_family(tmp_path, name):
    """One model per family of the zoo (ResNet is test_export's): the exported function equals the
    network applied by Flax to the same normalised images, at two batch sizes of one export."""
    variables = _saved_network(tmp_path, name)
    info = export.export_student(tmp_path, tmp_path / "export", platforms=("cpu",), saved_model=False, verify=False)
    assert info["model"] == name and info["input"]["shape"] == [None, 16, 16, 3]
    module = models.create_model(name, 10)
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    x = (images.astype(np.float32) / 255 - 0.5) / 0.25
    want = np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False)[0])(variables, x))
    exp = jax.export.deserialize((tmp_path / "export" / export.EXPORT_FILE).read_bytes())
    for batch in (5, 1):
        got = np.asarray(exp.call(images[:batch]))
        assert got.shape == (batch, 10) and got.dtype == np.float32
        np.testing.assert_allclose(got, want[:batch], rtol=0, atol=F32_ATOL * (1 + np.max(np.abs(want))))
    assert np.std(want) > 1e-3  # the logits vary over the images: the comparison is not of constants
