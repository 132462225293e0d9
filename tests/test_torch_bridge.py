"""PyTorch bridge (project issue 15): published teachers in, trained students out, and the proof that
the zoo computes what the reference computes.

The PyTorch networks below are written here, from the architecture facts
(../shared/reference/ZOO_CONVENTIONS.md), in RepDistiller's module layout: their ``state_dict()``
keys are RepDistiller's. They share no code with ``ekd_jax.models``, so equal outputs on equal
weights check the zoo (layer order, ReLU placement, shortcut kinds, pooling, channel shuffle,
BatchNorm convention) as much as the key mapping.

* every CIFAR zoo model: our key list (names, order, shapes) is the reference ``state_dict()``'s,
  and both round trips (PyTorch -> JAX -> PyTorch, JAX -> PyTorch -> JAX) are bitwise;
* one model of every family, random weights AND random BatchNorm statistics: eval-mode logits and
  every feature map (``preact`` off and on) within 1e-5; one train-mode forward on both sides:
  outputs and the new running mean/var within 1e-5 (PyTorch's convention, unbiased running var);
* end to end: a RepDistiller-style ``ckpt_epoch_240.pth`` -> ``python -m ekd_jax.import_torch`` ->
  ``kd`` for one epoch on the tiny config: the frozen teacher is bitwise the imported one and its
  test accuracy is the PyTorch network's; ``ekd_jax.export --torch_state_dict`` of that student
  loads into the PyTorch network (strict) and gives the JAX student's logits;
* bad input: one ``error:`` line naming the keys / option, exit status 2, nothing written; the
  same words as the ValueError from Python; a clear line naming the fix without PyTorch.

PyTorch is a test-only dependency here (``ekd_jax[torch]``; ekd_jax itself imports without it).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import NO_TORCH

torch = pytest.importorskip("torch", reason=NO_TORCH)
import torch.nn as tnn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ekd_jax import torch_layout
from ekd_jax.import_torch import import_checkpoint
from ekd_jax.models import available_models, create_model

REPO = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-5
torch.set_num_threads(1)

# --------------------------------------------------------------------------- reference networks
# RepDistiller's module names and nesting (hence its state_dict keys), written from the facts.


def _conv(cin, cout, k, stride=1, groups=1, bias=False):
    return tnn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias)


def _shuffle(x, groups):  # [N, C, H, W] -> [N, g, C/g, H, W] -> swap g and C/g -> [N, C, H, W]
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ResBlock(tnn.Module):
    """resnet.py BasicBlock, and resnetv2.py Bottleneck when ``bottleneck`` (stride on the 3x3)."""

    def __init__(self, cin, planes, stride, bottleneck=False, shortcut_name="downsample"):
        super().__init__()
        self.bottleneck = bottleneck
        out = planes * (4 if bottleneck else 1)
        if bottleneck:
            self.conv1, self.bn1 = _conv(cin, planes, 1), tnn.BatchNorm2d(planes)
            self.conv2, self.bn2 = _conv(planes, planes, 3, stride), tnn.BatchNorm2d(planes)
            self.conv3, self.bn3 = _conv(planes, out, 1), tnn.BatchNorm2d(out)
        else:
            self.conv1, self.bn1 = _conv(cin, planes, 3, stride), tnn.BatchNorm2d(planes)
            self.conv2, self.bn2 = _conv(planes, planes, 3), tnn.BatchNorm2d(planes)
        projection = stride != 1 or cin != out
        # resnet.py: `downsample` (None or Sequential); resnetv2.py: `shortcut` (an empty Sequential or one).
        layers = [_conv(cin, out, 1, stride), tnn.BatchNorm2d(out)] if projection else []
        self.shortcut_name = shortcut_name
        setattr(self, shortcut_name, tnn.Sequential(*layers) if layers or shortcut_name == "shortcut" else None)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        if self.bottleneck:
            y = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(y)))))
        else:
            y = self.bn2(self.conv2(y))
        sc = getattr(self, self.shortcut_name)
        pre = y + (x if sc is None else sc(x))
        return F.relu(pre), pre


class RefResNet(tnn.Module):
    """resnet.py ResNet (BasicBlock; widths [stem, s1, s2, s3]); ``v2``: resnetv2.py ResNet50."""

    def __init__(self, depths, widths, num_classes, v2=False):
        super().__init__()
        self.v2, self.stages = v2, len(depths)
        self.conv1, self.bn1 = _conv(3, widths[0], 3), tnn.BatchNorm2d(widths[0])
        cin = widths[0]
        for s, (n, w) in enumerate(zip(depths, widths[1:]), start=1):
            blocks = []
            for b in range(n):
                blocks.append(ResBlock(cin, w, 2 if s > 1 and b == 0 else 1, bottleneck=v2,
                                       shortcut_name="shortcut" if v2 else "downsample"))
                cin = w * (4 if v2 else 1)
            setattr(self, f"layer{s}", tnn.ModuleList(blocks))
        self.avgpool = tnn.AdaptiveAvgPool2d(1) if v2 else tnn.AvgPool2d(8)
        setattr(self, "linear" if v2 else "fc", tnn.Linear(cin, num_classes))

    def forward(self, x, is_feat=False, preact=False):
        x = F.relu(self.bn1(self.conv1(x)))
        feats = [x]
        for s in range(1, self.stages + 1):
            for block in getattr(self, f"layer{s}"):
                x, pre = block(x)
            feats.append(pre if preact else x)
        x = self.avgpool(x).flatten(1)
        logits = (self.linear if self.v2 else self.fc)(x)
        return (feats + [x], logits) if is_feat else logits


class WBlock(tnn.Module):
    """wrn.py BasicBlock: pre-activation; 1x1 convShortcut on relu(bn1(x)) when the width changes."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = tnn.BatchNorm2d(cin)
        self.conv1 = _conv(cin, cout, 3, stride)
        self.bn2 = tnn.BatchNorm2d(cout)
        self.conv2 = _conv(cout, cout, 3)
        self.convShortcut = None if cin == cout else _conv(cin, cout, 1, stride)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return (x if self.convShortcut is None else self.convShortcut(a)) + y


class WStage(tnn.Module):  # wrn.py NetworkBlock: its blocks live in `.layer`
    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.layer = tnn.Sequential(*[WBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class RefWRN(tnn.Module):
    def __init__(self, depth, k, num_classes):
        super().__init__()
        n, w = (depth - 4) // 6, [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = _conv(3, 16, 3)
        self.block1, self.block2, self.block3 = (WStage(n, w[i], w[i + 1], 1 if i == 0 else 2) for i in range(3))
        self.bn1 = tnn.BatchNorm2d(w[3])
        self.fc = tnn.Linear(w[3], num_classes)

    def forward(self, x, is_feat=False, preact=False):
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = self.block3(f2)
        f4 = F.avg_pool2d(F.relu(self.bn1(f3)), 8).flatten(1)
        logits = self.fc(f4)
        if preact:  # the BN the next unit applies to each stage map
            f1, f2, f3 = self.block2.layer[0].bn1(f1), self.block3.layer[0].bn1(f2), self.bn1(f3)
        return ([f0, f1, f2, f3, f4], logits) if is_feat else logits


VGG_CFG = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


class RefVGG(tnn.Module):
    """vgg.py VGG-BN: block{i} = Sequential(conv(bias), BN, ReLU, ..., conv, BN) (last ReLU dropped)."""

    def __init__(self, cfg, num_classes):
        super().__init__()
        cin = 3
        for i, widths in enumerate(cfg):
            layers = []
            for w in widths:
                layers += [_conv(cin, w, 3, bias=True), tnn.BatchNorm2d(w), tnn.ReLU()]
                cin = w
            setattr(self, f"block{i}", tnn.Sequential(*layers[:-1]))
        self.classifier = tnn.Linear(512, num_classes)

    def forward(self, x, is_feat=False, preact=False):
        big = x.shape[2] == 64
        x = F.relu(self.block0(x))
        feats = [x]
        for i in range(1, 5):
            if i < 4 or big:
                x = F.max_pool2d(x, 2, 2)
            pre = getattr(self, f"block{i}")(x)
            x = F.relu(pre)
            feats.append(pre if preact else x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        logits = self.classifier(x)
        return (feats + [x], logits) if is_feat else logits


class InvRes(tnn.Module):
    """mobilenetv2.py InvertedResidual: `.conv` = Sequential(pw, BN, ReLU, dw, BN, ReLU, pw-linear, BN)."""

    def __init__(self, cin, cout, stride, t):
        super().__init__()
        h = cin * t
        self.residual = stride == 1 and cin == cout
        self.conv = tnn.Sequential(
            _conv(cin, h, 1), tnn.BatchNorm2d(h), tnn.ReLU(),
            _conv(h, h, 3, stride, groups=h), tnn.BatchNorm2d(h), tnn.ReLU(),
            _conv(h, cout, 1), tnn.BatchNorm2d(cout),
        )

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class RefMobileNetV2(tnn.Module):
    """mobilenetv2.py mobile_half: T = 6, width 0.5, stride-2 stem, 1280-wide head."""

    SETTING = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes, width=0.5):
        super().__init__()
        cin = int(32 * width)
        self.conv1 = tnn.Sequential(_conv(3, cin, 3, 2), tnn.BatchNorm2d(cin), tnn.ReLU())
        self.blocks = tnn.ModuleList()
        for t, c, n, s in self.SETTING:
            layers = []
            for i in range(n):
                layers.append(InvRes(cin, int(c * width), s if i == 0 else 1, t))
                cin = int(c * width)
            self.blocks.append(tnn.Sequential(*layers))
        self.conv2 = tnn.Sequential(_conv(cin, 1280, 1), tnn.BatchNorm2d(1280), tnn.ReLU())
        self.classifier = tnn.Sequential(tnn.Linear(1280, num_classes))

    def forward(self, x, is_feat=False, preact=False):
        x = self.conv1(x)
        feats = [x]
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in (1, 2, 4, 6):
                feats.append(x)
        x = F.avg_pool2d(self.conv2(x), x.shape[2], ceil_mode=True).flatten(1)
        logits = self.classifier(x)
        return (feats + [x], logits) if is_feat else logits


class V1Unit(tnn.Module):
    """ShuffleNetv1.py Bottleneck (stride 2: avg-pooled input concatenated)."""

    def __init__(self, cin, cout, stride, groups):
        super().__init__()
        mid, g = cout // 4, 1 if cin == 24 else groups
        self.g, self.stride = g, stride
        self.conv1, self.bn1 = _conv(cin, mid, 1, groups=g), tnn.BatchNorm2d(mid)
        self.conv2, self.bn2 = _conv(mid, mid, 3, stride, groups=mid), tnn.BatchNorm2d(mid)
        self.conv3, self.bn3 = _conv(mid, cout, 1, groups=groups), tnn.BatchNorm2d(cout)

    def forward(self, x):
        y = _shuffle(F.relu(self.bn1(self.conv1(x))), self.g)
        y = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(y)))))
        pre = torch.cat([y, F.avg_pool2d(x, 3, 2, 1)], 1) if self.stride == 2 else y + x
        return F.relu(pre), pre


class RefShuffleV1(tnn.Module):
    def __init__(self, num_classes, widths=(240, 480, 960), blocks=(4, 8, 4), groups=3):
        super().__init__()
        self.conv1, self.bn1 = _conv(3, 24, 1), tnn.BatchNorm2d(24)
        cin = 24
        for s, (w, n) in enumerate(zip(widths, blocks), start=1):
            units = []
            for i in range(n):
                units.append(V1Unit(cin, w - (cin if i == 0 else 0), 2 if i == 0 else 1, groups))
                cin = w
            setattr(self, f"layer{s}", tnn.ModuleList(units))
        self.linear = tnn.Linear(widths[-1], num_classes)

    def forward(self, x, is_feat=False, preact=False):
        x = F.relu(self.bn1(self.conv1(x)))
        feats = [x]
        for s in (1, 2, 3):
            for unit in getattr(self, f"layer{s}"):
                x, pre = unit(x)
            feats.append(pre if preact else x)
        x = F.avg_pool2d(x, 4).flatten(1)
        logits = self.linear(x)
        return (feats + [x], logits) if is_feat else logits


class V2Down(tnn.Module):
    """ShuffleNetv2.py DownBlock: left dw3x3/2-BN-1x1-BN-ReLU, right 1x1-BN-ReLU-dw3x3/2-BN-1x1-BN-ReLU."""

    def __init__(self, cin, cout):
        super().__init__()
        mid = cout // 2
        self.conv1, self.bn1 = _conv(cin, cin, 3, 2, groups=cin), tnn.BatchNorm2d(cin)
        self.conv2, self.bn2 = _conv(cin, mid, 1), tnn.BatchNorm2d(mid)
        self.conv3, self.bn3 = _conv(cin, mid, 1), tnn.BatchNorm2d(mid)
        self.conv4, self.bn4 = _conv(mid, mid, 3, 2, groups=mid), tnn.BatchNorm2d(mid)
        self.conv5, self.bn5 = _conv(mid, mid, 1), tnn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return _shuffle(torch.cat([left, right], 1), 2), None


class V2Unit(tnn.Module):
    """ShuffleNetv2.py BasicBlock: split in halves, 1x1-BN-ReLU-dw3x3-BN-1x1-BN(-ReLU) on the second."""

    def __init__(self, cin):
        super().__init__()
        c = cin // 2
        self.conv1, self.bn1 = _conv(c, c, 1), tnn.BatchNorm2d(c)
        self.conv2, self.bn2 = _conv(c, c, 3, groups=c), tnn.BatchNorm2d(c)
        self.conv3, self.bn3 = _conv(c, c, 1), tnn.BatchNorm2d(c)

    def forward(self, x):
        c = x.shape[1] // 2
        keep, y = x[:, :c], x[:, c:]
        y = self.bn3(self.conv3(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(y)))))))
        return _shuffle(torch.cat([keep, F.relu(y)], 1), 2), torch.cat([keep, y], 1)


class RefShuffleV2(tnn.Module):
    def __init__(self, num_classes, widths=(116, 232, 464, 1024), blocks=(3, 7, 3)):
        super().__init__()
        self.conv1, self.bn1 = _conv(3, 24, 1), tnn.BatchNorm2d(24)
        cin = 24
        for s, (w, n) in enumerate(zip(widths, blocks), start=1):
            setattr(self, f"layer{s}", tnn.ModuleList([V2Down(cin, w)] + [V2Unit(w) for _ in range(n)]))
            cin = w
        self.conv2, self.bn2 = _conv(cin, widths[3], 1), tnn.BatchNorm2d(widths[3])
        self.linear = tnn.Linear(widths[3], num_classes)

    def forward(self, x, is_feat=False, preact=False):
        x = F.relu(self.bn1(self.conv1(x)))
        feats = [x]
        for s in (1, 2, 3):
            for unit in getattr(self, f"layer{s}"):
                x, pre = unit(x)
            feats.append(pre if preact else x)
        x = F.avg_pool2d(F.relu(self.bn2(self.conv2(x))), 4).flatten(1)
        logits = self.linear(x)
        return (feats + [x], logits) if is_feat else logits


_PLAIN, _X4 = (16, 16, 32, 64), (32, 64, 128, 256)
REFERENCE = {
    **{f"resnet{d}": functools.partial(RefResNet, ((d - 2) // 6,) * 3, _PLAIN) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": functools.partial(RefResNet, (1, 1, 1), _X4),
    "resnet32x4": functools.partial(RefResNet, (5, 5, 5), _X4),
    "ResNet50": functools.partial(RefResNet, (3, 4, 6, 3), (64, 64, 128, 256, 512), v2=True),
    **{f"wrn_{d}_{k}": functools.partial(RefWRN, d, k) for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))},
    **{name: functools.partial(RefVGG, cfg) for name, cfg in VGG_CFG.items()},
    "MobileNetV2": RefMobileNetV2,
    "ShuffleV1": RefShuffleV1,
    "ShuffleV2": RefShuffleV2,
}
CIFAR_ZOO = sorted(REFERENCE, key=str.lower)
# One model of every family (the x4 ResNets: a stride-1 projection in stage 1; wrn_16_1: both the
# identity and the 1x1 shortcut; vgg11: blocks of two convs).
FAMILIES = ["resnet8", "resnet8x4", "ResNet50", "wrn_16_1", "vgg11", "MobileNetV2", "ShuffleV1", "ShuffleV2"]


def reference(name: str, num_classes: int, seed: int = 0) -> tnn.Module:
    """The PyTorch network with random weights and random BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    net = REFERENCE[name](num_classes=num_classes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (tnn.Conv2d, tnn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=g)
                if m.bias is not None:
                    m.bias.uniform_(-0.2, 0.2, generator=g)
            elif isinstance(m, tnn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
                m.running_mean.normal_(0.0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.num_batches_tracked.fill_(1234)
    return net.eval()


def numpy_state_dict(net: tnn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def _error(got, want) -> float:
    """max |got - want| relative to the scale of ``want`` (absolute below 1)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"shape {got.shape} vs {want.shape}"
    return float(np.max(np.abs(got - want))) / max(1.0, float(np.max(np.abs(want))))


def _close(got, want, what: str) -> None:
    err = _error(got, want)
    assert err <= TOL, f"{what}: max |JAX - PyTorch| = {err:.3g} (relative to max(1, |PyTorch|)) > {TOL}"


def _nchw(a) -> np.ndarray:
    a = np.asarray(a)
    return a.transpose(0, 3, 1, 2) if a.ndim == 4 else a


def _bitwise(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _leaves(tree) -> dict:
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --------------------------------------------------------------------------- layout, every model


def test_every_cifar_model_has_a_reference_definition_and_a_layout():
    import inspect

    zoo = available_models("cifar") if "zoo" in inspect.signature(available_models).parameters else available_models()
    assert set(CIFAR_ZOO) == set(zoo)
    assert set(CIFAR_ZOO) <= set(torch_layout.LAYOUTS)


@pytest.mark.parametrize("name", CIFAR_ZOO)
def test_keys_order_shapes_and_round_trips_are_the_references(name):
    """Our key list is the reference state_dict()'s (names, order, shapes); PyTorch -> JAX -> PyTorch
    and JAX -> PyTorch -> JAX are bitwise."""
    with torch.device("meta"):  # keys and shapes without allocating or initialising anything
        keys = {k: tuple(v.shape) for k, v in REFERENCE[name](num_classes=7).state_dict().items()}
    assert torch_layout.expected_keys(name, 7) == list(keys)
    rng = np.random.default_rng(0)
    sd = {k: (np.asarray(1234, np.int64) if k.endswith(".num_batches_tracked") else rng.random(shape, np.float32))
          for k, shape in keys.items()}
    variables, info = torch_layout.variables_from_state_dict(name, sd)
    assert info["num_classes"] == 7 and info["in_channels"] == 3
    assert len(info["ignored"]) == sum(k.endswith(".num_batches_tracked") for k in sd)
    back = torch_layout.state_dict_from_variables(name, variables, num_batches_tracked=1234)
    assert list(back) == list(sd)
    assert all(_bitwise(back[k], sd[k]) for k in sd), [k for k in sd if not _bitwise(back[k], sd[k])][:3]

    # JAX side first: other values in the same tree (the Flax model's own: entries() checks that
    # every variable of the model has a key; the forward tests apply it).
    jax_vars = jax.tree_util.tree_map(lambda a: rng.random(a.shape, np.float32), variables)
    again, _ = torch_layout.variables_from_state_dict(name, torch_layout.state_dict_from_variables(name, jax_vars))
    a, b = _leaves(jax_vars), _leaves(again)
    assert a.keys() == b.keys() and all(_bitwise(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- equal outputs


@pytest.mark.parametrize("name", FAMILIES)
def test_eval_logits_and_every_feature_map_equal_pytorch(name):
    images = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    net = reference(name, num_classes=10, seed=2)
    variables, _ = torch_layout.variables_from_state_dict(name, numpy_state_dict(net))
    module = create_model(name, 10)
    # One compiled program for both feature variants (compiling dominates at this size).
    both = jax.jit(lambda v, x: [module.apply(v, x, train=False, preact=p) for p in (False, True)])(variables, images)
    x = torch.from_numpy(_nchw(images).copy())
    for preact, (logits, feats) in zip((False, True), both):
        with torch.no_grad():
            feats_t, logits_t = net(x, is_feat=True, preact=preact)
        _close(logits, logits_t, f"{name} logits (preact={preact})")
        assert len(feats) == len(feats_t)
        for i, (f, ft) in enumerate(zip(feats, feats_t)):
            _close(_nchw(f), ft, f"{name} feature {i} (preact={preact})")


@pytest.mark.parametrize("name", FAMILIES)
def test_train_mode_batchnorm_update_equals_pytorch(name):
    """One train-mode forward on both sides: the new running mean/var of every BatchNorm agree within
    1e-5. Each one's update is made from the batch statistics of its input, so this also checks the
    train-mode forward up to the last BatchNorm (past it, the network is the eval-mode one).

    Eight images: batch statistics of a tiny batch amplify float32 rounding with depth (for PyTorch's
    own float32 forward against float64 as much as for ours); with two images, MobileNetV2's deepest
    statistics are ~1e-5 from PyTorch's, and from PyTorch's float64 forward alike."""
    images = np.random.default_rng(8).standard_normal((8, 32, 32, 3)).astype(np.float32)
    net = reference(name, num_classes=10, seed=3)
    variables, _ = torch_layout.variables_from_state_dict(name, numpy_state_dict(net))
    net.train()
    with torch.no_grad():
        net(torch.from_numpy(_nchw(images).copy()))
    _, updates = jax.jit(functools.partial(create_model(name, 10).apply, train=True, mutable=["batch_stats"]))(
        variables, images)
    after, _ = torch_layout.variables_from_state_dict(name, numpy_state_dict(net))
    got, want, old = _leaves(updates["batch_stats"]), _leaves(after["batch_stats"]), _leaves(variables["batch_stats"])
    assert got.keys() == want.keys()
    for k in want:
        _close(got[k], want[k], f"{name} running statistic {k}")
        assert not np.allclose(want[k], old[k]), f"{name} {k} did not move"


def test_running_var_convention_is_pytorch_unbiased():
    """The truth, on one layer: PyTorch's new running_var = 0.9 var + 0.1 var_batch * n/(n-1), and the
    zoo's BatchNorm gives it; Flax's stock biased update would miss by far more than the tolerance."""
    from ekd_jax.models.common import BatchNorm

    x = np.random.default_rng(4).standard_normal((2, 3, 3, 5)).astype(np.float32) * 2 + 1  # n = 18 per channel
    bn = tnn.BatchNorm2d(5).train()
    with torch.no_grad():
        bn(torch.from_numpy(_nchw(x).copy()))
    _, upd = BatchNorm().apply({"params": {"scale": np.ones(5, np.float32), "bias": np.zeros(5, np.float32)},
                                "batch_stats": {"mean": np.zeros(5, np.float32), "var": np.ones(5, np.float32)}},
                               x, True, mutable=["batch_stats"])
    n, biased = 18, x.reshape(-1, 5).var(axis=0)
    unbiased_update = 0.9 + 0.1 * biased * n / (n - 1)
    _close(bn.running_var.numpy(), unbiased_update, "PyTorch running_var vs the unbiased formula")
    _close(upd["batch_stats"]["var"], bn.running_var.numpy(), "zoo running_var")
    _close(upd["batch_stats"]["mean"], bn.running_mean.numpy(), "zoo running_mean")
    assert np.min(np.abs((0.9 + 0.1 * biased) - unbiased_update)) > 100 * TOL


# --------------------------------------------------------------------------- files


def test_checkpoint_wrappers_data_parallel_prefix_and_safetensors(tmp_path):
    """A bare state dict, one under 'model' (RepDistiller: with epoch, optimizer state and, in
    *_last.pth, an argparse.Namespace) or 'state_dict', 'module.' keys, .safetensors: the same teacher."""
    import argparse

    from safetensors.torch import save_file

    net = reference("resnet8", 10)
    sd = net.state_dict()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net(torch.zeros(2, 3, 32, 32)).sum().backward()
    opt.step()
    sd = net.state_dict()
    files = {
        "bare.pth": sd,
        "ckpt_epoch_240.pth": {"epoch": 240, "model": sd, "accuracy": torch.tensor(71.5), "optimizer": opt.state_dict()},
        "resnet8_last.pth": {"opt": argparse.Namespace(model="resnet8", lr=0.05), "model": sd},
        "lightning.ckpt": {"state_dict": sd, "epoch": 3},
        "parallel.pth": {"model": {f"module.{k}": v for k, v in sd.items()}},
    }
    want = numpy_state_dict(net)
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        got, _ = torch_layout.read_state_dict(tmp_path / name)
        assert got.keys() == want.keys() and all(_bitwise(got[k], want[k]) for k in want), name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    got, _ = torch_layout.read_state_dict(tmp_path / "w.safetensors")
    assert got.keys() == want.keys() and all(_bitwise(got[k], want[k]) for k in want)
    # Written by us and read back by PyTorch itself: bitwise, reference order, num_batches_tracked int64.
    variables, _ = torch_layout.variables_from_state_dict("resnet8", want)
    written = torch_layout.state_dict_from_variables("resnet8", variables, num_batches_tracked=7)
    torch_layout.write_state_dict(tmp_path / "out.pth", written)
    loaded = torch.load(tmp_path / "out.pth", weights_only=True)
    assert list(loaded) == list(sd)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd if not k.endswith("num_batches_tracked"))
    assert all(loaded[k].dtype == torch.int64 and int(loaded[k]) == 7 for k in sd if k.endswith("num_batches_tracked"))


# --------------------------------------------------------------------------- end to end


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return {**env, **extra}


def _cli(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env or _env(),
                          capture_output=True, text=True, timeout=300)


def _tiny_config():
    spec = importlib.util.spec_from_file_location("quickstart", REPO / "configs" / "quickstart.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config("tiny")


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A RepDistiller-style ckpt_epoch_240.pth of a 5-class resnet8, and 32x32 RGB data for it."""
    d = tmp_path_factory.mktemp("published")
    rng = np.random.default_rng(5)
    arrays = {"x_train": rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
              "y_train": np.arange(64, dtype=np.int64) % 5,
              "x_test": rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
              "y_test": rng.integers(0, 5, 40)}
    np.savez(d / "data.npz", **arrays)
    net = reference("resnet8", 5, seed=6)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    torch.save({"epoch": 240, "model": net.state_dict(), "accuracy": torch.tensor(72.5), "optimizer": opt.state_dict()},
               d / "ckpt_epoch_240.pth")
    return d, net, arrays


def test_published_teacher_import_then_kd_then_export_to_torch(published):
    """The command line imports a RepDistiller-style checkpoint; kd trains a resnet8 student for one
    epoch against it: the frozen teacher is bitwise the imported one, and its test accuracy is the
    PyTorch network's. Then ekd_jax.export's torch_state_dict (its flag: test_without_torch_...)
    writes the student as a bare state dict that the PyTorch resnet8 loads (strict) and that gives
    the JAX student's logits; num_batches_tracked = the student's steps. (One test: the run is shared.)"""
    from ekd_jax import data, export, rundir, train

    d, net, arrays = published
    proc = _cli("ekd_jax.import_torch", f"--checkpoint={d / 'ckpt_epoch_240.pth'}", "--model=resnet8",
                f"--out={d / 'teacher_run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    meta = json.loads((d / "teacher_run" / "teacher" / "network.json").read_text())
    assert (meta["model"], meta["num_classes"], meta["input_shape"]) == ("resnet8", 5, [32, 32, 3])
    assert info["state_dict_entry"] == "model" and info["tensors"] == 9 * 4 + 9 + 2

    c = _tiny_config()
    c.method, c.teacher.model, c.teacher.checkpoint = "kd", "resnet8", str(d / "teacher_run")
    c.data.source, c.data.image_size, c.data.train_fraction = f"npz:{d / 'data.npz'}", None, 1.0
    c.num_epochs, c.batch_size, c.eval_batch_size = 1, 8, 40  # 8 steps
    summary = train.train_and_evaluate(c, str(d / "kd"))
    assert summary["method"] == "kd" and summary["steps"] == 8
    assert summary["teacher_params_sha256"] == info["teacher_params_sha256"]
    mean, std = data.channel_stats(arrays["x_train"])  # the run's normalisation
    x = (arrays["x_test"].astype(np.float32) / 255.0 - np.float32(mean)) / np.float32(std)
    with torch.no_grad():
        pred = net(torch.from_numpy(_nchw(x).copy())).argmax(1).numpy()
    assert summary["teacher_top1"] == pytest.approx(float(np.mean(pred == arrays["y_test"])), abs=1e-9)
    module, variables, _ = rundir.restore_network(d / "teacher_run" / "teacher")
    with torch.no_grad():
        _close(module.apply(variables, x[:4], train=False)[0], net(torch.from_numpy(_nchw(x[:4]).copy())), "teacher")

    out = export.export_student(d / "kd", d / "export", platforms=("cpu",), saved_model=False, torch_state_dict=True)
    assert out["files"]["torch_state_dict"] == "student_state_dict.pth"
    assert out["verified_max_abs_diff"]["torch_state_dict"] == 0.0  # read back bitwise
    sd = torch.load(d / "export" / "student_state_dict.pth", weights_only=True)
    student = REFERENCE["resnet8"](num_classes=5).eval()
    student.load_state_dict(sd, strict=True)
    assert int(sd["bn1.num_batches_tracked"]) == 8
    module, variables, _ = rundir.restore_network(d / "kd" / "student")
    with torch.no_grad():
        _close(module.apply(variables, x[:4], train=False)[0], student(torch.from_numpy(_nchw(x[:4]).copy())), "student")


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, pathlib.Path]:
    d = tmp_path_factory.mktemp("bad")
    net = reference("resnet8", 5)
    sd = net.state_dict()
    keys = dict(sd)
    del keys["layer1.0.bn1.running_var"]
    keys["layer1.0.bn3.weight"] = torch.ones(16)
    files = {"good": {"model": sd}, "keys": keys, "wrn": reference("wrn_16_1", 5).state_dict()}
    out = {}
    for name, obj in files.items():
        torch.save(obj, d / f"{name}.pth")
        out[name] = d / f"{name}.pth"
    (d / "notes.pth").write_text("not a checkpoint\n")
    out["text"] = d / "notes.pth"
    torch.save({"model": sd, "net": tnn.Linear(2, 2)}, d / "pickled.pth")  # a whole module: needs unpickling
    out["pickled"] = d / "pickled.pth"
    return out


BAD = [  # (file, arguments, words the one error line must contain, run the command line too)
    ("good", ["--model=resnet8_x4"], ["model='resnet8_x4' is not valid", "resnet8x4", "fix --model"], True),
    ("keys", ["--model=resnet8"], ["missing keys layer1.0.bn1.running_var", "unexpected keys layer1.0.bn3.weight"], True),
    ("good", ["--model=resnet8", "--num_classes=7"], ["fc.weight is [5, 64] in the file, resnet8 expects [7, 64]",
                                                       "fc.bias is [5]", "--num_classes=5"], True),
    ("text", ["--model=resnet8"], ["is not a PyTorch checkpoint"], True),
    ("wrn", ["--model=resnet8"], ["missing keys layer1.0.conv1.weight", "unexpected keys block1.layer.0.bn1.weight"], False),
    ("good", ["--model=wrn_16_1"], ["missing keys block1.layer.0.bn1.weight", "unexpected keys layer1.0.conv1.weight"],
     False),
    ("pickled", ["--model=resnet8"], ["torch.nn.modules.linear.Linear", "weights_only=True"], False),
    ("missing", ["--model=resnet8"], ["no such file", "fix --checkpoint"], False),
]


@pytest.mark.parametrize("case", range(len(BAD)), ids=[f"{b[0]}-{b[1][-1][2:]}" for b in BAD])
def test_bad_input_is_one_error_line_naming_it(case, bad_files, tmp_path):
    """The command line (a subprocess each, for the first cases): exit status 2, exactly one line
    ``error: ...`` on stderr naming the keys / option, no traceback, nothing written. From Python
    (every case): a ValueError with the same words."""
    which, args, words, cli = BAD[case]
    ckpt = bad_files.get(which, tmp_path / "nothere.pth")
    out = tmp_path / "out"
    kw = {a.split("=")[0][2:]: a.split("=")[1] for a in args}
    with pytest.raises(ValueError) as e:
        import_checkpoint(ckpt, kw["model"], out, num_classes=int(kw["num_classes"]) if "num_classes" in kw else None)
    line = "error: " + " ".join(str(e.value).split())
    for w in words:
        assert w in line, (w, line)
    assert not out.exists(), "nothing is written"
    if cli:
        proc = _cli("ekd_jax.import_torch", f"--checkpoint={ckpt}", f"--out={out}", *args)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [line], proc.stderr[-3000:]
        assert proc.stdout == "" and not out.exists()


def test_existing_teacher_is_kept_unless_overwrite(published, tmp_path):
    d = published[0]
    import_checkpoint(d / "ckpt_epoch_240.pth", "resnet8", tmp_path)
    with pytest.raises(ValueError, match="already exists.*--overwrite"):
        import_checkpoint(d / "ckpt_epoch_240.pth", "resnet8", tmp_path)
    info = import_checkpoint(d / "ckpt_epoch_240.pth", "resnet8", tmp_path, overwrite=True, image_size=16)
    assert json.loads((tmp_path / "teacher" / "network.json").read_text())["input_shape"] == [16, 16, 3]
    assert info["num_classes"] == 5


def test_without_torch_ekd_jax_imports_and_the_error_names_the_fix(tmp_path, published):
    """With torch unimportable: ekd_jax and both modules import, and each command line ends with one
    line naming the extra that installs PyTorch."""
    fake = tmp_path / "no_torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    env = _env(PYTHONPATH=f"{fake.parent}{os.pathsep}{REPO}")
    code = ("import ekd_jax, ekd_jax.torch_layout, ekd_jax.import_torch, ekd_jax.export, sys; "
            f"sys.argv = ['ekd-import-torch', '--checkpoint={published[0] / 'ckpt_epoch_240.pth'}', '--model=resnet8', "
            f"'--out={tmp_path / 'out'}']; ekd_jax.import_torch.run()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: ") and "pip install 'ekd_jax[torch]'" in lines[0], lines[0]
    proc = subprocess.run([sys.executable, "-m", "ekd_jax.export", f"--workdir={tmp_path}", "--torch_state_dict"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "pip install 'ekd_jax[torch]'" in lines[0], proc.stderr[-3000:]
