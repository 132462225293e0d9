"""CIFAR-10/100 experiments for the published teacher/student pairs, and their scenarios.

One file, chosen by the argument ``<dataset>,<teacher>-<student>[,<scenario>...]``:

  --config configs/cifar.py:cifar100,resnet56-resnet20
  --config configs/cifar.py:cifar100,resnet32x4-ShuffleV2
  --config configs/cifar.py:cifar10,wrn_40_2-wrn_16_2,lowres4          # student sees 8x8 -> 32x32
  --config configs/cifar.py:cifar100,vgg13-vgg8,lowres4native          # student fed 8x8 natively
  --config configs/cifar.py:cifar100,resnet110-resnet20,few50          # 50 images per class
  --config configs/cifar.py:cifar100,ResNet50-MobileNetV2,frac0.1      # 10% of each class

Datasets come through TFDS (`tfds:cifar10` / `tfds:cifar100`), so a connected machine downloads
and prepares them on first use. The recipe is RepDistiller's: 240 epochs, batch 64, SGD 0.05
(0.01 for MobileNetV2/ShuffleNet students), x0.1 at epochs 150/180/210.
"""

from ekd_jax.config import base_config

# The CRD paper's pairs (Tables 1 and 2), teacher-student.
PUBLISHED_PAIRS = (
    "resnet56-resnet20", "resnet110-resnet20", "resnet32x4-resnet8x4", "wrn_40_2-wrn_16_2",
    "wrn_40_2-wrn_40_1", "vgg13-vgg8", "vgg13-MobileNetV2", "ResNet50-MobileNetV2",
    "resnet32x4-ShuffleV1", "resnet32x4-ShuffleV2", "wrn_40_2-ShuffleV1",
)
LOW_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")


def get_config(arg: str = "cifar100,resnet56-resnet20"):
    parts = [p.strip() for p in arg.split(",") if p.strip()]
    if len(parts) < 2 or parts[0] not in ("cifar10", "cifar100") or parts[1].count("-") != 1:
        raise ValueError(
            f"configs/cifar.py argument {arg!r} should be '<cifar10|cifar100>,<teacher>-<student>[,scenario]', "
            f"e.g. 'cifar100,resnet56-resnet20,lowres4'; published pairs: {', '.join(PUBLISHED_PAIRS)}"
        )
    dataset, pair, scenarios = parts[0], parts[1], parts[2:]
    c = base_config()
    c.teacher.model, c.student.model = pair.split("-")
    c.data.source = f"tfds:{dataset}"
    c.data.image_size = 32
    c.batch_size = 64
    c.num_epochs = 240
    c.optimizer.learning_rate = 0.01 if c.student.model in LOW_LR_STUDENTS else 0.05
    for s in scenarios:
        if s.startswith("lowres"):
            rest = s[len("lowres"):]
            c.data.lowres_mode = "native" if rest.endswith("native") else "upsample"
            c.data.student_downsample = int(rest.removesuffix("native"))
        elif s.startswith("few"):
            c.data.samples_per_class = int(s[len("few"):])
        elif s.startswith("frac"):
            c.data.train_fraction = float(s[len("frac"):])
        else:
            raise ValueError(f"unknown scenario {s!r}; use lowres<r>[native], few<n> or frac<f>")
    return c
