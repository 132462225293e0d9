"""The parts of the bounded GPU check; its entry point and full description: benchmarks/gpu_check.py.

  common.py       paths, the log, <out>/results.jsonl (Results), subprocesses with a line protocol (Proc)
  env.py          phase 0 (versions, nvidia-smi), wheels for missing dependencies, stubs for optional modules
  workers.py      what runs in the subprocesses: PyTorch and JAX step servers, a training run, a calibration run
  bench.py        phase 1: the joint step, ekd_jax against the PyTorch reference
  e2e.py          phase 2: the trainer end to end against the step
  study.py        phases 3-4: concurrent study runs timed (calib), then trained (train)
  summary.py      the final table (<out>/summary.txt)
  orchestrate.py  the command line, the phases under one time budget, the files written at the end

Every module imports only the standard library at its top: the same code is the orchestrator (no JAX
or torch in its process), the torch server (run by ``--torch_python``, which needs torch only) and the
JAX workers; JAX, torch and ekd_jax are imported inside the worker functions that use them.
"""
