"""Shared test fixtures: scripts (recipes, benchmarks) loaded by their path in the repository, one tiny trained
adapter for the whole session. The `slow` marker and the default that leaves it out are in pyproject.toml."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tests never reach the hub (a hub id that is not cached must fail at once, not after network timeouts); set
# before huggingface_hub is imported, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_script(relative: str):
    """The module at `relative` (to the repository root: `recipes/extend_7b_8k.py`, `bench/memory.py`), loaded
    once and registered in sys.modules: dataclasses resolve their module there, and the Trainer pickles a recipe's
    Training into each checkpoint."""
    name = "script_" + relative.removesuffix(".py").replace("/", "_").replace("-", "_")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / relative)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


@pytest.fixture(scope="session")
def script():
    """`script("recipes/extend_7b_8k.py")`: a recipe or benchmark module by its path in the repository."""
    return load_script


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory) -> Path:
    """The 7B 8k recipe's tiny run, default flags (a random tiny Llama with context 64, x4 to 256 with YaRN,
    NF4, S2-Attn, LoRA+): one trained adapter shared by every test that only reads it."""
    from longqlora.cli import run_recipe

    recipe = load_script("recipes/extend_7b_8k.py")
    out = tmp_path_factory.mktemp("tiny_adapter") / "extend_7b_8k"
    return Path(run_recipe(recipe.Model, recipe.Data, recipe.Training, argv=["--tiny", "--output_dir", str(out)]))
