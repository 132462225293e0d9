"""Command line: ``python -m ekd_jax.main --config configs/<exp>.py[:arg] --workdir <dir> [--config.x=y]``.

Thin on purpose: parse flags, then call :func:`ekd_jax.train.train_and_evaluate`. Bad input ends
with one line ``error: ...`` and exit status 2, no traceback.
"""

from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags

import ekd_jax  # noqa: F401  (applies the XLA CPU defaults before jax starts)
from ekd_jax import cli, train

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "the experiment config file, e.g. configs/quickstart.py[:tiny]", lock_config=True)
flags.DEFINE_string("workdir", None, "the folder for checkpoints, metrics, summary and the student")


def main() -> None:
    summary = train.train_and_evaluate(_CONFIG.value, FLAGS.workdir)
    keys = ("method", "teacher_top1", "student_top1", "best_student_top1", "steps", "wall_s")
    print(json.dumps({k: summary[k] for k in keys}))


def run() -> None:
    """Console script ``ekd-train`` (pyproject.toml) = ``python -m ekd_jax.main``."""
    # OSError: a disk that fills up or a folder that turns unwritable during the run.
    cli.run(main, required=("config", "workdir"), errors=(ValueError, OSError, train.NonFiniteLossError))


if __name__ == "__main__":
    run()
