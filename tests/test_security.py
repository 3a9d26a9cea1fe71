"""Security: no pickle loads (torch.load only with weights_only=True, weights from safetensors only), no model code
run unless --trust_remote_code true, and a chat template from an adapter rendered in transformers' sandboxed Jinja
environment. Each check is shown to catch what it guards against (the payloads do run when the guard is off)."""

import json
import pickle
import re
import shutil
from pathlib import Path

import jinja2
import pytest
import torch

from longqlora import cli
from longqlora.training.tiny import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("longqlora", "recipes", "data_prep", "bench", "experiments", "tests")  # every folder of Python code
SOURCES = [p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")]
# What loads a pickle, spelled so that this file does not match itself.
PICKLE = re.compile(
    r"\b(pickle|cPickle|dill|joblib)\.(load|loads|Unpickler)\b|read_" + r"pickle\(|allow_" + r"pickle\s*=\s*True"
)
TORCH_LOAD = re.compile(r"\btorch\.load\(")
REMOTE_CODE = re.compile(r"trust_remote_code\s*=\s*" + "True")
SANDBOXLESS = re.compile(r"\bjinja2\.(Template|Environment)\(|from jinja2 import .*\b(Template|Environment)\b")


def call_text(text: str, start: int) -> str:
    """The text of the call whose opening parenthesis ends at `start`, to its matching parenthesis."""
    depth, i = 1, start
    while depth and i < len(text):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
    return text[start:i]


def unsafe_lines(text: str) -> list[str]:
    """Lines of `text` that load a pickle, call torch.load without weights_only=True, turn on remote code or
    render Jinja outside a sandbox."""
    found = [m.group(0) for pattern in (PICKLE, REMOTE_CODE, SANDBOXLESS) for m in pattern.finditer(text)]
    found += [
        f"torch.load({call_text(text, m.end())}"
        for m in TORCH_LOAD.finditer(text)
        if not re.search(r"weights_only\s*=\s*True", call_text(text, m.end()))
    ]
    return found


def test_the_scan_finds_what_it_looks_for():
    bad = (
        "state = torch.load(path)\nx = pickle.loads(blob)\nm = AutoModel.from_pretrained(p, trust_remote_code="
        "True)\nt = jinja2.Template(s)\nok = torch.load(path, map_location='cpu', weights_only=True)\n"
    )
    assert len(unsafe_lines(bad)) == 4 and not any("map_location" in line for line in unsafe_lines(bad))


def test_no_pickle_load_remote_code_or_unsandboxed_jinja_in_the_code():
    assert len(SOURCES) > 40 and {p.relative_to(ROOT).parts[0] for p in SOURCES} == set(FOLDERS)
    code = {  # a new folder of code is scanned too (out/: what runs wrote; hidden folders: tools, the venv)
        d.name
        for d in ROOT.iterdir()
        if d.is_dir() and d.name[0] not in "._" and d.name != "out" and next(d.rglob("*.py"), None)
    }
    assert code == set(FOLDERS), code ^ set(FOLDERS)
    found = {str(p.relative_to(ROOT)): unsafe_lines(p.read_text()) for p in SOURCES if p.name != "test_security.py"}
    assert {k: v for k, v in found.items() if v} == {}


class Payload:
    """Unpickling this creates `marker`: what a malicious .bin file does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("sec") / "model", max_position_embeddings=64)


def last_error(argv, capfd) -> str:
    with pytest.raises(SystemExit) as ended:
        cli.main(argv)
    err = capfd.readouterr().err
    assert ended.value.code == 2 and "Traceback" not in err, err[-2000:]
    return err.strip().splitlines()[-1]


def test_pickled_weights_are_never_loaded(model, tmp_path, capfd):
    marker = tmp_path / "unpickled"
    base = Path(shutil.copytree(model, tmp_path / "base"))
    (base / "model.safetensors").unlink()
    torch.save({"weight": Payload(marker)}, base / "pytorch_model.bin")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(model), "peft_type": "LORA"})
    )
    torch.save({"base_model.model.lm_head.weight": Payload(marker)}, adapter / "adapter_model.bin")
    assert "no .safetensors weights" in last_error(
        ["perplexity", "--model", str(base), "--context_lengths", "32"], capfd
    )
    assert "no adapter_model.safetensors" in last_error(
        ["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")], capfd
    )
    assert "no adapter_model.safetensors" in last_error(
        ["perplexity", "--adapter", str(adapter), "--context_lengths", "32"], capfd
    )
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # what weights_only=True does with it
        torch.load(adapter / "adapter_model.bin", weights_only=True)
    assert not marker.exists()
    torch.load(adapter / "adapter_model.bin", weights_only=False)  # the payload is real
    assert marker.exists()


def test_model_code_runs_only_with_trust_remote_code(model, tmp_path, capfd, monkeypatch):
    marker = tmp_path / "ran"
    remote = Path(shutil.copytree(model, tmp_path / "remote"))
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="shipped", auto_map={"AutoConfig": "configuration_shipped.ShippedConfig"})
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "configuration_shipped.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nfrom transformers import LlamaConfig\n\n\n"
        "class ShippedConfig(LlamaConfig):\n    model_type = 'shipped'\n"
    )
    recipe = ["--model_name_or_path", str(remote), "--target_context", "256", "--dry_run"]
    with pytest.raises(SystemExit) as ended:
        cli.run_recipe(*recipe_classes(), argv=recipe)
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert ended.value.code == 2 and last.startswith(f"error: --model_name_or_path {remote}: it ships its own")
    assert "--trust_remote_code true" in last
    for argv in (
        ["chat", "--model", str(remote), "--prompt", "hi"],
        ["perplexity", "--model", str(remote), "--context_lengths", "32"],
    ):
        assert last_error(argv, capfd).startswith(f"error: --model {remote}: it ships its own Python code")
    assert not marker.exists()
    import transformers.dynamic_module_utils as modules

    monkeypatch.setattr(modules, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # keep the copy out of ~/.cache
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    from transformers import AutoConfig

    AutoConfig.from_pretrained(remote, trust_remote_code=True)  # asked for: it runs
    assert marker.exists()


def recipe_classes(name: str = "extend_7b_8k"):
    from conftest import load_script

    recipe = load_script(f"recipes/{name}.py")
    return recipe.Model, recipe.Data, recipe.Training


def test_every_trust_remote_code_flag_defaults_to_off():
    """Every config with the flag, built with its defaults, has it off; a config of the package that gains the
    flag and is not checked here fails the test (found by importing every module of longqlora/)."""
    import dataclasses
    import importlib
    import pkgutil

    import longqlora
    from longqlora.chat import ChatConfig
    from longqlora.evaluation.loading import LoaderArgs
    from longqlora.evaluation.passkey import PasskeyConfig
    from longqlora.evaluation.perplexity import PerplexityConfig
    from longqlora.training.config import TrainingConfig

    checked = (ChatConfig, PasskeyConfig, PerplexityConfig, LoaderArgs)
    assert all(config(model="m").trust_remote_code is False for config in checked)
    assert TrainingConfig(output_dir="out").trust_remote_code is False  # every recipe's Training, below
    modules = [
        m.name for m in pkgutil.walk_packages(longqlora.__path__, "longqlora.") if m.name != "longqlora.__main__"
    ]
    with_flag = {
        obj
        for name in modules
        for obj in vars(importlib.import_module(name)).values()
        if isinstance(obj, type) and obj.__module__.startswith("longqlora.") and dataclasses.is_dataclass(obj)
        if any(f.name == "trust_remote_code" for f in dataclasses.fields(obj))
    }
    assert with_flag == {*checked, TrainingConfig}, with_flag
    recipes = [p.stem for p in (ROOT / "recipes").glob("*.py") if p.stem != "quickstart"]
    assert len(recipes) >= 6
    assert all(recipe_classes(name)[2]().trust_remote_code is False for name in recipes)


def test_an_adapters_chat_template_renders_in_the_sandbox(model, tmp_path, capfd):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    marker = tmp_path / "escaped"
    escape = (
        "{{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').read() }}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    adapter = tmp_path / "adapter"
    get_peft_model(
        AutoModelForCausalLM.from_pretrained(model), LoraConfig(r=4, target_modules=["q_proj"])
    ).save_pretrained(adapter)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = escape
    tokenizer.save_pretrained(adapter)
    last = last_error(
        ["chat", "--model", str(model), "--adapter", str(adapter), "--prompt", "hi", "--max_new_tokens", "1"], capfd
    )
    assert last.startswith(f"error: the chat template of {adapter} failed (SecurityError: ") and len(last) < 300
    assert not marker.exists()
    jinja2.Environment().from_string(escape).render(messages=[])  # outside a sandbox the template escapes
    assert marker.exists()
