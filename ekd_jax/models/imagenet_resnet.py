"""ImageNet ResNets of the zoo: torchvision's ResNet-18/34 (BasicBlock) and ResNet-50 (Bottleneck).

One parameterised :class:`ImageNetResNet` builds all three: stem conv7x7/2 (64) + BN + ReLU +
max-pool 3x3/2 (padding 1), four stages of residual blocks (widths 64/128/256/512, stride 1, 2, 2,
2 on each stage's first block), global average pool, Linear with bias. Every conv has
``bias=False`` and is followed by a BN; the shortcut is a 1x1 conv (stride s) + BN whenever the
stride or the width changes, the identity otherwise. Bottleneck puts the stride on its 3x3 conv
(torchvision's "ResNet v1.5"). Init as torchvision: convs kaiming_normal(fan_out, relu), BN 1/0, the
Linear PyTorch's default; no zero-init of the last BN of a block (torchvision's default too).

These are NOT the CIFAR zoo's ``resnet*``/``ResNet50`` (conv3x3 stem, no max-pool; resnet.py): the
registry names end in ``_imagenet``. They share its residual blocks and stages (resnet.py's
:func:`~ekd_jax.models.resnet.residual_stages`), under torchvision's names.

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

from ekd_jax.models.common import BatchNorm, Dtype, conv, pool_and_classify, relu
from ekd_jax.models.resnet import residual_stages


# torchvision's ``downsample`` = Sequential(conv1x1, BN): the names of a block's shortcut projection.
DOWNSAMPLE = ("downsample_0", "downsample_1")


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
        x = conv(self.stem_width, 7, 2, dtype=self.dtype, name="conv1")(x)
        pre = BatchNorm(dtype=self.dtype, name="bn1")(x, train)
        x = relu(pre)
        stem = pre if preact else x
        # PyTorch's MaxPool2d pads with -inf, as nn.max_pool does.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        x, stages = residual_stages(
            x, self.block, self.widths, self.layers, name="layer{s}_{b}", shortcut_names=DOWNSAMPLE,
            train=train, preact=preact, dtype=self.dtype,
        )
        logits, pooled = pool_and_classify(x, self.num_classes, dtype=self.dtype, name="fc")
        return logits, [stem, *stages, pooled]


def _resnet(layers: Sequence[int], block: str):
    return functools.partial(ImageNetResNet, layers=tuple(layers), block=block)


# torchvision.models.resnet18 / 34 / 50.
MODELS = {
    "resnet18_imagenet": _resnet((2, 2, 2, 2), "basic"),
    "resnet34_imagenet": _resnet((3, 4, 6, 3), "basic"),
    "resnet50_imagenet": _resnet((3, 4, 6, 3), "bottleneck"),
}
