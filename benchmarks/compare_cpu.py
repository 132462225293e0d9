"""ekd_jax's joint train step vs the PyTorch reference (benchmarks/torch_step.py), side by side on CPU.

  .venv/bin/python benchmarks/compare_cpu.py                       # both pairs, batch 64
  .venv/bin/python benchmarks/compare_cpu.py --pairs resnet56-resnet20 --batch_sizes 32,64,128,256
  XLA_FLAGS=... EKD_JAX_XLA_DEFAULTS=0 .venv/bin/python benchmarks/compare_cpu.py   # try other flags

The machine is shared and noisy, so the two are never timed minutes apart: PyTorch runs in a
subprocess (``torch_step.py --serve``, its own venv) and the two alternate chunk by chunk
(T J J T T J ...), one at a time, each chunk about ``--chunk_seconds``. Reported per pair and batch:
the median ms/step and images/s of each, the ratio of the medians (ekd_jax speed / PyTorch speed,
> 1 = ekd_jax faster), the median of the per-round ratios, and ekd_jax's compile seconds.

The JAX step is the one ``python -m ekd_jax.bench`` times: configs/cifar.py:cifar100,<pair> with
method 'ekd' and its default loss (CE + CE + KD(T=4) + adapter MSE on the 3 stage pairs, no
co-evolution term), built through ekd_jax.step. Both sides use the same adapter (``--adapter``):
'ekd' = ekd_jax's 3x3 conv -> BN -> ReLU -> 1x1 conv, '1x1' = 1x1 conv -> BN (the JAX side then
patches ekd_jax.guided.Adapter in this process only).
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
sys.path.insert(0, str(ROOT))

import ekd_jax  # noqa: E402,F401  (XLA CPU defaults before jax starts)


def patch_adapter_1x1():
    """Makes ekd_jax's guided adapter a 1x1 conv + BN (the lighter reference adapter), in-process."""
    import flax.linen as nn

    from ekd_jax import guided
    from ekd_jax.models.common import BatchNorm, conv

    class Adapter1x1(nn.Module):
        out_shape: tuple
        dtype: object = None

        @nn.compact
        def __call__(self, f, train):
            h, w, c = self.out_shape
            f = guided.resize_to(f, (h, w))
            return BatchNorm(dtype=self.dtype, name="bn")(conv(c, 1, dtype=self.dtype, name="conv1x1")(f), train)

    guided.Adapter = Adapter1x1


def jax_timer(pair: str, batch_size: int, method: str, overrides: list[str]):
    from ekd_jax import bench
    from configs import cifar

    cfg = cifar.get_config(f"cifar100,{pair}")
    cfg.method = method
    cfg.batch_size = batch_size
    for o in overrides:  # key=value on the config, e.g. loss.beta=0
        k, v = o.split("=", 1)
        node = cfg
        *path, leaf = k.split(".")
        for p in path:
            node = node[p]
        node[leaf] = type(node[leaf])(json.loads(v)) if not isinstance(node[leaf], str) else v
    n_cls, shape = bench.data_shape(cfg)
    return bench.StepTimer.build(cfg, n_cls, shape)


class TorchServer:
    def __init__(self, python, pair, batch_size, adapter, method, threads, extra):
        cmd = [python, str(ROOT / "benchmarks" / "torch_step.py"), "--serve", "--pair", pair,
               "--batch_size", str(batch_size), "--adapter", adapter, "--method", method,
               "--threads", str(threads), *extra]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        line = self.p.stdout.readline().split()
        if not line or line[0] != "ready":
            raise RuntimeError(f"torch_step.py did not start: {line}")
        self.first = float(line[1])

    def run(self, n: int) -> float:
        self.p.stdin.write(f"{n}\n")
        self.p.stdin.flush()
        return float(self.p.stdout.readline())

    def close(self):
        try:
            self.p.stdin.write("quit\n")
            self.p.stdin.flush()
            self.p.wait(timeout=30)
        except Exception:  # noqa: BLE001
            self.p.kill()


def compare(args, pair: str, batch_size: int) -> dict:
    t_build = time.perf_counter()
    jt = jax_timer(pair, batch_size, args.method, args.override)
    jax_first = jt.run(2) / 2  # warm-up (the first call also allocates)
    torch = TorchServer(args.torch_python, pair, batch_size, args.adapter, args.method, args.threads, args.torch_args)
    torch_first = torch.run(1)
    jax_first = min(jax_first, jt.run(1))
    n_j = max(1, round(args.chunk_seconds / jax_first))
    n_t = max(1, round(args.chunk_seconds / torch_first))
    tj, tt = [], []
    for r in range(args.rounds):
        order = ("t", "j") if r % 2 == 0 else ("j", "t")
        for who in order:
            time.sleep(args.pause)
            if who == "t":
                tt.append(torch.run(n_t) / n_t)
            else:
                tj.append(jt.run(n_j) / n_j)
    torch.close()
    mj, mt = statistics.median(tj), statistics.median(tt)
    res = {
        "pair": pair,
        "batch_size": batch_size,
        "method": args.method,
        "adapter": args.adapter,
        "torch_img_s": batch_size / mt,
        "jax_img_s": batch_size / mj,
        "ratio": mt / mj,
        "ratio_per_round_median": statistics.median(a / b for a, b in zip(tt, tj)),
        "torch_step_ms": 1e3 * mt,
        "jax_step_ms": 1e3 * mj,
        "jax_compile_s": jt.compile_s,
        "jax_gflops_per_step": None if jt.flops is None else jt.flops / 1e9,
        "torch_chunk_ms": [round(1e3 * x, 1) for x in tt],
        "jax_chunk_ms": [round(1e3 * x, 1) for x in tj],
        "steps_per_chunk": {"torch": n_t, "jax": n_j},
        "wall_s": time.perf_counter() - t_build,
    }
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", default="resnet56-resnet20,resnet32x4-resnet8x4")
    p.add_argument("--batch_sizes", default="64")
    p.add_argument("--method", choices=("ekd", "vanilla"), default="ekd")
    p.add_argument("--adapter", choices=("ekd", "1x1"), default="ekd")
    p.add_argument("--rounds", type=int, default=6, help="alternation rounds (one chunk of each per round)")
    p.add_argument("--chunk_seconds", type=float, default=3.0)
    p.add_argument("--pause", type=float, default=0.2, help="seconds idle before each chunk")
    p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads")
    p.add_argument("--torch_python", default="/work/torchvenv/bin/python")
    p.add_argument("--torch_args", nargs="*", default=[], help="extra torch_step.py flags, e.g. --channels_last")
    p.add_argument("--override", action="append", default=[], help="ekd_jax config key=value (repeatable)")
    p.add_argument("--out", default=None, help="append one JSON line per comparison to this file")
    a = p.parse_args()
    if a.adapter == "1x1":
        patch_adapter_1x1()
    import jax

    print(f"# XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} jax {jax.__version__}", flush=True)
    print(f"{'pair':24s} {'batch':>5s} {'torch img/s':>11s} {'ekd_jax img/s':>13s} {'ratio':>6s} "
          f"{'round-ratio':>11s} {'compile s':>9s}", flush=True)
    for pair in a.pairs.split(","):
        for bs in (int(b) for b in a.batch_sizes.split(",")):
            r = compare(a, pair, bs)
            r["xla_flags"] = os.environ.get("XLA_FLAGS", "")
            print(f"{pair:24s} {bs:5d} {r['torch_img_s']:11.1f} {r['jax_img_s']:13.1f} {r['ratio']:6.2f} "
                  f"{r['ratio_per_round_median']:11.2f} {r['jax_compile_s']:9.1f}", flush=True)
            print("# " + json.dumps(r), flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
