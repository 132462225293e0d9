"""The config schema: every experiment config starts from :func:`base_config` and overrides it.

Names here are a public contract (configs, command-line overrides, other tools use them).
Where a value is our reading of the paper rather than the paper's, METHOD.md and README say so.
"""

from __future__ import annotations

import dataclasses
import json

import ml_collections

from ekd_jax import data
from ekd_jax.methods import LossConfig


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = "ekd"  # vanilla | teacher | kd | fitnet | at | dml | ekd

    c.teacher = ml_collections.ConfigDict()
    c.teacher.model = "resnet32"
    c.teacher.checkpoint = ""  # workdir of a finished run whose teacher/ an offline method loads
    # Online methods (ekd, dml): the teacher first trains alone, from scratch, for head_start x
    # num_epochs epochs (rounded to whole epochs); then the student and guided modules start and
    # train their full num_epochs while the teacher goes on, on its own LR schedule over the longer
    # run. 0 = both start together. Ignored by methods without an online teacher. Default 1.0 from
    # the recorded study (docs/results.md): the teacher first trains for the student's budget.
    c.teacher.head_start = 1.0
    c.student = ml_collections.ConfigDict()
    c.student.model = "resnet8"

    c.data = data.default_config()

    c.batch_size = 64
    c.eval_batch_size = 256
    c.num_epochs = 240

    # Reference recipe (RepDistiller): SGD momentum 0.9, wd 5e-4, lr 0.05, x0.1 at 62.5/75/87.5%.
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 0.05
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = False
    c.optimizer.weight_decay = 5e-4
    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "multistep"  # multistep | cosine | constant
    c.schedule.milestones = (0.625, 0.75, 0.875)  # fractions of training
    c.schedule.decay_factor = 0.1
    c.schedule.warmup_epochs = 0.0

    # Loss weights and switches (methods.LossConfig documents each field).
    c.loss = ml_collections.ConfigDict(dataclasses.asdict(LossConfig()))

    c.guided = ml_collections.ConfigDict()
    c.guided.type = "adapter"  # adapter | aux_head
    c.guided.stages = ()  # stage-pair indices used by ekd / at; empty = all pairs
    c.guided.hint_stage = 1  # fitnet: the stage pair of the hint (RepDistiller hint_layer=2 = stage 2)

    c.dtype = "float32"  # compute dtype: float32 | bfloat16 (params and optimizer stay float32)

    c.eval_every_epochs = 1
    c.log_every_steps = 100
    c.checkpoint_keep = 2  # latest N kept, plus the best by student top-1
    c.async_checkpoint = True
    return c


# Switches whose default has changed since they were added: the value that reproduces what the
# project did before the switch existed (a stored config without the key ran with this value).
BEHAVIOUR_BEFORE_SWITCH = {("teacher", "head_start"): 0.0}


def config_difference(stored: dict, current: dict) -> list[str]:
    """Dotted keys where a run's stored config (JSON dict) and the current one differ.

    A key the stored config lacks is a switch added to the project after the run started. It is
    not a difference when the current value is the one that reproduces the earlier behaviour:
    the key's :func:`base_config` default (each new switch's default keeps the earlier behaviour,
    the project's rule for new options), or, for a switch whose default changed later, its
    ``BEHAVIOUR_BEFORE_SWITCH`` value. So a run from before it is resumed or reused rather than
    refused, and never continued under a different behaviour.
    """
    defaults = json.loads(base_config().to_json_best_effort())
    for path, value in BEHAVIOUR_BEFORE_SWITCH.items():
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

    return list(walk(stored, current, defaults, ""))
