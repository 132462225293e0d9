"""PyTorch state dicts in the reference layouts <-> ekd_jax variables, both ways, per model family.

The mapping itself is NumPy only (``variables_from_state_dict``, ``state_dict_from_variables``);
PyTorch is imported only to read or write a file (``read_state_dict``, ``write_state_dict``), so
ekd_jax imports and converts without it. Used by ``ekd_jax.import_torch`` (a published teacher in)
and ``ekd_jax.export --torch_state_dict`` (a trained student out).

Layouts: RepDistiller's (github.com/HobbitLong/RepDistiller models/*.py) for every model of the
CIFAR zoo (mdistiller's ``cifar_teachers`` use the same key names); torchvision's
(torchvision/models/resnet.py) for the ImageNet ResNets, so that the published
``torchvision.models.resnet18/34/50`` weights import; mdistiller's
(mdistiller/models/imagenet/mobilenetv1.py) for the ImageNet MobileNetV1. A Flax module path maps
to a PyTorch module prefix (``s``, ``b``, ``j``, ``k``: stage, block, conv and Sequential indices
as the Flax names have them):

==================  ===================================  ===============================================
family (models)     Flax module                          PyTorch prefix
==================  ===================================  ===============================================
resnet.py           stem_conv, stem_bn, fc               conv1, bn1, fc
(resnet8...110,     stage{s}_block{b}/conv1|bn1|conv2|   layer{s}.{b}.conv1|bn1|conv2|bn2
resnet8x4,          bn2
resnet32x4)         stage{s}_block{b}/shortcut_conv|_bn  layer{s}.{b}.downsample.0|.1
resnetv2.py         stem_conv, stem_bn, fc               conv1, bn1, linear
(ResNet50)          stage{s}_block{b}/conv1..3|bn1..3    layer{s}.{b}.conv1..3|bn1..3
                    stage{s}_block{b}/shortcut_conv|_bn  layer{s}.{b}.shortcut.0|.1
wrn.py              stem_conv, final_bn, fc              conv1, bn1, fc
(wrn_16_1 ...)      stage{s}_block{b}/bn1|conv1|bn2|     block{s}.layer.{b}.bn1|conv1|bn2|conv2
                    conv2
                    stage{s}_block{b}/shortcut_conv      block{s}.layer.{b}.convShortcut
vgg.py (vgg8...19)  block{i}/conv{j}, block{i}/bn{j}     block{i}.{3j}, block{i}.{3j+1} (conv, BN, ReLU)
                    classifier                           classifier
mobilenetv2.py      stem_conv, stem_bn                   conv1.0, conv1.1
(MobileNetV2)       stage{s}_block{b}/expand_conv|_bn    blocks.{s}.{b}.conv.0|.1
                    .../depthwise_conv|_bn               blocks.{s}.{b}.conv.3|.4
                    .../project_conv|_bn                 blocks.{s}.{b}.conv.6|.7
                    head_conv, head_bn, classifier       conv2.0, conv2.1, classifier.0
ShuffleNetv1.py     stem_conv, stem_bn, classifier       conv1, bn1, linear
(ShuffleV1)         stage{s}_block{b}/conv1..3|bn1..3    layer{s+1}.{b}.conv1..3|bn1..3
ShuffleNetv2.py     stem_conv, stem_bn                   conv1, bn1
(ShuffleV2)         stage{s}_down/conv1..5|bn1..5        layer{s+1}.0.conv1..5|bn1..5
                    stage{s}_block{b}/conv1..3|bn1..3    layer{s+1}.{b+1}.conv1..3|bn1..3
                    head_conv, head_bn, classifier       conv2, bn2, linear
torchvision         conv1, bn1, fc                       conv1, bn1, fc
resnet.py           layer{s}_{b}/conv1..3|bn1..3         layer{s}.{b}.conv1..3|bn1..3
(resnet18/34/50     layer{s}_{b}/downsample_0|_1         layer{s}.{b}.downsample.0|.1
_imagenet)
mdistiller          model_0_0, model_0_1 (stem)          model.0.0, model.0.1
mobilenetv1.py      model_{k}_0|_1 (depthwise conv, BN)  model.{k}.0|.1  (k = 1..13)
(mobilenetv1_       model_{k}_3|_4 (pointwise conv, BN)  model.{k}.3|.4
imagenet)           fc                                   fc
==================  ===================================  ===============================================

Leaves, for every family: Conv ``kernel`` (H, W, I/groups, O) <-> ``<prefix>.weight``
(O, I/groups, H, W), i.e. transposed (3, 2, 0, 1); conv ``bias`` <-> ``.bias``; Linear ``kernel``
(in, out) <-> ``.weight`` (out, in), transposed; BatchNorm params ``scale``/``bias`` <->
``.weight``/``.bias``, batch_stats ``mean``/``var`` <-> ``.running_mean``/``.running_var``.
``.num_batches_tracked`` has no counterpart: accepted and ignored when read, written when exported
(PyTorch reads it only when a BatchNorm's momentum is None). Transposes are exact, so a round trip
either way is bitwise. Key order when written = the reference model's ``state_dict()`` order.

BatchNorm convention: the zoo's BatchNorm (``models/common.py``) is PyTorch's, so the statistics
carry over unchanged: eval mode normalises with the running statistics; train mode normalises with
the biased batch variance and updates ``running_var`` with the unbiased one (n/(n-1)), momentum 0.1.

torchvision's published ImageNet weights (``IMAGENET1K_V1``, saved before PyTorch had
``num_batches_tracked``) lack that key: like any ``num_batches_tracked``, it is not required.

A layout for another family is one more :func:`register_layout` call: its rename rules (a Flax
module path -> a PyTorch prefix), the prefix of its classifier and of its first conv.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import pathlib
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

BN_EXTRA = "num_batches_tracked"
_TORCH_HINT = "pip install 'ekd_jax[torch]'"


# --------------------------------------------------------------------------- layouts


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one family's Flax module paths are named in its reference PyTorch code."""

    name: str  # e.g. "RepDistiller models/resnet.py"
    rules: tuple[tuple[str, str | Callable[[re.Match], str]], ...]  # (regex over 'a/b', template or fn)
    classifier: str  # PyTorch prefix of the final Linear: its weight's rows are the classes
    stem: str  # PyTorch prefix of the first conv: its weight's second dim is the image channels

    def prefix(self, path: Sequence[str]) -> str:
        s = "/".join(path)
        for pattern, replacement in self.rules:
            m = re.fullmatch(pattern, s)
            if m:
                return replacement(m) if callable(replacement) else m.expand(replacement)
        raise KeyError(f"{self.name}: no rule for the Flax module {s!r}")


LAYOUTS: dict[str, Layout] = {}


def register_layout(models: Iterable[str], layout: Layout) -> None:
    for name in models:
        LAYOUTS[name] = layout


def _plus(group: int, add: int, template: str) -> Callable[[re.Match], str]:
    """A replacement that writes match group ``group`` + ``add`` where ``template`` has '{}'."""
    return lambda m: template.format(int(m.group(group)) + add, *m.groups()[group:])


_BLOCK = r"stage(\d+)_block(\d+)"


def _repdistiller_resnet(file: str, classifier: str, shortcut: str) -> Layout:
    """RepDistiller's resnet.py and resnetv2.py: one module tree (models/resnet.py builds both), but
    resnet.py calls the Linear ``fc`` and the shortcut projection ``downsample``, resnetv2.py
    ``linear`` and ``shortcut``."""
    return Layout(
        f"RepDistiller models/{file}",
        (
            ("stem_conv", "conv1"), ("stem_bn", "bn1"), ("fc", classifier),
            (_BLOCK + "/shortcut_conv", rf"layer\1.\2.{shortcut}.0"),
            (_BLOCK + "/shortcut_bn", rf"layer\1.\2.{shortcut}.1"),
            (_BLOCK + r"/((?:conv|bn)\d)", r"layer\1.\2.\3"),
        ),
        classifier=classifier, stem="conv1",
    )


RESNET = _repdistiller_resnet("resnet.py", classifier="fc", shortcut="downsample")
RESNETV2 = _repdistiller_resnet("resnetv2.py", classifier="linear", shortcut="shortcut")
WRN = Layout(
    "RepDistiller models/wrn.py",
    (
        ("stem_conv", "conv1"), ("final_bn", "bn1"), ("fc", "fc"),
        (_BLOCK + "/shortcut_conv", r"block\1.layer.\2.convShortcut"),
        (_BLOCK + r"/((?:conv|bn)\d)", r"block\1.layer.\2.\3"),
    ),
    classifier="fc", stem="conv1",
)
VGG = Layout(
    "RepDistiller models/vgg.py",
    (
        # Each block is Sequential(conv, BN, ReLU, ..., conv, BN): conv j at 3j, its BN at 3j+1.
        (r"block(\d+)/conv(\d+)", lambda m: f"block{m.group(1)}.{3 * int(m.group(2))}"),
        (r"block(\d+)/bn(\d+)", lambda m: f"block{m.group(1)}.{3 * int(m.group(2)) + 1}"),
        ("classifier", "classifier"),
    ),
    classifier="classifier", stem="block0.0",
)
MOBILENETV2 = Layout(
    "RepDistiller models/mobilenetv2.py",
    (
        ("stem_conv", "conv1.0"), ("stem_bn", "conv1.1"),
        ("head_conv", "conv2.0"), ("head_bn", "conv2.1"), ("classifier", "classifier.0"),
        # InvertedResidual.conv = Sequential(pw, BN, ReLU, dw, BN, ReLU, pw-linear, BN).
        (_BLOCK + "/expand_conv", r"blocks.\1.\2.conv.0"), (_BLOCK + "/expand_bn", r"blocks.\1.\2.conv.1"),
        (_BLOCK + "/depthwise_conv", r"blocks.\1.\2.conv.3"), (_BLOCK + "/depthwise_bn", r"blocks.\1.\2.conv.4"),
        (_BLOCK + "/project_conv", r"blocks.\1.\2.conv.6"), (_BLOCK + "/project_bn", r"blocks.\1.\2.conv.7"),
    ),
    classifier="classifier.0", stem="conv1.0",
)
SHUFFLEV1 = Layout(
    "RepDistiller models/ShuffleNetv1.py",
    (
        ("stem_conv", "conv1"), ("stem_bn", "bn1"), ("classifier", "linear"),
        (_BLOCK + r"/((?:conv|bn)\d)", _plus(1, 1, "layer{}.{}.{}")),
    ),
    classifier="linear", stem="conv1",
)
SHUFFLEV2 = Layout(
    "RepDistiller models/ShuffleNetv2.py",
    (
        ("stem_conv", "conv1"), ("stem_bn", "bn1"),
        ("head_conv", "conv2"), ("head_bn", "bn2"), ("classifier", "linear"),
        # layer{s+1} = Sequential(DownBlock, BasicBlock x n): the down unit is entry 0.
        (r"stage(\d+)_down/((?:conv|bn)\d)", _plus(1, 1, "layer{}.0.{}")),
        (_BLOCK + r"/((?:conv|bn)\d)", lambda m: f"layer{int(m.group(1)) + 1}.{int(m.group(2)) + 1}.{m.group(3)}"),
    ),
    classifier="linear", stem="conv1",
)


# The ImageNet zoo's Flax names are the reference keys with '.' -> '_' within a module name
# (imagenet_resnet.py, mobilenetv1.py docstrings); the rules spell each kind out, so a module
# outside the reference layout is an error rather than a guessed key.
IMAGENET_RESNET = Layout(
    "torchvision models/resnet.py",
    (
        ("conv1", "conv1"), ("bn1", "bn1"), ("fc", "fc"),
        # downsample = Sequential(conv1x1, BN).
        (r"layer(\d+)_(\d+)/downsample_([01])", r"layer\1.\2.downsample.\3"),
        (r"layer(\d+)_(\d+)/((?:conv|bn)\d)", r"layer\1.\2.\3"),
    ),
    classifier="fc", stem="conv1",
)
MOBILENETV1 = Layout(
    "mdistiller models/imagenet/mobilenetv1.py",
    (
        # model = Sequential(conv_bn, conv_dw x 13, AvgPool2d); conv_bn = Sequential(conv, BN, ReLU),
        # conv_dw = Sequential(depthwise conv, BN, ReLU, pointwise conv, BN, ReLU).
        (r"model_0_([01])", r"model.0.\1"),
        (r"model_([1-9]\d*)_([0134])", r"model.\1.\2"),
        ("fc", "fc"),
    ),
    classifier="fc", stem="model.0.0",
)


def _register_cifar_zoo() -> None:
    from ekd_jax.models import mobilenetv2, resnet, vgg, wrn

    register_layout([n for n in resnet.MODELS if n != "ResNet50"], RESNET)
    register_layout(["ResNet50"], RESNETV2)
    register_layout(wrn.MODELS, WRN)
    register_layout(vgg.MODELS, VGG)
    register_layout(mobilenetv2.MODELS, MOBILENETV2)
    register_layout(["ShuffleV1"], SHUFFLEV1)
    register_layout(["ShuffleV2"], SHUFFLEV2)


_register_cifar_zoo()


def _register_imagenet_zoo() -> None:
    from ekd_jax.models import imagenet_resnet, mobilenetv1

    register_layout(imagenet_resnet.MODELS, IMAGENET_RESNET)
    register_layout(mobilenetv1.MODELS, MOBILENETV1)


_register_imagenet_zoo()


def layout_for(model: str) -> Layout:
    """The layout of ``model``; a ValueError naming the fix for an unknown model or one without a layout."""
    if model in LAYOUTS:
        return LAYOUTS[model]
    from ekd_jax.models import available_models, create_model

    if model not in available_models():
        try:
            create_model(model, 1)
        except ValueError as e:  # its message suggests the closest names and lists the zoo
            raise ValueError(f"model={model!r} is not valid: {e}; fix --model") from None
    have = ", ".join(sorted(LAYOUTS, key=str.lower))
    raise ValueError(f"model={model!r} is not valid: it has no PyTorch layout yet (layouts exist for {have}); fix --model")


# --------------------------------------------------------------------------- entries


# Flax -> PyTorch axis order of a kernel: conv HWIO -> OIHW, linear (in, out) -> (out, in); the way back
# is the inverse permutation. Other entries (BatchNorm vectors) keep their axes.
_TORCH_AXES = {"conv": (3, 2, 0, 1), "linear": (1, 0)}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One PyTorch tensor and the Flax leaf it is (``kind``: how the two shapes relate)."""

    key: str
    collection: str  # 'params' | 'batch_stats'
    path: tuple[str, ...]  # Flax module path + leaf name
    kind: str  # 'conv' (OIHW <-> HWIO), 'linear' (out,in <-> in,out), 'same'
    flax_shape: tuple[int, ...]

    @property
    def torch_shape(self) -> tuple[int, ...]:
        axes = _TORCH_AXES.get(self.kind)
        return self.flax_shape if axes is None else tuple(self.flax_shape[i] for i in axes)


def _transposed(entry: Entry, value: np.ndarray, to_torch: bool) -> np.ndarray:
    a = np.asarray(value)
    axes = _TORCH_AXES.get(entry.kind)
    if axes is not None:
        a = a.transpose(axes if to_torch else tuple(np.argsort(axes)))
    return np.ascontiguousarray(a)


def to_torch_array(entry: Entry, value: np.ndarray) -> np.ndarray:
    return _transposed(entry, value, to_torch=True)


def to_flax_array(entry: Entry, value: np.ndarray) -> np.ndarray:
    return _transposed(entry, value, to_torch=False)


@functools.lru_cache(maxsize=64)
def entries(model: str, num_classes: int, in_channels: int = 3) -> tuple[tuple[Entry, ...], tuple[str, ...]]:
    """``(entries in the reference state_dict() order, BatchNorm prefixes)`` of one zoo model.

    Built from the Flax model itself (an abstract init at 32x32, nothing computed; no parameter
    shape depends on the image size): the leaf modules in the order they are first called, which is
    the order the reference modules register theirs (tested against every reference state_dict()).
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from ekd_jax.models import create_model
    from ekd_jax.models.common import BatchNorm, TorchDense

    layout = layout_for(model)
    module = create_model(model, num_classes)
    order: list[tuple[tuple[str, ...], str]] = []

    def record(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name == "__call__" and isinstance(m, (nn.Conv, BatchNorm, TorchDense)):
            kind = "conv" if isinstance(m, nn.Conv) else "bn" if isinstance(m, BatchNorm) else "linear"
            if (tuple(m.path), kind) not in order:
                order.append((tuple(m.path), kind))
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct((1, 32, 32, in_channels), jnp.float32)
    with nn.intercept_methods(record):
        abstract = jax.eval_shape(lambda k, x: module.init(k, x, train=False), jax.random.key(0), x)

    def shape(collection, path):
        node = abstract[collection]
        for p in path:
            node = node[p]
        return tuple(node.shape)

    out: list[Entry] = []
    bns: list[str] = []
    for path, kind in order:
        prefix = layout.prefix(path)
        if kind == "bn":
            bns.append(prefix)
            for coll, leaf, suffix in (("params", "scale", "weight"), ("params", "bias", "bias"),
                                       ("batch_stats", "mean", "running_mean"), ("batch_stats", "var", "running_var")):
                out.append(Entry(f"{prefix}.{suffix}", coll, (*path, leaf), "same", shape(coll, (*path, leaf))))
        else:
            params = abstract["params"]
            for p in path:
                params = params[p]
            out.append(Entry(f"{prefix}.weight", "params", (*path, "kernel"), kind, shape("params", (*path, "kernel"))))
            if "bias" in params:
                out.append(Entry(f"{prefix}.bias", "params", (*path, "bias"), "same", shape("params", (*path, "bias"))))
    covered = {(e.collection, e.path) for e in out}
    leaves = {(c, tuple(getattr(k, "key", k) for k in p)) for c in abstract
              for p, _ in jax.tree_util.tree_flatten_with_path(abstract[c])[0]}
    if covered != leaves:  # a zoo module this mapping does not know: a bug here, not in the user's file
        raise RuntimeError(f"{layout.name}: {model} has Flax variables without a PyTorch key: {sorted(leaves - covered)[:5]}")
    keys = [e.key for e in out]
    if len(set(keys)) != len(keys):
        raise RuntimeError(f"{layout.name}: two Flax variables of {model} map to one PyTorch key")
    return tuple(out), tuple(bns)


def expected_keys(model: str, num_classes: int, in_channels: int = 3) -> list[str]:
    """The reference ``state_dict()`` keys of ``model``, in order, ``num_batches_tracked`` included."""
    ents, _ = entries(model, num_classes, in_channels)
    out = []
    for e in ents:
        out.append(e.key)
        if e.key.endswith(".running_var"):
            out.append(e.key[: -len("running_var")] + BN_EXTRA)
    return out


# --------------------------------------------------------------------------- conversion


def _names(keys: Sequence[str], limit: int = 6) -> str:
    keys = list(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Keys of a model saved inside ``nn.DataParallel`` / DDP all start with 'module.': drop it."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def infer_num_classes(model: str, state_dict: Mapping[str, np.ndarray]) -> int | None:
    w = state_dict.get(layout_for(model).classifier + ".weight")
    return int(w.shape[0]) if w is not None and np.ndim(w) == 2 else None


def infer_in_channels(model: str, state_dict: Mapping[str, np.ndarray]) -> int | None:
    w = state_dict.get(layout_for(model).stem + ".weight")
    return int(w.shape[1]) if w is not None and np.ndim(w) == 4 else None


def variables_from_state_dict(
    model: str,
    state_dict: Mapping[str, np.ndarray],
    *,
    num_classes: int | None = None,
    source: str = "the state dict",
) -> tuple[dict, dict]:
    """``({'params', 'batch_stats'}, info)`` of ``model`` from a reference-layout state dict of NumPy arrays.

    ``num_classes`` defaults to the classifier's rows, the image channels are the first conv's
    input channels. Every key must be there and have its shape, no other key may be (PyTorch's
    ``load_state_dict(strict=True)``); ``num_batches_tracked`` is accepted and ignored. Each
    problem is a ValueError naming the keys. ``info``: num_classes, in_channels, ignored keys.
    """
    layout = layout_for(model)
    state_dict = strip_module_prefix(state_dict)
    inferred = infer_num_classes(model, state_dict)
    if num_classes is None:
        if inferred is None:
            raise ValueError(
                f"{source} has no 2-D {layout.classifier}.weight to read the class count from "
                f"(is it a {layout.name} state dict of {model}?); pass --num_classes"
            )
        num_classes = inferred
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} is not valid: a positive integer; fix --num_classes")
    in_channels = infer_in_channels(model, state_dict) or 3
    ents, bns = entries(model, num_classes, in_channels)
    expected = {e.key: e for e in ents}
    ignorable = {f"{p}.{BN_EXTRA}" for p in bns}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected and k not in ignorable]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_names(unexpected)}")
        raise ValueError(
            f"{source} is not a {layout.name} state dict of {model} ({num_classes} classes): {'; '.join(parts)}. "
            "Check --model (the checkpoint's network) and that the file is a state dict of that layout"
        )
    wrong = []
    for k, e in expected.items():
        v = state_dict[k]
        if not hasattr(v, "shape") or not hasattr(v, "dtype"):
            raise ValueError(f"{source}: {k} is a {type(v).__name__}, not a tensor")
        if not np.issubdtype(np.asarray(v).dtype, np.floating):
            raise ValueError(f"{source}: {k} holds {np.asarray(v).dtype} values, expected floating point")
        if tuple(v.shape) != e.torch_shape:
            wrong.append(f"{k} is {list(v.shape)} in the file, {model} expects {list(e.torch_shape)}")
    if wrong:
        hint = (f"; the classifier has {inferred} classes: drop --num_classes or pass --num_classes={inferred}"
                if inferred is not None and inferred != num_classes else "; check --model")
        raise ValueError(f"{source} does not fit {model}: {'; '.join(wrong[:4])}" +
                         (f" (and {len(wrong) - 4} more)" if len(wrong) > 4 else "") + hint)
    variables: dict = {"params": {}, "batch_stats": {}}
    for e in ents:
        node = variables[e.collection]
        for p in e.path[:-1]:
            node = node.setdefault(p, {})
        node[e.path[-1]] = to_flax_array(e, np.asarray(state_dict[e.key], dtype=np.float32))
    info = {
        "num_classes": num_classes,
        "in_channels": in_channels,
        "tensors": len(ents),
        "ignored": sorted(k for k in state_dict if k in ignorable),
    }
    return variables, info


def state_dict_from_variables(
    model: str, variables: Mapping[str, Any], *, num_batches_tracked: int = 0
) -> "collections.OrderedDict[str, np.ndarray]":
    """The reference-layout state dict (NumPy arrays, reference key order) of ``model``'s variables."""
    layout = layout_for(model)
    num_classes = int(np.shape(_kernel(variables["params"], layout, layout.classifier))[1])
    in_channels = int(np.shape(_kernel(variables["params"], layout, layout.stem))[2])
    ents, _ = entries(model, num_classes, in_channels)
    out: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    for e in ents:
        node = variables[e.collection]
        for p in e.path:
            node = node[p]
        if tuple(np.shape(node)) != e.flax_shape:
            raise ValueError(f"{'/'.join(e.path)} is {list(np.shape(node))}, {model} has {list(e.flax_shape)}")
        out[e.key] = to_torch_array(e, np.asarray(node))
        if e.key.endswith(".running_var"):
            out[e.key[: -len("running_var")] + BN_EXTRA] = np.asarray(num_batches_tracked, dtype=np.int64)
    return out


def _kernel(params: Mapping[str, Any], layout: Layout, prefix: str):
    """The Flax kernel of the module whose PyTorch prefix is ``prefix`` (the classifier, the stem)."""
    stack: list[tuple[tuple[str, ...], Mapping]] = [((), params)]
    while stack:
        path, node = stack.pop()
        if "kernel" in node and not isinstance(node["kernel"], Mapping):
            try:
                if layout.prefix(path) == prefix:
                    return node["kernel"]
            except KeyError:
                pass
        stack.extend(((*path, k), v) for k, v in node.items() if isinstance(v, Mapping))
    raise ValueError(f"the variables have no module that {layout.name} calls {prefix!r}: not a {layout.name} model")


# --------------------------------------------------------------------------- files


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ValueError(
            f"reading or writing PyTorch checkpoints needs PyTorch, which is not installed ({e}): {_TORCH_HINT}"
        ) from None
    return torch


def require_torch() -> None:
    """Raises the ValueError that names the fix when PyTorch is missing (call before any work)."""
    _torch()


def _safetensors_numpy():
    try:
        from safetensors import numpy as st_numpy
    except ImportError as e:
        raise ValueError(f"reading .safetensors files needs safetensors, which is not installed ({e}): {_TORCH_HINT}") from None
    return st_numpy


def read_state_dict(path: str | pathlib.Path) -> tuple[dict[str, np.ndarray], str | None]:
    """``(state dict as NumPy arrays, where it was in the file)`` from a ``.pth``/``.pt`` or ``.safetensors``.

    A bare state dict, or one under ``'model'`` (RepDistiller, mdistiller) or ``'state_dict'``;
    keys saved from ``nn.DataParallel`` lose their ``module.`` prefix. PyTorch files are read with
    ``torch.load(weights_only=True)``: tensors and plain containers only (plus ``argparse.Namespace``,
    which RepDistiller's ``*_last.pth`` stores), never arbitrary objects.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        why = "it is a folder" if path.is_dir() else "no such file"
        raise ValueError(f"checkpoint={str(path)!r} is not valid: {why}; fix --checkpoint")
    if path.suffix == ".safetensors":
        st = _safetensors_numpy()
        try:
            tensors = st.load_file(str(path))
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
            raise ValueError(
                f"{path} is not a .safetensors file safetensors can read ({type(e).__name__}: {_short(e)})"
            ) from None
        return _floating(strip_module_prefix(tensors)), None
    torch = _torch()
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch.load raises many types for a file it cannot read)
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e) + str(e.__cause__ or e.__context__ or ""))
        if refused:
            raise ValueError(
                f"{path} holds a Python object of type {refused.group(1)}: ekd_jax reads checkpoints with "
                "torch.load(weights_only=True), tensors and plain containers only, and never unpickles other "
                "objects. Re-save the network's state dict alone: torch.save(model.state_dict(), path)"
            ) from None
        raise ValueError(f"{path} is not a PyTorch checkpoint torch.load can read ({type(e).__name__}: {_short(e)})") from None
    state_dict, entry = _unwrap(obj, path, torch)
    out = {}
    for k, v in strip_module_prefix(state_dict).items():
        if not isinstance(k, str):
            raise ValueError(f"{path}: the state dict has a key of type {type(k).__name__} ({k!r}); keys are strings")
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{path}: {k} is a {type(v).__name__}, not a tensor")
        t = v.detach().cpu()
        if t.is_floating_point() and t.dtype != torch.float32:
            t = t.float()  # bfloat16/float16 (NumPy has no bfloat16), float64: the zoo's params are float32
        out[k] = t.numpy()
    return out, entry


def _floating(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v) for k, v in arrays.items()}


def _short(e: BaseException) -> str:
    text = str(e).strip() or repr(e)
    return " ".join(text.split())[:200]


def _unwrap(obj: Any, path: pathlib.Path, torch) -> tuple[Mapping[str, Any], str | None]:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj, None
        for entry in ("model", "state_dict"):
            inner = obj.get(entry)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner, entry
        keys = [str(k) for k in list(obj)[:8]]
        raise ValueError(
            f"{path} holds no state dict: a dict with entries {keys}; expected parameter tensors by name, "
            "or a state dict under 'model' or 'state_dict'"
        )
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict (a dict of tensors by parameter name)")


def write_state_dict(path: str | pathlib.Path, state_dict: Mapping[str, np.ndarray]) -> None:
    """Writes a bare state dict with ``torch.save`` (``.safetensors``: with safetensors, no torch)."""
    path = pathlib.Path(path)
    if path.suffix == ".safetensors":
        _safetensors_numpy().save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(path))
        return
    torch = _torch()
    tensors = collections.OrderedDict((k, torch.from_numpy(np.array(v, copy=True))) for k, v in state_dict.items())
    torch.save(tensors, str(path))
