"""The training loop: data -> state -> jitted step -> metrics, checkpoints and outputs.

``train_and_evaluate(config, workdir)`` is what the command line, the notebook and the tests call.
It reads as four steps of one level: :func:`set_up` (validate everything, load the data, build the
networks, optimizer and initial state), :func:`restore` (resume from the newest checkpoint, after
checking the stored run's config), :func:`run_epochs`, :func:`finish` (saved networks, summary).

Everything is reproducible from (config, seed, step): batches are chosen by (seed, step) and
augmented on device with keys fold_in(seed, step), so a run resumed from a checkpoint ends
bitwise-identical to an uninterrupted one (on the same machine and device count). The steps run
``steps_per_call`` per call of the compiled program (:func:`train_epoch`), which changes no result.
Checkpoints are saved after an epoch every ``checkpoint_every_s`` seconds and after the last, and,
when SIGINT or SIGTERM stops the run (:mod:`ekd_jax.interrupt`), at the step where it stopped (a call
boundary), mid-epoch, with the epoch's metrics so far.

Multi-process runs (after ``ekd_jax.distributed.initialize``; ``python -m ekd_jax.main`` does it
from its flags) are the same loop on every process: the mesh spans all devices, each process
loads only its rows of every global batch (the same global batch for any process count), and
only process 0 writes outputs and prints; checkpoints are saved and restored by all processes.
Checks that could answer differently on different hosts are agreed (``distributed.agree``), so
that a refusal stops every process with the same message instead of leaving some waiting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ekd_jax import checkpoint, data, distributed, evaluation, interrupt, outputs, parallel, rundir, step
from ekd_jax.build import Built, DataFacts, build
from ekd_jax.feed import Feed
from ekd_jax.outputs import tree_sha256
from ekd_jax.spec import Spec
from ekd_jax.spec.validate import validate


class NonFiniteLossError(RuntimeError):
    pass


@dataclasses.dataclass
class Run:
    """What :func:`set_up` builds once for a run."""

    spec: Spec
    workdir: pathlib.Path
    ds: Any  # the data source (ekd_jax.data.load)
    mesh: Any
    built: Built

    @functools.cached_property
    def config_json(self) -> dict:
        """The run's options as stored with its checkpoints and in summary.json."""
        return self.spec.to_json()

    nets = property(lambda self: self.built.nets)
    tx = property(lambda self: self.built.tx)
    schedule = property(lambda self: self.built.schedule)
    teacher_schedule = property(lambda self: self.built.teacher_schedule)
    head = property(lambda self: self.built.head)
    steps_per_epoch = property(lambda self: self.built.steps_per_epoch)

    @property
    def num_epochs(self) -> int:
        """The run's epochs: the teacher's head start, then the student's num_epochs."""
        return self.head.epochs + self.spec.num_epochs


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains teacher and student as ``config.method`` says; returns the final summary dict.

    SIGINT/SIGTERM raise :class:`ekd_jax.interrupt.Interrupted` (a KeyboardInterrupt): during training
    after saving a checkpoint of the step reached, before it at once (nothing to save yet).
    """
    t_start = time.time()
    with interrupt.StopSignals() as stop:
        run = set_up(config, workdir)
        stop.mesh = run.mesh
        spec = run.spec
        # The source is closed however the run ends (a stream's worker processes stop with it).
        with contextlib.closing(run.ds), \
                checkpoint.Checkpointer(run.workdir, keep=spec.checkpoint_keep, async_save=spec.async_checkpoint) as ckpt, \
                outputs.RunWriter(run.workdir, enabled=distributed.is_primary()) as out:
            state, start, best = restore(run, ckpt, out)
            out.resume(start.epoch)
            feed = Feed(run.ds, spec.batch_size, spec.seed, spec.steps_per_call, run.mesh, spec.data.on_device)
            steps = run.built.compile(run.mesh)
            # Every program now, so that one that cannot compile (or fit) fails before any training.
            steps.precompile(state, feed.abstract(), feed.resident, spec.eval_batch_size, run.ds.image_shape)
            warm_up(run, state, start, steps, feed)
            out.message(describe(run))
            stop.phase = "training"
            state, best = run_epochs(run, state, start, best, steps, feed, ckpt, out, stop)
            stop.phase = "finish"
        return finish(run, state, best, out, time.time() - t_start)


# --------------------------------------------------------------------------- set up


def set_up(config, workdir: str) -> Run:
    """Validates the config (into the run's spec), the workdir (and a stored run in it), the data and
    the networks before anything is compiled; builds networks, optimizer and schedules."""
    spec = distributed.agree(validate, config)
    workdir = rundir.prepare(workdir)
    with checkpoint.Checkpointer(workdir) as ckpt:  # the stored run's meta only: nothing built yet
        stored = ckpt.newest_meta()
    if stored is not None:
        distributed.agree(rundir.refuse_other_run, workdir, stored, spec.to_json())
    ds = load_data(spec.data)
    mesh = parallel.make_mesh()
    return distributed.agree(_build, spec, workdir, ds, mesh)


def load_data(d):
    """The data source on every process (agreed: a file missing on one host stops all). A TFDS source
    is prepared by process 0 first, so that processes sharing its data_dir never prepare it at once."""
    if d.kind == "tfds":
        return distributed.primary_first(data.load, d)
    return distributed.agree(data.load, d)


def _build(spec: Spec, workdir: pathlib.Path, ds, mesh) -> Run:
    """Checks the batch sizes against the mesh, then builds networks, optimizer and schedules."""
    parallel.check_batch_size(spec.batch_size, mesh)
    parallel.check_batch_size(spec.eval_batch_size, mesh, "eval_batch_size")
    built = build(spec, DataFacts.of(ds))
    if built.nets.method.needs_teacher_checkpoint:
        _check_frozen_teacher(spec, ds, built.nets.teacher_input_shape)
    return Run(spec, workdir, ds, mesh, built)


def warm_up(run: Run, state, start: "Start", steps: step.Steps, feed: Feed) -> None:
    """One step of each training program the run has left to use (the head start's, the joint one), on a copy
    of the state that is then dropped: a compiled program's first call pays one-time costs (on XLA:CPU 50 ms
    of the tiny config's first 0.14 s epoch), which would otherwise make the first epoch's images/s unlike
    the others'. The run's own state and results are untouched."""
    firsts = [run.head.steps] + ([0] if start.epoch * run.steps_per_epoch < run.head.steps else [])
    for first in firsts:
        copy = jax.tree_util.tree_map(jnp.copy, state)
        jax.block_until_ready(steps.train_chunk(copy, feed.chunk(first, 1), first, 1, feed.resident))


def describe(run: Run) -> str:
    c, ds = run.spec, run.ds
    return (
        f"{run.nets.method.name}: teacher {c.teacher.model} {list(run.nets.teacher_input_shape)} -> student "
        f"{c.student.model} {list(run.nets.student_input_shape)} | {c.data.source}: {ds.train_size} train / "
        f"{ds.test_size} test, {ds.num_classes} classes | {run.mesh.devices.size} device(s) "
        f"{jax.devices()[0].platform}"
        + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else "")
        + f" | {c.num_epochs} epochs x {run.steps_per_epoch} steps"
        + (f" after a teacher head start of {run.head.epochs} epochs" if run.head.epochs else "")
    )


# --------------------------------------------------------------------------- restore


@dataclasses.dataclass(frozen=True)
class Start:
    """Where training (re)starts: ``epoch``, and within it the first step ``index`` and the metrics
    of the steps before it (a run stopped mid-epoch saved them with its checkpoint)."""

    epoch: int = 0
    index: int = 0
    history: tuple = ()


def restore(run: Run, ckpt: checkpoint.Checkpointer, out: outputs.RunWriter):
    """``(state, Start, best so far)``: a fresh state, or the newest checkpoint's.

    The stored run's config is compared with this one before its state is read: a workdir of
    another run is refused, naming the keys, and its checkpoints stay where they are.
    """
    state = run.built.init_state(run.spec.seed, run.mesh)
    if run.nets.method.needs_teacher_checkpoint:
        state = _load_frozen_teacher(run, state)

    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.replicated(run.mesh)), state
    )
    restored = ckpt.restore_latest(abstract, check_meta=functools.partial(rundir.refuse_other_run, run.workdir, current=run.config_json))
    if restored is None:
        return state, Start(), {"student/top1": -1.0, "epoch": -1}
    state, meta = restored
    partial = meta.get("partial")
    if partial is None:
        out.message(f"resuming after epoch {meta['epoch'] + 1} (step {int(state.step)}) from {ckpt.directory}")
        return state, Start(meta["epoch"] + 1), meta["best"]
    # The metrics of the epoch's first steps, as the uninterrupted run holds them (float32 scalars), so
    # that the epoch's means come out the same.
    history = tuple({k: np.float32(v) for k, v in m.items()} for m in partial["history"])
    out.message(f"resuming at step {int(state.step)} (epoch {partial['epoch'] + 1}, step {len(history) + 1} of "
                f"{run.steps_per_epoch}) from {ckpt.directory}")
    return state, Start(partial["epoch"], len(history), history), meta["best"]


def _check_frozen_teacher(spec: Spec, ds, input_shape) -> None:
    """The frozen teacher's class count and input shape against this data (the spec has checked
    that teacher.checkpoint holds a finished teacher of teacher.model)."""
    meta = rundir.read_network_meta(pathlib.Path(spec.teacher.checkpoint) / "teacher")
    if meta["num_classes"] != ds.num_classes or tuple(meta["input_shape"]) != tuple(input_shape):
        raise ValueError(
            f"teacher.checkpoint={spec.teacher.checkpoint!r} holds a teacher trained for {meta['num_classes']} classes "
            f"at input {meta['input_shape']}, but this data gives {ds.num_classes} classes at {list(input_shape)}; "
            "fix --config.teacher.checkpoint (a teacher trained on this data) or the data options"
        )


def _load_frozen_teacher(run: Run, state: step.JointState) -> step.JointState:
    src = pathlib.Path(run.spec.teacher.checkpoint)
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.replicated(run.mesh)),
        _network(state, "teacher"),
    )
    _, variables, _ = rundir.restore_network(src / "teacher", abstract)
    return state.replace(
        params={**state.params, "teacher": variables["params"]},
        batch_stats={**state.batch_stats, "teacher": variables["batch_stats"]},
    )


# --------------------------------------------------------------------------- epochs


def run_epochs(run: Run, state, start: Start, best: dict, steps: step.Steps, feed: Feed, ckpt, out, stop=None):
    """Trains, evaluates, records and checkpoints every remaining epoch; returns (state, best).
    Stopped by a signal (``stop``), it saves the step reached and raises ``interrupt.Interrupted``."""
    ranked = "student/top1" if run.nets.method.runs_student else "teacher/top1"
    saved_at = time.monotonic()  # the last checkpoint, or the start of training
    for epoch in range(start.epoch, run.num_epochs):
        t0 = time.time()
        resumed = start if epoch == start.epoch else Start(epoch)
        state, history = train_epoch(run, state, epoch, steps, feed, out, resumed, stop)
        if len(history) < run.steps_per_epoch:  # stopped by a signal at a step boundary
            save_stopped(run, state, epoch, history, best, ckpt, stop)
        train_s = time.time() - t0
        # The steps of an epoch resumed mid-way ran in train_s: its speed is theirs.
        rec = epoch_record(run, epoch, history, train_s, timed_steps=len(history) - resumed.index)
        if (epoch + 1) % run.spec.eval_every_epochs == 0 or epoch + 1 == run.num_epochs:
            rec.update(evaluate(run, state, steps.eval, waiting=run.head.waiting(epoch)))
        if ranked in rec and rec[ranked] > best["student/top1"]:
            best = {"student/top1": rec[ranked], "epoch": epoch}
        out.record(rec)
        due = epoch + 1 == run.num_epochs or time.monotonic() - saved_at >= run.spec.checkpoint_every_s
        if distributed.primary_decides(due):  # every process saves, or none (a clock per host)
            # An epoch without an evaluation of the ranked network is never the best (-1 < any accuracy).
            ckpt.save(rec["step"], state, {"epoch": epoch, "best": best, "config": run.config_json}, rec.get(ranked, -1.0))
            saved_at = time.monotonic()
    ckpt.wait()
    return state, best


def train_epoch(run: Run, state, epoch: int, steps: step.Steps, feed: Feed, out, start: Start | None = None,
                stop=None):
    """One epoch of steps from ``start.index``, ``feed.k`` per call of the compiled program. Every step's loss
    terms are checked finite, one call behind (the device meanwhile has the next call queued). Returns
    (state, metrics per step); fewer than the epoch's steps when ``stop`` said to stop (at a call boundary)."""
    spe = run.steps_per_epoch
    start = start or Start(epoch)
    history: list[dict] = list(start.history)
    progress = _Progress(spe, epoch, run.num_epochs, enabled=out.enabled, initial=start.index)
    base = epoch * spe
    chunks = chunk_bounds(start.index, spe, feed.k)
    fed = feed.chunk(base + chunks[0][0], chunks[0][1] - chunks[0][0]) if chunks else None
    pending = None  # the last call's (first index, steps, metrics on the device): checked after the next call
    for c, (i, j) in enumerate(chunks):
        if stop is not None and stop.poll():
            break
        state, metrics = steps.train_chunk(state, fed, base + i, j - i, feed.resident)
        if c + 1 < len(chunks):  # the next call's batches, on the device before it is needed
            fed = feed.chunk(base + chunks[c + 1][0], chunks[c + 1][1] - chunks[c + 1][0])
        if pending is not None:
            history += _checked(run, epoch, *pending, out, progress)
        pending = (i, j - i, metrics)
    if pending is not None:
        history += _checked(run, epoch, *pending, out, progress)
    progress.close()
    return state, history


def chunk_bounds(first: int, steps_per_epoch: int, k: int) -> list[tuple[int, int]]:
    """The calls of an epoch from index ``first``: ``[(i, j), ...]``, steps i..j-1 each, ending at the
    multiples of ``k`` and at the epoch's end, so that a run resumed mid-epoch keeps the same boundaries."""
    bounds, i = [], first
    while i < steps_per_epoch:
        j = min(steps_per_epoch, (i // k + 1) * k)
        bounds.append((i, j))
        i = j
    return bounds


def _checked(run: Run, epoch: int, first: int, n: int, metrics: dict, out, progress) -> list[dict]:
    """A call's metrics, fetched, as one dict per step; a non-finite loss term stops the run naming its step.
    Prints the lines of the log points (``log_every_steps``, and the epoch's last step) among its steps."""
    spe, every = run.steps_per_epoch, run.spec.log_every_steps
    fetched = jax.device_get(metrics)
    window = [{k: v[s] for k, v in fetched.items()} for s in range(n)]
    bad = _first_non_finite(window, epoch * spe + first)
    if bad is not None:
        raise NonFiniteLossError(
            f"loss term {bad[1]!r} became non-finite at step {bad[0]} (epoch {epoch + 1}); "
            "lower optimizer.learning_rate or the loss weights"
        )
    progress.update(n)
    if not progress.tty:
        for s in range(first, first + n):
            if (s + 1) % every == 0 or s + 1 == spe:
                out.message(f"epoch {epoch + 1} step {s + 1}/{spe}: loss {float(window[s - first]['loss']):.4f}")
    return window


def save_stopped(run: Run, state, epoch: int, history: list[dict], best: dict, ckpt, stop) -> None:
    """Saves the step a signal stopped the run at (unless it is the epoch checkpoint just saved, or
    step 0), with the epoch's metrics so far, then raises ``interrupt.Interrupted``."""
    at = epoch * run.steps_per_epoch + len(history)
    ckpt.wait()
    if at and at not in ckpt.all_steps():
        stop.saving = at
        partial = {"epoch": epoch, "history": [{k: float(v) for k, v in m.items()} for m in history]}
        ckpt.save(at, state, {"epoch": epoch - 1, "best": best, "config": run.config_json, "partial": partial}, -1.0)
        ckpt.wait()
        stop.saving = None
    raise interrupt.Interrupted(stop.stopped_by, interrupt.resume_message(at, epoch))


def epoch_record(run: Run, epoch: int, history: list[dict], train_s: float, timed_steps: int | None = None) -> dict:
    """The epoch's training record: step, learning rates, epoch means of the step metrics, speed.
    While the student waits for the teacher's head start it has no learning rate (nor any metric:
    the head-start step reports the teacher's only)."""
    last = (epoch + 1) * run.steps_per_epoch - 1
    rec: dict[str, Any] = {"epoch": epoch, "step": last + 1}
    if not run.head.waiting(epoch):
        rec["lr"] = float(run.schedule(run.head.student_step(last)))
    if run.teacher_schedule is not None:
        rec["teacher_lr"] = float(run.teacher_schedule(last))
    rec.update({f"train/{k}": float(np.mean([h[k] for h in history])) for k in history[0]})
    timed_steps = run.steps_per_epoch if timed_steps is None else timed_steps
    rec["images_per_s"] = timed_steps * run.spec.batch_size / train_s
    return rec


def evaluate(run: Run, state, eval_step, waiting: bool = False) -> dict[str, float]:
    """Test top-1/top-5/loss of both networks (the shared evaluation path); a student still
    waiting for the teacher's head start is not scored."""
    size = run.spec.eval_batch_size
    batches = run.ds.eval_batches(size, parallel.process_rows(run.mesh, size))  # this process's rows of each
    totals = evaluation.accumulate(eval_step, state, batches, size, run.mesh)
    return {k: v for k, v in evaluation.means(totals).items() if not (waiting and k.startswith("student/"))}


def _first_non_finite(history: list[dict], first_step: int) -> tuple[int, str] | None:
    for i, m in enumerate(history):
        for k in sorted(m, key=lambda k: k == "loss"):  # name the term before the total
            if not math.isfinite(float(m[k])):
                return first_step + i, k
    return None


class _Progress:
    """tqdm bar per epoch on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, epoch: int, num_epochs: int, enabled: bool = True, initial: int = 0):
        self.tty = enabled and sys.stderr.isatty()
        self.bar = None
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{num_epochs}", leave=False)

    def update(self, n: int = 1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- finish


def finish(run: Run, state, best: dict, out: outputs.RunWriter, wall_s: float) -> dict:
    """Writes student/ and teacher/ (each network alone), curves.png and summary.json (process 0);
    returns the summary (on every process)."""
    spec, ds, nets = run.spec, run.ds, run.nets
    for which, runs in (("student", nets.method.runs_student), ("teacher", nets.method.runs_teacher)):
        if runs:
            shape = nets.student_input_shape if which == "student" else nets.teacher_input_shape
            out.network(which, jax.device_get(_network(state, which)), _network_meta(run, which, shape))
    final = out.records[-1] if out.records else {}
    # Convergence: the student's test top-1 over the last tenth of its epochs (flat = converged).
    tail_from = run.num_epochs - max(1, math.ceil(spec.num_epochs / 10))
    tail = [r["student/top1"] for r in out.records if "student/top1" in r and r["epoch"] >= tail_from]
    summary = {
        "method": nets.method.name,
        "teacher_model": spec.teacher.model,
        "student_model": spec.student.model,
        "data_source": spec.data.source,
        "train_size": ds.train_size,
        "test_size": ds.test_size,
        "num_classes": ds.num_classes,
        "teacher_input_shape": list(nets.teacher_input_shape),
        "student_input_shape": list(nets.student_input_shape),
        "num_devices": int(run.mesh.devices.size),
        "num_processes": jax.process_count(),
        "epochs": spec.num_epochs,
        "teacher_head_start_epochs": run.head.epochs,
        "steps": int(state.step),
        "teacher_top1": final.get("teacher/top1"),
        "teacher_top5": final.get("teacher/top5"),
        "student_top1": final.get("student/top1"),
        "student_top5": final.get("student/top5"),
        # Accuracy on the last epoch's (augmented) training batches, in train mode: how well each
        # network fits its training data at the end (a converged, over-fitting student is near 1).
        "teacher_train_top1": final.get("train/teacher/train_top1"),
        "student_train_top1": final.get("train/student/train_top1"),
        "student_top1_last_tenth": [min(tail), max(tail)] if tail else None,
        "best_student_top1": best["student/top1"] if nets.method.runs_student else None,
        "best_student_epoch": best["epoch"] if nets.method.runs_student else None,
        "teacher_params_sha256": tree_sha256(_network(state, "teacher")),
        "student_params_sha256": tree_sha256(_network(state, "student")),
        "wall_s": wall_s,
        "config": run.config_json,
    }
    out.finish(summary)
    distributed.sync("ekd_jax:finished")  # on every process, the outputs exist once this returns
    return summary


def _network(state: step.JointState, which: str) -> dict:
    return {"params": state.params[which], "batch_stats": state.batch_stats[which]}


def _network_meta(run: Run, which: str, input_shape) -> dict:
    d, ds = run.spec.data, run.ds
    return rundir.network_meta(
        run.spec.network(which).model, ds.num_classes, ds.class_names, input_shape, ds.image_shape, ds.mean, ds.std,
        student_downsample=d.student_downsample if which == "student" else 1, lowres_mode=d.lowres_mode,
        dtype=run.spec.dtype, data_source=d.source,
    )
