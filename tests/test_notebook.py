"""notebooks/ekd_colab_tpu.ipynb really executes, top to bottom, on CPU (its tiny setting), via nbclient."""

import json
import pathlib

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "ekd_colab_tpu.ipynb"
MARKER = "EKD_NOTEBOOK_RESULT "


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
