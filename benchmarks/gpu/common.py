"""What every phase of the GPU check shares: paths, the log, the results file and the subprocesses.

``Results`` appends one JSON line per measurement to ``<out>/results.jsonl`` as it comes (a timeout
still leaves everything done so far). ``Proc`` is a worker subprocess spoken to by lines on stdin and
answering by lines on stdout (workers.py says each protocol); its stdout and stderr also go to
``<out>/logs/<name>.log``. Standard library only (see the package docstring).
"""

from __future__ import annotations

import json
import os
import pathlib
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the repository
BENCHMARKS = ROOT / "benchmarks"
ENTRY = BENCHMARKS / "gpu_check.py"  # every worker is this script with --worker
T0 = time.time()
METHODS = ("vanilla", "dml", "ekd")  # the study runs of phases 3-4


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def left(deadline: float) -> float:
    return deadline - time.time()


class Results:
    """JSON lines appended to <out>/results.jsonl as they come, and kept for the summary."""

    def __init__(self, out: pathlib.Path):
        self.path = out / "results.jsonl"
        self.items: list[dict] = []
        self.lock = threading.Lock()

    def add(self, rec: dict) -> dict:
        rec = {"t_s": round(time.time() - T0, 1), **rec}
        with self.lock:
            self.items.append(rec)
            with self.path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        return rec

    def get(self, phase: str) -> list[dict]:
        return [r for r in self.items if r.get("phase") == phase]


ALL_PROCS: list = []  # every Proc started, killed on the way out


class Proc:
    """A subprocess with a line protocol on stdin/stdout; stdout lines go to a queue and, with
    stderr, to its log file. Its own process group, so kill() ends it and its children only.
    A line 'RESULT {json}' is the worker's final result (``self.result``), not a protocol line."""

    def __init__(self, name: str, cmd: list[str], env: dict, log_path: pathlib.Path):
        self.name = name
        self.log_path = log_path
        self.logf = open(log_path, "w", buffering=1)
        self.logf.write("$ " + " ".join(cmd) + "\n")
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.logf, text=True,
                                  env=env, cwd=ROOT, start_new_session=True, bufsize=1)
        self.q: queue.Queue = queue.Queue()
        self.result: dict | None = None
        self.t_start = time.time()
        ALL_PROCS.append(self)
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self):
        for line in self.p.stdout:
            self.logf.write(line)
            if line.startswith("RESULT "):
                try:
                    self.result = json.loads(line[len("RESULT "):])
                except ValueError:
                    pass
            else:
                self.q.put(line.strip())
        self.q.put(None)

    def send(self, text: str) -> bool:
        try:
            self.p.stdin.write(text + "\n")
            self.p.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def read(self, timeout: float) -> str | None:
        """The next protocol line, or None at EOF or timeout (``self.alive()`` tells which). Other
        stdout lines (the trainer's progress) are skipped."""
        end = time.time() + max(0.0, timeout)
        while True:
            try:
                line = self.q.get(timeout=max(0.01, end - time.time()))
            except queue.Empty:
                return None
            if line is None:
                self.q.put(None)  # stay at EOF
                return None
            if line.startswith(("ready", "ok", "error")) or line[:1].isdigit():
                return line
            if time.time() > end:
                return None

    def alive(self) -> bool:
        return self.p.poll() is None

    def tail(self, n: int = 6) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(x.strip() for x in lines[-n:])[-1500:]

    def close(self, grace: float = 5.0) -> None:
        if self.alive():
            self.send("quit")
            try:
                self.p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill()
        self.logf.flush()

    def kill(self) -> None:
        if self.alive():
            for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self.p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    break
                try:
                    self.p.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue


def worker_env(args) -> dict:
    """The environment of every worker: the repository importable, JAX's GPU memory not preallocated."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # several JAX processes share the GPU
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    if args.jax_cache:
        env["JAX_COMPILATION_CACHE_DIR"] = args.jax_cache
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    if args.platform:
        env["JAX_PLATFORMS"] = args.platform
    return env


def start_jax_worker(args, kind: str, name: str, spec: dict, env: dict) -> Proc:
    """A ``--worker train`` or ``--worker calib`` process of ``spec`` (workers.py), logged to logs/<name>.log."""
    cmd = [sys.executable, str(ENTRY), "--worker", kind, "--spec", json.dumps(spec)]
    return Proc(name, cmd, env, args.out / "logs" / f"{name}.log")


def wait_all(procs: list[Proc], deadline: float) -> bool:
    """Waits for every process to end; kills those still running at ``deadline``. True = all ended."""
    while any(p.alive() for p in procs):
        if time.time() > deadline:
            for p in procs:
                p.kill()
            return False
        time.sleep(0.5)
    time.sleep(0.3)  # the reader threads take the last lines
    return True


# --------------------------------------------------------------------------- a training run's records


def read_metrics(workdir: pathlib.Path) -> list[dict]:
    """The epoch records of a run's metrics.jsonl (ekd_jax.rundir.METRICS_FILE; not imported: no JAX here)."""
    p = pathlib.Path(workdir) / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def speed(recs: list[dict]) -> dict:
    """A run's images/s: the trainer's own per epoch, and their median without the first (compiles)."""
    ips = [r["images_per_s"] for r in recs if "images_per_s" in r]
    steady = ips[1:] or ips
    return {"epochs_done": len(recs), "images_per_s_by_epoch": [round(x, 1) for x in ips],
            "images_per_s": statistics.median(steady) if steady else None}


def so_far(workdir: pathlib.Path) -> dict:
    """What a run that did not finish reached: its speed, last accuracies and last epoch record."""
    recs = read_metrics(workdir)
    out = speed(recs)
    if recs:
        last = recs[-1]
        out.update({k: last.get(f"{w}/top1") for k, w in (("student_top1", "student"), ("teacher_top1", "teacher"))})
        out["last_epoch_record"] = last
    return out
