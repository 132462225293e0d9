"""The config schema: every experiment config starts from :func:`base_config` and overrides it.

Names here are a public contract (configs, command-line overrides, other tools use them).
Where a value is our reading of the paper rather than the paper's, docs/METHOD.md and
docs/method_as_implemented.md say so.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import math
import numbers
import os
import pathlib
import uuid

import ml_collections

from ekd_jax import data, losses
from ekd_jax.guided import GUIDE_KINDS, pair_stages
from ekd_jax.methods import LossConfig, get_method
from ekd_jax.models import available_models, suggest_models


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
    # run. Ignored by methods without an online teacher. Default 0: teacher and student start
    # together, from scratch, as the paper states (METHOD.md); a head start departs from it.
    c.teacher.head_start = 0.0
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
    # aux_head (intermediate predictions mimicked through auxiliary heads on both sides) rather than
    # adapter (stage maps mimicked): it cost less in the 900-step few-sample ablation, 3 seeds
    # (docs/results.md section 3: -1.02 vs -2.17 below DML; +1.15 +- 0.36 over adapter, paired);
    # at the converged 2,790-step budget it ends +0.47 +- 0.52 above DML (section 2).
    c.guided.type = "aux_head"  # aux_head | adapter
    c.guided.stages = ()  # stage-pair indices used by ekd / at; empty = all pairs
    # aux_head: whether the teacher-side heads' label CE also trains the teacher backbone (extra
    # supervision no baseline gets); False = the heads learn on stop-gradient teacher maps.
    c.guided.aux_teacher_backbone_grad = False
    c.guided.hint_stage = 1  # fitnet: the stage pair of the hint (RepDistiller hint_layer=2 = stage 2)

    c.dtype = "float32"  # compute dtype: float32 | bfloat16 (params and optimizer stay float32)

    c.eval_every_epochs = 1
    c.log_every_steps = 100
    c.checkpoint_keep = 2  # latest N kept, plus the best by student top-1
    c.async_checkpoint = True
    return c


# Switches whose default has changed since they were added: the value that reproduces what the
# project did before the switch existed (a stored config without the key ran with this value).
BEHAVIOUR_BEFORE_SWITCH = {
    ("teacher", "head_start"): 0.0,
    ("loss", "mask_mean"): "batch",
    ("guided", "aux_teacher_backbone_grad"): True,
}


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


# --------------------------------------------------------------------------- validation

LOSS_CHOICES = {
    "feature_reduction": ("mean", "sum"),
    "feature_kind": ("map", "relation"),
    "ramp_shape": ("linear", "sigmoid"),
    "transfer_mask": ("none", "teacher_correct", "teacher_ahead"),
    "mask_mean": losses.WEIGHTED_MEANS,
}
SCHEDULES = ("multistep", "cosine", "constant")
DTYPES = ("float32", "bfloat16")


def _number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def validate(config) -> None:
    """Refuses a config that cannot give a meaningful run, before any work (data, compile, state).

    Each ValueError names the option, the value and the fix, in one line. Checks that need the
    data (image sizes, class counts) or the networks (stage pairs) follow in ``data`` and
    ``step.build_networks``, still before anything is compiled.
    """
    def need(ok: bool, key: str, value, what: str) -> None:
        if not ok:
            raise ValueError(f"{key}={value!r} is not valid: {what}; fix --config.{key}")

    get_method(config.method)
    for which in ("teacher", "student"):
        name = config[which].model
        close = suggest_models(str(name))
        need(name in available_models(), f"{which}.model", name, "unknown model"
             + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else "")
             + f"; use one of {', '.join(available_models())}")
    need(_int(config.seed) and config.seed >= 0, "seed", config.seed, "an integer >= 0")
    for key, low in (("num_epochs", 1), ("batch_size", 1), ("eval_batch_size", 1), ("eval_every_epochs", 1),
                     ("log_every_steps", 1), ("checkpoint_keep", 1)):
        need(_int(config[key]) and config[key] >= low, key, config[key], f"an integer >= {low}")
    need(config.dtype in DTYPES, "dtype", config.dtype, f"use one of {DTYPES}")
    h = config.teacher.head_start
    need(_number(h) and h >= 0, "teacher.head_start", h, "a fraction of num_epochs >= 0 (0 = no head start)")

    o = config.optimizer
    need(_number(o.learning_rate) and o.learning_rate > 0, "optimizer.learning_rate", o.learning_rate, "a number > 0")
    need(_number(o.momentum) and 0 <= o.momentum < 1, "optimizer.momentum", o.momentum, "a number in [0, 1)")
    need(_number(o.weight_decay) and o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "a number >= 0")
    need(not o.nesterov or o.momentum > 0, "optimizer.nesterov", o.nesterov, "Nesterov needs optimizer.momentum > 0")

    s = config.schedule
    need(s.name in SCHEDULES, "schedule.name", s.name, f"use one of {SCHEDULES}")
    ms = tuple(s.milestones)
    need(all(_number(m) and 0 < m < 1 for m in ms), "schedule.milestones", ms, "fractions of training in (0, 1)")
    need(all(a < b for a, b in zip(ms, ms[1:])), "schedule.milestones", ms, "strictly increasing")
    need(_number(s.decay_factor) and 0 < s.decay_factor <= 1, "schedule.decay_factor", s.decay_factor, "a number in (0, 1]")
    need(_number(s.warmup_epochs) and 0 <= s.warmup_epochs < config.num_epochs, "schedule.warmup_epochs",
         s.warmup_epochs, f"a number of epochs in [0, num_epochs={config.num_epochs})")

    ls = config.loss
    for key in ("tau", "dml_tau", "at_p"):
        need(_number(ls[key]) and ls[key] > 0, f"loss.{key}", ls[key], "a number > 0")
    for key in ("ce_weight", "alpha", "beta", "gamma", "dml_weight", "fitnet_weight", "at_weight"):
        need(_number(ls[key]) and ls[key] >= 0, f"loss.{key}", ls[key], "a weight >= 0")
    need(_number(ls.label_smoothing) and 0 <= ls.label_smoothing < 1, "loss.label_smoothing", ls.label_smoothing,
         "a number in [0, 1)")
    need(all(_number(w) and w >= 0 for w in ls.stage_weights), "loss.stage_weights", tuple(ls.stage_weights),
         "weights >= 0, one per stage pair (empty = all 1)")
    for key in ("ramp_start", "ramp_length"):
        need(_number(ls[key]) and 0 <= ls[key] <= 1, f"loss.{key}", ls[key], "a fraction of training in [0, 1]")
    for key in ("kd_ramp_start", "kd_ramp_length"):
        need(_number(ls[key]) and ls[key] <= 1, f"loss.{key}", ls[key],
             "a fraction of training in [0, 1], or negative to follow loss.ramp_*")
    for key, choices in LOSS_CHOICES.items():
        need(ls[key] in choices, f"loss.{key}", ls[key], f"use one of {choices}")

    g = config.guided
    need(g.type in GUIDE_KINDS, "guided.type", g.type, f"use one of {GUIDE_KINDS}")
    need(not (ls.feature_kind == "relation" and g.type == "aux_head" and config.method == "ekd"), "loss.feature_kind",
         ls.feature_kind, "'relation' compares stage maps, which guided.type='aux_head' does not mimic; "
         "use it with --config.guided.type=adapter")
    need(all(_int(k) and k >= 0 for k in g.stages), "guided.stages", tuple(g.stages),
         "stage-pair indices >= 0 (empty = all pairs)")
    need(len(set(g.stages)) == len(tuple(g.stages)), "guided.stages", tuple(g.stages), "each pair at most once")
    need(_int(g.hint_stage) and g.hint_stage >= 0, "guided.hint_stage", g.hint_stage, "a stage-pair index >= 0")
    _check_stage_choices(config)
    _check_teacher_checkpoint(config)
    data.check_config(config.data)


@functools.lru_cache(maxsize=None)
def _stage_count(model: str) -> int:
    """How many stage maps ``model`` pairs (features[STAGE_SLICE]); structural, so any input size
    tells it. Traced abstractly (``jax.eval_shape``): nothing is compiled or allocated."""
    import jax
    import jax.numpy as jnp

    from ekd_jax.models import STAGE_SLICE, create_model

    net = create_model(model, 10)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    # The key is made inside the traced function: jax.random.key outside would compile a program.
    variables = jax.eval_shape(lambda x: net.init(jax.random.key(0), x, train=False), x)
    _, feats = jax.eval_shape(lambda v, x: net.apply(v, x, train=False), variables, x)
    return len(feats[STAGE_SLICE])


def _check_stage_choices(config) -> None:
    """Stage-pair indices (guided.stages, guided.hint_stage) and loss.stage_weights against the
    pairs this teacher/student has, checked here so that they name their own option."""
    method = get_method(config.method)
    g, weights = config.guided, tuple(config.loss.stage_weights)
    uses_stages = method.guide == "config" or method.name == "at"
    if not (method.guide == "adapter_hint" or (uses_stages and (g.stages or weights))):
        return
    n = len(pair_stages(_stage_count(config.student.model), _stage_count(config.teacher.model)))
    pairs = f"{config.teacher.model}/{config.student.model} have {n} stage pairs, indices 0..{n - 1}"
    if method.guide == "adapter_hint" and g.hint_stage >= n:
        raise ValueError(f"guided.hint_stage={g.hint_stage!r} is not valid: {pairs}; fix --config.guided.hint_stage")
    if uses_stages:
        bad = [k for k in g.stages if k >= n]
        if bad:
            raise ValueError(
                f"guided.stages={tuple(g.stages)!r} is not valid: {bad} out of range, {pairs}; fix --config.guided.stages"
            )
        used = len(g.stages) or n
        if method.guide == "config" and weights and len(weights) != used:
            raise ValueError(
                f"loss.stage_weights={weights!r} is not valid: one weight per stage pair used ({used}); "
                "fix --config.loss.stage_weights"
            )


def _check_teacher_checkpoint(config) -> None:
    """An offline method's frozen teacher: the folder must hold a finished teacher of teacher.model.
    (Its class count and input shape need the data: train.set_up checks them.)"""
    method = get_method(config.method)
    if not method.needs_teacher_checkpoint:
        return
    src = str(config.teacher.checkpoint or "")
    if not src.strip():
        raise ValueError(
            f"teacher.checkpoint='' is not valid: method {method.name!r} distils from a frozen, trained teacher; "
            "fix --config.teacher.checkpoint=<workdir of a finished 'teacher' run>"
        )
    meta_path = pathlib.Path(src) / "teacher" / "network.json"
    try:
        meta = json.loads(meta_path.read_text())
        model = meta["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        what = "is missing" if isinstance(e, FileNotFoundError) else f"cannot be read: {type(e).__name__}"
        raise ValueError(
            f"teacher.checkpoint={src!r} holds no finished teacher ({meta_path} {what}); point "
            "--config.teacher.checkpoint at the workdir of a completed 'teacher' (or dml/ekd) run"
        ) from e
    if model != config.teacher.model:
        raise ValueError(
            f"teacher.checkpoint holds a {model!r} teacher but teacher.model={config.teacher.model!r}; "
            f"set --config.teacher.model={model}"
        )


def prepare_workdir(workdir) -> pathlib.Path:
    """Creates ``workdir`` (and its parents) and proves it writable, or refuses it with the fix."""
    if not workdir or not str(workdir).strip():
        raise ValueError("--workdir is empty: give the folder for the run's checkpoints and outputs")
    path = pathlib.Path(workdir).expanduser().absolute()
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise ValueError(
                f"--workdir {str(workdir)!r} cannot be a folder: {p} is a file. Choose another --workdir"
            )
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe_{uuid.uuid4().hex}"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as e:
        why = "the disk is full" if e.errno == errno.ENOSPC else f"{type(e).__name__}: {os.strerror(e.errno) if e.errno else e}"
        raise ValueError(f"cannot write in --workdir {str(workdir)!r} ({why}); choose a folder you can write to") from e
    return path
