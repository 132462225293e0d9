"""Stopping a run cleanly: SIGINT (Ctrl-C) and SIGTERM (SLURM, a preempted VM) end training at a step
boundary (between two calls of the compiled program, every ``steps_per_call`` steps), after a checkpoint
of that exact step, so that the same command resumes where it stopped.

While the loop trains, the first signal only asks it to stop (:meth:`StopSignals.poll` answers at each step
boundary); before training starts (loading data, compiling) there is nothing to save, and a signal stops
at once. A second signal while the checkpoint is being saved stops at once too, without it: the previous
checkpoint stays, and an unfinished save is never committed (Orbax writes to a temporary folder first).

In a multi-process run every process must stop after the same step, or the others wait forever in the
next step's collectives; one signalled process is enough to stop them all. Each process therefore adds
its own signal (0 = none) to a tiny device-side max over all processes at every step boundary, and reads
that max one boundary later: every process reads the same value at the same boundary, while the device
keeps one step queued (reading it at once would wait for the step in flight on every step).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import numpy as np

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Training was stopped by a signal. A KeyboardInterrupt (not an Exception), so that no ``except
    Exception`` on the way up swallows it; the command lines print :attr:`message` as one line and exit
    with :attr:`exit_status` (128 + the signal number: 130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = int(signum)
        self.message = message

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def resume_message(step: int, epoch: int) -> str:
    """The line a stopped run prints (``epoch`` counted from 0, printed from 1 like every epoch line)."""
    return f"interrupted at step {step} (epoch {epoch + 1}); run the same command to resume"


class StopSignals:
    """SIGINT/SIGTERM handlers for the duration of a ``with`` block (only in the main thread: a run
    started from another thread keeps Python's defaults).

    ``phase`` says what a signal does: while ``"training"`` the first one asks to stop at the next step
    boundary (:meth:`poll`, called at every boundary, returns the signal number to stop on, 0 to go on,
    the same on every process); in any other phase, or a second time, it stops at once. ``saving`` names
    the step being saved after a stop, for the message of a second signal.
    """

    _AT_ONCE = {  # phase -> what a signal that stops at once says
        "setup": "interrupted before training started; run the same command to start again",
        "training": "interrupted again, while training: stopped without saving; run the same command to resume "
                    "from the newest checkpoint",
        "finish": "interrupted after training, while the run's outputs were written; run the same command to "
                  "write them",
    }

    def __init__(self):
        self.phase = "setup"
        self.signum = 0  # the first signal received here (0: none)
        self.stopped_by = 0  # what the last poll answered: the signal every process stops on
        self.saving: int | None = None
        self.mesh: Any = None  # the run's mesh, set once it exists (multi-process agreement)
        self._previous: dict = {}
        self._pending = None  # the max over processes asked at the previous step boundary
        self._max = None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        first = not self.signum
        self.signum = self.signum or signum
        if first and self.phase == "training":
            return  # the loop stops at the next step boundary and saves that step
        if self.saving is not None:
            raise Interrupted(signum, f"interrupted again while the checkpoint of step {self.saving} was being saved: "
                                      "it was not finished; run the same command to resume from the previous checkpoint")
        raise Interrupted(signum, self._AT_ONCE[self.phase])

    def poll(self) -> int:
        """The signal to stop on at this step boundary (0: go on), agreed between processes."""
        import jax

        if jax.process_count() == 1:
            self.stopped_by = self.signum
            return self.signum
        if self._max is None:
            import jax.numpy as jnp

            from ekd_jax import parallel

            self._max = jax.jit(jnp.max, out_shardings=parallel.replicated(self.mesh))
            self._sharding = parallel.batch_sharded(self.mesh)
            self._local = len(self.mesh.local_devices)
        flags = jax.make_array_from_process_local_data(
            self._sharding, np.full((self._local,), self.signum, np.int32), (int(self.mesh.devices.size),)
        )
        pending, self._pending = self._pending, self._max(flags)
        self.stopped_by = 0 if pending is None else int(pending)
        return self.stopped_by
