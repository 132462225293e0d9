"""A published PyTorch teacher as an ekd_jax teacher: ``python -m ekd_jax.import_torch``.

  python -m ekd_jax.import_torch --checkpoint resnet56_vanilla/ckpt_epoch_240.pth --model resnet56 --out teachers/r56
  python -m ekd_jax.main --config configs/cifar.py:cifar100,resnet56-resnet20 --config.method=kd \
      --config.teacher.checkpoint=teachers/r56 --workdir runs/kd

Reads a state dict in the model's reference layout (RepDistiller's key names for the CIFAR zoo,
torchvision's for the ImageNet ResNets, mdistiller's for the ImageNet MobileNetV1:
``ekd_jax.torch_layout`` has the mapping per family) — a bare state dict, or one under ``'model'``
(RepDistiller's and mdistiller's ``ckpt_epoch_240.pth``) or ``'state_dict'``, a ``.pth``/``.pt``
file read with ``torch.load(weights_only=True)`` or a ``.safetensors`` file — and writes
``<out>/teacher/``: variables + ``network.json``, exactly what a trained run writes, so that
``--config.teacher.checkpoint=<out>`` gives kd, fitnet and at that teacher. The class count is the
classifier's (``--num_classes`` checks it), the image channels the first conv's; ``--image_size``
is the input the teacher is used at (default 32 for the CIFAR zoo, 224 for the ImageNet zoo).

``--mean``/``--std`` (default: CIFAR-100's, which RepDistiller's teachers were trained with, for
the CIFAR zoo; ImageNet's, torchvision's and mdistiller's, for the ImageNet zoo) are recorded in
network.json for ``ekd-evaluate``/``ekd-export`` of the network alone. Training normalises with
the run's own data statistics, as for any teacher: on CIFAR-100 those differ from RepDistiller's
rounded constants by at most 2e-4.

Bad input (an unknown model, missing or unexpected keys, shapes that do not fit, a file that is no
checkpoint) is one line ``error: ...`` and exit status 2; from Python the same words as a ValueError.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Sequence

import ekd_jax  # noqa: F401  (applies the XLA CPU defaults before jax starts)
from ekd_jax import rundir, torch_layout

# RepDistiller dataset/cifar100.py: the normalisation its CIFAR-100 teachers were trained with.
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
# torchvision's (and mdistiller's) ImageNet normalisation; configs/imagenet.py's too.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Per zoo (ekd_jax.models.ZOOS): the default input size and normalisation of an imported network.
ZOO_DEFAULTS = {"cifar": (32, CIFAR100_MEAN, CIFAR100_STD), "imagenet": (224, IMAGENET_MEAN, IMAGENET_STD)}


def zoo_defaults(model: str) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """``(image_size, mean, std)`` an imported ``model`` gets unless told otherwise."""
    from ekd_jax.models import available_models

    zoo = "imagenet" if model in available_models("imagenet") else "cifar"
    return ZOO_DEFAULTS[zoo]


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _floats(name: str, values: Sequence, channels: int) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        out = []
    if len(out) != channels or (name == "std" and any(v <= 0 for v in out)):
        what = "positive numbers" if name == "std" else "numbers"
        raise ValueError(
            f"{name}={','.join(map(str, values))} is not valid: {channels} {what}, one per channel of the "
            f"network's input; fix --{name}"
        )
    return out


def import_checkpoint(
    checkpoint: str | pathlib.Path,
    model: str,
    out: str | pathlib.Path,
    *,
    num_classes: int | None = None,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    overwrite: bool = False,
) -> dict:
    """Converts ``checkpoint`` (a ``model`` state dict in the reference layout) into ``<out>/teacher/``.

    ``image_size``, ``mean``, ``std``: None = the model's zoo's (:func:`zoo_defaults`). Returns what
    was written (also printed by the command line). Every bad input is a ValueError whose message
    names the option, the keys or the shapes concerned.
    """
    torch_layout.layout_for(model)  # an unknown model is refused before the file is read
    default_size, default_mean, default_std = zoo_defaults(model)
    image_size = default_size if image_size is None else image_size
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size={image_size!r} is not valid: a positive integer (pixels); fix --image_size")
    out = pathlib.Path(out)
    target = out / "teacher"
    blocked = rundir.file_in_the_way(out)
    if blocked is not None:
        raise ValueError(f"out={str(out)!r} is not valid: {blocked} is a file; fix --out")
    if target.exists() and not overwrite:
        raise ValueError(
            f"out={str(out)!r} is not valid: {target} already exists; choose another --out, or pass --overwrite to replace it"
        )

    path = pathlib.Path(checkpoint)
    state_dict, entry = torch_layout.read_state_dict(path)
    variables, info = torch_layout.variables_from_state_dict(model, state_dict, num_classes=num_classes, source=str(path))
    channels = info["in_channels"]
    if mean is None and std is None and channels != 3:
        raise ValueError(f"the network takes {channels}-channel images: pass --mean and --std ({channels} values each)")
    mean = _floats("mean", default_mean if mean is None else mean, channels)
    std = _floats("std", default_std if std is None else std, channels)

    from ekd_jax import outputs

    input_shape = [image_size, image_size, channels]
    # A trained run's network.json, then where it came from.
    meta = rundir.network_meta(model, info["num_classes"], None, input_shape, input_shape, mean, std, imported_from={
        "file": str(path.absolute()),
        "sha256": _sha256(path),
        "layout": torch_layout.layout_for(model).name,
        "state_dict_entry": entry,
        "tensors": info["tensors"],
        "ignored_keys": len(info["ignored"]),
    })
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"out={str(out)!r} is not valid: cannot make it ({e.strerror or e}); fix --out") from e
    rundir.save_network(target, variables, meta)

    # Read back as kd/fitnet/at will: the saved teacher must be exactly the converted one.
    _, restored, _ = rundir.restore_network(target)
    digest = outputs.tree_sha256(restored)
    if digest != outputs.tree_sha256(variables):
        raise RuntimeError(f"{target} does not read back as written")
    return {
        "teacher": str(target),
        "model": model,
        "num_classes": info["num_classes"],
        "input_shape": input_shape,
        "checkpoint": str(path),
        "layout": meta["imported_from"]["layout"],
        "state_dict_entry": entry,
        "tensors": info["tensors"],
        "ignored_keys": info["ignored"][:3] + ([f"... {len(info['ignored']) - 3} more"] if len(info["ignored"]) > 3 else []),
        "teacher_params_sha256": digest,
        "use": f"--config.teacher.model={model} --config.teacher.checkpoint={out}",
    }


# --------------------------------------------------------------------------- command line


def _cli() -> None:
    from absl import flags

    from ekd_jax import cli

    flags.DEFINE_string("checkpoint", None, "the PyTorch checkpoint: .pth/.pt (a state dict, or one under 'model' / "
                        "'state_dict'), or .safetensors")
    flags.DEFINE_string("model", None, "the zoo model the checkpoint holds, e.g. resnet56 (RepDistiller's name) or "
                        "resnet34_imagenet (torchvision's resnet34)")
    flags.DEFINE_string("out", None, "the folder to write <out>/teacher/ into (then --config.teacher.checkpoint=<out>)")
    flags.DEFINE_integer("num_classes", None, "the class count (default: the checkpoint's classifier rows; given, it is checked)")
    flags.DEFINE_integer("image_size", None, "the input height = width the teacher is used at (default: 32 for the "
                         "CIFAR zoo, 224 for the ImageNet zoo)")
    flags.DEFINE_list("mean", None, "per-channel input mean for evaluate/export of the network alone (default: "
                      "CIFAR-100's for the CIFAR zoo, ImageNet's for the ImageNet zoo)")
    flags.DEFINE_list("std", None, "per-channel input std (default: CIFAR-100's / ImageNet's, as --mean)")
    flags.DEFINE_bool("overwrite", False, "replace an existing <out>/teacher/")
    FLAGS = flags.FLAGS

    def main():
        info = import_checkpoint(
            FLAGS.checkpoint, FLAGS.model, FLAGS.out, num_classes=FLAGS.num_classes, image_size=FLAGS.image_size,
            mean=FLAGS.mean, std=FLAGS.std, overwrite=FLAGS.overwrite,
        )
        print(json.dumps(info))

    cli.run(main, required=("checkpoint", "model", "out"), errors=(ValueError, OSError))


def run() -> None:
    """Console script ``ekd-import-torch`` (pyproject.toml) = ``python -m ekd_jax.import_torch``."""
    _cli()


if __name__ == "__main__":
    run()
