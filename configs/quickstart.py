"""Quickstart: offline, on scikit-learn's bundled digits; a few minutes on 2 CPU cores.

  python -m ekd_jax.main --config configs/quickstart.py --workdir runs/quickstart
  python -m ekd_jax.main --config configs/quickstart.py:tiny --workdir /tmp/q   # seconds, smoke test

Trains a resnet20 teacher from scratch together with a resnet8 student (EKD). Any other source
works too, e.g. --config.data.source=npz:/path/to/arrays.npz (class count and shapes follow the data).
"""

from ekd_jax.config import base_config


def get_config(arg: str = "") -> "ml_collections.ConfigDict":  # noqa: F821
    c = base_config()
    c.method = "ekd"
    c.teacher.model = "resnet20"
    c.student.model = "resnet8"
    c.data.source = "digits"
    c.data.image_size = 16
    c.batch_size = 64
    c.eval_batch_size = 128
    c.num_epochs = 12
    c.optimizer.learning_rate = 0.05
    c.log_every_steps = 10
    if arg == "tiny":
        c.teacher.model = "resnet8"
        c.student.model = "resnet8"
        c.data.image_size = 8
        c.data.train_fraction = 0.25
        c.batch_size = 32
        c.eval_batch_size = 64
        c.num_epochs = 2
        # A smoke test, barely trained: at 0.05 its near-tied test logits flip with the order in
        # which devices' gradients are summed (1 x 4 devices vs 2 processes x 2: one test image);
        # at 0.01 every layout gives the same accuracies (tests/test_multihost.py, docs/multihost.md).
        c.optimizer.learning_rate = 0.01
    elif arg:
        raise ValueError(f"unknown quickstart argument {arg!r}; use ':tiny' or nothing")
    return c
