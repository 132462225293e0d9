"""ekd_jax.export and ekd_jax.evaluate on real (tiny) training runs.

Two runs are trained once for the session (conftest's ``built_once``): the quickstart ``:tiny`` EKD run, and a student-only run whose
student sees a x2 low-resolution view (``native``: the network is fed 4x4, the export takes 8x8), so
the degradation baked into the export is checked too.
"""

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from ekd_jax import data, evaluate, export, rundir, train
from ekd_jax.spec.validate import validate_data

ROOT = pathlib.Path(__file__).resolve().parents[1]
ATOL = 1e-5


def _quickstart(arg):
    spec = importlib.util.spec_from_file_location("quickstart_config", ROOT / "configs" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _train(built_once, name, **overrides):
    """A finished run of the tiny config (trained once for the session; read-only to the tests)."""
    config = _quickstart("tiny")
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    workdir = built_once(f"export_run_{name}", lambda wd: train.train_and_evaluate(config, str(wd)))
    return {"workdir": workdir, "config": config, "summary": json.loads((workdir / "summary.json").read_text())}


@pytest.fixture(scope="module")
def tiny_run(built_once):
    return _train(built_once, "tiny")


@pytest.fixture(scope="module")
def lowres_run(built_once):
    return _train(
        built_once, "lowres", method="vanilla", num_epochs=1,
        **{"data.student_downsample": 2, "data.lowres_mode": "native"},
    )


def _export(run, built_once, name):
    out = built_once(f"export_{name}", lambda out: export.export_student(run["workdir"], out))
    return run, json.loads((out / export.META_FILE).read_text()), out


@pytest.fixture(scope="module")
def tiny_export(tiny_run, built_once):
    return _export(tiny_run, built_once, "tiny")


@pytest.fixture(scope="module")
def lowres_export(lowres_run, built_once):
    return _export(lowres_run, built_once, "lowres")


@pytest.fixture(scope="module", params=["tiny", "lowres"])
def exported(request):
    """(run, export.json dict, out dir): both forms exported from one run."""
    return request.getfixturevalue(f"{request.param}_export")


@pytest.fixture(scope="module")
def digits_test_split(tiny_run):
    ds = data.load(validate_data(tiny_run["config"].data))
    return ds.x_test, ds.y_test


def _flax_logits(run, images):
    """The reference: the saved student, fed the run's evaluation view, independently of ekd_jax.export."""
    module, variables, meta = rundir.restore_network(run["workdir"] / "student")
    _, student_x = data.make_views(images, None, run["config"].data, meta["mean"], meta["std"], train=False)
    logits, _ = module.apply(variables, student_x, train=False)
    return np.asarray(logits)


def test_export_files_and_metadata(exported):
    run, info, out = exported
    summary, meta = run["summary"], json.loads((run["workdir"] / "student" / "network.json").read_text())
    assert (out / export.EXPORT_FILE).is_file()
    assert (out / export.SAVED_MODEL_DIR / "saved_model.pb").is_file()
    assert json.loads((out / export.META_FILE).read_text()) == json.loads(json.dumps(info))
    assert info["model"] == run["config"].student.model
    assert info["input"]["shape"] == [None, *meta["raw_image_shape"]] == [None, 8, 8, 1]
    assert info["input"]["dtype"] == "uint8"
    assert info["output"]["shape"] == [None, 10]
    assert info["class_names"] == [str(i) for i in range(10)]
    assert info["student_top1"] == summary["student_top1"]
    assert info["preprocessing_inside"]["student_downsample"] == run["config"].data.student_downsample
    assert info["preprocessing_inside"]["network_input_shape"] == summary["student_input_shape"]
    assert all(d is not None and d < ATOL for d in info["verified_max_abs_diff"].values())
    exp = jax.export.deserialize((out / export.EXPORT_FILE).read_bytes())
    assert [str(d) for d in exp.in_avals[0].shape] == ["b", "8", "8", "1"]
    assert str(exp.in_avals[0].dtype) == "uint8" and str(exp.out_avals[0].dtype) == "float32"


def test_both_forms_reproduce_the_flax_student(exported, digits_test_split):
    import tensorflow as tf

    run, _, out = exported
    exp = jax.export.deserialize((out / export.EXPORT_FILE).read_bytes())
    serving = tf.saved_model.load(str(out / export.SAVED_MODEL_DIR)).signatures["serving_default"]
    for batch in (37, 1):  # one export, any batch size
        x = digits_test_split[0][:batch]
        want = _flax_logits(run, x)
        got_jax = np.asarray(exp.call(x))
        got_tf = serving(images=tf.constant(x))["logits"].numpy()
        assert got_jax.shape == got_tf.shape == want.shape == (batch, 10)
        assert got_jax.dtype == got_tf.dtype == np.float32
        np.testing.assert_allclose(got_jax, want, rtol=0, atol=ATOL)
        np.testing.assert_allclose(got_tf, want, rtol=0, atol=ATOL)


# Run before anything else in the subprocess: makes ekd_jax and the training stack unimportable
# although they are on its path, and records every attempt to import them.
BLOCK_IMPORTS = """
import importlib.util, sys
BLOCKED = ("ekd_jax", "flax", "optax", "orbax", "tensorflow")
# They can be imported here: the block below, not a missing path, is what keeps them out.
assert all(importlib.util.find_spec(m) is not None for m in BLOCKED[:4]), sys.path
attempts = []

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempts.append(name)
            raise ImportError(f"{name} is blocked by the test")
        return None

sys.meta_path.insert(0, Block())
try:
    import ekd_jax
except ImportError:
    pass
else:
    raise SystemExit("the import block does not work")
attempts.clear()
"""


def test_export_runs_without_ekd_jax_and_matches_summary(tiny_export, digits_test_split, tmp_path):
    run, _, out = tiny_export
    x, y = digits_test_split
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    script = BLOCK_IMPORTS + textwrap.dedent(
        f"""
        import json
        import jax, numpy as np
        x, y = np.load({str(tmp_path / 'x.npy')!r}), np.load({str(tmp_path / 'y.npy')!r})
        exp = jax.export.deserialize(open({str(out / export.EXPORT_FILE)!r}, "rb").read())
        logits = np.concatenate([np.asarray(exp.call(x[i:i + 100])) for i in range(0, len(x), 100)])
        print(json.dumps({{"correct": int(np.sum(logits.argmax(-1) == y)), "n": len(y), "attempts": attempts,
                          "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}}))
        """
    )
    # ekd_jax (the repository) and the venv's flax/optax/orbax are on the subprocess's path.
    # Without the suite's compilation cache (conftest): JAX's cache code may try optional imports
    # (etils, tensorflow's gfile) that a user loading an artifact never makes.
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    # Loading and running the artifact never even tried to import them.
    assert res["attempts"] == [] and res["loaded"] == []
    summary = json.loads((run["workdir"] / "summary.json").read_text())
    assert res["n"] == summary["test_size"]
    assert res["correct"] == round(summary["student_top1"] * summary["test_size"])


@pytest.mark.parametrize("which_run", ["tiny_run", "lowres_run"])
def test_evaluate_matches_summary(request, which_run, tmp_path):
    run = request.getfixturevalue(which_run)
    workdir, summary = shutil.copytree(run["workdir"], tmp_path / "run"), run["summary"]  # evaluate writes into it
    result = evaluate.evaluate_run(workdir)
    n = summary["test_size"]
    assert result["test_size"] == n
    expected = ("teacher", "student") if summary["teacher_top1"] is not None else ("student",)
    assert [w for w in ("teacher", "student") if w in result] == list(expected)
    for who in expected:
        assert round(result[who]["top1"] * n) == round(summary[f"{who}_top1"] * n), who
        assert round(result[who]["top5"] * n) == round(summary[f"{who}_top5"] * n), who
        assert pathlib.Path(result[who]["confusion_png"]).is_file()
    assert (workdir / "confusion_student.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((workdir / evaluate.RESULT_FILE).read_text())["student"]["top1"] == result["student"]["top1"]


def _cli(module, *args, env=None):
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", **(env or {})},
    )


def test_evaluate_cli(tiny_run, tmp_path):
    workdir = shutil.copytree(tiny_run["workdir"], tmp_path / "run")  # evaluate writes into it
    proc = _cli("ekd_jax.evaluate", f"--workdir={workdir}", "--noplot", "--config.data.source=digits")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["student"]["top1"] == pytest.approx(tiny_run["summary"]["student_top1"])
    assert "student resnet8: top-1" in proc.stdout


@pytest.mark.parametrize(
    "module,args,message",
    [
        ("ekd_jax.export", ["--workdir=/nonexistent/run"], "has no trained student"),
        ("ekd_jax.evaluate", ["--workdir=/x", "--config.data.flip=false"], "evaluate accepts only"),
    ],
)
def test_cli_errors_are_one_line(module, args, message):
    proc = _cli(module, *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


@pytest.fixture
def no_tensorflow(tmp_path):
    """PYTHONPATH that makes `import tensorflow` fail, as on a machine without TensorFlow."""
    fake = tmp_path / "no_tf" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named tensorflow (blocked by the test)')\n")
    return {"PYTHONPATH": str(fake.parent)}


def test_export_cli_works_without_tensorflow(tiny_run, tmp_path, no_tensorflow):
    out = tmp_path / "out"
    args = [f"--workdir={tiny_run['workdir']}", f"--out={out}", "--platforms=cpu"]
    proc = _cli("ekd_jax.export", *args, "--nosaved_model", env=no_tensorflow)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["platforms"] == ["cpu"] and info["files"]["saved_model"] is None
    assert (out / export.EXPORT_FILE).is_file() and not (out / export.SAVED_MODEL_DIR).exists()
    # Asking for the SavedModel without TensorFlow: one line that says what to do.
    proc = _cli("ekd_jax.export", *args, env=no_tensorflow)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: the SavedModel needs TensorFlow"), proc.stderr[-2000:]
    assert "--nosaved_model" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_export_rejects_a_run_without_student(tmp_path):
    with pytest.raises(ValueError, match="no trained student"):
        export.export_student(tmp_path)
    with pytest.raises(ValueError, match="holds no finished run"):
        evaluate.evaluate_run(tmp_path)
