"""The trainer end to end: outputs, exact resume after SIGKILL, corrupt checkpoints, CLI errors, NaN stop."""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ekd_jax import rundir, schedules, train

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
    # A checkpoint after every epoch (not every 30 s): the resume tests resume from the epochs' checkpoints.
    cmd = [sys.executable, "-m", "ekd_jax.main", "--config", str(REPO / "configs/quickstart.py:tiny"),
           "--workdir", str(workdir), f"--config.num_epochs={EPOCHS}", "--config.checkpoint_every_s=0", *args]
    # XLA's optimisations ON, unlike the rest of the suite (conftest): the resume test checks the
    # program users run. In-process runs that continue these checkpoints and compare bitwise use the
    # `xla_optimizations` fixture, so that both sides compile the same way.
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_DISABLE_MOST_OPTIMIZATIONS": "0"}
    return cmd, env


# The reference run has a one-epoch teacher head start (of 1 + EPOCHS epochs), so that a kill
# after the first checkpoint resumes across the switch from the teacher-only to the joint step.
HEAD_START = ("--config.teacher.head_start=0.34",)


def run_cli(workdir, *args):
    cmd, env = cli(workdir, *args)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.fixture(scope="module")
def reference_run(built_once):
    """An uninterrupted CLI run, the baseline for resume comparisons (once for the session)."""

    def build(wd):
        r = run_cli(wd, *HEAD_START)
        assert r.returncode == 0, r.stderr[-3000:]

    wd = built_once("reference_run", build)
    return wd, json.loads((wd / "summary.json").read_text())


def test_quickstart_tiny_outputs(reference_run):
    wd, s = reference_run
    for k in SUMMARY_KEYS:
        assert k in s, k
    assert s["method"] == "ekd" and s["data_source"] == "digits" and s["epochs"] == EPOCHS
    assert s["teacher_input_shape"] == [8, 8, 1] and s["student_input_shape"] == [8, 8, 1]
    # Accuracies are counts of correct test images over the test size.
    for k in ("student_top1", "teacher_top1"):
        assert s[k] * s["test_size"] == pytest.approx(round(s[k] * s["test_size"]), abs=1e-6), k
    records = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    # One teacher-only epoch (round(0.34 x 3)), then EPOCHS joint epochs.
    assert s["teacher_head_start_epochs"] == 1
    assert [r["epoch"] for r in records] == list(range(1 + EPOCHS))
    # The waiting student has no accuracy, loss or learning rate: nothing of it is recorded.
    assert not [k for k in records[0] if "student" in k] and "lr" not in records[0]
    assert "teacher/top1" in records[0] and "train/teacher/ce" in records[0]
    assert records[-1]["student/top1"] == s["student_top1"]
    assert records[-1]["teacher/top1"] == s["teacher_top1"]
    # The best student is the first epoch of highest test accuracy in metrics.jsonl, and its
    # checkpoint is kept next to the latest checkpoint_keep=2 ones (and nothing else is).
    student_top1 = [r.get("student/top1") for r in records]
    best = max(t for t in student_top1 if t is not None)
    assert s["best_student_top1"] == best
    assert s["best_student_epoch"] == student_top1.index(best)
    kept = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    by_step = {r["step"]: r for r in records}
    assert {r["step"] for r in records[-2:]} <= set(kept) and len(kept) <= 3
    assert max(by_step[k].get("student/top1", -1.0) for k in kept) == best
    assert {"teacher/top5", "student/loss", "train/student/guided", "images_per_s"} <= set(records[-1])
    assert (wd / "curves.png").stat().st_size > 1000
    assert any((wd / "tensorboard").iterdir())
    meta = json.loads((wd / "student" / "network.json").read_text())
    assert meta["model"] == "resnet8" and meta["input_shape"] == [8, 8, 1]
    # The saved student is exactly the final one.
    model, variables, _ = rundir.restore_network(wd / "student")
    assert train.tree_sha256(variables) == s["student_params_sha256"]


def test_sigkill_and_resume_is_bitwise_identical(reference_run, tmp_path):
    ref_wd, ref = reference_run
    wd = tmp_path / "killed"
    cmd, env = cli(wd, *HEAD_START)
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
    r = run_cli(wd, *HEAD_START)
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


STEPS_PER_EPOCH = 11  # the tiny config: 359 digits, batch 32


def _stop_mid_epoch(wd, sig, epoch=3, after=2):
    """Starts the reference run's command (logging every step, two steps per call of the compiled program, so
    that there are boundaries to stop at mid-epoch), sends ``sig`` once epoch ``epoch`` (counted from 1) has
    logged step ``after``, and returns (exit status, stdout, stderr)."""
    cmd, env = cli(wd, *HEAD_START, "--config.log_every_steps=1", "--config.steps_per_call=2")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, mark = [], f"epoch {epoch} step {after}/{STEPS_PER_EPOCH}:"
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(mark):
                proc.send_signal(sig)
                break
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return proc.returncode, "".join(lines) + out, err


def _checkpoint_steps(wd) -> list[int]:
    ck = wd / "checkpoints"
    return sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists())


def test_sigterm_saves_the_step_reached_and_resume_is_bitwise_identical(reference_run, tmp_path):
    """A cluster's SIGTERM mid-epoch: the run stops at the next boundary between calls of the compiled
    program, saves a checkpoint of that very step, says so in one line, exits 143; the same command
    resumes there and ends as the uninterrupted run did, every record included -- here resumed at the
    default steps per call (16) after stopping at 2, so the calls group the steps differently."""
    ref_wd, ref = reference_run
    wd = tmp_path / "stopped"
    status, out, err = _stop_mid_epoch(wd, signal.SIGTERM)
    assert status == 143, err[-3000:]
    m = re.fullmatch(r"interrupted at step (\d+) \(epoch 3\); run the same command to resume", err.strip())
    assert m, err[-3000:]  # exactly one line on stderr: no traceback
    stopped = int(m.group(1))
    assert 2 * STEPS_PER_EPOCH + 2 <= stopped < 3 * STEPS_PER_EPOCH, stopped  # mid-epoch 3, after its 2nd step
    assert _checkpoint_steps(wd)[-1] == stopped
    assert not (wd / "summary.json").exists()

    r = run_cli(wd, *HEAD_START, "--config.log_every_steps=1")  # steps_per_call: the default
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming at step {stopped} (epoch 3, step {stopped - 2 * STEPS_PER_EPOCH + 1} of 11)" in r.stdout
    # The resumed epoch runs only its remaining steps.
    assert f"epoch 3 step {stopped - 2 * STEPS_PER_EPOCH}/11:" not in r.stdout
    s = json.loads((wd / "summary.json").read_text())
    for k in ("student_params_sha256", "teacher_params_sha256", "teacher_top1", "student_top1", "best_student_top1",
              "steps", "teacher_train_top1", "student_train_top1"):
        assert s[k] == ref[k], k
    strip = lambda recs: [{k: v for k, v in r.items() if k != "images_per_s"} for r in recs]  # noqa: E731
    read = lambda p: [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert strip(read(wd)) == strip(read(ref_wd))  # the stopped epoch's means too: its first steps were saved


@pytest.mark.parametrize("options", [("--config.steps_per_call=1",),
                                     ("--config.steps_per_call=3", "--config.data.on_device=true")], ids=["k1", "k3-on-device"])
def test_steps_per_call_and_data_on_device_do_not_change_the_run(reference_run, tmp_path, options):
    """The reference run (16 steps per call, more than its 11-step epochs) again at 1 step per call, and at 3
    with the training set on the device (batches gathered there from their indices): the same networks,
    bitwise, and every record but the speed."""
    ref_wd, ref = reference_run
    r = run_cli(tmp_path / "run", *HEAD_START, *options)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    for k in ("student_params_sha256", "teacher_params_sha256", "teacher_top1", "student_top1", "steps"):
        assert s[k] == ref[k], k
    strip = lambda recs: [{k: v for k, v in r.items() if k != "images_per_s"} for r in recs]  # noqa: E731
    read = lambda p: [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert strip(read(tmp_path / "run")) == strip(read(ref_wd))


def test_epoch_checkpoints_are_spaced_by_checkpoint_every_s(tmp_path):
    """Epochs shorter than checkpoint_every_s are not each saved (a save costs more host time than these
    epochs train): only the last epoch's checkpoint is, and a signal still saves the step reached."""
    summary = train.train_and_evaluate(tiny(checkpoint_every_s=3600.0), str(tmp_path / "wd"))
    assert _checkpoint_steps(tmp_path / "wd") == [summary["steps"]] == [EPOCHS * STEPS_PER_EPOCH]
    train.train_and_evaluate(tiny(checkpoint_every_s=0.0, num_epochs=2), str(tmp_path / "each"))
    assert _checkpoint_steps(tmp_path / "each") == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]


def test_ctrl_c_saves_the_step_reached_and_exits_130(tmp_path):
    wd = tmp_path / "stopped"
    status, out, err = _stop_mid_epoch(wd, signal.SIGINT, epoch=2, after=1)
    assert status == 130, err[-3000:]
    m = re.fullmatch(r"interrupted at step (\d+) \(epoch 2\); run the same command to resume", err.strip())
    assert m and "Traceback" not in err, err[-3000:]
    assert STEPS_PER_EPOCH < int(m.group(1)) < 2 * STEPS_PER_EPOCH
    assert _checkpoint_steps(wd) == [STEPS_PER_EPOCH, int(m.group(1))]


def test_corrupt_latest_checkpoint_is_reported_and_previous_used(reference_run, tmp_path, capsys, xla_optimizations):
    ref_wd, ref = reference_run
    wd = tmp_path / "corrupt"
    shutil.copytree(ref_wd, wd)
    (wd / "summary.json").unlink()
    steps = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    latest = wd / "checkpoints" / str(steps[-1])
    for f in (latest / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(os.urandom(64))
    s = train.train_and_evaluate(tiny(**{"teacher.head_start": 0.34}), str(wd))
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
        train.train_and_evaluate(tiny(**{"loss.alpha": 0.5, "teacher.head_start": 0.34}), str(wd))


def test_cli_override_and_typos(tmp_path):
    r = run_cli(tmp_path / "typo", "--config.metod=dml")
    assert r.returncode == 2
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert lines[-1].startswith("error: ") and "metod" in lines[-1] and "method" in lines[-1]
    assert "Traceback" not in r.stderr
    r = run_cli(tmp_path / "bad_model", "--config.student.model=resnet21")
    assert r.returncode == 2 and "error: student.model='resnet21' is not valid: unknown model" in r.stderr
    assert "did you mean 'resnet" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(tmp_path / "bad_source", "--config.data.source=npz:/nonexistent/x.npz")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "/nonexistent/x.npz" in r.stderr and "Traceback" not in r.stderr
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "ekd_jax.main", "--config", "configs/missing.py", "--workdir", str(tmp_path)],
                       env=env, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: ") and "configs/missing.py" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_override_runs_other_method(tmp_path):
    """method=dml: exactly DML's four terms are trained and recorded, the epoch's loss is their sum,
    and the summary reports the last evaluation of both networks."""
    s = train.train_and_evaluate(tiny(method="dml", num_epochs=1), str(tmp_path))
    (rec,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    terms = {k for k in rec if k.startswith("train/") and k != "train/loss" and not k.endswith("train_top1")}
    assert s["method"] == "dml"
    assert terms == {"train/teacher/ce", "train/teacher/dml", "train/student/ce", "train/student/dml"}
    assert all(rec[k] > 0 for k in terms)
    assert rec["train/loss"] == pytest.approx(sum(rec[k] for k in terms), rel=1e-5)
    assert (s["teacher_top1"], s["student_top1"]) == (rec["teacher/top1"], rec["student/top1"])


def test_default_is_a_simultaneous_start(tmp_path):
    """METHOD.md item 1: by default teacher and student start together, from scratch."""
    s = train.train_and_evaluate(tiny(num_epochs=1), str(tmp_path))
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert s["teacher_head_start_epochs"] == 0 and [r["epoch"] for r in recs] == [0]
    assert "student/top1" in recs[0] and "train/student/guided" in recs[0] and "teacher_lr" not in recs[0]


def test_teacher_head_start_run(tmp_path, capsys):
    """teacher.head_start: the run is head_start x num_epochs epochs longer; the waiting student has
    no lr, loss or accuracy recorded or printed; then it trains its full num_epochs on its own schedule."""
    s = train.train_and_evaluate(tiny(method="dml", num_epochs=1, **{"teacher.head_start": 1.0}), str(tmp_path))
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [0, 1]
    assert "lr" not in recs[0] and recs[0]["teacher_lr"] > 0 and recs[1]["lr"] > 0
    assert not [k for k in recs[0] if "student" in k], recs[0]
    assert {"student/top1", "train/student/ce", "train/student/dml"} <= set(recs[1])
    # The teacher's training loss during the head start is its CE alone.
    assert recs[0]["train/loss"] == pytest.approx(recs[0]["train/teacher/ce"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ") and "|" in line]
    assert "student" not in lines[0] and "teacher top-1" in lines[0] and "student top-1" in lines[1]
    assert s["best_student_epoch"] == 1
    assert s["epochs"] == 1 and s["teacher_head_start_epochs"] == 1 and s["steps"] == 2 * recs[0]["step"]
    # Without an online teacher there is nothing to start early: ignored, so one config serves
    # every method of a comparison.
    v = train.train_and_evaluate(tiny(method="vanilla", num_epochs=1, **{"teacher.head_start": 1.0}), str(tmp_path / "v"))
    assert v["teacher_head_start_epochs"] == 0 and v["steps"] == recs[0]["step"]
    with pytest.raises(ValueError, match=r"teacher.head_start=-1.0 is not valid: a fraction of num_epochs >= 0"):
        train.train_and_evaluate(tiny(method="dml", **{"teacher.head_start": -1.0}), str(tmp_path / "n"))


def test_non_finite_loss_stops_with_step_and_term(tmp_path):
    # A learning rate that sends the parameters to inf within a few steps (a NaN weight is refused
    # up front); the first non-finite term is named with its step.
    with pytest.raises(train.NonFiniteLossError, match=r"loss term '[a-z/_]+' became non-finite at step [1-9]"):
        train.train_and_evaluate(tiny(**{"optimizer.learning_rate": 1e30, "num_epochs": 1}), str(tmp_path))


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
    """Every schedule warms up the same way (linear from 0, optax), milestones stay at their
    fractions of the whole run, and milestones that would merge at this length are refused."""
    c = tiny(**{"optimizer.learning_rate": 0.05})
    c.schedule.warmup_epochs = 1.0
    sched = schedules.make_schedule(c, steps_per_epoch=10, total_steps=80)
    lrs = np.array([float(sched(t)) for t in range(80)])
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.025) and lrs[10] == pytest.approx(0.05)
    assert lrs[49] == pytest.approx(0.05) and lrs[50] == pytest.approx(0.005)  # 62.5% of 80
    assert lrs[79] == pytest.approx(0.05e-3)
    c.schedule.name = "cosine"
    cos = np.array([float(schedules.make_schedule(c, 10, 80)(t)) for t in range(81)])
    np.testing.assert_allclose(cos[:11], lrs[:11], rtol=1e-6)  # the same warm-up
    assert cos[80] == pytest.approx(0.0, abs=1e-9) and np.all(np.diff(cos[10:]) <= 1e-9)
    c.schedule.name, c.schedule.warmup_epochs = "multistep", 0.0
    with pytest.raises(ValueError, match=r"schedule.milestones=\(0.625, 0.75, 0.875\) fall on the same step"):
        schedules.make_schedule(c, steps_per_epoch=1, total_steps=3)


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
    # --reuse: another workdir takes the finished runs of the same config (kd with its teacher)
    # instead of training them; a run whose config differs is trained, and the donor is untouched.
    other = tmp_path / "other"
    moved = compare.compare(tiny(num_epochs=1), ["vanilla", "kd"], [0], str(other), reuse=[str(tmp_path)])
    assert moved["kd"][0]["wall_s"] == results["kd"][0]["wall_s"]
    assert (other / "teacher_s0" / "teacher").is_dir() and not (other / "kd_s0" / "checkpoints").exists()
    # kd's config names its teacher's folder: taken because the two teachers hash equal, recorded
    # with this workdir's teacher (so the next comparison here reuses it) and where it came from.
    kd = json.loads((other / "kd_s0" / "summary.json").read_text())
    assert kd["config"]["teacher"]["checkpoint"] == str(other / "teacher_s0")
    assert kd["copied_from"] == str(tmp_path / "kd_s0")
    again = compare.compare(tiny(num_epochs=1), ["kd"], [0], str(other))
    assert again["kd"][0]["wall_s"] == results["kd"][0]["wall_s"]
    fresh = compare.compare(tiny(num_epochs=1, seed=1), ["vanilla"], [1], str(tmp_path / "third"), reuse=[str(tmp_path)])
    assert fresh["vanilla"][0]["config"]["seed"] == 1 and (tmp_path / "third" / "vanilla_s1" / "checkpoints").is_dir()
    # The teacher alone ignores the student's view: a low-resolution comparison reuses the
    # full-resolution teacher (recorded at x1) and trains only what does see the low-res view.
    low = compare.compare(tiny(num_epochs=1, **{"data.student_downsample": 2}), ["kd"], [0], str(tmp_path / "low"),
                          reuse=[str(tmp_path)])
    t_low = json.loads((tmp_path / "low" / "teacher_s0" / "summary.json").read_text())
    assert t_low["copied_from"] == str(tmp_path / "teacher_s0") and t_low["config"]["data"]["student_downsample"] == 1
    assert low["kd"][0]["config"]["data"]["student_downsample"] == 2 and "copied_from" not in low["kd"][0]
    # What makes that valid: the student's low-resolution view changes nothing the teacher alone
    # sees, so a teacher trained at x2 ends bit for bit equal to the x1 one.
    x2 = train.train_and_evaluate(tiny(method="teacher", num_epochs=1, **{"data.student_downsample": 2}),
                                  str(tmp_path / "teacher_x2"))
    assert x2["teacher_params_sha256"] == t_low["teacher_params_sha256"] == results["kd"][0]["teacher_params_sha256"]
    # Records carried without weights (benchmarks/study_runs.py into a new checkout): kd's finished
    # record is kept and its teacher is not trained again (nothing needs its weights) ...
    carried = tmp_path / "carried"
    for run in ("teacher_s0", "kd_s0"):
        (carried / run).mkdir(parents=True)
        for name in ("summary.json", "metrics.jsonl"):
            shutil.copy2(tmp_path / run / name, carried / run / name)
    for run in ("teacher_s0", "kd_s0"):  # the records name the folder they were trained in
        summary = json.loads((carried / run / "summary.json").read_text())
        if run == "kd_s0":
            summary["config"]["teacher"]["checkpoint"] = str(carried / "teacher_s0")
        (carried / run / "summary.json").write_text(json.dumps(summary))
    back = compare.compare(tiny(num_epochs=1), ["kd"], [0], str(carried))
    assert back["kd"][0]["wall_s"] == results["kd"][0]["wall_s"]  # kd itself reused from its record
    kept = json.loads((carried / "teacher_s0" / "summary.json").read_text())
    assert kept["wall_s"] == teacher["wall_s"] and not (carried / "teacher_s0" / "teacher").exists()
    # ... but a kd that still has to train gets its teacher trained again, to the same weights.
    shutil.rmtree(carried / "kd_s0")
    again = compare.compare(tiny(num_epochs=1), ["kd"], [0], str(carried))
    retrained = json.loads((carried / "teacher_s0" / "summary.json").read_text())
    assert (carried / "teacher_s0" / "teacher" / "network.json").exists()
    assert retrained["wall_s"] != teacher["wall_s"] and retrained["teacher_params_sha256"] == teacher["teacher_params_sha256"]
    assert again["kd"][0]["student_params_sha256"] == results["kd"][0]["student_params_sha256"]
