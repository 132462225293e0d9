"""Evaluate a finished run's saved networks: ``python -m ekd_jax.evaluate --workdir <run>``.

Loads ``<run>/teacher`` and ``<run>/student`` (whichever exist), rebuilds the run's data config
from its ``summary.json`` and scores both on the test split with the run's evaluation views
(the student sees its low-resolution view): top-1, top-5 and cross-entropy per network, a
confusion-matrix PNG per network (``<run>/confusion_student.png``, ``<run>/confusion_teacher.png``),
and the whole result as JSON (printed last, and written to ``<run>/evaluation.json``).

``--config.data.source=...`` (and ``--config.data.tfds_data_dir``) point at another copy of the
data, e.g. ``npz:/data/cifar100_test.npz``; its images must have the run's shape. The batch is
sharded over all devices, like training.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np

import ekd_jax  # noqa: F401  (applies the XLA CPU defaults before jax starts)
from ekd_jax import data, evaluation, export, parallel, rundir
from ekd_jax.spec import DataSpec
from ekd_jax.spec.validate import validate_data

NETWORKS = ("teacher", "student")
RESULT_FILE = "evaluation.json"
# Data fields the command line may override: where the data lives, not what the views are.
OVERRIDABLE = ("source", "tfds_data_dir")


def run_data_spec(workdir: str | pathlib.Path, overrides: Mapping[str, Any] | None = None) -> tuple[DataSpec, dict]:
    """The run's ``data`` block (from summary.json), with ``overrides`` applied, checked; and the summary."""
    workdir = pathlib.Path(workdir)
    summary = rundir.read_summary(workdir)
    if summary is None:
        raise ValueError(f"{workdir} holds no finished run ({workdir / rundir.SUMMARY_FILE} is missing): "
                         "pass a training --workdir")
    block = dict(summary.get("config", {}).get("data", {}))
    block.update({k: v for k, v in (overrides or {}).items() if v is not None})
    # Only the test split is scored: no few-sample subset of the training split is needed.
    block.update(samples_per_class=0, train_fraction=1.0)
    return validate_data(block), summary


def _check_network(which: str, meta: dict, cfg: DataSpec, image_shape: Sequence[int]) -> None:
    if list(meta["raw_image_shape"]) != list(image_shape):
        raise ValueError(
            f"the {which} was trained on {meta['raw_image_shape']} images but data.source={cfg.source!r} "
            f"gives {list(image_shape)}; use data of the run's shape (or its data.image_size)"
        )
    if which == "student" and (
        int(meta["student_downsample"]) != int(cfg.student_downsample) or meta["lowres_mode"] != cfg.lowres_mode
    ):
        raise ValueError(
            f"the saved student was trained on a x{meta['student_downsample']} {meta['lowres_mode']} view but "
            f"the run config says x{cfg.student_downsample} {cfg.lowres_mode}"
        )


def evaluate_network(which: str, module, variables, meta: dict, cfg: DataSpec, source, batch_size: int, mesh=None) -> dict:
    """Top-1/top-5/CE and the confusion matrix of one saved network on the held-out split of ``source``
    (a loaded ``ekd_jax.data`` source)."""
    mesh = mesh or parallel.make_mesh()
    parallel.check_batch_size(batch_size, mesh, "eval_batch_size")
    apply = export.apply_fn(module, meta, which, cfg)
    k = meta["num_classes"]

    def sums(variables, batch):  # the same masked sums as training's evaluation
        logits = apply(variables, batch["image"])
        return {**evaluation.count_sum(batch["mask"]),
                **evaluation.classification_sums(logits, batch["label"], batch["mask"], num_classes=k)}

    rep, bat = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    sums = jax.jit(sums, in_shardings=(rep, bat), out_shardings=rep)
    batches = source.eval_batches(batch_size, parallel.process_rows(mesh, batch_size))
    totals = evaluation.accumulate(sums, parallel.replicate(variables, mesh), batches, batch_size, mesh)
    return {
        "model": meta["model"],
        "input_shape": meta["input_shape"],
        **evaluation.means(totals),
        "confusion": np.rint(totals["confusion"]).astype(np.int64),
    }


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str] | None, path: pathlib.Path, title: str) -> None:
    """Row-normalised confusion matrix (true class per row); counts written in when there are few classes."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's (e.g. notebook) backend alone

    k = confusion.shape[0]
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.35 * k, 16)
    fig = Figure(figsize=(size, size * 0.85))
    ax = fig.add_subplot()
    im = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if k <= 30:
        names = list(class_names) if class_names else [str(i) for i in range(k)]
        ax.set_xticks(range(k), names, rotation=90 if max(map(len, names)) > 2 else 0, fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if confusion[i, j]:
                    color = "white" if rates[i, j] > 0.5 else "black"
                    ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def evaluate_run(
    workdir: str | pathlib.Path,
    data_overrides: Mapping[str, Any] | None = None,
    *,
    batch_size: int | None = None,
    networks: Sequence[str] = NETWORKS,
    plot: bool = True,
    write: bool = True,
) -> dict:
    """Scores the run's saved teacher and student (whichever exist) on the test split; returns a JSON-able dict."""
    t0 = time.time()
    workdir = pathlib.Path(workdir)
    cfg, summary = run_data_spec(workdir, data_overrides)
    present = [w for w in networks if rundir.has_network(workdir, w)]
    if not present:
        folders = " or ".join(f"{w}/" for w in networks)
        raise ValueError(f"{workdir} holds no saved network ({folders}): is the run finished?")
    ds = data.load(cfg)
    mesh = parallel.make_mesh()
    batch_size = batch_size or int(summary.get("config", {}).get("eval_batch_size", 256))
    n_dev = mesh.devices.size
    batch_size = -(-batch_size // n_dev) * n_dev  # a multiple of the device count
    result: dict[str, Any] = {
        "workdir": str(workdir),
        "data_source": cfg.source,
        "test_size": ds.test_size,
        "num_devices": int(n_dev),
    }
    for which in present:
        module, variables, meta = rundir.restore_network(workdir / which)
        _check_network(which, meta, cfg, ds.image_shape)
        r = evaluate_network(which, module, variables, meta, cfg, ds, batch_size, mesh)
        confusion = r.pop("confusion")
        r["per_class_top1"] = (np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)).tolist()
        if plot:
            png = workdir / f"confusion_{which}.png"
            title = f"{which} {meta['model']} on {cfg.source}: top-1 {100 * r['top1']:.2f}%"
            plot_confusion(confusion, meta.get("class_names") or ds.class_names, png, title)
            r["confusion_png"] = str(png)
        r["summary_top1"] = summary.get(f"{which}_top1")
        result[which] = r
    result["wall_s"] = round(time.time() - t0, 2)
    if write:
        (workdir / RESULT_FILE).write_text(json.dumps(result, indent=1))
    return result


def format_result(result: dict) -> str:
    lines = []
    for which in NETWORKS:
        if which in result:
            r = result[which]
            lines.append(
                f"{which} {r['model']}: top-1 {100 * r['top1']:.2f}% | top-5 {100 * r['top5']:.2f}% | "
                f"loss {r['loss']:.4f} ({result['test_size']} test images of {result['data_source']})"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _cli() -> None:
    from absl import flags
    from ml_collections import config_dict, config_flags

    from ekd_jax import cli

    overrides = ml_collections.ConfigDict(
        {
            "data": {k: config_dict.placeholder(str) for k in OVERRIDABLE},
            "eval_batch_size": config_dict.placeholder(int),
        }
    )
    allowed = ", ".join([*(f"--config.data.{k}" for k in OVERRIDABLE), "--config.eval_batch_size"])

    try:  # config_flags reads the --config.* overrides from sys.argv already here
        config = config_flags.DEFINE_config_dict("config", overrides, f"Overrides of the run's config: {allowed}.")
    except (KeyError, AttributeError, ValueError, TypeError) as e:
        which = cli.unknown_override(overrides, sys.argv[1:]) or f"bad --config override ({str(e).strip(chr(34))})"
        cli.fail(f"{which}; evaluate accepts only {allowed}")
    flags.DEFINE_string("workdir", None, "a finished run's workdir")
    flags.DEFINE_bool("plot", True, "Write confusion_<network>.png into the workdir.")
    FLAGS = flags.FLAGS

    def main():
        c = config.value
        result = evaluate_run(FLAGS.workdir, dict(c.data), batch_size=c.eval_batch_size, plot=FLAGS.plot)
        print(format_result(result))
        print(json.dumps(result))

    cli.run(main, required=("workdir",), errors=(ValueError, OSError))


def run() -> None:
    """Console script ``ekd-evaluate`` (pyproject.toml) = ``python -m ekd_jax.evaluate``."""
    _cli()


if __name__ == "__main__":
    run()
