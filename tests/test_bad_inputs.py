"""Bad input is refused before any work: one ``error:`` line that names the option and the fix,
exit status 2, no traceback, nothing trained (project issue 13, item 2).

``CASES``: every case runs the real command line in its own subprocess
(``python -m ekd_jax.main --config configs/quickstart.py:tiny --workdir ...``, or
``ekd_jax.evaluate`` / ``ekd_jax.export``). Each must:

* exit with status 2 and print exactly one non-empty line on stderr, ``error: ...``, naming the
  offending option, path or flag (no other library's output, no traceback), nothing on stdout;
* compile nothing (run with JAX_LOG_COMPILES=1: a "Compiling" line fails the case) and write
  nothing: no ``checkpoints/``, everything the test prepared (a stored run's checkpoints
  included) stays as it was. A config error is refused before the workdir is even created
  (``spec.validate.validate`` runs first); one that needs the data (npz contents, class sizes) may leave
  the workdir that ``rundir.prepare`` made, empty.

``VALIDATE_CASES``: the rest of the config values, in-process through ``spec.validate.validate`` (the
function the command line calls first), to keep the file fast: each raises one ValueError line
naming the option.

Mechanisms for the workdir cases, which must also work as root (where ``chmod`` stops nothing):
an unwritable folder is a ``chmod 500`` parent entered as an unmapped user (``unshare --user``)
when root, else a monkeypatched ``mkdir`` raising EACCES; a full disk is a monkeypatched
``Path.write_bytes`` raising ENOSPC, and a real 8 KiB tmpfs, filled up, in a private mount
namespace (``unshare --user --map-root-user --mount``; skipped where that is not allowed).

Two slower tests train for real: a tmpfs too small for a checkpoint (refused before the first
save starts, one line naming the path, exit 2), and a run SIGKILLed while an Orbax save is in
flight (``<step>.orbax-checkpoint-tmp`` left behind), which resumes from the last committed
checkpoint, calls nothing corrupt and finishes (exit 0).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from typing import Callable

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/quickstart.py:tiny"
TIMEOUT = 300


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    # What a user's shell has: not the quiet-logs setting the suite's conftest gives the workers.
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


def _run(argv: list[str], prefix: list[str] = (), env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *argv], env=env or _env(), cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)


@functools.lru_cache(maxsize=None)
def _can(*cmd: str) -> bool:
    try:
        return subprocess.run(list(cmd), capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _private_mounts() -> bool:
    """Whether this machine lets us mount a tmpfs in a private user + mount namespace."""
    return _can("unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                'd=$(mktemp -d) && mount -t tmpfs -o size=8k tmpfs "$d"; rc=$?; umount "$d"; rmdir "$d"; exit $rc')


# Runs a module's command line with a monkeypatch applied first: python -c PATCHED <patch> <module> <args...>
PATCHED = textwrap.dedent(
    """
    import errno, os, pathlib, runpy, sys
    patch, module = sys.argv[1], sys.argv[2]
    def refuse(code):
        def f(self, *a, **k):
            raise OSError(code, os.strerror(code), str(self))
        return f
    if patch == "enospc_write":
        pathlib.Path.write_bytes = refuse(errno.ENOSPC)
    elif patch == "eacces_mkdir":
        pathlib.Path.mkdir = refuse(errno.EACCES)
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    """
)


# --------------------------------------------------------------------------- preparing files


def _npz(tmp: pathlib.Path, name="d.npz", drop=(), **over) -> str:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8),
        "y_train": np.repeat(np.arange(4), 10).astype(np.int32),
        "x_test": rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8),
        "y_test": np.repeat(np.arange(4), 3).astype(np.int32),
    }
    arrays.update(over)
    for k in drop:
        arrays.pop(k)
    np.savez(tmp / name, **arrays)
    return str(tmp / name)


def _write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _network_json(tmp: pathlib.Path, which: str, **over) -> pathlib.Path:
    meta = {"model": "resnet8", "num_classes": 10, "input_shape": [8, 8, 1], "raw_image_shape": [8, 8, 1],
            "mean": [0.3], "std": [0.4], "student_downsample": 1, "lowres_mode": "upsample", "dtype": "float32",
            "class_names": None, "data_source": "digits", **over}
    return _write(tmp / "run" / which / "network.json", json.dumps(meta))


def _tiny_config():
    sys.path.insert(0, str(REPO / "configs"))
    import quickstart

    return quickstart.get_config("tiny")


def _tiny_config_json(**over) -> dict:
    c = _tiny_config()
    c.update_from_flattened_dict(over)
    return json.loads(c.to_json_best_effort())


def _fake_checkpoint(wd: pathlib.Path, config_json: dict) -> None:
    """A committed Orbax checkpoint at step 3 holding a toy state and the given run config."""
    import jax.numpy as jnp

    from ekd_jax import checkpoint

    with checkpoint.Checkpointer(wd) as ck:
        ck.save(3, {"x": jnp.ones(3)}, {"epoch": 0, "best": {"student/top1": 0.1, "epoch": 0}, "config": config_json}, 0.1)


# --------------------------------------------------------------------------- slower: real training
# (first in the file: pytest-xdist starts them first, next to the table's cases)


# The two real runs: one network, 2 steps an epoch, XLA's optimisations off (as in conftest):
# compiling dominates, and neither property depends on the optimised program.
# A checkpoint after every epoch (not every 30 s): the interrupted-save tests need the first epoch's.
LEAN = ("--config.method=vanilla", "--config.data.train_fraction=0.05", "--config.checkpoint_every_s=0")


def _main(wd, *args):
    return [sys.executable, "-m", "ekd_jax.main", "--config", CONFIG, "--workdir", str(wd), *LEAN, *args]


def _lean_env() -> dict:
    return {**_env(), "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


def _steps(ck: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) if ck.exists() else []


@pytest.mark.skipif(not _private_mounts(), reason="no private tmpfs mounts here")
def test_disk_too_small_for_a_checkpoint_is_one_error_line(tmp_path):
    """A 512 KiB tmpfs holds the workdir's probe and metrics but no checkpoint (~1 MB): the first
    save is refused before Orbax starts it, in one line naming the path, exit 2."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = 'mount -t tmpfs -o size=512k tmpfs "$0" && "$@"; rc=$?; ls -a "$0/wd" "$0/wd/checkpoints" >&2; exit $rc'
    r = _run(_main(mnt / "wd"), ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(mnt)], _lean_env())
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    err = [line for line in lines if line.startswith("error: ")]
    assert r.returncode == 2, r.stderr[-4000:]
    assert "Traceback" not in r.stderr, r.stderr[-4000:]
    assert len(err) == 1 and "no space left" in err[0].lower() and str(mnt / "wd" / "checkpoints") in err[0], lines
    # Our error line first, then only the listing of the workdir: no half-written step.
    assert lines.index(err[0]) == 0, lines
    listing = lines[1:]
    assert not [p for p in listing if "orbax-checkpoint-tmp" in p or p.isdigit()], listing


def test_interrupted_async_save_resumes_from_the_last_committed_checkpoint(tmp_path):
    """A run killed while its last Orbax save is in flight leaves ``<step>.orbax-checkpoint-tmp``:
    the rerun resumes after the last committed epoch, calls nothing corrupt and finishes (exit 0)."""
    wd, ck = tmp_path / "wd", tmp_path / "wd" / "checkpoints"
    proc = subprocess.Popen(_main(wd), env=_lean_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, killed_in_flight = time.time() + TIMEOUT, False
    try:
        while time.time() < deadline and proc.poll() is None:
            if ck.exists() and _steps(ck) and any("orbax-checkpoint-tmp" in p.name for p in ck.iterdir()):
                proc.send_signal(signal.SIGKILL)
                killed_in_flight = True
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None and not killed_in_flight:
            proc.kill()
        proc.wait()
    committed = _steps(ck)
    assert committed, "no committed checkpoint"
    tmp_dirs = [p for p in ck.iterdir() if "orbax-checkpoint-tmp" in p.name]
    if not (killed_in_flight and tmp_dirs):
        # The save finished before the kill landed (a race we cannot always win): leave the same
        # trace an interrupted save of the last step leaves, a half-written temporary folder.
        last = ck / str(committed[-1])
        half = ck / f"{committed[-1]}.orbax-checkpoint-tmp"
        shutil.move(str(last), half)
        for f in half.rglob("*"):
            if f.is_file():
                f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
        (half / "commit_success.txt").unlink(missing_ok=True)
        for p in ("summary.json", "student", "teacher"):
            shutil.rmtree(wd / p, ignore_errors=True) if (wd / p).is_dir() else (wd / p).unlink(missing_ok=True)
        committed = _steps(ck)
    assert not (wd / "summary.json").exists()
    r = _run(_main(wd), env=_lean_env())
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"resuming after epoch 1 (step {committed[-1]})" in r.stdout, r.stdout[-2000:]
    assert "corrupt" not in r.stderr.lower() and "Traceback" not in r.stderr, r.stderr[-4000:]
    # At most Orbax's own warning that it replaces the unfinished temporary folder of that step.
    others = [line for line in r.stderr.splitlines() if line.strip() and not re.match(r"^W\d{4} .* atomicity\.py:\d+\] ", line)]
    assert not others, r.stderr[-4000:]
    assert not (wd / "corrupt_checkpoints").exists()
    assert committed[-1] in _steps(ck) and _steps(ck)[-1] == 2 * committed[-1]
    s = json.loads((wd / "summary.json").read_text())
    assert s["steps"] == 2 * committed[-1]
    print(f"killed while the save was in flight: {killed_in_flight and bool(tmp_dirs)}")


# --------------------------------------------------------------------------- the table


@dataclasses.dataclass
class Case:
    args: tuple[str, ...]  # after the module's fixed arguments; {tmp} and {wd} are filled in
    names: tuple[str, ...]  # what the error line must contain (the option, the path, the value)
    prep: Callable[[pathlib.Path], object] | None = None  # writes the files the case needs
    module: str = "ekd_jax.main"
    early: bool = True  # refused before the workdir is created
    fixed: tuple[str, ...] | None = None  # the module's arguments (default: --config tiny --workdir {wd})
    patch: str | None = None  # a monkeypatch applied before the module runs (PATCHED)
    wrap: str | None = None  # 'unwritable' or 'full_tmpfs': a real mechanism around the command


def C(*args, names, **kw) -> Case:
    return Case(tuple(args), tuple(names), **kw)


MAIN = ("--config", CONFIG, "--workdir", "{wd}")
EVAL = ("--workdir", "{tmp}/run")

CASES = {
    # ---- config values (spec.validate: refused before the workdir exists)
    "num_epochs_0": C("--config.num_epochs=0", names=["num_epochs=0", "--config.num_epochs"]),
    "num_epochs_not_a_number": C("--config.num_epochs=abc", names=["num_epochs", "abc"]),
    "num_epochs_float": C("--config.num_epochs=2.5", names=["num_epochs", "2.5"]),
    "tau_0": C("--config.loss.tau=0", names=["loss.tau=0", "--config.loss.tau"]),
    "stage_weights_count": C("--config.loss.stage_weights=(1.0,1.0,1.0,1.0,1.0)",
                             names=["loss.stage_weights", "(3)", "--config.loss.stage_weights"]),
    "guided_stages_out_of_range": C("--config.guided.stages=(0,7)", names=["guided.stages=(0, 7)", "--config.guided.stages"]),
    "hint_stage_out_of_range": C("--config.method=fitnet", "--config.teacher.checkpoint={tmp}/run",
                                 "--config.guided.hint_stage=5", names=["guided.hint_stage=5", "--config.guided.hint_stage"],
                                 prep=lambda t: _network_json(t, "teacher")),
    "method_unknown": C("--config.method=ekdd", names=["method", "ekdd", "'ekd'"]),
    "model_typo": C("--config.teacher.model=resnet2O", names=["teacher.model='resnet2O'", "resnet20"]),
    "config_key_typo": C("--config.loss.tua=2", names=["--config.loss.tua", "'loss.tau'"]),
    "config_block_typo": C("--config.optimiser.momentum=0.5", names=["--config.optimiser.momentum", "'optimizer'"]),
    "bool_not_a_bool": C("--config.data.flip=maybe", names=["--config.data.flip", "maybe"]),
    # ---- the command line itself
    "missing_workdir": C(names=["--workdir"], fixed=("--config", CONFIG)),
    "empty_workdir": C(names=["--workdir"], fixed=("--config", CONFIG, "--workdir=")),
    "missing_config": C(names=["--config"], fixed=("--workdir", "{wd}")),
    "config_file_missing": C(names=["configs/nope.py"], fixed=("--config", "configs/nope.py", "--workdir", "{wd}")),
    "config_file_raises": C(names=["{tmp}/bad_config.py", "RuntimeError", "broken on purpose", "line 2"],
                            fixed=("--config", "{tmp}/bad_config.py", "--workdir", "{wd}"),
                            prep=lambda t: _write(t / "bad_config.py",
                                                  "def get_config():\n    raise RuntimeError('broken on purpose')\n")),
    "config_argument_unknown": C(names=["'huge'", ":tiny"], fixed=("--config", "configs/quickstart.py:huge", "--workdir", "{wd}")),
    "unknown_flag": C("--epochs=3", names=["epochs"]),
    "stray_argument": C("3", names=["unexpected arguments", "'3'"]),
    # ---- method / model / stage combinations
    "kd_without_teacher_checkpoint": C("--config.method=kd", names=["--config.teacher.checkpoint", "'kd'"]),
    "kd_checkpoint_without_teacher": C("--config.method=kd", "--config.teacher.checkpoint={tmp}",
                                       names=["teacher.checkpoint='{tmp}'", "network.json is missing"]),
    "kd_teacher_of_another_model": C("--config.method=kd", "--config.teacher.checkpoint={tmp}/run",
                                     names=["teacher.model='resnet8'", "'resnet20'", "--config.teacher.model=resnet20"],
                                     prep=lambda t: _network_json(t, "teacher", model="resnet20")),
    # ---- data
    "tfds_unknown_dataset": C("--config.data.source=tfds:no_such_dataset_xyz", names=["data.source='tfds:", "no_such_dataset_xyz"],
                              early=False),
    "npz_missing": C("--config.data.source=npz:{tmp}/none.npz", names=["data.source", "{tmp}/none.npz", "not found"]),
    "npz_not_a_zip": C("--config.data.source=npz:{tmp}/junk.npz", names=["data.source", "junk.npz", "np.savez"], early=False,
                       prep=lambda t: _write(t / "junk.npz", "not a zip archive")),
    "npz_missing_arrays": C("--config.data.source=npz:{tmp}/d.npz", names=["data.source", "missing arrays", "y_test"],
                            early=False, prep=lambda t: _npz(t, drop=("y_test",))),
    "npz_float_images": C("--config.data.source=npz:{tmp}/d.npz", names=["x_train", "uint8", "float64"], early=False,
                          prep=lambda t: _npz(t, x_train=np.zeros((40, 8, 8, 1)))),
    "npz_labels_wrong_length": C("--config.data.source=npz:{tmp}/d.npz", names=["y_train", "39 labels", "40 images"],
                                 early=False, prep=lambda t: _npz(t, y_train=np.arange(39) % 4)),
    "samples_per_class_too_many": C("--config.data.samples_per_class=500", "--config.data.train_fraction=1.0",
                                    names=["samples_per_class=500", "at most"], early=False),
    "batch_larger_than_data": C("--config.batch_size=5000", names=["batch_size", "5000"], early=False),
    # ---- workdir
    "workdir_is_a_file": C(names=["--workdir", "is a file"], prep=lambda t: _write(t / "wd", "x")),
    "workdir_below_a_file": C(names=["--workdir", "{tmp}/f is a file"], fixed=("--config", CONFIG, "--workdir", "{tmp}/f/sub"),
                              prep=lambda t: _write(t / "f", "x")),
    "workdir_unwritable": C(names=["--workdir", "{tmp}/locked/wd", "Permission denied"],
                            fixed=("--config", CONFIG, "--workdir", "{tmp}/locked/wd"), wrap="unwritable"),
    "workdir_disk_full_patched": C(names=["--workdir", "the disk is full"], patch="enospc_write", early=False),
    "workdir_disk_full_tmpfs": C(names=["--workdir", "the disk is full"], fixed=("--config", CONFIG, "--workdir", "{tmp}/mnt/wd"),
                                 wrap="full_tmpfs", early=False),
    # ---- resume: checkpoints of another config are refused by key, and every one stays in place
    "resume_other_config": C(names=["--workdir", "different config", "differs in num_epochs"], early=False,
                             prep=lambda t: _fake_checkpoint(t / "wd", _tiny_config_json(num_epochs=5))),
    # ---- evaluate and export
    "evaluate_unfinished_run": C(names=["{tmp}/run", "summary.json"], module="ekd_jax.evaluate", fixed=EVAL, early=False,
                                 prep=lambda t: (t / "run" / "checkpoints").mkdir(parents=True)),
    "evaluate_unknown_override": C("--config.data.image_size=4", names=["--config.data.image_size", "--config.data.source"],
                                   module="ekd_jax.evaluate", fixed=EVAL),
    "export_unknown_platform": C("--platforms=cpu,gpu", names=["--platforms", "'gpu'"], module="ekd_jax.export", fixed=EVAL,
                                 early=False, prep=lambda t: _network_json(t, "student")),
    "export_out_is_a_file": C("--out={tmp}/out", names=["--out", "is a file"], module="ekd_jax.export", fixed=EVAL,
                              early=False, prep=lambda t: (_network_json(t, "student"), _write(t / "out", "x"))),
}

# Bad values checked in-process through spec.validate.validate, the function the command line calls
# first (the subprocess cases above show that its ValueError becomes the one error line):
# dotted override -> what the message must contain.
VALIDATE_CASES = {
    "batch_size_0": ({"batch_size": 0}, ["batch_size=0", "--config.batch_size"]),
    "seed_negative": ({"seed": -1}, ["seed=-1", "--config.seed"]),
    "lr_nan": ({"optimizer.learning_rate": float("nan")}, ["optimizer.learning_rate=nan"]),
    "milestones_unsorted": ({"schedule.milestones": (0.8, 0.5)}, ["schedule.milestones", "increasing"]),
    "dtype_float16": ({"dtype": "float16"}, ["dtype='float16'", "--config.dtype"]),
    "student_downsample_not_dividing": ({"data.student_downsample": 4, "data.image_size": 10},
                                        ["data.student_downsample=4", "(10, 10)"]),
    "samples_per_class_and_fraction": ({"data.samples_per_class": 5}, ["data.samples_per_class=5", "data.train_fraction"]),
    "source_unknown": ({"data.source": "foo:bar"}, ["data.source", "'foo:bar'"]),
    "num_epochs_negative": ({"num_epochs": -1}, ["num_epochs=-1", "--config.num_epochs"]),
    "eval_batch_size_0": ({"eval_batch_size": 0}, ["eval_batch_size=0", "--config.eval_batch_size"]),
    "eval_every_epochs_0": ({"eval_every_epochs": 0}, ["eval_every_epochs=0"]),
    "log_every_steps_0": ({"log_every_steps": 0}, ["log_every_steps=0"]),
    "checkpoint_keep_0": ({"checkpoint_keep": 0}, ["checkpoint_keep=0"]),
    "steps_per_call_0": ({"steps_per_call": 0}, ["steps_per_call=0", "--config.steps_per_call"]),
    "checkpoint_every_s_negative": ({"checkpoint_every_s": -1.0}, ["checkpoint_every_s=-1.0"]),
    "on_device_stream": ({"data.on_device": True, "data.source": "arrayrecord:/nonexistent/*.arrayrecord",
                          "data.image_size": 32, "data.crop_padding": 0, "data.mean": (0.5,) * 3, "data.std": (0.25,) * 3},
                         ["data.on_device=True", "stream"]),
    "lr_0": ({"optimizer.learning_rate": 0.0}, ["optimizer.learning_rate=0.0"]),
    "lr_negative": ({"optimizer.learning_rate": -0.1}, ["optimizer.learning_rate=-0.1"]),
    "momentum_1.5": ({"optimizer.momentum": 1.5}, ["optimizer.momentum=1.5", "[0, 1)"]),
    "weight_decay_negative": ({"optimizer.weight_decay": -1.0}, ["optimizer.weight_decay=-1.0"]),
    "nesterov_without_momentum": ({"optimizer.nesterov": True, "optimizer.momentum": 0.0}, ["optimizer.nesterov", "momentum"]),
    "schedule_unknown": ({"schedule.name": "poly"}, ["schedule.name='poly'"]),
    "milestones_outside": ({"schedule.milestones": (0.5, 1.5)}, ["schedule.milestones", "(0, 1)"]),
    "decay_factor_0": ({"schedule.decay_factor": 0.0}, ["schedule.decay_factor=0.0"]),
    "decay_factor_2": ({"schedule.decay_factor": 2.0}, ["schedule.decay_factor=2.0"]),
    "warmup_past_training": ({"schedule.warmup_epochs": 2.0}, ["schedule.warmup_epochs=2.0", "num_epochs=2"]),
    "alpha_negative": ({"loss.alpha": -1.0}, ["loss.alpha=-1.0"]),
    "beta_nan": ({"loss.beta": float("nan")}, ["loss.beta=nan"]),
    "gamma_inf": ({"loss.gamma": float("inf")}, ["loss.gamma=inf"]),
    "dml_tau_0": ({"loss.dml_tau": 0.0}, ["loss.dml_tau=0.0"]),
    "at_p_0": ({"loss.at_p": 0.0}, ["loss.at_p=0.0"]),
    "label_smoothing_1": ({"loss.label_smoothing": 1.0}, ["loss.label_smoothing=1.0", "[0, 1)"]),
    "ramp_start_2": ({"loss.ramp_start": 2.0}, ["loss.ramp_start=2.0"]),
    "ramp_length_negative": ({"loss.ramp_length": -0.5}, ["loss.ramp_length=-0.5"]),
    "kd_ramp_length_2": ({"loss.kd_ramp_length": 2.0}, ["loss.kd_ramp_length=2.0"]),
    "stage_weights_negative": ({"loss.stage_weights": (1.0, -1.0, 1.0)}, ["loss.stage_weights"]),
    "stage_weights_for_chosen_pairs": ({"guided.stages": (0, 2), "loss.stage_weights": (1.0, 1.0, 1.0)},
                                       ["loss.stage_weights", "(2)"]),
    "transfer_mask_unknown": ({"loss.transfer_mask": "teacher_wrong"}, ["loss.transfer_mask='teacher_wrong'"]),
    "mask_mean_unknown": ({"loss.mask_mean": "median"}, ["loss.mask_mean='median'"]),
    "feature_reduction_unknown": ({"loss.feature_reduction": "max"}, ["loss.feature_reduction='max'"]),
    "feature_kind_unknown": ({"loss.feature_kind": "gram"}, ["loss.feature_kind='gram'"]),
    "relation_with_aux_heads": ({"loss.feature_kind": "relation", "guided.type": "aux_head"},
                                ["loss.feature_kind='relation'", "guided.type=adapter"]),
    "ramp_shape_unknown": ({"loss.ramp_shape": "cubic"}, ["loss.ramp_shape='cubic'"]),
    "guided_type_unknown": ({"guided.type": "attention"}, ["guided.type='attention'"]),
    "guided_stages_duplicated": ({"guided.stages": (1, 1)}, ["guided.stages=(1, 1)", "at most once"]),
    "guided_stages_negative": ({"guided.stages": (-1,)}, ["guided.stages=(-1,)"]),
    "at_stage_out_of_range": ({"method": "at", "teacher.checkpoint": "{run}", "guided.stages": (3,)}, ["guided.stages=(3,)"]),
    "hint_stage_negative": ({"method": "fitnet", "teacher.checkpoint": "{run}", "guided.hint_stage": -1}, ["guided.hint_stage=-1"]),
    "head_start_negative": ({"teacher.head_start": -1.0}, ["teacher.head_start=-1.0"]),
    "student_model_unknown": ({"student.model": "mobilenet"}, ["student.model='mobilenet'", "MobileNetV2"]),
    "fitnet_without_teacher_checkpoint": ({"method": "fitnet"}, ["teacher.checkpoint=''", "'fitnet'"]),
    "student_downsample_3": ({"data.student_downsample": 3}, ["data.student_downsample", "3"]),
    "samples_per_class_negative": ({"data.samples_per_class": -1, "data.train_fraction": 1.0}, ["data.samples_per_class", "-1"]),
    "train_fraction_0": ({"data.train_fraction": 0.0}, ["data.train_fraction", "0.0"]),
    "train_fraction_above_1": ({"data.train_fraction": 1.5}, ["data.train_fraction", "1.5"]),
    "subset_seed_negative": ({"data.subset_seed": -1}, ["data.subset_seed=-1", "--config.data.subset_seed"]),
    "image_size_0": ({"data.image_size": 0}, ["data.image_size", "0"]),
    "crop_padding_negative": ({"data.crop_padding": -2}, ["data.crop_padding", "-2"]),
    "lowres_mode_unknown": ({"data.lowres_mode": "bicubic"}, ["data.lowres_mode", "'bicubic'"]),
    "source_without_path": ({"data.source": "npz:"}, ["data.source", "'npz:'"]),
    "tfds_without_name": ({"data.source": "tfds:"}, ["data.source", "'tfds:'"]),
}


def _tree(root: pathlib.Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else p.read_bytes().hex()[:64] + str(p.stat().st_size)
    return out


def _prefix(case: Case, tmp: pathlib.Path) -> list[str]:
    if case.wrap == "unwritable":
        (tmp / "locked").mkdir()
        os.chmod(tmp / "locked", 0o500)
        if os.geteuid() != 0:
            return []
        if _can("unshare", "--user", "true"):
            return ["unshare", "--user"]  # an unmapped user: no root override, the owner's r-x only
        case.patch = "eacces_mkdir"  # neither: say it with a monkeypatch
        return []
    if case.wrap == "full_tmpfs":
        if not _private_mounts():
            pytest.skip("no private tmpfs mounts here (the monkeypatched case covers a full disk)")
        (tmp / "mnt").mkdir()
        fill = 'mount -t tmpfs -o size=8k tmpfs "$0" && (head -c 65536 /dev/zero > "$0/fill" 2>/dev/null || true) && exec "$@"'
        return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", fill, str(tmp / "mnt")]
    return []


# JAX_LOG_COMPILES=1 makes jax log (absl, stderr) every program it traces and compiles: a
# "Compiling ..." line means a case was refused only after work began. Those log lines exist only
# because the test asks for them; every other line counts.
JAX_LOG = re.compile(r"^[IW]\d{4} [\d:.]+ +\d+ (dispatch|pxla)\.py:\d+\] ")
COMPILED = re.compile(r"Compiling |XLA compilation")


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_in_one_line(name, tmp_path):
    case = dataclasses.replace(CASES[name])
    wd = tmp_path / "wd"
    if case.prep is not None:
        case.prep(tmp_path)
    try:
        prefix = _prefix(case, tmp_path)
        before = _tree(tmp_path)
        fill = lambda a: a.format(tmp=tmp_path, wd=wd)  # noqa: E731
        args = [fill(a) for a in (*(MAIN if case.fixed is None else case.fixed), *case.args)]
        if case.patch:
            argv = [sys.executable, "-c", PATCHED, case.patch, case.module, *args]
        else:
            argv = [sys.executable, "-m", case.module, *args]
        r = _run(argv, prefix, {**_env(), "JAX_LOG_COMPILES": "1"})
        after = _tree(tmp_path)
    finally:
        if case.wrap == "unwritable":
            os.chmod(tmp_path / "locked", 0o700)
    every = [line for line in r.stderr.splitlines() if line.strip()]
    assert not [line for line in every if COMPILED.search(line)], f"compiled before refusing:\n{r.stderr[-4000:]}"
    lines = [line for line in every if not JAX_LOG.match(line)]
    assert r.returncode == 2, f"exit {r.returncode}\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-4000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-4000:]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{r.stderr[-4000:]}"
    line = lines[0]
    assert line.startswith("error: "), line
    for want in case.names:
        assert fill(want) in line, f"{want!r} not in: {line}"
    assert r.stdout.strip() == "", r.stdout[-2000:]
    # Nothing trained or written: what the test prepared is as it was (a stored run's checkpoints
    # included), no checkpoints/ appeared, and at most an empty workdir was made.
    assert not [p for p in after if p.endswith("checkpoints") and p not in before], after
    assert set(before) <= set(after), "something prepared was moved or deleted"
    created = {p: v for p, v in after.items() if before.get(p) != v}
    if case.early:
        assert not created, f"written although refused before any work: {created}"
    else:
        assert set(created) <= {"wd"} and all(v == "dir" for v in created.values()), created


@pytest.mark.parametrize("name", list(VALIDATE_CASES))
def test_bad_config_value_is_refused_by_validate(name, tmp_path):
    """The same contract for the rest of the config values, in-process: spec.validate.validate raises
    one ValueError line naming the option (cli.run prints it as ``error: <it>``, exit 2)."""
    from ekd_jax.spec.validate import validate

    overrides, names = VALIDATE_CASES[name]
    run = _network_json(tmp_path, "teacher").parent.parent
    c = _tiny_config()
    c.update_from_flattened_dict({k: v.format(run=run) if isinstance(v, str) else v for k, v in overrides.items()})
    with pytest.raises(ValueError) as e:
        validate(c)
    msg = str(e.value)
    assert "\n" not in msg and msg.strip() == msg, msg
    for want in names:
        assert want in msg, f"{want!r} not in: {msg}"


def test_the_table_is_big_enough():
    assert len(CASES) >= 40, "at least 40 bad inputs through the real command line"
    assert len(CASES) + len(VALIDATE_CASES) >= 80
    assert not set(CASES) & set(VALIDATE_CASES)
