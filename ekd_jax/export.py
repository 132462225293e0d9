"""Export a trained student for serving: ``python -m ekd_jax.export --workdir <run> --out <dir>``.

From a finished run's ``student/`` folder this writes, under ``--out`` (default ``<run>/export``):

* ``student.jax_export``  a serialized :mod:`jax.export` of the inference function with a
  symbolic batch size. Any JAX program loads it without ekd_jax (or Flax)::

      exp = jax.export.deserialize(open("student.jax_export", "rb").read())
      logits = exp.call(images_uint8_nhwc)          # any batch size

* ``saved_model/``  the same function as a TensorFlow SavedModel (``jax2tf``, batch-polymorphic),
  signature ``serving_default``: ``images`` uint8 ``[None, H, W, C]`` -> ``logits`` float32
  ``[None, num_classes]``; for TF Serving, or ``tf.lite.TFLiteConverter.from_saved_model``.
* ``export.json``  model, input spec, class names, what preprocessing is inside, the run's accuracy.
* ``student_state_dict.pth``  with ``--torch_state_dict``: the student's weights and BatchNorm
  statistics as a bare PyTorch state dict in the model's reference layout (RepDistiller's key names
  for the CIFAR zoo, torchvision's / mdistiller's for the ImageNet zoo; ``ekd_jax.torch_layout``), for deployment in PyTorch:
  ``model.load_state_dict(torch.load(p, weights_only=True))`` on the reference definition (wrap it
  as ``{'model': sd}`` for RepDistiller's own scripts). The network alone: the images must be
  normalised with export.json's mean/std first. Needs PyTorch (``pip install 'ekd_jax[torch]'``).

The function takes images exactly as the run's data source yields them (uint8 NHWC of
``raw_image_shape``, i.e. after ``data.image_size`` resizing) and returns float32 logits.
Scaling to [0, 1], the normalisation and, for a low-resolution student, its degradation are
inside (``data.make_views``, evaluation mode, with the run's factor/mode); the variables are
baked in as constants. TensorFlow is imported only for the SavedModel (``--nosaved_model`` skips it).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import ekd_jax  # noqa: F401  (applies the XLA CPU defaults before jax starts)
from ekd_jax import data, rundir
from ekd_jax.spec import DataSpec

EXPORT_FILE = "student.jax_export"
TORCH_STATE_DICT_FILE = "student_state_dict.pth"
SAVED_MODEL_DIR = "saved_model"
META_FILE = "export.json"
INPUT_NAME, OUTPUT_NAME = "images", "logits"
# Lowered once for all three: the same file runs on CPU, NVIDIA GPU and TPU.
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
FORMAT_VERSION = 1


def apply_fn(module, meta: dict, which: str = "student", data_spec: DataSpec | None = None) -> Callable:
    """``f(variables, images_uint8) -> float32 logits``: the run's evaluation view, then the network.

    ``data_spec`` is the run's data block (its ``student_downsample`` / ``lowres_mode`` decide the
    student's view); by default they are read from the network's ``meta``. ``which`` picks the
    teacher view (the full images) or the student view from :func:`ekd_jax.data.make_views`.
    """
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    if data_spec is None:
        data_spec = DataSpec(student_downsample=int(meta["student_downsample"]), lowres_mode=meta["lowres_mode"])
    mean, std = tuple(meta["mean"]), tuple(meta["std"])
    view = 1 if which == "student" else 0

    def f(variables, images):
        if images.dtype != jnp.uint8:
            raise TypeError(f"expected uint8 images, got {images.dtype}")
        x = data.make_views(images, None, data_spec, mean, std, train=False)[view]
        logits, _ = module.apply(variables, x, train=False)
        return logits.astype(jnp.float32)

    return f


def inference_function(module, variables, meta: dict) -> Callable[[jax.Array], jax.Array]:
    """The deployable function: uint8 NHWC images -> float32 logits, variables closed over."""
    variables = jax.device_get(variables)
    f = apply_fn(module, meta, "student")
    return lambda images: f(variables, images)


def input_spec(meta: dict) -> jax.ShapeDtypeStruct:
    """uint8 ``(b, H, W, C)`` with a symbolic batch size ``b``."""
    h, w, c = (int(v) for v in meta["raw_image_shape"])
    return jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"b, {h}, {w}, {c}"), jnp.uint8)


def export_function(fn: Callable, meta: dict, platforms: Sequence[str] = DEFAULT_PLATFORMS) -> jax.export.Exported:
    return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(input_spec(meta))


def save_tf_saved_model(fn: Callable, meta: dict, path: pathlib.Path, platforms: Sequence[str] = DEFAULT_PLATFORMS):
    """``fn`` as a batch-polymorphic SavedModel via jax2tf (native serialization), signature serving_default."""
    try:
        import tensorflow as tf
        from jax.experimental import jax2tf
    except ImportError as e:
        raise ValueError(
            f"the SavedModel needs TensorFlow ({e}); pip install tensorflow-cpu, or pass --nosaved_model "
            "to write only the jax.export file"
        ) from e
    h, w, c = (int(v) for v in meta["raw_image_shape"])
    converted = jax2tf.convert(
        lambda images: {OUTPUT_NAME: fn(images)},
        polymorphic_shapes=["(b, ...)"],
        with_gradient=False,
        native_serialization_platforms=tuple(platforms),
    )
    signature = [tf.TensorSpec([None, h, w, c], tf.uint8, name=INPUT_NAME)]
    # Only the signature, not also a tf.function attribute: that would store a second traced copy
    # of the function, and of the variables baked into it.
    serving = tf.function(converted, input_signature=signature, autograph=False).get_concrete_function()
    module = tf.Module()
    if path.exists():
        shutil.rmtree(path)
    tf.saved_model.save(module, str(path), signatures={"serving_default": serving})


def _verify(module, variables, meta: dict, blob: bytes, saved_model: pathlib.Path | None, platforms) -> dict:
    """Max |logit difference| of each exported form against the Flax student, on a random batch."""
    h, w, c = meta["raw_image_shape"]
    x = np.random.default_rng(0).integers(0, 256, (3, h, w, c), dtype=np.uint8)
    want = np.asarray(jax.jit(apply_fn(module, meta))(variables, x))
    out: dict[str, float | None] = {"jax_export": None, "saved_model": None}
    if jax.default_backend() in platforms or (jax.default_backend() == "gpu" and "cuda" in platforms):
        out["jax_export"] = float(np.max(np.abs(np.asarray(jax.export.deserialize(blob).call(x)) - want)))
    if saved_model is not None and "cpu" in platforms:  # tensorflow(-cpu) runs it on the CPU
        import tensorflow as tf

        got = tf.saved_model.load(str(saved_model)).signatures["serving_default"](**{INPUT_NAME: tf.constant(x)})
        out["saved_model"] = float(np.max(np.abs(got[OUTPUT_NAME].numpy() - want)))
    # float32 on CPU agrees to rounding; bfloat16 compute, or TPU/GPU default matmul precision (with the
    # variables constant-folded in one form and not the other), only to a few bits.
    exact = meta.get("dtype", "float32") == "float32" and jax.default_backend() == "cpu"
    tol = (1e-4 if exact else 5e-2) * (1.0 + float(np.max(np.abs(want))))
    for form, diff in out.items():
        if diff is not None and not diff <= tol:
            raise RuntimeError(f"the exported {form} differs from the Flax student by {diff:.3g} (> {tol:.3g})")
    return out


def _student_steps(summary: dict) -> int:
    """How many train-mode forwards the student's BatchNorms saw (PyTorch's num_batches_tracked):
    the run's steps less the teacher's head start; 0 when the summary does not say."""
    steps, epochs, head = summary.get("steps"), summary.get("epochs"), summary.get("teacher_head_start_epochs") or 0
    if not isinstance(steps, int) or not isinstance(epochs, int) or epochs + head <= 0:
        return 0
    return steps - steps * head // (epochs + head)


def save_torch_state_dict(module_name: str, variables: Any, path: pathlib.Path, num_batches_tracked: int = 0,
                          verify: bool = True) -> None:
    """Writes ``variables`` as a reference-layout PyTorch state dict; ``verify``: read it back with
    ``torch.load(weights_only=True)`` and check the round trip is bitwise."""
    from ekd_jax import torch_layout

    variables = jax.device_get(variables)
    torch_layout.write_state_dict(
        path, torch_layout.state_dict_from_variables(module_name, variables, num_batches_tracked=num_batches_tracked)
    )
    if verify:
        back, _ = torch_layout.read_state_dict(path)
        again, _ = torch_layout.variables_from_state_dict(module_name, back, source=str(path))

        def leaves(tree):
            return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

        want, got = leaves(variables), leaves(again)
        bad = [k for k in want if k not in got or got[k].dtype != want[k].dtype or got[k].tobytes() != want[k].tobytes()]
        if bad or want.keys() != got.keys():
            raise RuntimeError(f"{path} does not read back bitwise ({(bad or sorted(set(want) ^ set(got)))[:3]})")


def export_student(
    workdir: str | pathlib.Path,
    out_dir: str | pathlib.Path | None = None,
    *,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    saved_model: bool = True,
    verify: bool = True,
    torch_state_dict: bool = False,
) -> dict:
    """Exports ``<workdir>/student`` to ``out_dir`` (default ``<workdir>/export``); returns export.json's dict.

    ``torch_state_dict``: also ``student_state_dict.pth``, the student as a PyTorch state dict in
    its reference layout (needs PyTorch: checked first, before any work).
    """
    t0 = time.time()
    if torch_state_dict:
        from ekd_jax import torch_layout

        torch_layout.require_torch()
    workdir = pathlib.Path(workdir)
    student_dir = workdir / "student"
    if not rundir.has_network(workdir, "student"):
        raise ValueError(
            f"{workdir} has no trained student ({student_dir / rundir.NETWORK_FILE} is missing): pass the --workdir "
            "of a finished run that trains a student (a 'teacher' run has none)"
        )
    platforms = tuple(platforms)
    bad = [p for p in platforms if p not in DEFAULT_PLATFORMS]
    if not platforms or bad:
        raise ValueError(
            f"--platforms={','.join(platforms)} is not valid: {bad or 'none given'}; "
            f"use a non-empty subset of {','.join(DEFAULT_PLATFORMS)}"
        )
    out = pathlib.Path(out_dir) if out_dir is not None else workdir / "export"
    blocked = rundir.file_in_the_way(out)
    if blocked is not None:
        raise ValueError(f"--out {str(out)!r} cannot be a folder: {blocked} is a file. Choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot make --out {str(out)!r} ({type(e).__name__}: {e.strerror or e}); choose a folder you can write to") from e

    module, variables, meta = rundir.restore_network(student_dir)
    if torch_state_dict and meta["model"] not in torch_layout.LAYOUTS:
        raise ValueError(
            f"--torch_state_dict: the student {meta['model']!r} has no PyTorch layout yet (there are layouts for "
            f"{', '.join(sorted(torch_layout.LAYOUTS, key=str.lower))}); export without --torch_state_dict"
        )
    fn = inference_function(module, variables, meta)
    exported = export_function(fn, meta, platforms)
    blob = exported.serialize()
    (out / EXPORT_FILE).write_bytes(blob)
    sm_path = None
    if saved_model:
        sm_path = out / SAVED_MODEL_DIR
        save_tf_saved_model(fn, meta, sm_path, platforms)

    summary_path = workdir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if torch_state_dict:
        save_torch_state_dict(meta["model"], variables, out / TORCH_STATE_DICT_FILE, _student_steps(summary), verify)
    h, w, c = (int(v) for v in meta["raw_image_shape"])
    info = {
        "format_version": FORMAT_VERSION,
        "model": meta["model"],
        "num_classes": meta["num_classes"],
        "class_names": meta["class_names"],
        "input": {
            "name": INPUT_NAME,
            "shape": [None, h, w, c],
            "dtype": "uint8",
            "layout": "NHWC",
            "value_range": [0, 255],
            "note": "images as the run's data source yields them (after data.image_size resizing); any batch size",
        },
        "output": {"name": OUTPUT_NAME, "shape": [None, meta["num_classes"]], "dtype": "float32", "kind": "logits"},
        "preprocessing_inside": {
            "scale": "x / 255",
            "mean": meta["mean"],
            "std": meta["std"],
            "student_downsample": meta["student_downsample"],
            "lowres_mode": meta["lowres_mode"],
            "network_input_shape": meta["input_shape"],
        },
        "compute_dtype": meta.get("dtype", "float32"),
        "data_source": meta.get("data_source"),
        "student_top1": summary.get("student_top1"),
        "student_top5": summary.get("student_top5"),
        "test_size": summary.get("test_size"),
        "method": summary.get("method"),
        "teacher_model": summary.get("teacher_model"),
        "student_params_sha256": summary.get("student_params_sha256"),
        "files": {
            "jax_export": EXPORT_FILE,
            "saved_model": SAVED_MODEL_DIR if saved_model else None,
            "torch_state_dict": TORCH_STATE_DICT_FILE if torch_state_dict else None,
        },
        "platforms": list(exported.platforms),
        "jax_version": jax.__version__,
        "calling_convention_version": exported.calling_convention_version,
    }
    if verify:
        info["verified_max_abs_diff"] = _verify(module, variables, meta, blob, sm_path, platforms)
        if torch_state_dict:  # read back and compared bitwise by save_torch_state_dict
            info["verified_max_abs_diff"]["torch_state_dict"] = 0.0
    info["export_s"] = round(time.time() - t0, 2)
    (out / META_FILE).write_text(json.dumps(info, indent=1))
    return info


# --------------------------------------------------------------------------- command line


def _cli() -> None:
    from absl import flags

    from ekd_jax import cli

    flags.DEFINE_string("workdir", None, "a finished run's workdir (its student/ folder is exported)")
    flags.DEFINE_string("out", None, "Output folder (default: <workdir>/export).")
    flags.DEFINE_list("platforms", list(DEFAULT_PLATFORMS), "Platforms to lower for: cpu, cuda, tpu.")
    flags.DEFINE_bool("saved_model", True, "Also write the TensorFlow SavedModel (needs TensorFlow).")
    flags.DEFINE_bool("verify", True, "Check each exported form against the Flax student on a random batch.")
    flags.DEFINE_bool("torch_state_dict", False, f"Also write {TORCH_STATE_DICT_FILE}: the student as a PyTorch state "
                      "dict in its reference layout (RepDistiller's keys; needs PyTorch).")
    FLAGS = flags.FLAGS

    def main():
        info = export_student(
            FLAGS.workdir, FLAGS.out, platforms=FLAGS.platforms, saved_model=FLAGS.saved_model, verify=FLAGS.verify,
            torch_state_dict=FLAGS.torch_state_dict,
        )
        print(json.dumps(info))

    # OSError: a disk that fills up or a folder that turns unwritable while the files are written.
    cli.run(main, required=("workdir",), errors=(ValueError, OSError))


def run() -> None:
    """Console script ``ekd-export`` (pyproject.toml) = ``python -m ekd_jax.export``."""
    _cli()


if __name__ == "__main__":
    run()
