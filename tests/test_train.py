"""The trainer end to end: outputs, exact resume after SIGKILL, corrupt checkpoints, CLI errors, NaN stop."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ekd_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import quickstart  # noqa: E402

EPOCHS = 3
SUMMARY_KEYS = (
    "method teacher_model student_model data_source train_size test_size teacher_input_shape "
    "student_input_shape num_devices epochs steps teacher_top1 student_top1 best_student_top1 "
    "teacher_params_sha256 student_params_sha256 wall_s"
).split()


def tiny(**overrides):
    c = quickstart.get_config("tiny")
    c.num_epochs = EPOCHS
    c.update_from_flattened_dict(overrides)
    return c


def cli(workdir, *args, timeout=600):
    cmd = [sys.executable, "-m", "ekd_jax.main", "--config", str(REPO / "configs/quickstart.py:tiny"),
           "--workdir", str(workdir), f"--config.num_epochs={EPOCHS}", *args]
    # Same compile options as this process (conftest), so in-process and CLI runs agree bitwise.
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    return cmd, env


def run_cli(workdir, *args):
    cmd, env = cli(workdir, *args)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted CLI run, the baseline for resume comparisons."""
    wd = tmp_path_factory.mktemp("reference")
    r = run_cli(wd)
    assert r.returncode == 0, r.stderr[-3000:]
    return wd, json.loads((wd / "summary.json").read_text())


def test_quickstart_tiny_outputs(reference_run):
    wd, s = reference_run
    for k in SUMMARY_KEYS:
        assert k in s, k
    assert s["method"] == "ekd" and s["data_source"] == "digits" and s["epochs"] == EPOCHS
    assert s["teacher_input_shape"] == [8, 8, 1] and s["student_input_shape"] == [8, 8, 1]
    assert 0.0 <= s["student_top1"] <= 1.0 and 0.0 <= s["teacher_top1"] <= 1.0
    assert s["best_student_top1"] >= s["student_top1"]
    records = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    # The default teacher head start (teacher.head_start = 1.0): EPOCHS teacher-only epochs first.
    assert s["teacher_head_start_epochs"] == EPOCHS
    assert [r["epoch"] for r in records] == list(range(2 * EPOCHS))
    assert records[0]["student/top1"] == records[EPOCHS - 1]["student/top1"]  # the student waits
    assert records[-1]["student/top1"] == s["student_top1"]
    assert {"teacher/top5", "student/loss", "train/student/guided", "images_per_s"} <= set(records[-1])
    assert (wd / "curves.png").stat().st_size > 1000
    assert any((wd / "tensorboard").iterdir())
    meta = json.loads((wd / "student" / "network.json").read_text())
    assert meta["model"] == "resnet8" and meta["input_shape"] == [8, 8, 1]
    # The saved student is exactly the final one.
    model, variables, _ = train.restore_network(wd / "student")
    assert train.tree_sha256(variables) == s["student_params_sha256"]


def test_sigkill_and_resume_is_bitwise_identical(reference_run, tmp_path):
    ref_wd, ref = reference_run
    wd = tmp_path / "killed"
    cmd, env = cli(wd)
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # Kill as soon as the first checkpoint is committed, i.e. mid-run.
    while time.time() < deadline and proc.poll() is None:
        ck = wd / "checkpoints"
        if ck.exists() and any(p.name.isdigit() and (p / "commit_success.txt").exists() for p in ck.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (wd / "summary.json").exists()
    r = run_cli(wd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming after epoch" in r.stdout
    s = json.loads((wd / "summary.json").read_text())
    assert s["student_params_sha256"] == ref["student_params_sha256"]
    assert s["teacher_params_sha256"] == ref["teacher_params_sha256"]
    for k in ("teacher_top1", "student_top1", "best_student_top1", "steps"):
        assert s[k] == ref[k], k
    strip = lambda recs: [{k: v for k, v in r.items() if k != "images_per_s"} for r in recs]  # noqa: E731
    read = lambda p: [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert strip(read(wd)) == strip(read(ref_wd))


def test_corrupt_latest_checkpoint_is_reported_and_previous_used(reference_run, tmp_path, capsys):
    ref_wd, ref = reference_run
    wd = tmp_path / "corrupt"
    shutil.copytree(ref_wd, wd)
    (wd / "summary.json").unlink()
    steps = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    latest = wd / "checkpoints" / str(steps[-1])
    for f in (latest / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(os.urandom(64))
    s = train.train_and_evaluate(tiny(), str(wd))
    err = capsys.readouterr().err
    assert f"checkpoint at step {steps[-1]}" in err and "corrupt" in err
    assert (wd / "corrupt_checkpoints" / str(steps[-1])).exists()
    # Resumed from the previous epoch and recomputed the last one exactly.
    assert s["student_params_sha256"] == ref["student_params_sha256"]


def test_resume_with_a_different_config_is_refused_by_name(reference_run, tmp_path):
    ref_wd, _ = reference_run
    wd = tmp_path / "other"
    shutil.copytree(ref_wd, wd)
    (wd / "summary.json").unlink()
    with pytest.raises(ValueError, match=r"different config \(differs in loss\.alpha\)"):
        train.train_and_evaluate(tiny(**{"loss.alpha": 0.5}), str(wd))


def test_cli_override_and_typos(tmp_path):
    r = run_cli(tmp_path / "typo", "--config.metod=dml")
    assert r.returncode == 2
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert lines[-1].startswith("error: ") and "metod" in lines[-1] and "method" in lines[-1]
    assert "Traceback" not in r.stderr
    r = run_cli(tmp_path / "bad_model", "--config.student.model=resnet21")
    assert r.returncode == 2 and "error: unknown model 'resnet21'" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(tmp_path / "bad_source", "--config.data.source=npz:/nonexistent/x.npz")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "/nonexistent/x.npz" in r.stderr and "Traceback" not in r.stderr
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "ekd_jax.main", "--config", "configs/missing.py", "--workdir", str(tmp_path)],
                       env=env, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: ") and "configs/missing.py" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_override_runs_other_method(tmp_path):
    s = train.train_and_evaluate(tiny(method="dml", num_epochs=1), str(tmp_path))
    assert s["method"] == "dml" and s["teacher_top1"] is not None


def test_teacher_head_start_run(tmp_path):
    """teacher.head_start: the run is head_start x num_epochs epochs longer, the student's LR is 0
    until it starts and then its own schedule; the student still trains its full num_epochs."""
    s = train.train_and_evaluate(tiny(method="dml", num_epochs=1, **{"teacher.head_start": 1.0}), str(tmp_path))
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [0, 1]
    assert recs[0]["lr"] == 0.0 and recs[0]["teacher_lr"] > 0 and recs[1]["lr"] > 0
    assert s["epochs"] == 1 and s["teacher_head_start_epochs"] == 1 and s["steps"] == 2 * recs[0]["step"]
    # Without an online teacher there is nothing to start early: ignored, so one config serves
    # every method of a comparison.
    v = train.train_and_evaluate(tiny(method="vanilla", num_epochs=1, **{"teacher.head_start": 1.0}), str(tmp_path / "v"))
    assert v["teacher_head_start_epochs"] == 0 and v["steps"] == recs[0]["step"]
    with pytest.raises(ValueError, match=r"teacher.head_start=-1.0 must be >= 0"):
        train.train_and_evaluate(tiny(method="dml", **{"teacher.head_start": -1.0}), str(tmp_path / "n"))


def test_non_finite_loss_stops_with_step_and_term(tmp_path):
    with pytest.raises(train.NonFiniteLossError, match=r"loss term 'student/ce' became non-finite at step 0"):
        train.train_and_evaluate(tiny(**{"loss.ce_weight": float("nan"), "num_epochs": 1, "teacher.head_start": 0.0}), str(tmp_path))


def test_teacher_then_kd_keeps_teacher_fixed(tmp_path):
    t = train.train_and_evaluate(tiny(method="teacher", num_epochs=2), str(tmp_path / "teacher"))
    assert t["student_top1"] is None and t["teacher_top1"] is not None
    k = train.train_and_evaluate(
        tiny(method="kd", num_epochs=2, **{"teacher.checkpoint": str(tmp_path / "teacher")}), str(tmp_path / "kd")
    )
    records = [json.loads(line) for line in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert {r["teacher/top1"] for r in records} == {t["teacher_top1"]}
    assert k["teacher_params_sha256"] == t["teacher_params_sha256"]
    with pytest.raises(ValueError, match="holds a 'resnet8' teacher but teacher.model='resnet20'"):
        train.train_and_evaluate(
            tiny(method="kd", **{"teacher.checkpoint": str(tmp_path / "teacher"), "teacher.model": "resnet20"}),
            str(tmp_path / "kd2"),
        )


def test_schedule_multistep_and_warmup():
    c = tiny()
    c.schedule.warmup_epochs = 1.0
    sched = train.make_schedule(c, steps_per_epoch=10, total_steps=80)
    lrs = np.array([float(sched(t)) for t in range(80)])
    assert lrs[0] == pytest.approx(0.005) and lrs[9] == pytest.approx(0.05)
    assert lrs[49] == pytest.approx(0.05) and lrs[50] == pytest.approx(0.005)  # 62.5% of 80
    assert lrs[79] == pytest.approx(0.05e-3)


def test_compare_runner_writes_table_and_runs_teacher_first(tmp_path):
    from ekd_jax import compare

    results = compare.compare(tiny(num_epochs=1), ["vanilla", "kd"], [0], str(tmp_path))
    teacher = json.loads((tmp_path / "teacher_s0" / "summary.json").read_text())
    assert results["kd"][0]["teacher_params_sha256"] == teacher["teacher_params_sha256"]
    # Same data and subset for every method.
    assert results["kd"][0]["train_size"] == results["vanilla"][0]["train_size"] == teacher["train_size"]
    md = (tmp_path / "results.md").read_text()
    assert "| vanilla |" in md and "| kd |" in md
    assert (tmp_path / "results.png").stat().st_size > 1000
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["vanilla"]["student_top1"] == [results["vanilla"][0]["student_top1"]]
    # The paired difference is kd's student minus vanilla's student of the same seed.
    diff = results["kd"][0]["student_top1"] - results["vanilla"][0]["student_top1"]
    assert stored["kd"]["minus_vanilla_n"] == 1 and stored["kd"]["minus_vanilla_mean"] == pytest.approx(diff)
    # Methods without an online teacher record the head start they ran with (none), so a later
    # comparison with another head start reuses them instead of training them again.
    for run in ("vanilla_s0", "kd_s0", "teacher_s0"):
        cfg = json.loads((tmp_path / run / "summary.json").read_text())["config"]
        assert cfg["teacher"]["head_start"] == 0.0, run
    again = compare.compare(tiny(num_epochs=1, **{"teacher.head_start": 0.5}), ["vanilla"], [0], str(tmp_path))
    assert again["vanilla"][0]["wall_s"] == results["vanilla"][0]["wall_s"]  # reused, not retrained
