"""Carries the study's finished runs across sessions: their small text records, not their weights.

  python benchmarks/study_runs.py save runs/abl_few100 runs/study_few100      # runs/X -> docs/study_runs/X
  python benchmarks/study_runs.py restore                                     # docs/study_runs/* -> runs/*

``runs/`` is not tracked (checkpoints and weights are large), so a new checkout starts without it.
``save`` copies each finished run's ``summary.json`` and ``metrics.jsonl`` (and a folder's
``ablation.*`` / ``results.*`` tables) into ``docs/study_runs/``, which is committed; ``restore``
puts them back where they were. ``compare.run_one`` then reuses a finished run (same config) instead
of training it again; unfinished runs are not carried (they restart from scratch).
"""

import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
STORE = ROOT / "docs" / "study_runs"
TABLES = ("ablation.json", "ablation.md", "results.json", "results.md")


def save(folders: list[str]) -> None:
    for folder in map(pathlib.Path, folders):
        dst = STORE / folder.name
        for name in TABLES:
            if (folder / name).exists():
                dst.mkdir(parents=True, exist_ok=True)
                shutil.copy2(folder / name, dst / name)
        for summary in sorted(folder.glob("*/summary.json")):
            run = dst / summary.parent.name
            run.mkdir(parents=True, exist_ok=True)
            shutil.copy2(summary, run / "summary.json")
            if (summary.parent / "metrics.jsonl").exists():
                shutil.copy2(summary.parent / "metrics.jsonl", run / "metrics.jsonl")
        print(f"saved {folder} -> {dst}")


def restore() -> None:
    for src in sorted(p for p in STORE.iterdir() if p.is_dir()) if STORE.exists() else []:
        dst = ROOT / "runs" / src.name
        for path in sorted(src.rglob("*")):
            target = dst / path.relative_to(src)
            if path.is_file() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
        print(f"restored {src} -> {dst}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["save"] and sys.argv[2:]:
        save(sys.argv[2:])
    elif sys.argv[1:] == ["restore"]:
        restore()
    else:
        raise SystemExit("usage: study_runs.py save FOLDER... | restore")
