"""When things happen in a run: learning-rate schedules and the teacher head start.

The head start is one unit (:class:`HeadStart`): the config gives it as a fraction of
``num_epochs``; everything else (the teacher-only epochs, the step the student starts at, whether
an epoch's student is still waiting) is derived here, in one place.
"""

from __future__ import annotations

import dataclasses

import optax

from ekd_jax.methods import get_method


def make_schedule(spec, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Learning-rate schedule over ``total_steps`` optimizer steps: multistep, cosine or constant,
    after an optional linear warm-up from 0 over ``schedule.warmup_epochs`` (the same warm-up for
    every shape: optax's ``warmup_cosine_decay_schedule`` for cosine, and its linear ramp joined
    to the others). Multistep milestones stay at their fractions of the whole run."""
    s, lr = spec.schedule, float(spec.optimizer.learning_rate)
    warmup = int(round(float(s.warmup_epochs) * steps_per_epoch))
    if warmup >= total_steps:
        raise ValueError(
            f"schedule.warmup_epochs={s.warmup_epochs} covers the whole run ({total_steps} steps); "
            "use fewer warm-up epochs than num_epochs"
        )
    if s.name == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total_steps, end_value=0.0)
    if s.name == "multistep":
        steps = [int(round(float(f) * total_steps)) for f in s.milestones]
        merged = sorted({b for b in steps if steps.count(b) > 1})
        if merged:
            raise ValueError(
                f"schedule.milestones={tuple(s.milestones)} fall on the same step ({merged[0]} of "
                f"{total_steps}) at this run length: give milestones that are further apart, or train longer"
            )
        if warmup and steps and min(steps) <= warmup:
            raise ValueError(
                f"schedule.milestones={tuple(s.milestones)}: the first decay (step {min(steps)}) falls within "
                f"the warm-up ({warmup} steps); shorten schedule.warmup_epochs"
            )
        main = optax.piecewise_constant_schedule(lr, {b - warmup: float(s.decay_factor) for b in steps})
    else:  # constant (the spec allows nothing else)
        main = optax.constant_schedule(lr)
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


@dataclasses.dataclass(frozen=True)
class HeadStart:
    """The teacher head start: ``epochs`` whole epochs in which only the online teacher learns.

    ``teacher.head_start`` (a fraction of ``num_epochs``, rounded to whole epochs) applies only to
    methods whose teacher learns online next to the student (ekd, dml); for the others it is 0.
    """

    epochs: int
    steps_per_epoch: int

    @classmethod
    def of(cls, spec, steps_per_epoch: int) -> "HeadStart":
        online = get_method(spec.method).online_teacher
        return cls(int(round(float(spec.teacher.head_start) * spec.num_epochs)) if online else 0, int(steps_per_epoch))

    @property
    def steps(self) -> int:
        """The global step at which the student and the guided modules start."""
        return self.epochs * self.steps_per_epoch

    def waiting(self, epoch: int) -> bool:
        """Whether the student has not started yet in ``epoch`` (it has no loss, lr or accuracy)."""
        return epoch < self.epochs

    def student_step(self, global_step: int) -> int:
        """The student's own step number (its schedule's step) at a global step."""
        return global_step - self.steps
