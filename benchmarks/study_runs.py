"""Carries the study's finished runs across sessions: their small text records, not their weights.

  python benchmarks/study_runs.py save runs/abl_few100 runs/study_few100   # runs/X -> docs/study_runs/X.json
  python benchmarks/study_runs.py restore                                  # docs/study_runs/*.json -> runs/*

``runs/`` is not tracked (checkpoints and weights are large), so a new checkout starts without it.
Each study (a folder of runs) is one committed file, ``docs/study_runs/<study>.json``::

  {"tables": {"results.json": {...}, "results.md": ["line", ...]},      # or ablation.json / .md
   "runs": {"<run>": {"summary.json": {...}, "metrics.jsonl": [{...}, ...]}}}

with one table line, summary field or metrics record per line (``json.load`` reads it, git diffs
it line by line). ``save`` merges a folder's tables and finished runs (``*/summary.json``) into its
study's file (a run saved again replaces its record); ``restore`` writes each file back byte for
byte as the run wrote it, leaving files already in ``runs/`` alone. ``compare.run_one`` then reuses
a finished run (same config) instead of training it again; unfinished runs are not carried (they
restart from scratch). ``load`` reads a study from either form (benchmarks/collect_results.py).
"""

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
STORE = ROOT / "docs" / "study_runs"
TABLES = ("ablation.json", "ablation.md", "results.json", "results.md")
RECORDS = ("summary.json", "metrics.jsonl")


def decode(name: str, text: str):
    """A file's content as stored: .json parsed, .jsonl a list of records, other text a list of lines."""
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines()]
    return json.loads(text) if name.endswith(".json") else text.split("\n")


def encode(name: str, value) -> str:
    """The file's text, formatted as the runs write it (json.dumps, indent 1 for .json)."""
    if name.endswith(".jsonl"):
        return "".join(json.dumps(record) + "\n" for record in value)
    return json.dumps(value, indent=1) if name.endswith(".json") else "\n".join(value)


def read_folder(folder: pathlib.Path, exact: bool = False) -> dict:
    """A folder of runs as a study: its tables and its finished runs' records. ``exact`` (``save``):
    refuse a file that ``restore`` would not write back byte for byte."""
    def read(path):
        text = path.read_text()
        if exact and encode(path.name, decode(path.name, text)) != text:
            raise ValueError(f"{path} is not formatted as a run writes it: it would not come back as it is")
        return decode(path.name, text)

    runs = {s.parent.name: {n: read(s.parent / n) for n in RECORDS if (s.parent / n).exists()}
            for s in sorted(folder.glob("*/summary.json"))}
    return {"tables": {n: read(folder / n) for n in TABLES if (folder / n).exists()}, "runs": runs}


def load(spec: str) -> dict:
    """A study from a folder of runs (runs/X), a study file (docs/study_runs/X.json, ".json" optional)
    or its name (X)."""
    if pathlib.Path(spec).is_dir():
        return read_folder(pathlib.Path(spec))
    for file in (pathlib.Path(spec), pathlib.Path(f"{spec}.json"), STORE / f"{spec}.json"):
        if file.is_file():
            return json.loads(file.read_text("utf-8"))
    raise SystemExit(f"{spec}: neither a folder of runs nor a study file (nor {STORE / spec}.json)")


def run_summary(run: str) -> dict | None:
    """A run's summary (e.g. runs/X/teacher_s0): from its folder, else from docs/study_runs/X.json."""
    path = pathlib.Path(run)
    if (path / "summary.json").exists():
        return json.loads((path / "summary.json").read_text())
    file = STORE / f"{path.parent.name}.json"
    record = json.loads(file.read_text("utf-8"))["runs"].get(path.name) if file.is_file() else None
    return record["summary.json"] if record else None


def dumps(value, depth: int = 4, pad: str = "") -> str:
    """JSON text with the first ``depth`` levels one item a line (a study: fields, records, table lines)."""
    if depth == 0 or not isinstance(value, (dict, list)) or not value:
        return json.dumps(value, ensure_ascii=False)
    inner = pad + " "
    if isinstance(value, list):
        return "[\n" + ",\n".join(inner + dumps(v, depth - 1, inner) for v in value) + "\n" + pad + "]"
    items = (f"{inner}{dumps(k, 0)}: {dumps(v, depth - 1, inner)}" for k, v in value.items())
    return "{\n" + ",\n".join(items) + "\n" + pad + "}"


def save(folders: list[str]) -> None:
    for folder in map(pathlib.Path, folders):
        new, file = read_folder(folder, exact=True), STORE / f"{folder.name}.json"
        study = json.loads(file.read_text("utf-8")) if file.exists() else {"tables": {}, "runs": {}}
        study = {part: dict(sorted({**study[part], **new[part]}.items())) for part in ("tables", "runs")}
        if study["tables"] or study["runs"]:
            STORE.mkdir(parents=True, exist_ok=True)
            file.write_text(dumps(study) + "\n", "utf-8")
            print(f"saved {folder} -> {file}")


def unpack(study: dict, folder: pathlib.Path) -> None:
    """Writes a study's files into ``folder`` (those not there yet), as the runs wrote them."""
    files = dict(study["tables"])
    files.update((f"{run}/{name}", v) for run, record in study["runs"].items() for name, v in record.items())
    for name, value in files.items():
        if not (folder / name).exists():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(encode(name, value))


def restore() -> None:
    for file in sorted(STORE.glob("*.json")):
        unpack(json.loads(file.read_text("utf-8")), ROOT / "runs" / file.stem)
        print(f"restored {file} -> {ROOT / 'runs' / file.stem}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["save"] and sys.argv[2:]:
        save(sys.argv[2:])
    elif sys.argv[1:] == ["restore"]:
        restore()
    else:
        raise SystemExit("usage: study_runs.py save FOLDER... | restore")
