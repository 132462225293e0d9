"""Resume never loses work: another run's checkpoints are refused before any state is read and
stay where they are; only a checkpoint whose files fail to read is moved aside, and nothing is
ever deleted (an earlier moved-aside copy of the same step included)."""

import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ekd_jax import checkpoint, train

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import quickstart  # noqa: E402


def _state(scale=1.0, shape=(3, 4)):
    return {"w": jnp.full(shape, scale, jnp.float32), "step": jnp.asarray(7, jnp.int32)}


def _abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _save_steps(workdir, steps=(1, 2)):
    with checkpoint.Checkpointer(workdir, keep=5, async_save=False) as ck:
        for s in steps:
            ck.save(s, _state(float(s)), {"epoch": s - 1, "config": {"seed": 0}}, best_key=0.1 * s)


def _snapshot(directory: pathlib.Path) -> dict:
    """Every file under ``directory`` with its size and bytes' digest."""
    import hashlib

    return {str(p.relative_to(directory)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _corrupt(step_dir: pathlib.Path) -> None:
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(os.urandom(64))


def test_meta_is_checked_before_any_state_is_read(tmp_path, monkeypatch):
    _save_steps(tmp_path)
    before = _snapshot(tmp_path)
    ck = checkpoint.Checkpointer(tmp_path, keep=5, async_save=False)
    reads = []
    real = ck.manager.restore
    monkeypatch.setattr(ck.manager, "restore", lambda step, args=None: reads.append(sorted(args.keys())) or real(step, args=args))

    def refuse(meta):
        raise ValueError(f"another run (seed {meta['config']['seed']})")

    with pytest.raises(ValueError, match=r"another run \(seed 0\)"):
        ck.restore_latest(_abstract(_state()), check_meta=refuse)
    assert reads == [["meta"]]  # only the small meta item was read
    ck.close()
    assert _snapshot(tmp_path) == before and not (tmp_path / "corrupt_checkpoints").exists()


def test_a_state_of_another_shape_is_refused_not_called_corrupt(tmp_path):
    _save_steps(tmp_path)
    before = _snapshot(tmp_path)
    with checkpoint.Checkpointer(tmp_path, keep=5, async_save=False) as ck:
        with pytest.raises(ValueError, match=r"holds a state of another shape .*w is float32\[3, 4\] in the checkpoint, float32\[5, 4\] here"):
            ck.restore_latest(_abstract(_state(shape=(5, 4))))
        with pytest.raises(ValueError, match=r"extra missing from the checkpoint"):
            ck.restore_latest(_abstract({**_state(), "extra": jnp.zeros(2)}))
    assert _snapshot(tmp_path) == before and not (tmp_path / "corrupt_checkpoints").exists()


def test_only_an_unreadable_checkpoint_is_moved_aside_and_nothing_is_deleted(tmp_path, capsys):
    _save_steps(tmp_path)
    ckdir = tmp_path / "checkpoints"
    _corrupt(ckdir / "2")
    corrupt_files = _snapshot(ckdir / "2")
    with checkpoint.Checkpointer(tmp_path, keep=5, async_save=False) as ck:
        state, meta = ck.restore_latest(_abstract(_state()))
        assert meta["epoch"] == 0 and float(state["w"][0, 0]) == 1.0  # the previous, intact one
        assert "checkpoint at step 2" in capsys.readouterr().err
        assert _snapshot(tmp_path / "corrupt_checkpoints" / "2") == corrupt_files  # moved whole, intact
        # Step 2 is saved again and breaks again: the earlier moved-aside copy is kept beside the new one.
        ck.save(2, _state(2.0), {"epoch": 1, "config": {"seed": 0}}, best_key=0.2)
        ck.wait()
    _corrupt(ckdir / "2")
    with checkpoint.Checkpointer(tmp_path, keep=5, async_save=False) as ck:
        ck.restore_latest(_abstract(_state()))
    aside = sorted(p.name for p in (tmp_path / "corrupt_checkpoints").iterdir())
    assert aside == ["2", "2.1"]
    assert _snapshot(tmp_path / "corrupt_checkpoints" / "2") == corrupt_files


def test_every_checkpoint_unreadable_is_an_error_that_keeps_them(tmp_path):
    _save_steps(tmp_path)
    for s in (1, 2):
        _corrupt(tmp_path / "checkpoints" / str(s))
    with checkpoint.Checkpointer(tmp_path, keep=5, async_save=False) as ck:
        with pytest.raises(checkpoint.CorruptCheckpointError, match="every checkpoint in the workdir failed to read"):
            ck.restore_latest(_abstract(_state()))
    assert sorted(p.name for p in (tmp_path / "corrupt_checkpoints").iterdir()) == ["1", "2"]


def test_resume_with_a_model_of_another_shape_is_refused_and_keeps_every_checkpoint(tmp_path):
    """The issue's case: a resnet8 run resumed with --config.student.model=resnet14 is refused by
    name before any restore; every checkpoint stays, and the right config then resumes it."""
    c = quickstart.get_config("tiny")
    c.num_epochs = 2
    first = train.train_and_evaluate(c, str(tmp_path))
    (tmp_path / "summary.json").unlink()
    before = _snapshot(tmp_path / "checkpoints")
    other = quickstart.get_config("tiny")
    other.num_epochs, other.student.model = 2, "resnet14"
    with pytest.raises(ValueError, match=r"different config \(differs in student\.model\)"):
        train.train_and_evaluate(other, str(tmp_path))
    assert _snapshot(tmp_path / "checkpoints") == before and not (tmp_path / "corrupt_checkpoints").exists()
    again = train.train_and_evaluate(c, str(tmp_path))  # resumes after the last epoch: nothing to train
    assert again["student_params_sha256"] == first["student_params_sha256"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    np.testing.assert_equal(again["student_top1"], first["student_top1"])
