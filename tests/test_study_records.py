"""The study's carried run records (docs/study_runs/<study>.json, benchmarks/study_runs.py) are lossless:
unpacked into run folders (what ``restore`` writes) and packed again (what ``save`` reads), every
study file comes back byte for byte."""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import study_runs  # noqa: E402


@pytest.mark.parametrize("file", sorted(study_runs.STORE.glob("*.json")), ids=lambda p: p.stem)
def test_study_file_round_trips_through_run_folders(file, tmp_path):
    text = file.read_text("utf-8")
    study = json.loads(text)
    study_runs.unpack(study, tmp_path)
    assert sorted(p.parent.name for p in tmp_path.glob("*/summary.json")) == sorted(study["runs"])
    run, record = next(iter(study["runs"].items()))  # written as ekd_jax/outputs.py writes a run's files
    assert (tmp_path / run / "summary.json").read_text() == json.dumps(record["summary.json"], indent=1)
    metrics = "".join(json.dumps(r) + "\n" for r in record["metrics.jsonl"])
    assert (tmp_path / run / "metrics.jsonl").read_text() == metrics
    # exact: each file's text is what encode() writes from its record (what save() requires)
    assert study_runs.dumps(study_runs.read_folder(tmp_path, exact=True)) + "\n" == text
