#!/usr/bin/env bash
# Downloads the wheels that benchmarks/gpu_check.py needs on a machine with no package index
# (the lent GPU machine has JAX with CUDA, flax, optax, orbax-checkpoint, chex and PyTorch only).
#
#   bash benchmarks/gpu_wheels.sh [DIR]        # default DIR: runs/gpu/wheels (ignored by git)
#
# What ekd_jax imports on the training path beyond {jax, flax, optax, orbax-checkpoint, chex,
# torch, numpy} (grep of ekd_jax/ and configs/):
#   ml_collections (config, data, every CLI)   -> ml-collections, which needs absl-py and PyYAML
#   absl (flags; chex and orbax need it too)   -> absl-py
#   tensorboardX (outputs.RunWriter)           -> tensorboardX, which needs protobuf and packaging
#   tqdm (only on a terminal)                  -> tqdm
#   PIL (ekd_jax/data imports it; used only to resize) -> pillow: NOT downloaded by default (4-5 MB
#        per Python version); gpu_check.py puts a stub in its place when it is missing, which is
#        enough for the 32x32 npz (no resize). --pillow downloads it too.
#   matplotlib (curves.png, compare's plot)    -> not downloaded (about 40 MB with its deps over
#        the Python versions); gpu_check.py skips the plot when it is missing.
#   sklearn (data.source='digits' only)        -> not needed on the GPU machine.
# PyYAML, protobuf and packaging are dependencies of flax / orbax-checkpoint, so they are very
# likely there already; they are included anyway because they are small. The device's Python is
# unknown: pure-Python wheels (py3-none-any) fit every version, PyYAML is downloaded for
# CPython 3.10-3.13 (manylinux x86_64).
set -euo pipefail

DIR=runs/gpu/wheels
PILLOW=0
for arg in "$@"; do
  case "$arg" in
    --pillow) PILLOW=1 ;;
    -h|--help) sed -n 2,24p "$0"; exit 0 ;;
    *) DIR="$arg" ;;
  esac
done
mkdir -p "$DIR"
PIP=(python3 -m pip download --quiet --only-binary=:all: --no-deps --dest "$DIR")

# Pure-Python wheels (one file serves every Python 3 version). Pins = requirements.txt where listed.
"${PIP[@]}" --python-version 3.11 ml-collections==1.1.0 absl-py==2.5.1 tensorboardX==2.6.5 tqdm==4.70.1 \
  packaging protobuf
# protobuf ships abi3/cp-specific wheels and a pure-Python one; make sure the pure one is there.
if ! ls "$DIR"/protobuf-*-py3-none-any.whl >/dev/null 2>&1; then
  "${PIP[@]}" --python-version 3.11 --platform any --implementation py protobuf || \
    echo "note: no pure-Python protobuf wheel found; the device's own protobuf will be used" >&2
fi

for v in 3.10 3.11 3.12 3.13; do
  "${PIP[@]}" --python-version "$v" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 PyYAML || echo "note: no PyYAML wheel for Python $v" >&2
  if [ "$PILLOW" = 1 ]; then
    "${PIP[@]}" --python-version "$v" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux_2_28_x86_64 pillow || echo "note: no pillow wheel for Python $v" >&2
  fi
done

ls -l "$DIR"
du -sh "$DIR"
