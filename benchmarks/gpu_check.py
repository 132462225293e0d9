"""One bounded GPU check (issue 12, item 5): step benchmarks, trainer end-to-end speed, study runs.

  bash benchmarks/gpu_check.sh --data runs/gpu/cifar10_small.npz --wheels runs/gpu/wheels   # on the GPU machine
  .venv/bin/python benchmarks/gpu_check.py --tiny --out /tmp/gpu_tiny --torch_python /work/torchvenv/bin/python \
      --data ../shared/data/cifar10_small.npz     # CPU plumbing test (tiny pairs, 512 images, ~3-4 min here)

Everything runs under one hard time budget (``--budget``, default 480 s), in phases; each phase
has its own cap and stops starting new work when its cap or the overall deadline comes:

1. bench: ekd_jax's joint step (``benchmarks/compare_cpu.py --serve_jax``, i.e. ``ekd_jax.bench``'s
   StepTimer on configs/cifar.py:cifar100,<pair>) against the PyTorch reference step
   (``benchmarks/torch_step.py``'s JointStep, moved to CUDA here: NCHW and channels_last, bf16 via
   autocast), for every pair x dtype x batch size. All contenders are started at once (compiles
   overlap), then timed one at a time, chunk by chunk, in alternating rounds (as compare_cpu.py).
2. e2e: a real ``ekd_jax.train.train_and_evaluate`` run of the first pair on the npz for a few
   epochs; its images/s (the trainer's own ``images_per_s``) against the bench's, plus the host's
   cost of feeding one batch (``data.train_batch`` + ``parallel.shard_batch``). A loop far below
   the bench means the host feeding it is the bottleneck; the summary says so.
3. calib: the study runs (configs/study.py:full, resnet20 -> resnet8; vanilla, dml, ekd x seeds) as
   concurrent processes that compile and then train epoch by epoch on command, timed with 3, 6, 9
   of them running at once: how much several runs sharing the GPU slow each other.
4. train: vanilla / dml / ekd at ``--epochs`` (default 200, a paper-length schedule) for as many
   seeds as fit the time left (measured in 3.), the runs of each wave concurrent on the GPU; fewer
   epochs only if not even one seed fits. Each run checkpoints into ``<out>/train/`` (every
   ``--ckpt_every`` epochs), so ``--resume_from <a previous out>`` continues them.

Results go to ``<out>/results.jsonl`` (one JSON line per measurement, written as they come, so a
timeout still leaves everything done so far), logs of every subprocess to ``<out>/logs/``, the
final table to ``<out>/summary.txt`` (also printed) and ``<out>/summary.json``.

Only the standard library is imported here at the top: the same file is the orchestrator (no JAX
or torch in its process), the torch server (``--worker torch``, needs torch only) and the JAX
workers (``--worker train`` / ``calib``, and ``--worker jax_serve -- ARGS`` = compare_cpu.py
``--serve_jax ARGS`` behind the stubs). ``--wheels DIR`` installs missing pure-Python
dependencies from wheel files (pip --no-index, else by unpacking them); optional modules that are
still missing (tensorboardX, PIL, matplotlib) are replaced by stubs in the workers.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import importlib.util
import json
import os
import pathlib
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import types
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
HERE = pathlib.Path(__file__).resolve().parent
T0 = time.time()
METHODS = ("vanilla", "dml", "ekd")
# module -> distribution, for the dependencies the device may lack (benchmarks/gpu_wheels.sh).
NEEDED = {"absl": "absl-py", "yaml": "PyYAML", "ml_collections": "ml-collections"}
OPTIONAL = {"google.protobuf": "protobuf", "packaging": "packaging", "tensorboardX": "tensorboardX",
            "tqdm": "tqdm", "PIL": "pillow"}


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


# =========================================================================== dependencies


def _importable(mod: str, python: str | None = None) -> bool:
    if python is None or python == sys.executable:
        try:
            importlib.import_module(mod)
            return True
        except Exception:  # noqa: BLE001  (an installed but broken module counts as missing)
            return False
    r = subprocess.run([python, "-c", f"import {mod}"], capture_output=True, timeout=120)
    return r.returncode == 0


def _wheel_fits(name: str) -> bool:
    """Whether wheel file ``name`` can be used by this Python (pure, abi3, or this CPython)."""
    parts = name[:-4].split("-")
    if len(parts) < 5:
        return False
    py, abi, plat = parts[-3], parts[-2], parts[-1]
    me = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    if "any" in plat.split("."):
        return any(t.startswith("py3") or t == me for t in py.split("."))
    if not any(p.endswith("x86_64") for p in plat.split(".")) or os.uname().machine != "x86_64":
        return False
    if abi == "abi3":
        return any(t.startswith("cp3") and int(t[3:] or 0) <= sys.version_info[1] for t in py.split("."))
    return me in py.split(".")


def install_wheels(wheels: str, target: pathlib.Path, results: "Results | None") -> dict:
    """Installs each missing dependency's wheel from ``wheels`` into ``target`` (put on sys.path
    and PYTHONPATH): ``pip install --no-index --no-deps --target``, else by unpacking the wheel
    (a wheel is a zip of the package). Returns what it found and did."""
    target.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH", "")]))
    report = {"wheels_dir": wheels, "target": str(target), "installed": [], "unpacked": [], "missing": []}
    for mod, dist in {**NEEDED, **OPTIONAL}.items():
        if _importable(mod):
            continue
        key = dist.lower().replace("-", "_")
        files = sorted(f for f in glob.glob(os.path.join(wheels, "*.whl"))
                       if os.path.basename(f).lower().split("-")[0] == key and _wheel_fits(os.path.basename(f)))
        if not files:
            report["missing"].append(dist)
            continue
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                            "--find-links", wheels, "--target", str(target), files[-1]],
                           capture_output=True, text=True, timeout=300)
        if r.returncode == 0:
            report["installed"].append(os.path.basename(files[-1]))
        else:  # no pip, or it refused: unpack (enough for these pure-Python packages)
            with zipfile.ZipFile(files[-1]) as z:
                z.extractall(target)
            report["unpacked"].append(os.path.basename(files[-1]))
        importlib.invalidate_caches()
        for m in list(sys.modules):  # a failed import may have left a half module behind
            if m == mod or m.startswith(mod + "."):
                del sys.modules[m]
        if not _importable(mod):
            report["missing"].append(dist)
    if results is not None:
        results.add({"phase": "env", "what": "wheels", **report})
    return report


def install_stubs() -> list[str]:
    """In a JAX worker: stand-ins for optional modules that are not importable (listed in the result)."""
    stubbed = []
    try:
        import tensorboardX  # noqa: F401
    except Exception:  # noqa: BLE001  (also a protobuf too old for its generated code)
        class SummaryWriter:  # the three calls outputs.RunWriter makes
            def __init__(self, *a, **k):
                pass

            def add_scalar(self, *a, **k):
                pass

            def flush(self):
                pass

            def close(self):
                pass

        m = types.ModuleType("tensorboardX")
        m.SummaryWriter = SummaryWriter
        sys.modules["tensorboardX"] = m
        stubbed.append("tensorboardX")
    try:
        from PIL import Image  # noqa: F401
    except Exception:  # noqa: BLE001  (data.py imports it; it only resizes, not needed at native size)
        pil, image = types.ModuleType("PIL"), types.ModuleType("PIL.Image")

        def fromarray(*a, **k):
            raise RuntimeError("pillow is not installed (benchmarks/gpu_wheels.sh --pillow): cannot resize images")

        image.fromarray = fromarray
        image.Resampling = types.SimpleNamespace(BILINEAR=2)
        pil.Image = image
        sys.modules["PIL"], sys.modules["PIL.Image"] = pil, image
        stubbed.append("PIL")
    try:
        from matplotlib.figure import Figure  # noqa: F401
    except Exception:  # noqa: BLE001
        from ekd_jax import outputs

        outputs.plot_curves = lambda records, path: None  # curves.png is skipped
        stubbed.append("matplotlib")
    return stubbed


# =========================================================================== results and processes


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
    stderr, to its log file. Its own process group, so kill() ends it and its children only."""

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
        """The next protocol line, or None at EOF or timeout (``self.alive()`` tells which)."""
        end = time.time() + max(0.0, timeout)
        while True:
            try:
                line = self.q.get(timeout=max(0.01, end - time.time()))
            except queue.Empty:
                return None
            if line is None:
                self.q.put(None)  # stay at EOF
                return None
            if line.startswith("ready") or line.startswith("ok") or line[:1].isdigit() or line.startswith("error"):
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


def left(deadline: float) -> float:
    return deadline - time.time()


# =========================================================================== phase 0: environment


def phase_env(args, results: Results) -> dict:
    env = worker_env(args)
    code_jax = (
        "import json, os, sys, jax, jaxlib; d = jax.devices(); "
        "print(json.dumps({'python': sys.version.split()[0], 'jax': jax.__version__, 'jaxlib': jaxlib.__version__, "
        "'backend': jax.default_backend(), 'devices': [str(x) for x in d], "
        "'device_kind': getattr(d[0], 'device_kind', ''), 'xla_flags': os.environ.get('XLA_FLAGS', ''), "
        "'cpus': os.cpu_count()}))"
    )
    code_jax = "import ekd_jax; " + code_jax  # the project's XLA defaults, as every worker gets them
    code_torch = (
        "import json, torch; c = torch.cuda.is_available(); "
        "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, 'cuda_available': c, "
        "'cudnn': torch.backends.cudnn.version() if c else None, "
        "'gpu': torch.cuda.get_device_name(0) if c else None, "
        "'cudnn_allow_tf32': torch.backends.cudnn.allow_tf32, 'matmul_allow_tf32': torch.backends.cuda.matmul.allow_tf32}))"
    )
    procs = {
        "jax": subprocess.Popen([sys.executable, "-c", code_jax], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env, cwd=ROOT),
        "torch": subprocess.Popen([args.torch_python, "-c", code_torch], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT),
    }
    info = {"python": sys.version.split()[0], "orchestrator_python": sys.executable, "torch_python": args.torch_python}
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            r = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            info["nvidia_smi"] = f"failed: {e}"
    for k, p in procs.items():
        try:
            o, e = p.communicate(timeout=120)
            info[k] = json.loads(o.strip().splitlines()[-1]) if p.returncode == 0 and o.strip() else {"error": e[-800:]}
        except (subprocess.TimeoutExpired, ValueError) as e:
            p.kill()
            info[k] = {"error": f"{type(e).__name__}: {e}"}
    results.add({"phase": "env", "what": "versions", **info})
    log("env: " + json.dumps(info))
    return info


# =========================================================================== phase 1: step benchmarks


def torch_server(a) -> None:
    """Worker: benchmarks/torch_step.py's JointStep on CUDA (or CPU), protocol for ``Proc``.

    'ready BUILD_S' after building; 'warm K' -> K steps (cudnn.benchmark picks its algorithms
    then), answers 'ok SECONDS_PER_STEP' (the faster of the last two); 'N' -> N steps, answers
    'WALL CPU'; 'quit'."""
    t0 = time.perf_counter()
    sys.path.insert(0, str(HERE))
    import torch
    import torch_step

    dev = torch.device("cuda" if torch.cuda.is_available() and not a.cpu else "cpu")
    torch.backends.cudnn.benchmark = True
    if dev.type == "cpu":
        torch.set_num_threads(a.threads)
    js = torch_step.JointStep(a.pair, a.batch_size, a.num_classes, "ekd", "ekd", a.channels_last)
    for m in js.mods:
        m.to(dev)
    js.mean, js.std = js.mean.to(dev), js.std.to(dev)
    js.batches = [(x.to(dev), y.to(dev)) for x, y in js.batches]
    params = [p for m in js.mods for p in m.parameters()]
    js.opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    if dev.type == "cuda":
        torch.set_default_device(dev)  # views() draws its crop offsets / flips with factory calls
    bf16 = a.dtype == "bfloat16"

    def run(n: int) -> float:
        t = time.perf_counter()
        with (torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()):
            for _ in range(n):
                loss, _ = js.step()
        float(loss)  # waits for the device
        return time.perf_counter() - t

    print(f"ready {time.perf_counter() - t0:.3f} {dev}", flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line or line == "quit":
            break
        if line.startswith("warm"):
            k = max(3, int(line.split()[1]))
            per = [run(1) for _ in range(k)]
            print(f"ok {min(per[-2:]):.6f}", flush=True)
            continue
        c0 = time.process_time()
        wall = run(int(line))
        print(f"{wall:.6f} {time.process_time() - c0:.6f}", flush=True)


def _bench_cases(args) -> list[tuple[str, int, str]]:
    pairs, bss, dts = args.pairs.split(","), [int(b) for b in args.batch_sizes.split(",")], args.dtypes.split(",")
    cases = []
    for bs in bss:  # priority: the smallest batch first (both pairs and dtypes), then the larger
        for dt in dts:
            for pair in pairs:
                cases.append((pair, bs, dt))
    return cases


def _start_case(args, case, env, logs) -> list[tuple[str, Proc]]:
    pair, bs, dt = case
    tag = f"{pair}_b{bs}_{dt}"
    procs = []
    if not args.no_jax_bench:
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", "jax_serve", "--",
               "--serve_jax", "--pairs", pair, "--batch_sizes", str(bs),
               "--method", "ekd", "--adapter", "ekd", "--patches=", f"--override=dtype={dt}"]
        procs.append(("ekd_jax", Proc(f"jax {tag}", cmd, env, logs / f"bench_jax_{tag}.log")))
    for variant in filter(None, args.torch_variants.split(",")):
        cmd = [args.torch_python, str(pathlib.Path(__file__).resolve()), "--worker", "torch", "--pair", pair,
               "--batch_size", str(bs), "--dtype", dt, "--threads", str(args.torch_threads)]
        if variant == "cl":
            cmd.append("--channels_last")
        if args.platform == "cpu":
            cmd.append("--cpu")
        name = "torch" if variant == "nchw" else f"torch_{variant}"
        procs.append((name, Proc(f"{name} {tag}", cmd, env, logs / f"bench_{name}_{tag}.log")))
    return procs


def _time_case(args, case, procs, first: dict, deadline: float) -> dict:
    pair, bs, dt = case
    n = {name: max(1, round(args.chunk_seconds / max(first[name], 1e-5))) for name, _ in procs}
    times: dict[str, list[float]] = {name: [] for name, _ in procs}
    for r in range(args.rounds):
        if r and time.time() > deadline:
            break
        order = procs[r % len(procs):] + procs[: r % len(procs)]
        for name, p in order:
            if not p.alive() or not p.send(str(n[name])):
                continue
            line = p.read(timeout=max(30.0, 20 * args.chunk_seconds))
            if line and line[:1].isdigit():
                times[name].append(float(line.split()[0]) / n[name])
            else:
                p.kill()  # no answer in time: drop it rather than read its late answers as the next ones
    rec = {"phase": "bench", "pair": pair, "batch_size": bs, "dtype": dt, "rounds": args.rounds, "contenders": {}}
    for name, p in procs:
        if not times[name]:
            rec["contenders"][name] = {"error": "no timed chunk", "log": p.tail()}
            continue
        med = statistics.median(times[name])
        c = {"step_ms": 1e3 * med, "img_s": bs / med, "chunk_ms": [round(1e3 * t, 3) for t in times[name]],
             "steps_per_chunk": n[name]}
        c.update(first.get(name + "_extra", {}))
        if c.get("gflops_per_step"):
            c["achieved_tflops"] = c["gflops_per_step"] / med / 1e3
        rec["contenders"][name] = c
    j = rec["contenders"].get("ekd_jax", {})
    torches = {k: v for k, v in rec["contenders"].items() if k.startswith("torch") and "img_s" in v}
    if "img_s" in j and torches:
        best = max(torches, key=lambda k: torches[k]["img_s"])
        rec["jax_over_torch"] = {k: j["img_s"] / v["img_s"] for k, v in torches.items()}
        rec["jax_over_best_torch"] = j["img_s"] / torches[best]["img_s"]
        rec["best_torch"] = best
    return rec


def phase_bench(args, results: Results, deadline: float) -> None:
    env, logs = worker_env(args), args.out / "logs"
    cases = _bench_cases(args)
    n_contenders = (0 if args.no_jax_bench else 1) + len(list(filter(None, args.torch_variants.split(","))))
    per_case_timing = args.rounds * n_contenders * (args.chunk_seconds + 0.1) + 1.5  # + the torch warm-up
    group = max(1, args.bench_parallel)
    for g in range(0, len(cases), group):
        todo = cases[g:g + group]
        if left(deadline) < per_case_timing + 15:
            for c in cases[g:]:
                results.add({"phase": "bench", "pair": c[0], "batch_size": c[1], "dtype": c[2], "skipped": "no time left"})
            break
        log(f"bench: starting {len(todo)} case(s): {todo}")
        started = {c: _start_case(args, c, env, logs) for c in todo}
        ready_by = deadline - per_case_timing * len(todo)
        first: dict[tuple, dict] = {c: {} for c in todo}
        try:
            pending = [(c, name, p) for c in todo for name, p in started[c]]
            while pending and time.time() < ready_by:
                still = []
                time.sleep(0.2)
                for c, name, p in pending:
                    line = p.read(timeout=0.01)
                    if line and line.startswith("ready"):
                        parts = line.split(maxsplit=4)
                        if name == "ekd_jax":
                            first[c][name] = float(parts[1])
                            first[c][name + "_extra"] = {
                                "compile_s": float(parts[2]), "ready_s": round(time.time() - p.t_start, 1),
                                "gflops_per_step": float(parts[3]) / 1e9 if len(parts) > 3 and float(parts[3]) else None}
                        else:
                            first[c][name + "_extra"] = {"build_s": float(parts[1]), "device": parts[2] if len(parts) > 2 else ""}
                    elif p.alive() or line:
                        still.append((c, name, p))
                    else:
                        first[c][name + "_failed"] = p.tail()
                pending = still
            log(f"bench: ready ({len(todo) * len(started[todo[0]]) - len(pending)} processes), "
                f"{len(pending)} not ready")
            for c in todo:
                ok = []
                for name, p in started[c]:
                    if time.time() > deadline:
                        break
                    if name == "ekd_jax" and name not in first[c]:
                        continue
                    if name.startswith("torch"):
                        if name + "_extra" not in first[c] or not p.send("warm 5"):
                            continue
                        line = p.read(timeout=min(120.0, max(5.0, left(deadline))))
                        if not line or not line.startswith("ok"):
                            p.kill()  # still busy (or dead): its answers would come out of step
                            continue
                        first[c][name] = float(line.split()[1])
                    ok.append((name, p))
                if not ok or time.time() > deadline:
                    results.add({"phase": "bench", "pair": c[0], "batch_size": c[1], "dtype": c[2],
                                 "skipped": "no time left to time it" if ok else "no contender ready in time",
                                 "logs": {name: p.tail() for name, p in started[c]}})
                else:
                    rec = _time_case(args, c, ok, first[c], deadline)
                    for name, p in started[c]:
                        if name not in rec["contenders"]:
                            rec["contenders"][name] = {"error": "did not start", "log": p.tail()}
                    results.add(rec)
                    _print_bench(rec)
                for _, p in started[c]:
                    p.close(grace=3)
        finally:
            for c in todo:
                for _, p in started[c]:
                    p.kill()


def _print_bench(rec: dict) -> None:
    parts = [f"bench {rec['pair']} b{rec['batch_size']} {rec['dtype']}:"]
    for k, v in rec["contenders"].items():
        parts.append(f"{k} {v['img_s']:.0f} img/s ({v['step_ms']:.2f} ms)" if "img_s" in v else f"{k} failed")
    if "jax_over_best_torch" in rec:
        parts.append(f"jax/best torch {rec['jax_over_best_torch']:.2f}x")
    log(" ".join(parts))


# =========================================================================== JAX workers (train, calib)


def jax_serve(argv: list[str]) -> None:
    """Worker: ``benchmarks/compare_cpu.py --serve_jax ARGV`` (ekd_jax.bench's StepTimer behind the
    'ready' / 'N' line protocol) after the stubs for missing optional modules (PIL)."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(HERE))
    import ekd_jax  # noqa: F401

    install_stubs()
    import compare_cpu

    sys.argv = [str(HERE / "compare_cpu.py"), *argv]
    compare_cpu.main()


def _load_config(spec: str, overrides: dict):
    path, _, arg = spec.partition(":")
    sp = importlib.util.spec_from_file_location("gpu_check_config", ROOT / path)
    mod = importlib.util.module_from_spec(sp)
    sp.loader.exec_module(mod)
    cfg = mod.get_config(arg) if arg else mod.get_config()
    for k, v in overrides.items():
        node = cfg
        *keys, leaf = k.split(".")
        for key in keys:
            node = node[key]
        node[leaf] = tuple(v) if isinstance(v, list) else v
    return cfg


def _jax_worker_setup(a):
    sys.path.insert(0, str(ROOT))
    import ekd_jax  # noqa: F401  (the project's XLA defaults, before jax starts)

    stubbed = install_stubs()
    spec = json.loads(a.spec)
    cfg = _load_config(spec["config"], spec.get("overrides", {}))
    return spec, cfg, stubbed


def train_worker(a) -> None:
    """Worker: one ``train.train_and_evaluate`` run; prints 'RESULT {json}' at the end."""
    t0 = time.time()
    spec, cfg, stubbed = _jax_worker_setup(a)
    import jax

    from ekd_jax import checkpoint, train

    every = int(spec.get("ckpt_every", 0))
    if every > 1:  # the trainer saves every epoch; on a fast GPU that costs more than the epoch
        total = cfg.num_epochs
        save = checkpoint.Checkpointer.save

        def sparse_save(self, step, state, meta, best_key):
            e = meta["epoch"] + 1
            if e % every == 0 or e >= total:
                return save(self, step, state, meta, best_key)

        checkpoint.Checkpointer.save = sparse_save
    summary = train.train_and_evaluate(cfg, spec["workdir"])
    recs = [json.loads(x) for x in (pathlib.Path(spec["workdir"]) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    out = {k: v for k, v in summary.items() if k != "config"}
    out.update(_speed(recs), stubbed=stubbed, worker_wall_s=time.time() - t0, device=str(jax.devices()[0]))
    if spec.get("host_feed"):
        out["host_feed"] = _host_feed(cfg)
    print("RESULT " + json.dumps(out), flush=True)


def _speed(recs: list[dict]) -> dict:
    ips = [r["images_per_s"] for r in recs if "images_per_s" in r]
    steady = ips[1:] or ips
    return {"epochs_done": len(recs), "images_per_s_by_epoch": [round(x, 1) for x in ips],
            "images_per_s": statistics.median(steady) if steady else None}


def _host_feed(cfg, n: int = 100) -> dict:
    """The host's cost of one training batch as the loop makes it: data.train_batch (numpy
    gather) + parallel.shard_batch (device_put), waited for, without the step."""
    import jax

    from ekd_jax import data, parallel

    ds = data.load_dataset(cfg.data)
    mesh = parallel.make_mesh()
    bs = cfg.batch_size
    for i in range(5):
        jax.block_until_ready(parallel.shard_batch(dict(zip(("image", "label"), data.train_batch(ds, bs, 0, i))), mesh))
    t = time.perf_counter()
    for i in range(n):
        data.train_batch(ds, bs, 0, i)
    gather = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for i in range(n):
        x, y = data.train_batch(ds, bs, 0, i)
        jax.block_until_ready(parallel.shard_batch({"image": x, "label": y}, mesh))
    both = (time.perf_counter() - t) / n
    return {"batch_size": bs, "gather_ms": 1e3 * gather, "gather_and_put_ms": 1e3 * both}


def calib_worker(a) -> None:
    """Worker: the trainer's set-up and compiled programs, then one epoch (train + eval, no
    checkpoint) per 'epoch' line, answered 'TRAIN_S EVAL_S'; 'ready STARTUP_S COMPILE_S' first."""
    t0 = time.time()
    spec, cfg, _ = _jax_worker_setup(a)
    import jax

    from ekd_jax import outputs, step, train

    run = train.set_up(cfg, spec["workdir"])
    state = step.init_state(run.nets, run.tx, cfg.seed, run.mesh)
    steps = step.compile_steps(run.nets, run.tx, run.mesh)
    tc = time.time()
    steps.precompile(state, cfg.batch_size, cfg.eval_batch_size, run.ds.image_shape)
    out = outputs.RunWriter(run.workdir, enabled=False)
    print(f"ready {time.time() - t0:.3f} {time.time() - tc:.3f} {run.steps_per_epoch}", flush=True)
    epoch = 0
    for line in sys.stdin:
        line = line.strip()
        if not line or line == "quit":
            break
        t = time.time()
        state, _ = train.train_epoch(run, state, epoch, steps.train, out)
        jax.block_until_ready(state)
        t1 = time.time()
        train.evaluate(run, state, steps.eval)
        print(f"{t1 - t:.4f} {time.time() - t1:.4f}", flush=True)
        epoch += 1


# =========================================================================== phase 2: trainer end to end


def _run_train_proc(args, name: str, spec: dict, env: dict) -> Proc:
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", "train", "--spec", json.dumps(spec)]
    return Proc(name, cmd, env, args.out / "logs" / f"{name}.log")


def _wait_all(procs: list[Proc], deadline: float) -> bool:
    """Waits for every process to end; kills those still running at ``deadline``. True = all ended."""
    while any(p.alive() for p in procs):
        if time.time() > deadline:
            for p in procs:
                p.kill()
            return False
        time.sleep(0.5)
    time.sleep(0.3)  # the reader threads take the last lines
    return True


def phase_e2e(args, results: Results, deadline: float) -> None:
    env = worker_env(args)
    est = None
    for i, case in enumerate(filter(None, args.e2e_cases.split(","))):
        pair, dt, bs = case.split(":")
        if left(deadline) < 15 or (est is not None and left(deadline) < 1.2 * est):
            why = "no time left" + (f" (the last case took {est:.0f} s)" if est is not None else "")
            results.add({"phase": "e2e", "case": case, "skipped": why})
            continue
        workdir = args.out / "e2e" / f"{pair}_{dt}_b{bs}"
        spec = {"config": f"configs/cifar.py:cifar10,{pair}", "workdir": str(workdir), "host_feed": True,
                "overrides": {"data.source": f"npz:{args.data}", "dtype": dt, "batch_size": int(bs),
                              "num_epochs": args.e2e_epochs, "eval_every_epochs": args.e2e_epochs,
                              "eval_batch_size": args.eval_batch_size, "log_every_steps": 50}}
        log(f"e2e: {case}, {args.e2e_epochs} epochs")
        t = time.time()
        p = _run_train_proc(args, f"e2e_{pair}_{dt}_b{bs}", spec, env)
        finished = _wait_all([p], deadline)
        est = time.time() - t
        shutil.rmtree(workdir / "checkpoints", ignore_errors=True)  # a throwaway run: keep $OUT small
        rec = {"phase": "e2e", "case": case, "pair": pair, "dtype": dt, "batch_size": int(bs), "wall_s": est}
        if p.result:
            rec.update(p.result)
        else:
            rec.update(_partial(workdir), error="killed at the phase deadline" if not finished else "failed",
                       log=p.tail())
        bench = next((b for b in results.get("bench") if b.get("pair") == pair and b.get("dtype") == dt
                      and b.get("batch_size") == int(bs)), None)
        j = (bench or {}).get("contenders", {}).get("ekd_jax", {})
        if rec.get("images_per_s") and j.get("img_s"):
            rec["bench_img_s"] = j["img_s"]
            rec["loop_over_bench"] = rec["images_per_s"] / j["img_s"]
        results.add(rec)
        log("e2e: " + json.dumps({k: rec.get(k) for k in ("case", "images_per_s", "bench_img_s", "loop_over_bench",
                                                          "host_feed", "error")}))


def _partial(workdir: pathlib.Path) -> dict:
    p = workdir / "metrics.jsonl"
    recs = [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []
    out = _speed(recs)
    if recs:
        last = recs[-1]
        out.update({k: last.get(f"{w}/top1") for k, w in (("student_top1", "student"), ("teacher_top1", "teacher"))})
        out["last_epoch_record"] = last
    return out


# =========================================================================== phase 3: calibration


def _run_spec(args, method: str, seed: int, epochs: int, workdir: pathlib.Path) -> dict:
    ov = {"data.source": f"npz:{args.data}", "method": method, "seed": seed, "num_epochs": epochs,
          "checkpoint_keep": 1}
    ov.update(json.loads(args.train_overrides))
    return {"config": args.train_config, "workdir": str(workdir), "overrides": ov, "ckpt_every": args.ckpt_every}


def phase_calib(args, results: Results, deadline: float) -> dict | None:
    """Per-process epoch seconds with 3, 6, ... concurrent study runs; None if it could not run."""
    env = worker_env(args)
    if left(deadline) < 20:
        results.add({"phase": "calib", "config": args.train_config, "skipped": "no time left"})
        return None
    seeds = list(range(args.max_seeds))
    runs = [(m, s) for s in seeds for m in METHODS]
    procs = []
    for m, s in runs:
        spec = _run_spec(args, m, s, args.epochs, args.out / "calib" / f"{m}_s{s}")
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", "calib", "--spec", json.dumps(spec)]
        procs.append(Proc(f"calib_{m}_s{s}", cmd, env, args.out / "logs" / f"calib_{m}_s{s}.log"))
    log(f"calib: {len(procs)} processes compiling")
    rec: dict = {"phase": "calib", "config": args.train_config, "epochs_planned": args.epochs, "processes": len(procs)}
    try:
        ready, startup, compile_s, spe = [], {}, {}, None
        pending = list(procs)
        while pending and time.time() < deadline - 10:
            still = []
            time.sleep(0.2)
            for p in pending:
                line = p.read(timeout=0.01)
                if line and line.startswith("ready"):
                    parts = line.split()
                    startup[p.name], compile_s[p.name], spe = float(parts[1]), float(parts[2]), int(parts[3])
                    ready.append(p)
                elif p.alive():
                    still.append(p)
                else:
                    rec.setdefault("failed", {})[p.name] = p.tail()
            pending = still
        ready_set = {p.name for p in ready}
        ready = [p for p in procs if p.name in ready_set]  # in (seed, method) order
        for p in procs:
            if p.name not in ready_set:  # still compiling: it would disturb the timing
                p.kill()
        rec.update(startup_s=startup, compile_s=compile_s, steps_per_epoch=spe,
                   ready_after_s=max((time.time() - procs[0].t_start) if ready else 0, 0))
        if len(ready) < 3 or ready[:3] != procs[:3]:
            rec["error"] = "the first seed's three runs did not start in time"
            results.add(rec)
            return None
        rec["epoch_s"], rec["train_epoch_s"], rec["aggregate_img_s"] = {}, {}, {}
        for k in range(1, len(ready) // 3 + 1):
            active = ready[: 3 * k]
            last = None
            for _ in range(args.calib_epochs):
                if time.time() > deadline:
                    break
                for p in active:
                    p.send("epoch")
                got = [p.read(timeout=max(5.0, left(deadline))) for p in active]
                if any(not g or not g[:1].isdigit() for g in got):
                    break
                last = [tuple(float(x) for x in g.split()) for g in got]
            if last is None:
                break
            P = len(active)
            rec["epoch_s"][P] = max(a + b for a, b in last)
            rec["train_epoch_s"][P] = max(a for a, _ in last)
            bs = json.loads(args.train_overrides).get("batch_size", 64)
            rec["aggregate_img_s"][P] = sum(spe * bs / a for a, _ in last)
            log(f"calib: {P} concurrent runs: {rec['epoch_s'][P]:.2f} s/epoch per run (train+eval), "
                f"aggregate {rec['aggregate_img_s'][P]:.0f} img/s")
        results.add(rec)
        return rec if rec["epoch_s"] else None
    finally:
        for p in procs:
            p.close(grace=3)
            p.kill()


# =========================================================================== phase 4: the study runs


def _copy_writable(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Copies a tree without its permission bits (fetched results may be read-only)."""
    for d, _, files in os.walk(src):
        target = dst / pathlib.Path(d).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(os.path.join(d, f), target / f)


def _wave_estimate(cal: dict, n_seeds: int, epochs: int, args) -> float | None:
    P = 3 * n_seeds
    ep = cal["epoch_s"].get(P)
    if ep is None:  # not measured at this concurrency: assume the runs share the GPU linearly
        P0 = max(cal["epoch_s"])
        ep = cal["epoch_s"][P0] * P / P0
    startup = max(cal["startup_s"].values())
    saves = epochs / max(1, args.ckpt_every) * 0.5
    return startup + epochs * ep * 1.05 + saves + 10.0  # + finish (networks, summary)


def phase_train(args, results: Results, cal: dict | None, deadline: float) -> None:
    env = worker_env(args)
    root = args.out / "train"
    plan_path = args.out / "plan.json"
    plan = None
    if args.resume_from:
        prev = pathlib.Path(args.resume_from)
        if (prev / "train").is_dir():
            _copy_writable(prev / "train", root)
        if (prev / "plan.json").exists():
            plan = json.loads((prev / "plan.json").read_text())
            log(f"train: resuming the plan of {prev}: {plan}")
            # The runs' configs must be the same as before, or the trainer refuses their checkpoints.
            args.train_config, args.data, args.ckpt_every = plan["config"], plan["data"], plan["ckpt_every"]
            args.train_overrides = json.dumps(plan["train_overrides"])
            plan_path.write_text(json.dumps(plan, indent=1))
    if plan is None:
        if cal is None:
            results.add({"phase": "train", "skipped": "no calibration (and no --resume_from plan)"})
            return
        budget = left(deadline)
        epochs, n1 = args.epochs, 0
        for n in range(args.max_seeds, 0, -1):
            if _wave_estimate(cal, n, epochs, args) <= budget:
                n1 = n
                break
        if n1 == 0:  # not one seed at the full schedule: the longest one seed fits
            per = _wave_estimate(cal, 1, 1, args) - _wave_estimate(cal, 1, 0, args)
            epochs = int((budget - _wave_estimate(cal, 1, 0, args)) / per)
            n1 = 1
        plan = {"epochs": epochs, "seeds": list(range(args.max_seeds)), "first_wave_seeds": n1,
                "config": args.train_config, "data": args.data, "train_overrides": json.loads(args.train_overrides),
                "ckpt_every": args.ckpt_every, "estimate_s": _wave_estimate(cal, n1, epochs, args), "budget_s": budget}
        if epochs < args.min_epochs:
            results.add({"phase": "train", "skipped": f"only {epochs} epochs would fit (< --min_epochs {args.min_epochs})",
                         "plan": plan})
            return
        plan_path.write_text(json.dumps(plan, indent=1))
    results.add({"phase": "train", "what": "plan", **plan})
    log(f"train: plan {plan['epochs']} epochs, first wave {plan['first_wave_seeds']} seed(s), "
        f"estimated {plan.get('estimate_s', 0):.0f} s of {left(deadline):.0f} s left")
    epochs, todo = plan["epochs"], list(plan["seeds"])
    n = plan.get("first_wave_seeds", 1)
    wave_s_per_seed = None
    while todo and n > 0:
        wave, todo = todo[:n], todo[n:]
        t = time.time()
        procs = []
        for s in wave:
            for m in METHODS:
                workdir = root / f"{m}_s{s}_e{epochs}"
                summ = workdir / "summary.json"
                if summ.exists():
                    done = json.loads(summ.read_text())
                    results.add({"phase": "train", "method": m, "seed": s, "epochs": epochs, "reused": True,
                                 **{k: v for k, v in done.items() if k != "config"}, **_speed(_records(workdir))})
                    continue
                procs.append((m, s, workdir, _run_train_proc(args, f"train_{m}_s{s}_e{epochs}",
                                                             _run_spec(args, m, s, epochs, workdir), env)))
        log(f"train: wave of seed(s) {wave}: {len(procs)} run(s) at {epochs} epochs")
        interrupted = None
        try:
            finished = _wait_all([p for *_, p in procs], deadline)
        except KeyboardInterrupt as e:  # SIGTERM from outside: still record what the runs reached
            for *_, p in procs:
                p.kill()
            finished, interrupted = False, e
        for m, s, workdir, p in procs:
            rec = {"phase": "train", "method": m, "seed": s, "epochs": epochs}
            if p.result:
                rec.update(p.result, finished=True)
                if not args.keep_finished_checkpoints:  # summary.json marks it done; resume needs no state
                    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
            else:
                rec.update(_partial(workdir), finished=False, log=p.tail(),
                           error="killed at the deadline (checkpoints kept: --resume_from continues)"
                           if not finished else "failed")
            results.add(rec)
            log(f"train: {m} seed {s}: " + json.dumps({k: rec.get(k) for k in (
                "finished", "epochs_done", "student_top1", "teacher_top1", "best_student_top1", "images_per_s")}))
        if interrupted is not None:
            raise interrupted
        if not finished:
            results.add({"phase": "train", "what": "stopped", "seeds_not_started": todo})
            return
        took = time.time() - t
        wave_s_per_seed = took / max(1, len(wave)) if procs else wave_s_per_seed
        if not todo:
            break
        # Next wave: as many of the remaining seeds as the measured wave time says fit.
        per = wave_s_per_seed or 0.0
        n = 0
        for k in range(len(todo), 0, -1):
            est = per * k if per else 0.0
            if cal is not None and 3 * k in cal["epoch_s"] and 3 * len(wave) in cal["epoch_s"]:
                est = took * cal["epoch_s"][3 * k] / cal["epoch_s"][3 * len(wave)]
            if est * 1.1 <= left(deadline):
                n = k
                break
        if n == 0:
            results.add({"phase": "train", "what": "stopped", "seeds_not_started": todo,
                         "why": f"the next wave needs about {per:.0f} s per seed, {left(deadline):.0f} s left"})


def _records(workdir: pathlib.Path) -> list[dict]:
    p = workdir / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


# =========================================================================== summary


def _fmt(x, spec=".1f", none="-"):
    return none if x is None else format(x, spec)


def summarize(args, results: Results) -> str:
    def get(phase):
        return [r for r in results.get(phase) if "traceback" not in r]

    L = []
    env = next((r for r in get("env") if r.get("what") == "versions"), {})
    j, t = env.get("jax", {}), env.get("torch", {})
    L.append(f"== GPU check ({time.time() - T0:.0f} s of {args.budget:.0f} s budget) ==")
    L.append(f"python {env.get('python')} | jax {j.get('jax')} {j.get('backend')} {j.get('device_kind')} | "
             f"torch {t.get('torch')} cuda {t.get('cuda')} cudnn {t.get('cudnn')} {t.get('gpu')} | {env.get('nvidia_smi', '')}")
    wh = next((r for r in get("env") if r.get("what") == "wheels"), None)
    if wh:
        L.append(f"wheels: installed {wh['installed'] + wh['unpacked']}, still missing {wh['missing']}")
    L.append("")
    L.append("-- joint step (ekd, CE+CE+KD+adapter MSE), img/s; ratio = ekd_jax / best PyTorch --")
    L.append(f"{'pair':22s} {'batch':>5s} {'dtype':9s} {'ekd_jax':>9s} {'torch':>9s} {'torch_cl':>9s} {'ratio':>6s} "
             f"{'jax ms':>8s} {'compile s':>9s} {'TFLOP/s':>8s}")
    for r in get("bench"):
        if "skipped" in r:
            L.append(f"{r['pair']:22s} {r['batch_size']:5d} {r['dtype']:9s} skipped: {r['skipped']}")
            continue
        c = r["contenders"]
        jj = c.get("ekd_jax", {})
        L.append(f"{r['pair']:22s} {r['batch_size']:5d} {r['dtype']:9s} {_fmt(jj.get('img_s'), '.0f'):>9s} "
                 f"{_fmt(c.get('torch', {}).get('img_s'), '.0f'):>9s} {_fmt(c.get('torch_cl', {}).get('img_s'), '.0f'):>9s} "
                 f"{_fmt(r.get('jax_over_best_torch'), '.2f'):>6s} {_fmt(jj.get('step_ms'), '.2f'):>8s} "
                 f"{_fmt(jj.get('compile_s')):>9s} {_fmt(jj.get('achieved_tflops'), '.2f'):>8s}")
    L.append("")
    L.append("-- trainer end to end (train_and_evaluate on the npz) vs the bench --")
    for r in get("e2e"):
        if "skipped" in r:
            L.append(f"{r['case']}: skipped ({r['skipped']})")
            continue
        hf = r.get("host_feed") or {}
        ratio = r.get("loop_over_bench")
        verdict = ""
        if ratio is not None:
            verdict = ("the host feeding the loop is the bottleneck" if ratio < 0.7 else
                       "the loop is somewhat below the step (host overhead)" if ratio < 0.9 else
                       "the loop runs at the step's speed")
        L.append(f"{r['case']}: loop {_fmt(r.get('images_per_s'), '.0f')} img/s (by epoch {r.get('images_per_s_by_epoch')}), "
                 f"bench {_fmt(r.get('bench_img_s'), '.0f')} img/s, loop/bench {_fmt(ratio, '.2f')}; host feed "
                 f"{_fmt(hf.get('gather_and_put_ms'), '.2f')} ms/batch (gather {_fmt(hf.get('gather_ms'), '.2f')} ms) "
                 + (f"-> {verdict}" if verdict else "") + (f" [error: {r['error']}]" if r.get("error") else ""))
    L.append("")
    for r in get("calib"):
        L.append(f"-- concurrent study runs ({r['config']}), startup {_fmt(max(r.get('startup_s', {0: 0}).values() or [0]))} s --")
        for P, e in (r.get("epoch_s") or {}).items():
            L.append(f"{P} runs at once: {e:.2f} s/epoch per run (train {r['train_epoch_s'][P]:.2f}), "
                     f"aggregate {r['aggregate_img_s'][P]:.0f} img/s")
        if r.get("error") or r.get("skipped"):
            L.append(f"calib: {r.get('error') or 'skipped: ' + r['skipped']} {r.get('failed', '')}")
    L.append("")
    plan = next((r for r in get("train") if r.get("what") == "plan"), None)
    if plan:
        L.append(f"-- study runs: {plan['config']}, {plan['epochs']} epochs --")
    runs = [r for r in get("train") if "method" in r]
    if runs:
        L.append(f"{'method':8s} {'seed':>4s} {'epochs':>9s} {'student':>8s} {'teacher':>8s} {'best st.':>8s} {'img/s':>7s} state")
        for r in runs:
            st = "done" if r.get("finished") or r.get("reused") else "partial"
            L.append(f"{r['method']:8s} {r['seed']:4d} {str(r.get('epochs_done')) + '/' + str(r['epochs']):>9s} "
                     f"{_fmt(r.get('student_top1') and 100 * r['student_top1'], '.2f'):>8s} "
                     f"{_fmt(r.get('teacher_top1') and 100 * r['teacher_top1'], '.2f'):>8s} "
                     f"{_fmt(r.get('best_student_top1') and 100 * r['best_student_top1'], '.2f'):>8s} "
                     f"{_fmt(r.get('images_per_s'), '.0f'):>7s} {st}")
        by = {}
        for r in runs:
            if (r.get("finished") or r.get("reused")) and r.get("student_top1") is not None:
                by.setdefault(r["method"], []).append(r["student_top1"])
        if by:
            L.append("mean student top-1: " + ", ".join(
                f"{m} {100 * statistics.mean(v):.2f}% (n={len(v)})" for m, v in by.items()))
    for r in get("train"):
        if "skipped" in r or r.get("what") == "stopped":
            L.append(f"train: {r.get('skipped') or ('stopped; seeds not started: ' + str(r.get('seeds_not_started')) + ' ' + r.get('why', ''))}")
    for r in results.items:
        if "traceback" in r:
            L.append(f"{r['phase']}: ERROR {r['error']} (traceback in results.jsonl)")
    return "\n".join(L)


# =========================================================================== main


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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
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
    # workers
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
        tiny = {"pairs": "resnet14-resnet8", "batch_sizes": "16", "rounds": 2, "chunk_seconds": 0.3,
                "bench_budget": 90.0, "e2e_cases": "resnet14-resnet8:float32:16", "e2e_epochs": 2,
                "e2e_budget": 80.0, "eval_batch_size": 100, "torch_threads": 1, "epochs": 3, "min_epochs": 1, "max_seeds": 1,
                "calib_epochs": 1, "calib_budget": 80.0, "ckpt_every": 2, "budget": 400.0, "platform": "cpu",
                "train_overrides": json.dumps({"batch_size": 32, "eval_batch_size": 100, "log_every_steps": 8})}
        for k, v in tiny.items():
            if f"--{k}" not in given:
                setattr(a, k, v)
    return a


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:3] == ["--worker", "jax_serve", "--"]:
        jax_serve(argv[3:])
        return 0
    a = parse_args(argv)
    if a.worker == "torch":
        torch_server(a)
        return 0
    if a.worker in ("train", "calib"):
        (train_worker if a.worker == "train" else calib_worker)(a)
        return 0

    deadline = T0 + a.budget - a.margin
    a.out = pathlib.Path(a.out).absolute()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "logs").mkdir(exist_ok=True)
    results = Results(a.out)
    log(f"gpu_check: python {sys.version.split()[0]} ({sys.executable}), out {a.out}, budget {a.budget:.0f} s")
    if a.wheels:
        rep = install_wheels(a.wheels, pathlib.Path("/tmp/ekd_gpu_check_pylib"), results)
        log(f"wheels: {rep}")
        if any(NEEDED[m] in rep["missing"] for m in NEEDED):
            log("error: a required dependency is missing (see benchmarks/gpu_wheels.sh); the JAX phases will fail")
    if a.tiny:
        a.data = _tiny_data(a)
    if a.data:  # relative to the repository root when inside it: a resumed run's config must match
        d = pathlib.Path(a.data).absolute()
        a.data = str(d.relative_to(ROOT)) if d.is_relative_to(ROOT) else str(d)
    phases = set(a.phases.split(","))
    needs_data = phases & {"e2e", "calib", "train"}
    if needs_data and not (a.data and (ROOT / a.data).exists()):
        log(f"error: --data {a.data!r} is not a file; the e2e / study phases are skipped")
        phases -= {"e2e", "calib", "train"}
    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    def phase(name, fn, *fargs):
        """Runs one phase; an error in it is recorded and the next phase still runs."""
        try:
            return fn(a, results, *fargs)
        except Exception as e:  # noqa: BLE001
            import traceback

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
        cal = None
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


if __name__ == "__main__":
    sys.exit(main())
