"""Where the joint step's time goes on CPU: per-kind totals of XLA's thunks from a profiler trace.

  .venv/bin/python benchmarks/profile_step.py --pair resnet56-resnet20 --batch_size 64
  XLA_FLAGS=... EKD_JAX_XLA_DEFAULTS=0 .venv/bin/python benchmarks/profile_step.py ...

Traces a few compiled steps with ``jax.profiler`` (XLA CPU thunks emit trace events), matches
each event to its HLO instruction in the compiled module and sums the time by kind: forward
convolutions, input-gradient convolutions, filter-gradient convolutions (window = the feature
map), transposes/copies, other fusions, etc. Thunks may run concurrently on the 2 cores, so the
kind totals can exceed the wall time; shares are of the summed thunk time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import pathlib
import re
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import ekd_jax  # noqa: E402,F401

sys.path.insert(0, str(ROOT / "benchmarks"))
import patches  # noqa: E402
from compare_cpu import jax_timer  # noqa: E402


def classify(hlo_text: str) -> dict[str, str]:
    kinds = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+(?:\{[^}]*\})? ([\w\-]+)\(", line)
        if not m:
            continue
        name, op = m.groups()
        if op == "convolution":
            w = re.search(r"window=\{size=(\d+)x(\d+)", line)
            k = int(w.group(1)) if w else 1
            back = "transpose(" in line
            if k > 3:
                kind = "conv: filter grad"
            elif "lhs_dilate" in line or back:
                kind = "conv: input grad"
            else:
                kind = "conv: forward" + (" 1x1" if k == 1 else "")
        elif op == "fusion":
            kind = "fusion: transpose/copy" if "transpose" in name or "copy" in name else "fusion: elementwise/reduce"
            if "kind=kCustom" in line or "__custom_fusion" in line:
                kind = "fusion: library (xnn/ynn/onednn)"
        elif op in ("copy", "transpose"):
            kind = "fusion: transpose/copy"
        elif op == "custom-call":
            kind = "custom-call"
        elif op in ("dot",):
            kind = "dot"
        else:
            kind = f"other: {op}"
        kinds[name] = kind
    return kinds


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pair", default="resnet56-resnet20")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--method", default="ekd")
    p.add_argument("--adapter", choices=("ekd", "1x1"), default="ekd")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--override", action="append", default=[])
    p.add_argument("--hlo_out", default=None, help="write the compiled HLO text here")
    p.add_argument("--patches", default="", help="benchmarks/patches.py names, comma-separated")
    a = p.parse_args()
    if a.adapter == "1x1":
        patches.adapter_1x1()
    patches.apply(a.patches)
    import jax
    from jax._src.lib import _profile_data

    jt = jax_timer(a.pair, a.batch_size, a.method, a.override)
    hlo = jt.step_fn.as_text()
    if a.hlo_out:
        pathlib.Path(a.hlo_out).write_text(hlo)
    kinds = classify(hlo)
    jt.run(2)
    d = tempfile.mkdtemp()
    t0 = time.perf_counter()
    with jax.profiler.trace(d):
        jt.run(a.steps)
    wall = (time.perf_counter() - t0) / a.steps
    (path,) = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
    pd = _profile_data.ProfileData.from_file(path)
    by_kind, by_name = collections.Counter(), collections.Counter()
    for plane in pd.planes:
        if not plane.name.startswith("/host"):
            continue
        for line in plane.lines:
            for ev in line.events:
                kind = kinds.get(ev.name)
                if kind is None:
                    continue
                by_kind[kind] += ev.duration_ns / 1e6 / a.steps
                by_name[ev.name] += ev.duration_ns / 1e6 / a.steps
    total = sum(by_kind.values())
    print(f"# {a.pair} batch {a.batch_size} {a.method}: wall {1e3 * wall:.0f} ms/step (with tracing), "
          f"thunk time {total:.0f} ms/step; XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}")
    for k, v in by_kind.most_common():
        print(f"{k:36s} {v:9.1f} ms  {100 * v / total:5.1f}%")
    print("# top instructions")
    for k, v in by_name.most_common(a.top):
        print(f"{k:48s} {kinds[k]:28s} {v:8.1f} ms")


if __name__ == "__main__":
    main()
