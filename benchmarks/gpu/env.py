"""The GPU check's environment: phase 0 (versions), wheels for missing dependencies, stubs for optional ones.

* ``phase_env`` records the versions of Python, JAX (with ekd_jax's XLA defaults, as every worker gets
  them), torch / CUDA / cuDNN and nvidia-smi's GPU line (results.jsonl: phase env, what versions).
* ``install_wheels`` (``--wheels DIR``, made by benchmarks/gpu_wheels.sh): the lent GPU machine has no
  package index, so each dependency that does not import is installed from its wheel file
  (``pip --no-index``, else by unpacking it) into a folder put on sys.path and PYTHONPATH.
* ``install_stubs`` (in each JAX worker): stand-ins for optional modules still missing, so the trainer
  runs without them (tensorboardX, PIL, matplotlib; listed in the worker's result).
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import types
import zipfile

from gpu.common import ROOT, Results, log, worker_env

# module -> distribution, for the dependencies the device may lack (benchmarks/gpu_wheels.sh).
NEEDED = {"absl": "absl-py", "yaml": "PyYAML", "ml_collections": "ml-collections"}
OPTIONAL = {"google.protobuf": "protobuf", "packaging": "packaging", "tensorboardX": "tensorboardX",
            "tqdm": "tqdm", "PIL": "pillow"}


# --------------------------------------------------------------------------- phase 0: versions


_JAX_VERSIONS = (
    "import ekd_jax; "  # the project's XLA defaults, as every worker gets them
    "import json, os, sys, jax, jaxlib; d = jax.devices(); "
    "print(json.dumps({'python': sys.version.split()[0], 'jax': jax.__version__, 'jaxlib': jaxlib.__version__, "
    "'backend': jax.default_backend(), 'devices': [str(x) for x in d], "
    "'device_kind': getattr(d[0], 'device_kind', ''), 'xla_flags': os.environ.get('XLA_FLAGS', ''), "
    "'cpus': os.cpu_count()}))"
)
_TORCH_VERSIONS = (
    "import json, torch; c = torch.cuda.is_available(); "
    "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, 'cuda_available': c, "
    "'cudnn': torch.backends.cudnn.version() if c else None, "
    "'gpu': torch.cuda.get_device_name(0) if c else None, "
    "'cudnn_allow_tf32': torch.backends.cudnn.allow_tf32, 'matmul_allow_tf32': torch.backends.cuda.matmul.allow_tf32}))"
)


def phase_env(args, results: Results) -> dict:
    env = worker_env(args)
    procs = {name: subprocess.Popen([python, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env, cwd=ROOT)
             for name, python, code in (("jax", sys.executable, _JAX_VERSIONS),
                                        ("torch", args.torch_python, _TORCH_VERSIONS))}
    info = {"python": sys.version.split()[0], "orchestrator_python": sys.executable, "torch_python": args.torch_python}
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            r = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            info["nvidia_smi"] = f"failed: {e}"
    for k, p in procs.items():
        try:
            o, e = p.communicate(timeout=120)
            info[k] = json.loads(o.strip().splitlines()[-1]) if p.returncode == 0 and o.strip() else {"error": e[-800:]}
        except (subprocess.TimeoutExpired, ValueError) as e:
            p.kill()
            info[k] = {"error": f"{type(e).__name__}: {e}"}
    results.add({"phase": "env", "what": "versions", **info})
    log("env: " + json.dumps(info))
    return info


# --------------------------------------------------------------------------- wheels


def _importable(mod: str) -> bool:
    try:
        importlib.import_module(mod)
        return True
    except Exception:  # noqa: BLE001  (an installed but broken module counts as missing)
        return False


def _wheel_fits(name: str) -> bool:
    """Whether wheel file ``name`` can be used by this Python (pure, abi3, or this CPython)."""
    parts = name[:-4].split("-")
    if len(parts) < 5:
        return False
    py, abi, plat = parts[-3], parts[-2], parts[-1]
    me = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    if "any" in plat.split("."):
        return any(t.startswith("py3") or t == me for t in py.split("."))
    if not any(p.endswith("x86_64") for p in plat.split(".")) or os.uname().machine != "x86_64":
        return False
    if abi == "abi3":
        return any(t.startswith("cp3") and int(t[3:] or 0) <= sys.version_info[1] for t in py.split("."))
    return me in py.split(".")


def install_wheels(wheels: str, target: pathlib.Path, results: Results | None) -> dict:
    """Installs each missing dependency's wheel from ``wheels`` into ``target`` (put on sys.path
    and PYTHONPATH): ``pip install --no-index --no-deps --target``, else by unpacking the wheel
    (a wheel is a zip of the package). Returns what it found and did."""
    target.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH", "")]))
    report = {"wheels_dir": wheels, "target": str(target), "installed": [], "unpacked": [], "missing": []}
    for mod, dist in {**NEEDED, **OPTIONAL}.items():
        if _importable(mod):
            continue
        key = dist.lower().replace("-", "_")
        files = sorted(f for f in glob.glob(os.path.join(wheels, "*.whl"))
                       if os.path.basename(f).lower().split("-")[0] == key and _wheel_fits(os.path.basename(f)))
        if not files:
            report["missing"].append(dist)
            continue
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                            "--find-links", wheels, "--target", str(target), files[-1]],
                           capture_output=True, text=True, timeout=300)
        if r.returncode == 0:
            report["installed"].append(os.path.basename(files[-1]))
        else:  # no pip, or it refused: unpack (enough for these pure-Python packages)
            with zipfile.ZipFile(files[-1]) as z:
                z.extractall(target)
            report["unpacked"].append(os.path.basename(files[-1]))
        importlib.invalidate_caches()
        for m in list(sys.modules):  # a failed import may have left a half module behind
            if m == mod or m.startswith(mod + "."):
                del sys.modules[m]
        if not _importable(mod):
            report["missing"].append(dist)
    if results is not None:
        results.add({"phase": "env", "what": "wheels", **report})
    return report


def missing_needed(report: dict) -> bool:
    """Whether a dependency the JAX phases cannot run without is still missing after ``install_wheels``."""
    return any(NEEDED[m] in report["missing"] for m in NEEDED)


# --------------------------------------------------------------------------- stubs


def install_stubs() -> list[str]:
    """In a JAX worker: stand-ins for optional modules that are not importable (listed in the result)."""
    stubbed = []
    try:
        import tensorboardX  # noqa: F401
    except Exception:  # noqa: BLE001  (also a protobuf too old for its generated code)
        class SummaryWriter:  # the three calls outputs.RunWriter makes
            def __init__(self, *a, **k):
                pass

            def add_scalar(self, *a, **k):
                pass

            def flush(self):
                pass

            def close(self):
                pass

        m = types.ModuleType("tensorboardX")
        m.SummaryWriter = SummaryWriter
        sys.modules["tensorboardX"] = m
        stubbed.append("tensorboardX")
    try:
        from PIL import Image  # noqa: F401
    except Exception:  # noqa: BLE001  (ekd_jax.data imports it; it only resizes, not needed at native size)
        pil, image = types.ModuleType("PIL"), types.ModuleType("PIL.Image")

        def fromarray(*a, **k):
            raise RuntimeError("pillow is not installed (benchmarks/gpu_wheels.sh --pillow): cannot resize images")

        image.fromarray = fromarray
        image.Resampling = types.SimpleNamespace(BILINEAR=2)
        pil.Image = image
        sys.modules["PIL"], sys.modules["PIL.Image"] = pil, image
        stubbed.append("PIL")
    try:
        from matplotlib.figure import Figure  # noqa: F401
    except Exception:  # noqa: BLE001
        from ekd_jax import outputs

        outputs.plot_curves = lambda records, path: None  # curves.png is skipped
        stubbed.append("matplotlib")
    return stubbed
