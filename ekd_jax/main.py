"""Command line: ``python -m ekd_jax.main --config configs/<exp>.py[:arg] --workdir <dir> [--config.x=y]``.

Thin on purpose: parse flags, then call :func:`ekd_jax.train.train_and_evaluate`. Bad input ends
with one line ``error: ...`` and exit status 2, no traceback.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import ekd_jax  # noqa: F401  (applies the XLA CPU defaults before jax starts)

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path.py[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, summary and the student are written.")


def _fail(msg: str) -> None:
    print("error: " + " ".join(str(msg).split()), file=sys.stderr)
    sys.exit(2)


def _parse(argv: list[str]) -> list[str]:
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        _fail(str(e).replace("\n", " "))
    except (KeyError, AttributeError, ValueError, TypeError, FileNotFoundError, OSError) as e:
        _fail(f"bad --config or override: {str(e).strip(chr(34)).splitlines()[0]}")
    if FLAGS.config is None:
        _fail("--config is required, e.g. --config configs/quickstart.py")
    if not FLAGS.workdir:
        _fail("--workdir is required: the folder for checkpoints, metrics and outputs")
    return rest


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; options take the form --name=value")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from ekd_jax import train

    try:
        summary = train.train_and_evaluate(_CONFIG.value, FLAGS.workdir)
    except train.NonFiniteLossError as e:
        _fail(str(e))
    except ValueError as e:
        _fail(str(e))
    keys = ("method", "teacher_top1", "student_top1", "best_student_top1", "steps", "wall_s")
    print(json.dumps({k: summary[k] for k in keys}))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
