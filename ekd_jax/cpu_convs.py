"""Convolutions in the one layout XLA:CPU runs fast everywhere in a program, loops included.

XLA:CPU hands a convolution to its fast (Eigen) kernel only in the canonical layout: input NHWC,
kernel HWIO, output NHWC. The gradients of a network's convolutions are convolutions in other layouts
(the kernel's gradient treats the batch as the feature dimension, the input's swaps the kernel's
features); XLA's ``ConvCanonicalization`` pass rewrites them to the canonical layout with transposes,
but it visits only the program's entry computation. Inside a loop body (``lax.fori_loop``,
``lax.scan``), where the training loop's K steps per call run (:mod:`ekd_jax.step`), they fall to an
unoptimised loop nest: measured 2026-12-05 on 2 cores, the tiny config's joint step took 97 ms per step
in a ``fori_loop`` against 11-14 ms alone (jax-ml/jax issue 12868 reports the same).

:func:`canonical_convs` does that pass's rewrite at the JAX level, for every convolution of a traced
function, so that it happens in loop bodies too: each non-canonical convolution becomes transposes around
a canonical one. The transposes move values without arithmetic and the convolution is the kernel XLA
would have called, so results are bitwise those of the step compiled alone (tests/test_cpu_convs.py).
Only the CPU needs it; :func:`ekd_jax.step.compile_steps` applies it there.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax import lax
from jax.extend import core as jcore
from jax.extend.core import primitives as prims


def canonical_dimension_numbers(ndim: int) -> lax.ConvDimensionNumbers:
    """(N, spatial..., C) input, (spatial..., I, O) kernel, (N, spatial..., C) output, as positions."""
    spatial = tuple(range(1, ndim - 1))
    return lax.ConvDimensionNumbers((0, ndim - 1, *spatial), (ndim - 1, ndim - 2, *range(ndim - 2)), (0, ndim - 1, *spatial))


def _conv(lhs, rhs, *, dimension_numbers, **params):
    """``conv_general_dilated_p`` in the canonical layout: the operands transposed into it, the result out
    of it (each transpose only where a layout differs)."""
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    to_lhs = (lhs_spec[0], *lhs_spec[2:], lhs_spec[1])
    to_rhs = (*rhs_spec[2:], rhs_spec[1], rhs_spec[0])
    to_out = (out_spec[0], *out_spec[2:], out_spec[1])
    identity = tuple(range(len(lhs_spec)))
    if to_lhs == to_rhs == to_out == identity:
        return prims.conv_general_dilated_p.bind(lhs, rhs, dimension_numbers=dimension_numbers, **params)
    out = prims.conv_general_dilated_p.bind(
        lhs if to_lhs == identity else lax.transpose(lhs, to_lhs),
        rhs if to_rhs == identity else lax.transpose(rhs, to_rhs),
        dimension_numbers=canonical_dimension_numbers(len(lhs_spec)),
        **params,
    )
    return out if to_out == identity else lax.transpose(out, tuple(int(i) for i in np.argsort(to_out)))


def _evaluate(jaxpr, consts, *args):
    """Evaluates ``jaxpr`` (binding every equation again, under the caller's trace) with each convolution
    made canonical; the bodies of nested ``jit`` calls are evaluated inline the same way."""
    env = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        if eqn.primitive is prims.conv_general_dilated_p:
            outs = [_conv(*ins, **eqn.params)]
        elif eqn.primitive is prims.jit_p:
            inner = eqn.params["jaxpr"]
            outs = _evaluate(inner.jaxpr, inner.consts, *ins)
        else:
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def canonical_convs(fn):
    """``fn`` (arrays in, arrays out; traced under ``jax.jit``) with every convolution it computes, its
    gradients' included, in XLA:CPU's canonical layout. The same values as ``fn``."""

    @functools.wraps(fn)
    def wrapped(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs = _evaluate(closed.jaxpr, closed.consts, *jax.tree_util.tree_leaves(args))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return wrapped
