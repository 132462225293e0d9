"""Times the compiled joint train step on synthetic data: ``python -m ekd_jax.bench --config <cfg>``.

  python -m ekd_jax.bench --config configs/cifar.py:cifar100,resnet56-resnet20
  python -m ekd_jax.bench --config configs/cifar.py:cifar100,resnet32x4-resnet8x4 --config.batch_size=128 \
      --out /tmp/bench.json --peak_gflops 150

Builds the configured teacher, student and method exactly as the trainer does (the one build,
``ekd_jax.build.build``, then ``init_state`` and ``compile_steps``) and runs the trainer's program, ``steps_per_call``
steps per call, but never loads the dataset: the program is fed device-resident uint8 batches of the configured
image shape and class count (``--num_classes``,
``--image_size``, ``--channels``; defaults follow ``data.source``). Offline methods (kd, fitnet, at)
get a randomly initialised frozen teacher, which times the same. Reports compile seconds
(lower + compile), the median ms/step and images/s over the timed chunks, XLA's FLOP count of one
step and the achieved GFLOP/s (and the fraction of ``--peak_gflops``), plus the same for the
student trained alone (method vanilla). Prints one JSON object; ``--out FILE`` also writes it.
Bad input ends with one line ``error: ...`` and exit status 2. docs/performance.md has the numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import statistics
import time
from typing import Any

from absl import flags
from ml_collections import config_flags

import ekd_jax  # noqa: F401  (applies the XLA CPU defaults before jax starts)
from ekd_jax import cli

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path.py[:arg]).", lock_config=True)
flags.DEFINE_string("out", None, "Also write the JSON result to this file.")
flags.DEFINE_float("peak_gflops", None, "The device's peak GFLOP/s; adds the achieved fraction of it.")
flags.DEFINE_integer("num_classes", None, "Classes of the synthetic data (default: from data.source, else 100).")
flags.DEFINE_integer("image_size", None, "Height = width of the synthetic images (default: data.image_size, else 32).")
flags.DEFINE_integer("channels", None, "Channels of the synthetic images (default: 1 for digits, else 3).")
flags.DEFINE_integer("chunks", 5, "Timed chunks (at least 5); the reported step time is their median.")
flags.DEFINE_integer("steps_per_chunk", 0, "Steps per timed chunk; 0 = enough for about --chunk_seconds.")
flags.DEFINE_float("chunk_seconds", 2.0, "Target length of a timed chunk when --steps_per_chunk=0.")
flags.DEFINE_integer("warmup_steps", 2, "Untimed steps after compiling.")
flags.DEFINE_bool("student_alone", True, "Also time the student trained alone (method vanilla).")

# Dataset sources whose class count / image shape are known without loading them.
_KNOWN_SOURCES = {
    "digits": (10, 8, 1),
    "tfds:cifar10": (10, 32, 3),
    "tfds:cifar100": (100, 32, 3),
    "tfds:mnist": (10, 28, 1),
    "tfds:fashion_mnist": (10, 28, 1),
}
_FALLBACK = (100, 32, 3)
SYNTHETIC_FEEDS = 2  # distinct device chunks (steps_per_call batches each) cycled through
SYNTHETIC_TRAIN_SIZE = 50_000  # the schedules' length in steps per epoch (the step's cost does not depend on it)


class BenchError(ValueError):
    """Bad bench input (reported as ``error: ...``, exit status 2)."""


def data_shape(spec, num_classes: int | None = None, image_size: int | None = None, channels: int | None = None):
    """(num_classes, (H, W, C)) of the synthetic data: explicit values, else from data.source."""
    known = _KNOWN_SOURCES.get(spec.data.source, _FALLBACK)
    n = num_classes if num_classes is not None else known[0]
    size = image_size if image_size is not None else (spec.data.image_size or known[1])
    c = channels if channels is not None else known[2]
    for name, v in (("num_classes", n), ("image_size", size), ("channels", c)):
        if not isinstance(v, int) or v < 1:
            raise BenchError(f"--{name} must be a positive int, got {v!r}")
    return n, (size, size, c)


def spec_for(config, method: str | None = None):
    """The validated spec of ``config`` (with ``method`` instead of its own). No file it names is looked
    at: the data is synthetic, and an offline method times a randomly initialised frozen teacher."""
    from ekd_jax.spec.validate import validate

    cfg = config.copy_and_resolve_references()
    if method is not None:
        with cfg.unlocked():
            cfg.method = method
    return validate(cfg, check_files=False)


def _flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001  (not every backend implements it)
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    return float(ca["flops"])


@dataclasses.dataclass
class StepTimer:
    """The compiled training program of one config (its joint step, ``steps_per_call`` per call, as the trainer
    runs it), ready to be timed chunk by chunk.

    ``build(spec, ...)`` (``spec_for(config)``) compiles; ``run(n)`` runs n steps (calls of ``steps_per_call``,
    the last maybe fewer) and returns their wall seconds (blocking on the result). Used by this module's CLI
    and by benchmarks/.
    """

    steps: Any
    state: Any
    feeds: list
    batch_size: int
    steps_per_call: int
    joint_from: int  # the first step of the joint program (after any teacher head start)
    compile_s: float
    flops: float | None
    method: str
    _i: int = 0

    @classmethod
    def build(cls, spec, num_classes: int, image_shape) -> "StepTimer":
        import jax
        import jax.numpy as jnp

        from ekd_jax import parallel
        from ekd_jax.build import DataFacts, build

        mesh = parallel.make_mesh()
        parallel.check_batch_size(spec.batch_size, mesh)
        image_shape = tuple(image_shape)
        c = image_shape[-1]
        # The statistics' values do not change the step's cost.
        facts = DataFacts(num_classes, image_shape, max(SYNTHETIC_TRAIN_SIZE, spec.batch_size), (0.5,) * c, (0.25,) * c)
        built = build(spec, facts)
        state = built.init_state(spec.seed, mesh)
        steps = built.compile(mesh)
        bs, k = spec.batch_size, spec.steps_per_call

        def make(key):
            ki, kl = jax.random.split(key)
            x = jax.random.randint(ki, (k, bs, *image_shape), 0, 256, jnp.int32).astype(jnp.uint8)
            y = jax.random.randint(kl, (k, bs), 0, num_classes, jnp.int32)
            return {"image": x, "label": y}

        make = jax.jit(make, out_shardings=parallel.chunk_sharded(mesh))
        feeds = [make(jax.random.key(i)) for i in range(SYNTHETIC_FEEDS)]
        jax.block_until_ready(feeds)

        t0 = time.perf_counter()
        n = jax.ShapeDtypeStruct((), jnp.int32, sharding=parallel.replicated(mesh))
        steps.programs["joint"] = steps.programs["joint"].lower(state, feeds[0], n, {}).compile()
        compile_s = time.perf_counter() - t0
        return cls(steps, state, feeds, bs, k, built.head.steps, compile_s, _flops(steps.programs["joint"]), spec.method)

    def run(self, n: int) -> float:
        import jax

        t0 = time.perf_counter()
        metrics = None
        while n > 0:
            m = min(n, self.steps_per_call)
            feed = self.feeds[self._i % len(self.feeds)]
            self.state, metrics = self.steps.train_chunk(self.state, feed, self.joint_from, m)
            self._i += 1
            n -= m
        jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - t0


def time_step(timer: StepTimer, chunks: int, steps_per_chunk: int, chunk_seconds: float, warmup: int) -> dict:
    """Warms up, then times ``chunks`` chunks; returns the step's numbers (median over chunks)."""
    first = timer.run(max(warmup, 1)) / max(warmup, 1)
    n = steps_per_chunk or max(1, round(chunk_seconds / max(first, 1e-6)))
    n = -(-n // timer.steps_per_call) * timer.steps_per_call  # whole calls
    per_step = [timer.run(n) / n for _ in range(chunks)]
    step_s = statistics.median(per_step)
    out = {
        "step_ms": 1e3 * step_s,
        "images_per_s": timer.batch_size / step_s,
        "compile_s": timer.compile_s,
        "gflops_per_step": None if timer.flops is None else timer.flops / 1e9,
        "achieved_gflops": None if timer.flops is None else timer.flops / 1e9 / step_s,
        "chunk_step_ms": [round(1e3 * s, 3) for s in per_step],
        "steps_per_chunk": n,
        "steps_per_call": timer.steps_per_call,
    }
    return out


def run_bench(
    config,
    *,
    num_classes: int | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    chunks: int = 5,
    steps_per_chunk: int = 0,
    chunk_seconds: float = 2.0,
    warmup_steps: int = 2,
    student_alone: bool = True,
    peak_gflops: float | None = None,
) -> dict:
    """The whole benchmark as a dict (what the CLI prints)."""
    import jax
    import jaxlib

    if chunks < 5:
        raise BenchError(f"--chunks must be at least 5, got {chunks}")
    if steps_per_chunk < 0 or warmup_steps < 0 or chunk_seconds <= 0:
        raise BenchError("--steps_per_chunk and --warmup_steps must be >= 0 and --chunk_seconds > 0")
    if peak_gflops is not None and peak_gflops <= 0:
        raise BenchError(f"--peak_gflops must be positive, got {peak_gflops}")
    spec = spec_for(config)
    n_cls, shape = data_shape(spec, num_classes, image_size, channels)
    dev = jax.devices()[0]
    result: dict[str, Any] = {
        "method": spec.method,
        "teacher": spec.teacher.model,
        "student": spec.student.model,
        "batch_size": int(spec.batch_size),
        "num_classes": n_cls,
        "image_shape": list(shape),
        "student_downsample": int(spec.data.student_downsample),
        "lowres_mode": spec.data.lowres_mode,
        "dtype": spec.dtype,
        "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}".rstrip(":"),
        "num_devices": jax.device_count(),
        "host_cpus": os.cpu_count(),
        "host": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    timer = StepTimer.build(spec, n_cls, shape)
    result.update(time_step(timer, chunks, steps_per_chunk, chunk_seconds, warmup_steps))
    del timer
    if student_alone:
        alone = StepTimer.build(spec_for(config, "vanilla"), n_cls, shape)
        r = time_step(alone, chunks, steps_per_chunk, chunk_seconds, warmup_steps)
        result.update({f"student_alone_{k}": v for k, v in r.items()})
        result["joint_over_student_alone"] = result["step_ms"] / r["step_ms"]
    if peak_gflops:
        result["peak_gflops"] = peak_gflops
        for prefix in ("", "student_alone_"):
            if result.get(f"{prefix}achieved_gflops") is not None:
                result[f"{prefix}fraction_of_peak"] = result[f"{prefix}achieved_gflops"] / peak_gflops
    return result


# --------------------------------------------------------------------------- command line


def main() -> None:
    result = run_bench(
        _CONFIG.value,
        num_classes=FLAGS.num_classes,
        image_size=FLAGS.image_size,
        channels=FLAGS.channels,
        chunks=FLAGS.chunks,
        steps_per_chunk=FLAGS.steps_per_chunk,
        chunk_seconds=FLAGS.chunk_seconds,
        warmup_steps=FLAGS.warmup_steps,
        student_alone=FLAGS.student_alone,
        peak_gflops=FLAGS.peak_gflops,
    )
    text = json.dumps(result)
    if FLAGS.out:
        try:
            path = pathlib.Path(FLAGS.out)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n")
        except OSError as e:
            raise ValueError(f"cannot write --out {FLAGS.out}: {e}") from e
    print(text)


def run() -> None:
    """Console script ``ekd-bench`` (pyproject.toml) = ``python -m ekd_jax.bench``."""
    # ValueError covers BenchError and the trainer's own validation (models, methods, ...).
    cli.run(main, required=("config",))


if __name__ == "__main__":
    run()
