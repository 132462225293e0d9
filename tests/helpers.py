"""Small builders shared by the tests: a tiny config and a joint state without any dataset."""

import jax
import numpy as np

from ekd_jax import build as build_lib
from ekd_jax import parallel, step
from ekd_jax.build import DataFacts
from ekd_jax.config import base_config
from ekd_jax.spec.validate import validate

# Why the PyTorch bridge's tests skip where torch is absent: the test set (requirements.txt) leaves it out,
# because PyPI's torch on Linux is the multi-GB CUDA build. CI installs the CPU build (.ci/run).
NO_TORCH = ("PyTorch is not installed (the test set leaves it out: PyPI's Linux torch is the CUDA build); "
            "to run the PyTorch bridge's tests: pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu")


def tiny_config(method="ekd", **overrides):
    c = base_config()
    c.method = method
    c.teacher.model = "resnet8"
    c.student.model = "resnet8"
    c.batch_size = 8
    c.num_epochs = 1
    c.schedule.name = "constant"  # a step's update does not depend on where in training it is
    # Transfer from the first step on every sample (the defaults' mask and ramps would leave terms
    # unexercised by a few steps of an untrained teacher).
    c.loss.ramp_start, c.loss.ramp_length = 0.0, 0.0
    c.loss.transfer_mask = "none"  # an untrained teacher is right on almost no fake sample
    if method in ("kd", "fitnet", "at"):
        c.teacher.checkpoint = "unused-by-step-tests"  # the state's teacher stays the random one
    c.update_from_flattened_dict(overrides)
    return c


def build(config, image_shape=(8, 8, 3), num_classes=5, total_steps=10, mesh=None, student_start=0):
    """(nets, tx, state, mesh) for a synthetic dataset, through the one build (``ekd_jax.build``): one
    step per epoch, ``total_steps`` student steps after a head start of ``student_start`` steps; no data
    loading, no checkpoint."""
    mesh = mesh or parallel.make_mesh()
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.num_epochs = total_steps
        if student_start:
            config.teacher.head_start = student_start / total_steps
    spec = validate(config, check_files=False)  # the teacher checkpoint is never read here
    c = image_shape[-1]
    built = build_lib.build(spec, DataFacts(num_classes, tuple(image_shape), spec.batch_size, (0.5,) * c, (0.25,) * c))
    assert not student_start or built.nets.student_start == student_start
    state = built.init_state(spec.seed, mesh)
    return built.nets, built.tx, state, mesh


def fake_batch(step_index, batch_size=8, image_shape=(8, 8, 3), num_classes=5):
    rng = np.random.default_rng(step_index)
    return {
        "image": rng.integers(0, 256, (batch_size, *image_shape), dtype=np.uint8),
        "label": rng.integers(0, num_classes, (batch_size,), dtype=np.int32),
    }


def fake_chunk(steps, mesh, batch_size=8, image_shape=(8, 8, 3)):
    """``fake_batch`` of each step index in ``steps``, stacked as one call's feed of the training program."""
    batches = [fake_batch(i, batch_size, image_shape) for i in steps]
    return parallel.global_chunk({k: np.stack([b[k] for b in batches]) for k in ("image", "label")}, mesh, batch_size)


def run_steps(nets, tx, state, mesh, n, batch_size=8, image_shape=(8, 8, 3)):
    """n steps on ``fake_batch(0..n-1)`` in one call of the training program (as the trainer runs them, K = n);
    returns (state, one metrics dict per step)."""
    feed = fake_chunk(range(n), mesh, batch_size, image_shape)
    state, m = step.compile_steps(nets, tx, mesh).train_chunk(state, feed, 0, n)
    m = jax.device_get(m)
    return state, [{k: v[i] for k, v in m.items()} for i in range(n)]
