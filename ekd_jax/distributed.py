"""Multi-host runs on JAX's own multi-controller runtime: joining it, and keeping the processes agreed.

A multi-process run is the same command started once per process (per host on a TPU pod slice, per
node or per GPU under SLURM, several on one machine): :func:`initialize` joins them through
``jax.distributed.initialize`` -- with explicit flags (``coordinator_address``, ``num_processes``,
``process_id``), or detected from the cluster (Cloud TPU, SLURM, Open MPI) -- before JAX starts
its backends. After that every process sees every device of the job (``jax.devices()``), runs the
same jitted programs in the same order, and the loop differs between processes only in which rows
of a batch each one loads and in who writes the outputs (:func:`is_primary`).

Every process must take the same path through the code, or the job hangs in a collective that
some processes never reach. Checks whose answer could differ between hosts (a file seen on one
host only, a full disk) therefore run through :func:`agree`: when one process refuses, all of
them raise, with the refusing process's message. :func:`primary_first` lets process 0 do what
only one process may do (create the workdir, prepare a dataset) while the others wait.

Nothing here starts JAX's backends until :func:`initialize` has run: importing this module, or
any of ekd_jax, is safe before it.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import numpy as np

# The longest message one process passes to the others when it refuses (UTF-8 bytes; cut beyond).
MESSAGE_BYTES = 2048
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[^\s:\[\]]+):(\d{1,5})$")


class InitializeError(RuntimeError):
    """The multi-process runtime could not be joined (no cluster found, coordinator unreachable)."""


def check_flags(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int | str] | None = None,
    auto: bool = False,
) -> dict[str, Any] | None:
    """The keyword arguments of ``jax.distributed.initialize`` for these flags, or None for a
    single-process run; a ValueError naming the flag for a combination that cannot work.

    Without ``auto`` (``--distributed``) the three explicit flags go together; with it, any of them
    overrides what JAX detects from the cluster.
    """
    given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes, "--process_id": process_id}
    if coordinator_address is not None:
        m = _ADDRESS.match(coordinator_address.strip())
        if not m or not 1 <= int(m.group(2)) <= 65535:
            raise ValueError(
                f"--coordinator_address={coordinator_address!r} is not valid: HOST:PORT of process 0, "
                "e.g. 10.0.0.1:1234 or localhost:1234 (a port 1..65535)"
            )
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num_processes={num_processes} is not valid: the number of processes, >= 1")
    if process_id is not None:
        if process_id < 0:
            raise ValueError(f"--process_id={process_id} is not valid: 0 .. num_processes - 1")
        if num_processes is not None and process_id >= num_processes:
            raise ValueError(
                f"--process_id={process_id} is not valid with --num_processes={num_processes}: "
                f"process ids are 0 .. {num_processes - 1}"
            )
    if not auto:
        present = [k for k, v in given.items() if v is not None]
        if present and len(present) < 3:
            missing = [k for k in given if k not in present]
            raise ValueError(
                f"{', '.join(present)} given without {' and '.join(missing)}: a multi-process run needs "
                "--coordinator_address, --num_processes and --process_id on every process, or "
                "--distributed to detect them (Cloud TPU, SLURM, Open MPI)"
            )
        if not present:
            if local_device_ids:
                raise ValueError(
                    "--local_device_ids is only for a multi-process run: add --distributed or "
                    "--coordinator_address, --num_processes and --process_id"
                )
            return None
    kwargs: dict[str, Any] = {
        "coordinator_address": coordinator_address.strip() if coordinator_address else None,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    if local_device_ids:
        try:
            ids = [int(i) for i in local_device_ids]
        except (TypeError, ValueError):
            ids = None
        if ids is None or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
            raise ValueError(
                f"--local_device_ids={','.join(map(str, local_device_ids))} is not valid: distinct device "
                "numbers >= 0 of this host, comma-separated (e.g. 0,1)"
            )
        kwargs["local_device_ids"] = ids
    return kwargs


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int | str] | None = None,
    auto: bool = False,
) -> bool:
    """Joins the multi-process runtime when the flags ask for it; returns whether it did.

    Must run before anything starts JAX's backends (a computation, ``jax.devices()``, ...).
    Bad flags raise ValueError; a cluster that cannot be joined raises :class:`InitializeError`.
    """
    kwargs = check_flags(coordinator_address, num_processes, process_id, local_device_ids, auto)
    if kwargs is None:
        return False
    import jax

    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001  (ValueError: nothing detected; runtime errors: unreachable)
        why = f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"
        if auto:
            raise InitializeError(
                f"--distributed: jax.distributed.initialize() could not detect or join the cluster ({why}); run "
                "every process under the cluster's launcher (a Cloud TPU pod slice's workers, SLURM srun, Open MPI "
                "mpirun), or give --coordinator_address, --num_processes and --process_id"
            ) from e
        raise InitializeError(
            f"jax.distributed.initialize({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed ({why}); "
            "check that process 0 runs and is reachable at --coordinator_address, and that every process was "
            "given the same --coordinator_address and --num_processes"
        ) from e
    return True


def process_index() -> int:
    import jax

    return jax.process_index()


def process_count() -> int:
    import jax

    return jax.process_count()


def is_primary() -> bool:
    """Whether this process writes the run's outputs and prints (process 0)."""
    return process_index() == 0


def primary_decides(decision: bool) -> bool:
    """Process 0's ``decision``, on every process (for a choice made from something each host measures for
    itself, like its clock, that all processes must take alike)."""
    if process_count() == 1:
        return bool(decision)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(decision))))


def sync(name: str) -> None:
    """A barrier over all processes (no-op in a single-process run). ``name`` must be the same on
    every process: the barrier checks it."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


_KINDS = {1: ValueError, 2: OSError}  # what the other processes raise for a refusal of this kind


def _kind(error: BaseException) -> int:
    return 1 if isinstance(error, ValueError) else 2 if isinstance(error, OSError) else 0


def _message(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _encode(error: BaseException | None) -> np.ndarray:
    """[failed, kind, message bytes...] as a fixed-size uint8 row, to be gathered from every process."""
    out = np.zeros(MESSAGE_BYTES + 2, np.uint8)
    if error is not None:
        raw = _message(error).encode("utf-8")[:MESSAGE_BYTES]
        out[0], out[1] = 1, _kind(error)
        out[2 : 2 + len(raw)] = np.frombuffer(raw, np.uint8)
    return out


def failures(error: BaseException | None) -> list[tuple[int, type, str]]:
    """Every process says whether it failed (``error``); returns ``(process, kind, message)`` of
    each that did, the same list on every process (ValueError/OSError kinds are kept, anything
    else becomes RuntimeError). Without other processes nothing is exchanged."""
    if process_count() == 1:
        return [] if error is None else [(0, _KINDS.get(_kind(error), RuntimeError), _message(error))]
    from jax.experimental import multihost_utils

    gathered = np.asarray(multihost_utils.process_allgather(_encode(error)))
    return [
        (i, _KINDS.get(int(row[1]), RuntimeError), bytes(row[2:]).rstrip(b"\0").decode("utf-8", errors="replace"))
        for i, row in enumerate(gathered)
        if row[0]
    ]


def _raise_if_any(error: BaseException | None) -> None:
    """When any process failed, every process raises: its own error, or the first failure's."""
    failed = failures(error)
    if not failed:
        return
    if error is not None:
        raise error
    i, kind, text = failed[0]
    raise kind(f"{text} (on process {i} of {process_count()})")


def agree(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` on every process; if it raises on any, it raises on all.

    The failing process re-raises its own exception; the others raise a ValueError or OSError
    (RuntimeError for anything else) with its message and process number. ``fn`` must not itself
    run collectives (a process that fails before one would leave the others waiting in it).
    """
    if process_count() == 1:
        return fn(*args, **kwargs)
    result, error = None, None
    try:
        result = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001  (re-raised right below, on every process)
        error = e
    _raise_if_any(error)
    return result


def primary_first(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """``fn`` on process 0 first, then (once it succeeded) on the others, agreed both times: for
    what must happen once before the others look (create a folder, prepare a dataset's files)."""
    if process_count() == 1:
        return fn(*args, **kwargs)
    primary = is_primary()
    result = agree(lambda: fn(*args, **kwargs) if primary else None)
    other = agree(lambda: None if primary else fn(*args, **kwargs))
    return result if primary else other
