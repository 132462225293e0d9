"""Guided modules between corresponding teacher and student stages (METHOD.md).

Stages are the reference feature list without the stem output and the pooled vector
(``features[1:-1]``): 3 for CIFAR ResNet/WRN/ShuffleNet, 4 for VGG, MobileNetV2 and ResNet50.

Pairing when the stage counts differ (K_s student stages, K_t teacher stages): K = min(K_s, K_t)
pairs, spread evenly by relative depth and always ending at both networks' last stage —
pair i links student stage round((i+1) K_s / K) - 1 with teacher stage round((i+1) K_t / K) - 1.
Equal counts pair stage k with stage k.

Two kinds of guided module, both trained and dropped at deployment:
- ``adapter`` (default): on the student side, resize the student map to the teacher's spatial size
  when they differ, then 3x3 conv -> BatchNorm -> ReLU -> 1x1 conv to the teacher's channel count;
  the student then mimics the teacher map through a feature distance.
- ``aux_head``: on both sides, 3x3 conv -> BatchNorm -> ReLU -> global pool -> linear classifier; the
  teacher-side heads learn from labels, the student-side heads mimic them through a temperature KL.
  By default the teacher-side heads see stop-gradient teacher maps, so their label loss trains
  the heads only, not the teacher backbone (``teacher_backbone_grad`` switches that on).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ekd_jax.models.common import BatchNorm, TorchDense, conv, global_avg_pool

GUIDE_KINDS = ("adapter", "aux_head")


def pair_stages(num_student: int, num_teacher: int) -> list[tuple[int, int]]:
    """(student_stage, teacher_stage) index pairs; see the module docstring."""
    if num_student < 1 or num_teacher < 1:
        raise ValueError(f"both networks need at least one stage, got {num_student} and {num_teacher}")
    k = min(num_student, num_teacher)
    return [
        (round((i + 1) * num_student / k) - 1, round((i + 1) * num_teacher / k) - 1) for i in range(k)
    ]


def select_pairs(
    num_student: int, num_teacher: int, stages: Sequence[int] | None
) -> list[tuple[int, int]]:
    """The pairs used, chosen by pair index (``None`` or empty = all pairs; the spec has checked the indices)."""
    pairs = pair_stages(num_student, num_teacher)
    return [pairs[s] for s in stages] if stages else pairs


def resize_to(f: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """Bilinear resize of an NHWC map to ``hw`` (antialiased when shrinking); identity if equal."""
    if f.shape[1:3] == tuple(hw):
        return f
    return jax.image.resize(f, (f.shape[0], hw[0], hw[1], f.shape[3]), "linear", antialias=True)


class Adapter(nn.Module):
    """Student-side guided module: student stage map -> teacher stage shape (H, W, C)."""

    out_shape: tuple[int, int, int]
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, f: jax.Array, train: bool) -> jax.Array:
        h, w, c = self.out_shape
        f = resize_to(f, (h, w))
        f = conv(c, 3, dtype=self.dtype, name="conv3x3")(f)
        f = nn.relu(BatchNorm(dtype=self.dtype, name="bn")(f, train))
        return conv(c, 1, dtype=self.dtype, name="conv1x1")(f)


class AuxHead(nn.Module):
    """Auxiliary classifier on an intermediate stage map."""

    num_classes: int
    channels: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, f: jax.Array, train: bool) -> jax.Array:
        f = conv(self.channels, 3, dtype=self.dtype, name="conv3x3")(f)
        f = nn.relu(BatchNorm(dtype=self.dtype, name="bn")(f, train))
        return TorchDense(self.num_classes, dtype=self.dtype, name="fc")(global_avg_pool(f))


class GuidedModules(nn.Module):
    """All guided modules of one teacher/student pair, one per selected stage pair.

    ``__call__(student_maps, teacher_maps, train)`` takes the paired maps (already selected, in
    pair order) and returns ``{'student': [...], 'teacher': [...]}``: adapter outputs (teacher side
    empty) or auxiliary logits of both sides.
    """

    kind: str
    teacher_shapes: tuple[tuple[int, int, int], ...]
    num_classes: int = 0
    dtype: jnp.dtype | None = None
    # aux_head: let the teacher-side heads' gradient reach the teacher's stage maps (and so its
    # backbone). Off: the heads learn on stop-gradient maps, the backbone only from its own loss.
    teacher_backbone_grad: bool = False

    @nn.compact
    def __call__(self, student_maps, teacher_maps, train: bool):
        if self.kind not in GUIDE_KINDS:
            raise ValueError(f"unknown guided module kind {self.kind!r}; use one of {GUIDE_KINDS}")
        out = {"student": [], "teacher": []}
        for k, (fs, ft, shape) in enumerate(zip(student_maps, teacher_maps, self.teacher_shapes)):
            if self.kind == "adapter":
                out["student"].append(Adapter(shape, self.dtype, name=f"adapter{k}")(fs, train))
            else:
                ch = shape[-1]
                ft = ft if self.teacher_backbone_grad else jax.lax.stop_gradient(ft)
                out["student"].append(AuxHead(self.num_classes, ch, self.dtype, name=f"student_head{k}")(fs, train))
                out["teacher"].append(AuxHead(self.num_classes, ch, self.dtype, name=f"teacher_head{k}")(ft, train))
        return out
