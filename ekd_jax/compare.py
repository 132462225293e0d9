"""Comparison runner: several methods x seeds on the same data and subset, one table and a bar plot.

  python -m ekd_jax.compare --config configs/quickstart.py --methods vanilla,kd,dml,ekd \
      --seeds 0,1 --workdir runs/compare [--config.num_epochs=30 ...]

Each (method, seed) trains in ``<workdir>/<method>_s<seed>`` (resumed if interrupted, reused if
finished); offline methods (kd, fitnet, at) first get a ``teacher`` run of the same seed.
``--reuse DIR1,DIR2`` takes a finished run of exactly the same config from other workdirs (another
comparison, an ablation) instead of training it again: its records, exported weights and TensorBoard
files are copied into this workdir (not its checkpoints). A run records the switches its method
ignores at the value it runs with (no head start without an online teacher; the teacher alone at the
full-resolution view), so a low-resolution comparison reuses the full-data teacher.
Writes ``results.md``, ``results.json`` and ``results.png`` in ``<workdir>`` after every run, so
partial results survive an interruption.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
from absl import flags
from ml_collections import config_flags

import ekd_jax  # noqa: F401  (XLA CPU defaults before jax starts)
from ekd_jax import cli, rundir
from ekd_jax.methods import METHODS
from ekd_jax.spec import DataSpec
from ekd_jax.spec.validate import validate

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "the experiment config file, e.g. configs/study.py:few100", lock_config=True)
flags.DEFINE_string("workdir", None, "the folder for all runs and the results")
flags.DEFINE_list("methods", ["vanilla", "kd", "dml", "ekd"], "Methods to compare.")
flags.DEFINE_list("seeds", ["0", "1"], "Seeds (init and data order; the few-sample subset stays fixed).")
flags.DEFINE_list("reuse", [], "Workdirs whose finished runs of the same config are copied in, not trained again.")


def _same_config(summary: dict, config) -> bool:
    """A finished run's config is this one (switches added since then at their defaults)."""
    return not rundir.config_difference(summary["config"], validate(config, check_files=False).to_json())


def _teacher_sha(workdir: str) -> str | None:
    done = rundir.read_summary(pathlib.Path(workdir)) if workdir else None
    return done.get("teacher_params_sha256") if done else None


def find_finished(config, folders, weights: str | None = None) -> tuple[pathlib.Path, dict] | None:
    """The first finished run (``<folder>/<run>/summary.json``) whose config is ``config`` (and that
    holds the network folder ``weights``, if given), and its summary as this workdir records it.

    An offline method's run names its teacher by folder: a run from another workdir counts as the
    same when everything else agrees and its teacher's parameters hash equal to ``config``'s; its
    summary then names ``config``'s teacher folder (the same weights)."""
    ours = config.teacher.checkpoint
    sha = _teacher_sha(ours)
    for folder in map(pathlib.Path, folders):
        for path in sorted(folder.glob("*/summary.json")):
            summary = json.loads(path.read_text())
            theirs = summary["config"].get("teacher", {}).get("checkpoint", "")
            if theirs and theirs != ours:
                if sha is None or sha != _teacher_sha(theirs):
                    continue
                summary = {**summary, "config": {**summary["config"],
                                                 "teacher": {**summary["config"]["teacher"],
                                                             "checkpoint": ours}}}
            if _same_config(summary, config) and not _weights_missing(path.parent, weights):
                return path.parent, summary
    return None


def _weights_missing(workdir: pathlib.Path, weights: str | None) -> bool:
    return weights is not None and not rundir.has_network(workdir, weights)


def run_one(config, workdir: pathlib.Path, reuse=(), weights: str | None = None) -> dict:
    """The finished run of ``config`` in ``workdir``: itself, a copy of one in ``reuse``, or trained.

    ``weights``: a network folder the caller needs besides the records (``"teacher"`` for an offline
    method's teacher). A finished run whose records are there but not those weights (records carried
    without weights, e.g. by benchmarks/study_runs.py into a new checkout) is trained again; CPU
    training is deterministic, so it is the same run, and a change in its parameters' hash is said."""
    from ekd_jax import train

    done = rundir.read_summary(workdir)
    if done is not None and _same_config(done, config):
        if not _weights_missing(workdir, weights):
            return done  # finished with this config
        print(f"{workdir} holds the finished run's records but not its {weights}/ weights: training it again", flush=True)
        (workdir / rundir.SUMMARY_FILE).unlink()
        summary = train.train_and_evaluate(config, str(workdir))
        old, new = done.get("teacher_params_sha256"), summary.get("teacher_params_sha256")
        if old and new and old != new:
            print(f"warning: {workdir} trained again to other teacher parameters (sha256 {new[:12]}, was {old[:12]})", flush=True)
        return summary
    if not workdir.exists() and reuse:
        found = find_finished(config, reuse, weights)
        if found is not None:
            src, summary = found
            print(f"reusing the finished run {src} (same config)", flush=True)
            shutil.copytree(src, workdir, ignore=shutil.ignore_patterns("checkpoints"))
            summary = {**summary, "copied_from": str(src)}
            rundir.write_summary(workdir, summary)
            return summary
    return train.train_and_evaluate(config, str(workdir))


def _drop_unused_switches(c) -> None:
    """Record switches a method ignores at the value it runs with, so that its runs are reused
    across comparisons that differ only there: methods without an online teacher ignore
    teacher.head_start (recorded 0); a method without a student (the teacher alone) ignores the
    student's view (recorded full resolution), so the low-resolution scenario's teacher is the
    full-data one (tests/test_train.py checks that the two train bit for bit alike)."""
    if not METHODS[c.method].online_teacher:
        c.teacher.head_start = 0.0
    if not METHODS[c.method].runs_student:
        c.data.student_downsample, c.data.lowres_mode = DataSpec.student_downsample, DataSpec.lowres_mode


def compare(config, methods: list[str], seeds: list[int], workdir: str, reuse=()) -> dict:
    """Runs every (method, seed) and writes the results; returns {method: [summaries]}.

    ``reuse``: folders of other workdirs whose finished runs of the same config are copied in
    rather than trained again (:func:`run_one`)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {', '.join(METHODS)}")
    root = pathlib.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in seeds:
        for method in methods:
            c = config.copy_and_resolve_references()
            c.seed, c.method = seed, method
            _drop_unused_switches(c)
            if METHODS[method].needs_teacher_checkpoint:
                t = config.copy_and_resolve_references()
                t.seed, t.method = seed, "teacher"
                _drop_unused_switches(t)
                c.teacher.checkpoint = str(root / f"teacher_s{seed}")
                # The offline method's run needs its teacher's weights only if it still has to
                # train: a finished one (records carried into a new checkout) keeps its teacher's
                # records as they are.
                done = rundir.read_summary(root / f"{method}_s{seed}")
                needs = None if done is not None and _same_config(done, c) else "teacher"
                run_one(t, root / f"teacher_s{seed}", reuse, weights=needs)
            print(f"=== {method}, seed {seed} ===", flush=True)
            results[method].append(run_one(c, root / f"{method}_s{seed}", reuse))
            write_results(results, config, root)
    return results


def _mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def paired_difference(values: dict[int, float], base: dict[int, float]) -> tuple[float | None, float | None, int]:
    """Mean and standard error of ``values[seed] - base[seed]`` over the seeds both have.

    The same seed gives both runs the same student initialisation and the same batches, so the
    per-seed difference removes most of the seed-to-seed spread that the two means carry.
    """
    d = [v - base[k] for k, v in values.items() if v is not None and base.get(k) is not None]
    if not d:
        return None, None, 0
    return float(np.mean(d)), (float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None), len(d)


def _student_by_seed(runs: list[dict]) -> dict[int, float]:
    return {r["config"]["seed"]: r["student_top1"] for r in runs}


def fmt_pct(m: float | None, s: float | None, sign: str = "") -> str:
    """``m`` (± ``s``) as percentages; '–' when there is no value, no '±' when there is no spread."""
    if m is None:
        return "–"
    return f"{100 * m:{sign}.2f}" if s is None else f"{100 * m:{sign}.2f} ± {100 * s:.2f}"


def write_results(results: dict[str, list[dict]], config, root: pathlib.Path) -> None:
    rows, table = [], {}
    base = results.get("vanilla") or []
    for method, runs in results.items():
        if not runs:
            continue
        s_m, s_s = _mean_std([r["student_top1"] for r in runs])
        b_m, b_s = _mean_std([r["best_student_top1"] for r in runs])
        t_m, t_s = _mean_std([r["teacher_top1"] for r in runs])
        d_m, d_se, d_n = (
            paired_difference(_student_by_seed(runs), _student_by_seed(base)) if method != "vanilla" else (None, None, 0)
        )
        dml = results.get("dml") or []
        e_m, e_se, e_n = (
            paired_difference(_student_by_seed(runs), _student_by_seed(dml)) if method != "dml" else (None, None, 0)
        )
        train_m, _ = _mean_std([r.get("student_train_top1") for r in runs])
        spread = [r["student_top1_last_tenth"][1] - r["student_top1_last_tenth"][0]
                  for r in runs if r.get("student_top1_last_tenth")]
        table[method] = {
            "student_top1_mean": s_m, "student_top1_std": s_s, "best_student_top1_mean": b_m,
            "teacher_top1_mean": t_m, "teacher_top1_std": t_s, "n": len(runs),
            "student_top1": [r["student_top1"] for r in runs], "seeds": [r["config"]["seed"] for r in runs],
            "minus_vanilla_mean": d_m, "minus_vanilla_se": d_se, "minus_vanilla_n": d_n,
            "minus_dml_mean": e_m, "minus_dml_se": e_se, "minus_dml_n": e_n,
            "student_train_top1_mean": train_m, "student_last_tenth_spread_max": max(spread) if spread else None,
        }
        one = len(runs) == 1  # no spread to report from one run
        rows.append(
            f"| {method} | {fmt_pct(s_m, None if one else s_s)} | {fmt_pct(b_m, None if one else b_s)} | "
            f"{fmt_pct(t_m, None if one else t_s)} | {fmt_pct(d_m, d_se, '+')} | {fmt_pct(e_m, e_se, '+')} | "
            f"{fmt_pct(train_m, None)} | {fmt_pct(max(spread) if spread else None, None)} | {len(runs)} |"
        )
    any_run = next(r for runs in results.values() for r in runs)
    head = (
        f"# Comparison: {config.teacher.model} -> {config.student.model} on {config.data.source}\n\n"
        f"train {any_run['train_size']} / test {any_run['test_size']} images, {config.num_epochs} epochs, "
        f"student input {any_run['student_input_shape']}, teacher input {any_run['teacher_input_shape']}; "
        + (f"online teachers (dml, ekd) first train alone for {config.teacher.head_start:g} x {config.num_epochs} "
           "epochs (teacher.head_start); " if config.teacher.head_start else "")
        + "top-1 in %, mean ± std over seeds (final epoch; 'best' = best epoch); 'student - vanilla': "
        "mean ± standard error of the per-seed difference to the vanilla student of the same seed (and "
        "to dml's); 'train': the student's top-1 on its last epoch's augmented batches; 'last tenth': the "
        "largest spread (max - min) of a run's student test top-1 over its last tenth of epochs.\n\n"
        "| method | student top-1 | student best | teacher top-1 | student - vanilla | student - dml | "
        "student train | last tenth | runs |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    (root / "results.md").write_text(head + "\n".join(rows) + "\n")
    (root / "results.json").write_text(json.dumps(table, indent=1))
    _bar_plot(table, root / "results.png", f"{config.teacher.model} -> {config.student.model}")


def _bar_plot(table: dict, path: pathlib.Path, title: str) -> None:
    from matplotlib.figure import Figure

    methods = list(table)
    fig = Figure(figsize=(1.3 * len(methods) + 2, 3.5))
    ax = fig.subplots()
    x = np.arange(len(methods))
    for off, who, color in ((-0.2, "student", "tab:blue"), (0.2, "teacher", "tab:orange")):
        means = [100 * (table[m][f"{who}_top1_mean"] or np.nan) for m in methods]
        stds = [100 * (table[m][f"{who}_top1_std"] or 0.0) for m in methods]
        ax.bar(x + off, means, 0.4, yerr=stds, label=who, color=color, capsize=3)
    ax.set_xticks(x, methods)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title)
    ax.legend()
    vals = [100 * table[m]["student_top1_mean"] for m in methods if table[m]["student_top1_mean"] is not None]
    if vals:
        ax.set_ylim(max(0, min(vals) - 10), None)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    try:
        seeds = [int(s) for s in FLAGS.seeds]
    except ValueError:
        raise ValueError(f"--seeds must be integers, got {FLAGS.seeds}") from None
    missing = [d for d in FLAGS.reuse if not pathlib.Path(d).is_dir()]
    if missing:
        raise ValueError(f"--reuse folder(s) {missing} do not exist; pass workdirs of earlier comparisons or ablations")
    compare(_CONFIG.value, FLAGS.methods, seeds, FLAGS.workdir, FLAGS.reuse)
    print((pathlib.Path(FLAGS.workdir) / "results.md").read_text())


def run() -> None:
    """Console script ``ekd-compare`` (pyproject.toml) = ``python -m ekd_jax.compare``."""
    cli.run(main, required=("config", "workdir"))


if __name__ == "__main__":
    run()
