"""What every ekd_jax command line shares: flag parsing and the one-line ``error: ...`` contract.

Bad input (an unknown flag, a config typo, a bad path, an invalid combination) ends with a single
line ``error: <what and how to fix it>`` on stderr and exit status 2 — never a traceback.
"""

from __future__ import annotations

import re
import sys
from typing import Callable, Sequence

from absl import app, flags, logging


# Optional dependencies (imported lazily, only by the features that need them) -> what installs
# them: the extras of pyproject.toml's [project.optional-dependencies].
OPTIONAL_MODULES: dict[str, str] = {
    "tensorflow_datasets": "pip install 'ekd_jax[tfds]' (data.source='tfds:<name>')",
    "tensorflow": "pip install 'ekd_jax[tfds]' (TFDS data) or 'ekd_jax[export]' (SavedModel export)",
}


def fail(msg: object) -> None:
    print("error: " + " ".join(str(msg).split()), file=sys.stderr)  # always one line
    sys.exit(2)


def _clean(e: BaseException) -> str:
    """A one-line message from a flag/config error: no repr quoting, no embedded traceback."""
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    msg = msg.replace("\\n", "\n").replace("\\'", "'")
    lines = [line.strip() for line in msg.splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):  # a config file's get_config raised
        return f"{lines[0]} {lines[-1]}"
    typo = re.match(r"^'*([\w.]+)'*\s+(Did you mean .*?)'*$", " ".join(lines))
    if typo:  # ml_collections' locked-config KeyError
        return f"unknown config key '{typo.group(1)}'. {typo.group(2)}"
    return " ".join(lines)


def run(main: Callable[[], object], required: Sequence[str] = (), errors: tuple = (ValueError,)) -> None:
    """``app.run`` with flag errors and ``errors`` raised by ``main`` turned into ``error:`` lines.

    ``required`` flags must be given and non-empty (each is named in the message).
    """
    FLAGS = flags.FLAGS

    def parse(argv: list[str]) -> list[str]:
        try:
            rest = FLAGS(argv)
            for name in required:  # a config file that failed to load only raises when touched
                getattr(getattr(FLAGS, name), "keys", None)
        except flags.Error as e:
            fail(_clean(e))
        except (KeyError, AttributeError, ValueError, TypeError, OSError) as e:
            # ml_collections reports config-file and --config.* override problems this way.
            fail(f"bad --config or override: {_clean(e)}")
        for name in required:
            if not getattr(FLAGS, name):
                fail(f"--{name} is required ({FLAGS[name].help})")
        if len(rest) > 1:
            fail(f"unexpected arguments {rest[1:]}; options take the form --name=value")
        return rest

    def wrapped(argv: list[str]) -> None:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
        try:
            main()
        except errors as e:
            fail(e)
        except ModuleNotFoundError as e:  # a missing optional dependency: name the extra
            hint = OPTIONAL_MODULES.get((e.name or "").partition(".")[0])
            if hint is None:
                raise
            fail(f"{e}, an optional dependency: {hint}")

    app.run(wrapped, flags_parser=parse)
