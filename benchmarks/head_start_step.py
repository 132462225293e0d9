"""Times the teacher-only head-start step against the joint step (docs/performance.md).

  PYTHONPATH=. .venv/bin/python benchmarks/head_start_step.py [--scenario full] [--steps 10]

Builds configs/study.py:<scenario> twice — without a head start (the joint step) and with one
that never ends (only the head-start step runs) — and prints each step's first-call seconds
(compile + run) and mean ms per step over ``--steps`` steps after it, on one fixed batch.
"""

import argparse
import dataclasses
import time

import jax
import numpy as np

from configs import study
from ekd_jax import bench, parallel
from ekd_jax.build import DataFacts, build


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--scenario", default="full")
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args()
    spec = bench.spec_for(study.get_config(a.scenario))
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(0)
    batch = parallel.shard_batch({"image": rng.integers(0, 256, (spec.batch_size, 32, 32, 3), dtype=np.uint8),
                                  "label": rng.integers(0, 10, (spec.batch_size,), dtype=np.int32)}, mesh)
    facts = DataFacts(10, (32, 32, 3), 10_000, (0.5,) * 3, (0.25,) * 3)
    # A head start longer than any step asked for: only the head-start program runs.
    for name, head_start in (("joint step", 0.0), ("head-start step", 1000.0)):
        built = build(dataclasses.replace(spec, teacher=dataclasses.replace(spec.teacher, head_start=head_start)), facts)
        state = built.init_state(0, mesh)
        train_step = built.compile(mesh).train
        run = lambda s, i: train_step(s, batch, i)  # noqa: E731
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
