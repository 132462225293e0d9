"""The GPU check's worker processes: ``benchmarks/gpu_check.py --worker KIND`` (started by the phases).

* ``torch``: benchmarks/torch_step.py's JointStep moved to CUDA (or CPU), a step server (phase 1);
  run by ``--torch_python``, which needs torch only.
* ``jax_serve -- ARGS``: ``benchmarks/compare_cpu.py --serve_jax ARGS`` (ekd_jax.bench's StepTimer) behind
  the stubs for missing optional modules (phase 1).
* ``train``: one ``ekd_jax.train.train_and_evaluate`` run; prints ``RESULT {json}`` at the end (phases 2, 4).
* ``calib``: the trainer's set-up and compiled programs, then one epoch per command (phase 3).

A JAX worker's run is described by ``--spec JSON``: {config: "path.py[:arg]", workdir, overrides: {dotted
key: value}, ckpt_every, host_feed}. Step servers answer 'ready ...' once built, then 'N' (run N steps)
with 'WALL_S CPU_S'; 'quit' ends every worker.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import time

from gpu.common import BENCHMARKS, ROOT, read_metrics, speed
from gpu.env import install_stubs


def torch_server(a) -> None:
    """Worker: benchmarks/torch_step.py's JointStep on CUDA (or CPU with ``--cpu``), bf16 by autocast.

    'ready BUILD_S DEVICE' after building; 'warm K' -> K steps (cudnn.benchmark picks its algorithms
    then), answers 'ok SECONDS_PER_STEP' (the faster of the last two); 'N' -> N steps, answers
    'WALL CPU'; 'quit'."""
    t0 = time.perf_counter()
    sys.path.insert(0, str(BENCHMARKS))
    import torch
    import torch_step
    from compare_cpu import serve  # the chunk protocol (standard library only)

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
    js.opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)  # as JointStep's, on the device
    if dev.type == "cuda":
        torch.set_default_device(dev)  # views() draws its crop offsets / flips with factory calls
    bf16 = a.dtype == "bfloat16"

    def run(n: int) -> float:  # JointStep.run waits for the device (float(loss)) before it stops the clock
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            return js.run(n)

    def warm(k: int) -> str:
        per = [run(1) for _ in range(max(3, k))]
        return f"ok {min(per[-2:]):.6f}"

    print(f"ready {time.perf_counter() - t0:.3f} {dev}", flush=True)
    serve(run, warm)


def jax_serve(argv: list[str]) -> None:
    """Worker: ``benchmarks/compare_cpu.py --serve_jax ARGV`` (ekd_jax.bench's StepTimer behind the
    'ready FIRST_S COMPILE_S FLOPS' / 'N' line protocol) after the stubs for missing optional modules."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(BENCHMARKS))
    import ekd_jax  # noqa: F401  (the project's XLA defaults, before jax starts)

    install_stubs()
    import compare_cpu

    sys.argv = [str(BENCHMARKS / "compare_cpu.py"), *argv]
    compare_cpu.main()


# --------------------------------------------------------------------------- training runs


def _load_config(spec: str, overrides: dict):
    """The ConfigDict of a config file 'path.py[:arg]' (relative to the repository), with dotted overrides."""
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
        node[leaf] = tuple(v) if isinstance(v, list) else v  # JSON has no tuples
    return cfg


def _jax_worker_setup(a):
    sys.path.insert(0, str(ROOT))
    import ekd_jax  # noqa: F401  (the project's XLA defaults, before jax starts)

    stubbed = install_stubs()
    spec = json.loads(a.spec)
    cfg = _load_config(spec["config"], spec.get("overrides", {}))
    return spec, cfg, stubbed


def _save_every(every: int, total_epochs: int) -> None:
    """Makes the trainer checkpoint every ``every`` epochs (and the last) instead of after each one:
    on a fast GPU a save costs more than the epoch, and the spec has no option for it."""
    from ekd_jax import checkpoint

    save = checkpoint.Checkpointer.save

    def sparse_save(self, step, state, meta, best_key):
        e = meta["epoch"] + 1
        if e % every == 0 or e >= total_epochs:
            return save(self, step, state, meta, best_key)

    checkpoint.Checkpointer.save = sparse_save


def train_worker(a) -> None:
    """Worker: one ``train.train_and_evaluate`` run; prints 'RESULT {json}' (its summary, speed and,
    with ``host_feed``, the host's cost of one batch) at the end."""
    t0 = time.time()
    spec, cfg, stubbed = _jax_worker_setup(a)
    import jax

    from ekd_jax import train

    if int(spec.get("ckpt_every", 0)) > 1:
        _save_every(int(spec["ckpt_every"]), cfg.num_epochs)
    summary = train.train_and_evaluate(cfg, spec["workdir"])
    out = {k: v for k, v in summary.items() if k != "config"}
    out.update(speed(read_metrics(spec["workdir"])), stubbed=stubbed, worker_wall_s=time.time() - t0,
               device=str(jax.devices()[0]))
    if spec.get("host_feed"):
        out["host_feed"] = _host_feed(cfg)
    print("RESULT " + json.dumps(out), flush=True)


def _host_feed(cfg, n: int = 100) -> dict:
    """The host's cost of one training batch as the loop makes it: the source's train_batch (numpy
    gather) + parallel.shard_batch (device_put), waited for, without the step."""
    import jax

    from ekd_jax import data, parallel
    from ekd_jax.spec.validate import validate_data

    ds = data.load(validate_data(cfg.data))
    mesh = parallel.make_mesh()
    bs = cfg.batch_size

    def put(x, y):
        return jax.block_until_ready(parallel.shard_batch({"image": x, "label": y}, mesh))

    for i in range(5):
        put(*ds.train_batch(bs, 0, i))
    t = time.perf_counter()
    for i in range(n):
        ds.train_batch(bs, 0, i)
    gather = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for i in range(n):
        put(*ds.train_batch(bs, 0, i))
    both = (time.perf_counter() - t) / n
    return {"batch_size": bs, "gather_ms": 1e3 * gather, "gather_and_put_ms": 1e3 * both}


def calib_worker(a) -> None:
    """Worker: the trainer's set-up and compiled programs, then one epoch (train + eval, no
    checkpoint) per 'epoch' line, answered 'TRAIN_S EVAL_S'; 'ready STARTUP_S COMPILE_S STEPS_PER_EPOCH' first."""
    t0 = time.time()
    spec, cfg, _ = _jax_worker_setup(a)
    import jax

    from ekd_jax import outputs, train
    from ekd_jax.feed import Feed

    run = train.set_up(cfg, spec["workdir"])
    state = run.built.init_state(run.spec.seed, run.mesh)
    steps = run.built.compile(run.mesh)
    feed = Feed(run.ds, run.spec.batch_size, run.spec.seed, run.spec.steps_per_call, run.mesh, run.spec.data.on_device)
    tc = time.time()
    steps.precompile(state, feed.abstract(), feed.resident, run.spec.eval_batch_size, run.ds.image_shape)
    out = outputs.RunWriter(run.workdir, enabled=False)
    print(f"ready {time.time() - t0:.3f} {time.time() - tc:.3f} {run.steps_per_epoch}", flush=True)
    for epoch, line in enumerate(sys.stdin):
        line = line.strip()
        if not line or line == "quit":
            break
        t = time.time()
        state, _ = train.train_epoch(run, state, epoch, steps, feed, out)
        jax.block_until_ready(state)
        t1 = time.time()
        train.evaluate(run, state, steps.eval)
        print(f"{t1 - t:.4f} {time.time() - t1:.4f}", flush=True)
