"""The one build of a run: (spec, the data's facts) -> networks, optimizer, schedules, head start.

Training, ``ekd-bench``, the tests' helpers and benchmarks/ all build through :func:`build`, so that what
is timed or tested is what trains. Nothing is compiled or initialised by the build itself; the result's
:meth:`Built.init_state` and :meth:`Built.compile` do that, when asked.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import optax

from ekd_jax import data, step
from ekd_jax.schedules import HeadStart, make_schedule
from ekd_jax.spec import Spec


@dataclasses.dataclass(frozen=True)
class DataFacts:
    """What the build needs to know of the data: class count, image shape (as the source yields it),
    training-set size, per-channel statistics."""

    num_classes: int
    image_shape: tuple[int, int, int]
    train_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, source: Any) -> "DataFacts":
        """The facts of a loaded data source (``ekd_jax.data.load``)."""
        return cls(source.num_classes, tuple(source.image_shape), source.train_size, tuple(source.mean),
                   tuple(source.std))


@dataclasses.dataclass(frozen=True)
class Built:
    nets: step.Networks
    tx: optax.GradientTransformation
    schedule: optax.Schedule  # the student's (and guides'; the teacher's too without a head start)
    teacher_schedule: optax.Schedule | None  # the teacher's own, over the longer run, with a head start
    head: HeadStart
    steps_per_epoch: int

    def init_state(self, seed: int, mesh) -> step.JointState:
        """The initial joint state, replicated over ``mesh``."""
        return step.init_state(self.nets, self.tx, seed, mesh)

    def compile(self, mesh) -> step.Steps:
        """The jitted train and eval programs over ``mesh`` (compiled at first use or ``precompile``)."""
        return step.compile_steps(self.nets, self.tx, mesh)


def build(spec: Spec, facts: DataFacts) -> Built:
    """The networks, optimizer and schedules of ``spec`` on data with ``facts``."""
    spe = data.steps_per_epoch(facts.train_size, spec.batch_size)
    head = HeadStart.of(spec, spe)
    student_steps = spe * spec.num_epochs
    t_shape = tuple(data.teacher_input_shape(spec.data, facts.image_shape))
    s_shape = tuple(data.student_input_shape(spec.data, facts.image_shape))
    views = functools.partial(_views, d=spec.data, mean=facts.mean, std=facts.std)
    nets = step.build_networks(spec, facts.num_classes, t_shape, s_shape, views, student_steps, head.steps)
    schedule = make_schedule(spec, spe, student_steps)
    teacher_schedule = make_schedule(spec, spe, head.steps + student_steps) if head.epochs else None
    o = spec.optimizer
    tx = step.make_optimizer(nets, schedule, o.momentum, o.weight_decay, o.nesterov, teacher_learning_rate=teacher_schedule)
    return Built(nets, tx, schedule, teacher_schedule, head, spe)


def _views(images, key, train, *, d, mean, std):
    """``step.ViewFn``: the teacher's and the student's input from a uint8 batch (jit-traceable)."""
    return data.make_views(images, key, d, mean, std, train)
