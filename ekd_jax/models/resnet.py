"""CIFAR ResNets of the zoo: the BasicBlock family (resnet8 ... resnet110, resnet8x4, resnet32x4;
RepDistiller models/resnet.py) and the bottleneck ResNet50 (RepDistiller models/resnetv2.py).

Both references are the same network shape — conv3x3 stem + BN + ReLU (no max-pool), stages of
residual blocks whose first block may downsample, global average pool, Linear — and differ only
in the block type and the stage layout, so one parameterised :class:`ResNet` builds all of them.
The blocks and their stages (:class:`BasicBlock`, :class:`Bottleneck`, :func:`residual_stages`)
also build the ImageNet ResNets (imagenet_resnet.py), which name the shortcut's layers otherwise.

Features (``preact=False``): ``[stem after ReLU, stage outputs after their final ReLU..., pooled]``;
with ``preact=True`` each stage map is replaced by its last block's residual sum before the ReLU
(the input of the reference's ``get_bn_before_relu`` targets' ReLU). ResNet50 has four stages,
hence six entries.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax

from ekd_jax.models.common import BatchNorm, Dtype, conv, pool_and_classify, relu


# The names of the 1x1 conv + BN that project a block's shortcut: the CIFAR zoo's own, which
# torch_layout maps onto both references' keys (resnet.py's ``downsample``, resnetv2.py's ``shortcut``).
SHORTCUT = ("shortcut_conv", "shortcut_bn")


def _shortcut(
    x: jax.Array, features: int, stride: int, names: tuple[str, str], train: bool, dtype: Dtype | None
) -> jax.Array:
    """Residual path of a block: identity, or a 1x1 conv + BN projection when the shape changes.

    All three references (RepDistiller's resnet.py and resnetv2.py, torchvision's resnet.py)
    project whenever stride != 1 or the width changes (never He et al.'s zero-padding option A);
    this is what the reference parameter counts assume. Must be called inside a block's compact
    ``__call__`` (it registers the conv and the BN there, named ``names``).
    """
    if stride == 1 and x.shape[-1] == features:
        return x
    conv_name, bn_name = names
    x = conv(features, 1, stride, dtype=dtype, name=conv_name)(x)
    return BatchNorm(dtype=dtype, name=bn_name)(x, train)


class BasicBlock(nn.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN, + shortcut, ReLU. Returns ``(output, pre-ReLU sum)``.

    The BasicBlock of both ResNet families, which differ only in what they call the shortcut's
    projection: ``shortcut_names`` names its conv and BN (:data:`SHORTCUT` here, torchvision's
    ``downsample_0``/``_1`` in imagenet_resnet.py).
    """

    features: int
    stride: int = 1
    shortcut_names: tuple[str, str] = SHORTCUT
    dtype: Dtype | None = None

    expansion = 1  # output width = features * expansion (class constant, not a field)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        y = conv(self.features, 3, self.stride, dtype=self.dtype, name="conv1")(x)
        y = relu(BatchNorm(dtype=self.dtype, name="bn1")(y, train))
        y = conv(self.features, 3, dtype=self.dtype, name="conv2")(y)
        y = BatchNorm(dtype=self.dtype, name="bn2")(y, train)
        pre = y + _shortcut(x, self.features, self.stride, self.shortcut_names, train, self.dtype)
        return relu(pre), pre


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(x4)-BN, + shortcut, ReLU.

    The stride sits on the 3x3 conv, as in RepDistiller's resnetv2 and torchvision's "ResNet v1.5".
    ``shortcut_names`` as in :class:`BasicBlock`. Returns ``(output, pre-ReLU sum)``.
    """

    features: int
    stride: int = 1
    shortcut_names: tuple[str, str] = SHORTCUT
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
        pre = y + _shortcut(x, out_features, self.stride, self.shortcut_names, train, self.dtype)
        return relu(pre), pre


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def residual_stages(
    x: jax.Array,
    block: str,
    widths: Sequence[int],
    depths: Sequence[int],
    *,
    name: str,
    shortcut_names: tuple[str, str],
    train: bool,
    preact: bool,
    dtype: Dtype | None,
) -> tuple[jax.Array, list[jax.Array]]:
    """The stages of both ResNet families: ``(output, stage maps)``.

    Stage s (from 1) has ``depths[s-1]`` blocks of kind ``block`` (a :data:`BLOCKS` key) and width
    ``widths[s-1]`` (before the block's expansion); the first block of every stage but the first
    has stride 2. ``name.format(s=s, b=b)`` names block b of stage s. A stage map is the stage's
    output, or with ``preact`` its last block's residual sum before the ReLU (the reference's
    preact). Call inside a compact method: the blocks join the caller's scope.
    """
    block_cls = BLOCKS[block]
    maps = []
    for s, (width, depth) in enumerate(zip(widths, depths), start=1):
        for b in range(depth):
            stride = 2 if (s > 1 and b == 0) else 1
            x, pre = block_cls(width, stride, shortcut_names, dtype=dtype, name=name.format(s=s, b=b))(x, train)
        maps.append(pre if preact else x)
    return x, maps


class ResNet(nn.Module):
    """CIFAR ResNet: stem conv3x3 (stride 1) + BN + ReLU, stages, global avg pool, Linear.

    ``widths[i]`` is stage i's block width (before the block's expansion) and ``depths[i]`` its
    number of blocks; stage 0 has stride 1, every later stage stride 2. Convs use
    kaiming_normal(fan_out, relu); the Linear keeps PyTorch's default init (both references).
    The reference heads are AvgPool2d(8) / AdaptiveAvgPool(1); a global mean equals both at 32x32
    and also serves other input sizes.
    """

    num_classes: int
    stem_width: int
    widths: Sequence[int]
    depths: Sequence[int]
    block: str = "basic"
    dtype: Dtype | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, preact: bool = False
    ) -> tuple[jax.Array, list[jax.Array]]:
        x = conv(self.stem_width, 3, dtype=self.dtype, name="stem_conv")(x)
        stem = relu(BatchNorm(dtype=self.dtype, name="stem_bn")(x, train))
        x, stages = residual_stages(
            stem, self.block, self.widths, self.depths, name="stage{s}_block{b}", shortcut_names=SHORTCUT,
            train=train, preact=preact, dtype=self.dtype,
        )
        logits, pooled = pool_and_classify(x, self.num_classes, dtype=self.dtype, name="fc")
        return logits, [stem, *stages, pooled]


def _cifar_resnet(depth: int, widths: Sequence[int]):
    """BasicBlock ResNet of depth 6n+2; ``widths`` = [stem, stage1, stage2, stage3]."""
    assert (depth - 2) % 6 == 0, f"BasicBlock CIFAR ResNet depth must be 6n+2, got {depth}"
    n = (depth - 2) // 6
    return functools.partial(
        ResNet, stem_width=widths[0], widths=tuple(widths[1:]), depths=(n, n, n), block="basic"
    )


# Plain nets: [16, 16, 32, 64]. The x4 nets widen the stages 4x but the stem only 2x, so their
# stage-1 first block gets a stride-1 projection (32 -> 64), as in the reference.
_PLAIN = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)

MODELS = {
    **{f"resnet{d}": _cifar_resnet(d, _PLAIN) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _cifar_resnet(8, _X4),
    "resnet32x4": _cifar_resnet(32, _X4),
    "ResNet50": functools.partial(
        ResNet, stem_width=64, widths=(64, 128, 256, 512), depths=(3, 4, 6, 3), block="bottleneck"
    ),
}
