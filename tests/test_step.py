"""The joint train step: stop-gradients, frozen groups, no retracing, errors before compiling."""

import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from ekd_jax import losses, methods, parallel, step
from ekd_jax.spec import LossSpec


def _grad_of_terms(nets, state, who, batch_index=0):
    """Gradient w.r.t. all params of the sum of the method's terms meant for ``who``."""
    b = helpers.fake_batch(batch_index)
    batch = {"image": jnp.asarray(b["image"]), "label": jnp.asarray(b["label"]), "rng": state.rng}

    def f(params):
        terms, _ = step.loss_terms(nets, params, state.batch_stats, batch, jnp.asarray(5, jnp.int32))
        return sum(v for k, v in terms.items() if k.startswith(who + "/"))

    return jax.jit(jax.grad(f))(state.params)


def _all_zero(tree):
    return all(bool(jnp.all(x == 0)) for x in jax.tree_util.tree_leaves(tree))


def _any_nonzero(tree):
    return any(bool(jnp.any(x != 0)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("guide_type", ["adapter", "aux_head"])
def test_student_terms_give_exactly_zero_gradient_to_teacher(guide_type):
    config = helpers.tiny_config("ekd", **{"guided.type": guide_type})
    nets, tx, state, _ = helpers.build(config)
    g = _grad_of_terms(nets, state, "student")
    assert _all_zero(g["teacher"])
    assert _any_nonzero(g["student"]) and _any_nonzero(g["guide"])
    # And the teacher's own terms do move the teacher.
    assert _any_nonzero(_grad_of_terms(nets, state, "teacher")["teacher"])


def test_coevolution_switch_lets_student_terms_reach_teacher():
    config = helpers.tiny_config("ekd", **{"loss.coevolution": True})
    nets, tx, state, _ = helpers.build(config)
    assert _any_nonzero(_grad_of_terms(nets, state, "student")["teacher"])


def test_dml_terms_are_one_way_each():
    nets, tx, state, _ = helpers.build(helpers.tiny_config("dml"))
    assert _all_zero(_grad_of_terms(nets, state, "student")["teacher"])
    assert _all_zero(_grad_of_terms(nets, state, "teacher")["student"])


@pytest.mark.parametrize("method", ["kd", "fitnet", "at"])
def test_frozen_teacher_is_bitwise_unchanged(method):
    nets, tx, state, mesh = helpers.build(helpers.tiny_config(method))
    before = jax.device_get({"p": state.params["teacher"], "s": state.batch_stats["teacher"]})
    student_before = jax.device_get(state.params["student"])
    state, metrics = helpers.run_steps(nets, tx, state, mesh, 3)
    after = jax.device_get({"p": state.params["teacher"], "s": state.batch_stats["teacher"]})
    chex.assert_trees_all_equal(before, after)  # exact, bitwise
    assert _any_nonzero(jax.tree_util.tree_map(lambda a, b: a - b, jax.device_get(state.params["student"]), student_before))
    assert int(state.step) == 3
    assert all(np.isfinite(m["loss"]) for m in metrics)


@pytest.mark.parametrize(
    "method,groups",
    [
        ("vanilla", {"student"}),
        ("teacher", {"teacher"}),
        ("dml", {"teacher", "student"}),
        ("ekd", {"teacher", "student", "guide"}),
    ],
)
def test_exactly_the_trainable_groups_change(method, groups):
    nets, tx, state, mesh = helpers.build(helpers.tiny_config(method))
    before = jax.device_get(state.params)
    stats_before = jax.device_get(state.batch_stats)
    state, _ = helpers.run_steps(nets, tx, state, mesh, 2)
    after = jax.device_get(state.params)
    for g in ("teacher", "student", "guide"):
        changed = _any_nonzero(jax.tree_util.tree_map(lambda a, b: a - b, after[g], before[g]))
        assert changed == (g in groups), (method, g)
    if "teacher" not in groups:
        chex.assert_trees_all_equal(jax.device_get(state.batch_stats)["teacher"], stats_before["teacher"])


def test_step_does_not_retrace(monkeypatch):
    monkeypatch.setattr(step, "_train_step", chex.assert_max_traces(step._train_step, n=1))
    nets, tx, state, mesh = helpers.build(helpers.tiny_config("ekd"))
    state, _ = helpers.run_steps(nets, tx, state, mesh, 4)
    assert int(state.step) == 4


def _matmul_operand_dtypes(jaxpr) -> list[tuple[str, tuple[str, ...]]]:
    """(primitive, operand dtypes) of every convolution and dot in a jaxpr, sub-jaxprs included."""
    import jax.extend.core as jex

    found = []

    def walk(j):
        for e in j.eqns:
            if e.primitive.name in ("conv_general_dilated", "dot_general"):
                found.append((e.primitive.name, tuple(str(v.aval.dtype) for v in e.invars)))
            for v in e.params.values():
                for sub in v if isinstance(v, (tuple, list)) else (v,):
                    if isinstance(sub, jex.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jex.Jaxpr):
                        walk(sub)

    walk(jaxpr.jaxpr)
    return found


@pytest.mark.parametrize("guide_type", ["adapter", "aux_head"])
def test_bfloat16_computes_in_bfloat16_and_keeps_float32_params(guide_type):
    """dtype=bfloat16: every convolution and matmul of the train step (forward and backward, teacher,
    student and guided modules) takes bfloat16 operands, while the loss, the gradients, the params,
    the BN statistics and the optimizer state are float32. float32 is the control: the same ops, in f32."""
    b = helpers.fake_batch(0)
    ops = {}
    for dtype in ("float32", "bfloat16"):
        nets, tx, state, mesh = helpers.build(helpers.tiny_config("ekd", dtype=dtype, **{"guided.type": guide_type}))
        batch = {"image": jnp.asarray(b["image"]), "label": jnp.asarray(b["label"]), "rng": state.rng}

        def loss(params):
            terms, _ = step.loss_terms(nets, params, state.batch_stats, batch, jnp.asarray(5, jnp.int32))
            return sum(terms.values())

        jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(state.params)
        ops[dtype] = _matmul_operand_dtypes(jaxpr)
        assert {str(v.aval.dtype) for v in jaxpr.jaxpr.outvars} == {"float32"}  # loss and every gradient
    assert len(ops["float32"]) == len(ops["bfloat16"]) > 50
    assert {d for _, ds in ops["float32"] for d in ds} == {"float32"}
    assert {d for _, ds in ops["bfloat16"] for d in ds} == {"bfloat16"}
    assert {p for p, _ in ops["bfloat16"]} == {"conv_general_dilated", "dot_general"}
    if guide_type == "adapter":  # and training keeps the state float32
        state, metrics = helpers.run_steps(nets, tx, state, mesh, 2)
        for part in (state.params, state.batch_stats, state.opt_state):
            leaves = [x for x in jax.tree_util.tree_leaves(part) if jnp.issubdtype(x.dtype, jnp.floating)]
            assert leaves and {x.dtype for x in leaves} == {jnp.dtype(jnp.float32)}
        assert all(np.asarray(m["loss"]).dtype == np.float32 for m in metrics)


def _terms_and_outputs(nets, state, batch_index=0, image_shape=(8, 8, 3)):
    b = helpers.fake_batch(batch_index, image_shape=image_shape)
    batch = {"image": jnp.asarray(b["image"]), "label": jnp.asarray(b["label"]), "rng": state.rng}
    terms, (outputs, _) = step.loss_terms(nets, state.params, state.batch_stats, batch, jnp.asarray(5, jnp.int32))
    return terms, outputs


@pytest.mark.parametrize("norm", [False, True])
def test_relation_guided_term_is_the_relation_distance_of_the_adapter_outputs(norm):
    """feature_kind='relation': the guided term is beta x the sum over pairs of the batch-similarity
    distance between adapter output and teacher map (normalised first when feature_norm is on),
    not the map distance; its gradient reaches student and adapters, never the teacher."""
    config = helpers.tiny_config("ekd", **{"loss.feature_kind": "relation", "loss.feature_norm": norm,
                                           "loss.beta": 2.0, "guided.type": "adapter"})
    nets, tx, state, mesh = helpers.build(config)
    terms, o = _terms_and_outputs(nets, state)
    cfg = nets.loss_cfg
    prep = losses.l2_normalize_per_sample if norm else (lambda x: x)
    want = cfg.beta * sum(
        float(losses.relation_distance(prep(g), prep(ft), cfg.feature_reduction))
        for g, ft in zip(o.guide["student"], o.teacher_stages)
    )
    mapwise = cfg.beta * sum(
        float(losses.feature_distance(g, ft, norm, cfg.feature_reduction))
        for g, ft in zip(o.guide["student"], o.teacher_stages)
    )
    assert want > 0 and abs(want - mapwise) > 1e-3 * want
    np.testing.assert_allclose(float(terms["student/guided"]), want, rtol=1e-5)

    def guided(params):
        b = helpers.fake_batch(0, image_shape=(8, 8, 3))
        batch = {"image": jnp.asarray(b["image"]), "label": jnp.asarray(b["label"]), "rng": state.rng}
        return step.loss_terms(nets, params, state.batch_stats, batch, jnp.asarray(5, jnp.int32))[0]["student/guided"]

    g = jax.jit(jax.grad(guided))(state.params)
    assert _all_zero(g["teacher"]) and _any_nonzero(g["student"]) and _any_nonzero(g["guide"])


def test_lowres_native_student_runs_with_spatial_bridging():
    """A native x2 student (8x8 input, stage maps half the teacher's size): each adapter brings the
    student's map to the teacher map's full shape, the guided term is the feature distance of exactly
    those maps, and its gradient trains student and adapters (through the resize) but not the teacher."""
    config = helpers.tiny_config("ekd", **{"data.student_downsample": 2, "data.lowres_mode": "native",
                                           "guided.type": "adapter"})
    config.teacher.model = "resnet14"
    nets, tx, state, mesh = helpers.build(config, image_shape=(16, 16, 3))
    assert nets.student_input_shape == (8, 8, 3) and nets.teacher_input_shape == (16, 16, 3)
    terms, o = _terms_and_outputs(nets, state, image_shape=(16, 16, 3))
    assert len(o.guide["student"]) == len(o.teacher_stages) == 3
    for fs, g, ft in zip(o.student_stages, o.guide["student"], o.teacher_stages):
        assert fs.shape[1:3] == (ft.shape[1] // 2, ft.shape[2] // 2)
        assert g.shape == ft.shape
    cfg = nets.loss_cfg
    want = cfg.beta * sum(
        float(losses.feature_distance(g, ft, cfg.feature_norm, cfg.feature_reduction))
        for g, ft in zip(o.guide["student"], o.teacher_stages)
    )
    assert want > 0
    np.testing.assert_allclose(float(terms["student/guided"]), want, rtol=1e-5)

    def guided(params):
        b = helpers.fake_batch(0, image_shape=(16, 16, 3))
        batch = {"image": jnp.asarray(b["image"]), "label": jnp.asarray(b["label"]), "rng": state.rng}
        return step.loss_terms(nets, params, state.batch_stats, batch, jnp.asarray(5, jnp.int32))[0]["student/guided"]

    g = jax.jit(jax.grad(guided))(state.params)
    assert _all_zero(g["teacher"]) and _any_nonzero(g["student"]) and _any_nonzero(g["guide"])


@pytest.mark.parametrize(
    "method,overrides,match",
    [
        ("kd", {"teacher.checkpoint": ""}, "teacher.checkpoint"),
        ("ekd", {"guided.stages": (0, 3)}, r"\[3\] out of range, resnet8/resnet8 have 3 stage pairs"),
        ("fitnet", {"guided.hint_stage": 7}, "guided.hint_stage=7 is not valid: resnet8/resnet8 have 3 stage pairs"),
        ("ekdd", {}, "unknown method 'ekdd'. Did you mean 'ekd'"),
        ("ekd", {"loss.stage_weights": (1.0, 2.0)}, r"one weight per stage pair used \(3\)"),
        ("ekd", {"guided.type": "bogus"}, "guided.type='bogus' is not valid"),
        ("ekd", {"dtype": "float16"}, "dtype='float16' is not valid"),
    ],
)
def test_bad_combinations_fail_before_compiling(method, overrides, match, monkeypatch):
    def no_compile(*a, **k):
        raise AssertionError("compiled before validating")

    monkeypatch.setattr(jax, "jit", no_compile)
    config = helpers.tiny_config(method, **overrides)
    with pytest.raises(ValueError, match=match):
        helpers.build(config)


def test_teacher_head_start_waits_then_starts_fresh():
    """During the head start only the teacher learns; the student and guides then start exactly as
    a run without one would (same SGD state, same first update), while the teacher keeps its lead."""
    config = helpers.tiny_config("ekd")
    h = 2
    nets, tx, state0, mesh = helpers.build(config, student_start=h)
    train_step = step.compile_steps(nets, tx, mesh).train
    batch = lambda i: parallel.shard_batch(helpers.fake_batch(i), mesh)  # noqa: E731
    state = jax.tree_util.tree_map(jnp.copy, state0)
    for i in range(h):
        state, _ = train_step(state, batch(i), i)
        assert _any_nonzero(jax.tree_util.tree_map(jnp.subtract, state.params["teacher"], state0.params["teacher"]))
    for g in ("student", "guide"):  # untouched: params, BN statistics
        chex.assert_trees_all_equal(state.params[g], state0.params[g])
        chex.assert_trees_all_equal(state.batch_stats[g], state0.batch_stats[g])
    # The student's first update equals that of a run without a head start whose teacher is at the
    # same point: fresh SGD state (no momentum), the same batch and step key (tiny_config has no ramps
    # and a constant learning rate, so only the optimizer state could differ).
    ref_nets, ref_tx, ref_state, _ = helpers.build(config)
    ref_step = step.compile_steps(ref_nets, ref_tx, mesh).train
    same = jax.tree_util.tree_map(jnp.copy, state)  # train_step donates its input state
    ref_state = ref_state.replace(
        step=same.step,
        params={**ref_state.params, "teacher": same.params["teacher"]},
        batch_stats={**ref_state.batch_stats, "teacher": same.batch_stats["teacher"]},
    )
    after, _ = train_step(state, batch(h), h)
    ref_after, _ = ref_step(ref_state, batch(h), h)
    for g in ("student", "guide"):
        assert _any_nonzero(jax.tree_util.tree_map(jnp.subtract, after.params[g], state0.params[g]))
        chex.assert_trees_all_equal(after.params[g], ref_after.params[g])
        chex.assert_trees_all_equal(after.batch_stats[g], ref_after.batch_stats[g])


def test_during_the_head_start_the_teacher_learns_alone():
    """DML's teacher would learn from the waiting student's logits: during the head start it must
    not. Its trajectory equals a 'teacher'-only run's; no student term is reported at all."""
    h = 3
    nets, tx, state, mesh = helpers.build(helpers.tiny_config("dml"), student_start=h)
    ref_nets, ref_tx, ref_state, _ = helpers.build(helpers.tiny_config("teacher"))
    state, m = helpers.run_steps(nets, tx, state, mesh, h)
    ref_state, ref_m = helpers.run_steps(ref_nets, ref_tx, ref_state, mesh, h)
    # Equal up to last-bit rounding of two different programs (a DML term from the student's
    # logits at weight 1 would move the teacher by ~lr * grad, about 1e-3 here).
    chex.assert_trees_all_close(state.params["teacher"], ref_state.params["teacher"], rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(state.batch_stats["teacher"], ref_state.batch_stats["teacher"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose([x["teacher/ce"] for x in m], [x["teacher/ce"] for x in ref_m], rtol=1e-6)
    assert all(set(x) == {"loss", "teacher/ce", "teacher/train_top1"} for x in m)


@pytest.mark.parametrize("method", ["vanilla", "kd", "teacher"])
def test_a_head_start_is_ignored_without_an_online_teacher(method):
    """teacher.head_start applies to methods whose teacher learns next to the student (ekd, dml): for the
    others the one build gives no teacher-only steps and no head-start program."""
    nets, tx, state, mesh = helpers.build(helpers.tiny_config(method, **{"teacher.head_start": 0.5}))
    assert nets.student_start == 0 and set(step.compile_steps(nets, tx, mesh).programs) == {"joint", "eval"}


def test_stage_pairing_when_counts_differ():
    from ekd_jax.guided import pair_stages

    assert pair_stages(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert pair_stages(4, 3) == [(0, 0), (2, 1), (3, 2)]  # MobileNetV2-like student, ResNet teacher
    assert pair_stages(3, 4) == [(0, 0), (1, 2), (2, 3)]
    assert pair_stages(1, 4) == [(0, 3)]


def test_transfer_ramp():
    cfg = LossSpec(ramp_start=0.1, ramp_length=0.4)
    w = [float(methods.transfer_weight(cfg, jnp.asarray(p))) for p in (0.0, 0.1, 0.3, 0.5, 0.9)]
    np.testing.assert_allclose(w, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    # The KD term follows the same ramp unless it has its own.
    kd = [float(methods.transfer_weight(cfg, jnp.asarray(p), "kd")) for p in (0.0, 0.3)]
    np.testing.assert_allclose(kd, [0.0, 0.5], atol=1e-6)
    own = LossSpec(ramp_start=0.5, ramp_length=0.2, kd_ramp_start=0.0, kd_ramp_length=0.0)
    assert float(methods.transfer_weight(own, jnp.asarray(0.0), "kd")) == 1.0
    assert float(methods.transfer_weight(own, jnp.asarray(0.0), "features")) == 0.0


def test_transfer_masks():
    labels = jnp.asarray([0, 1, 2])
    teacher = jnp.log(jnp.asarray([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8]]))
    student = jnp.log(jnp.asarray([[0.2, 0.7, 0.1], [0.1, 0.6, 0.3], [0.1, 0.1, 0.8]]))
    o = methods.Outputs(labels=labels, teacher_logits=teacher, student_logits=student)
    mask = lambda kind: methods._mask(LossSpec(transfer_mask=kind), o)  # noqa: E731
    assert mask("none") is None
    np.testing.assert_array_equal(mask("teacher_correct"), [1.0, 0.0, 1.0])
    # p_T(y) - p_S(y), floored at 0: ahead by 0.5 on sample 0, behind on 1, level on 2.
    np.testing.assert_allclose(mask("teacher_ahead"), [0.5, 0.0, 0.0], atol=1e-6)
    # A weight, not a target: no gradient flows through it to either network's logits.
    g = jax.grad(lambda t, s: jnp.sum(methods._mask(LossSpec(transfer_mask="teacher_ahead"),
                                                     methods.Outputs(labels, t, student_logits=s))), (0, 1))
    assert _all_zero(g(teacher, student))


def test_masked_terms_average_over_the_kept_samples():
    """loss.mask_mean='kept': a masked term is the mean over the samples the mask keeps, so it does
    not shrink as the teacher gets fewer samples of the batch right; 'batch' is the whole-batch mean."""
    from ekd_jax import losses

    rng = np.random.default_rng(0)
    s, t = jnp.asarray(rng.normal(size=(6, 4))), jnp.asarray(rng.normal(size=(6, 4)))
    fs, ft = jnp.asarray(rng.normal(size=(6, 2, 2, 3))), jnp.asarray(rng.normal(size=(6, 2, 2, 3)))
    keep = jnp.asarray([1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    kl_each = np.array([float(losses.kl_divergence(s[i:i + 1], t[i:i + 1], 2.0)) for i in range(6)])
    fd_each = np.array([float(losses.feature_distance(fs[i:i + 1], ft[i:i + 1], True, "sum")) for i in range(6)])
    np.testing.assert_allclose(losses.kl_divergence(s, t, 2.0, keep, "kept"), (kl_each[0] + kl_each[2]) / 2, rtol=1e-5)
    np.testing.assert_allclose(losses.kl_divergence(s, t, 2.0, keep, "batch"), (kl_each[0] + kl_each[2]) / 6, rtol=1e-5)
    np.testing.assert_allclose(losses.feature_distance(fs, ft, True, "sum", keep, "kept"), (fd_each[0] + fd_each[2]) / 2, rtol=1e-5)
    # Weights summing to less than one sample are not inflated: sum(w x) / max(sum w, 1).
    small = jnp.asarray([0.25, 0.0, 0.25, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(losses.kl_divergence(s, t, 2.0, small, "kept"), 0.25 * (kl_each[0] + kl_each[2]), rtol=1e-5)
    # Nothing kept: the term is exactly zero (no division by zero).
    assert float(losses.kl_divergence(s, t, 2.0, jnp.zeros(6), "kept")) == 0.0
    assert float(losses.weighted_mean(jnp.arange(6.0), jnp.ones(6), "kept")) == 2.5  # all kept = batch mean
    with pytest.raises(ValueError, match="loss.mask_mean='avg' is not valid"):
        helpers.build(helpers.tiny_config("ekd", **{"loss.mask_mean": "avg"}))


@pytest.mark.parametrize("backbone_grad", [False, True])
def test_aux_head_teacher_heads_train_the_backbone_only_when_asked(backbone_grad):
    """guided.aux_teacher_backbone_grad: the teacher-side heads' label CE reaches the teacher backbone
    only when switched on (default off: extra supervision no baseline gets); the heads learn either way."""
    config = helpers.tiny_config("ekd", **{"guided.type": "aux_head", "guided.aux_teacher_backbone_grad": backbone_grad})
    nets, tx, state, _ = helpers.build(config)
    b = helpers.fake_batch(0)
    batch = {"image": jnp.asarray(b["image"]), "label": jnp.asarray(b["label"]), "rng": state.rng}

    def aux_ce(params):
        terms, _ = step.loss_terms(nets, params, state.batch_stats, batch, jnp.asarray(5, jnp.int32))
        return terms["teacher/aux_ce"]

    g = jax.jit(jax.grad(aux_ce))(state.params)
    heads = {k: v for k, v in g["guide"].items() if k.startswith("teacher_head")}
    assert heads and _any_nonzero(heads)
    assert _any_nonzero(g["teacher"]) == backbone_grad
    assert _all_zero(g["student"])


def test_teacher_ahead_mask_weights_the_transfer_terms():
    """transfer_mask='teacher_ahead' inside the step: the KD and guided terms are the per-sample terms
    weighted by max(0, p_T(y) - p_S(y)) from the step's own logits, averaged over the kept weight."""
    config = helpers.tiny_config("ekd", **{"loss.transfer_mask": "teacher_ahead", "guided.type": "adapter"})
    nets, tx, state, mesh = helpers.build(config)
    cfg = nets.loss_cfg
    terms, o = _terms_and_outputs(nets, state)
    y = np.asarray(o.labels)

    def p_true(z):
        p = np.exp(np.asarray(z, np.float64) - np.asarray(z, np.float64).max(-1, keepdims=True))
        return (p / p.sum(-1, keepdims=True))[np.arange(len(y)), y]

    w = np.maximum(p_true(o.teacher_logits) - p_true(o.student_logits), 0.0)
    assert 0 < np.count_nonzero(w) < len(w)  # some samples transfer, some do not: the mask matters
    ws = jnp.asarray(w, jnp.float32)
    kd = cfg.alpha * float(losses.kl_divergence(o.student_logits, o.teacher_logits, cfg.tau, ws, cfg.mask_mean))
    guided = cfg.beta * sum(
        float(losses.feature_distance(g, ft, cfg.feature_norm, cfg.feature_reduction, ws, cfg.mask_mean))
        for g, ft in zip(o.guide["student"], o.teacher_stages)
    )
    np.testing.assert_allclose(float(terms["student/kd"]), kd, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(float(terms["student/guided"]), guided, rtol=1e-4, atol=1e-7)
    unmasked = float(losses.kl_divergence(o.student_logits, o.teacher_logits, cfg.tau))
    assert abs(float(terms["student/kd"]) - cfg.alpha * unmasked) > 1e-3 * cfg.alpha * unmasked


MULTI_DEVICE_SCRIPT = r"""
import os, sys
sys.path.insert(0, os.environ["TESTS_DIR"])
import jax, numpy as np
# XLA's optimisations ON (unlike conftest): the partitioned program users run is the one compared.
jax.config.update("jax_disable_most_optimizations", False)
import helpers
from ekd_jax import parallel
assert len(jax.devices()) == 8, jax.devices()
method = os.environ["METHOD"]
out = {}
for n in (1, 8):
    mesh = parallel.make_mesh(jax.devices()[:n])
    # lr 0.01: at 0.05 the KD+guided student amplifies float reordering (each term alone agrees
    # to 1e-8 at 0.05 too); the comparison is about the partitioning, not chaotic dynamics.
    config = helpers.tiny_config(method, **{"optimizer.learning_rate": 0.01})
    nets, tx, state, mesh = helpers.build(config, mesh=mesh)
    assert state.params["student"]["fc"]["kernel"].sharding.num_devices == n
    state, metrics = helpers.run_steps(nets, tx, state, mesh, 3, batch_size=16)
    out[n] = (jax.device_get(state.params), jax.device_get(state.batch_stats), metrics)
for part in (0, 1):
    for g in out[1][part]:
        a = np.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(out[1][part][g])] or [np.zeros(1)])
        b = np.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(out[8][part][g])] or [np.zeros(1)])
        rel = np.linalg.norm(a - b) / (np.linalg.norm(a) + 1e-12)
        assert rel < 1e-5, (method, part, g, rel)
for m1, m8 in zip(out[1][2], out[8][2]):
    for k in m1:
        # KL terms are small differences of logs: compare them absolutely, the total relatively.
        np.testing.assert_allclose(m1[k], m8[k], rtol=1e-5, atol=0 if k == "loss" else 2e-6, err_msg=f"{method} {k}")
print("OK")
"""


@pytest.mark.parametrize("method", ["ekd", "kd"])  # the online joint step, and a frozen teacher's
def test_eight_devices_equal_one(method):
    env = dict(os.environ, METHOD=method)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env["TESTS_DIR"] = str(pathlib.Path(__file__).parent)
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "0"
    r = subprocess.run([sys.executable, "-c", MULTI_DEVICE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


def test_xla_optimisations_leave_the_step_unchanged(xla_optimizations):
    """conftest compiles the suite with most XLA optimisations off; users run them on. The same steps
    compiled both ways give the same training trajectory up to float reordering (as 1 vs 8 devices)."""
    out = {}
    for disabled in (True, False):
        jax.config.update("jax_disable_most_optimizations", disabled)
        config = helpers.tiny_config("ekd", **{"optimizer.learning_rate": 0.01})
        nets, tx, state, mesh = helpers.build(config)
        state, metrics = helpers.run_steps(nets, tx, state, mesh, 3)
        out[disabled] = (jax.device_get(state.params), jax.device_get(state.batch_stats), metrics)
    rels = []
    for part in (0, 1):
        for g in ("teacher", "student", "guide"):
            a = np.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(out[True][part][g])])
            b = np.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(out[False][part][g])])
            rels.append(np.linalg.norm(a - b) / np.linalg.norm(a))
            assert rels[-1] < 1e-5, (part, g, rels[-1])
    # The two compiles really are different programs (LLVM at -O0 vs optimised: ~3e-8 apart here),
    # else this would compare a program with itself, and the fixture would not do what it says.
    assert max(rels) > 0
    for m_off, m_on in zip(out[True][2], out[False][2]):
        for k in m_off:
            np.testing.assert_allclose(m_off[k], m_on[k], rtol=1e-5, atol=0 if k == "loss" else 2e-6, err_msg=k)


def test_precompile_compiles_every_program_before_the_first_step():
    """With a head start the joint program is first needed after it: precompile builds it (and the
    head-start and eval programs) up front, so a program that cannot compile or fit fails before
    training; the compiled programs are then the ones the steps run."""
    nets, tx, state, mesh = helpers.build(helpers.tiny_config("ekd"), student_start=2)
    steps = step.compile_steps(nets, tx, mesh)
    assert set(steps.programs) == {"joint", "head", "eval"}
    chunk = helpers.fake_chunk(range(2), mesh)  # K = 2 steps per call
    steps.precompile(state, chunk, {}, 8, (8, 8, 3))
    assert all(isinstance(p, jax.stages.Compiled) for p in steps.programs.values())
    # head (2 steps), then joint (1 step of a call): each runs its precompiled program (a shape mismatch would raise)
    state, m = steps.train_chunk(state, chunk, 0, 2)
    assert "student/ce" not in m and int(state.step) == 2
    state, m = steps.train_chunk(state, chunk, 2, 1)
    assert "student/ce" in m and int(state.step) == 3 and float(m["student/ce"][1]) == 0.0  # step 2 of the call: not run


def test_k_steps_per_call_give_bitwise_the_steps_one_per_call():
    """The training program runs any number of steps up to its K through one loop body: three steps in one call,
    in calls of 2 + 1, and one per call end bitwise alike (parameters, BN statistics, optimizer state, metrics)."""
    config = helpers.tiny_config("ekd", **{"optimizer.learning_rate": 0.01})
    nets, tx, state, mesh = helpers.build(config)
    steps = step.compile_steps(nets, tx, mesh)
    runs = {}
    for name, calls in {"3": [(0, 3)], "2+1": [(0, 2), (2, 3)], "1+1+1": [(0, 1), (1, 2), (2, 3)]}.items():
        s, ms = jax.tree_util.tree_map(jnp.copy, state), []
        for a, b in calls:
            s, m = steps.train_chunk(s, helpers.fake_chunk(range(a, b), mesh), a, b - a)
            m = jax.device_get(m)
            ms += [{k: v[i] for k, v in m.items()} for i in range(b - a)]
        runs[name] = (jax.device_get(s), ms)
    for name in ("2+1", "1+1+1"):
        chex.assert_trees_all_equal(runs[name][0], runs["3"][0])
        assert runs[name][1] == runs["3"][1], name
