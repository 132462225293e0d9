"""One bounded GPU check (issue 12, item 5): step benchmarks, trainer end-to-end speed, study runs.

  bash benchmarks/gpu_check.sh --data runs/gpu/cifar10_small.npz --wheels runs/gpu/wheels   # on the GPU machine
  .venv/bin/python benchmarks/gpu_check.py --tiny --out /tmp/gpu_tiny --torch_python /work/torchvenv/bin/python \
      --data ../shared/data/cifar10_small.npz     # CPU plumbing test (tiny pairs, 512 images, ~3-4 min here)

Everything runs under one hard time budget (``--budget``, default 480 s), in phases; each phase
has its own cap and stops starting new work when its cap or the overall deadline comes:

1. bench: ekd_jax's joint step (``benchmarks/compare_cpu.py --serve_jax``, i.e. ``ekd_jax.bench``'s
   StepTimer on configs/cifar.py:cifar100,<pair>) against the PyTorch reference step
   (``benchmarks/torch_step.py``'s JointStep, moved to CUDA here: NCHW and channels_last, bf16 via
   autocast), for every pair x dtype x batch size. All contenders are started at once (compiles
   overlap), then timed one at a time, chunk by chunk, in alternating rounds (as compare_cpu.py).
2. e2e: a real ``ekd_jax.train.train_and_evaluate`` run of the first pair on the npz for a few
   epochs; its images/s (the trainer's own ``images_per_s``) against the bench's, plus the host's
   cost of feeding one batch (the source's ``train_batch`` + ``parallel.shard_batch``). A loop far below
   the bench means the host feeding it is the bottleneck; the summary says so.
3. calib: the study runs (configs/study.py:full, resnet20 -> resnet8; vanilla, dml, ekd x seeds) as
   concurrent processes that compile and then train epoch by epoch on command, timed with 3, 6, 9
   of them running at once: how much several runs sharing the GPU slow each other.
4. train: vanilla / dml / ekd at ``--epochs`` (default 200, a paper-length schedule) for as many
   seeds as fit the time left (measured in 3.), the runs of each wave concurrent on the GPU; fewer
   epochs only if not even one seed fits. Each run checkpoints into ``<out>/train/`` (every
   ``--ckpt_every`` epochs), so ``--resume_from <a previous out>`` continues them.

Results go to ``<out>/results.jsonl`` (one JSON line per measurement, written as they come, so a
timeout still leaves everything done so far), logs of every subprocess to ``<out>/logs/``, the
final table to ``<out>/summary.txt`` (also printed) and ``<out>/summary.json``.

The same script is the orchestrator (no JAX or torch in its process), the torch server
(``--worker torch``, run by ``--torch_python``, needs torch only) and the JAX workers (``--worker
train`` / ``calib``, and ``--worker jax_serve -- ARGS`` = compare_cpu.py ``--serve_jax ARGS`` behind
the stubs). ``--wheels DIR`` installs missing pure-Python dependencies from wheel files (pip
--no-index, else by unpacking them); optional modules that are still missing (tensorboardX, PIL,
matplotlib) are replaced by stubs in the workers.

The code is in benchmarks/gpu/ (its __init__ lists the modules: one per phase, the workers, the
orchestrator); this file is only the entry point.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # benchmarks/: the gpu package

# Standard library only at import (gpu/__init__.py says why): this file is also the torch worker.
from gpu.orchestrate import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__.splitlines()[0]))
