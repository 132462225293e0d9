"""Prints the markdown tables of docs/results.md from the study's run folders.

  python benchmarks/collect_results.py runs/ablation runs/study_full runs/study_lowres4

An ablation folder (benchmarks/ablation.py) gives its table (mean ± std over the finished seeds);
a comparison folder (python -m ekd_jax.compare) its results.md; any other folder one row per
finished run (``*/summary.json``).
"""

import json
import pathlib
import sys


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


if __name__ == "__main__":
    main(sys.argv[1:])
