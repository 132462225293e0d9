"""What a run writes besides checkpoints: metrics.jsonl, TensorBoard, curves.png, summary.json,
the saved networks (student/, teacher/) and the console lines.

All of it goes through one :class:`RunWriter`, so that a multi-process run lets exactly one
process write and print (process 0; ``enabled=False`` elsewhere) while every process computes
the same values and keeps the same records.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import sys
from typing import Any

import jax
import numpy as np

from ekd_jax import distributed, rundir
from ekd_jax.rundir import METRICS_FILE


def tree_sha256(tree: Any) -> str:
    """Digest over every leaf (path, dtype, shape, bytes): equal digests mean equal networks."""
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0], key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def format_record(rec: dict) -> str:
    """The console line of one epoch: accuracies of the networks that have one, the training loss."""
    parts = [f"epoch {rec['epoch'] + 1}"]
    for who in ("teacher", "student"):
        if f"{who}/top1" in rec:
            parts.append(f"{who} top-1 {100 * rec[who + '/top1']:.2f}%")
    parts.append(f"loss {rec['train/loss']:.4f}")
    parts.append(f"{rec['images_per_s']:.0f} img/s")
    return " | ".join(parts)


def plot_curves(records: list[dict], path: pathlib.Path) -> None:
    """Test top-1 and training-loss curves; a network or term absent from an epoch is a gap, not a value."""
    # A bare Figure (no pyplot): does not switch the backend of a notebook that calls us.
    from matplotlib.figure import Figure

    epochs = [r["epoch"] + 1 for r in records]
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for who in ("teacher", "student"):
        if any(f"{who}/top1" in r for r in records):
            pts = [(e, r[f"{who}/top1"]) for e, r in zip(epochs, records) if f"{who}/top1" in r]
            ax1.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=f"{who} test top-1")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("accuracy"), ax1.legend(), ax1.grid(alpha=0.3)
    terms = sorted({k for r in records for k in r if k.startswith("train/") and "top1" not in k})
    for k in terms:
        pts = [(e, r[k]) for e, r in zip(epochs, records) if k in r]
        ax2.plot(*zip(*pts), label=k[len("train/"):])
    ax2.set_xlabel("epoch"), ax2.set_ylabel("loss (epoch mean)"), ax2.set_yscale("log"), ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


class RunWriter:
    """Writes a run's outputs into ``workdir``; with ``enabled=False`` it writes and prints nothing."""

    def __init__(self, workdir: str | pathlib.Path, enabled: bool = True):
        self.workdir = pathlib.Path(workdir)
        self.enabled = enabled
        self.records: list[dict] = []
        self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def resume(self, start_epoch: int) -> list[dict]:
        """Keeps exactly the records of the epochs the restored state has seen (a killed run may
        have logged an epoch whose checkpoint never committed); returns them."""
        path = self.workdir / METRICS_FILE
        if path.exists():
            lines = path.read_text().splitlines()
            self.records = [r for r in (json.loads(line) for line in lines if line.strip()) if r["epoch"] < start_epoch]
        distributed.sync("ekd_jax:metrics_read")  # every process has read the file before it is rewritten
        if self.enabled:
            path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
        return self.records

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def warning(self, text: str) -> None:
        if self.enabled:
            print(f"warning: {text}", file=sys.stderr, flush=True)

    def record(self, rec: dict) -> None:
        """One epoch: appended to metrics.jsonl and TensorBoard, and printed."""
        self.records.append(rec)
        if not self.enabled:
            return
        with (self.workdir / METRICS_FILE).open("a") as f:
            f.write(json.dumps(rec) + "\n")
        for k, v in rec.items():
            if k not in ("epoch", "step"):
                self._tb.add_scalar(k, v, rec["step"])
        self._tb.flush()
        print(format_record(rec), flush=True)

    def network(self, which: str, variables: Any, meta: dict) -> None:
        """``<workdir>/<which>/``: one network alone (variables + network.json), for deployment,
        evaluation or use as a frozen teacher."""
        if self.enabled:
            rundir.save_network(self.workdir / which, variables, meta)

    def finish(self, summary: dict) -> None:
        """curves.png and summary.json (written last: its presence marks a finished run)."""
        if not self.enabled:
            return
        if self.records:
            plot_curves(self.records, self.workdir / "curves.png")
        rundir.write_summary(self.workdir, summary)
