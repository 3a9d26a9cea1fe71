"""The shape of the package (docs/architecture.md): stages import without cycles and without GPU packages, modules
stay small, the repository names no machine's paths, and the lint is clean."""

import ast
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

PACKAGE = ROOT / "longqlora"
MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for p in PACKAGE.rglob("*.py")
    if p.name != "__main__.py"
)


def test_every_module_imports_first_without_a_cycle_or_a_gpu_package():
    """Each module imported first in a clean module table (a cycle fails when its first module is the entry);
    flash-attn and xformers are never imported by an import (bitsandbytes is: PEFT imports it when installed)."""
    code = (
        "import importlib, sys\n"
        f"modules = {MODULES!r}\n"
        "for name in modules:\n"
        "    for loaded in [m for m in sys.modules if m == 'longqlora' or m.startswith('longqlora.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
        "gpu = [m for m in ('flash_attn', 'xformers') if m in sys.modules]\n"
        "assert not gpu, gpu\n"
        "print(len(modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) == len(MODULES) > 30


def test_bitsandbytes_hub_kernel_warning_is_dropped():
    """bitsandbytes warns on import, on CPUs with AVX512-BF16, that its optional kernel from the hub did not load;
    after `import longqlora` it does not (a filter on bitsandbytes' logger), while its other warnings still pass."""
    bare = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True, cwd=ROOT)
    if "kernels-community" not in bare.stderr:
        pytest.skip("this CPU does not print the warning (no AVX512-BF16, or bitsandbytes changed it)")
    code = (
        "import logging, longqlora, bitsandbytes\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('another warning')\n"
    )
    ours = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert ours.returncode == 0, ours.stderr[-2000:]
    assert "kernels-community" not in ours.stderr and "another warning" in ours.stderr


def test_deepspeeds_cpu_accelerator_warning_is_dropped():
    """DeepSpeed warns on import, on every machine without a GPU, that it set its accelerator to the CPU; after
    `import longqlora` it does not, while its other warnings still pass."""
    pytest.importorskip("deepspeed")
    bare = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True, text=True, cwd=ROOT)
    if "Setting accelerator to CPU" not in bare.stdout + bare.stderr:
        pytest.skip("DeepSpeed found an accelerator here, or no longer prints the warning")
    code = "import longqlora, deepspeed\nfrom deepspeed.utils import logger\nlogger.warning('another warning')\n"
    ours = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert ours.returncode == 0, ours.stderr[-2000:]
    out = ours.stdout + ours.stderr
    assert "Setting accelerator to CPU" not in out and "another warning" in out


def test_the_stages_are_subpackages():
    for stage in ("attention", "data", "training", "evaluation"):
        assert (PACKAGE / stage / "__init__.py").is_file()
    flat = {p.stem for p in PACKAGE.glob("*.py")}
    assert not flat & {"quickstart", "ablations", "ablation_report", "utils", "train", "inference"}


SCRIPTS = [p for d in ("bench", "experiments", "recipes", "data_prep") for p in (ROOT / d).glob("*.py")]


@pytest.mark.parametrize("path", sorted([*PACKAGE.rglob("*.py"), *SCRIPTS]), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_over_400_lines(path):
    """The library's modules and the scripts beside it (benches, experiments, recipes, data prep); not the tests."""
    assert len(path.read_text().splitlines()) <= 400


def test_the_library_never_imports_the_experiments():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] == "experiments" for n in names), path


def test_no_absolute_machine_path_in_the_repository():
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    pattern = re.compile(r"(?<![\w.])/(?:work|root|home|Users|opt|mnt|usr/local|tmp/pytest-of)/\w")
    hits = []
    for name in tracked:
        path = ROOT / name
        if (
            path.suffix in (".py", ".md", ".toml", ".yaml", ".yml", ".txt", ".json", ".log", ".sh", ".in", "")
            and path.is_file()
        ):
            text = path.read_text(errors="replace")
            hits += [f"{name}: {m.group(0)}" for m in pattern.finditer(text)]
    assert not hits, hits


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is installed by `pip install -e .[test]`")
def test_ruff_is_clean():
    done = subprocess.run(["ruff", "check", "--no-cache", "."], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:]
    done = subprocess.run(["ruff", "format", "--check", "--no-cache", "."], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:]


# Imported only behind an availability check or by an optional path (GPU kernels, engines, loggers, GGUF files).
OPTIONAL_IMPORTS = {"flash_attn", "xformers", "deepspeed", "tensorboard", "gguf", "kernels"}


def test_the_declared_dependencies_cover_the_imports_and_hold_the_pinned_stack():
    """pyproject.toml's dependencies are what an installed package gets (requirements.txt is the exact stack of
    the tests): every third-party module the library imports comes from one of them, and every pin of
    requirements.txt lies in its range (a wheel that pulled another stack than the tested one was found before)."""
    tomllib = pytest.importorskip("tomllib")
    from importlib.metadata import packages_distributions

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {canonicalize_name(r.name): r for r in map(Requirement, project["dependencies"])}
    modules = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                modules.add(node.module.split(".")[0])
    third_party = modules - set(sys.stdlib_module_names) - {"longqlora"} - OPTIONAL_IMPORTS
    owners = packages_distributions()
    undeclared = {m for m in third_party if not {canonicalize_name(d) for d in owners.get(m, [m])} & declared.keys()}
    assert not undeclared, f"imported, not in pyproject.toml's dependencies: {sorted(undeclared)}"
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    pinned = [Requirement(line) for line in lines if line]
    for pin in (p for p in pinned if str(p.specifier).startswith("==")):
        wanted = declared.get(canonicalize_name(pin.name))
        version = str(pin.specifier).removeprefix("==")
        assert wanted is None or wanted.specifier.contains(version), f"{pin} is outside pyproject's {wanted}"
