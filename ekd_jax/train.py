"""The training loop: data -> state -> jitted step -> metrics, checkpoints and outputs.

``train_and_evaluate(config, workdir)`` is what the command line, the notebook and the tests call.
Everything is reproducible from (config, seed, step): batches are chosen by (seed, step) and
augmented on device with keys fold_in(seed, step), so a run resumed from an epoch checkpoint
ends bitwise-identical to an uninterrupted one (on the same machine and device count).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ekd_jax import checkpoint, data, parallel, step
from ekd_jax import config as config_lib
from ekd_jax.models import create_model

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


def make_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Learning-rate schedule over optimizer steps (multistep / cosine / constant, optional warm-up)."""
    s, lr = config.schedule, config.optimizer.learning_rate
    warmup = int(round(s.warmup_epochs * steps_per_epoch))
    if s.name == "multistep":
        bounds = {int(round(f * total_steps)): s.decay_factor for f in s.milestones}
        main = optax.piecewise_constant_schedule(lr, bounds)
    elif s.name == "cosine":
        main = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1))
    elif s.name == "constant":
        main = optax.constant_schedule(lr)
    else:
        raise ValueError(f"unknown schedule.name {s.name!r}; use 'multistep', 'cosine' or 'constant'")
    if warmup <= 0:
        return main
    if s.name == "multistep":  # milestones stay at fractions of the whole run
        return lambda t: main(t) * jnp.minimum(1.0, (t + 1) / warmup)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def tree_sha256(tree: Any) -> str:
    """Digest over every leaf (path, dtype, shape, bytes): equal digests mean equal networks."""
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0], key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _network_meta(config, which: str, ds: data.Dataset, input_shape) -> dict:
    return {
        "model": config[which].model,
        "num_classes": ds.num_classes,
        "class_names": list(ds.class_names) if ds.class_names else None,
        "input_shape": list(input_shape),  # what the network receives
        "raw_image_shape": list(ds.image_shape),  # what the data source yields (uint8)
        "mean": list(ds.mean),
        "std": list(ds.std),
        "student_downsample": int(config.data.student_downsample) if which == "student" else 1,
        "lowres_mode": config.data.lowres_mode,
        "dtype": config.dtype,
        "data_source": config.data.source,
    }


def _load_frozen_teacher(config, ds, nets: step.Networks, state: step.JointState, mesh) -> step.JointState:
    src = pathlib.Path(config.teacher.checkpoint)
    meta_path = src / "teacher" / "network.json"
    if not meta_path.exists():
        raise ValueError(
            f"teacher.checkpoint={str(src)!r} holds no finished teacher ({meta_path} is missing); "
            "point it at the workdir of a completed 'teacher' (or dml/ekd) run"
        )
    meta = json.loads(meta_path.read_text())
    if meta["model"] != config.teacher.model:
        raise ValueError(
            f"teacher.checkpoint holds a {meta['model']!r} teacher but teacher.model={config.teacher.model!r}; "
            f"set --config.teacher.model={meta['model']}"
        )
    if meta["num_classes"] != ds.num_classes or tuple(meta["input_shape"]) != nets.teacher_input_shape:
        raise ValueError(
            f"the checkpointed teacher was trained for {meta['num_classes']} classes at input "
            f"{meta['input_shape']}, but this data gives {ds.num_classes} classes at {list(nets.teacher_input_shape)}"
        )
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.replicated(mesh)),
        {"params": state.params["teacher"], "batch_stats": state.batch_stats["teacher"]},
    )
    variables = checkpoint.load_network(src / "teacher", abstract)
    return state.replace(
        params={**state.params, "teacher": variables["params"]},
        batch_stats={**state.batch_stats, "teacher": variables["batch_stats"]},
    )


def _first_non_finite(history: list[dict], first_step: int) -> tuple[int, str] | None:
    for i, m in enumerate(history):
        for k in sorted(m, key=lambda k: k == "loss"):  # name the term before the total
            if not math.isfinite(float(m[k])):
                return first_step + i, k
    return None


def _evaluate(eval_step, state, ds: data.Dataset, batch_size: int, mesh) -> dict[str, float]:
    sums = None
    for x, y, mask in data.eval_batches(ds.x_test, ds.y_test, batch_size):
        out = eval_step(state, parallel.shard_batch({"image": x, "label": y, "mask": mask}, mesh))
        sums = out if sums is None else jax.tree_util.tree_map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    n = float(sums.pop("count"))
    return {k: float(v) / n for k, v in sums.items()}


def _plot_curves(records: list[dict], path: pathlib.Path) -> None:
    # A bare Figure (no pyplot): does not switch the backend of a notebook that calls us.
    from matplotlib.figure import Figure

    epochs = [r["epoch"] + 1 for r in records]
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    for who in ("teacher", "student"):
        if f"{who}/top1" in records[-1]:
            ax1.plot(epochs, [r.get(f"{who}/top1", float("nan")) for r in records], label=f"{who} test top-1")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("accuracy"), ax1.legend(), ax1.grid(alpha=0.3)
    for k in sorted(k for k in records[-1] if k.startswith("train/") and "top1" not in k):
        ax2.plot(epochs, [r.get(k, float("nan")) for r in records], label=k[len("train/"):])
    ax2.set_xlabel("epoch"), ax2.set_ylabel("loss (epoch mean)"), ax2.set_yscale("log"), ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


class _Progress:
    """tqdm bar per epoch on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, epoch: int, num_epochs: int):
        self.tty = sys.stderr.isatty()
        self.bar = None
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=f"epoch {epoch + 1}/{num_epochs}", leave=False)

    def update(self, n: int = 1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _head_start_epochs(config) -> int:
    """Whole epochs of teacher head start (teacher.head_start x num_epochs); 0 without an online teacher."""
    h = float(config.teacher.head_start)
    if not (h >= 0.0):
        raise ValueError(f"teacher.head_start={h} must be >= 0 (a fraction of num_epochs; 0 = no head start)")
    return int(round(h * config.num_epochs)) if step.get_method(config.method).online_teacher else 0


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains teacher and student as ``config.method`` says; returns the final summary dict."""
    t_start = time.time()
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ds = data.load_dataset(config.data)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    spe = data.steps_per_epoch(ds.train_size, config.batch_size)
    total_steps = spe * config.num_epochs  # the student's steps
    head = _head_start_epochs(config)
    num_epochs = config.num_epochs + head  # the run's epochs (the teacher's)
    t_shape = tuple(data.teacher_input_shape(config.data, ds.image_shape))
    s_shape = tuple(data.student_input_shape(config.data, ds.image_shape))
    views = functools.partial(_views, cfg=config.data, mean=ds.mean, std=ds.std)
    nets = step.build_networks(config, ds.num_classes, t_shape, s_shape, views, total_steps, head * spe)
    schedule = make_schedule(config, spe, total_steps)
    teacher_schedule = make_schedule(config, spe, num_epochs * spe) if head else None
    tx = step.make_optimizer(
        nets, schedule, config.optimizer.momentum, config.optimizer.weight_decay, config.optimizer.nesterov,
        teacher_learning_rate=teacher_schedule,
    )
    state = step.init_state(nets, tx, config.seed, mesh)
    if nets.method.needs_teacher_checkpoint:
        state = _load_frozen_teacher(config, ds, nets, state, mesh)

    metrics_path = workdir / "metrics.jsonl"
    records: list[dict] = []
    best = {"student/top1": -1.0, "epoch": -1}
    start_epoch = 0
    with checkpoint.Checkpointer(workdir, keep=config.checkpoint_keep, async_save=config.async_checkpoint) as ckpt:
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.replicated(mesh)), state
        )
        restored = ckpt.restore_latest(abstract)
        config_json = json.loads(config.to_json_best_effort())
        if restored is not None:
            state, meta = restored
            diff = config_lib.config_difference(meta.get("config", config_json), config_json)
            if diff:
                raise ValueError(
                    f"{workdir} holds checkpoints of a run with a different config (differs in {', '.join(diff)}); "
                    "resume with the same config, or use a new --workdir"
                )
            start_epoch, best = meta["epoch"] + 1, meta["best"]
            print(f"resuming after epoch {start_epoch} (step {int(state.step)}) from {ckpt.directory}", flush=True)
        # metrics.jsonl holds exactly the evaluations of the epochs the state has seen.
        if metrics_path.exists():
            records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
            records = [r for r in records if r["epoch"] < start_epoch]
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))

        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(workdir / "tensorboard"))
        train_step, eval_step = step.compile_steps(nets, tx, mesh)
        print(
            f"{nets.method.name}: teacher {config.teacher.model} {list(t_shape)} -> student "
            f"{config.student.model} {list(s_shape)} | {config.data.source}: {ds.train_size} train / "
            f"{ds.test_size} test, {ds.num_classes} classes | {mesh.devices.size} device(s) "
            f"{jax.devices()[0].platform} | {config.num_epochs} epochs x {spe} steps"
            + (f" after a teacher head start of {head} epochs" if head else ""),
            flush=True,
        )
        rng_seed = config.seed
        for epoch in range(start_epoch, num_epochs):
            t0 = time.time()
            history: list[dict] = []
            progress = _Progress(spe, epoch, num_epochs)
            for i in range(spe):
                gstep = epoch * spe + i
                x, y = data.train_batch(ds, config.batch_size, rng_seed, gstep)
                batch = parallel.shard_batch({"image": x, "label": y}, mesh)
                state, m = train_step(state, batch, gstep) if head else train_step(state, batch)
                history.append(m)
                progress.update()
                if (i + 1) % config.log_every_steps == 0 or i + 1 == spe:
                    start = len(history) - ((i % config.log_every_steps) + 1)
                    window = jax.device_get(history[start:])
                    bad = _first_non_finite(window, epoch * spe + start)
                    if bad is not None:
                        raise NonFiniteLossError(
                            f"loss term {bad[1]!r} became non-finite at step {bad[0]} (epoch {epoch + 1}); "
                            "lower optimizer.learning_rate or the loss weights"
                        )
                    history[start:] = window
                    if not progress.tty:
                        print(
                            f"epoch {epoch + 1} step {i + 1}/{spe}: loss {float(window[-1]['loss']):.4f}",
                            flush=True,
                        )
            progress.close()
            train_s = time.time() - t0
            last = (epoch + 1) * spe - 1
            rec = {"epoch": epoch, "step": last + 1, "lr": float(schedule(last - head * spe)) if epoch >= head else 0.0}
            if head:
                rec["teacher_lr"] = float(teacher_schedule(last))
            rec.update({f"train/{k}": float(np.mean([h[k] for h in history])) for k in history[0]})
            rec["images_per_s"] = spe * config.batch_size / train_s
            if (epoch + 1) % config.eval_every_epochs == 0 or epoch + 1 == num_epochs:
                rec.update(_evaluate(eval_step, state, ds, config.eval_batch_size, mesh))
            key = "student/top1" if nets.method.runs_student else "teacher/top1"
            if key in rec and rec[key] > best["student/top1"]:
                best = {"student/top1": rec[key], "epoch": epoch}
            records.append(rec)
            with metrics_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            for k, v in rec.items():
                if k not in ("epoch", "step"):
                    writer.add_scalar(k, v, rec["step"])
            writer.flush()
            print(_format_record(rec), flush=True)
            ckpt.save(rec["step"], state, {"epoch": epoch, "best": best, "config": config_json}, rec.get(key, best["student/top1"]))
        ckpt.wait()
        writer.close()

    final = records[-1] if records else {}
    _write_network(workdir / "student", config, "student", ds, s_shape, state) if nets.method.runs_student else None
    _write_network(workdir / "teacher", config, "teacher", ds, t_shape, state) if nets.method.runs_teacher else None
    if records:
        _plot_curves(records, workdir / "curves.png")
    summary = {
        "method": nets.method.name,
        "teacher_model": config.teacher.model,
        "student_model": config.student.model,
        "data_source": config.data.source,
        "train_size": ds.train_size,
        "test_size": ds.test_size,
        "num_classes": ds.num_classes,
        "teacher_input_shape": list(t_shape),
        "student_input_shape": list(s_shape),
        "num_devices": int(mesh.devices.size),
        "epochs": config.num_epochs,
        "teacher_head_start_epochs": head,
        "steps": int(state.step),
        "teacher_top1": final.get("teacher/top1"),
        "teacher_top5": final.get("teacher/top5"),
        "student_top1": final.get("student/top1"),
        "student_top5": final.get("student/top5"),
        "best_student_top1": best["student/top1"] if nets.method.runs_student else None,
        "best_student_epoch": best["epoch"] if nets.method.runs_student else None,
        "teacher_params_sha256": tree_sha256(_network(state, "teacher")),
        "student_params_sha256": tree_sha256(_network(state, "student")),
        "wall_s": time.time() - t_start,
        "config": json.loads(config.to_json_best_effort()),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _views(images, key, train, *, cfg, mean, std):
    return data.make_views(images, key, cfg, mean, std, train)


def _network(state: step.JointState, which: str) -> dict:
    return {"params": state.params[which], "batch_stats": state.batch_stats[which]}


def _write_network(directory: pathlib.Path, config, which, ds, input_shape, state) -> None:
    """The network alone (variables + how to feed it), for deployment, evaluation or a frozen teacher."""
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint.save_network(directory, jax.device_get(_network(state, which)))
    (directory / "network.json").write_text(json.dumps(_network_meta(config, which, ds, input_shape), indent=1))


def _format_record(rec: dict) -> str:
    parts = [f"epoch {rec['epoch'] + 1}"]
    for who in ("teacher", "student"):
        if f"{who}/top1" in rec:
            parts.append(f"{who} top-1 {100 * rec[who + '/top1']:.2f}%")
    parts.append(f"loss {rec['train/loss']:.4f}")
    parts.append(f"{rec['images_per_s']:.0f} img/s")
    return " | ".join(parts)


def restore_network(directory: str | pathlib.Path):
    """Loads a saved ``student/`` or ``teacher/`` folder: returns (module, variables, meta)."""
    directory = pathlib.Path(directory)
    meta_path = directory / "network.json"
    if not meta_path.exists():
        raise ValueError(f"{directory} is not a saved network (no network.json): pass a run's student/ or teacher/ folder")
    meta = json.loads(meta_path.read_text())
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[meta.get("dtype", "float32")]
    model = create_model(meta["model"], meta["num_classes"], dtype=dtype)
    x = jax.ShapeDtypeStruct((1, *meta["input_shape"]), jnp.float32)
    abstract = jax.eval_shape(lambda k, x: model.init(k, x, train=False), jax.random.key(0), x)
    variables = checkpoint.load_network(directory, abstract)
    return model, variables, meta
