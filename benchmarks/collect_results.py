"""Prints the markdown tables of docs/results.md from the study's run folders.

  python benchmarks/collect_results.py runs/ablation runs/study_full runs/study_lowres4
  python benchmarks/collect_results.py --paired [--rows=vanilla,dml,...] runs/study_full runs/abl_full

An ablation folder (benchmarks/ablation.py) gives its table (mean ± std over the finished seeds);
a comparison folder (python -m ekd_jax.compare) its results.md; any other folder one row per
finished run (``*/summary.json``). With ``--paired``, the finished runs of all the folders are
pooled by run name (``<name>`` or ``<name>_s<seed>``; the same name and seed in two folders is the
same config, the later folder's run is used; an online method's run with a teacher head start is
named ``<name>_head``; ``FOLDER@TAG`` appends ``_TAG`` to every row name of a folder, e.g.
``runs/study_full_gamma0@gamma0`` gives ``ekd_gamma0`` beside ``runs/study_full``'s ``ekd``) into
one table with each run's per-seed student top-1, its train top-1 and last-tenth spread, and its
paired per-seed difference to ``vanilla``, ``dml``, ``kd`` and ``ekd`` (mean ± s.e.; the bases the
folders have). The teacher alone's row holds its own top-1, so its
difference to ``vanilla`` is the capability gap.
"""

import json
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from ekd_jax.compare import _mean_std, fmt_pct, paired_difference  # noqa: E402

BASES = ("vanilla", "dml", "kd", "ekd", "dml_head")


def pct(x):
    return "–" if x is None else f"{100 * x:.2f}"


def main(folders):
    for folder in map(pathlib.Path, folders):
        print(f"\n### {folder}\n")
        for table in ("ablation.md", "results.md"):
            if (folder / table).exists():
                print((folder / table).read_text())
                break
        else:
            print("| run | student top-1 | student best | teacher top-1 | train images | student input | minutes |")
            print("|---|---|---|---|---|---|---|")
            for summ in sorted(folder.glob("*/summary.json")):
                s = json.loads(summ.read_text())
                print(f"| {summ.parent.name} | {pct(s['student_top1'])} | {pct(s['best_student_top1'])} "
                      f"| {pct(s['teacher_top1'])} | {s['train_size']} | {s['student_input_shape']} | {s['wall_s'] / 60:.1f} |")


def paired(folders, rows=None):
    runs: dict[str, dict[int, dict]] = {}
    for spec in folders:
        folder, _, tag = spec.partition("@")
        for summ in sorted(pathlib.Path(folder).glob("*/summary.json")):
            s = json.loads(summ.read_text())
            name = re.sub(r"_s\d+$", "", summ.parent.name)
            if s["student_top1"] is None:  # the teacher alone: its row holds the teacher's top-1
                name = "teacher alone (its top-1)"
            if s.get("teacher_head_start_epochs") and not name.endswith("_head"):
                name += "_head"  # e.g. runs/study_full_head/ekd_s0 next to runs/study_full/ekd_s0
            if tag:  # last, so that a tagged folder's teacher alone gets its own row too
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
        if ckpt:  # an offline method: its teacher trained in another run
            t_sum = pathlib.Path(ckpt) / "summary.json"
            t_ep = json.loads(t_sum.read_text())["epochs"] if t_sum.exists() else "?"
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
