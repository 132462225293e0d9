"""The GPU check's command line and its run: the phases in order under one time budget, then the summary.

``main`` is benchmarks/gpu_check.py's: with ``--worker KIND`` it is one of workers.py's processes,
otherwise the orchestrator. The orchestrator gives each phase its own cap (``--bench_budget``,
``--e2e_budget``, ``--calib_budget``; train gets what is left), all within ``--budget`` less
``--margin`` kept for the summary. An error in a phase is recorded (results.jsonl: phase, error,
traceback) and the next phase still runs. Whatever happens, including SIGTERM, every worker is
killed and <out>/summary.txt and <out>/summary.json (every record) are written.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import sys
import time
import traceback

from gpu import workers
from gpu.bench import phase_bench
from gpu.common import ALL_PROCS, ROOT, T0, Results, log
from gpu.e2e import phase_e2e
from gpu.env import install_wheels, missing_needed, phase_env
from gpu.study import phase_calib, phase_train
from gpu.summary import summarize

PYLIB = pathlib.Path("/tmp/ekd_gpu_check_pylib")  # where --wheels installs
# --tiny (CPU plumbing test): tiny pairs, data and schedules; each applies only where the flag is not given.
TINY = {"pairs": "resnet14-resnet8", "batch_sizes": "16", "rounds": 2, "chunk_seconds": 0.3,
        "bench_budget": 90.0, "e2e_cases": "resnet14-resnet8:float32:16", "e2e_epochs": 2,
        "e2e_budget": 80.0, "eval_batch_size": 100, "torch_threads": 1, "epochs": 3, "min_epochs": 1, "max_seeds": 1,
        "calib_epochs": 1, "calib_budget": 80.0, "ckpt_every": 2, "budget": 400.0, "platform": "cpu",
        "train_overrides": json.dumps({"batch_size": 32, "eval_batch_size": 100, "log_every_steps": 8})}


def parse_args(argv=None, description: str = ""):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="the npz (x_train, y_train, x_test, y_test), e.g. cifar10_small.npz")
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu/out", help="results folder (default $OUT)")
    p.add_argument("--wheels", default=None, help="folder of wheels for missing dependencies (benchmarks/gpu_wheels.sh)")
    p.add_argument("--budget", type=float, default=480.0, help="hard overall seconds, all phases")
    p.add_argument("--phases", default="env,bench,e2e,calib,train")
    p.add_argument("--tiny", action="store_true", help="CPU plumbing test: tiny pairs, data and schedules")
    p.add_argument("--platform", default=None, help="JAX_PLATFORMS for the workers (e.g. cpu); default: JAX's choice")
    # phase 1
    p.add_argument("--pairs", default="resnet56-resnet20,resnet32x4-resnet8x4")
    p.add_argument("--batch_sizes", default="64,256")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--torch_variants", default="nchw,cl", help="PyTorch layouts: nchw, cl (channels_last)")
    p.add_argument("--torch_python", default=sys.executable)
    p.add_argument("--torch_threads", type=int, default=2, help="PyTorch intra-op threads (CPU only)")
    p.add_argument("--no_jax_bench", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bench_budget", type=float, default=110.0)
    p.add_argument("--bench_parallel", type=int, default=8, help="cases whose processes start (and compile) at once")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--chunk_seconds", type=float, default=0.5)
    # phase 2
    p.add_argument("--e2e_cases", default="resnet56-resnet20:float32:64,resnet56-resnet20:float32:256",
                   help="PAIR:DTYPE:BATCH,... (each one train_and_evaluate run)")
    p.add_argument("--e2e_epochs", type=int, default=3)
    p.add_argument("--e2e_budget", type=float, default=60.0)
    p.add_argument("--eval_batch_size", type=int, default=500)
    # phases 3-4
    p.add_argument("--train_config", default="configs/study.py:full")
    p.add_argument("--train_overrides", default="{}", help="JSON of config overrides for the study runs")
    p.add_argument("--epochs", type=int, default=200, help="the study runs' schedule (paper-length)")
    p.add_argument("--min_epochs", type=int, default=10)
    p.add_argument("--max_seeds", type=int, default=3)
    p.add_argument("--calib_epochs", type=int, default=2, help="epochs timed per concurrency level")
    p.add_argument("--calib_budget", type=float, default=70.0)
    p.add_argument("--ckpt_every", type=int, default=10, help="study runs checkpoint every N epochs (and the last)")
    p.add_argument("--resume_from", default=None, help="a previous --out: continue its study runs and plan")
    p.add_argument("--keep_finished_checkpoints", action="store_true",
                   help="keep the checkpoints of finished study runs (default: deleted, summary.json stays)")
    p.add_argument("--jax_cache", default="/tmp/ekd_gpu_check_jax_cache",
                   help="persistent JAX compilation cache shared by the workers ('' = off)")
    p.add_argument("--margin", type=float, default=12.0, help="seconds kept for the summary at the end")
    # workers (workers.py)
    p.add_argument("--worker", choices=("torch", "train", "calib", "jax_serve"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--pair", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch_size", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--channels_last", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--num_classes", type=int, default=100, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.tiny:  # only what the user did not set
        given = {x.split("=")[0] for x in (argv if argv is not None else sys.argv[1:]) if x.startswith("--")}
        for k, v in TINY.items():
            if f"--{k}" not in given:
                setattr(a, k, v)
    return a


def _tiny_data(args) -> str:
    """A small npz: a slice of --data if given, else random images (a plumbing test only)."""
    import numpy as np

    path = args.out / "tiny.npz"
    if args.data and os.path.exists(args.data):
        z, rng = np.load(args.data), np.random.default_rng(0)
        tr, te = rng.permutation(len(z["y_train"]))[:512], rng.permutation(len(z["y_test"]))[:200]
        arrays = {"x_train": z["x_train"][tr], "y_train": z["y_train"][tr],
                  "x_test": z["x_test"][te], "y_test": z["y_test"][te]}
    else:
        rng = np.random.default_rng(0)
        arrays = {"x_train": rng.integers(0, 256, (512, 32, 32, 3), dtype=np.uint8),
                  "y_train": (np.arange(512) % 10).astype(np.int32),
                  "x_test": rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8),
                  "y_test": (np.arange(200) % 10).astype(np.int32)}
    np.savez(path, **arrays)
    return str(path)


def _prepare(a) -> tuple[Results, set[str]]:
    """The out folder, the wheels, the data path; the phases that can run."""
    a.out = pathlib.Path(a.out).absolute()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "logs").mkdir(exist_ok=True)
    results = Results(a.out)
    log(f"gpu_check: python {sys.version.split()[0]} ({sys.executable}), out {a.out}, budget {a.budget:.0f} s")
    if a.wheels:
        rep = install_wheels(a.wheels, PYLIB, results)
        log(f"wheels: {rep}")
        if missing_needed(rep):
            log("error: a required dependency is missing (see benchmarks/gpu_wheels.sh); the JAX phases will fail")
    if a.tiny:
        a.data = _tiny_data(a)
    if a.data:  # relative to the repository root when inside it: a resumed run's config must match
        d = pathlib.Path(a.data).absolute()
        a.data = str(d.relative_to(ROOT)) if d.is_relative_to(ROOT) else str(d)
    phases = set(a.phases.split(","))
    if phases & {"e2e", "calib", "train"} and not (a.data and (ROOT / a.data).exists()):
        log(f"error: --data {a.data!r} is not a file; the e2e / study phases are skipped")
        phases -= {"e2e", "calib", "train"}
    return results, phases


def _on_term(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None, description: str = "") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:3] == ["--worker", "jax_serve", "--"]:  # the rest is compare_cpu.py's command line
        workers.jax_serve(argv[3:])
        return 0
    a = parse_args(argv, description)
    if a.worker:
        {"torch": workers.torch_server, "train": workers.train_worker, "calib": workers.calib_worker}[a.worker](a)
        return 0

    deadline = T0 + a.budget - a.margin
    results, phases = _prepare(a)
    signal.signal(signal.SIGTERM, _on_term)

    def phase(name, fn, *fargs):
        """Runs one phase; an error in it is recorded and the next phase still runs."""
        try:
            return fn(a, results, *fargs)
        except Exception as e:  # noqa: BLE001
            log(f"{name}: error {type(e).__name__}: {e}")
            results.add({"phase": name, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]})
            for p in ALL_PROCS:
                p.kill()
            return None

    try:
        if "env" in phases:
            phase("env", phase_env)
        if "bench" in phases:
            phase("bench", phase_bench, min(deadline, time.time() + a.bench_budget))
        if "e2e" in phases:
            phase("e2e", phase_e2e, min(deadline, time.time() + a.e2e_budget))
        cal = None  # a resumed plan needs no calibration
        if "calib" in phases and not (a.resume_from and (pathlib.Path(a.resume_from) / "plan.json").exists()):
            cal = phase("calib", phase_calib, min(deadline, time.time() + a.calib_budget))
        if "train" in phases:
            phase("train", phase_train, cal, deadline)
    except KeyboardInterrupt as e:
        log(f"interrupted ({e})")
    finally:
        for p in ALL_PROCS:
            p.kill()
        try:
            text = summarize(a, results)
        except Exception as e:  # noqa: BLE001  (never lose the results to a summary bug)
            text = f"summary failed ({type(e).__name__}: {e}); raw results:\n" + "\n".join(
                json.dumps(r, default=str) for r in results.items)
        (a.out / "summary.txt").write_text(text + "\n")
        (a.out / "summary.json").write_text(json.dumps(results.items, indent=1, default=str))
        print(text, flush=True)
    return 0
