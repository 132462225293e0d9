"""The compiled training program at several steps per call, side by side: which K (``steps_per_call``) is fastest.

  PYTHONPATH=. .venv/bin/python benchmarks/steps_per_call.py --config configs/quickstart.py:tiny --ks 1,2,4,8,16,32
  PYTHONPATH=. .venv/bin/python benchmarks/steps_per_call.py --config configs/study.py:full --ks 1,8 --rounds 2

For each K, ``ekd_jax.bench``'s StepTimer (the trainer's program, K steps per call, on device-resident synthetic
batches) is built once; then ``--rounds`` rounds time every K in turn (median of 5 timed chunks each), so that
a drift of the machine's speed touches every K alike. Prints one JSON object: per K the median ms/step over
the rounds, each round's figure, the compile seconds, and the ratio to K=1's ms/step.
"""

from __future__ import annotations

import json
import statistics
import sys

from absl import app, flags

import ekd_jax  # noqa: F401  (the XLA CPU defaults before jax starts)
from ekd_jax import bench  # its --config flag (and overrides) is this script's too

FLAGS = flags.FLAGS
flags.DEFINE_list("ks", ["1", "2", "4", "8", "16", "32"], "Steps per call to compare.")
flags.DEFINE_integer("rounds", 3, "Rounds over all K (each K timed once per round).")
flags.DEFINE_float("seconds", 2.0, "Length of a timed chunk.")


def main(argv) -> None:
    del argv
    config = FLAGS.config.copy_and_resolve_references()
    base = bench.spec_for(config)
    n_cls, shape = bench.data_shape(base)
    timers = {}
    for k in map(int, FLAGS.ks):
        with config.unlocked():
            config.steps_per_call = k
        timers[k] = bench.StepTimer.build(bench.spec_for(config), n_cls, shape)
    rounds: dict[int, list[float]] = {k: [] for k in timers}
    for _ in range(FLAGS.rounds):
        for k, timer in timers.items():
            r = bench.time_step(timer, chunks=5, steps_per_chunk=0, chunk_seconds=FLAGS.seconds, warmup=k)
            rounds[k].append(r["step_ms"])
    median = {k: statistics.median(v) for k, v in rounds.items()}
    ref = median.get(1)
    print(json.dumps({
        "config": sys.argv[1:],
        "batch_size": base.batch_size,
        "per_k": {k: {"step_ms": round(median[k], 3), "images_per_s": round(base.batch_size / median[k] * 1e3, 1),
                      "rounds_step_ms": [round(x, 3) for x in rounds[k]], "compile_s": round(timers[k].compile_s, 2),
                      "over_k1": None if ref is None else round(median[k] / ref, 3)} for k in timers},
    }))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
