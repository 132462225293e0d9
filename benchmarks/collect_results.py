"""Prints the markdown tables of docs/results.md from the study's run records.

  python benchmarks/collect_results.py docs/study_runs/abl_few100_b32.json docs/study_runs/study_full.json
  python benchmarks/collect_results.py --paired [--rows=vanilla,dml,...] docs/study_runs/study_full.json runs/abl_full

Each argument is a study: its file in docs/study_runs/ (``<study>.json``, or just its name) or a
folder of runs (``runs/<study>``; benchmarks/study_runs.py). An ablation (benchmarks/ablation.py)
gives its table (mean ± std over the finished seeds); a comparison (python -m ekd_jax.compare) its
results.md; any other study one row per finished run. With ``--paired``, the finished runs of all
the studies are pooled by run name (``<name>`` or ``<name>_s<seed>``; the same name and seed in two
studies is the same config, the later study's run is used; an online method's run with a teacher
head start is named ``<name>_head``; ``STUDY@TAG`` appends ``_TAG`` to every row name of a study,
e.g. ``study_full_gamma0@gamma0`` gives ``ekd_gamma0`` beside ``study_full``'s ``ekd``) into
one table with each run's per-seed student top-1, its train top-1 and last-tenth spread, and its
paired per-seed difference to ``vanilla``, ``dml``, ``kd`` and ``ekd`` (mean ± s.e.; the bases the
studies have). The teacher alone's row holds its own top-1, so its
difference to ``vanilla`` is the capability gap. An offline method's teacher epochs are its
teacher run's (``config.teacher.checkpoint``: that folder if there, else its record).
"""

import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from ekd_jax.compare import _mean_std, fmt_pct, paired_difference  # noqa: E402
from study_runs import load, run_summary  # noqa: E402  (benchmarks/study_runs.py)

BASES = ("vanilla", "dml", "kd", "ekd", "dml_head")


def pct(x):
    return "–" if x is None else f"{100 * x:.2f}"


def main(studies):
    for spec in studies:
        study = load(spec)
        print(f"\n### {spec}\n")
        for table in ("ablation.md", "results.md"):
            if table in study["tables"]:
                print("\n".join(study["tables"][table]))
                break
        else:
            print("| run | student top-1 | student best | teacher top-1 | train images | student input | minutes |")
            print("|---|---|---|---|---|---|---|")
            for run, record in study["runs"].items():
                s = record["summary.json"]
                print(f"| {run} | {pct(s['student_top1'])} | {pct(s['best_student_top1'])} "
                      f"| {pct(s['teacher_top1'])} | {s['train_size']} | {s['student_input_shape']} | {s['wall_s'] / 60:.1f} |")


def paired(studies, rows=None):
    runs: dict[str, dict[int, dict]] = {}
    for spec in studies:
        study, _, tag = spec.partition("@")
        for run, record in load(study)["runs"].items():
            s = record["summary.json"]
            name = re.sub(r"_s\d+$", "", run)
            if s["student_top1"] is None:  # the teacher alone: its row holds the teacher's top-1
                name = "teacher alone (its top-1)"
            if s.get("teacher_head_start_epochs") and not name.endswith("_head"):
                name += "_head"  # e.g. study_full_head's ekd_s0 next to study_full's ekd_s0
            if tag:  # last, so that a tagged study's teacher alone gets its own row too
                name += f"_{tag}"
            runs.setdefault(name, {})[s["config"]["seed"]] = s
    top1 = {n: {k: r["student_top1"] if r["student_top1"] is not None else r["teacher_top1"] for k, r in by_seed.items()}
            for n, by_seed in runs.items()}
    bases = [b for b in BASES if b in top1]
    print("| run | seeds | per seed | student top-1 | teacher top-1 | "
          + " | ".join(f"student - {b} (paired)" for b in bases)
          + " | student train top-1 | last tenth | teacher epochs |")
    print("|---|---|---|---|---|" + "---|" * len(bases) + "---|---|---|")
    for name in sorted(runs, key=lambda n: (0, BASES.index(n), "") if n in BASES else (1, 0, n)):
        if rows and name not in rows:
            continue
        by_seed = dict(sorted(runs[name].items()))
        m, sd = _mean_std(list(top1[name].values()))
        tm, tsd = _mean_std([r["teacher_top1"] for r in by_seed.values()])
        one = len(by_seed) == 1
        diffs = []
        for b in bases:
            d, se, n = paired_difference(top1[name], top1[b]) if b != name else (None, None, 0)
            diffs.append(fmt_pct(d, se, "+") + (f" ({n})" if n else ""))
        r0 = next(iter(by_seed.values()))
        t_ep = r0["epochs"] + r0.get("teacher_head_start_epochs", 0) if r0["teacher_top1"] is not None else "–"
        ckpt = r0["config"]["teacher"].get("checkpoint")
        if ckpt:  # an offline method: its teacher trained in another run (its folder, else its record)
            t_ep = (run_summary(ckpt) or {}).get("epochs", "?")
        train_m, _ = _mean_std([r.get("student_train_top1") for r in by_seed.values()])
        spread = [r["student_top1_last_tenth"][1] - r["student_top1_last_tenth"][0]
                  for r in by_seed.values() if r.get("student_top1_last_tenth")]
        print(f"| {name} | {','.join(map(str, by_seed))} | {', '.join(pct(top1[name][k]) for k in by_seed)} | "
              f"{fmt_pct(m, None if one else sd)} | {fmt_pct(tm, None if one else tsd)} | " + " | ".join(diffs)
              + f" | {fmt_pct(train_m, None)} | {pct(max(spread)) if spread else '–'} | {t_ep} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--paired"]:
        args = sys.argv[2:]
        rows = None
        if args and args[0].startswith("--rows="):  # only these run names, e.g. --rows=vanilla,dml
            rows, args = args[0].split("=", 1)[1].split(","), args[1:]
        paired(args, rows)
    else:
        main(sys.argv[1:])
