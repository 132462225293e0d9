"""Wide ResNets of the zoo (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2; RepDistiller models/wrn.py).

Depth 6n+4, widths [16, 16k, 32k, 64k], pre-activation blocks, dropout 0 (the reference
constructors never pass a drop rate), final BN-ReLU, global average pool, Linear.

Features: ``[stem conv output, raw block-stage outputs x3, pooled vector after the final BN-ReLU]``.
With ``preact=True`` the three stage maps are passed through the BN that the *next* unit applies
to them (stage-2 block-0 bn1, stage-3 block-0 bn1, the final BN), i.e. the reference's
``get_bn_before_relu`` outputs.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from ekd_jax.models.common import BatchNorm, Dtype, conv, pool_and_classify, relu


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3, + shortcut; no final activation.

    Shortcut: identity on the raw input when the width is unchanged, otherwise a 1x1 conv (no BN)
    on the pre-activated input relu(bn1(x)). Written with ``setup`` so that the parent can call
    :meth:`input_bn` — this block's bn1 — on its own, for the preact features.
    """

    in_features: int
    features: int
    stride: int = 1
    dtype: Dtype | None = None

    def setup(self):
        if self.in_features == self.features and self.stride != 1:
            # The reference would fail with a shape mismatch here; WRN layouts never ask for it.
            raise ValueError("identity shortcut needs stride 1")
        self.bn1 = BatchNorm(dtype=self.dtype)
        self.conv1 = conv(self.features, 3, self.stride, dtype=self.dtype)
        self.bn2 = BatchNorm(dtype=self.dtype)
        self.conv2 = conv(self.features, 3, dtype=self.dtype)
        if self.in_features != self.features:
            self.shortcut_conv = conv(self.features, 1, self.stride, dtype=self.dtype)

    def input_bn(self, x: jax.Array, train: bool) -> jax.Array:
        """This block's first BN applied to ``x`` (the pre-ReLU activation of the block input)."""
        return self.bn1(x, train)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        a = relu(self.bn1(x, train))
        y = self.conv1(a)
        y = self.conv2(relu(self.bn2(y, train)))
        shortcut = x if self.in_features == self.features else self.shortcut_conv(a)
        return shortcut + y


class WideResNet(nn.Module):
    """WRN-depth-k for CIFAR. Convs: normal(0, sqrt(2/(k*k*out))); Linear: PyTorch default weight, zero bias."""

    num_classes: int
    depth: int
    widen_factor: int
    dtype: Dtype | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, preact: bool = False
    ) -> tuple[jax.Array, list[jax.Array]]:
        assert (self.depth - 4) % 6 == 0, f"WRN depth must be 6n+4, got {self.depth}"
        n = (self.depth - 4) // 6
        k = self.widen_factor
        widths = (16 * k, 32 * k, 64 * k)

        x = conv(16, 3, dtype=self.dtype, name="stem_conv")(x)
        features = [x]
        stage_inputs = []  # block 0 of each stage, whose bn1 gives the previous stage's preact map
        in_features = 16
        for s, width in enumerate(widths, start=1):
            for b in range(n):
                block = WideBasicBlock(
                    in_features, width, 2 if (s > 1 and b == 0) else 1,
                    dtype=self.dtype, name=f"stage{s}_block{b}",
                )
                if b == 0:
                    stage_inputs.append(block)
                x = block(x, train)
                in_features = width
            features.append(x)

        final_bn = BatchNorm(dtype=self.dtype, name="final_bn")
        logits, pooled = pool_and_classify(
            relu(final_bn(x, train)), self.num_classes, bias_init=nn.initializers.zeros, dtype=self.dtype,
            name="fc",
        )
        features.append(pooled)

        if preact:
            # Reuse the very BN modules that consume these maps. As in the reference, this runs
            # them a second time, so in train mode their running statistics are updated twice per
            # step (a reference quirk that only matters for AB distillation, the one preact user).
            next_bns = [stage_inputs[1].input_bn, stage_inputs[2].input_bn, final_bn]
            features[1:4] = [bn(f, train) for bn, f in zip(next_bns, features[1:4])]
        return logits, features


MODELS = {
    f"wrn_{d}_{k}": functools.partial(WideResNet, depth=d, widen_factor=k)
    for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))
}
