"""The recorded study (docs/results.md): resnet20 -> resnet8 on a small real CIFAR-10 set via npz.

  python -m ekd_jax.compare --config configs/study.py:few100 --methods vanilla,kd,dml,ekd \
      --seeds 0,1 --workdir runs/study_few100 --config.data.source=npz:/path/to/cifar10_small.npz

Argument: ``full`` (all training images), ``lowres4`` (student sees 8x8 upsampled to 32x32) or
``few100`` (100 images per class). The source defaults to the developers' copy of
cifar10_small.npz (10,000 train / 2,000 test, see docs/results.md); pass your own with
--config.data.source=npz:<path>.
"""

from ekd_jax.config import base_config

SCENARIOS = ("full", "lowres4", "few100")


def get_config(arg: str = "few100"):
    if arg not in SCENARIOS:
        raise ValueError(f"unknown study scenario {arg!r}; use one of {SCENARIOS}")
    c = base_config()
    c.teacher.model = "resnet20"  # resnet20 -> resnet8 fits the 2-core budget (as METHOD.md's check)
    c.student.model = "resnet8"
    c.data.source = "npz:../shared/data/cifar10_small.npz"
    c.batch_size = 64
    c.eval_batch_size = 500
    c.optimizer.learning_rate = 0.05
    c.log_every_steps = 50
    c.num_epochs = {"full": 3, "lowres4": 3, "few100": 30}[arg]
    c.eval_every_epochs = {"full": 1, "lowres4": 1, "few100": 5}[arg]
    if arg == "lowres4":
        c.data.student_downsample = 4
    if arg == "few100":
        c.data.samples_per_class = 100
    return c
