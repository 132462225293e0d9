"""The training loop against its compiled step: how much of the step's speed the trainer keeps.

  PYTHONPATH=. .venv/bin/python benchmarks/loop_speed.py --config configs/quickstart.py:tiny --epochs 6
  PYTHONPATH=. .venv/bin/python benchmarks/loop_speed.py --config configs/study.py:full --epochs 3 \
      --config.data.source=npz:../shared/data/cifar10_small.npz

Side by side in one run, for one config:

1. ``step``: the compiled training program alone (the joint step, ``steps_per_call`` per call, as the trainer
   runs it) on device-resident synthetic batches (``ekd_jax.bench``'s StepTimer: median over timed chunks),
   in images/s;
2. ``trainer``: ``train.train_and_evaluate`` itself on the config's data for ``--epochs`` epochs, in a
   fresh workdir, logging only at epoch ends; its images/s is the median of its own ``images_per_s``
   (evaluation excluded) over the epochs after the first (which compiles);
3. ``host``: what the loop does per step besides the step, timed alone: the chunks of ``steps_per_call``
   batches the loop hands the program (``ekd_jax.feed.Feed.chunk``: this process's rows of each batch, stacked,
   and the global arrays made of them), waited for, per step.

Prints one JSON object: the three figures, ``trainer_over_step`` (the fraction of the step's speed the
trainer keeps) and the host's ms per step next to the step's. On a fast device the step is short and the
host's part decides the trainer's speed; on 2 CPU cores a small config (the tiny one) imitates that.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time

from absl import app, flags, logging

import ekd_jax  # noqa: F401  (the XLA CPU defaults before jax starts)
from ekd_jax import bench  # its --config flag (and overrides) is this script's too

FLAGS = flags.FLAGS
flags.DEFINE_integer("epochs", 6, "Epochs the trainer runs (the first compiles and is not counted).")
flags.DEFINE_integer("host_steps", 100, "Steps whose host-side batch making is timed.")


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    import jax

    from ekd_jax import data, parallel, train
    from ekd_jax.feed import Feed

    config = FLAGS.config.copy_and_resolve_references()
    with config.unlocked():
        config.num_epochs = FLAGS.epochs
        config.log_every_steps = 10**9  # only the epoch's last step logs: the loop as it runs unwatched
        config.eval_every_epochs = FLAGS.epochs
    spec = bench.spec_for(config)

    source = data.load(spec.data)
    timer = bench.StepTimer.build(spec, source.num_classes, source.image_shape)
    step = bench.time_step(timer, chunks=5, steps_per_chunk=0, chunk_seconds=2.0, warmup=2)
    del timer

    k = spec.steps_per_call
    feed = Feed(source, spec.batch_size, spec.seed, k, parallel.make_mesh(), spec.data.on_device)
    calls = max(1, FLAGS.host_steps // k)
    jax.block_until_ready(feed.chunk(0, k))
    t = time.perf_counter()
    for c in range(calls):
        jax.block_until_ready(feed.chunk(c * k, k))
    host_s = (time.perf_counter() - t) / (calls * k)
    size = spec.batch_size

    with tempfile.TemporaryDirectory(prefix="loop_speed_") as workdir:
        train.train_and_evaluate(config, workdir)
        records = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
    per_epoch = [r["images_per_s"] for r in records]
    trainer = statistics.median(per_epoch[1:] or per_epoch)

    print(json.dumps({
        "config": sys.argv[1:],
        "batch_size": size,
        "steps_per_call": k,
        "on_device": spec.data.on_device,
        "step_images_per_s": step["images_per_s"],
        "step_ms": step["step_ms"],
        "trainer_images_per_s": trainer,
        "trainer_images_per_s_by_epoch": [round(v, 1) for v in per_epoch],
        "trainer_ms_per_step": 1e3 * size / trainer,
        "trainer_over_step": trainer / step["images_per_s"],
        "host_ms_per_step": 1e3 * host_s,
    }))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
