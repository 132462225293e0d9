"""ekd_jax's joint train step vs the PyTorch reference (benchmarks/torch_step.py), side by side on CPU.

  .venv/bin/python benchmarks/compare_cpu.py                       # both pairs, batch 64
  .venv/bin/python benchmarks/compare_cpu.py --pairs resnet56-resnet20 --batch_sizes 32,64,128,256
  # A/B of XLA flags or patches (no torch): each --jax is NAME|FLAGS|PATCHES; FLAGS 'default' =
  # the project's defaults (ekd_jax/xla_setup.py), anything else replaces XLA_FLAGS (EKD_JAX_XLA_DEFAULTS=0).
  .venv/bin/python benchmarks/compare_cpu.py --no_torch --jax 'base|default|' \
      --jax 'nofuse|--xla_disable_hlo_passes=fusion|' --jax 'plain|default|plain_relu'

The machine is shared and noisy, so contenders are never timed minutes apart: each runs in its
own subprocess (PyTorch via ``torch_step.py --serve`` in its own venv, each JAX variant via this
script's ``--serve_jax``, so XLA flags can differ) and they take turns chunk by chunk, one at a
time, each chunk about ``--chunk_seconds``; the order rotates every round. Reported per pair and
batch: each contender's median ms/step and images/s, the ratio of medians to the first contender
(for the default run: ekd_jax speed / PyTorch speed, > 1 = ekd_jax faster), the median of the
per-round ratios, the JAX compile seconds and the CPU time / wall time of each chunk (about 2.0
when the process had both cores; lower = the machine was busy).

The JAX step is the one ``python -m ekd_jax.bench`` times: configs/cifar.py:cifar100,<pair> with
method 'ekd' and its default loss (CE + CE + KD(T=4) + adapter MSE on the 3 stage pairs, no
co-evolution term), built as the trainer builds it (ekd_jax.build). Both sides use the same adapter
(``--adapter``): 'ekd' = ekd_jax's 3x3 conv -> BN -> ReLU -> 1x1 conv, '1x1' = 1x1 conv -> BN (the
JAX side then patches ekd_jax.guided.Adapter in its process only).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
HERE = pathlib.Path(__file__).resolve().parent


def jax_timer(pair: str, batch_size: int, method: str, overrides: list[str]):
    """bench.StepTimer for configs/cifar.py:cifar100,<pair> (compiled, not yet run)."""
    sys.path.insert(0, str(ROOT))
    from configs import cifar
    from ekd_jax import bench

    cfg = cifar.get_config(f"cifar100,{pair}")
    cfg.method = method
    cfg.batch_size = batch_size
    for o in overrides:  # key=value on the config, e.g. loss.beta=0 or dtype=bfloat16
        k, v = o.split("=", 1)
        node = cfg
        *path, leaf = k.split(".")
        for p in path:
            node = node[p]
        node[leaf] = v if isinstance(node[leaf], str) else type(node[leaf])(json.loads(v))
    spec = bench.spec_for(cfg)
    n_cls, shape = bench.data_shape(spec)
    return bench.StepTimer.build(spec, n_cls, shape)


def serve_jax(a) -> None:
    """Subprocess side: build, warm up, then run N steps per stdin line; prints 'wall cpu'."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(HERE))
    import ekd_jax  # noqa: F401  (XLA defaults, unless EKD_JAX_XLA_DEFAULTS=0)
    import patches

    if a.adapter == "1x1":
        patches.adapter_1x1()
    names = [x for x in a.patches.split(",") if x and "=" not in x]
    overrides = a.override + [x for x in a.patches.split(",") if "=" in x]  # 'key=value' items: config
    patches.apply(",".join(names))
    method = a.method
    for o in list(overrides):
        if o.startswith("method="):
            method = o.split("=", 1)[1]
            overrides.remove(o)
    jt = jax_timer(a.pair, a.batch_size, method, overrides)
    first = min(jt.run(1), jt.run(1))
    flops = jt.flops or 0.0
    print(f"ready {first:.6f} {jt.compile_s:.3f} {flops:.0f} {os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    serve(jt.run)


def serve(run, warm=None) -> None:
    """A contender's side of the chunk protocol, after its 'ready' line: each stdin line 'N' runs N steps
    (``run(n)`` -> their wall seconds) and answers 'WALL_S CPU_S'; 'quit' or EOF ends. ``warm``: also
    'warm K' -> the line ``warm(K)`` returns (benchmarks/gpu/workers.py's PyTorch server)."""
    for line in sys.stdin:
        line = line.strip()
        if not line or line == "quit":
            break
        if warm is not None and line.startswith("warm"):
            print(warm(int(line.split()[1])), flush=True)
            continue
        c0 = time.process_time()
        wall = run(int(line))
        print(f"{wall:.6f} {time.process_time() - c0:.6f}", flush=True)


class Server:
    """One contender in a subprocess, answering 'N' with the wall (and CPU) seconds of N steps."""

    def __init__(self, name, cmd, env):
        self.name = name
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        line = self.p.stdout.readline().split(maxsplit=4)
        if not line or line[0] != "ready":
            raise RuntimeError(f"{name} did not start (got {line!r}); command: {' '.join(cmd)}")
        self.first = float(line[1])
        self.compile_s = float(line[2]) if len(line) > 2 else None
        self.flops = float(line[3]) if len(line) > 3 else None
        self.xla_flags = line[4] if len(line) > 4 else None

    def run(self, n: int) -> tuple[float, float | None]:
        self.p.stdin.write(f"{n}\n")
        self.p.stdin.flush()
        parts = self.p.stdout.readline().split()
        return float(parts[0]), (float(parts[1]) if len(parts) > 1 else None)

    def close(self):
        try:
            self.p.stdin.write("quit\n")
            self.p.stdin.flush()
            self.p.wait(timeout=30)
        except Exception:  # noqa: BLE001
            self.p.kill()


def start(args, spec, pair, bs) -> Server:
    kind, name, flags, extra = spec
    env = dict(os.environ)
    pin = ["taskset", "-c", args.cpus] if args.cpus else []
    if kind == "torch":
        for assignment in filter(None, flags.split()):  # e.g. OMP_WAIT_POLICY=PASSIVE
            k, v = assignment.split("=", 1)
            env[k] = v
        env.setdefault("OMP_NUM_THREADS", str(args.threads))
        cmd = [*pin, args.torch_python, str(HERE / "torch_step.py"), "--serve", "--pair", pair, "--batch_size", str(bs),
               "--adapter", args.adapter, "--method", args.method, "--threads", str(args.threads), *extra.split()]
        return Server(name, cmd, env)
    for token in [t for t in flags.split() if t.startswith("env:")]:  # e.g. env:GLIBC_TUNABLES=glibc.malloc.hugetlb=1
        k, v = token[len("env:"):].split("=", 1)
        env[k] = v
    flags = " ".join(t for t in flags.split() if not t.startswith("env:")) if "env:" in flags else flags
    if flags != "default":
        env["EKD_JAX_XLA_DEFAULTS"] = "0"
        env["XLA_FLAGS"] = flags
    cmd = [*pin, sys.executable, str(HERE / "compare_cpu.py"), "--serve_jax", "--pairs", pair, "--batch_sizes", str(bs),
           "--method", args.method, "--adapter", args.adapter, f"--patches={extra}",
           *[f"--override={o}" for o in args.override]]
    return Server(name, cmd, env)


def compare(args, contenders, pair: str, batch_size: int) -> dict:
    t0 = time.perf_counter()
    servers = []
    try:
        for spec in contenders:  # started one after another: compiles do not overlap
            servers.append(start(args, spec, pair, batch_size))
        n = {s.name: max(1, round(args.chunk_seconds / s.first)) for s in servers}
        times = {s.name: [] for s in servers}
        util = {s.name: [] for s in servers}
        cpu_t = {s.name: [] for s in servers}
        for r in range(args.rounds):
            order = servers[r % len(servers):] + servers[: r % len(servers)]
            if (r // len(servers)) % 2:
                order = order[::-1]
            for s in order:
                time.sleep(args.pause)
                wall, cpu = s.run(n[s.name])
                times[s.name].append(wall / n[s.name])
                if cpu is not None:
                    util[s.name].append(cpu / wall)
                    cpu_t[s.name].append(cpu / n[s.name])
    finally:
        for s in servers:
            s.close()
    ref = servers[0].name
    res = {"pair": pair, "batch_size": batch_size, "method": args.method, "adapter": args.adapter,
           "reference": ref, "contenders": {}, "wall_s": time.perf_counter() - t0, "loadavg": os.getloadavg()}
    for s, spec in zip(servers, contenders):
        med = statistics.median(times[s.name])
        res["contenders"][s.name] = {
            "kind": spec[0],
            "xla_flags" if spec[0] == "jax" else "env": spec[2],
            "patches" if spec[0] == "jax" else "torch_args": spec[3],
            "img_s": batch_size / med,
            "step_ms": 1e3 * med,
            "ratio": statistics.median(times[ref]) / med,
            "ratio_per_round_median": statistics.median(a / b for a, b in zip(times[ref], times[s.name])),
            "compile_s": s.compile_s,
            "gflops_per_step": s.flops / 1e9 if s.flops else None,
            "cpu_per_wall": statistics.median(util[s.name]) if util[s.name] else None,
            "cpu_ms_per_step": 1e3 * statistics.median(cpu_t[s.name]) if cpu_t[s.name] else None,
            "cpu_ratio": (statistics.median(cpu_t[ref]) / statistics.median(cpu_t[s.name])
                          if cpu_t[s.name] and cpu_t[ref] else None),
            "best_chunk_ratio": min(times[ref]) / min(times[s.name]),
            "chunk_ms": [round(1e3 * x, 1) for x in times[s.name]],
            "steps_per_chunk": n[s.name],
        }
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default="resnet56-resnet20,resnet32x4-resnet8x4")
    p.add_argument("--batch_sizes", default="64")
    p.add_argument("--method", choices=("ekd", "vanilla"), default="ekd")
    p.add_argument("--adapter", choices=("ekd", "1x1"), default="ekd")
    p.add_argument("--jax", action="append", metavar="NAME|FLAGS|PATCHES",
                   help="a JAX contender (repeatable): name, XLA_FLAGS ('default' = the project's defaults; tokens "
                        "'env:K=V' set environment variables instead) and "
                        "benchmarks/patches.py names (and config key=value items, e.g. method=vanilla), "
                        "'|'-separated; default: 'ekd_jax|default|'")
    p.add_argument("--torch", action="append", metavar="NAME|ENV|ARGS",
                   help="a PyTorch contender (repeatable): name, environment assignments (space-separated, e.g. "
                        "'OMP_WAIT_POLICY=PASSIVE') and extra torch_step.py flags (e.g. '--channels_last'); "
                        "default: 'torch||'")
    p.add_argument("--no_torch", action="store_true", help="leave PyTorch out (A/B of JAX variants)")
    p.add_argument("--cpus", default=None, help="pin every contender to these CPUs (taskset -c), e.g. '0'; "
                   "--threads should then match their number")
    p.add_argument("--rounds", type=int, default=6, help="alternation rounds (one chunk of each per round)")
    p.add_argument("--chunk_seconds", type=float, default=3.0)
    p.add_argument("--pause", type=float, default=0.2, help="seconds idle before each chunk")
    p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads")
    p.add_argument("--torch_python", default="/work/torchvenv/bin/python")
    p.add_argument("--override", action="append", default=[], help="ekd_jax config key=value (repeatable)")
    p.add_argument("--out", default=None, help="append one JSON line per comparison to this file")
    p.add_argument("--serve_jax", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--patches", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve_jax:
        a.pair, a.batch_size = a.pairs, int(a.batch_sizes)
        return serve_jax(a)
    def parse(kind, specs):
        out = []
        for spec in specs:
            parts = spec.split("|")
            if len(parts) != 3:
                p.error(f"--{kind} {spec!r}: expected three '|'-separated fields")
            out.append((kind, *parts))
        return out

    contenders = ([] if a.no_torch else parse("torch", a.torch or ["torch||"])) + parse("jax", a.jax or ["ekd_jax|default|"])
    if len({c[1] for c in contenders}) != len(contenders):
        p.error("contender names must differ")
    print(f"{'pair':22s} {'batch':>5s} {'contender':14s} {'img/s':>8s} {'ratio':>6s} {'rnd-ratio':>9s} "
          f"{'compile s':>9s} {'cpu/wall':>8s} {'cpu-ratio':>9s} {'best-ratio':>10s}", flush=True)
    for pair in a.pairs.split(","):
        for bs in (int(b) for b in a.batch_sizes.split(",")):
            r = compare(a, contenders, pair, bs)
            for name, c in r["contenders"].items():
                comp = "" if c["compile_s"] is None else f"{c['compile_s']:.1f}"
                cpu = "" if c["cpu_per_wall"] is None else f"{c['cpu_per_wall']:.2f}"
                print(f"{pair:22s} {bs:5d} {name:14s} {c['img_s']:8.1f} {c['ratio']:6.2f} "
                      f"{c['ratio_per_round_median']:9.2f} {comp:>9s} {cpu:>8s} {c['cpu_ratio'] or 0:9.2f} "
                      f"{c['best_chunk_ratio']:10.2f}", flush=True)
            print("# " + json.dumps(r), flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
