"""The run folder (``--workdir``): its layout, the saved networks (``<which>/`` = variables +
``network.json``), ``summary.json``, the checks a folder must pass, and whether a stored run is this one.

Everything that reads or writes these files goes through here: the trainer (``outputs`` writes what a run
produces, through :func:`save_network` and :func:`write_summary`), and the command lines that use a
finished run (``ekd-evaluate``, ``ekd-export``, ``ekd-import-torch``, ``ekd-compare``). A saved network's
``network.json`` is spelled out once, in :func:`network_meta`.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import uuid
from typing import Any

import jax
import jax.numpy as jnp

from ekd_jax import checkpoint, distributed
from ekd_jax import spec as spec_lib
from ekd_jax.models import DTYPES, create_model

NETWORK_FILE = "network.json"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"


# --------------------------------------------------------------------------- folders


def file_in_the_way(path: str | os.PathLike) -> pathlib.Path | None:
    """The first of ``path`` and its parents that is a file (so ``path`` cannot be a folder), or None."""
    path = pathlib.Path(path).expanduser().absolute()
    return next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)


def prepare(workdir: str | os.PathLike | None) -> pathlib.Path:
    """The workdir, made (with its parents) and proven writable by process 0, or refused with the fix.
    In a multi-process run every other process then checks that it sees the same folder (it must be on
    a filesystem all hosts share: they all write checkpoints)."""
    if distributed.process_count() == 1:
        return _make(workdir)

    def prepare_here() -> pathlib.Path:
        if distributed.is_primary():
            return _make(workdir)
        path = pathlib.Path(workdir).expanduser().absolute()
        if not path.is_dir():
            raise ValueError(
                f"--workdir {str(workdir)!r}: process {distributed.process_index()} does not see the folder "
                f"process 0 made ({path}); every process needs the same --workdir on a filesystem all hosts share"
            )
        return path

    return distributed.primary_first(prepare_here)


def _make(workdir) -> pathlib.Path:
    if not workdir or not str(workdir).strip():
        raise ValueError("--workdir is empty: give the folder for the run's checkpoints and outputs")
    path = pathlib.Path(workdir).expanduser().absolute()
    blocked = file_in_the_way(path)
    if blocked is not None:
        raise ValueError(f"--workdir {str(workdir)!r} cannot be a folder: {blocked} is a file. Choose another --workdir")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe_{uuid.uuid4().hex}"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as e:
        why = "the disk is full" if e.errno == errno.ENOSPC else f"{type(e).__name__}: {os.strerror(e.errno) if e.errno else e}"
        raise ValueError(f"cannot write in --workdir {str(workdir)!r} ({why}); choose a folder you can write to") from e
    return path


# --------------------------------------------------------------------------- the stored run


def config_difference(stored: dict, current: dict) -> list[str]:
    """Dotted keys where a run's stored config (JSON dict) and the current one differ.

    A key the stored config lacks is a switch added to the project after the run started. It is
    not a difference when the current value is the one that reproduces the earlier behaviour:
    the key's default (each new switch's default keeps the earlier behaviour, the project's rule
    for new options), or, for a switch whose default changed later, its
    ``spec.BEHAVIOUR_BEFORE_SWITCH`` value. So a run from before it is resumed or reused rather than
    refused, and never continued under a different behaviour. Options that change only the speed
    (``spec.SPEED_ONLY``: steps per call, data on the device) are never a difference.
    """
    defaults = spec_lib.Spec().to_json()
    for path, value in spec_lib.BEHAVIOUR_BEFORE_SWITCH.items():
        node = defaults
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    missing = object()

    def walk(a, b, d, prefix):
        for k in sorted(set(a) | set(b)):
            va, vb = a.get(k, missing), b.get(k, missing)
            dk = d.get(k, missing) if isinstance(d, dict) else missing
            if isinstance(va, dict) and isinstance(vb, dict):
                yield from walk(va, vb, dk, f"{prefix}{k}.")
            elif va is missing and dk is not missing and vb == dk:
                continue
            elif va != vb:
                yield f"{prefix}{k}"

    return [key for key in walk(stored, current, defaults, "") if tuple(key.split(".")) not in spec_lib.SPEED_ONLY]


def refuse_other_run(workdir, stored: dict, current: dict) -> None:
    """A workdir whose checkpoints were written under another config is refused, naming the keys."""
    diff = config_difference(stored.get("config", current), current)
    if diff:
        raise ValueError(
            f"{workdir} holds checkpoints of a run with a different config (differs in {', '.join(diff)}); "
            "resume with the same config, or use a new --workdir"
        )


def read_summary(workdir: str | os.PathLike) -> dict | None:
    """A finished run's summary, or None when the run has not finished (or is not a run)."""
    path = pathlib.Path(workdir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.exists() else None


def write_summary(workdir: str | os.PathLike, summary: dict) -> None:
    """Written last: its presence marks a finished run."""
    (pathlib.Path(workdir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))


# --------------------------------------------------------------------------- saved networks


def network_meta(model: str, num_classes: int, class_names, input_shape, raw_image_shape, mean, std, *,
                 student_downsample: int = 1, lowres_mode: str = spec_lib.DataSpec.lowres_mode, dtype: str = "float32",
                 data_source: str | None = None, **extra: Any) -> dict:
    """``network.json``: what a saved network is and what it expects, everything evaluation, export and
    a frozen teacher need to use it without the run's config."""
    return {
        "model": model,
        "num_classes": int(num_classes),
        "class_names": list(class_names) if class_names else None,
        "input_shape": list(input_shape),  # what the network receives
        "raw_image_shape": list(raw_image_shape),  # what the data source yields (uint8)
        "mean": list(mean),
        "std": list(std),
        "student_downsample": int(student_downsample),
        "lowres_mode": lowres_mode,
        "dtype": dtype,
        "data_source": data_source,
        **extra,
    }


def has_network(workdir: str | os.PathLike, which: str) -> bool:
    return (pathlib.Path(workdir) / which / NETWORK_FILE).exists()


def read_network_meta(directory: str | os.PathLike) -> dict:
    """The ``network.json`` of a saved network folder (a run's ``student/`` or ``teacher/``)."""
    path = pathlib.Path(directory) / NETWORK_FILE
    if not path.exists():
        raise ValueError(f"{directory} is not a saved network (no {NETWORK_FILE}): pass a run's student/ or teacher/ folder")
    return json.loads(path.read_text())


def save_network(directory: str | os.PathLike, variables: Any, meta: dict) -> None:
    """``directory``: one network alone (variables + network.json), for deployment, evaluation or use
    as a frozen teacher. Called by one process."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint.save_network(directory, variables)
    (directory / NETWORK_FILE).write_text(json.dumps(meta, indent=1))


def restore_network(directory: str | os.PathLike, abstract_variables: Any = None):
    """A saved network: ``(module, variables, meta)``; the variables as ``abstract_variables`` says
    (shapes, shardings) when given."""
    meta = read_network_meta(directory)
    model = create_model(meta["model"], meta["num_classes"], dtype=DTYPES[meta.get("dtype", "float32")])
    if abstract_variables is None:
        x = jax.ShapeDtypeStruct((1, *meta["input_shape"]), jnp.float32)
        abstract_variables = jax.eval_shape(lambda k, x: model.init(k, x, train=False), jax.random.key(0), x)
    return model, checkpoint.load_network(directory, abstract_variables), meta
