"""PyTorch bridge for the ImageNet zoo: torchvision's ResNet-18/34/50 and mdistiller's MobileNetV1.

The PyTorch networks below are written here from the reference architectures, in the reference
module layouts (torchvision/models/resnet.py: ``conv1, bn1, relu, maxpool, layer1..4 (Sequential of
blocks), avgpool, fc``, blocks ``conv1, bn1, (relu), conv2, bn2, [conv3, bn3], downsample =
Sequential(conv1x1, BN)``; mdistiller/models/imagenet/mobilenetv1.py: ``model = Sequential(conv_bn,
conv_dw x 13, AvgPool2d(7))``, ``fc``), so their ``state_dict()`` keys are the references'. They
share no code with ``ekd_jax.models``: equal outputs on equal weights check the zoo (stem, max-pool
padding, stride placement, shortcut kinds, depthwise groups, feature taps) as much as the mapping.

* all four models: our key list (names, order, shapes) is the reference ``state_dict()``'s, with
  the published torchvision key count; both round trips are bitwise; with torchvision installed,
  also ``torchvision.models.resnet18/34/50()``'s own keys, and its forward on converted weights;
* resnet18, resnet50, mobilenetv1 with random weights and random BatchNorm statistics at 64x64:
  eval-mode logits and every feature map (``preact`` off and on) within 1e-5; one train-mode
  forward: the new running mean/var of every BatchNorm within 1e-5;
* the command line on a torchvision-style bare ``.pth`` (as ``torch.save(model.state_dict())``
  writes it): ImageNet defaults recorded, the imported teacher's logits are PyTorch's, the export
  direction gives back the file's tensors bitwise; torchvision's published files (no
  ``num_batches_tracked``) import; a ResNet-34 file refused as resnet18_imagenet, naming the keys.
"""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest
from helpers import NO_TORCH

torch = pytest.importorskip("torch", reason=NO_TORCH)
import torch.nn as tnn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from test_torch_bridge import _bitwise, _cli, _close, _leaves, _nchw

from ekd_jax import torch_layout
from ekd_jax.import_torch import IMAGENET_MEAN, IMAGENET_STD, import_checkpoint
from ekd_jax.models import available_models, create_model

# --------------------------------------------------------------------------- reference networks


def _conv(cin, cout, k, stride=1, groups=1):
    return tnn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)


class TVBasicBlock(tnn.Module):
    """torchvision BasicBlock: conv3x3(stride)-BN-ReLU-conv3x3-BN + downsample(x), ReLU."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = _conv(inplanes, planes, 3, stride), tnn.BatchNorm2d(planes)
        self.relu = tnn.ReLU(inplace=False)
        self.conv2, self.bn2 = _conv(planes, planes, 3), tnn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        pre = y + (x if self.downsample is None else self.downsample(x))
        return self.relu(pre), pre


class TVBottleneck(tnn.Module):
    """torchvision Bottleneck (v1.5): conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(x4)-BN + downsample."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = _conv(inplanes, planes, 1), tnn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv(planes, planes, 3, stride), tnn.BatchNorm2d(planes)
        self.conv3, self.bn3 = _conv(planes, planes * 4, 1), tnn.BatchNorm2d(planes * 4)
        self.relu = tnn.ReLU(inplace=False)
        self.downsample = downsample

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        pre = y + (x if self.downsample is None else self.downsample(x))
        return self.relu(pre), pre


class TVResNet(tnn.Module):
    """torchvision ResNet(block, layers, num_classes)."""

    def __init__(self, block, layers, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = tnn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = tnn.BatchNorm2d(64)
        self.relu = tnn.ReLU(inplace=False)
        self.maxpool = tnn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = tnn.AdaptiveAvgPool2d((1, 1))
        self.fc = tnn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = tnn.Sequential(_conv(self.inplanes, planes * block.expansion, 1, stride),
                                        tnn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return tnn.Sequential(*layers)

    def forward(self, x, is_feat=False, preact=False):
        pre = self.bn1(self.conv1(x))
        x = self.relu(pre)
        feats = [pre if preact else x]
        x = self.maxpool(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:  # blocks return (output, pre-ReLU sum): walked here, not by Sequential
                x, pre = block(x)
            feats.append(pre if preact else x)
        x = torch.flatten(self.avgpool(x), 1)
        logits = self.fc(x)
        return (feats + [x], logits) if is_feat else logits


class MDMobileNetV1(tnn.Module):
    """mdistiller's ImageNet MobileNetV1 (its ``fc`` is Linear(1024, 1000); the class count is a
    parameter here). ``pool``: its AvgPool2d(7), global at 224x224; the tests run at 64x64, where
    the last map is 2x2, with the global mean it equals there (AdaptiveAvgPool2d(1))."""

    def __init__(self, num_classes=1000, pool=None):
        super().__init__()

        def conv_bn(inp, oup, stride):
            return tnn.Sequential(_conv(inp, oup, 3, stride), tnn.BatchNorm2d(oup), tnn.ReLU())

        def conv_dw(inp, oup, stride):
            return tnn.Sequential(_conv(inp, inp, 3, stride, groups=inp), tnn.BatchNorm2d(inp), tnn.ReLU(),
                                  _conv(inp, oup, 1), tnn.BatchNorm2d(oup), tnn.ReLU())

        cfg = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
               *[(512, 512, 1)] * 5, (512, 1024, 2), (1024, 1024, 1)]
        self.model = tnn.Sequential(conv_bn(3, 32, 2), *[conv_dw(*c) for c in cfg],
                                    tnn.AvgPool2d(7) if pool is None else pool)
        self.fc = tnn.Linear(1024, num_classes)

    def forward(self, x, is_feat=False, preact=False):
        # mdistiller's forward: feat_i = the last pointwise BN of blocks 3, 5, 11, 13 (before its
        # ReLU); its feats are relu(feat_i). The zoo's list adds the stem map in front.
        stem_pre = self.model[0][:-1](x)
        x = F.relu(stem_pre)
        feat1 = self.model[3][:-1](self.model[1:3](x))
        feat2 = self.model[5][:-1](self.model[4:5](F.relu(feat1)))
        feat3 = self.model[11][:-1](self.model[6:11](F.relu(feat2)))
        feat4 = self.model[13][:-1](self.model[12:13](F.relu(feat3)))
        avg = self.model[14](F.relu(feat4)).reshape(-1, 1024)
        logits = self.fc(avg)
        stages = [feat1, feat2, feat3, feat4] if preact else [F.relu(f) for f in (feat1, feat2, feat3, feat4)]
        return ([stem_pre if preact else x, *stages, avg], logits) if is_feat else logits


REFERENCE = {
    "resnet18_imagenet": functools.partial(TVResNet, TVBasicBlock, (2, 2, 2, 2)),
    "resnet34_imagenet": functools.partial(TVResNet, TVBasicBlock, (3, 4, 6, 3)),
    "resnet50_imagenet": functools.partial(TVResNet, TVBottleneck, (3, 4, 6, 3)),
    "mobilenetv1_imagenet": MDMobileNetV1,
}
IMAGENET_ZOO = sorted(REFERENCE)
FORWARD = ["resnet18_imagenet", "resnet50_imagenet", "mobilenetv1_imagenet"]  # BasicBlock, Bottleneck, MobileNetV1
HW = 64  # global pooling makes every model run at 64x64 (stage-4 maps 2x2)


def reference(name: str, num_classes: int, seed: int = 0) -> tnn.Module:
    """The PyTorch network with random weights and random BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    kw = {"pool": tnn.AdaptiveAvgPool2d(1)} if name == "mobilenetv1_imagenet" else {}
    net = REFERENCE[name](num_classes=num_classes, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (tnn.Conv2d, tnn.Linear)):
                m.weight.normal_(0.0, (2.0 / m.weight[0].numel()) ** 0.5, generator=g)
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


def _meta_keys(ctor, num_classes: int) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # keys and shapes without allocating or initialising anything
        return {k: tuple(v.shape) for k, v in ctor(num_classes=num_classes).state_dict().items()}


def _our_keys(name: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    ents, _ = torch_layout.entries(name, num_classes)
    shapes = {e.key: e.torch_shape for e in ents}
    return {k: shapes.get(k, ()) for k in torch_layout.expected_keys(name, num_classes)}  # num_batches_tracked: ()


# --------------------------------------------------------------------------- layout, every model


def test_every_imagenet_model_has_a_reference_definition_and_a_layout():
    assert set(IMAGENET_ZOO) == set(available_models("imagenet"))
    assert set(IMAGENET_ZOO) <= set(torch_layout.LAYOUTS)
    assert torch_layout.layout_for("resnet34_imagenet").name.startswith("torchvision")
    assert torch_layout.layout_for("mobilenetv1_imagenet").name.startswith("mdistiller")


# Facts of the published layouts, independent of the definitions above: len(state_dict()) of
# torchvision's resnet18/34/50 (convs + 5 entries per BN + fc weight and bias) and of mdistiller's
# MobileNetV1, and a few keys with their shapes at 1000 classes.
PUBLISHED = {
    "resnet18_imagenet": (122, {"conv1.weight": (64, 3, 7, 7), "bn1.num_batches_tracked": (),
                                "layer1.0.conv1.weight": (64, 64, 3, 3), "layer2.0.downsample.0.weight": (128, 64, 1, 1),
                                "layer2.0.downsample.1.running_mean": (128,), "layer4.1.bn2.running_var": (512,),
                                "fc.weight": (1000, 512), "fc.bias": (1000,)}),
    "resnet34_imagenet": (218, {"layer3.5.conv2.weight": (256, 256, 3, 3), "layer4.0.downsample.0.weight": (512, 256, 1, 1),
                                "fc.weight": (1000, 512)}),
    "resnet50_imagenet": (320, {"layer1.0.downsample.0.weight": (256, 64, 1, 1), "layer1.0.conv3.weight": (256, 64, 1, 1),
                                "layer2.0.conv2.weight": (128, 128, 3, 3), "layer4.2.bn3.weight": (2048,),
                                "fc.weight": (1000, 2048)}),
    "mobilenetv1_imagenet": (164, {"model.0.0.weight": (32, 3, 3, 3), "model.0.1.running_var": (32,),
                                   "model.1.0.weight": (32, 1, 3, 3), "model.1.3.weight": (64, 32, 1, 1),
                                   "model.13.4.num_batches_tracked": (), "fc.weight": (1000, 1024)}),
}


def _batchnorms(name: str) -> int:
    """Every conv has its BN: len(state_dict()) = convs + 5 BN entries + fc weight and bias = 6 n + 2."""
    return (PUBLISHED[name][0] - 2) // 6


@pytest.mark.parametrize("name", IMAGENET_ZOO)
def test_keys_order_shapes_and_round_trips_are_the_references(name):
    """Our key list is the reference state_dict()'s (names, order, shapes; the published key count
    and keys); PyTorch -> JAX -> PyTorch and JAX -> PyTorch -> JAX are bitwise."""
    keys = _meta_keys(REFERENCE[name], 1000)
    ours = _our_keys(name, 1000)
    assert list(ours) == list(keys)
    assert ours == keys
    count, some = PUBLISHED[name]
    assert len(ours) == count and {k: ours.get(k) for k in some} == some

    rng = np.random.default_rng(0)
    sd = {k: (np.asarray(1234, np.int64) if k.endswith(".num_batches_tracked") else rng.random(shape, np.float32))
          for k, shape in _meta_keys(REFERENCE[name], 7).items()}
    variables, info = torch_layout.variables_from_state_dict(name, sd)
    assert info["num_classes"] == 7 and info["in_channels"] == 3
    assert len(info["ignored"]) == sum(k.endswith(".num_batches_tracked") for k in sd)
    back = torch_layout.state_dict_from_variables(name, variables, num_batches_tracked=1234)
    assert list(back) == list(sd)
    assert all(_bitwise(back[k], sd[k]) for k in sd), [k for k in sd if not _bitwise(back[k], sd[k])][:3]

    jax_vars = jax.tree_util.tree_map(lambda a: rng.random(a.shape, np.float32), variables)
    again, _ = torch_layout.variables_from_state_dict(name, torch_layout.state_dict_from_variables(name, jax_vars))
    a, b = _leaves(jax_vars), _leaves(again)
    assert a.keys() == b.keys() and all(_bitwise(a[k], b[k]) for k in a)


TORCHVISION = {"resnet18_imagenet": "resnet18", "resnet34_imagenet": "resnet34", "resnet50_imagenet": "resnet50"}


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_itself_has_our_keys_and_computes_our_logits(name):
    """With torchvision installed: ``torchvision.models.<arch>()``'s own state_dict() keys (order,
    shapes) are ours, it loads our export (strict), and it computes the zoo's logits on it."""
    models = pytest.importorskip("torchvision.models")
    with torch.device("meta"):
        keys = {k: tuple(v.shape) for k, v in getattr(models, TORCHVISION[name])().state_dict().items()}
    assert list(keys) == list(_our_keys(name, 1000)) and keys == _our_keys(name, 1000)
    if name != "resnet18_imagenet":
        return
    net = getattr(models, TORCHVISION[name])(weights=None, num_classes=10).eval()
    ours = reference(name, 10, seed=4)
    variables, _ = torch_layout.variables_from_state_dict(name, numpy_state_dict(ours))
    sd = torch_layout.state_dict_from_variables(name, variables)
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    images = np.random.default_rng(4).standard_normal((2, HW, HW, 3)).astype(np.float32)
    logits, _ = create_model(name, 10).apply(variables, images, train=False)
    with torch.no_grad():
        _close(logits, net(torch.from_numpy(_nchw(images).copy())), f"{name}: zoo vs torchvision logits")


# --------------------------------------------------------------------------- equal outputs


@pytest.mark.parametrize("name", FORWARD)
def test_eval_logits_and_every_feature_map_equal_pytorch(name):
    images = np.random.default_rng(1).standard_normal((2, HW, HW, 3)).astype(np.float32)
    net = reference(name, num_classes=10, seed=2)
    variables, _ = torch_layout.variables_from_state_dict(name, numpy_state_dict(net))
    module = create_model(name, 10)
    both = jax.jit(lambda v, x: [module.apply(v, x, train=False, preact=p) for p in (False, True)])(variables, images)
    x = torch.from_numpy(_nchw(images).copy())
    for preact, (logits, feats) in zip((False, True), both):
        with torch.no_grad():
            feats_t, logits_t = net(x, is_feat=True, preact=preact)
        _close(logits, logits_t, f"{name} logits (preact={preact})")
        assert len(feats) == len(feats_t) == 6
        for i, (f, ft) in enumerate(zip(feats, feats_t)):
            _close(_nchw(f), ft, f"{name} feature {i} (preact={preact})")
            if preact and i < 5:
                assert float(ft.min()) < 0, f"{name} preact feature {i} is after a ReLU"


@pytest.mark.parametrize("name", FORWARD)
def test_train_mode_batchnorm_update_equals_pytorch(name):
    """One train-mode forward on both sides (8 images, as the CIFAR test: tiny batches amplify
    float32 rounding in deep batch statistics): every BatchNorm's new running mean/var within 1e-5,
    and each one moved."""
    images = np.random.default_rng(8).standard_normal((8, HW, HW, 3)).astype(np.float32)
    net = reference(name, num_classes=10, seed=3)
    variables, _ = torch_layout.variables_from_state_dict(name, numpy_state_dict(net))
    net.train()
    with torch.no_grad():
        net(torch.from_numpy(_nchw(images).copy()))
    _, updates = jax.jit(functools.partial(create_model(name, 10).apply, train=True, mutable=["batch_stats"]))(
        variables, images)
    after, _ = torch_layout.variables_from_state_dict(name, numpy_state_dict(net))
    got, want, old = _leaves(updates["batch_stats"]), _leaves(after["batch_stats"]), _leaves(variables["batch_stats"])
    assert got.keys() == want.keys() and len(want) == 2 * _batchnorms(name)
    for k in want:
        _close(got[k], want[k], f"{name} running statistic {k}")
        assert not np.allclose(want[k], old[k]), f"{name} {k} did not move"


# --------------------------------------------------------------------------- files, command line


def test_torchvision_style_pth_imports_on_the_command_line_and_exports_back(tmp_path):
    """``torch.save(model.state_dict(), 'r18.pth')`` of a 10-class torchvision ResNet-18 -> the
    command line -> ``<out>/teacher/`` with the ImageNet defaults (224x224, ImageNet mean/std) ->
    its logits are PyTorch's; written back as PyTorch (export's writer) it is the file, bitwise."""
    from ekd_jax import export, rundir

    name = "resnet18_imagenet"
    net = reference(name, 10, seed=5)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    proc = _cli("ekd_jax.import_torch", f"--checkpoint={tmp_path / 'r18.pth'}", f"--model={name}",
                f"--out={tmp_path / 'r18'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["state_dict_entry"] is None and info["layout"] == torch_layout.layout_for(name).name
    assert info["tensors"] == PUBLISHED[name][0] - _batchnorms(name)  # all but num_batches_tracked
    meta = json.loads((tmp_path / "r18" / "teacher" / "network.json").read_text())
    assert (meta["model"], meta["num_classes"], meta["input_shape"]) == (name, 10, [224, 224, 3])
    assert (tuple(meta["mean"]), tuple(meta["std"])) == (IMAGENET_MEAN, IMAGENET_STD)

    module, variables, _ = rundir.restore_network(tmp_path / "r18" / "teacher")
    images = np.random.default_rng(5).standard_normal((2, HW, HW, 3)).astype(np.float32)
    logits, _ = module.apply(variables, images, train=False)
    with torch.no_grad():
        want = net(torch.from_numpy(_nchw(images).copy()))
    _close(logits, want, "imported resnet18_imagenet logits")
    assert (np.argmax(logits, 1) == want.argmax(1).numpy()).all()

    export.save_torch_state_dict(name, variables, tmp_path / "back.pth", num_batches_tracked=1234)
    back, sd = torch.load(tmp_path / "back.pth", weights_only=True), net.state_dict()
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_published_torchvision_files_without_num_batches_tracked_import(tmp_path):
    """torchvision's IMAGENET1K_V1 files predate num_batches_tracked: a state dict without it
    imports to the same teacher; mdistiller's MobileNetV1 under 'model' (its checkpoints) too."""
    name = "resnet18_imagenet"
    full = reference(name, 10, seed=6).state_dict()
    torch.save({k: v for k, v in full.items() if not k.endswith("num_batches_tracked")}, tmp_path / "old.pth")
    torch.save(full, tmp_path / "new.pth")
    a = import_checkpoint(tmp_path / "old.pth", name, tmp_path / "old")
    b = import_checkpoint(tmp_path / "new.pth", name, tmp_path / "new")
    assert a["teacher_params_sha256"] == b["teacher_params_sha256"] and a["ignored_keys"] == [] != b["ignored_keys"]

    mv1 = reference("mobilenetv1_imagenet", 10, seed=6)
    torch.save({"model": mv1.state_dict(), "epoch": 100}, tmp_path / "mv1.pth")
    info = import_checkpoint(tmp_path / "mv1.pth", "mobilenetv1_imagenet", tmp_path / "mv1", image_size=64)
    assert info["state_dict_entry"] == "model" and info["input_shape"] == [64, 64, 3] and info["num_classes"] == 10
    variables, _ = torch_layout.variables_from_state_dict("mobilenetv1_imagenet", numpy_state_dict(mv1))
    from ekd_jax import outputs

    assert info["teacher_params_sha256"] == outputs.tree_sha256(variables)


def test_wrong_imagenet_model_is_refused_naming_the_keys(tmp_path):
    """A ResNet-34 file as resnet18_imagenet names its extra blocks; a ResNet-18 file as
    resnet50_imagenet names conv3 and the shapes; the CIFAR spelling 'resnet18' names the ImageNet
    model; nothing is written."""
    torch.save(reference("resnet34_imagenet", 10).state_dict(), tmp_path / "r34.pth")
    torch.save(reference("resnet18_imagenet", 10).state_dict(), tmp_path / "r18.pth")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"unexpected keys layer1\.2\.conv1\.weight"):
        import_checkpoint(tmp_path / "r34.pth", "resnet18_imagenet", out)
    with pytest.raises(ValueError, match=r"missing keys .*layer1\.0\.conv3\.weight"):
        import_checkpoint(tmp_path / "r18.pth", "resnet50_imagenet", out)
    with pytest.raises(ValueError, match="resnet18_imagenet"):
        import_checkpoint(tmp_path / "r18.pth", "resnet18", out)
    with pytest.raises(ValueError, match=r"missing keys model\.0\.0\.weight"):
        import_checkpoint(tmp_path / "r18.pth", "mobilenetv1_imagenet", out)
    assert not out.exists()
