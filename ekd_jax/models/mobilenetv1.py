"""MobileNetV1 for ImageNet as mdistiller uses it (mdistiller/models/imagenet/mobilenetv1.py).

The network: ``conv_bn`` stem (conv3x3/2 3 -> 32, BN, ReLU), 13 depthwise-separable blocks
``conv_dw`` (depthwise conv3x3/s + BN + ReLU, pointwise conv1x1 + BN + ReLU; all convs without
bias) up to 1024 channels, the reference's AvgPool2d(7) (global at 224x224; a global mean here, so
other input sizes work too), Linear 1024 -> classes with bias. Width multiplier 1, no dropout. No
custom init in the reference: convs and the Linear keep PyTorch's defaults (kaiming_uniform a=sqrt5),
BN 1/0. ``STAGES`` is the channel/stride table, grouped by the feature stage each block ends.

Features (``preact=False``): ``[stem after ReLU (32 x H/2 x W/2), mdistiller's feats (the outputs
of blocks 3, 5, 11 and 13; C x H x W 128 x H/4 x W/4, 256 x H/8 x W/8, 512 x H/16 x W/16, 1024 x
H/32 x W/32: 56^2, 28^2, 14^2, 7^2 at 224x224), pooled 1024-d vector]``.
mdistiller returns no stem map; the zoo contract has one, the stem's output (STAGE_SLICE drops it).
With ``preact=True`` the four stage maps are mdistiller's ``preact_feats`` (the last pointwise BN
of each stage, before its ReLU) and the stem is its BN output before the ReLU, as in the ImageNet
ResNets. Four stages, hence six entries.

Parameter names follow mdistiller's state-dict keys (``model`` is its nn.Sequential, ``model.k.i``
the i-th layer of its k-th entry): join the Flax module path with '.' and replace every '_' in a
module name by '.'; leaves map ``kernel`` -> ``weight`` (conv OIHW = Flax HWIO transposed (3, 2, 0,
1); a depthwise kernel is (3, 3, 1, C) here, (C, 1, 3, 3) there; fc transposed), BN ``scale`` ->
``weight``, ``mean``/``var`` -> ``running_mean``/``running_var``:

  model_0_0, model_0_1                 -> model.0.0.weight (stem conv), model.0.1.* (its BN)
  model_k_0, model_k_1  (k = 1..13)    -> model.k.0.weight (depthwise conv), model.k.1.* (BN)
  model_k_3, model_k_4                 -> model.k.3.weight (pointwise conv), model.k.4.* (BN)
  fc                                   -> fc.weight, fc.bias
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from ekd_jax.models.common import BatchNorm, Dtype, conv, pool_and_classify, torch_default_kernel

# (out_channels, stride) of the stem and of each depthwise-separable block, the blocks grouped
# by feature stage: stage i's output is the i-th map of mdistiller's feats.
STEM = (32, 2)
STAGES: tuple[tuple[tuple[int, int], ...], ...] = (
    ((64, 1), (128, 2), (128, 1)),
    ((256, 2), (256, 1)),
    ((512, 2), (512, 1), (512, 1), (512, 1), (512, 1), (512, 1)),
    ((1024, 2), (1024, 1)),
)


def _conv_bn(x, features, kernel, stride, groups, index, train, dtype):
    """conv (PyTorch default init, no bias) + BN, named ``model_<index[0]>_<index[1]>`` and the next
    index: the Sequential layout of the reference. Returns the BN output (before any ReLU)."""
    k, i = index
    x = conv(features, kernel, stride, groups=groups, kernel_init=torch_default_kernel, dtype=dtype,
             name=f"model_{k}_{i}")(x)
    return BatchNorm(dtype=dtype, name=f"model_{k}_{i + 1}")(x, train)


class MobileNetV1(nn.Module):
    """mdistiller's ImageNet MobileNetV1; ``stem``/``stages`` are the channel/stride table."""

    num_classes: int = 1000
    stem: tuple[int, int] = STEM
    stages: Sequence[Sequence[tuple[int, int]]] = STAGES
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, preact: bool = False):
        pre = _conv_bn(x, self.stem[0], 3, self.stem[1], 1, (0, 0), train, self.dtype)
        x = nn.relu(pre)
        features = [pre if preact else x]
        k = 0
        for blocks in self.stages:
            for out_channels, stride in blocks:
                k += 1
                c = x.shape[-1]
                x = nn.relu(_conv_bn(x, c, 3, stride, c, (k, 0), train, self.dtype))  # depthwise
                pre = _conv_bn(x, out_channels, 1, 1, 1, (k, 3), train, self.dtype)  # pointwise
                x = nn.relu(pre)
            features.append(pre if preact else x)
        logits, pooled = pool_and_classify(x, self.num_classes, dtype=self.dtype, name="fc")
        return logits, [*features, pooled]


MODELS = {"mobilenetv1_imagenet": MobileNetV1}
