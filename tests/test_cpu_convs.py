"""ekd_jax.cpu_convs: every convolution in XLA:CPU's canonical layout, loop bodies included, with the same values."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ekd_jax.cpu_convs import canonical_convs

CANONICAL = "b01f_01io->b01f"


def _loss(w, x, *, stride, padding, groups):
    y = lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 feature_group_count=groups)
    return jnp.sum(jnp.tanh(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)


CASES = [dict(stride=1, padding="SAME", groups=1), dict(stride=2, padding=((1, 1), (1, 1)), groups=1),
         dict(stride=1, padding="VALID", groups=4), dict(stride=2, padding="SAME", groups=8)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"s{c['stride']}-{c['padding'] if isinstance(c['padding'], str) else 'pad1'}-g{c['groups']}")
def test_values_and_gradients_are_bitwise_the_same(case):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 9, 9, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 8 // case["groups"], 8)), jnp.float32)
    f = jax.value_and_grad(functools.partial(_loss, **case), argnums=(0, 1))
    (v0, (gw0, gx0)) = jax.jit(f)(w, x)
    (v1, (gw1, gx1)) = jax.jit(canonical_convs(f))(w, x)
    for a, b in ((v0, v1), (gw0, gw1), (gx0, gx1)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _conv_layouts(compiled_text: str) -> list[str]:
    return re.findall(r"convolution\(.*?dim_labels=([^,\s]+)", compiled_text)


def test_a_training_loop_on_the_cpu_keeps_only_canonical_convolutions():
    """The gradients' convolutions inside a fori_loop: without the rewrite XLA:CPU leaves them in other layouts
    (its canonicalisation visits only the entry computation) and runs them unoptimised, with it every one is
    canonical."""
    x = jnp.ones((8, 8, 8, 4))

    def step(w):
        return w - 0.01 * jax.grad(lambda w: jnp.sum(jnp.tanh(
            lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))))(w)

    w = jnp.full((3, 3, 4, 4), 0.1)
    loop = lambda step: jax.jit(lambda w: lax.fori_loop(0, 3, lambda i, w: step(w), w))  # noqa: E731
    plain = _conv_layouts(loop(step).lower(w).compile().as_text())
    rewritten = _conv_layouts(loop(canonical_convs(step)).lower(w).compile().as_text())
    assert plain and set(plain) != {CANONICAL}, plain  # the problem is there to be solved
    assert rewritten and set(rewritten) == {CANONICAL}, rewritten
    # And the loop computes what the step compiled alone computes (there XLA canonicalises the layouts itself).
    alone = jax.jit(step)
    np.testing.assert_array_equal(np.asarray(alone(alone(alone(w)))), np.asarray(loop(canonical_convs(step))(w)))


def test_nested_jit_calls_are_rewritten_too():
    inner = jax.jit(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")))
    x, w = jnp.ones((2, 3, 5, 5)), jnp.ones((4, 3, 3, 3))
    outer = canonical_convs(lambda x, w: inner(x, w) * 2)
    layouts = re.findall(r"dim_numbers = (\[[^\]]*\]x\[[^\]]*\]->\[[^\]]*\])", jax.jit(outer).lower(x, w).as_text())
    assert layouts == ["[b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]"], layouts
    np.testing.assert_array_equal(np.asarray(jax.jit(outer)(x, w)), np.asarray(inner(x, w) * 2))
