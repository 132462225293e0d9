"""MobileNetV2 for CIFAR as RepDistiller's ``mobile_half`` (expansion 6, width 0.5).

Differs from torchvision's MobileNetV2: the stem is a stride-2 conv3x3 (16x16 maps on CIFAR),
blocks with expansion 1 still have the 1x1 expansion conv, and the last 1x1 conv keeps 1280
channels for width <= 1. ``preact`` is accepted for the common contract and ignored, as in the
reference.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from ekd_jax.models.common import BatchNorm, Dtype, conv, linear_normal_001, pool_and_classify

# Inverted-residual stages (t = expansion, None -> the model's expansion; c = width before
# scaling; n = blocks; s = stride of the first block). The first stage always uses t = 1.
STAGES: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)
# The reference's is_feat captures the outputs of these stages (after the stem): at 32x32 input
# 12x16^2, 16x8^2, 48x4^2 and 160x2^2 for width 0.5.
FEATURE_STAGES = (1, 2, 4, 6)


class InvertedResidual(nn.Module):
    """1x1 expand -> BN -> ReLU -> depthwise 3x3 -> BN -> ReLU -> 1x1 project -> BN (+ identity)."""

    out_channels: int
    stride: int
    expansion: int
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        in_channels = x.shape[-1]
        hidden = in_channels * self.expansion
        y = conv(hidden, 1, dtype=self.dtype, name="expand_conv")(x)
        y = nn.relu(BatchNorm(dtype=self.dtype, name="expand_bn")(y, train))
        y = conv(hidden, 3, self.stride, groups=hidden, dtype=self.dtype, name="depthwise_conv")(y)
        y = nn.relu(BatchNorm(dtype=self.dtype, name="depthwise_bn")(y, train))
        y = conv(self.out_channels, 1, dtype=self.dtype, name="project_conv")(y)
        y = BatchNorm(dtype=self.dtype, name="project_bn")(y, train)
        if self.stride == 1 and in_channels == self.out_channels:
            y = x + y
        return y


class MobileNetV2(nn.Module):
    """RepDistiller MobileNetV2; features: stem, stages 1/2/4/6 outputs, pooled 1280-d vector."""

    num_classes: int = 100
    expansion: int = 6
    width_mult: float = 0.5
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, preact: bool = False):
        del preact  # The reference returns the same features either way.
        x = conv(int(32 * self.width_mult), 3, 2, dtype=self.dtype, name="stem_conv")(x)
        x = nn.relu(BatchNorm(dtype=self.dtype, name="stem_bn")(x, train))
        features = [x]
        for s, (t, c, n, stride) in enumerate(STAGES):
            for b in range(n):
                x = InvertedResidual(
                    int(c * self.width_mult),
                    stride if b == 0 else 1,
                    self.expansion if t is None else t,
                    dtype=self.dtype,
                    name=f"stage{s}_block{b}",
                )(x, train)
            if s in FEATURE_STAGES:
                features.append(x)
        last_channels = int(1280 * self.width_mult) if self.width_mult > 1.0 else 1280
        x = conv(last_channels, 1, dtype=self.dtype, name="head_conv")(x)
        x = nn.relu(BatchNorm(dtype=self.dtype, name="head_bn")(x, train))
        # The reference's AvgPool2d(2, ceil_mode) is global on CIFAR's 2x2 maps; a global mean also
        # serves other input sizes.
        logits, pooled = pool_and_classify(
            x, self.num_classes, kernel_init=linear_normal_001, bias_init=nn.initializers.zeros,
            dtype=self.dtype, name="classifier",
        )
        return logits, [*features, pooled]


MODELS = {"MobileNetV2": MobileNetV2}
