"""ekd_jax.losses against hand-written NumPy formulas (float64) on random inputs, and their gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ekd_jax import losses

RTOL = 1e-5  # float32 computation against a float64 reference


def _rng(seed=0):
    return np.random.default_rng(seed)


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _np_weighted_mean(x, w, over):
    if w is None:
        return x.mean()
    if over == "kept":
        return (w * x).sum() / max(w.sum(), 1.0)
    return (w * x).mean()


def _np_kl(s, t, tau, w=None, over="kept"):
    log_ps, log_pt = _log_softmax(s / tau), _log_softmax(t / tau)
    per = (np.exp(log_pt) * (log_pt - log_ps)).sum(-1)
    return _np_weighted_mean(per, w, over) * tau**2


def _np_l2n(f, eps=1e-12):
    flat = np.asarray(f, np.float64).reshape(len(f), -1)
    return (flat / np.sqrt((flat**2).sum(-1, keepdims=True) + eps)).reshape(f.shape)


def _np_attention(f, p):
    a = (np.abs(np.asarray(f, np.float64)) ** p).mean(-1).reshape(len(f), -1)
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def _f32(x):
    return jnp.asarray(np.asarray(x, np.float32))


# A batch weighting that keeps some samples fully, one partly and drops the rest.
WEIGHTS = np.array([1.0, 0.0, 0.5, 1.0, 0.0, 0.0])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy(smoothing):
    rng = _rng(1)
    z, y = rng.normal(size=(6, 5)) * 3, rng.integers(0, 5, 6)
    targets = np.eye(5)[y] * (1 - smoothing) + smoothing / 5
    want = -(targets * _log_softmax(z)).sum(-1).mean()
    got = losses.cross_entropy(_f32(z), jnp.asarray(y), smoothing)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), want, rtol=RTOL)
    # d/dz of the mean CE is (softmax(z) - targets) / N.
    g = jax.grad(lambda z: losses.cross_entropy(z, jnp.asarray(y), smoothing))(_f32(z))
    np.testing.assert_allclose(g, (np.exp(_log_softmax(z)) - targets) / 6, rtol=1e-4, atol=1e-7)


def test_losses_compute_in_float32_from_bfloat16_inputs():
    rng = _rng(2)
    z = jnp.asarray(rng.normal(size=(4, 7)), jnp.bfloat16)
    y = jnp.asarray(rng.integers(0, 7, 4))
    got = losses.cross_entropy(z, y)
    assert got.dtype == jnp.float32
    # Exactly the float32 computation on the (bf16-rounded) values: no bfloat16 arithmetic inside.
    assert float(got) == float(losses.cross_entropy(z.astype(jnp.float32), y))
    kl = losses.kl_divergence(z, z[::-1], 2.0)
    assert kl.dtype == jnp.float32
    assert float(kl) == float(losses.kl_divergence(z.astype(jnp.float32), z[::-1].astype(jnp.float32), 2.0))


@pytest.mark.parametrize("over", ["kept", "batch"])
def test_weighted_mean(over):
    x = _rng(3).normal(size=6)
    np.testing.assert_allclose(float(losses.weighted_mean(_f32(x))), x.mean(), rtol=RTOL)
    np.testing.assert_allclose(float(losses.weighted_mean(_f32(x), _f32(WEIGHTS), over)),
                               _np_weighted_mean(x, WEIGHTS, over), rtol=RTOL)
    # 'kept': the mean over the kept weight (2.5 here); 'batch': over all 6 samples.
    denominator = 2.5 if over == "kept" else 6.0
    np.testing.assert_allclose(float(losses.weighted_mean(_f32(x), _f32(WEIGHTS), over)),
                               (WEIGHTS * x).sum() / denominator, rtol=RTOL)


def test_weighted_mean_rejects_an_unknown_average():
    with pytest.raises(ValueError, match="unknown weighted mean 'all'"):
        losses.weighted_mean(jnp.ones(3), jnp.ones(3), "all")


@pytest.mark.parametrize("tau", [1.0, 4.0])
@pytest.mark.parametrize("weighted", [None, "kept", "batch"])
def test_kl_divergence(tau, weighted):
    rng = _rng(4)
    s, t = rng.normal(size=(6, 5)) * 2, rng.normal(size=(6, 5)) * 2
    w = WEIGHTS if weighted else None
    args = (_f32(w), weighted) if weighted else ()
    got = losses.kl_divergence(_f32(s), _f32(t), tau, *args)
    np.testing.assert_allclose(float(got), _np_kl(s, t, tau, w, weighted or "kept"), rtol=RTOL)
    assert float(losses.kl_divergence(_f32(s), _f32(s), tau)) == pytest.approx(0.0, abs=1e-6)
    if weighted is None:
        # Hinton's gradient: d/ds tau^2 KL = tau (softmax(s/tau) - softmax(t/tau)) / N.
        g = jax.grad(lambda s: losses.kl_divergence(s, _f32(t), tau))(_f32(s))
        want = tau * (np.exp(_log_softmax(s / tau)) - np.exp(_log_softmax(t / tau))) / 6
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-7)


def test_l2_normalize_per_sample():
    f = _rng(5).normal(size=(3, 2, 2, 4))
    got = np.asarray(losses.l2_normalize_per_sample(_f32(f)))
    np.testing.assert_allclose(got, _np_l2n(f), rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(got.reshape(3, -1), axis=-1), 1.0, rtol=1e-6)
    # The whole map of a sample is one vector: not per position or per channel.
    assert not np.allclose(np.linalg.norm(got, axis=-1), 1.0)
    zero = losses.l2_normalize_per_sample(jnp.zeros((2, 3)))
    np.testing.assert_array_equal(zero, 0.0)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [None, "kept", "batch"])
def test_feature_distance(normalize, reduction, weighted):
    rng = _rng(6)
    s, t = rng.normal(size=(6, 2, 3, 4)), rng.normal(size=(6, 2, 3, 4)) * 2
    a, b = (_np_l2n(s), _np_l2n(t)) if normalize else (s, t)
    sq = ((a - b) ** 2).reshape(6, -1)
    per = sq.mean(-1) if reduction == "mean" else sq.sum(-1)
    w = WEIGHTS if weighted else None
    want = _np_weighted_mean(per, w, weighted or "kept")
    args = (_f32(w), weighted) if weighted else ()
    got = losses.feature_distance(_f32(s), _f32(t), normalize, reduction, *args)
    np.testing.assert_allclose(float(got), want, rtol=RTOL)


def test_feature_distance_errors():
    with pytest.raises(ValueError, match="feature shapes differ"):
        losses.feature_distance(jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 4, 4, 5)))
    with pytest.raises(ValueError, match="unknown feature reduction 'max'"):
        losses.feature_distance(jnp.zeros((2, 3)), jnp.zeros((2, 3)), reduction="max")


def _np_similarity(f):
    a = f.reshape(f.shape[0], -1)
    g = a @ a.T
    return g / np.linalg.norm(g, axis=1, keepdims=True)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [None, "kept", "batch"])
def test_relation_distance(reduction, weighted):
    """Similarity-preserving distance against a float64 formula; maps of different channel counts
    and sizes are fine (only the N x N matrices meet); unweighted 'mean' is SP's ||G_S - G_T||^2 / N^2."""
    rng = _rng(16)
    s, t = rng.normal(size=(6, 2, 3, 4)), rng.normal(size=(6, 4, 4, 7))
    sq = (_np_similarity(s) - _np_similarity(t)) ** 2
    per = sq.mean(-1) if reduction == "mean" else sq.sum(-1)
    w = WEIGHTS if weighted else None
    want = _np_weighted_mean(per, w, weighted or "kept")
    args = (_f32(w), weighted) if weighted else ()
    got = losses.relation_distance(_f32(s), _f32(t), reduction, *args)
    np.testing.assert_allclose(float(got), want, rtol=RTOL)
    if reduction == "mean" and not weighted:
        np.testing.assert_allclose(float(got), np.sum(sq) / 36, rtol=RTOL)


def test_relation_distance_is_zero_for_rescaled_maps_and_errors():
    f = _rng(17).normal(size=(5, 3, 3, 2))
    # Row normalisation: a network whose maps are all 3x larger relates its samples the same way.
    assert float(losses.relation_distance(_f32(f), _f32(3 * f))) < 1e-10
    with pytest.raises(ValueError, match="batch sizes differ"):
        losses.relation_distance(jnp.zeros((2, 3)), jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match="unknown feature reduction 'max'"):
        losses.relation_distance(jnp.ones((2, 3)), jnp.ones((2, 3)), reduction="max")


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_attention_map(p):
    f = _rng(7).normal(size=(3, 4, 5, 6))
    got = np.asarray(losses.attention_map(_f32(f), p))
    assert got.shape == (3, 20)
    np.testing.assert_allclose(got, _np_attention(f, p), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_attention_transfer(p):
    rng = _rng(8)
    s, t = rng.normal(size=(3, 4, 4, 5)), rng.normal(size=(3, 4, 4, 7))  # channel counts may differ
    want = ((_np_attention(s, p) - _np_attention(t, p)) ** 2).mean()
    np.testing.assert_allclose(float(losses.attention_transfer(_f32(s), _f32(t), p)), want, rtol=RTOL)
    with pytest.raises(ValueError, match="attention maps differ in size"):
        losses.attention_transfer(_f32(s), _f32(t[:, :2]), p)


def test_attention_gradient_is_finite_on_an_all_zero_map():
    """A dead (all-zero) stage map: ||a|| = 0 and d||a|| is 0/0; safe_norm keeps the gradient finite."""
    t = _f32(_rng(9).normal(size=(2, 3, 3, 4)))
    zero = jnp.zeros((2, 3, 3, 4))
    g_map = jax.grad(lambda f: jnp.sum(losses.attention_map(f) * jnp.arange(9.0)))(zero)
    g_at = jax.grad(lambda f: losses.attention_transfer(f, t))(zero)
    assert np.all(np.isfinite(g_map)) and np.all(np.isfinite(g_at))
    # With p=2, d|f|^2/df = 2f is exactly 0 at f=0, so the whole gradient is exactly zero.
    np.testing.assert_array_equal(g_at, 0.0)
    np.testing.assert_array_equal(losses.attention_map(zero), 0.0)
    # A map that is zero in one sample only: that sample's gradient is zero, the other's is not.
    half = jnp.concatenate([jnp.zeros((1, 3, 3, 4)), t[:1]])
    g = np.asarray(jax.grad(lambda f: losses.attention_transfer(f, t))(half))
    assert np.all(np.isfinite(g)) and np.all(g[0] == 0) and np.any(g[1] != 0)


def test_topk_correct():
    rng = _rng(10)
    z = rng.normal(size=(20, 6))  # continuous: no ties
    y = rng.integers(0, 6, 20)
    y[:5] = z[:5].argmax(-1)  # some top-1 hits
    rank = (z > z[np.arange(20), y][:, None]).sum(-1)  # how many classes beat the label
    for k in (1, 3, 6):
        got = np.asarray(losses.topk_correct(_f32(z), jnp.asarray(y), k))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, (rank < k).astype(np.float32))
        assert k == 6 or 0 < got.sum() < 20  # hits and misses: the comparison is not vacuous
    # k beyond the class count is all classes: every label is "in the top k".
    np.testing.assert_array_equal(losses.topk_correct(_f32(z), jnp.asarray(y), 10), 1.0)
