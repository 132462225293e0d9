"""Layers and initialisers shared by the zoo's families, matching PyTorch/RepDistiller semantics.

Why this file exists: the zoo must reproduce the reference architectures exactly, including
what Flax does differently by default (initialisers, BatchNorm running-variance update).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

# PyTorch BatchNorm2d defaults: eps 1e-5, momentum 0.1 (Flax convention: 1 - 0.1 = 0.9).
BN_MOMENTUM = 0.9
BN_EPS = 1e-5

# kaiming_normal_(mode='fan_out', nonlinearity='relu'): N(0, 2 / (k*k*out)), untruncated.
# Equal to RepDistiller's WRN/VGG/MobileNetV2 init normal(0, sqrt(2 / (k*k*out))).
conv_kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default Conv/Linear weight init, kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in)).
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# RepDistiller's VGG / MobileNetV2 Linear init.
linear_normal_001 = nn.initializers.normal(stddev=0.01)


def torch_default_bias(fan_in: int) -> Initializer:
    """PyTorch's default bias init for Conv/Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class BatchNorm(nn.Module):
    """BatchNorm with PyTorch semantics (RepDistiller's BatchNorm2d/1d).

    Normalises with the biased batch variance, but updates the running variance with the
    unbiased estimate n/(n-1), as PyTorch does — needed for exact eval-mode parity with the
    reference. Statistics are always computed in float32 (also under bfloat16 compute).
    Variables: params `scale`, `bias`; batch_stats `mean`, `var` (Flax names).
    """

    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPS
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        reduce_axes = tuple(range(x.ndim - 1))
        if train:
            xf = x.astype(jnp.float32)
            mean = jnp.mean(xf, axis=reduce_axes)
            var = jnp.mean(jnp.square(xf - mean), axis=reduce_axes)
            n = math.prod(x.shape[:-1])
            if not self.is_initializing():
                unbiased = var * (n / max(n - 1, 1))
                ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * unbiased
        else:
            mean, var = ra_mean.value, ra_var.value
        mul = scale * jax.lax.rsqrt(var + self.epsilon)
        dtype = self.dtype or x.dtype
        y = x.astype(dtype) * mul.astype(dtype) + (bias - mean * mul).astype(dtype)
        return y


def materialize(x: jax.Array) -> jax.Array:
    """Bit-exact identity that makes XLA keep ``x`` in memory instead of recomputing it.

    XLA:CPU fuses cheap elementwise producers into every consumer fusion, duplicating them; for a
    residual stream x_k = relu(bn(conv_k) + x_{k-1}) that recomputes all earlier blocks inside each
    consumer (the transposes feeding filter-gradient convolutions, the backward ReLU masks): about
    half the step time of resnet56 on CPU (docs/performance.md). XLA never duplicates a float divide,
    so dividing by a 1.0 it cannot constant-fold cuts the chain, forward and (through g / one)
    backward. Exact: x / 1.0 == x. (``jax.lax.optimization_barrier`` would say this, but XLA:CPU
    drops it before fusion.) The 1.0 is derived from ``x`` so it is a runtime value, and is 1.0 for
    every input (a non-finite first element is replaced by 0 first), so the result is always exact.
    """
    v = jax.lax.stop_gradient(x.reshape(-1)[0]).astype(x.dtype)
    one = 1.0 + 0.0 * jnp.where(jnp.isfinite(v), v, jnp.zeros_like(v))
    return x / one


def relu(x: jax.Array) -> jax.Array:
    """ReLU whose output is materialised (see :func:`materialize`)."""
    return materialize(nn.relu(x))


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Global average pooling over H, W (NHWC) -> (N, C); equal to the reference fixed-kernel pools at 32x32."""
    return jnp.mean(x, axis=(1, 2))


class TorchDense(nn.Module):
    """Linear layer with PyTorch's default init unless told otherwise (float32 params)."""

    features: int
    kernel_init: Initializer | None = None
    bias_init: Initializer | None = None
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init or torch_default_kernel, (fan_in, self.features), jnp.float32)
        bias = self.param("bias", self.bias_init or torch_default_bias(fan_in), (self.features,), jnp.float32)
        dtype = self.dtype or x.dtype
        return jnp.dot(x.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)


def pool_and_classify(
    x: jax.Array,
    num_classes: int,
    *,
    name: str,
    kernel_init: Initializer | None = None,
    bias_init: Initializer | None = None,
    dtype: Dtype | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Every zoo model's head: global average pool, then a :class:`TorchDense`. ``(logits, pooled)``.

    ``name`` is the Linear's reference name (``fc``, ``classifier``); the inits default to
    PyTorch's, as :class:`TorchDense`. Call inside a compact method: the Linear joins the caller's
    scope.
    """
    pooled = global_avg_pool(x)
    logits = TorchDense(num_classes, kernel_init=kernel_init, bias_init=bias_init, dtype=dtype, name=name)(pooled)
    return logits, pooled


def conv(
    features: int,
    kernel: int,
    stride: int = 1,
    *,
    padding: int | str | None = None,
    use_bias: bool = False,
    groups: int = 1,
    kernel_init: Initializer = conv_kaiming_fan_out,
    bias_init: Initializer = nn.initializers.zeros,
    dtype: Dtype | None = None,
    name: str | None = None,
) -> nn.Conv:
    """A PyTorch-style Conv2d (symmetric padding k//2 by default, NHWC)."""
    pad = kernel // 2 if padding is None else padding
    pads: Sequence[tuple[int, int]] | str = pad if isinstance(pad, str) else [(pad, pad), (pad, pad)]
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=pads,
        use_bias=use_bias,
        feature_group_count=groups,
        kernel_init=kernel_init,
        bias_init=bias_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )
