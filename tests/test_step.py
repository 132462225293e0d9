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
from ekd_jax import methods, parallel, step


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


def test_bfloat16_compute_keeps_float32_params():
    nets, tx, state, mesh = helpers.build(helpers.tiny_config("ekd", dtype="bfloat16"))
    state, metrics = helpers.run_steps(nets, tx, state, mesh, 2)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params))
    assert all(np.isfinite(m["loss"]) for m in metrics)


def test_lowres_native_student_runs_with_spatial_bridging():
    config = helpers.tiny_config("ekd", **{"data.student_downsample": 2, "data.lowres_mode": "native"})
    config.teacher.model = "resnet14"
    nets, tx, state, mesh = helpers.build(config, image_shape=(16, 16, 3))
    assert nets.student_input_shape == (8, 8, 3) and nets.teacher_input_shape == (16, 16, 3)
    state, metrics = helpers.run_steps(nets, tx, state, mesh, 2, image_shape=(16, 16, 3))
    assert all(np.isfinite(m["student/guided"]) for m in metrics)


@pytest.mark.parametrize(
    "method,overrides,match",
    [
        ("kd", {"teacher.checkpoint": ""}, "teacher.checkpoint"),
        ("ekd", {"guided.stages": (0, 3)}, r"stage index \[3\] out of range.*3 stage pairs"),
        ("fitnet", {"guided.hint_stage": 7}, "out of range"),
        ("ekdd", {}, "unknown method 'ekdd'. Did you mean 'ekd'"),
        ("ekd", {"loss.stage_weights": (1.0, 2.0)}, "stage_weights has 2 entries but 3"),
        ("ekd", {"guided.type": "bogus"}, "unknown guided module kind"),
        ("ekd", {"dtype": "float16"}, "unknown dtype"),
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
    nets, tx, state0, mesh = helpers.build(config, student_start=h, teacher_lr=0.1)
    train_step, _ = step.compile_steps(nets, tx, mesh)
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
    ref_step, _ = step.compile_steps(ref_nets, ref_tx, mesh)
    same = jax.tree_util.tree_map(jnp.copy, state)  # train_step donates its input state
    ref_state = ref_state.replace(
        step=same.step,
        params={**ref_state.params, "teacher": same.params["teacher"]},
        batch_stats={**ref_state.batch_stats, "teacher": same.batch_stats["teacher"]},
    )
    after, _ = train_step(state, batch(h), h)
    ref_after, _ = ref_step(ref_state, batch(h))
    for g in ("student", "guide"):
        assert _any_nonzero(jax.tree_util.tree_map(jnp.subtract, after.params[g], state0.params[g]))
        chex.assert_trees_all_equal(after.params[g], ref_after.params[g])
        chex.assert_trees_all_equal(after.batch_stats[g], ref_after.batch_stats[g])


def test_during_the_head_start_the_teacher_learns_alone():
    """DML's teacher would learn from the waiting student's logits: during the head start it must
    not. Its trajectory equals a 'teacher'-only run's; the student's metrics read 0."""
    h = 3
    nets, tx, state, mesh = helpers.build(helpers.tiny_config("dml"), student_start=h, teacher_lr=0.1)
    ref_nets, ref_tx, ref_state, _ = helpers.build(helpers.tiny_config("teacher"), teacher_lr=0.1)
    state, m = helpers.run_steps(nets, tx, state, mesh, h)
    ref_state, ref_m = helpers.run_steps(ref_nets, ref_tx, ref_state, mesh, h)
    # Equal up to last-bit rounding of two different programs (a DML term from the student's
    # logits at weight 1 would move the teacher by ~lr * grad, about 1e-3 here).
    chex.assert_trees_all_close(state.params["teacher"], ref_state.params["teacher"], rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(state.batch_stats["teacher"], ref_state.batch_stats["teacher"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose([x["teacher/ce"] for x in m], [x["teacher/ce"] for x in ref_m], rtol=1e-6)
    assert all(x["teacher/dml"] == 0 and x["student/ce"] == 0 for x in m)


@pytest.mark.parametrize("method", ["vanilla", "kd", "teacher"])
def test_head_start_needs_an_online_teacher(method):
    with pytest.raises(ValueError, match="head start needs a teacher that learns online"):
        helpers.build(helpers.tiny_config(method), student_start=3)


def test_stage_pairing_when_counts_differ():
    from ekd_jax.guided import pair_stages

    assert pair_stages(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert pair_stages(4, 3) == [(0, 0), (2, 1), (3, 2)]  # MobileNetV2-like student, ResNet teacher
    assert pair_stages(3, 4) == [(0, 0), (1, 2), (2, 3)]
    assert pair_stages(1, 4) == [(0, 3)]


def test_transfer_ramp():
    cfg = methods.LossConfig(ramp_start=0.1, ramp_length=0.4)
    w = [float(methods.transfer_weight(cfg, jnp.asarray(p))) for p in (0.0, 0.1, 0.3, 0.5, 0.9)]
    np.testing.assert_allclose(w, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    # The KD term follows the same ramp unless it has its own.
    kd = [float(methods.transfer_weight(cfg, jnp.asarray(p), "kd")) for p in (0.0, 0.3)]
    np.testing.assert_allclose(kd, [0.0, 0.5], atol=1e-6)
    own = methods.LossConfig(ramp_start=0.5, ramp_length=0.2, kd_ramp_start=0.0, kd_ramp_length=0.0)
    assert float(methods.transfer_weight(own, jnp.asarray(0.0), "kd")) == 1.0
    assert float(methods.transfer_weight(own, jnp.asarray(0.0), "features")) == 0.0


def test_transfer_masks():
    labels = jnp.asarray([0, 1, 2])
    teacher = jnp.log(jnp.asarray([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8]]))
    student = jnp.log(jnp.asarray([[0.2, 0.7, 0.1], [0.1, 0.6, 0.3], [0.1, 0.1, 0.8]]))
    o = methods.Outputs(labels=labels, teacher_logits=teacher, student_logits=student)
    mask = lambda kind: methods._mask(methods.LossConfig(transfer_mask=kind), o)  # noqa: E731
    assert mask("none") is None
    np.testing.assert_array_equal(mask("teacher_correct"), [1.0, 0.0, 1.0])
    # p_T(y) - p_S(y), floored at 0: ahead by 0.5 on sample 0, behind on 1, level on 2.
    np.testing.assert_allclose(mask("teacher_ahead"), [0.5, 0.0, 0.0], atol=1e-6)
    # A weight, not a target: no gradient flows through it to either network's logits.
    g = jax.grad(lambda t, s: jnp.sum(methods._mask(methods.LossConfig(transfer_mask="teacher_ahead"),
                                                     methods.Outputs(labels, t, student_logits=s))), (0, 1))
    assert _all_zero(g(teacher, student))


def test_teacher_ahead_mask_trains():
    config = helpers.tiny_config("ekd", **{"loss.transfer_mask": "teacher_ahead"})
    nets, tx, state, mesh = helpers.build(config)
    _, metrics = helpers.run_steps(nets, tx, state, mesh, 2)
    assert all(np.isfinite(m["loss"]) for m in metrics)


MULTI_DEVICE_SCRIPT = r"""
import os, sys
sys.path.insert(0, os.environ["TESTS_DIR"])
import jax, numpy as np
jax.config.update("jax_disable_most_optimizations", True)
import helpers
from ekd_jax import parallel
assert len(jax.devices()) == 8, jax.devices()
for method in ("ekd", "kd"):
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


def test_eight_devices_equal_one():
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env["TESTS_DIR"] = str(pathlib.Path(__file__).parent)
    env["JAX_PLATFORMS"] = "cpu"
    r = subprocess.run([sys.executable, "-c", MULTI_DEVICE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
