"""In-process monkeypatches of ekd_jax, to MEASURE proposed changes to shared files before making them.

Each patch is a function applied before the networks are built (benchmarks/compare_cpu.py
``--jax NAME FLAGS PATCHES``). None of this is used by the project itself; docs/performance.md
gives each patch's measured effect and the diff it stands for.
"""

from __future__ import annotations

import types

import jax


def adapter_1x1():
    """ekd_jax's guided adapter becomes 1x1 conv -> BN (the lighter reference adapter)."""
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


def _nn_with(**overrides):
    import flax.linen as linen

    ns = {k: getattr(linen, k) for k in dir(linen) if not k.startswith("__")}
    ns.update(overrides)
    return types.SimpleNamespace(**ns)


def barrier():
    """``optimization_barrier`` after every ReLU of the ResNet/WRN zoo.

    Stands for: models/resnet.py (BasicBlock/Bottleneck/stem) materialising each ReLU output.
    Without it XLA:CPU fuses the whole residual chain x_k = relu(bn(conv_k) + x_{k-1}) into every
    consumer that is a fusion (the transposes feeding the filter-gradient convolutions and the
    ReLU-mask selects of the backward pass), recomputing O(depth) elementwise ops per element.
    """
    from ekd_jax.models import resnet, wrn

    def relu(x):
        return jax.lax.optimization_barrier(jax.nn.relu(x))

    resnet.nn = _nn_with(relu=relu)
    wrn.nn = _nn_with(relu=relu)


def _runtime_one(x):
    """A float 1.0 that XLA cannot constant-fold (0 * a value of x, + 1); exact unless x holds inf/nan."""
    return 1.0 + 0.0 * jax.lax.stop_gradient(x.reshape(-1)[0]).astype(x.dtype)


def relu_div():
    """Every ReLU of the ResNet/WRN zoo becomes ``relu(x) / one`` with ``one`` a runtime 1.0.

    The division is exact (x / 1.0 == x) and costs one vector op inside a fusion that exists anyway,
    but XLA counts a float divide as *expensive* and never duplicates an expensive instruction into
    several consumer fusions: each block output is then written once and read by its consumers,
    instead of the residual chain being recomputed inside each (forward and, through the divide's
    gradient g / one, backward).
    """
    from ekd_jax.models import resnet, wrn

    def relu(x):
        return jax.nn.relu(x) / _runtime_one(x)

    resnet.nn = _nn_with(relu=relu)
    wrn.nn = _nn_with(relu=relu)


PATCHES = {"adapter_1x1": adapter_1x1, "barrier": barrier, "relu_div": relu_div}


def apply(names: str) -> None:
    for name in filter(None, (n.strip() for n in names.split(","))):
        if name not in PATCHES:
            raise SystemExit(f"error: unknown patch {name!r}; known: {', '.join(PATCHES)}")
        PATCHES[name]()
