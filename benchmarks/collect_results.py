"""Prints the markdown tables of docs/results.md from the study's run folders.

  python benchmarks/collect_results.py runs/ablation runs/study_full runs/study_lowres4 runs/study_few100
"""

import json
import pathlib
import sys


def pct(x):
    return "–" if x is None else f"{100 * x:.2f}"


def main(folders):
    for folder in map(pathlib.Path, folders):
        abl = folder / "ablation.json"
        if abl.exists():
            rows = json.loads(abl.read_text())
            print(f"\n### {folder.name}\n\n| variant | student top-1 | student best | teacher top-1 | minutes | overrides |")
            print("|---|---|---|---|---|---|")
            for name, r in rows.items():
                print(f"| {name} | {pct(r['student_top1'])} | {pct(r['best_student_top1'])} | {pct(r['teacher_top1'])} "
                      f"| {r['wall_s'] / 60:.1f} | `{json.dumps(r['overrides'])}` |")
        for summ in sorted(folder.glob("*/summary.json")) if not abl.exists() else []:
            s = json.loads(summ.read_text())
            print(f"| {folder.name} | {summ.parent.name} | {pct(s['student_top1'])} | {pct(s['best_student_top1'])} "
                  f"| {pct(s['teacher_top1'])} | {s['train_size']} | {s['student_input_shape']} | {s['wall_s'] / 60:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
