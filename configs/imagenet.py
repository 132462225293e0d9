"""ImageNet (ILSVRC-2012) experiments for the two standard pairs of the distillation literature.

  --config configs/imagenet.py                 # ResNet-34 -> ResNet-18 (= :r34_r18)
  --config configs/imagenet.py:r50_mv1         # ResNet-50 -> MobileNetV1

Models: torchvision's ResNet-18/34/50 and mdistiller's MobileNetV1 (ekd_jax/models/
imagenet_resnet.py, mobilenetv1.py). The recipe is the standard one (torchvision's reference
training, as mdistiller configs/imagenet/{r34_r18,r50_mv1} and torchdistill use it): 100 epochs,
batch 512, SGD momentum 0.9 (not Nesterov), lr 0.1 x batch/256 (0.2 here), x0.1 at epochs 30/60/90
(milestones 0.3/0.6/0.9 of the run), weight decay 1e-4, no warm-up, no label smoothing.
``optimizer.learning_rate`` follows ``batch_size`` (a reference to it, the linear scaling rule):
``--config.batch_size=256`` gives lr 0.1; an explicit ``--config.optimizer.learning_rate`` wins.
For mdistiller's KD baseline add ``--config.method=kd --config.loss.ce_weight=0.5
--config.loss.alpha=0.5`` (its T is 1, our default ``loss.tau``); mdistiller's teachers are
torchvision-pretrained and frozen, where EKD (the default method) trains both from scratch.

Data: ``tfds:imagenet2012`` (TFDS needs the ILSVRC-2012 archives downloaded by hand into its
manual_dir; it is prepared once in TFDS's ArrayRecord format), read by index through the grain
stream (``data.streaming=True``, ekd_jax/data/stream.py), never loaded into memory:

* training: RandomResizedCrop to 224x224 (``data.crop_scale`` (0.08, 1.0), ``data.crop_ratio``
  (3/4, 4/3), bilinear) on the host, in ``data.workers`` grain processes (set it to the host's
  cores), then a horizontal flip with probability 0.5 on the device (``data.flip``; no pad-and-crop:
  ``data.crop_padding=0``);
* evaluation: resize the shorter side to 256 (``data.eval_resize``, bilinear), centre crop 224x224
  (``data.image_size``);
* normalisation with the fixed ImageNet statistics (``data.mean`` (0.485, 0.456, 0.406),
  ``data.std`` (0.229, 0.224, 0.225)), not statistics measured on the training split.

Any other ImageNet copy in the same record format works with
``--config.data.source='arrayrecord:/data/imagenet/{split}-*.array_record'`` (docs/data.md "Datasets
larger than memory").
"""

from ekd_jax.config import base_config

# mdistiller's names for the pairs -> (teacher, student) registry names.
PAIRS = {
    "r34_r18": ("resnet34_imagenet", "resnet18_imagenet"),
    "r50_mv1": ("resnet50_imagenet", "mobilenetv1_imagenet"),
}
BASE_LR_PER_256 = 0.1


def get_config(arg: str = "r34_r18"):
    pair = arg.strip() or "r34_r18"
    if pair not in PAIRS:
        raise ValueError(
            f"configs/imagenet.py argument {arg!r} is not a pair; use one of {', '.join(PAIRS)} "
            "(e.g. --config configs/imagenet.py:r50_mv1)"
        )
    c = base_config()
    c.teacher.model, c.student.model = PAIRS[pair]
    c.data.source = "tfds:imagenet2012"
    c.data.streaming = True
    c.data.image_size = 224
    c.data.crop_padding = 0
    c.data.flip = True
    c.data.crop_scale = (0.08, 1.0)
    c.data.crop_ratio = (3 / 4, 4 / 3)
    c.data.eval_resize = 256
    c.data.mean = (0.485, 0.456, 0.406)
    c.data.std = (0.229, 0.224, 0.225)
    c.data.workers = 16
    c.batch_size = 512
    c.eval_batch_size = 512
    c.num_epochs = 100
    c.optimizer.learning_rate = c.get_ref("batch_size").to_float() * (BASE_LR_PER_256 / 256)
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = False
    c.optimizer.weight_decay = 1e-4
    c.schedule.name = "multistep"
    c.schedule.milestones = (0.3, 0.6, 0.9)
    c.schedule.decay_factor = 0.1
    c.schedule.warmup_epochs = 0.0
    return c
