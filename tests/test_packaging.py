"""Packaging: pyproject.toml declares what ekd_jax imports, requirements.txt pins exactly that, the
lower bounds are versions the suite runs with, and the console scripts are the command lines."""

import ast
import functools
import importlib.metadata as md
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import ekd_jax
from ekd_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SELF = canonicalize_name(PROJECT["name"])
CORE = [Requirement(r) for r in PROJECT["dependencies"]]
EXTRAS = {name: [Requirement(r) for r in reqs] for name, reqs in PROJECT["optional-dependencies"].items()}
SCRIPTS = {  # console script -> the module that `python -m` runs
    "ekd-train": "ekd_jax.main",
    "ekd-evaluate": "ekd_jax.evaluate",
    "ekd-export": "ekd_jax.export",
    "ekd-compare": "ekd_jax.compare",
    "ekd-bench": "ekd_jax.bench",
    "ekd-import-torch": "ekd_jax.import_torch",
}


def _here(reqs):
    """The third-party requirements (not ekd_jax's own extras) whose markers hold on this machine."""
    return [r for r in reqs if canonicalize_name(r.name) != SELF and (r.marker is None or r.marker.evaluate())]


# The extras the test set installs ([test] pulls them in, requirements.txt pins them); the others (PyTorch)
# are installed by hand where wanted, and their tests skip without them.
IN_TEST_SET = set(next(Requirement(r) for r in PROJECT["optional-dependencies"]["test"]
                       if canonicalize_name(Requirement(r).name) == SELF).extras) | {"test"}


def _installed(req) -> bool:
    try:
        md.version(req.name)
        return True
    except md.PackageNotFoundError:
        return False


def _names(reqs) -> set[str]:
    return {canonicalize_name(r.name) for r in _here(reqs)}


def _imports():
    """(top-level module, at import time?, file) for every third-party import in ekd_jax/."""
    out = []

    def visit(node, path, module_level):
        for child in ast.iter_child_nodes(node):
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                names = [child.module]
            for name in names:
                top = name.partition(".")[0]
                if top != "ekd_jax" and top not in sys.stdlib_module_names:
                    out.append((top, module_level, path.relative_to(ROOT).as_posix()))
            lazy = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, path, module_level and not lazy)

    for path in sorted((ROOT / "ekd_jax").rglob("*.py")):
        visit(ast.parse(path.read_text()), path, True)
    return out


@functools.cache
def _packages_distributions() -> dict:
    """importlib.metadata reads every installed distribution's file list (torch's, tensorflow's)
    on each call: once is enough."""
    return md.packages_distributions()


def _distributions(module: str) -> set[str]:
    return {canonicalize_name(d) for d in _packages_distributions().get(module, [])}


def test_every_import_is_a_declared_dependency():
    core = _names(CORE)
    optional = set().union(*(_names(EXTRAS[e]) for e in EXTRAS if e != "test"))
    imports = _imports()
    assert {"jax", "flax", "PIL", "sklearn", "tensorflow_datasets"} <= {m for m, _, _ in imports}  # the walk works
    outside = {canonicalize_name(r.name) for e in set(EXTRAS) - IN_TEST_SET for r in _here(EXTRAS[e])}
    for module, module_level, where in imports:
        dists = _distributions(module)
        if not dists and canonicalize_name(module) in outside:  # torch, where it is not installed
            assert not module_level, f"{where} imports {module} at import time: it is optional"
            assert module in cli.OPTIONAL_MODULES, f"{where}: add {module} to cli.OPTIONAL_MODULES"
            continue
        assert dists, f"{where} imports {module}, which is not installed here"
        if module_level:
            assert dists & core, f"{where} imports {module} at import time: {dists} must be in dependencies"
        else:
            assert dists & (core | optional), f"{where} imports {module}: declare {dists} (dependencies or an extra)"
            if not dists & core:  # a lazy optional import: a missing one is reported with its extra
                assert module in cli.OPTIONAL_MODULES, f"{where}: add {module} to cli.OPTIONAL_MODULES"


# Runtime dependencies ekd_jax does not import itself: dependency -> (ekd_jax file, the call that needs it).
INDIRECT = {
    "flatbuffers": ("ekd_jax/export.py", ".serialize()"),  # jax.export's serialization imports it
    "importlib-resources": ("ekd_jax/data/tfds.py", ".download_and_prepare("),  # TFDS's etils.epath imports it
}


def test_every_dependency_is_used():
    for dist, (where, call) in INDIRECT.items():
        assert call in (ROOT / where).read_text(), f"{where} no longer calls {call}: is {dist} still needed?"
        extras = [e for e in EXTRAS if e != "test" and canonicalize_name(dist) in _names(EXTRAS[e])]
        assert canonicalize_name(dist) in _names(CORE) or extras, f"{where} needs {dist} at run time: declare it"
    imported = set().union(*(_distributions(m) or {canonicalize_name(m)} for m, _, _ in _imports()), INDIRECT)
    optional = set().union(*(_names(EXTRAS[e]) for e in EXTRAS if e != "test"))
    assert _names(CORE) | optional <= imported, f"declared but never imported: {(_names(CORE) | optional) - imported}"


def test_optional_modules_name_extras_that_install_them():
    for module, hint in cli.OPTIONAL_MODULES.items():
        extras = re.findall(r"ekd_jax\[(\w+)\]", hint)
        assert extras, hint
        for extra in extras:
            assert extra in EXTRAS, f"{hint}: pyproject.toml has no extra [{extra}]"
            dists = _distributions(module) or {canonicalize_name(module)}  # torch, where not installed
            assert dists & _names(EXTRAS[extra]), f"[{extra}] does not install {module}"


def test_test_extra_installs_everything_the_suite_needs():
    test = EXTRAS["test"]
    own = [r for r in test if canonicalize_name(r.name) == SELF]
    # Every extra but PyTorch's: on Linux PyPI's torch is the multi-GB CUDA build (README's second command
    # must not pull it); its tests skip without it, and CI installs the CPU build (.ci/run).
    assert own and set(own[0].extras) == set(EXTRAS) - {"test", "torch"}, "[test] must pull in every extra but [torch]"
    assert "torch" not in _names(test), "[test] must not install torch"
    for module in ("pytest", "xdist", "chex", "nbclient", "nbformat", "ipykernel"):
        assert _distributions(module) & _names(test), module


def test_lower_bounds_are_tested_versions():
    """Every requirement has a >= lower bound, and the version installed here (the suite's) meets it."""
    for group, reqs in [("dependencies", CORE), *EXTRAS.items()]:
        for req in _here(reqs):
            if group not in IN_TEST_SET and group != "dependencies" and not _installed(req):
                continue  # torch, where it is not installed
            assert any(s.operator == ">=" for s in req.specifier), f"{group}: {req} needs a >= lower bound"
            installed = md.version(req.name)
            assert req.specifier.contains(installed, prereleases=True), f"{group}: {req}, but {installed} installed"


def test_requirements_txt_pins_exactly_pyproject():
    lines = [line.split(" #")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    # One requirement a line, no pip options: the Colab notebook installs the lines one by one.
    pins = [Requirement(line) for line in lines]
    declared = {}
    for req in [*CORE, *(r for extra in IN_TEST_SET for r in EXTRAS[extra])]:
        if canonicalize_name(req.name) != SELF:
            declared.setdefault((canonicalize_name(req.name), str(req.marker)), req)
    pinned = {(canonicalize_name(p.name), str(p.marker)): p for p in pins}
    assert len(pinned) == len(pins), "a requirement is pinned twice"
    assert set(pinned) == set(declared), (
        f"only in requirements.txt: {set(pinned) - set(declared)}; only in pyproject: {set(declared) - set(pinned)}"
    )
    for key, pin in pinned.items():
        (spec,) = pin.specifier  # exactly one specifier: == version
        assert spec.operator == "==", pin
        assert declared[key].specifier.contains(spec.version), f"{pin} is outside pyproject's {declared[key]}"


def test_ci_installs_the_torch_extra_at_its_lower_bound():
    """.ci/run adds PyTorch to the test set (so that CI runs the bridge's tests), at the version pyproject's
    [torch] names as tested; README's command for the CPU build names the same version."""
    (torch_req,) = [r for r in EXTRAS["torch"] if canonicalize_name(r.name) == "torch"]
    (bound,) = [s.version for s in torch_req.specifier if s.operator == ">="]
    pins = re.findall(r"torch==([\w.+]+)", (ROOT / ".ci" / "run").read_text())
    assert pins == [bound], f".ci/run installs torch {pins}, pyproject's [torch] says {torch_req}"
    assert f"torch=={bound} --index-url https://download.pytorch.org/whl/cpu" in (ROOT / "tests" / "helpers.py").read_text()


def test_console_scripts_are_the_command_lines():
    assert set(PROJECT["scripts"]) == set(SCRIPTS)
    for script, target in PROJECT["scripts"].items():
        module, _, func = target.partition(":")
        assert module == SCRIPTS[script], target
        # Static: importing two of these modules in one process would define their absl flags twice.
        tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
        defs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == func]
        assert len(defs) == 1 and not defs[0].args.args, f"{target}: no module-level {func}() without arguments"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_runs_its_command_line(script):
    """What the installed script does: import the module, call the function, with argv[0] its name.
    Without arguments each command line names its first missing required flag, exit status 2."""
    module, _, func = PROJECT["scripts"][script].partition(":")
    code = f"import sys, {module} as m; sys.argv = [{script!r}]; m.{func}()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    first = {"ekd-evaluate": "workdir", "ekd-export": "workdir", "ekd-import-torch": "checkpoint"}.get(script, "config")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.fullmatch(rf"error: --{first} is required \(.+\)", proc.stderr.strip()), proc.stderr[-2000:]


def test_missing_optional_dependency_names_its_extra(tmp_path):
    """ekd-train on a TFDS source without tensorflow_datasets: one error line with the extra."""
    fake = tmp_path / "no_tfds" / "tensorflow_datasets"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'tensorflow_datasets'\", name='tensorflow_datasets')\n")
    module, _, func = PROJECT["scripts"]["ekd-train"].partition(":")
    argv = ["ekd-train", "--config=configs/quickstart.py:tiny", "--config.data.source=tfds:cifar10",
            f"--workdir={tmp_path / 'run'}"]
    proc = subprocess.run([sys.executable, "-c", f"import sys, {module} as m; sys.argv = {argv!r}; m.{func}()"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(fake.parent)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: No module named 'tensorflow_datasets'"), proc.stderr[-2000:]
    assert "pip install 'ekd_jax[tfds]'" in lines[0]


def test_wheel_has_the_package_scripts_and_dependencies(tmp_path):
    """Build the wheel `pip install .` installs (setuptools' PEP 517 backend, from a copy of the
    tree) and check what it holds."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    shutil.copytree(ROOT / "ekd_jax", src / "ekd_jax", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    code = "import sys, setuptools.build_meta as b; print(b.build_wheel(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=src, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = tmp_path / "dist" / proc.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as z:
        files = set(z.namelist())
        info = next(n for n in files if n.endswith(".dist-info/METADATA"))
        metadata = z.read(info).decode()
        entry_points = z.read(info.replace("METADATA", "entry_points.txt")).decode()
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "ekd_jax").rglob("*.py")}
    assert sources <= files, f"not in the wheel: {sources - files}"
    assert not any(f.startswith(("tests/", "configs/", "benchmarks/")) for f in files)
    assert re.search(rf"^Version: {re.escape(ekd_jax.__version__)}$", metadata, re.M)
    requires = {canonicalize_name(Requirement(r).name) for r in re.findall(r"^Requires-Dist: (.+)$", metadata, re.M)}
    assert {canonicalize_name(r.name) for r in CORE} | set().union(*map(_names, EXTRAS.values())) <= requires
    for script, target in PROJECT["scripts"].items():
        assert re.search(rf"^{re.escape(script)} = {re.escape(target)}$", entry_points, re.M), entry_points
