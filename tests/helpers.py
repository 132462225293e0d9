"""Small builders shared by the tests: a tiny config and a joint state without any dataset."""

import functools

import jax
import numpy as np

from ekd_jax import data, parallel, step
from ekd_jax.config import base_config

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
    # Transfer from the first step on every sample (the defaults wait for half of training and
    # distil only what the teacher gets right), so that every
    # term is exercised by a few steps.
    c.loss.ramp_start, c.loss.ramp_length = 0.0, 0.0
    c.loss.transfer_mask = "none"  # an untrained teacher is right on almost no fake sample
    if method in ("kd", "fitnet", "at"):
        c.teacher.checkpoint = "unused-by-step-tests"
    c.update_from_flattened_dict(overrides)
    return c


def build(config, image_shape=(8, 8, 3), num_classes=5, total_steps=10, mesh=None, student_start=0, teacher_lr=None):
    """(nets, tx, state, mesh) for a synthetic dataset; no data loading, no checkpoint."""
    mesh = mesh or parallel.make_mesh()
    mean, std = (0.5,) * image_shape[-1], (0.25,) * image_shape[-1]
    views = functools.partial(_views, cfg=config.data, mean=mean, std=std)
    t_shape = tuple(data.teacher_input_shape(config.data, image_shape))
    s_shape = tuple(data.student_input_shape(config.data, image_shape))
    nets = step.build_networks(config, num_classes, t_shape, s_shape, views, total_steps, student_start)
    tx = step.make_optimizer(nets, config.optimizer.learning_rate, 0.9, 5e-4, teacher_learning_rate=teacher_lr)
    state = step.init_state(nets, tx, config.seed, mesh)
    return nets, tx, state, mesh


def _views(images, key, train, *, cfg, mean, std):
    return data.make_views(images, key, cfg, mean, std, train)


def fake_batch(step_index, batch_size=8, image_shape=(8, 8, 3), num_classes=5):
    rng = np.random.default_rng(step_index)
    return {
        "image": rng.integers(0, 256, (batch_size, *image_shape), dtype=np.uint8),
        "label": rng.integers(0, num_classes, (batch_size,), dtype=np.int32),
    }


def run_steps(nets, tx, state, mesh, n, batch_size=8, image_shape=(8, 8, 3)):
    train_step = step.compile_steps(nets, tx, mesh).train
    metrics = []
    for i in range(n):
        batch = parallel.shard_batch(fake_batch(i, batch_size, image_shape), mesh)
        state, m = train_step(state, batch, i)
        metrics.append(m)
    return state, jax.device_get(metrics)
