"""In-process monkeypatches of ekd_jax for the A/B commands of docs/performance.md.

Each patch is a function applied before the networks are built (benchmarks/compare_cpu.py
``--jax NAME FLAGS PATCHES``, benchmarks/profile_step.py ``--patches``). None of this is used by
the project itself. The patches that measured proposed changes and were rejected or adopted
(barrier, relu_div, materialize_blocks, bn_fast, bn_vjp, bn_fast_vjp, im2col, conv_dw_dots) were
removed after being measured; their numbers are in docs/performance.md and their code is in
``git show b6ebeca:benchmarks/patches.py``.
"""

from __future__ import annotations


def adapter_1x1():
    """ekd_jax's guided adapter becomes 1x1 conv -> BN (the lighter reference adapter).

    Applied by compare_cpu.py / profile_step.py ``--adapter 1x1`` (torch_step.py's twin).
    """
    import flax.linen as nn

    from ekd_jax import guided
    from ekd_jax.models.common import BatchNorm, conv

    class Adapter1x1(nn.Module):
        out_shape: tuple
        dtype: object = None

        @nn.compact
        def __call__(self, f, train):
            h, w, c = self.out_shape
            f = guided.resize_to(f, (h, w))
            return BatchNorm(dtype=self.dtype, name="bn")(conv(c, 1, dtype=self.dtype, name="conv1x1")(f), train)

    guided.Adapter = Adapter1x1


def plain_relu():
    """Undo ``materialize``: the ResNet/WRN zoo with plain ``nn.relu`` (the models before the change).

    The A/B of docs/performance.md's main finding on a given machine:
    ``compare_cpu.py --no_torch --jax 'mat|default|' --jax 'plain|default|plain_relu'``.
    """
    import flax.linen as nn

    from ekd_jax.models import resnet, wrn

    resnet.relu = nn.relu
    wrn.relu = nn.relu


PATCHES = {
    "adapter_1x1": adapter_1x1,
    "plain_relu": plain_relu,
}


def apply(names: str) -> None:
    for name in filter(None, (n.strip() for n in names.split(","))):
        if name not in PATCHES:
            raise SystemExit(f"error: unknown patch {name!r}; known: {', '.join(PATCHES)} "
                             "(the removed, measured ones: git show b6ebeca:benchmarks/patches.py)")
        PATCHES[name]()
