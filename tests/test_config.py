"""Resume/reuse decisions compare a run's stored config with the current one."""

import json

from ekd_jax.config import base_config, config_difference


def _json(c):
    return json.loads(c.to_json_best_effort())


def test_config_difference_names_changed_keys():
    a = base_config()
    b = base_config()
    assert config_difference(_json(a), _json(b)) == []
    b.loss.alpha = 0.5
    b.student.model = "resnet14"
    assert config_difference(_json(a), _json(b)) == ["loss.alpha", "student.model"]


def test_switch_added_after_the_run_is_not_a_difference_at_its_default():
    stored = _json(base_config())
    del stored["loss"]["kd_ramp_start"]  # as written by a run from before the switch existed
    current = base_config()
    assert config_difference(stored, _json(current)) == []
    current.loss.kd_ramp_start = 0.0  # ... but asking for a non-default value is one
    assert config_difference(stored, _json(current)) == ["loss.kd_ramp_start"]
    # A key the current config lacks (removed since) is always a difference.
    stored["loss"]["retired_switch"] = 1
    assert "loss.retired_switch" in config_difference(stored, _json(base_config()))


def test_a_switch_whose_default_changed_compares_against_the_old_behaviour():
    stored = _json(base_config())
    del stored["teacher"]["head_start"]  # a run from before the switch: no head start
    current = base_config()
    current.teacher.head_start = 0.0
    assert config_difference(stored, _json(current)) == []
    current.teacher.head_start = 1.0
    assert config_difference(stored, _json(current)) == ["teacher.head_start"]


def test_default_is_the_paper_s_simultaneous_start():
    """METHOD.md, "What the paper states", item 1: the default EKD has no teacher head start."""
    c = base_config()
    assert c.method == "ekd" and c.teacher.head_start == 0.0


def test_switches_added_with_a_new_default_keep_old_runs_apart():
    """Runs from before loss.mask_mean / guided.aux_teacher_backbone_grad ran with the batch mean
    and with the teacher-side heads training the backbone: resumed only under that behaviour."""
    stored = _json(base_config())
    del stored["loss"]["mask_mean"], stored["guided"]["aux_teacher_backbone_grad"]
    current = base_config()
    assert config_difference(stored, _json(current)) == ["guided.aux_teacher_backbone_grad", "loss.mask_mean"]
    current.loss.mask_mean, current.guided.aux_teacher_backbone_grad = "batch", True
    assert config_difference(stored, _json(current)) == []
