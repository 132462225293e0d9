"""The ImageNet zoo equals its references: torchvision's ResNet-18/34/50 and mdistiller's MobileNetV1.

Parameter counts, state-dict layout (every key and shape, by the naming rule of the model modules'
docstrings) and conv strides against the references' construction rules; feature lists; the
guided modules and the joint step of both standard pairs; configs/imagenet.py. Abstract
(``jax.eval_shape``) except two small real forwards.
"""

import functools
import importlib.util
import json
import pathlib

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ekd_jax import build as build_lib
from ekd_jax import models, parallel, schedules, step
from ekd_jax.build import DataFacts
from ekd_jax.spec.validate import validate

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIX = json.loads((pathlib.Path(__file__).parent / "fixtures" / "imagenet_zoo.json").read_text())
REF = FIX["models"]
NAMES = sorted(REF)


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _abstract(name, hw=224, num_classes=1000, batch=2, **kw):
    model = models.create_model(name, num_classes=num_classes, **kw)
    x = jax.ShapeDtypeStruct((batch, hw, hw, 3), jnp.float32)
    variables = jax.eval_shape(lambda k, x: model.init(k, x, train=False), jax.random.key(0), x)
    return model, variables, x


def _imagenet_config(arg=""):
    spec = importlib.util.spec_from_file_location("imagenet_config", ROOT / "configs" / "imagenet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


# --------------------------------------------------------------------------- registry


def test_imagenet_names_are_registered_apart_from_the_cifar_zoo():
    imagenet, cifar = set(models.available_models("imagenet")), set(models.available_models("cifar"))
    assert imagenet == set(REF)
    assert not imagenet & cifar and set(models.available_models()) == imagenet | cifar
    # The CIFAR ResNet50 is still the CIFAR one (conv3x3 stem, no max-pool: 32x32 stage-1 maps).
    m, v, x = _abstract("ResNet50", hw=32, num_classes=100)
    _, feats = jax.eval_shape(lambda v, x: m.apply(v, x, train=False), v, x)
    assert feats[1].shape == (2, 32, 32, 256)
    with pytest.raises(ValueError, match="unknown zoo 'tiny'"):
        models.available_models("tiny")


@pytest.mark.parametrize("typed,meant", [
    ("resnet18", ["'resnet18_imagenet' (ImageNet)"]),
    ("ResNet-34", ["'resnet34_imagenet' (ImageNet)"]),
    ("resnet50", ["'resnet50_imagenet' (ImageNet)", "'ResNet50' (CIFAR)"]),
    ("mobilenet_v1", ["'mobilenetv1_imagenet' (ImageNet)"]),
    ("resnet21", ["'resnet20' (CIFAR)"]),
])
def test_unknown_name_hint_names_the_likely_model_and_its_zoo(typed, meant):
    with pytest.raises(ValueError) as e:
        models.create_model(typed, num_classes=10)
    msg = str(e.value)
    hint, listing = msg.split("Available models: ")
    assert hint.startswith(f"unknown model {typed!r}. Did you mean ")
    assert all(m in hint for m in meant), msg
    assert "CIFAR: " in listing and "ImageNet: mobilenetv1_imagenet, resnet18_imagenet" in listing


# --------------------------------------------------------------------------- counts, features


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_match_the_references(name):
    _, variables, _ = _abstract(name)
    assert set(variables) == {"params", "batch_stats"}
    assert _count(variables["params"]) == REF[name]["trainable_params"]
    # Resolution-independent: the same variables at 64x64.
    _, small, _ = _abstract(name, hw=64)
    assert jax.tree_util.tree_map(lambda a: a.shape, small) == jax.tree_util.tree_map(lambda a: a.shape, variables)


@pytest.mark.parametrize("name", NAMES)
def test_feature_lists_are_stem_four_stages_pooled(name):
    ref = REF[name]
    model, variables, x = _abstract(name)
    s0, spatial = FIX["stem_spatial_at_224"], FIX["stage_spatial_at_224"]
    want = [(2, s0, s0, ref["stem_channels"])]
    want += [(2, s, s, c) for s, c in zip(spatial, ref["stage_channels"])]
    want += [(2, ref["stage_channels"][-1])]
    for preact in (False, True):
        logits, feats = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, preact=preact), variables, x)
        assert logits.shape == (2, FIX["num_classes"])
        assert [f.shape for f in feats] == want, (name, preact)
        assert len(feats[models.STAGE_SLICE]) == 4
    # Other resolutions: every map scales with the input (64x64: stages 16, 8, 4, 2).
    model, variables, x = _abstract(name, hw=64, num_classes=10)
    logits, feats = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert logits.shape == (2, 10)
    assert [f.shape[1] for f in feats[:-1]] == [s0 * 64 // 224] + [s * 64 // 224 for s in spatial]


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_compute_keeps_float32_variables(name):
    model, variables, x = _abstract(name, dtype=jnp.bfloat16)
    assert {a.dtype for a in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
    logits, feats = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert logits.dtype == jnp.bfloat16 and {f.dtype for f in feats} == {jnp.dtype(jnp.bfloat16)}


# --------------------------------------------------------------------------- torch layout


def _bn(sd, name, c):
    for leaf in ("weight", "bias", "running_mean", "running_var"):
        sd[f"{name}.{leaf}"] = ((c,), None)


def _torchvision_resnet(layers, bottleneck, num_classes):
    """{state-dict key: (shape, conv stride)} of torchvision.models.ResNet, from its construction
    rules (_make_layer): stride on conv2 of a Bottleneck, on conv1 of a BasicBlock."""
    sd = {"conv1.weight": ((64, 3, 7, 7), 2)}
    _bn(sd, "bn1", 64)
    inplanes, expansion = 64, 4 if bottleneck else 1
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for j in range(blocks):
            p, stride = f"layer{i}.{j}", (2 if i > 1 and j == 0 else 1)
            if bottleneck:
                convs = [(planes, inplanes, 1, 1), (planes, planes, 3, stride), (planes * 4, planes, 1, 1)]
            else:
                convs = [(planes, inplanes, 3, stride), (planes, planes, 3, 1)]
            for k, (o, c_in, ks, s) in enumerate(convs, start=1):
                sd[f"{p}.conv{k}.weight"] = ((o, c_in, ks, ks), s)
                _bn(sd, f"{p}.bn{k}", o)
            if stride != 1 or inplanes != planes * expansion:
                sd[f"{p}.downsample.0.weight"] = ((planes * expansion, inplanes, 1, 1), stride)
                _bn(sd, f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    sd["fc.weight"], sd["fc.bias"] = ((num_classes, inplanes), None), ((num_classes,), None)
    return sd


# mdistiller's nn.Sequential, as written there: conv_bn(3, 32, 2), then conv_dw(inp, oup, stride).
_MDISTILLER_CONV_DW = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
                       (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1),
                       (512, 1024, 2), (1024, 1024, 1)]


def _mdistiller_mobilenetv1(num_classes):
    sd = {"model.0.0.weight": ((32, 3, 3, 3), 2)}
    _bn(sd, "model.0.1", 32)
    for k, (inp, oup, stride) in enumerate(_MDISTILLER_CONV_DW, start=1):
        sd[f"model.{k}.0.weight"] = ((inp, 1, 3, 3), stride)  # depthwise: groups = inp
        _bn(sd, f"model.{k}.1", inp)
        sd[f"model.{k}.3.weight"] = ((oup, inp, 1, 1), 1)
        _bn(sd, f"model.{k}.4", oup)
    sd["fc.weight"], sd["fc.bias"] = ((num_classes, 1024), None), ((num_classes,), None)
    return sd


TORCH_REFERENCE = {
    "resnet18_imagenet": functools.partial(_torchvision_resnet, (2, 2, 2, 2), False),
    "resnet34_imagenet": functools.partial(_torchvision_resnet, (3, 4, 6, 3), False),
    "resnet50_imagenet": functools.partial(_torchvision_resnet, (3, 4, 6, 3), True),
    "mobilenetv1_imagenet": _mdistiller_mobilenetv1,
}
_LEAF = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
         ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def _torch_key(collection, path):
    """The naming rule of the module docstrings: module names with '_' -> '.', joined by '.'."""
    *modules, leaf = path
    return ".".join([m.replace("_", ".") for m in modules] + [_LEAF[(collection, leaf)]])


def _torch_shape(shape):
    if len(shape) == 4:  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(reversed(shape))  # Dense (in, out) -> (out, in); vectors unchanged


def _conv_strides(model, variables, x):
    """{conv module path: spatial stride} measured from each nn.Conv's input and output shapes."""
    strides = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
            strides["/".join(context.module.path)] = args[0].shape[1] // out.shape[1]
        return out

    def run(v, x):
        with nn.intercept_methods(record):
            return model.apply(v, x, train=False)

    jax.eval_shape(run, variables, x)
    return strides


@pytest.mark.parametrize("name", NAMES)
def test_variables_map_onto_the_reference_state_dict_key_for_key(name):
    """Every Flax variable, renamed by the documented rule, is a key of the reference state dict
    with the same shape (after the layout transpose), and each conv has the reference's stride:
    what issue 15's weight import relies on. num_batches_tracked has no counterpart."""
    model, variables, x = _abstract(name, num_classes=7)
    want = TORCH_REFERENCE[name](7)
    got = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(variables[collection])[0]:
            key = _torch_key(collection, [p.key for p in path])
            assert key not in got, f"two variables map onto {key}"
            got[key] = _torch_shape(leaf.shape)
    assert sorted(got) == sorted(want)
    assert got == {k: s for k, (s, _) in want.items()}
    measured = _conv_strides(model, variables, x)
    strides = {_torch_key("params", [*p.split("/"), "kernel"]): s for p, s in measured.items()}
    assert strides == {k: s for k, (_, s) in want.items() if s is not None}


# --------------------------------------------------------------------------- real forwards


@pytest.mark.parametrize("name", ["resnet18_imagenet", "mobilenetv1_imagenet"])
def test_forward_preact_and_bn_updates(name):
    """A real forward at 64x64: eval mode is per image; preact maps are the maps before their ReLU;
    train mode moves every BN running statistic."""
    model = models.create_model(name, num_classes=10)
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
    apply = jax.jit(model.apply, static_argnames=("train", "preact", "mutable"))
    logits, feats = apply(variables, x, train=False)
    pre_logits, pre = apply(variables, x, train=False, preact=True)
    chex.assert_shape(logits, (2, 10))
    chex.assert_tree_all_finite((logits, feats))
    np.testing.assert_array_equal(np.asarray(pre_logits), np.asarray(logits))
    alone, _ = apply(variables, x[:1], train=False)
    np.testing.assert_allclose(alone, logits[:1], rtol=1e-5, atol=1e-6)
    for f, p in zip(feats[:-1], pre[:-1]):
        np.testing.assert_array_equal(np.asarray(jax.nn.relu(p)), np.asarray(f))
        assert float(jnp.min(p)) < 0  # really before the ReLU
    np.testing.assert_array_equal(np.asarray(pre[-1]), np.asarray(feats[-1]))
    (_, _), upd = apply(variables, x, train=True, mutable=("batch_stats",))
    moved = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), upd["batch_stats"], variables["batch_stats"])
    assert all(jax.tree_util.tree_leaves(moved))


# --------------------------------------------------------------------------- both pairs, joint step


@pytest.mark.parametrize("pair", sorted(FIX["pairs"]))
@pytest.mark.parametrize("method,guide", [("ekd", "adapter"), ("ekd", "aux_head"), ("at", None)])
def test_guided_modules_and_joint_step_of_the_standard_pairs(pair, method, guide):
    """build_networks pairs the four stages 1:1 for both pairs; the guided modules fit the stage
    maps; the whole jitted joint train step traces (eval_shape) at 64x64, with the method's loss terms."""
    teacher, student = FIX["pairs"][pair]
    c = _imagenet_config(pair)
    assert (c.teacher.model, c.student.model) == (teacher, student)
    c.method = method
    if guide:
        c.guided.type = guide
    if method == "at":
        c.teacher.checkpoint = "unused: abstract step only"
    shape, classes = (64, 64, 3), 1000
    spec = validate(c, check_files=False)
    built = build_lib.build(spec, DataFacts(classes, shape, 100 * spec.batch_size, (0.5,) * 3, (0.25,) * 3))
    nets, tx = built.nets, built.tx
    assert nets.pairs == ((0, 0), (1, 1), (2, 2), (3, 3))
    state = jax.eval_shape(lambda: step.init_state(nets, tx, 0))
    tm, tv, tx_in = _abstract(teacher, hw=shape[0], num_classes=classes)
    _, t_feats = jax.eval_shape(lambda v, x: tm.apply(v, x, train=False), tv, tx_in)
    if nets.guides is not None:
        assert nets.guides.teacher_shapes == tuple(f.shape[1:] for f in t_feats[models.STAGE_SLICE])
        assert _count(state.params["guide"]) > 0
    assert _count(state.params["teacher"]) == REF[teacher]["trainable_params"]
    assert _count(state.params["student"]) == REF[student]["trainable_params"]
    # Two steps per call of the training program, as the trainer runs it (K = 2).
    feed = {"image": jax.ShapeDtypeStruct((2, 4, *shape), jnp.uint8), "label": jax.ShapeDtypeStruct((2, 4), jnp.int32)}
    joint = step.compile_steps(nets, tx, parallel.make_mesh()).programs["joint"]
    new_state, metrics = jax.eval_shape(joint, state, feed, jax.ShapeDtypeStruct((), jnp.int32), {})
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
    assert all(m.shape == (2,) for m in metrics.values())
    terms = {"adapter": {"student/guided"}, "aux_head": {"student/guided", "teacher/aux_ce"}, None: {"student/at"}}
    assert terms[guide] <= set(metrics), sorted(metrics)


# --------------------------------------------------------------------------- configs/imagenet.py


@pytest.mark.parametrize("arg", ["", "r34_r18", "r50_mv1"])
def test_config_is_the_standard_recipe_and_validates(arg):
    r = FIX["recipe"]
    c = _imagenet_config(arg)
    validate(c)
    assert (c.teacher.model, c.student.model) == tuple(FIX["pairs"][arg or "r34_r18"])
    assert c.data.source == "tfds:imagenet2012" and c.data.image_size == 224 and c.data.flip
    assert (c.num_epochs, c.batch_size) == (r["num_epochs"], r["batch_size"])
    assert c.optimizer.learning_rate == pytest.approx(r["learning_rate"])
    o = c.optimizer
    assert (o.momentum, o.weight_decay, o.nesterov) == (r["momentum"], r["weight_decay"], False)
    # The schedule, as the training loop builds it: lr x0.1 after epochs 30, 60 and 90.
    spe = 10
    lr = schedules.make_schedule(c, spe, c.num_epochs * spe)
    epochs = np.arange(c.num_epochs)
    got = np.array([float(lr(e * spe)) for e in epochs])
    want = r["learning_rate"] * r["lr_decay_rate"] ** np.searchsorted(r["lr_decay_epochs"], epochs, side="right")
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # Stage choices are checked against the new models' four stage pairs.
    c.guided.stages = (3,)
    validate(c)
    c.guided.stages = (4,)
    with pytest.raises(ValueError, match=r"guided.stages=\(4,\) is not valid: .* 4 stage pairs"):
        validate(c)


def test_config_lr_follows_the_batch_size_on_the_command_line():
    from absl import flags
    from ml_collections import config_flags

    def parse(*overrides):
        argv = ["prog", f"--config={ROOT / 'configs' / 'imagenet.py'}:r50_mv1", *overrides]
        fv = flags.FlagValues()  # as main.py defines it, on a private flag set
        config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
        fv(argv)
        return fv.config

    lr_per_256 = FIX["recipe"]["lr_per_256"]
    assert parse("--config.batch_size=256").optimizer.learning_rate == pytest.approx(lr_per_256)
    assert parse("--config.batch_size=1024").optimizer.learning_rate == pytest.approx(4 * lr_per_256)
    explicit = parse("--config.batch_size=1024", "--config.optimizer.learning_rate=0.05")
    assert explicit.optimizer.learning_rate == 0.05
    assert json.loads(explicit.to_json_best_effort())["optimizer"]["learning_rate"] == 0.05


def test_config_unknown_pair_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="r34_r18, r50_mv1"):
        _imagenet_config("r101_r18")
