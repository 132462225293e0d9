"""Orbax behind a small wrapper: save every epoch (async), keep the latest N and the best, resume.

Pitfall avoided: ``max_to_keep`` together with ``best_fn`` can delete the latest checkpoint, which
breaks resume. We use a preservation policy that keeps the latest N *and* the best by student
accuracy. A checkpoint that fails to restore is reported and the previous one is tried.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import sys
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

log = logging.getLogger(__name__)

BEST_METRIC = "best_key"  # ranks checkpoints: student top-1, or teacher top-1 for a 'teacher' run


class CorruptCheckpointError(ValueError):
    pass


class Checkpointer:
    """Saves/restores ``{'state': pytree, 'meta': json}`` under ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str | pathlib.Path, keep: int = 2, async_save: bool = True):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        policy = ocm.AnyPreservationPolicy(
            [ocm.LatestN(n=keep), ocm.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=1)]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, best_key: float) -> None:
        """Starts an async save; call :meth:`wait` (or :meth:`close`) before reading it back."""
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics={BEST_METRIC: float(best_key)},
        )

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """The newest checkpoint that restores cleanly, or None when there is none.

        A checkpoint that fails to restore is reported (logged as an error, not skipped
        silently) and the previous one is used; if every one fails, raises.
        """
        steps = self.all_steps()
        if not steps:
            return None
        errors = []
        for step in reversed(steps):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                    ),
                )
            except Exception as e:  # orbax raises many types for truncated/missing files
                msg = f"checkpoint at step {step} in {self.directory} is corrupt or incomplete ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
                errors.append(msg)
                # Moved aside (kept for inspection) so a new save of this step is not blocked by it.
                aside = self.directory.parent / "corrupt_checkpoints" / str(step)
                aside.parent.mkdir(exist_ok=True)
                shutil.rmtree(aside, ignore_errors=True)
                shutil.move(str(self.directory / str(step)), aside)
                self.manager.reload()
                log.error("%s; moved to %s, trying the previous one", msg, aside)
                print(f"warning: {msg}; moved to {aside}, trying the previous one", file=sys.stderr, flush=True)
                continue
            if errors:
                print(f"warning: resumed from step {step} instead of the corrupt newer checkpoint(s)", file=sys.stderr, flush=True)
            return restored["state"], dict(restored["meta"])
        raise CorruptCheckpointError(
            "every checkpoint in the workdir failed to restore: "
            + "; ".join(errors)
            + ". Remove the 'checkpoints' folder to start over, or use a new --workdir"
        )

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
    """Writes one network's {'params', 'batch_stats'} synchronously (used for student/ and teacher/)."""
    path = pathlib.Path(directory).absolute() / "variables"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, variables, force=True)


def load_network(directory: str | pathlib.Path, abstract_variables: Any | None = None) -> Any:
    path = pathlib.Path(directory).absolute() / "variables"
    if not path.exists():
        raise ValueError(f"no saved network at {path}: expected the 'student/' or 'teacher/' folder of a finished run")
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, abstract_variables) if abstract_variables is not None else ckptr.restore(path)
