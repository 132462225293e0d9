"""VGG-BN for CIFAR (RepDistiller's vgg8/11/13/16/19 ``*_bn``): five conv blocks, no FC layers.

One parameterised module built from the reference configuration lists S/A/B/D/E. Each conv is
conv3x3 (with bias) -> BN -> ReLU, except that each block's final ReLU is left out: the block
output is captured pre-ReLU (the ``preact`` feature) and ReLU is applied afterwards.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax

from ekd_jax.models.common import BatchNorm, Dtype, conv, linear_normal_001, pool_and_classify

# Channel widths of the convs in each of the five blocks.
CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "S": ((64,), (128,), (256,), (512,), (512,)),
    "A": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "B": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "D": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "E": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


class VGGBlock(nn.Module):
    """conv3x3(bias)-BN-ReLU repeated per width; returns the last BN output before its ReLU."""

    widths: Sequence[int]
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for i, width in enumerate(self.widths):
            if i > 0:
                x = nn.relu(x)
            x = conv(width, 3, use_bias=True, dtype=self.dtype, name=f"conv{i}")(x)
            x = BatchNorm(dtype=self.dtype, name=f"bn{i}")(x, train)
        return x


class VGG(nn.Module):
    """RepDistiller VGG-BN; features: 5 block outputs (post-ReLU; pre-ReLU with preact), pooled."""

    config: Sequence[Sequence[int]]
    num_classes: int = 100
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, preact: bool = False):
        # The reference skips the pool after block 3 unless the input is 64x64, so on CIFAR
        # blocks 3 and 4 both run at 4x4.
        pool_before_last = x.shape[1] == 64
        features = []
        for i, widths in enumerate(self.config):
            if i in (1, 2, 3) or (i == 4 and pool_before_last):
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            pre = VGGBlock(tuple(widths), dtype=self.dtype, name=f"block{i}")(x, train)
            x = nn.relu(pre)
            # The reference's first feature is always taken after the ReLU, even with preact.
            features.append(pre if preact and i > 0 else x)
        logits, pooled = pool_and_classify(
            x, self.num_classes, kernel_init=linear_normal_001, bias_init=nn.initializers.zeros,
            dtype=self.dtype, name="classifier",
        )
        return logits, [*features, pooled]


MODELS = {
    name: functools.partial(VGG, config=CONFIGS[cfg])
    for name, cfg in (("vgg8", "S"), ("vgg11", "A"), ("vgg13", "B"), ("vgg16", "D"), ("vgg19", "E"))
}
