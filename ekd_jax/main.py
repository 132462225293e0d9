"""Command line: ``python -m ekd_jax.main --config configs/<exp>.py[:arg] --workdir <dir> [--config.x=y]``.

Thin on purpose: parse flags, join the other processes of a multi-process run (the distributed
flags; docs/multihost.md "Multi-host training"), then call
:func:`ekd_jax.train.train_and_evaluate`. Bad input ends with one line ``error: ...`` and exit
status 2, no traceback.
"""

from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags

import ekd_jax  # noqa: F401  (applies the XLA CPU defaults before jax starts)
from ekd_jax import cli, distributed, train

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "the experiment config file, e.g. configs/quickstart.py[:tiny]", lock_config=True)
flags.DEFINE_string("workdir", None, "the folder for checkpoints, metrics, summary and the student")
# Multi-process runs: the same command on every process (jax.distributed.initialize's arguments).
flags.DEFINE_bool("distributed", False, "join a multi-process run whose processes jax.distributed.initialize() "
                  "detects (Cloud TPU pod slice, SLURM, Open MPI); explicit flags below override what it detects")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, the same on every process (multi-process run "
                    "without a detected cluster, with --num_processes and --process_id)")
flags.DEFINE_integer("num_processes", None, "the number of processes of a multi-process run")
flags.DEFINE_integer("process_id", None, "this process's number, 0 .. num_processes - 1 (process 0 writes the outputs)")
flags.DEFINE_list("local_device_ids", None, "the devices of this host this process uses, e.g. 0,1 (default: all)")


def main() -> None:
    # Before anything starts JAX's backends: the flags are checked (error: ... on a bad combination)
    # and the processes joined, then every process trains, all of them on all devices.
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           FLAGS.local_device_ids, auto=FLAGS.distributed)
    summary = train.train_and_evaluate(_CONFIG.value, FLAGS.workdir)
    if distributed.is_primary():
        keys = ("method", "teacher_top1", "student_top1", "best_student_top1", "steps", "wall_s")
        print(json.dumps({k: summary[k] for k in keys}))


def run() -> None:
    """Console script ``ekd-train`` (pyproject.toml) = ``python -m ekd_jax.main``."""
    # OSError: a disk that fills up or a folder that turns unwritable during the run.
    cli.run(main, required=("config", "workdir"),
            errors=(ValueError, OSError, train.NonFiniteLossError, distributed.InitializeError))


if __name__ == "__main__":
    run()
