"""The run spec: every option of a run, declared once, with its default and what it means.

A config file (``configs/*.py``) starts from :func:`ekd_jax.config.base_config`, which is built from
these declarations, and overrides what it needs; :func:`ekd_jax.spec.validate.validate` checks the
result once and returns a frozen, typed :class:`Spec`. Everything downstream (data, build, step,
train) takes the spec and trusts it: nothing below re-checks what the spec guarantees.

Names here are a public contract (configs, command-line overrides, stored runs use them). Where a
default is our reading of the paper rather than the paper's, docs/METHOD.md and
docs/method_as_implemented.md say so. This module imports nothing of the project: every other
module may depend on it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from typing import Any


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    model: str = "resnet32"
    checkpoint: str = ""  # workdir of a finished run whose teacher/ an offline method loads
    # Online methods (ekd, dml): the teacher first trains alone, from scratch, for head_start x
    # num_epochs epochs (rounded to whole epochs); then the student and guided modules start and
    # train their full num_epochs while the teacher goes on, on its own LR schedule over the longer
    # run. Ignored by methods without an online teacher. Default 0: teacher and student start
    # together, from scratch, as the paper states (METHOD.md); a head start departs from it.
    head_start: float = 0.0


@dataclasses.dataclass(frozen=True)
class StudentSpec:
    model: str = "resnet8"


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The ``data`` block: where the images come from and what each network sees of them."""

    source: str = "digits"  # digits | tfds:<name> | npz:<path> | arrayrecord:<pattern>
    image_size: int | None = None  # None = the source's native size
    samples_per_class: int = 0  # few-sample: n training images per class (0 = off)
    train_fraction: float = 1.0  # few-sample: this fraction of each class (1.0 = off)
    subset_seed: int = 0
    student_downsample: int = 1  # low resolution: the student sees images / this factor
    lowres_mode: str = "upsample"  # 'upsample' back to full size, or keep 'native' small size
    crop_padding: int = 4  # random crop with this zero padding (0 = no crop)
    flip: bool = True
    tfds_data_dir: str | None = None
    # Fixed per-channel normalisation statistics in [0, 1] units (e.g. ImageNet's); empty =
    # measured on the training split (in memory; the stream needs fixed ones).
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    # Datasets larger than memory (ekd_jax/data/stream.py): read tfds:<name> by index with grain
    # (arrayrecord:<pattern> sources always are); decode and random-resized crop on the host.
    streaming: bool = False
    crop_scale: tuple[float, float] = (0.08, 1.0)  # stream: random-resized crop's area fraction (min, max)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # stream: its aspect ratio (min, max)
    eval_resize: int | None = None  # stream: shorter side before the centre crop (None = image_size)
    workers: int = 0  # stream: grain worker processes (0 = in the training process)
    # The training split held on the device (replicated on each), batches gathered there from their indices:
    # no images cross from the host while training. For in-memory sources that fit on every device.
    on_device: bool = False

    @property
    def kind(self) -> str:
        """'digits', 'tfds', 'npz' or 'arrayrecord' (the spec has checked the form)."""
        return self.source.partition(":")[0]

    @property
    def location(self) -> str:
        """What follows ``<kind>:`` (a TFDS name, a path, a pattern); '' for digits."""
        return self.source.partition(":")[2].strip()

    @property
    def is_stream(self) -> bool:
        """Read by index, never loaded whole: arrayrecord sources, and tfds ones with ``streaming``."""
        return self.kind == "arrayrecord" or bool(self.streaming)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    # Reference recipe (RepDistiller): SGD momentum 0.9, wd 5e-4, lr 0.05, x0.1 at 62.5/75/87.5%.
    learning_rate: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    name: str = "multistep"  # multistep | cosine | constant
    milestones: tuple[float, ...] = (0.625, 0.75, 0.875)  # fractions of training
    decay_factor: float = 0.1
    warmup_epochs: float = 0.0


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Loss hyperparameters (hashable: closed over by the jitted step)."""

    label_smoothing: float = 0.0
    ce_weight: float = 1.0  # student CE weight (kd/fitnet/at/ekd)
    alpha: float = 1.0  # logit KL weight (kd, ekd)
    # tau 1 and gamma 1 (DML's two logit terms) and no mask: from the 900-step few-sample ablation
    # (docs/results.md section 3), where tau 4, gamma 0 and the teacher-correct mask lost to vanilla.
    tau: float = 1.0
    beta: float = 1.0  # guided-module term weight (ekd)
    stage_weights: tuple[float, ...] = ()  # per selected pair; empty = all 1
    # Defaults below are set from the recorded ablation (docs/results.md), not from the paper.
    feature_norm: bool = True  # L2-normalise each sample's map before the distance
    feature_reduction: str = "sum"  # 'mean' over elements or 'sum' per sample
    # What of the stage maps the guided term compares: "map" = the maps themselves (D above);
    # "relation" = each batch's row-normalised similarity matrix of the maps (similarity-preserving
    # KD: which samples the network finds alike), losses.relation_distance; feature_norm is applied first.
    feature_kind: str = "map"
    gamma: float = 1.0  # ekd co-evolution: teacher also learns KL(student -> teacher)
    coevolution: bool = False  # remove the stop-gradient on the teacher side of student terms
    # Fractions of the student's training: no transfer before ramp_start, weight 0 -> 1 over
    # ramp_length. 0/0 = full weight from the student's first step (the teacher and the student
    # start together by default; a teacher head start, teacher.head_start, is the departure).
    ramp_start: float = 0.0
    ramp_length: float = 0.0
    ramp_shape: str = "linear"  # 'linear' or 'sigmoid' (exp(-5 (1-t)^2))
    # The logit (KD) term's own schedule; negative = the ramp above (both terms on one schedule).
    # (A number, not None, so that --config.loss.kd_ramp_start=0 works on the command line.)
    kd_ramp_start: float = -1.0
    kd_ramp_length: float = -1.0
    # Per-sample transfer weight: "none" (1), "teacher_correct" (1 where the teacher's top-1 is right,
    # else 0) or "teacher_ahead" (max(0, p_T(y) - p_S(y)): how much more probability the teacher
    # puts on the true label than the student, so a teacher no better than the student transfers nothing).
    transfer_mask: str = "none"
    # How a masked term averages (losses.weighted_mean): "kept" = over the samples the mask keeps,
    # sum(w x) / max(sum(w), 1), so the mask picks which samples transfer and the term's weight does
    # not move with the teacher's batch accuracy; "batch" = over the whole batch (as before the switch).
    mask_mean: str = "kept"
    dml_weight: float = 1.0
    dml_tau: float = 1.0
    fitnet_weight: float = 100.0
    at_weight: float = 1000.0
    at_p: float = 2.0


@dataclasses.dataclass(frozen=True)
class GuidedSpec:
    # aux_head (intermediate predictions mimicked through auxiliary heads on both sides) rather than
    # adapter (stage maps mimicked): it cost less in the 900-step few-sample ablation, 3 seeds
    # (docs/results.md section 3: -1.02 vs -2.17 below DML; +1.15 +- 0.36 over adapter, paired);
    # at the converged 2,790-step budget it ends +0.47 +- 0.52 above DML (section 2).
    type: str = "aux_head"  # aux_head | adapter
    stages: tuple[int, ...] = ()  # stage-pair indices used by ekd / at; empty = all pairs
    # aux_head: whether the teacher-side heads' label CE also trains the teacher backbone (extra
    # supervision no baseline gets); False = the heads learn on stop-gradient teacher maps.
    aux_teacher_backbone_grad: bool = False
    hint_stage: int = 1  # fitnet: the stage pair of the hint (RepDistiller hint_layer=2 = stage 2)


@dataclasses.dataclass(frozen=True)
class Spec:
    """A whole run, validated (:func:`ekd_jax.spec.validate.validate`)."""

    seed: int = 0
    method: str = "ekd"  # vanilla | teacher | kd | fitnet | at | dml | ekd
    teacher: TeacherSpec = TeacherSpec()
    student: StudentSpec = StudentSpec()
    data: DataSpec = DataSpec()
    batch_size: int = 64
    eval_batch_size: int = 256
    num_epochs: int = 240
    optimizer: OptimizerSpec = OptimizerSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    loss: LossSpec = LossSpec()
    guided: GuidedSpec = GuidedSpec()
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (params and optimizer stay float32)
    eval_every_epochs: int = 1
    log_every_steps: int = 100
    checkpoint_keep: int = 2  # latest N kept, plus the best by student top-1
    async_checkpoint: bool = True
    # An epoch's checkpoint is saved when at least this many seconds have passed since the last one (or since
    # training started), and always after the last epoch; a signal always saves the step reached. 0 = after
    # every epoch. A save costs about 0.3 s of host CPU however small the state: with epochs of a second or
    # less, saving each of them slowed training by half (docs/performance.md).
    checkpoint_every_s: float = 30.0
    # Training steps per call of the compiled program (a loop over K batches on the device), so that the host
    # dispatches once per K steps. Results do not depend on it (bitwise); chunks stay inside epochs, and the
    # run stops for a signal at a chunk boundary. docs/performance.md has the measurements behind the default.
    steps_per_call: int = 16

    def network(self, which: str) -> TeacherSpec | StudentSpec:
        """``teacher`` or ``student``."""
        return {"teacher": self.teacher, "student": self.student}[which]

    def to_json(self) -> dict:
        """The spec as the JSON object a run stores (summary.json, checkpoints): every option."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


# Options that change how fast a run goes, never its results: a stored run resumes under other values.
SPEED_ONLY: frozenset[tuple[str, ...]] = frozenset({("steps_per_call",), ("data", "on_device"), ("checkpoint_every_s",)})

# Switches whose default has changed since they were added: the value that reproduces what the
# project did before the switch existed (a stored config without the key ran with this value).
BEHAVIOUR_BEFORE_SWITCH: dict[tuple[str, ...], Any] = {
    ("teacher", "head_start"): 0.0,
    ("loss", "mask_mean"): "batch",
    ("guided", "aux_teacher_backbone_grad"): True,
}


@functools.cache
def field_types(cls) -> dict[str, Any]:
    """A spec dataclass's fields -> their declared types (a spec dataclass for a nested block)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def optional_type(hint) -> type | None:
    """``int`` for ``int | None`` (an option whose default None means "not set"), else None."""
    if isinstance(hint, types.UnionType) and type(None) in hint.__args__:
        (inner,) = [a for a in hint.__args__ if a is not type(None)]
        return inner
    return None
