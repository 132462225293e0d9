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

sg = jax.lax.stop_gradient


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss hyperparameters (hashable: closed over by the jitted step). See configs/default.py."""

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
    # ramp_length. 0/0 = full weight from the student's first step: the default teacher head start
    # (config teacher.head_start) is what puts the teacher ahead before the student imitates it.
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


def transfer_weight(cfg: LossConfig, progress: jax.Array, term: str = "features") -> jax.Array:
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


LossFn = Callable[[Outputs, LossConfig, jax.Array], dict[str, jax.Array]]


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


def _mask(cfg: LossConfig, o: Outputs):
    """Per-sample transfer weights (N,) or None; never differentiated (a weight, not a target)."""
    if cfg.transfer_mask == "none":
        return None
    if cfg.transfer_mask == "teacher_ahead":
        def p_true(logits):  # probability on the true label
            p = jax.nn.softmax(sg(logits).astype(jnp.float32))
            return jnp.take_along_axis(p, o.labels[:, None], -1)[:, 0]

        return jnp.maximum(p_true(o.teacher_logits) - p_true(o.student_logits), 0.0)
    return (jnp.argmax(sg(o.teacher_logits), -1) == o.labels).astype(jnp.float32)


def _stage_weights(cfg: LossConfig, n: int) -> tuple[float, ...]:
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


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("vanilla", False, False, True, False, None, _vanilla, "student alone, CE"),
        Method("teacher", True, True, False, False, None, _teacher, "teacher alone, CE"),
        Method("kd", True, False, True, True, None, _kd, "Hinton KD from a frozen teacher checkpoint"),
        Method("fitnet", True, False, True, True, "adapter_hint", _fitnet, "FitNet hint on one stage, frozen teacher"),
        Method("at", True, False, True, True, None, _at, "attention transfer on all stage pairs, frozen teacher"),
        Method("dml", True, True, True, False, None, _dml, "deep mutual learning, both online"),
        Method("ekd", True, True, True, False, "config", _ekd, "evolutionary KD: online teacher + guided modules"),
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
