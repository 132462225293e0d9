"""ShuffleNet V1 (groups 3) and V2 (net size 1) for CIFAR, as RepDistiller's ShuffleV1/ShuffleV2.

Two distinct architectures sharing the CIFAR stem (1x1 conv 3->24 + BN + ReLU at stride 1, no
max-pool) and the channel shuffle. All convs are bias-free; all layers keep PyTorch's default
init, because the reference does not re-initialise these nets. Features: stem output, the three
stage outputs (``preact=True``: the last block's output before its final ReLU), pooled vector.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ekd_jax.models.common import BatchNorm, Dtype, conv, pool_and_classify, torch_default_kernel

STEM_WIDTH = 24

# PyTorch-default conv init (no bias anywhere in these nets).
_conv = functools.partial(conv, kernel_init=torch_default_kernel)


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
    """NHWC channel shuffle equal to PyTorch's view(N, g, C/g, H, W).permute(0, 2, 1, 3, 4)."""
    n, h, w, c = x.shape
    return x.reshape(n, h, w, groups, c // groups).swapaxes(3, 4).reshape(n, h, w, c)


def _stem(x: jax.Array, train: bool, dtype: Dtype | None) -> jax.Array:
    """Shared CIFAR stem; call inside a compact method so the layers get the parent's scope."""
    x = _conv(STEM_WIDTH, 1, dtype=dtype, name="stem_conv")(x)
    return nn.relu(BatchNorm(dtype=dtype, name="stem_bn")(x, train))


# --------------------------------------------------------------------------------------------
# ShuffleNet V1


class ShuffleV1Unit(nn.Module):
    """Group 1x1 -> shuffle -> depthwise 3x3 -> group 1x1, plus identity or avg-pool shortcut.

    ``branch_channels`` is the branch output width; with stride 2 the avg-pooled input is
    concatenated after it, so the unit outputs ``branch_channels + in_channels``.
    Returns (output, pre-ReLU output).
    """

    branch_channels: int
    stride: int
    groups: int
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        mid = self.branch_channels // 4
        # The reference keys on in_planes == 24: the first 1x1 on the narrow stem output is dense.
        first_groups = 1 if x.shape[-1] == STEM_WIDTH else self.groups
        y = _conv(mid, 1, groups=first_groups, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(y, train))
        y = channel_shuffle(y, first_groups)
        y = _conv(mid, 3, self.stride, groups=mid, dtype=self.dtype, name="conv2")(y)
        y = nn.relu(BatchNorm(dtype=self.dtype, name="bn2")(y, train))
        y = _conv(self.branch_channels, 1, groups=self.groups, dtype=self.dtype, name="conv3")(y)
        y = BatchNorm(dtype=self.dtype, name="bn3")(y, train)
        if self.stride == 2:
            # PyTorch AvgPool2d(3, 2, 1) counts the zero padding (always divides by 9).
            shortcut = nn.avg_pool(
                x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), count_include_pad=True
            )
            pre = jnp.concatenate([y, shortcut.astype(y.dtype)], axis=-1)
        else:
            pre = y + x
        return nn.relu(pre), pre


class ShuffleNetV1(nn.Module):
    """RepDistiller ShuffleNet (V1); each stage starts with a stride-2 concat unit."""

    stage_widths: Sequence[int] = (240, 480, 960)
    stage_blocks: Sequence[int] = (4, 8, 4)
    groups: int = 3
    num_classes: int = 100
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, preact: bool = False):
        x = _stem(x, train, self.dtype)
        features = [x]
        for s, (width, blocks) in enumerate(zip(self.stage_widths, self.stage_blocks)):
            for b in range(blocks):
                # The first unit concatenates its pooled input, so its branch makes the rest.
                branch = width - x.shape[-1] if b == 0 else width
                x, pre = ShuffleV1Unit(
                    branch, 2 if b == 0 else 1, self.groups, dtype=self.dtype,
                    name=f"stage{s}_block{b}",
                )(x, train)
            features.append(pre if preact else x)
        logits, pooled = pool_and_classify(x, self.num_classes, dtype=self.dtype, name="classifier")
        return logits, [*features, pooled]


# --------------------------------------------------------------------------------------------
# ShuffleNet V2


class ShuffleV2Unit(nn.Module):
    """Channel split; the second half goes 1x1 -> depthwise 3x3 -> 1x1, concat, shuffle(2).

    Returns (output, pre-activation); the pre-activation is the concat before the last ReLU and
    before the shuffle, as in the reference.
    """

    split_ratio: float = 0.5
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        c = int(x.shape[-1] * self.split_ratio)
        keep, y = x[..., :c], x[..., c:]
        y = _conv(c, 1, dtype=self.dtype, name="conv1")(y)
        y = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(y, train))
        y = _conv(c, 3, groups=c, dtype=self.dtype, name="conv2")(y)
        y = BatchNorm(dtype=self.dtype, name="bn2")(y, train)
        y = _conv(c, 1, dtype=self.dtype, name="conv3")(y)
        y = BatchNorm(dtype=self.dtype, name="bn3")(y, train)
        keep = keep.astype(y.dtype)
        pre = jnp.concatenate([keep, y], axis=-1)
        out = channel_shuffle(jnp.concatenate([keep, nn.relu(y)], axis=-1), 2)
        return out, pre


class ShuffleV2DownUnit(nn.Module):
    """Stride-2 unit: both branches see the whole input, each gives half the output channels."""

    out_channels: int
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        in_channels = x.shape[-1]
        mid = self.out_channels // 2
        # Left: depthwise 3x3 stride 2 -> BN -> 1x1 -> BN -> ReLU.
        left = _conv(in_channels, 3, 2, groups=in_channels, dtype=self.dtype, name="conv1")(x)
        left = BatchNorm(dtype=self.dtype, name="bn1")(left, train)
        left = _conv(mid, 1, dtype=self.dtype, name="conv2")(left)
        left = nn.relu(BatchNorm(dtype=self.dtype, name="bn2")(left, train))
        # Right: 1x1 -> BN -> ReLU -> depthwise 3x3 stride 2 -> BN -> 1x1 -> BN -> ReLU.
        right = _conv(mid, 1, dtype=self.dtype, name="conv3")(x)
        right = nn.relu(BatchNorm(dtype=self.dtype, name="bn3")(right, train))
        right = _conv(mid, 3, 2, groups=mid, dtype=self.dtype, name="conv4")(right)
        right = BatchNorm(dtype=self.dtype, name="bn4")(right, train)
        right = _conv(mid, 1, dtype=self.dtype, name="conv5")(right)
        right = nn.relu(BatchNorm(dtype=self.dtype, name="bn5")(right, train))
        return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleNetV2(nn.Module):
    """RepDistiller ShuffleNetV2; each stage is a down unit plus split units, then 1x1 conv head."""

    stage_widths: Sequence[int] = (116, 232, 464)
    stage_blocks: Sequence[int] = (3, 7, 3)
    head_width: int = 1024
    num_classes: int = 100
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, preact: bool = False):
        x = _stem(x, train, self.dtype)
        features = [x]
        for s, (width, blocks) in enumerate(zip(self.stage_widths, self.stage_blocks)):
            x = ShuffleV2DownUnit(width, dtype=self.dtype, name=f"stage{s}_down")(x, train)
            for b in range(blocks):
                x, pre = ShuffleV2Unit(dtype=self.dtype, name=f"stage{s}_block{b}")(x, train)
            features.append(pre if preact else x)
        x = _conv(self.head_width, 1, dtype=self.dtype, name="head_conv")(x)
        x = nn.relu(BatchNorm(dtype=self.dtype, name="head_bn")(x, train))
        logits, pooled = pool_and_classify(x, self.num_classes, dtype=self.dtype, name="classifier")
        return logits, [*features, pooled]


MODELS = {"ShuffleV1": ShuffleNetV1, "ShuffleV2": ShuffleNetV2}
