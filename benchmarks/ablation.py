"""EKD ablation on one scenario (docs/results.md): each variant one run, results written as they come.

  python benchmarks/ablation.py --config configs/study.py:few100 --workdir runs/ablation \
      [--config.data.source=npz:/path/to/cifar10_small.npz] [--only name1,name2] [--seeds 0,1,2]

Each (variant, seed) trains in ``<workdir>/<variant>`` (seed 0) or ``<workdir>/<variant>_s<seed>``;
seeds run outermost, so every variant has seed 0 before any has seed 1. The table reports the
mean and standard deviation over the seeds finished so far.
"""

import json
import pathlib

from absl import app, flags, logging

import ekd_jax  # noqa: F401
from ekd_jax import compare

FLAGS = flags.FLAGS  # --config and --workdir come from ekd_jax.compare
_CONFIG = compare._CONFIG
flags.DEFINE_list("only", [], "Run only these variants.")
flags.DEFINE_bool("table_only", False, "Only rewrite ablation.md from ablation.json (no training).")
# compare defines --seeds (default 0,1); read it here too.

# METHOD.md as written: transfer at full weight from step 0, raw features, element-mean MSE.
# Every variant is spelled out against it, so the table does not move when the defaults do.
AS_WRITTEN = {"method": "ekd", "loss.ramp_start": 0.0, "loss.ramp_length": 0.0, "loss.feature_norm": False,
              "loss.feature_reduction": "mean", "loss.transfer_mask": "none", "teacher.head_start": 0.0}
RAMP_NORM = {"loss.ramp_length": 0.5, "loss.feature_norm": True, "loss.feature_reduction": "sum"}
LATE_NORM = {"loss.ramp_start": 0.5, "loss.ramp_length": 0.2, "loss.feature_norm": True, "loss.feature_reduction": "sum"}
VARIANTS = {
    "vanilla": {"method": "vanilla"},
    "dml": {"method": "dml", "teacher.head_start": 0.0},  # DML as published: both start together
    "ekd_as_written": {"method": "ekd"},  # METHOD.md defaults: alpha=beta=1, tau 4, raw MSE, from step 0
    "ekd_ramp_norm": {"method": "ekd", **RAMP_NORM},
    "ekd_ramp_norm_coevo": {"method": "ekd", **RAMP_NORM, "loss.gamma": 1.0},
    "ekd_ramp_norm_coevo_tau1": {"method": "ekd", **RAMP_NORM, "loss.gamma": 1.0, "loss.tau": 1.0},
    "ekd_ramp_norm_mask": {"method": "ekd", **RAMP_NORM, "loss.transfer_mask": "teacher_correct"},
    "ekd_ramp_auxhead": {"method": "ekd", "loss.ramp_length": 0.5, "guided.type": "aux_head"},
    "ekd_ramp_norm_features_only": {"method": "ekd", **RAMP_NORM, "loss.alpha": 0.0},
    # Transfer only in the second half, when the online teacher has pulled ahead (METHOD.md: it is
    # no better than the student until the first learning-rate drop).
    "ekd_late_norm": {"method": "ekd", **LATE_NORM},
    "ekd_late_norm_mask": {"method": "ekd", **LATE_NORM, "loss.transfer_mask": "teacher_correct"},
    # (Run on 2026-11-26 with the teacher-correct mask; machine A's run of 2026-11-24 had none.)
    "ekd_late_norm_coevo_tau1": {"method": "ekd", **LATE_NORM, "loss.gamma": 1.0, "loss.tau": 1.0,
                                 "loss.transfer_mask": "teacher_correct"},
    # Transfer from step 0, each sample weighted by how far the teacher is ahead on it,
    # max(0, p_T(y) - p_S(y)): no hand-set schedule; nothing flows while the teacher is no better.
    "ekd_ahead_norm": {"method": "ekd", **RAMP_NORM, "loss.ramp_length": 0.0, "loss.transfer_mask": "teacher_ahead"},
    "ekd_ahead_norm_coevo_tau1": {"method": "ekd", **RAMP_NORM, "loss.ramp_length": 0.0,
                                  "loss.transfer_mask": "teacher_ahead", "loss.gamma": 1.0, "loss.tau": 1.0},
    # DML's two logit terms exactly (gamma = alpha = 1, tau 1, from step 0, every sample) plus the
    # guided feature term: EKD as a superset of the strongest online baseline.
    "ekd_dml_feat": {"method": "ekd", "loss.feature_norm": True, "loss.feature_reduction": "sum",
                     "loss.gamma": 1.0, "loss.tau": 1.0, "loss.transfer_mask": "none"},
    # The same, but the feature term only late (as in the defaults): DML's logit terms from step 0.
    "ekd_dml_latefeat": {"method": "ekd", **LATE_NORM, "loss.kd_ramp_start": 0.0, "loss.kd_ramp_length": 0.0,
                         "loss.gamma": 1.0, "loss.tau": 1.0, "loss.transfer_mask": "none"},
    # Hinton's logit term (tau 4) from the online teacher from step 0 on every sample, the feature
    # term late; the teacher learns from labels only.
    "ekd_kd_early": {"method": "ekd", **LATE_NORM, "loss.kd_ramp_start": 0.0, "loss.kd_ramp_length": 0.0,
                     "loss.transfer_mask": "none"},
    # The defaults' late schedule on every sample (no teacher-correct mask), with the feature term
    # at full or a tenth of its weight.
    "ekd_late_norm_beta01": {"method": "ekd", **LATE_NORM, "loss.transfer_mask": "none", "loss.beta": 0.1},
    # Teacher head start (teacher.head_start = 1.0: as many epochs as the student's budget): the
    # online teacher trains alone first, then both go on together (the student gets its full budget).
    "ekd_head_kd": {"method": "ekd", **LATE_NORM, "loss.kd_ramp_start": 0.0, "loss.kd_ramp_length": 0.0,
                     "loss.transfer_mask": "teacher_correct", "teacher.head_start": 1.0},
    "ekd_head_all": {"method": "ekd", **LATE_NORM, "loss.ramp_start": 0.0, "loss.ramp_length": 0.0,
                      "loss.transfer_mask": "teacher_correct", "teacher.head_start": 1.0},
    "dml_head": {"method": "dml", "teacher.head_start": 1.0},  # the control: DML given the same head start
    # A shorter head start: a third of the student's budget (1 epoch of the study's 3).
    "ekd_head033_all": {"method": "ekd", **LATE_NORM, "loss.ramp_start": 0.0, "loss.ramp_length": 0.0,
                        "loss.transfer_mask": "teacher_correct", "teacher.head_start": 0.34},
}


def apply(config, overrides):
    c = config.copy_and_resolve_references()
    if overrides.get("method") == "ekd":
        overrides = {**AS_WRITTEN, **overrides}
    c.update_from_flattened_dict(overrides)
    return c


def main(argv):
    logging.set_verbosity(logging.WARNING)
    root = pathlib.Path(FLAGS.workdir)
    root.mkdir(parents=True, exist_ok=True)
    names = FLAGS.only or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; available: {', '.join(VARIANTS)}")
    seeds = [int(s) for s in FLAGS.seeds]
    runs: dict[str, dict[int, dict]] = {}
    table_path = root / "ablation.json"
    if table_path.exists():
        runs = {n: {int(k): v for k, v in r.items()} for n, r in json.loads(table_path.read_text()).get("runs", {}).items()}
    if FLAGS.table_only:
        write_table(runs, root)
        return
    for seed in seeds:
        for name in names:
            c = apply(_CONFIG.value, VARIANTS[name])
            c.seed = seed
            s = compare.run_one(c, root / (name if seed == 0 else f"{name}_s{seed}"))
            runs.setdefault(name, {})[seed] = {
                "student_top1": s["student_top1"], "best_student_top1": s["best_student_top1"],
                "teacher_top1": s["teacher_top1"], "wall_s": s["wall_s"],
            }
            write_table(runs, root)


def _fmt(xs):
    m, sd = compare._mean_std(xs)
    return compare.fmt_pct(m, sd if len([x for x in xs if x is not None]) > 1 else None)


def write_table(runs: dict[str, dict[int, dict]], root: pathlib.Path) -> None:
    (root / "ablation.json").write_text(json.dumps(
        {"variants": {n: VARIANTS.get(n) for n in runs}, "runs": runs}, indent=1))
    lines = ["| variant | seeds | student top-1 | student best | teacher top-1 | per seed | "
             "student - vanilla, paired by seed | overrides |",
             "|---|---|---|---|---|---|---|---|"]
    top1 = {n: {k: r["student_top1"] for k, r in by_seed.items()} for n, by_seed in runs.items()}
    for n, by_seed in runs.items():
        rs = [by_seed[k] for k in sorted(by_seed)]
        per = ", ".join(f"{100 * r['student_top1']:.2f}" for r in rs)
        d_m, d_se, d_n = compare.paired_difference(top1[n], top1.get("vanilla", {})) if n != "vanilla" else (None, None, 0)
        d = compare.fmt_pct(d_m, d_se, "+") + (f" (s.e.; {d_n} seeds)" if d_se is not None else "")
        lines.append(f"| {n} | {','.join(map(str, sorted(by_seed)))} | {_fmt([r['student_top1'] for r in rs])} | "
                     f"{_fmt([r['best_student_top1'] for r in rs])} | {_fmt([r['teacher_top1'] for r in rs])} | "
                     f"{per} | {d} | `{json.dumps(VARIANTS.get(n))}` |")
    (root / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
