"""Multi-host training on one machine: two processes on localhost, each with 2 CPU devices, joined
by JAX's own runtime through the real command line (--coordinator_address, --num_processes,
--process_id) and its gloo CPU collectives, against one process with 4 devices.

They must train the same run (the same global batches, the same steps), write every output once
(process 0), and resume exactly after both are SIGKILLed. Every process is started with a
deadline, so a hung collective fails the test instead of hanging the suite.
"""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ekd_jax import data, distributed, rundir

REPO = pathlib.Path(__file__).resolve().parents[1]
DEADLINE_S = 420  # per run; a normal one takes 20-60 s here
# The tiny config's lr is 0.01: 1 x 4 and 2 x 2 devices sum the gradients in another order
# (XLA's in-process all-reduce vs gloo's); at 0.05 this tiny, barely trained run amplifies that
# float reordering to 1e-4 in 22 steps, at 0.01 both agree to ~1e-8. Stated here too, so the
# comparison stays about who computes which rows, not about chaotic dynamics, if the config moves.
ARGS = ("--config.optimizer.learning_rate=0.01",
        "--config.checkpoint_every_s=0")  # a checkpoint after every epoch (not every 30 s): the resume tests use them


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(workdir: pathlib.Path, processes: int, devices: int, *args: str, env_of=None) -> list:
    """Starts the run as ``processes`` processes of ``devices`` CPU devices each (``env_of(i)``:
    extra environment of process i); returns [(Popen, stdout path, stderr path)]."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_"))}
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="0",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    # The runs share the suite's compilation cache (conftest, inherited): a later run's process 0
    # loads the programs instead of compiling them again (other processes' keys differ).
    cmd = [sys.executable, "-m", "ekd_jax.main", "--config", str(REPO / "configs/quickstart.py:tiny"),
           "--workdir", str(workdir), *ARGS, *args]
    port = _free_port()
    logs = workdir.parent / f"{workdir.name}_logs"
    logs.mkdir(exist_ok=True)
    procs, launch = [], len(list(logs.glob("*.out")))
    for i in range(processes):
        flags = [f"--coordinator_address=localhost:{port}", f"--num_processes={processes}", f"--process_id={i}"]
        out, err = logs / f"{launch}_p{i}.out", logs / f"{launch}_p{i}.err"
        with out.open("w") as o, err.open("w") as e:
            p = subprocess.Popen(cmd + (flags if processes > 1 else []), env={**env, **(env_of(i) if env_of else {})},
                                 cwd=REPO, stdout=o, stderr=e)
        procs.append((p, out, err))
    return procs


def _kill(procs) -> None:
    for p, _, _ in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
    for p, _, _ in procs:
        p.wait()


def _wait(procs, deadline_s: float = DEADLINE_S, returncode: int = 0) -> list[str]:
    """Waits for every process; returns their stdouts. Kills them all and fails, with their
    output, when one ends with another status than ``returncode`` or the deadline passes (a hung
    collective)."""
    deadline = time.time() + deadline_s
    try:
        for p, _, _ in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pass
    _kill(procs)
    tails = "\n".join(f"--- process {i} (rc {p.returncode})\n{o.read_text()[-1500:]}\n{e.read_text()[-3000:]}"
                      for i, (p, o, e) in enumerate(procs))
    assert all(p.returncode == returncode for p, _, _ in procs), tails
    return [o.read_text() for _, o, _ in procs]


def _records(wd: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]


def _variables(wd: pathlib.Path, which: str) -> dict:
    return rundir.restore_network(wd / which)[1]


@pytest.fixture(scope="module")
def runs(built_once):
    """The tiny run as 2 processes x 2 devices and as 1 process x 4 devices (once for the session)."""

    def build(root):
        # Side by side: the two-process run waits on its collectives much of the time.
        procs = _launch(root / "two_processes", 2, 2), _launch(root / "one_process", 1, 4)
        try:
            _wait(procs[0])
            _wait(procs[1])
        finally:
            _kill(procs[0] + procs[1])

    root = built_once("multihost", build)
    multi_out = [(root / "two_processes_logs" / f"0_p{i}.out").read_text() for i in range(2)]
    return root / "two_processes", root / "one_process", multi_out


def test_two_processes_train_what_one_process_trains(runs):
    multi, single, _ = runs
    m, s = (json.loads((wd / "summary.json").read_text()) for wd in (multi, single))
    assert (m["num_processes"], m["num_devices"]) == (2, 4) and (s["num_processes"], s["num_devices"]) == (1, 4)
    assert m["steps"] == s["steps"] == 22 and m["train_size"] == s["train_size"]
    for k in ("teacher_top1", "student_top1", "teacher_top5", "student_top5", "best_student_top1", "best_student_epoch"):
        assert m[k] == s[k], k
    rm, rs = _records(multi), _records(single)
    assert [r["epoch"] for r in rm] == [r["epoch"] for r in rs] == [0, 1]
    for a, b in zip(rm, rs):
        assert set(a) == set(b)
        for k in a:
            if k.startswith(("train/", "teacher/", "student/")):
                np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=k)
    for which in ("teacher", "student"):
        va, vb = _variables(multi, which), _variables(single, which)
        for part in ("params", "batch_stats"):
            a = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(va[part])])
            b = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(vb[part])])
            assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), (which, part)
    # They did train (the losses moved): the agreement is not that of two untouched networks.
    assert abs(rm[1]["train/loss"] - rm[0]["train/loss"]) > 1e-3 * rm[0]["train/loss"]


def test_only_process_zero_writes_and_prints(runs):
    multi, _, (out0, out1) = runs
    top = sorted(p.name for p in multi.iterdir())
    assert top == ["checkpoints", "curves.png", "metrics.jsonl", "student", "summary.json", "teacher", "tensorboard"]
    assert len(list(multi.rglob("summary.json"))) == 1 and len(list(multi.rglob("metrics.jsonl"))) == 1
    assert [r["epoch"] for r in _records(multi)] == [0, 1]  # each epoch once, not once per process
    assert len(list((multi / "tensorboard").iterdir())) == 1
    # The saved networks are written by process 0 alone (Orbax told that only it takes part).
    for which in ("student", "teacher"):
        assert not [p for p in (multi / which).rglob("*") if "process_1" in p.name], which
    # Checkpoints: every process saved its part of each epoch's step; both are committed.
    steps = sorted(int(p.name) for p in (multi / "checkpoints").iterdir())
    assert steps == [11, 22] and all((multi / "checkpoints" / str(s) / "commit_success.txt").exists() for s in steps)
    # Console: the epoch lines and the final JSON from process 0, nothing from process 1.
    assert sum(line.startswith("{") for line in out0.splitlines()) == 1
    assert sum(line.startswith("epoch ") and "|" in line for line in out0.splitlines()) == 2
    assert "2 processes" in out0
    assert not [line for line in out1.splitlines() if line.startswith(("epoch", "{", "ekd"))], out1


def test_sigkill_of_both_processes_resumes_exactly(runs, tmp_path):
    multi = runs[0]
    wd = tmp_path / "killed"
    procs = _launch(wd, 2, 2)
    deadline = time.time() + DEADLINE_S
    try:
        while time.time() < deadline and all(p.poll() is None for p, _, _ in procs):
            ck = wd / "checkpoints"
            if ck.exists() and any(p.name.isdigit() and (p / "commit_success.txt").exists() for p in ck.iterdir()):
                break
            time.sleep(0.05)
        assert all(p.poll() is None for p, _, _ in procs), "a process ended before the first checkpoint"
    finally:
        _kill(procs)
    assert not (wd / "summary.json").exists()
    out0, _ = _wait(_launch(wd, 2, 2))
    assert "resuming after epoch 1 (step 11)" in out0
    a, b = (json.loads((w / "summary.json").read_text()) for w in (wd, multi))
    for k in ("teacher_params_sha256", "student_params_sha256", "teacher_top1", "student_top1", "steps"):
        assert a[k] == b[k], k
    strip = lambda recs: [{k: v for k, v in r.items() if k != "images_per_s"} for r in recs]  # noqa: E731
    assert strip(_records(wd)) == strip(_records(multi))


def test_sigterm_to_one_process_stops_every_process_at_one_step(runs, tmp_path):
    """A preemption notice reaches one process: both stop after the same step, save it together and
    exit 143; the same command on both resumes there and ends as the uninterrupted run."""
    multi = runs[0]
    wd = tmp_path / "stopped"
    # Two steps per call, so that there are call boundaries to stop at mid-epoch; resumed at the default 16.
    procs = _launch(wd, 2, 2, "--config.log_every_steps=1", "--config.steps_per_call=2")
    deadline = time.time() + DEADLINE_S
    try:
        while time.time() < deadline and all(p.poll() is None for p, _, _ in procs):
            if "epoch 2 step 2/11:" in procs[0][1].read_text():  # only process 0 prints
                break
            time.sleep(0.02)
        assert all(p.poll() is None for p, _, _ in procs), "a process ended before it could be signalled"
        procs[1][0].send_signal(signal.SIGTERM)
        _wait(procs, returncode=143)
    finally:
        _kill(procs)
    errs = [e.read_text() for _, _, e in procs]
    assert not [e for e in errs if "Traceback" in e], errs
    pattern = r"interrupted at step (\d+) \(epoch 2\); run the same command to resume"
    found = [re.fullmatch(pattern, e.strip().splitlines()[-1]) for e in errs]
    assert all(found), errs
    stopped = {int(m.group(1)) for m in found}
    assert len(stopped) == 1, stopped  # the same step on both processes
    (stopped,) = stopped
    assert 11 + 2 <= stopped < 22, stopped
    committed = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if (p / "commit_success.txt").exists())
    assert committed == [11, stopped]

    out0, _ = _wait(_launch(wd, 2, 2, "--config.log_every_steps=1"))
    assert f"resuming at step {stopped} (epoch 2" in out0
    a, b = (json.loads((w / "summary.json").read_text()) for w in (wd, multi))
    for k in ("teacher_params_sha256", "student_params_sha256", "teacher_top1", "student_top1", "steps"):
        assert a[k] == b[k], k
    strip = lambda recs: [{k: v for k, v in r.items() if k != "images_per_s"} for r in recs]  # noqa: E731
    assert strip(_records(wd)) == strip(_records(multi))


def test_two_processes_with_the_training_set_on_the_devices_train_the_same(runs, tmp_path):
    """data.on_device over 2 processes (each uploads the whole split, replicated; each sends only its rows'
    indices) at 4 steps per call: bitwise the run that feeds each process's rows of 16-step calls from the host."""
    multi = runs[0]
    wd = tmp_path / "on_device"
    _wait(_launch(wd, 2, 2, "--config.data.on_device=true", "--config.steps_per_call=4"))
    a, b = (json.loads((w / "summary.json").read_text()) for w in (wd, multi))
    for k in ("teacher_params_sha256", "student_params_sha256", "teacher_top1", "student_top1", "steps"):
        assert a[k] == b[k], k


def test_a_refusal_on_one_process_stops_every_process(tmp_path):
    """A data file that only process 0 sees (each process has its own HOME): process 1 refuses,
    and process 0, instead of waiting for it in the next collective, stops with process 1's
    message. Each prints one error line; nothing is made."""
    homes = [tmp_path / "home0", tmp_path / "home1"]
    for h in homes:
        h.mkdir()
    (homes[0] / "mine.npz").write_bytes(b"")
    wd = tmp_path / "wd"
    procs = _launch(wd, 2, 1, "--config.data.source=npz:~/mine.npz", env_of=lambda i: {"HOME": str(homes[i])})
    _wait(procs, deadline_s=180, returncode=2)
    errors = [[line for line in e.read_text().splitlines() if line.startswith("error: ")] for _, _, e in procs]
    assert len(errors[0]) == len(errors[1]) == 1, errors
    assert "file not found" in errors[1][0] and str(homes[1] / "mine.npz") in errors[1][0]
    assert "file not found" in errors[0][0] and "(on process 1 of 2)" in errors[0][0]
    assert not wd.exists()


# --------------------------------------------------------------------------- flags


@pytest.mark.parametrize("flags, message", [
    (dict(coordinator_address="localhost:1234", num_processes=2, process_id=2), "process ids are 0 .. 1"),
    (dict(coordinator_address="localhost:1234", num_processes=2, process_id=-1), "--process_id=-1 is not valid"),
    (dict(coordinator_address="localhost:1234", num_processes=0, process_id=0), "--num_processes=0 is not valid"),
    (dict(coordinator_address="localhost:1234"), "without --num_processes and --process_id"),
    (dict(num_processes=2, process_id=0), "--num_processes, --process_id given without --coordinator_address"),
    (dict(coordinator_address="localhost", num_processes=2, process_id=0), "is not valid: HOST:PORT"),
    (dict(coordinator_address="h:99999", num_processes=2, process_id=0), "is not valid: HOST:PORT"),
    (dict(local_device_ids=["0"]), "--local_device_ids is only for a multi-process run"),
    (dict(auto=True, local_device_ids=["0", "x"]), "--local_device_ids=0,x is not valid"),
    (dict(auto=True, process_id=3, num_processes=2), "process ids are 0 .. 1"),
])
def test_bad_distributed_flags_are_refused(flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        distributed.check_flags(**flags)


def test_distributed_flags_map_onto_jax_distributed_initialize():
    assert distributed.check_flags() is None  # a single-process run joins nothing
    assert distributed.check_flags("10.0.0.1:1234", 4, 3, ["0", "1"]) == dict(
        coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3, local_device_ids=[0, 1])
    assert distributed.check_flags("[::1]:8476", 2, 0)["coordinator_address"] == "[::1]:8476"
    # --distributed: JAX detects what is not given (Cloud TPU, SLURM, Open MPI).
    assert distributed.check_flags(auto=True) == dict(coordinator_address=None, num_processes=None, process_id=None)


@pytest.mark.parametrize("args, message", [
    (("--coordinator_address=localhost:1234", "--num_processes=2", "--process_id=2"), "process ids are 0 .. 1"),
    (("--coordinator_address=localhost:1234",), "without --num_processes and --process_id"),
    (("--distributed",), "--distributed: jax.distributed.initialize() could not detect or join the cluster"),
])
def test_bad_distributed_command_lines_are_one_error_line(tmp_path, args, message):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_"))}
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "ekd_jax.main", "--config", str(REPO / "configs/quickstart.py:tiny"),
                        "--workdir", str(tmp_path / "wd"), *args],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert not (tmp_path / "wd").exists()  # refused before anything was made


# --------------------------------------------------------------------------- batch slicing

ROWS_SCRIPT = r"""
import sys
import numpy as np
from ekd_jax import data, distributed, parallel
distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
import jax
from jax.experimental import multihost_utils
mesh = parallel.make_mesh()
# Each host's devices side by side: process 0's two, then process 1's two.
assert [d.process_index for d in mesh.devices] == [0, 0, 1, 1], mesh.devices
rows = parallel.process_rows(mesh, 8)
x = np.arange(40 * 3, dtype=np.uint8).reshape(40, 3)
x_local, _ = data.Dataset(x, np.arange(40, dtype=np.int32), x, np.arange(40, dtype=np.int32),
                          10, None, "t", (0.5,), (0.5,)).train_batch(8, 3, 7, rows)
assert len(x_local) == 4  # this process's rows only
batch = parallel.global_batch({"x": x_local}, mesh, 8)["x"]
assert batch.shape == (8, 3) and not batch.is_fully_addressable
whole = np.asarray(multihost_utils.process_allgather(batch, tiled=True))
np.testing.assert_array_equal(whole, x[data.batch_indices(40, 8, 3, 7)])  # the one global batch
print("ROWS", jax.process_index(), rows.tolist())
"""


def test_each_process_loads_its_rows_of_the_one_global_batch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    address = f"localhost:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", ROWS_SCRIPT, address, str(i)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    rows = [line for out, _ in outs for line in out.splitlines() if line.startswith("ROWS")]
    assert sorted(rows) == ["ROWS 0 [0, 1, 2, 3]", "ROWS 1 [4, 5, 6, 7]"]



def test_process_rows_of_a_batch_are_the_global_batch_split():
    """Splitting the (seed, step) batch by rows, as processes do, loses and repeats nothing, and
    the evaluation batches split the same way keep every process on the same number of batches."""
    n, b = 35, 8  # the last batch: 3 real rows, all in the first half
    whole = data.batch_indices(n, b, seed=3, step=5)
    halves = [np.arange(0, 4), np.arange(4, 8)]
    parts = [data.process_batch_indices(n, b, 3, 5, rows) for rows in halves]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert data.process_batch_indices(n, b, 3, 6, halves[0]).tolist() != parts[0].tolist()  # another step
    x, y = np.arange(n * 2, dtype=np.uint8).reshape(n, 2, 1, 1), np.arange(n, dtype=np.int32)
    test = data.Dataset(x, y, x, y, n, None, "t", (0.5,), (0.5,))  # x, y as its held-out split
    full = list(test.eval_batches(b))
    split = [list(test.eval_batches(b, rows)) for rows in halves]
    assert len(split[0]) == len(split[1]) == len(full) == 5
    for (xf, yf, mf), (x0, y0, m0), (x1, y1, m1) in zip(full, *split):
        np.testing.assert_array_equal(np.concatenate([x0, x1]), xf)
        np.testing.assert_array_equal(np.concatenate([y0, y1]), yf)
        np.testing.assert_array_equal(np.concatenate([m0, m1]), mf)
    assert split[1][-1][2].sum() == 0 and split[0][-1][2].sum() == n % b  # the padding, masked
