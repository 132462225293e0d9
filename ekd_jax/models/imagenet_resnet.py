"""ImageNet ResNets of the zoo: torchvision's ResNet-18/34 (BasicBlock) and ResNet-50 (Bottleneck).

One parameterised :class:`ImageNetResNet` builds all three: stem conv7x7/2 (64) + BN + ReLU +
max-pool 3x3/2 (padding 1), four stages of residual blocks (widths 64/128/256/512, stride 1, 2, 2,
2 on each stage's first block), global average pool, Linear with bias. Every conv has
``bias=False`` and is followed by a BN; the shortcut is a 1x1 conv (stride s) + BN whenever the
stride or the width changes, the identity otherwise. Bottleneck puts the stride on its 3x3 conv
(torchvision's "ResNet v1.5"). Init as torchvision: convs kaiming_normal(fan_out, relu), BN 1/0, the
Linear PyTorch's default; no zero-init of the last BN of a block (torchvision's default too).

These are NOT the CIFAR zoo's ``resnet*``/``ResNet50`` (conv3x3 stem, no max-pool; resnet.py): the
registry names end in ``_imagenet``.

Parameter names follow torchvision's state-dict keys, so a torchvision checkpoint maps onto them
by rule: join the Flax module path with '.', then replace every '_' in a module name by '.'; the
leaf names map ``kernel`` -> ``weight`` (conv OIHW = Flax HWIO transposed (3, 2, 0, 1); fc (out, in)
= Flax (in, out) transposed), BN ``scale`` -> ``weight``, ``bias`` -> ``bias``, batch_stats ``mean``
-> ``running_mean``, ``var`` -> ``running_var`` (``num_batches_tracked`` has no counterpart):

  conv1, bn1                                  -> conv1.weight, bn1.{weight,bias,running_*}
  layer1_0/conv1, layer1_0/bn1 ... conv3, bn3 -> layer1.0.conv1.weight, layer1.0.bn1.* ...
  layer2_0/downsample_0, layer2_0/downsample_1 -> layer2.0.downsample.0.weight, .downsample.1.*
  fc                                          -> fc.weight, fc.bias

Features (``preact=False``), as mdistiller's ImageNet ResNet returns them (its ``feats`` plus the
pooled vector): ``[stem after ReLU (before the max-pool: 64 x H/2 x W/2), layer1..layer4 outputs
after their final ReLU, pooled]``. With ``preact=True`` (mdistiller's ``preact_feats``) the stem is
bn1's output before its ReLU and each stage map is its last block's residual sum before the ReLU,
as in the CIFAR ResNet. At 224x224: 64x112^2, then 64x56^2 / 128x28^2 / 256x14^2 / 512x7^2 for
BasicBlock nets (x4 channels for ResNet-50), pooled 512 (2048). Four stages, hence six entries.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax

from ekd_jax.models.common import BatchNorm, Dtype, TorchDense, conv, global_avg_pool, relu


def _downsample(x: jax.Array, features: int, stride: int, train: bool, dtype: Dtype | None) -> jax.Array:
    """torchvision's ``downsample``: identity, or 1x1 conv (stride) + BN when the shape changes.

    Must be called inside a block's compact ``__call__`` (registers ``downsample_0``/``_1`` there).
    """
    if stride == 1 and x.shape[-1] == features:
        return x
    x = conv(features, 1, stride, dtype=dtype, name="downsample_0")(x)
    return BatchNorm(dtype=dtype, name="downsample_1")(x, train)


class BasicBlock(nn.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN, + downsample(x), ReLU. Returns ``(output, pre-ReLU sum)``."""

    features: int
    stride: int = 1
    dtype: Dtype | None = None

    expansion = 1  # output width = features * expansion (class constant, not a field)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        y = conv(self.features, 3, self.stride, dtype=self.dtype, name="conv1")(x)
        y = relu(BatchNorm(dtype=self.dtype, name="bn1")(y, train))
        y = conv(self.features, 3, dtype=self.dtype, name="conv2")(y)
        y = BatchNorm(dtype=self.dtype, name="bn2")(y, train)
        pre = y + _downsample(x, self.features, self.stride, train, self.dtype)
        return relu(pre), pre


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(x4)-BN, + downsample(x), ReLU (v1.5).

    Returns ``(output, pre-ReLU sum)``.
    """

    features: int
    stride: int = 1
    dtype: Dtype | None = None

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        out_features = self.features * self.expansion
        y = conv(self.features, 1, dtype=self.dtype, name="conv1")(x)
        y = relu(BatchNorm(dtype=self.dtype, name="bn1")(y, train))
        y = conv(self.features, 3, self.stride, dtype=self.dtype, name="conv2")(y)
        y = relu(BatchNorm(dtype=self.dtype, name="bn2")(y, train))
        y = conv(out_features, 1, dtype=self.dtype, name="conv3")(y)
        y = BatchNorm(dtype=self.dtype, name="bn3")(y, train)
        pre = y + _downsample(x, out_features, self.stride, train, self.dtype)
        return relu(pre), pre


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ImageNetResNet(nn.Module):
    """torchvision ResNet; ``layers[i]`` blocks in stage i (torchvision's ``layers`` argument).

    ``widths[i]`` is stage i's block width before the block's expansion. The head is a global mean
    (torchvision's AdaptiveAvgPool2d(1)), so other input sizes than 224x224 work too.
    """

    num_classes: int
    layers: Sequence[int]
    block: str = "basic"
    widths: Sequence[int] = (64, 128, 256, 512)
    stem_width: int = 64
    dtype: Dtype | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, preact: bool = False
    ) -> tuple[jax.Array, list[jax.Array]]:
        block_cls = _BLOCKS[self.block]
        x = conv(self.stem_width, 7, 2, dtype=self.dtype, name="conv1")(x)
        pre = BatchNorm(dtype=self.dtype, name="bn1")(x, train)
        x = relu(pre)
        features = [pre if preact else x]
        # PyTorch's MaxPool2d pads with -inf, as nn.max_pool does.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for s, (width, depth) in enumerate(zip(self.widths, self.layers), start=1):
            for b in range(depth):
                stride = 2 if (s > 1 and b == 0) else 1
                x, pre = block_cls(width, stride, dtype=self.dtype, name=f"layer{s}_{b}")(x, train)
            features.append(pre if preact else x)
        x = global_avg_pool(x)
        features.append(x)
        logits = TorchDense(self.num_classes, dtype=self.dtype, name="fc")(x)
        return logits, features


def _resnet(layers: Sequence[int], block: str):
    return functools.partial(ImageNetResNet, layers=tuple(layers), block=block)


# torchvision.models.resnet18 / 34 / 50.
MODELS = {
    "resnet18_imagenet": _resnet((2, 2, 2, 2), "basic"),
    "resnet34_imagenet": _resnet((3, 4, 6, 3), "basic"),
    "resnet50_imagenet": _resnet((3, 4, 6, 3), "bottleneck"),
}
