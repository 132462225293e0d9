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

    Now in the models (``models.common.relu``): applied on top it divides twice. Kept for the
    commands of docs/performance.md that measured it before it was committed.

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


def materialize(x):
    """Bit-exact identity that XLA keeps in memory instead of recomputing it in each consumer.

    ``x / one`` with ``one`` a runtime 1.0 (so it cannot be constant-folded away): XLA never
    duplicates a float divide into several consumer fusions. The proposed models/common.py helper.
    """
    return x / _runtime_one(x)


def materialize_blocks():
    """``materialize`` on each residual block's output only (BasicBlock / Bottleneck of resnet.py).

    The minimal form of relu_div, as proposed for ekd_jax/models/resnet.py.
    """
    import flax.linen as nn

    from ekd_jax.models import resnet
    from ekd_jax.models.resnet import BatchNorm, _shortcut, conv

    class BasicBlock(resnet.BasicBlock):
        @nn.compact
        def __call__(self, x, train):
            y = conv(self.features, 3, self.stride, dtype=self.dtype, name="conv1")(x)
            y = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(y, train))
            y = conv(self.features, 3, dtype=self.dtype, name="conv2")(y)
            y = BatchNorm(dtype=self.dtype, name="bn2")(y, train)
            pre = y + _shortcut(x, self.features, self.stride, train, self.dtype)
            return materialize(nn.relu(pre)), pre

    class Bottleneck(resnet.Bottleneck):
        @nn.compact
        def __call__(self, x, train):
            out_features = self.features * self.expansion
            y = conv(self.features, 1, dtype=self.dtype, name="conv1")(x)
            y = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(y, train))
            y = conv(self.features, 3, self.stride, dtype=self.dtype, name="conv2")(y)
            y = nn.relu(BatchNorm(dtype=self.dtype, name="bn2")(y, train))
            y = conv(out_features, 1, dtype=self.dtype, name="conv3")(y)
            y = BatchNorm(dtype=self.dtype, name="bn3")(y, train)
            pre = y + _shortcut(x, out_features, self.stride, train, self.dtype)
            return materialize(nn.relu(pre)), pre

    resnet._BLOCKS["basic"] = BasicBlock
    resnet._BLOCKS["bottleneck"] = Bottleneck


def _make_bn(fast_var: bool, custom_grad: bool):
    """A drop-in for models.common.BatchNorm (same variables, same running-stat update)."""
    import math

    import flax.linen as nn
    import jax.numpy as jnp

    from ekd_jax.models import common

    def _stats(xf, axes):
        mean = jnp.mean(xf, axis=axes)
        if fast_var:
            var = jnp.maximum(jnp.mean(jnp.square(xf), axis=axes) - jnp.square(mean), 0.0)
        else:
            var = jnp.mean(jnp.square(xf - mean), axis=axes)
        return mean, var

    def _fwd(x, scale, bias):
        axes = tuple(range(x.ndim - 1))
        xf = x.astype(jnp.float32)
        mean, var = _stats(xf, axes)
        inv = jax.lax.rsqrt(var + common.BN_EPS)
        mul = scale * inv
        y = (x * mul.astype(x.dtype) + (bias - mean * mul).astype(x.dtype))
        return (y, mean, var), (x, mean, inv, scale)

    def _bwd(res, cts):
        x, mean, inv, scale = res
        g = cts[0].astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        n = math.prod(x.shape[:-1])
        xhat = (x.astype(jnp.float32) - mean) * inv
        dbias = jnp.sum(g, axis=axes)
        dscale = jnp.sum(g * xhat, axis=axes)
        dx = (scale * inv / n) * (n * g - dbias - xhat * dscale)
        return dx.astype(x.dtype), dscale, dbias

    bn_full = jax.custom_vjp(lambda x, s, b: _fwd(x, s, b)[0])
    bn_full.defvjp(lambda x, s, b: _fwd(x, s, b), _bwd)

    class BatchNorm(nn.Module):
        momentum: float = common.BN_MOMENTUM
        epsilon: float = common.BN_EPS
        dtype: object = None

        @nn.compact
        def __call__(self, x, train):
            features = x.shape[-1]
            scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
            bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
            ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
            ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
            dtype = self.dtype or x.dtype
            if not train:
                mul = scale * jax.lax.rsqrt(ra_var.value + self.epsilon)
                return x.astype(dtype) * mul.astype(dtype) + (bias - ra_mean.value * mul).astype(dtype)
            x = x.astype(dtype)
            if custom_grad:
                y, mean, var = bn_full(x, scale, bias)
                mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
            else:
                (y, mean, var), _ = _fwd(x, scale, bias)
            if not self.is_initializing():
                n = math.prod(x.shape[:-1])
                ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var * (n / max(n - 1, 1))
            return y

    return BatchNorm


def _install_bn(cls):
    from ekd_jax import guided
    from ekd_jax.models import resnet, wrn

    for mod in (resnet, wrn, guided):
        mod.BatchNorm = cls


def bn_fast():
    """BatchNorm statistics in one pass: var = E[x^2] - E[x]^2 (flax's default), autodiff backward."""
    _install_bn(_make_bn(fast_var=True, custom_grad=False))


def bn_vjp():
    """BatchNorm with a hand-written backward (custom_vjp): 2 fused reductions + 1 elementwise pass."""
    _install_bn(_make_bn(fast_var=False, custom_grad=True))


def bn_fast_vjp():
    """Both: one-pass statistics and the hand-written backward."""
    _install_bn(_make_bn(fast_var=True, custom_grad=True))


def plain_relu():
    """Undo ``materialize``: the ResNet/WRN zoo with plain ``nn.relu`` (the models before the change).

    The A/B of docs/performance.md's main finding on a given machine:
    ``compare_cpu.py --no_torch --jax 'mat|default|' --jax 'plain|default|plain_relu'``.
    """
    import flax.linen as nn

    from ekd_jax.models import resnet, wrn

    resnet.relu = nn.relu
    wrn.relu = nn.relu


def im2col_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, precision=None, **kw):
    """``lax.conv_general_dilated`` for NHWC/HWIO as im2col + one matmul (ungrouped, undilated convs)."""
    import jax.numpy as jnp
    from jax import lax

    plain = (feature_group_count == 1 and not isinstance(padding, str)
             and tuple(lhs_dilation or (1, 1)) == (1, 1) and tuple(rhs_dilation or (1, 1)) == (1, 1))
    if not plain:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision, **kw)
    kh, kw_, cin, cout = rhs.shape
    (p0, p1), (q0, q1) = padding
    x = jnp.pad(lhs, ((0, 0), (p0, p1), (q0, q1), (0, 0))) if (p0 or p1 or q0 or q1) else lhs
    sh, sw = window_strides
    ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw_) // sw + 1
    cols = [x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :] for i in range(kh) for j in range(kw_)]
    patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
    return jnp.dot(patches, rhs.reshape(kh * kw_ * cin, cout), precision=precision)


def im2col():
    """Every ungrouped conv of the zoo (and adapters) as im2col + matmul instead of XLA's conv."""
    import functools

    import flax.linen as linen

    from ekd_jax.models import common

    common.nn = _nn_with(Conv=functools.partial(linen.Conv, conv_general_dilated=im2col_conv))


def _conv_dw_dots(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                  dimension_numbers=None, feature_group_count=1, precision=None, **kw):
    """XLA's conv forward and input gradient; filter gradient as kh*kw matmuls over shifted slices."""
    import jax.numpy as jnp
    from jax import lax

    plain = (feature_group_count == 1 and not isinstance(padding, str)
             and tuple(lhs_dilation or (1, 1)) == (1, 1) and tuple(rhs_dilation or (1, 1)) == (1, 1))

    def fwd_conv(x, w):
        return lax.conv_general_dilated(x, w, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision, **kw)

    if not plain:
        return fwd_conv(lhs, rhs)

    @jax.custom_vjp
    def f(x, w):
        return fwd_conv(x, w)

    def f_fwd(x, w):
        return fwd_conv(x, w), (x, w)

    def f_bwd(res, g):
        x, w = res
        _, vjp_x = jax.vjp(lambda x_: fwd_conv(x_, w), x)
        (dx,) = vjp_x(g)
        kh, kw_, cin, cout = w.shape
        (p0, p1), (q0, q1) = padding
        xp = jnp.pad(x, ((0, 0), (p0, p1), (q0, q1), (0, 0)))
        sh, sw = window_strides
        ho, wo = g.shape[1], g.shape[2]
        rows = []
        for i in range(kh):
            for j in range(kw_):
                xs = xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
                rows.append(jnp.einsum("nhwc,nhwd->cd", xs, g, precision=precision))
        dw = jnp.stack(rows).reshape(kh, kw_, cin, cout).astype(w.dtype)
        return dx, dw

    f.defvjp(f_fwd, f_bwd)
    return f(lhs, rhs)


def conv_dw_dots():
    """Every ungrouped conv's filter gradient as kh*kw matmuls (forward and input gradient unchanged)."""
    import functools

    import flax.linen as linen

    from ekd_jax.models import common

    common.nn = _nn_with(Conv=functools.partial(linen.Conv, conv_general_dilated=_conv_dw_dots))


PATCHES = {
    "adapter_1x1": adapter_1x1,
    "barrier": barrier,
    "relu_div": relu_div,
    "materialize_blocks": materialize_blocks,
    "bn_fast": bn_fast,
    "bn_vjp": bn_vjp,
    "bn_fast_vjp": bn_fast_vjp,
    "plain_relu": plain_relu,
    "im2col": im2col,
    "conv_dw_dots": conv_dw_dots,
}


def apply(names: str) -> None:
    for name in filter(None, (n.strip() for n in names.split(","))):
        if name not in PATCHES:
            raise SystemExit(f"error: unknown patch {name!r}; known: {', '.join(PATCHES)}")
        PATCHES[name]()
