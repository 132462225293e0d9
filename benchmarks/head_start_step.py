"""Times the teacher-only head-start step against the joint step (docs/performance.md).

  PYTHONPATH=. .venv/bin/python benchmarks/head_start_step.py [--scenario full] [--steps 10]

Builds configs/study.py:<scenario> twice — without a head start (the joint step) and with one
that never ends (only the head-start step runs) — and prints each step's first-call seconds
(compile + run) and mean ms per step over ``--steps`` steps after it, on one fixed batch.
"""

import argparse
import functools
import time

import jax
import numpy as np

from configs import study
from ekd_jax import parallel, step, train


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--scenario", default="full")
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args()
    cfg = study.get_config(a.scenario)
    mesh = parallel.make_mesh()
    views = functools.partial(train._views, cfg=cfg.data, mean=(0.5,) * 3, std=(0.25,) * 3)
    rng = np.random.default_rng(0)
    batch = parallel.shard_batch({"image": rng.integers(0, 256, (cfg.batch_size, 32, 32, 3), dtype=np.uint8),
                                  "label": rng.integers(0, 10, (cfg.batch_size,), dtype=np.int32)}, mesh)
    for name, start in (("joint step", 0), ("head-start step", 10**9)):
        nets = step.build_networks(cfg, 10, (32, 32, 3), (32, 32, 3), views, 1000, start)
        tx = step.make_optimizer(nets, 0.05, 0.9, 5e-4, teacher_learning_rate=0.05 if start else None)
        state = step.init_state(nets, tx, 0, mesh)
        train_step = step.compile_steps(nets, tx, mesh).train
        run = lambda s, i: train_step(s, batch, i)  # noqa: E731  (i < start: the head-start program)
        t = time.perf_counter()
        state, m = run(state, 0)
        jax.block_until_ready(m)
        first = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(a.steps):
            state, m = run(state, i + 1)
        jax.block_until_ready(m)
        print(f"{name}: first call {first:.1f} s, then {(time.perf_counter() - t) / a.steps * 1000:.0f} ms/step", flush=True)


if __name__ == "__main__":
    main()
