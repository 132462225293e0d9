#!/usr/bin/env bash
# The one entry command of the GPU check (issue 12, item 5): picks a Python that has JAX, prints
# its version and the GPU, then runs benchmarks/gpu_check.py with every argument given here.
#
#   bash benchmarks/gpu_check.sh --data runs/gpu/cifar10_small.npz --wheels runs/gpu/wheels [--budget 480]
#
# Results go to $OUT (the device tool's folder that comes back), else runs/gpu/out.
# PYTHON=/path/to/python overrides the choice. The wheels: bash benchmarks/gpu_wheels.sh runs/gpu/wheels.
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import jax" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
if [ -z "$PY" ]; then
  echo "error: no python on PATH imports jax (set PYTHON=...)" >&2
  PY=python3
fi
echo "python: $(command -v "$PY") -> $("$PY" -V 2>&1)"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L
echo "cpus: $(nproc)  out: ${OUT:-runs/gpu/out}"
exec "$PY" benchmarks/gpu_check.py "$@"
