"""Training methods as loss recipes over one joint state (METHOD.md, "Baselines").

A method says which networks run, which parameter groups learn, and which loss terms make the
single scalar loss. Every term is named ``'<who>/<what>'`` where ``who`` is the network the term
is meant to train ('teacher' or 'student'); stop-gradients keep student terms from reaching the
teacher unless co-evolution is switched on (tests check both).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Callable

import flax
import jax
import jax.numpy as jnp

from ekd_jax import losses
from ekd_jax.guided import resize_to
from ekd_jax.spec import LossSpec

sg = jax.lax.stop_gradient


def transfer_weight(cfg: LossSpec, progress: jax.Array, term: str = "features") -> jax.Array:
    """Weight in [0, 1] of a transfer term ('features' or 'kd') at training progress in [0, 1]."""
    start, length = cfg.ramp_start, cfg.ramp_length
    if term == "kd":
        start = start if cfg.kd_ramp_start < 0 else cfg.kd_ramp_start
        length = length if cfg.kd_ramp_length < 0 else cfg.kd_ramp_length
    if length <= 0:
        return (progress >= start).astype(jnp.float32)
    t = jnp.clip((progress - start) / length, 0.0, 1.0)
    if cfg.ramp_shape == "sigmoid":
        return jnp.where(t >= 1.0, 1.0, jnp.exp(-5.0 * jnp.square(1.0 - t)) * (t > 0))
    return t


@flax.struct.dataclass
class Outputs:
    """What the forward pass produced; fields are None for networks the method does not run."""

    labels: jax.Array
    teacher_logits: jax.Array | None = None
    teacher_stages: tuple | None = None  # paired teacher stage maps (selected pairs)
    student_logits: jax.Array | None = None
    student_stages: tuple | None = None  # paired student stage maps
    guide: dict | None = None  # GuidedModules output


LossFn = Callable[[Outputs, LossSpec, jax.Array], dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    runs_teacher: bool
    teacher_trainable: bool
    runs_student: bool
    needs_teacher_checkpoint: bool
    guide: str | None  # None, 'config' (guided.type), or 'adapter_hint' (one adapter, fitnet)
    loss: LossFn
    description: str

    @property
    def online_teacher(self) -> bool:
        """The teacher learns next to the student (dml, ekd): what a teacher head start applies to."""
        return self.teacher_trainable and self.runs_student


def _mask(cfg: LossSpec, o: Outputs):
    """Per-sample transfer weights (N,) or None; never differentiated (a weight, not a target)."""
    if cfg.transfer_mask == "none":
        return None
    if cfg.transfer_mask == "teacher_ahead":
        def p_true(logits):  # probability on the true label
            p = jax.nn.softmax(sg(logits).astype(jnp.float32))
            return jnp.take_along_axis(p, o.labels[:, None], -1)[:, 0]

        return jnp.maximum(p_true(o.teacher_logits) - p_true(o.student_logits), 0.0)
    return (jnp.argmax(sg(o.teacher_logits), -1) == o.labels).astype(jnp.float32)


def _stage_weights(cfg: LossSpec, n: int) -> tuple[float, ...]:
    return cfg.stage_weights if cfg.stage_weights else (1.0,) * n


def _vanilla(o, cfg, progress):
    return {"student/ce": losses.cross_entropy(o.student_logits, o.labels, cfg.label_smoothing)}


def _teacher(o, cfg, progress):
    return {"teacher/ce": losses.cross_entropy(o.teacher_logits, o.labels, cfg.label_smoothing)}


def _kd(o, cfg, progress):
    return {
        "student/ce": cfg.ce_weight * losses.cross_entropy(o.student_logits, o.labels, cfg.label_smoothing),
        "student/kd": cfg.alpha * losses.kl_divergence(o.student_logits, sg(o.teacher_logits), cfg.tau),
    }


def _fitnet(o, cfg, progress):
    (hint,) = o.guide["student"]
    (target,) = o.teacher_stages
    return {
        "student/ce": cfg.ce_weight * losses.cross_entropy(o.student_logits, o.labels, cfg.label_smoothing),
        "student/hint": cfg.fitnet_weight * losses.feature_distance(hint, sg(target)),
    }


def _at(o, cfg, progress):
    at = 0.0
    for fs, ft in zip(o.student_stages, o.teacher_stages):
        # Attention maps need equal spatial sizes: bring the larger map down to the smaller one
        # (per dimension: min of the tuples would compare them lexicographically).
        hw = (min(fs.shape[1], ft.shape[1]), min(fs.shape[2], ft.shape[2]))
        at = at + losses.attention_transfer(resize_to(fs, hw), sg(resize_to(ft, hw)), cfg.at_p)
    return {
        "student/ce": cfg.ce_weight * losses.cross_entropy(o.student_logits, o.labels, cfg.label_smoothing),
        "student/at": cfg.at_weight * at,
    }


def _dml(o, cfg, progress):
    ls = cfg.label_smoothing
    return {
        "teacher/ce": losses.cross_entropy(o.teacher_logits, o.labels, ls),
        "teacher/dml": cfg.dml_weight * losses.kl_divergence(o.teacher_logits, sg(o.student_logits), cfg.dml_tau),
        "student/ce": losses.cross_entropy(o.student_logits, o.labels, ls),
        "student/dml": cfg.dml_weight * losses.kl_divergence(o.student_logits, sg(o.teacher_logits), cfg.dml_tau),
    }


def _ekd(o, cfg, progress):
    ls = cfg.label_smoothing
    # Student terms see the teacher through a stop-gradient unless co-evolution is on.
    tgt = (lambda x: x) if cfg.coevolution else sg
    w = transfer_weight(cfg, progress)
    mask = _mask(cfg, o)
    terms = {
        "teacher/ce": losses.cross_entropy(o.teacher_logits, o.labels, ls),
        "student/ce": cfg.ce_weight * losses.cross_entropy(o.student_logits, o.labels, ls),
    }
    if cfg.gamma:
        terms["teacher/coevo_kl"] = cfg.gamma * losses.kl_divergence(
            o.teacher_logits, sg(o.student_logits), cfg.tau
        )
    if cfg.alpha:
        terms["student/kd"] = cfg.alpha * transfer_weight(cfg, progress, "kd") * losses.kl_divergence(
            o.student_logits, tgt(o.teacher_logits), cfg.tau, mask, cfg.mask_mean
        )
    if cfg.beta and o.guide is not None:
        weights = _stage_weights(cfg, len(o.guide["student"]))
        if o.guide["teacher"]:  # aux_head: teacher heads learn from labels, student heads mimic them
            terms["teacher/aux_ce"] = sum(losses.cross_entropy(h, o.labels, ls) for h in o.guide["teacher"])
            dist = sum(
                wk * losses.kl_divergence(hs, tgt(ht), cfg.tau, mask, cfg.mask_mean)
                for wk, hs, ht in zip(weights, o.guide["student"], o.guide["teacher"])
            )
        else:
            def distance(g, ft):
                if cfg.feature_kind == "relation":
                    if cfg.feature_norm:
                        g, ft = losses.l2_normalize_per_sample(g), losses.l2_normalize_per_sample(ft)
                    return losses.relation_distance(g, ft, cfg.feature_reduction, mask, cfg.mask_mean)
                return losses.feature_distance(g, ft, cfg.feature_norm, cfg.feature_reduction, mask, cfg.mask_mean)

            dist = sum(wk * distance(g, tgt(ft)) for wk, g, ft in zip(weights, o.guide["student"], o.teacher_stages))
        terms["student/guided"] = cfg.beta * w * dist
    return terms


def _method(name, loss, description, *, teacher=False, teacher_learns=False, student=True, frozen_teacher=False,
            guide=None) -> Method:
    return Method(name=name, runs_teacher=teacher, teacher_trainable=teacher_learns, runs_student=student,
                  needs_teacher_checkpoint=frozen_teacher, guide=guide, loss=loss, description=description)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        _method("vanilla", _vanilla, "student alone, CE"),
        _method("teacher", _teacher, "teacher alone, CE", teacher=True, teacher_learns=True, student=False),
        _method("kd", _kd, "Hinton KD from a frozen teacher checkpoint", teacher=True, frozen_teacher=True),
        _method("fitnet", _fitnet, "FitNet hint on one stage, frozen teacher", teacher=True, frozen_teacher=True,
                guide="adapter_hint"),
        _method("at", _at, "attention transfer on all stage pairs, frozen teacher", teacher=True, frozen_teacher=True),
        _method("dml", _dml, "deep mutual learning, both online", teacher=True, teacher_learns=True),
        _method("ekd", _ekd, "evolutionary KD: online teacher + guided modules", teacher=True, teacher_learns=True,
                guide="config"),
    ]
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown method {name!r}.{hint} Available methods: {', '.join(METHODS)}")
    return METHODS[name]


def total_loss(terms: dict[str, jax.Array]) -> jax.Array:
    return sum(terms.values())
