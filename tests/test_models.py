"""The zoo equals the reference: parameter counts, BN statistics, feature shapes (all 22 models)."""

import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ekd_jax import models

REF = json.loads((pathlib.Path(__file__).parent / "fixtures" / "zoo_cifar100.json").read_text())["models"]


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _abstract(name, hw=32, channels=3, num_classes=100):
    model = models.create_model(name, num_classes=num_classes)
    x = jax.ShapeDtypeStruct((2, hw, hw, channels), jnp.float32)
    variables = jax.eval_shape(lambda k, x: model.init(k, x, train=False), jax.random.key(0), x)
    return model, variables, x


def test_available_models_are_the_reference_keys():
    assert sorted(models.available_models("cifar")) == sorted(REF)


@pytest.mark.parametrize("name", sorted(REF))
def test_counts_and_feature_shapes_match_reference(name):
    ref = REF[name]
    model, variables, x = _abstract(name)
    assert set(variables) == {"params", "batch_stats"}
    assert _count(variables["params"]) == ref["trainable_params"]
    assert _count(variables["batch_stats"]) == ref["bn_running_stats"]
    for preact, key in ((False, "is_feat_shapes_CHW"), (True, "is_feat_preact_shapes_CHW")):
        logits, feats = jax.eval_shape(
            lambda v, x: model.apply(v, x, train=False, preact=preact), variables, x
        )
        assert logits.shape == (2, 100)
        want = [tuple([2] + (s[1:] + s[:1] if len(s) == 3 else s)) for s in ref[key]]
        assert [f.shape for f in feats] == want, (name, preact)


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2"])
@pytest.mark.parametrize("hw", [16, 64])
def test_other_resolutions_and_grayscale(name, hw):
    """Any power-of-two resolution and one channel: the same layers (no resolution-dependent
    weights), and every feature map is the reference's scaled by hw / 32 with the same channels."""
    model, variables, x = _abstract(name, hw=hw, channels=1, num_classes=10)
    _, at_32, _ = _abstract(name, hw=32, channels=1, num_classes=10)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(at_32)
    assert [v.shape for v in jax.tree_util.tree_leaves(variables)] == [v.shape for v in jax.tree_util.tree_leaves(at_32)]
    # And in the reference's setting (RGB, 100 classes) at this resolution: exactly its counts.
    ref = REF[name]
    _, rgb, _ = _abstract(name, hw=hw)
    assert _count(rgb["params"]) == ref["trainable_params"] and _count(rgb["batch_stats"]) == ref["bn_running_stats"]
    logits, feats = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert logits.shape == (2, 10)
    want = [(2, s[1] * hw // 32, s[2] * hw // 32, s[0]) if len(s) == 3 else (2, *s) for s in ref["is_feat_shapes_CHW"]]
    if name.startswith("vgg") and hw == 64:  # the reference pools before block 4 only at 64x64
        want[4] = (2, want[4][1] // 2, want[4][2] // 2, want[4][3])
    assert [f.shape for f in feats] == want


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "ShuffleV2"])
def test_forward_train_and_eval_and_bn_updates(name):
    model = models.create_model(name, num_classes=10)
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    # Eval mode normalises with the running statistics: each image's logits are its own, whatever
    # else is in the batch (train mode uses the batch's statistics: they are not).
    logits, feats = model.apply(variables, x, train=False)
    chex.assert_shape(logits, (4, 10))
    alone, _ = model.apply(variables, x[:1], train=False)
    np.testing.assert_allclose(alone, logits[:1], rtol=1e-5, atol=1e-6)
    (batch_t, _), _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    (alone_t, _), _ = model.apply(variables, x[:2], train=True, mutable=["batch_stats"])
    assert np.max(np.abs(np.asarray(alone_t) - np.asarray(batch_t[:2]))) > 1e-3
    # Eval mode with mutable batch_stats: statistics unchanged.
    (_, _), upd = model.apply(variables, x, train=False, mutable=["batch_stats"])
    chex.assert_trees_all_equal(upd["batch_stats"], variables["batch_stats"])
    # Train mode: every running statistic moves.
    (logits_t, _), upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
    chex.assert_tree_all_finite(logits_t)
    changed = jax.tree_util.tree_map(
        lambda a, b: bool(jnp.any(a != b)), upd["batch_stats"], variables["batch_stats"]
    )
    assert all(jax.tree_util.tree_leaves(changed))


def test_batchnorm_running_var_is_unbiased_like_pytorch():
    bn = models.common.BatchNorm()
    x = jax.random.normal(jax.random.key(0), (3, 2, 2, 5)) * 3.0 + 1.0
    v = bn.init(jax.random.key(0), x, train=True)
    y, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
    xf = np.asarray(x).reshape(-1, 5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * xf.mean(0), rtol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * xf.var(0, ddof=1), rtol=1e-5)
    # Normalisation itself uses the biased variance.
    np.testing.assert_allclose(
        np.asarray(y).reshape(-1, 5), (xf - xf.mean(0)) / np.sqrt(xf.var(0) + 1e-5), rtol=1e-4, atol=1e-5
    )


def test_unknown_model_lists_available():
    with pytest.raises(ValueError, match="unknown model 'resnet21'.*Available models: .*resnet20"):
        models.create_model("resnet21", num_classes=10)


def test_materialize_is_an_exact_identity_with_identity_gradient():
    from ekd_jax.models.common import materialize

    x = jax.random.normal(jax.random.key(0), (4, 5, 5, 3))
    for first in (1.5, jnp.inf, -jnp.inf, jnp.nan):  # the runtime 1.0 must stay 1.0 whatever x holds
        xi = x.at[0, 0, 0, 0].set(first)
        np.testing.assert_array_equal(np.asarray(jax.jit(materialize)(xi)), np.asarray(xi))
    g = jax.random.normal(jax.random.key(1), x.shape)
    _, vjp = jax.vjp(materialize, x)
    np.testing.assert_array_equal(np.asarray(jax.jit(vjp)(g)[0]), np.asarray(g))
    for dtype in (jnp.bfloat16, jnp.float16):
        xd = x.astype(dtype)
        np.testing.assert_array_equal(np.asarray(materialize(xd)), np.asarray(xd))


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1"])
def test_materialized_relu_leaves_outputs_and_gradients_bitwise_unchanged(name, monkeypatch):
    """models use common.relu (materialised, for XLA:CPU speed); plain nn.relu must give the same bits."""
    import flax.linen as nn

    from ekd_jax.models import resnet, wrn

    model = models.create_model(name, num_classes=10)
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    variables = model.init(jax.random.key(1), x, train=False)

    def loss_and_grad():
        def loss(params):
            (logits, feats), _ = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(logits**2) + sum(jnp.sum(f) for f in feats[1:-1]), (logits, feats)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

    got = loss_and_grad()
    monkeypatch.setattr(resnet, "relu", nn.relu)
    monkeypatch.setattr(wrn, "relu", nn.relu)
    want = loss_and_grad()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)
