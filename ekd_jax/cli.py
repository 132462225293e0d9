"""What every ekd_jax command line shares: flag parsing and the one-line ``error: ...`` contract.

Bad input (an unknown flag, a config typo, a bad path, an invalid combination) ends with a single
line ``error: <what and how to fix it>`` on stderr and exit status 2 — never a traceback. A signal
that stops a command (Ctrl-C; SIGINT or SIGTERM during training, :mod:`ekd_jax.interrupt`) ends with
one line saying where it stopped, and exit status 128 + the signal's number (130, 143).
"""

from __future__ import annotations

import difflib
import logging as std_logging
import re
import sys
from typing import Callable, Sequence

from absl import app, flags, logging


# Optional dependencies (imported lazily, only by the features that need them) -> what installs
# them: the extras of pyproject.toml's [project.optional-dependencies].
OPTIONAL_MODULES: dict[str, str] = {
    "tensorflow_datasets": "pip install 'ekd_jax[tfds]' (data.source='tfds:<name>') or 'ekd_jax[stream]' (the stream's records)",
    "grain": "pip install 'ekd_jax[stream]' (data.streaming=True, data.source='arrayrecord:<pattern>')",
    "array_record": "pip install 'ekd_jax[stream]' (ekd_jax.data.stream.write_arrayrecord)",
    "tensorflow": "pip install 'ekd_jax[tfds]' (TFDS data) or 'ekd_jax[export]' (SavedModel export)",
    "torch": "pip install 'ekd_jax[torch]' (PyTorch checkpoints: ekd-import-torch, ekd-export --torch_state_dict)",
    "safetensors": "pip install 'ekd_jax[torch]' (.safetensors checkpoints)",
}


def fail(msg: object) -> None:
    if isinstance(msg, OSError) and msg.strerror:  # "<path>: <why>", not "[Errno 28] ..."
        msg = f"{msg.filename}: {msg.strerror}" if msg.filename else msg.strerror
    print("error: " + " ".join(str(msg).split()), file=sys.stderr)  # always one line
    sys.exit(2)


def _override_paths(argv: Sequence[str], name: str) -> list[str]:
    """The dotted fields of the ``--<name>.<field>[=value]`` overrides in ``argv``."""
    paths = []
    for arg in argv:
        m = re.match(rf"^--?(?:no)?{re.escape(name)}\.([\w.]+)(=|$)", arg)
        if m:
            paths.append(m.group(1))
    return paths


def unknown_override(config, argv: Sequence[str], name: str = "config") -> str | None:
    """The first ``--<name>.<field>`` override in ``argv`` whose field ``config`` lacks, as a
    message naming the whole key and the closest existing one; None when every field exists."""
    for path in _override_paths(argv, name):
        node, done = config, []
        for part in path.split("."):
            keys = [str(k) for k in node.keys()] if hasattr(node, "keys") else None
            if keys is None:  # below a leaf value: not a missing key
                break
            if part not in keys:
                close = difflib.get_close_matches(part, keys, n=1)
                if close:
                    hint = f"; did you mean '{'.'.join([*done, close[0]])}'?"
                else:
                    hint = f"; '{'.'.join(done)}' has {', '.join(sorted(keys))}" if done else ""
                return f"unknown config key '{'.'.join([*done, part])}' in --{name}.{path}{hint}"
            node, done = node[part], [*done, part]
    return None


def _config_argument(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        m = re.match(rf"^--?{re.escape(name)}(=(.*))?$", arg)
        if m:
            return m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def _explain_override_error(argv: Sequence[str], names: Sequence[str]) -> str | None:
    """For a KeyError/AttributeError while --config.* overrides were applied: which override."""
    FLAGS = flags.FLAGS
    for name in names:
        if name not in FLAGS or not _override_paths(argv, name):
            continue
        flag = FLAGS[name]
        try:  # the config file as loaded before the overrides (a config_flags file flag)
            source = _config_argument(argv[1:], name)
            config = flag.parser.parse(source) if source is not None else flag.value
        except Exception:  # noqa: BLE001  (the original error is reported instead)
            continue
        found = unknown_override(config, argv[1:], name)
        if found:
            return found
    return None


def _bad_config(argv: Sequence[str], names: Sequence[str]) -> str:
    """'bad --config <file>' (the config flags' arguments as given), for a config-file error."""
    given = [f"--{n} {v}" for n in names if n in flags.FLAGS and type(flags.FLAGS[n]).__name__ == "_ConfigFlag"
             and (v := _config_argument(argv[1:], n)) is not None]
    return f"bad {', '.join(given)} or override" if given else "bad --config or override"


def _raised_where(e: BaseException) -> str:
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if isinstance(e, SyntaxError):  # its message already says where
        return ""
    return f" (raised in {tb.tb_frame.f_code.co_filename}, line {tb.tb_lineno})" if tb is not None else ""


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


class _NoForeignTracebacks(std_logging.Filter):
    """Other libraries' log records keep their one-line message but lose the attached traceback
    (Orbax logs a failed background save with one per thread before the error reaches us, and
    the error itself is then reported as our one ``error:`` line)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.exc_info and not record.name.startswith("ekd_jax"):
            record.exc_info, record.exc_text = None, None
        return True


def _drop_closed_loop_noise() -> None:
    """After a failed checkpoint read or write, TensorStore's callbacks still call into the asyncio
    loop Orbax has closed; Python prints each "RuntimeError: Event loop is closed" as a traceback
    (an unraisable exception, dozens of them). Those, and only those, are dropped."""
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        previous(unraisable)

    sys.unraisablehook = hook


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
        except (KeyError, AttributeError) as e:  # an override of a field the config lacks
            fail(_explain_override_error(argv, required) or f"{_bad_config(argv, required)}: {_clean(e)}")
        except (ValueError, TypeError, OSError) as e:
            # ml_collections reports config-file and --config.* override problems this way.
            fail(f"{_bad_config(argv, required)}: {_clean(e)}")
        except Exception as e:  # noqa: BLE001  (a config file's get_config raised something else)
            fail(f"{_bad_config(argv, required)}: loading it failed with {type(e).__name__}: {_clean(e)}{_raised_where(e)}")
        for name in required:
            if not getattr(FLAGS, name):
                fail(f"--{name} is required ({FLAGS[name].help})")
        if len(rest) > 1:
            fail(f"unexpected arguments {rest[1:]}; options take the form --name=value")
        return rest

    def wrapped(argv: list[str]) -> None:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
        logging.get_absl_handler().addFilter(_NoForeignTracebacks())
        _drop_closed_loop_noise()
        try:
            main()
        except errors as e:
            fail(e)
        except KeyboardInterrupt as e:  # Ctrl-C, or a run stopped by SIGINT/SIGTERM (ekd_jax.interrupt)
            print(getattr(e, "message", "interrupted"), file=sys.stderr, flush=True)
            sys.exit(getattr(e, "exit_status", 130))
        except ModuleNotFoundError as e:  # a missing optional dependency: name the extra
            hint = OPTIONAL_MODULES.get((e.name or "").partition(".")[0])
            if hint is None:
                raise
            fail(f"{e}, an optional dependency: {hint}")

    app.run(wrapped, flags_parser=parse)
