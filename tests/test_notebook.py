"""notebooks/ekd_colab_tpu.ipynb really executes, top to bottom, on CPU (its tiny setting), via nbclient."""

import json
import os
import pathlib
import re

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "ekd_colab_tpu.ipynb"
MARKER = "EKD_NOTEBOOK_RESULT "
# The "Open in Colab" link to this notebook: colab.research.google.com/github/<owner>/<repo>/blob/main/<path>.
BADGE = re.compile(r"https://colab\.research\.google\.com/github/([^/\s()]+)/([^/\s()]+)/blob/main/notebooks/ekd_colab_tpu\.ipynb")


def _read():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_is_clean_and_colab_ready():
    nb = _read()
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit the notebook without outputs"
    assert nb.metadata.get("accelerator") == "TPU"
    assert "colab.research.google.com/github/" in nb.cells[0].source
    assert "parameters" in code[0].metadata.get("tags", [])
    source = "\n".join(c.source for c in code)
    for needed in ('"google.colab" in sys.modules', "train.train_and_evaluate", "metrics.jsonl",
                   "evaluate.evaluate_run", "export.export_student", "configs/cifar.py:cifar100,"):
        assert needed in source, needed


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _repo_url(nb) -> str:
    (url,) = re.findall(r'^REPO_URL = "([^"]*)"', _code(nb)[0].source, re.M)
    return url


def test_colab_badges_follow_repo_url():
    """The badges in README and in the notebook open this notebook from the repository REPO_URL names."""
    nb = _read()
    owner_repo = re.fullmatch(r"https://github\.com/([^/\s]+)/([^/\s]+?)(?:\.git)?/?", _repo_url(nb))
    assert owner_repo, f"REPO_URL {_repo_url(nb)!r} is no https://github.com/<owner>/<repo> URL"
    for where, text in (("README.md", (ROOT / "README.md").read_text()), ("the notebook", nb.cells[0].source)):
        badges = BADGE.findall(text)
        assert badges, f"no Colab badge for notebooks/ekd_colab_tpu.ipynb in {where}"
        assert text.count("colab.research.google.com/github/") == len(badges), f"another Colab link in {where}"
        assert set(badges) == {owner_repo.groups()}, f"{where}: badge {badges} vs REPO_URL {_repo_url(nb)!r}"


@pytest.mark.parametrize("repo_url", ["placeholder", ""])
def test_placeholder_repo_url_stops_on_colab(repo_url, tmp_path, monkeypatch):
    """On Colab (simulated: a google.colab module), the install cell refuses a placeholder or empty REPO_URL
    with one sentence, before any git clone or pip install."""
    from nbclient import NotebookClient

    nb = _read()
    params, install = _code(nb)[:2]
    assert "git" in install.source and "clone" in install.source
    if repo_url != "placeholder":
        params.source = re.sub(r'^REPO_URL = "[^"]*"', f"REPO_URL = {repo_url!r}", params.source, flags=re.M)
    # Any git the cell might start, found on PATH, records its arguments and fails (no network).
    calls = tmp_path / "git_calls"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "git").write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nexit 1\n')
    (fake_bin / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    colab = nbformat.v4.new_code_cell(
        "import json, subprocess, sys, types\n"
        "sys.modules['google.colab'] = types.ModuleType('google.colab')  # what the cell checks for Colab\n"
        "RUNS = []\n"
        "def _refuse(*args, **kwargs):\n"
        "    RUNS.append([str(a) for a in args[0]])\n"
        "    raise RuntimeError('subprocess.run called')\n"
        "subprocess.run = _refuse\n"
    )
    report = nbformat.v4.new_code_cell("print('RUNS ' + json.dumps(RUNS))")
    nb.cells = [colab, params, install, report]
    client = NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    errors = [o for o in install.outputs if o.output_type == "error"]
    assert len(errors) == 1 and len(install.outputs) == 1, install.outputs
    sentence = errors[0].evalue
    placeholder = "(it is still the placeholder 'https://github.com/<org>/ekd_jax')" if repo_url else "(it is empty)"
    assert sentence == (f"Set REPO_URL in the first cell to the git URL of your ekd_jax fork {placeholder}, "
                        "then run the notebook again."), sentence
    assert errors[0].traceback == [f"{errors[0].ename}: {sentence}"], errors[0].traceback  # one line, no traceback
    assert not any(o.output_type == "error" for c in (colab, params) for o in c.outputs)
    assert report.outputs[0].text.strip() == "RUNS []", report.outputs  # no git clone, no pip install
    assert not calls.exists(), calls.read_text()


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    from nbclient import NotebookClient

    workdir = tmp_path_factory.mktemp("notebook") / "run"
    env = {
        "EKD_NOTEBOOK_TINY": "1",
        "EKD_NOTEBOOK_WORKDIR": str(workdir),
        "JAX_PLATFORMS": "cpu",
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",  # compile time dominates the tiny run, as in conftest
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    mp = pytest.MonkeyPatch()
    for k, v in env.items():  # the kernel inherits this process's environment
        mp.setenv(k, v)
    try:
        nb = _read()
        # Kernel "python3": jupyter_client starts it with this interpreter (the venv's), cwd = repo root.
        client = NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
        )
        client.execute()  # raises CellExecutionError on the first failing cell
    finally:
        mp.undo()
    return nb, workdir


def _outputs(nb, output_type):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == output_type]


def test_notebook_executes_on_cpu(executed):
    nb, workdir = executed
    assert not _outputs(nb, "error")
    text = "".join(o.text for o in _outputs(nb, "stream") if o.name == "stdout")
    assert "TINY smoke test" in text and "epoch 2 |" in text
    lines = [line for line in text.splitlines() if line.startswith(MARKER)]
    assert len(lines) == 1, text[-3000:]
    result = json.loads(lines[0][len(MARKER):])

    assert result["tiny"] is True
    assert pathlib.Path(result["workdir"]) == workdir.resolve()
    summary = json.loads((workdir / "summary.json").read_text())
    assert result["summary_json"] and summary["data_source"] == "digits" and summary["method"] == "ekd"
    assert pathlib.Path(result["export_file"]).is_file() and result["saved_model"]
    assert (workdir / "export" / "export.json").is_file()
    assert (workdir / "confusion_student.png").is_file()
    # Evaluate and the exported function, run inside the notebook, agree with the training run.
    n = summary["test_size"]
    for key in ("evaluate_top1", "export_top1"):
        assert round(result[key] * n) == round(summary["student_top1"] * n), key
    # Curves, confusion matrix and sample predictions were displayed.
    pngs = [o for o in _outputs(nb, "display_data") if "image/png" in o.get("data", {})]
    assert len(pngs) >= 3
