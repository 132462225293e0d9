"""Resume/reuse decisions compare a run's stored config with the current one."""

import json

from ekd_jax.config import base_config
from ekd_jax.rundir import config_difference


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


def test_speed_only_options_are_never_a_difference():
    """steps_per_call, data.on_device and checkpoint_every_s change how fast a run goes, not its results: a run
    stopped under some values resumes under others (tests/test_train.py checks the result is bitwise the same)."""
    stored = _json(base_config())
    current = base_config()
    current.steps_per_call, current.data.on_device, current.checkpoint_every_s = 1, True, 0.0
    assert config_difference(stored, _json(current)) == []
    for key in ("steps_per_call", "checkpoint_every_s"):  # a run from before these options existed
        del stored[key]
    del stored["data"]["on_device"]
    assert config_difference(stored, _json(current)) == []
    current.batch_size = 32  # ... while an option that changes results still is one
    assert config_difference(stored, _json(current)) == ["batch_size"]


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


def _study(arg):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "study.py"
    spec = importlib.util.spec_from_file_location("study_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg), module


def test_study_scenarios_validate_and_few100_is_the_recorded_converged_budget():
    import pytest

    from ekd_jax.spec.validate import validate

    _, module = _study("few100")
    for arg in module.SCENARIOS:
        c = _study(arg)[0]
        if c.data.source.startswith("npz:"):  # the study's file is not here; everything else is checked
            c.data.source = "digits"
        validate(c)
    c = _study("few100")[0]
    assert (c.batch_size, c.num_epochs, c.data.samples_per_class) == (32, 90, 100)
    assert (c.teacher.model, c.student.model, c.teacher.head_start) == ("resnet20", "resnet8", 0.0)
    with pytest.raises(ValueError, match="unknown study scenario 'few10'"):
        _study("few10")


def test_study_few100_e60_is_the_budget_of_the_recorded_900_step_runs():
    """docs/results.md section 3: few100_e60 trains as the carried runs of the earlier budget did."""
    import pathlib

    study = pathlib.Path(__file__).resolve().parents[1] / "docs" / "study_runs" / "abl_few100.json"
    runs = json.loads(study.read_text("utf-8"))["runs"]
    c = _json(_study("few100_e60")[0])
    for run in ("vanilla", "dml", "teacher", "ekd_dml_feat"):
        stored = runs[run]["summary.json"]["config"]
        for key in ("batch_size", "num_epochs", "eval_every_epochs", "optimizer", "schedule", "teacher.model",
                    "student.model", "data.samples_per_class", "data.student_downsample"):
            node_s, node_c = stored, c
            for k in key.split("."):
                node_s, node_c = node_s[k], node_c[k]
            assert node_s == node_c, (run, key)
        assert stored["batch_size"] == 64 and stored["num_epochs"] == 60
