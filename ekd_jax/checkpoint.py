"""Orbax behind a small wrapper: save every epoch (async), keep the latest N and the best, resume.

Pitfall avoided: ``max_to_keep`` together with ``best_fn`` can delete the latest checkpoint, which
breaks resume. We use a preservation policy that keeps the latest N *and* the best by student
accuracy. On resume, a checkpoint of another config or state shape is refused before its state is
read; only one whose files fail to read is reported as corrupt, moved aside (never deleted), and
the previous one tried.

Multi-process runs (``ekd_jax.distributed``): every process calls save and restore (Orbax's
primary host, process 0, writes the metadata and commits; every process writes the shards it
owns), so ``checkpoints/`` must be a folder all hosts see. Decisions that touch files -- enough
free space, a step that fails to read -- are agreed between the processes, so that all of them
take the same path; only process 0 moves a corrupt step aside or prints.
"""

from __future__ import annotations

import errno
import logging
import pathlib
import shutil
import sys
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from ekd_jax import distributed

log = logging.getLogger(__name__)

BEST_METRIC = "best_key"  # ranks checkpoints: student top-1, or teacher top-1 for a 'teacher' run


class CorruptCheckpointError(ValueError):
    pass


def _summary(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def _summary_of(error: BaseException | None, failed: list) -> str:
    """This process's error, or the first failing process's message (multi-process)."""
    if error is not None:
        return _summary(error)
    i, _, text = failed[0]
    return f"on process {i}: {text[:200]}"


def _structure_difference(stored: Any, abstract: Any) -> list[str]:
    """Leaf paths where a checkpoint's stored tree (orbax metadata) and the expected state differ
    in presence, shape or dtype; empty when the checkpoint can hold this state."""
    def name(k) -> str:  # a dict key, attribute or index alike: orbax stores every node as a dict or list
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    def leaves(tree):
        return {"/".join(name(k) for k in p): (tuple(x.shape), np.dtype(x.dtype).name)
                for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    a, b = leaves(stored), leaves(abstract)
    out = []
    for k in sorted(set(a) | set(b)):
        if k not in a:
            out.append(f"{k} missing from the checkpoint")
        elif k not in b:
            out.append(f"{k} not in this run's state")
        elif a[k] != b[k]:
            out.append(f"{k} is {a[k][1]}{list(a[k][0])} in the checkpoint, {b[k][1]}{list(b[k][0])} here")
    return out


COMMIT_TIMEOUT_S = 6 * 3600


class Checkpointer:
    """Saves/restores ``{'state': pytree, 'meta': json}`` under ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str | pathlib.Path, keep: int = 2, async_save: bool = True):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self.aside_directory = self.directory.parent / "corrupt_checkpoints"
        policy = ocm.AnyPreservationPolicy(
            [ocm.LatestN(n=keep), ocm.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=1)]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=async_save,
            # Made by the first save: a run refused before it (another config, a bad teacher
            # checkpoint, ...) leaves no checkpoints/ behind.
            create=False,
            # Every process calls save/restore; process 0 writes the metadata and commits.
            multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=0),
            # Orbax gives an async commit 20 min of wall clock, suspended time included: a run
            # paused (SIGSTOP, a suspended VM) for longer died at its next save with a TimeoutError
            # (seen: a study run paused 20 min for CI). Hours, so that only a real hang trips it.
            async_options=ocp.AsyncOptions(timeout_secs=COMMIT_TIMEOUT_S),
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=("state", "meta"),
            # Registered up front so that a step's metadata (tree, shapes) reads without the state.
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, best_key: float) -> None:
        """Starts an async save; call :meth:`wait` (or :meth:`close`) before reading it back.

        A disk without room for the checkpoint is refused here, before the save starts, with an
        OSError (ENOSPC) naming the folder: Orbax's own failure, from inside its background
        threads, would come with pages of logged tracebacks and a half-written temporary folder.
        """
        # The arrays' bytes, plus what Orbax adds (metadata, OCDBT manifests: ~10% on small states).
        need = int(1.1 * sum(int(getattr(x, "nbytes", 0)) for x in jax.tree_util.tree_leaves(state))) + (1 << 20)
        # Asked on every process and agreed: a host whose disk is full stops all of them here,
        # instead of failing alone inside Orbax while the others wait for it.
        distributed.agree(self._check_free_space, step, need)
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics={BEST_METRIC: float(best_key)},
        )

    def _check_free_space(self, step: int, need: int) -> None:
        where = self.directory
        while not where.exists() and where != where.parent:  # made by the first save
            where = where.parent
        free = shutil.disk_usage(where).free
        if free < need:
            raise OSError(
                errno.ENOSPC,
                f"No space left on device for the checkpoint of step {step} in {self.directory}: it needs about "
                f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free; free some space or use another --workdir",
            )

    def _move_aside(self, step: int, msg: str) -> None:
        """Moves a corrupt step out of the manager's way, never overwriting an earlier copy (process 0
        moves it; every process then reloads the manager's list of steps)."""
        aside = None
        if distributed.is_primary():
            self.aside_directory.mkdir(exist_ok=True)
            aside, n = self.aside_directory / str(step), 1
            while aside.exists():  # the same step may have been moved aside before: keep both
                aside, n = self.aside_directory / f"{step}.{n}", n + 1
            shutil.move(str(self.directory / str(step)), aside)
        distributed.sync(f"ekd_jax:checkpoint_moved_aside:{step}")
        self.manager.reload()
        if aside is not None:
            # Logged below the command line's WARNING level: the warning printed next is what users read.
            log.info("%s; moved to %s, trying the previous one", msg, aside)
            print(f"warning: {msg}; moved to {aside}, trying the previous one", file=sys.stderr, flush=True)

    def restore_latest(
        self, abstract_state: Any, check_meta: Callable[[dict], None] | None = None
    ) -> tuple[Any, dict] | None:
        """The newest checkpoint that restores cleanly, or None when there is none.

        Each step's small ``meta`` item is read first and handed to ``check_meta``, which raises
        (e.g. ValueError: a different config) to refuse the workdir before any state is read; a
        checkpoint whose tree or shapes do not fit ``abstract_state`` is refused the same way. Only
        a step whose files fail to read is corrupt: it is reported, moved to
        ``corrupt_checkpoints/`` (nothing is deleted), and the previous step is tried.
        """
        errors = []
        for step in reversed(self.all_steps()):
            where = f"checkpoint at step {step} in {self.directory}"
            meta = stored = error = None
            try:
                meta = dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
                stored = self.manager.item_metadata(step)["state"]
            except Exception as e:  # orbax raises many types for truncated/missing files
                error = e
            failed = distributed.failures(error)  # agreed: a step unreadable on any host is corrupt for all
            if failed:
                errors.append(f"{where} is corrupt or incomplete ({_summary_of(error, failed)})")
                self._move_aside(step, errors[-1])
                continue
            if check_meta is not None:
                distributed.agree(check_meta, meta)
            tree = getattr(stored, "tree", stored)
            diff = _structure_difference(tree, abstract_state) if tree is not None else []
            if diff:
                raise ValueError(
                    f"{where} holds a state of another shape than this run's ({'; '.join(diff[:3])}"
                    + (f"; {len(diff) - 3} more" if len(diff) > 3 else "")
                    + "): it was written by another version of ekd_jax or another config. Use a new "
                    "--workdir (the checkpoints are left as they are)"
                )
            restored = error = None
            try:
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
                )
            except Exception as e:
                error = e
            failed = distributed.failures(error)
            if failed:
                errors.append(f"{where} is corrupt or incomplete ({_summary_of(error, failed)})")
                self._move_aside(step, errors[-1])
                continue
            if errors and distributed.is_primary():
                print(f"warning: resumed from step {step} instead of the corrupt newer checkpoint(s)", file=sys.stderr, flush=True)
            return restored["state"], meta
        if not errors:
            return None
        raise CorruptCheckpointError(
            "every checkpoint in the workdir failed to read: "
            + "; ".join(errors)
            + f". They were moved to {self.aside_directory}; start again to train from scratch, or use a new --workdir"
        )

    def newest_meta(self) -> dict | None:
        """The ``meta`` item of the newest checkpoint whose meta reads, or None; reads nothing else
        and moves nothing (a corrupt step is left for :meth:`restore_latest` to deal with)."""
        for step in reversed(self.all_steps()):
            try:
                return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
            except Exception:  # noqa: BLE001  (orbax raises many types for truncated/missing files)
                continue
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def save_network(directory: str | pathlib.Path, variables: Any) -> None:
    """Writes one network's {'params', 'batch_stats'} (host arrays) synchronously (student/ and
    teacher/). Called by one process alone (in a multi-process run, process 0): Orbax is told
    that only this process takes part, so it waits for no other."""
    path = pathlib.Path(directory).absolute() / "variables"
    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    with ocp.StandardCheckpointer(multiprocessing_options=alone) as ckptr:
        ckptr.save(path, variables, force=True)


def load_network(directory: str | pathlib.Path, abstract_variables: Any | None = None) -> Any:
    path = pathlib.Path(directory).absolute() / "variables"
    if not path.exists():
        raise ValueError(f"no saved network at {path}: expected the 'student/' or 'teacher/' folder of a finished run")
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, abstract_variables) if abstract_variables is not None else ckptr.restore(path)
