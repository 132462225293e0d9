"""The one validation of a run's config: a ``ml_collections.ConfigDict`` (``ekd_jax.config.base_config``
plus a config file's and the command line's overrides) -> a frozen :class:`ekd_jax.spec.Spec`.

Every check that does not need the loaded data happens here, once, before any work (a workdir made,
data loaded, anything compiled): option types and ranges, names (methods, models, sources), the
combinations (stage pairs of this teacher/student, an offline method's finished teacher, the few-sample
modes, the stream's fields) and the files a source names (an ``.npz`` that must exist, an ``arrayrecord:``
pattern that must match). Each refusal is a ValueError of one line naming the option, the value and the
fix. Checks that need the data (image sizes against the low-resolution factor, class counts against a
frozen teacher) are the loader's and the trainer's, and they still come before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import pathlib
from typing import Any

from ekd_jax import data
from ekd_jax import spec as spec_lib
from ekd_jax.data import check_downsample  # the loader's check, asked here with data.image_size
from ekd_jax.data.stream import CHANNELS as STREAM_CHANNELS
from ekd_jax.data.views import LOWRES_MODES
from ekd_jax.guided import GUIDE_KINDS, pair_stages
from ekd_jax.losses import WEIGHTED_MEANS
from ekd_jax.methods import get_method
from ekd_jax.models import DTYPES as MODEL_DTYPES
from ekd_jax.models import available_models, suggest_models

LOSS_CHOICES = {
    "feature_reduction": ("mean", "sum"),
    "feature_kind": ("map", "relation"),
    "ramp_shape": ("linear", "sigmoid"),
    "transfer_mask": ("none", "teacher_correct", "teacher_ahead"),
    "mask_mean": WEIGHTED_MEANS,
}
SCHEDULES = ("multistep", "cosine", "constant")
DTYPES = tuple(MODEL_DTYPES)
SOURCE_FORMS = ("digits", "tfds:<name>", "npz:<path>", "arrayrecord:<pattern>")
DOWNSAMPLE_FACTORS = (1, 2, 4, 8)
STREAM_SOURCES = ("tfds", "arrayrecord")


def validate(config, check_files: bool = True) -> spec_lib.Spec:
    """The spec of ``config`` (a ConfigDict or any mapping of the same shape), or a ValueError naming
    the first option that cannot give a meaningful run. ``check_files=False``: the files the options
    name (an offline method's teacher run, an ``.npz``, an ``arrayrecord:`` pattern) are not looked at,
    for a caller that never reads them (``ekd-bench`` times synthetic data and a random frozen teacher)."""
    spec = _typed(spec_lib.Spec, config, "")
    method = get_method(spec.method)  # an unknown name: its message suggests the closest one
    _check_run(spec, method)
    _check_teacher_checkpoint(spec, method, check_files)
    _check_data(spec.data, check_files)
    return spec


def validate_data(block) -> spec_lib.DataSpec:
    """The data block alone (``ekd-evaluate`` rebuilds a finished run's from its summary.json)."""
    d = _typed(spec_lib.DataSpec, block, "data.")
    _check_data(d)
    return d


# --------------------------------------------------------------------------- types


def _typed(cls, node, prefix: str):
    """``cls`` (a spec dataclass) from a config node: nested blocks recursively, sequences as tuples,
    None only where the option allows it. A key the schema does not have is refused by name."""
    items = dict(node.items()) if hasattr(node, "items") else None
    if items is None:
        raise ValueError(f"{prefix.rstrip('.')}={node!r} is not valid: a block of options; fix --config.{prefix.rstrip('.')}")
    hints = spec_lib.field_types(cls)
    unknown = sorted(set(items) - set(hints))
    if unknown:
        raise ValueError(f"unknown config key '{prefix}{unknown[0]}': {cls.__name__} has {', '.join(hints)}")
    values = {}
    for name, hint in hints.items():
        if name not in items:
            continue  # the declared default
        value = items[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _typed(hint, value, f"{prefix}{name}.")
        elif isinstance(value, (list, tuple)):
            values[name] = tuple(value)
        else:
            values[name] = value
    return cls(**values)


# --------------------------------------------------------------------------- checks


def _need(ok: bool, key: str, value, what: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} is not valid: {what}; fix --config.{key}")


def _number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _numbers(v) -> bool:
    return isinstance(v, tuple) and all(_number(x) for x in v)


def _check_run(s: spec_lib.Spec, method) -> None:
    for which in ("teacher", "student"):
        name = s.network(which).model
        close = suggest_models(str(name))
        _need(name in available_models(), f"{which}.model", name, "unknown model"
              + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else "")
              + f"; use one of {', '.join(available_models())}")
    _need(_int(s.seed) and s.seed >= 0, "seed", s.seed, "an integer >= 0")
    for key, low in (("num_epochs", 1), ("batch_size", 1), ("eval_batch_size", 1), ("eval_every_epochs", 1),
                     ("log_every_steps", 1), ("checkpoint_keep", 1), ("steps_per_call", 1)):
        _need(_int(getattr(s, key)) and getattr(s, key) >= low, key, getattr(s, key), f"an integer >= {low}")
    _need(s.dtype in DTYPES, "dtype", s.dtype, f"use one of {DTYPES}")
    _need(_number(s.checkpoint_every_s) and s.checkpoint_every_s >= 0, "checkpoint_every_s", s.checkpoint_every_s,
          "seconds >= 0 between epoch checkpoints (0 = after every epoch)")
    h = s.teacher.head_start
    _need(_number(h) and h >= 0, "teacher.head_start", h, "a fraction of num_epochs >= 0 (0 = no head start)")

    o = s.optimizer
    _need(_number(o.learning_rate) and o.learning_rate > 0, "optimizer.learning_rate", o.learning_rate, "a number > 0")
    _need(_number(o.momentum) and 0 <= o.momentum < 1, "optimizer.momentum", o.momentum, "a number in [0, 1)")
    _need(_number(o.weight_decay) and o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "a number >= 0")
    _need(not o.nesterov or o.momentum > 0, "optimizer.nesterov", o.nesterov, "Nesterov needs optimizer.momentum > 0")

    sc = s.schedule
    _need(sc.name in SCHEDULES, "schedule.name", sc.name, f"use one of {SCHEDULES}")
    ms = sc.milestones
    _need(all(_number(m) and 0 < m < 1 for m in ms), "schedule.milestones", ms, "fractions of training in (0, 1)")
    _need(all(a < b for a, b in zip(ms, ms[1:])), "schedule.milestones", ms, "strictly increasing")
    _need(_number(sc.decay_factor) and 0 < sc.decay_factor <= 1, "schedule.decay_factor", sc.decay_factor,
          "a number in (0, 1]")
    _need(_number(sc.warmup_epochs) and 0 <= sc.warmup_epochs < s.num_epochs, "schedule.warmup_epochs",
          sc.warmup_epochs, f"a number of epochs in [0, num_epochs={s.num_epochs})")

    ls = s.loss
    for key in ("tau", "dml_tau", "at_p"):
        _need(_number(getattr(ls, key)) and getattr(ls, key) > 0, f"loss.{key}", getattr(ls, key), "a number > 0")
    for key in ("ce_weight", "alpha", "beta", "gamma", "dml_weight", "fitnet_weight", "at_weight"):
        _need(_number(getattr(ls, key)) and getattr(ls, key) >= 0, f"loss.{key}", getattr(ls, key), "a weight >= 0")
    _need(_number(ls.label_smoothing) and 0 <= ls.label_smoothing < 1, "loss.label_smoothing", ls.label_smoothing,
          "a number in [0, 1)")
    _need(all(_number(w) and w >= 0 for w in ls.stage_weights), "loss.stage_weights", ls.stage_weights,
          "weights >= 0, one per stage pair (empty = all 1)")
    for key in ("ramp_start", "ramp_length"):
        _need(_number(getattr(ls, key)) and 0 <= getattr(ls, key) <= 1, f"loss.{key}", getattr(ls, key),
              "a fraction of training in [0, 1]")
    for key in ("kd_ramp_start", "kd_ramp_length"):
        _need(_number(getattr(ls, key)) and getattr(ls, key) <= 1, f"loss.{key}", getattr(ls, key),
              "a fraction of training in [0, 1], or negative to follow loss.ramp_*")
    for key, choices in LOSS_CHOICES.items():
        _need(getattr(ls, key) in choices, f"loss.{key}", getattr(ls, key), f"use one of {choices}")

    g = s.guided
    _need(g.type in GUIDE_KINDS, "guided.type", g.type, f"use one of {GUIDE_KINDS}")
    _need(not (ls.feature_kind == "relation" and g.type == "aux_head" and s.method == "ekd"), "loss.feature_kind",
          ls.feature_kind, "'relation' compares stage maps, which guided.type='aux_head' does not mimic; "
          "use it with --config.guided.type=adapter")
    _need(all(_int(k) and k >= 0 for k in g.stages), "guided.stages", g.stages,
          "stage-pair indices >= 0 (empty = all pairs)")
    _need(len(set(g.stages)) == len(g.stages), "guided.stages", g.stages, "each pair at most once")
    _need(_int(g.hint_stage) and g.hint_stage >= 0, "guided.hint_stage", g.hint_stage, "a stage-pair index >= 0")
    _check_stage_choices(s, method)


@functools.lru_cache(maxsize=None)
def stage_count(model: str) -> int:
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


def _check_stage_choices(s: spec_lib.Spec, method) -> None:
    """Stage-pair indices (guided.stages, guided.hint_stage) and loss.stage_weights against the
    pairs this teacher/student has, checked here so that they name their own option."""
    g, weights = s.guided, s.loss.stage_weights
    uses_stages = method.guide == "config" or method.name == "at"
    if not (method.guide == "adapter_hint" or (uses_stages and (g.stages or weights))):
        return
    n = len(pair_stages(stage_count(s.student.model), stage_count(s.teacher.model)))
    pairs = f"{s.teacher.model}/{s.student.model} have {n} stage pairs, indices 0..{n - 1}"
    if method.guide == "adapter_hint" and g.hint_stage >= n:
        raise ValueError(f"guided.hint_stage={g.hint_stage!r} is not valid: {pairs}; fix --config.guided.hint_stage")
    if uses_stages:
        bad = [k for k in g.stages if k >= n]
        if bad:
            raise ValueError(
                f"guided.stages={g.stages!r} is not valid: {bad} out of range, {pairs}; fix --config.guided.stages"
            )
        used = len(g.stages) or n
        if method.guide == "config" and weights and len(weights) != used:
            raise ValueError(
                f"loss.stage_weights={weights!r} is not valid: one weight per stage pair used ({used}); "
                "fix --config.loss.stage_weights"
            )


def _check_teacher_checkpoint(s: spec_lib.Spec, method, check_files: bool = True) -> None:
    """An offline method's frozen teacher: the folder must hold a finished teacher of teacher.model.
    (Its class count and input shape need the data: the trainer checks them.)"""
    if not method.needs_teacher_checkpoint:
        return
    src = str(s.teacher.checkpoint or "")
    if not src.strip():
        raise ValueError(
            f"teacher.checkpoint='' is not valid: method {method.name!r} distils from a frozen, trained teacher; "
            "fix --config.teacher.checkpoint=<workdir of a finished 'teacher' run>"
        )
    if not check_files:
        return
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
    if model != s.teacher.model:
        raise ValueError(
            f"teacher.checkpoint holds a {model!r} teacher but teacher.model={s.teacher.model!r}; "
            f"set --config.teacher.model={model}"
        )


def _fail(key: str, value: Any, what: str) -> None:
    raise ValueError(f"data.{key}={value!r} is not valid: {what}; fix --config.data.{key}")


def _check_data(d: spec_lib.DataSpec, check_files: bool = True) -> None:
    """The data block's fields, and the files a source names, before any (slow) loading."""
    kind, sep, arg = d.source.partition(":") if isinstance(d.source, str) else ("", "", "")
    if not (d.source == "digits" or (sep and kind in ("tfds", "npz", "arrayrecord") and arg.strip())):
        raise ValueError(
            f"Unknown data.source {d.source!r}. Valid forms: {', '.join(SOURCE_FORMS)} "
            "(e.g. 'tfds:cifar100', 'npz:/data/mine.npz', 'digits')."
        )
    if d.kind == "npz" and check_files:
        data.npz_file(d.location)  # a missing file is refused before the workdir is even made
    if d.image_size is not None and (not _int(d.image_size) or d.image_size < 1):
        raise ValueError(f"data.image_size must be a positive int or None (native size), got {d.image_size!r}.")
    n, frac = d.samples_per_class, d.train_fraction
    if not _int(n) or n < 0:
        raise ValueError(f"data.samples_per_class must be an int >= 0 (0 = off), got {n!r}.")
    if not (_number(frac) and 0.0 < frac <= 1.0):
        raise ValueError(f"data.train_fraction must be in (0, 1] (1.0 = the whole training split), got {frac!r}.")
    if n > 0 and frac != 1.0:
        raise ValueError(
            f"data.samples_per_class={n} and data.train_fraction={frac} are both set; "
            "choose one few-sample mode and leave the other off (0 / 1.0)."
        )
    if not _int(d.subset_seed) or d.subset_seed < 0:
        raise ValueError(
            f"data.subset_seed={d.subset_seed!r} is not valid: an integer >= 0 (it seeds "
            "np.random.default_rng); fix --config.data.subset_seed"
        )
    if not _int(d.crop_padding) or d.crop_padding < 0:
        raise ValueError(f"data.crop_padding must be an int >= 0 (0 = no crop), got {d.crop_padding!r}.")
    if d.lowres_mode not in LOWRES_MODES:
        raise ValueError(f"Unknown data.lowres_mode {d.lowres_mode!r}; use one of {LOWRES_MODES}.")
    if not _int(d.student_downsample) or d.student_downsample not in DOWNSAMPLE_FACTORS:
        raise ValueError(f"data.student_downsample must be one of {DOWNSAMPLE_FACTORS}, got {d.student_downsample!r}.")
    if d.image_size is not None:
        check_downsample(d, (d.image_size, d.image_size))
    _check_stream_fields(d, check_files)


def _check_stream_fields(d: spec_lib.DataSpec, check_files: bool = True) -> None:
    """The stream's fields (and the fixed statistics, which both paths honour)."""
    if d.streaming not in (True, False):
        _fail("streaming", d.streaming, "True (read tfds:<name> by index with grain) or False")
    if d.on_device not in (True, False):
        _fail("on_device", d.on_device, "True (the training split held on the device) or False")
    for key, v in (("mean", d.mean), ("std", d.std)):
        if not _numbers(v):
            _fail(key, v, "a tuple of numbers, one per channel in [0, 1] units (empty = measured on the training split)")
    if len(d.mean) != len(d.std):
        _fail("std", d.std, f"one value per channel, as many as data.mean={d.mean!r} (or both empty)")
    if any(s <= 0 for s in d.std):
        _fail("std", d.std, "standard deviations > 0")
    scale, ratio = d.crop_scale, d.crop_ratio
    if not (_numbers(scale) and len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        _fail("crop_scale", scale, "(min, max) area fractions of the random-resized crop, 0 < min <= max <= 1")
    if not (_numbers(ratio) and len(ratio) == 2 and 0 < ratio[0] <= ratio[1]):
        _fail("crop_ratio", ratio, "(min, max) aspect ratios (width / height) of the random-resized crop, 0 < min <= max")
    if not _int(d.workers) or d.workers < 0:
        _fail("workers", d.workers, "an integer >= 0 (grain worker processes of the stream; 0 = in the training process)")
    resize, size = d.eval_resize, d.image_size
    if resize is not None and (not _int(resize) or resize < 1):
        _fail("eval_resize", resize, "a positive int (the shorter side before the centre crop), or None (= data.image_size)")
    if not d.is_stream:
        return
    if d.on_device:
        _fail("on_device", True, "False with a stream, which reads data larger than memory by index on the host")
    if d.kind not in STREAM_SOURCES:
        _fail("streaming", True, f"the stream reads tfds:<name> or arrayrecord:<pattern> sources, not {d.source!r}")
    if size is None:
        _fail("image_size", None, "the stream crops every image to data.image_size x data.image_size; give it (e.g. 224)")
    if resize is not None and resize < size:
        _fail("eval_resize", resize, f"at least data.image_size={size} (the centre crop is taken from it)")
    if d.crop_padding != 0:
        _fail("crop_padding", d.crop_padding, "0 with the stream, which crops on the host (random-resized crop, "
              "data.crop_scale / data.crop_ratio) instead of padding and cropping on the device")
    if len(d.mean) != STREAM_CHANNELS:
        _fail("mean", d.mean, f"{STREAM_CHANNELS} fixed per-channel values with the stream, which cannot measure its "
              "training split, e.g. ImageNet's (0.485, 0.456, 0.406) with std (0.229, 0.224, 0.225)")
    if d.kind == "arrayrecord" and check_files:
        data.arrayrecord_splits(d.location)
