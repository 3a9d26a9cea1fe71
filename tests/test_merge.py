"""Merge: the merged model is a plain transformers model that gives the adapter model's logits; bad input is
refused in one line before any weights load."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from longqlora.evaluation.loading import load_for_inference
from longqlora.merge import DEFAULT_TOLERANCE, REPORT_FILE, MergeConfig, logits_of, merge, sample_ids
from longqlora.training.tiny import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def adapter(tiny_adapter):
    """A tiny trained adapter: base context 64, extended x4 to 256 with YaRN (the default), trained on NF4."""
    return tiny_adapter


@pytest.fixture(scope="session")
def merged(adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "f32"
    return merge(MergeConfig(adapter=str(adapter), output=str(out), dtype="float32", sample_tokens=200)), out


def adapter_logits(adapter, dtype="float32", n=200):
    model, tokenizer, _ = load_for_inference(None, adapter=str(adapter), compute_dtype=dtype)
    ids = sample_ids(tokenizer, n)
    return ids, logits_of(model, ids)


def relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_float32_merge_round_trip(adapter, merged):
    report, out = merged
    check = report["check"]
    assert check["passed"] and check["tolerance"] == DEFAULT_TOLERANCE["float32"] == 1e-4
    assert check["relative_diff"] <= 1e-4 and check["sample_tokens"] == 200
    assert json.loads((out / REPORT_FILE).read_text()) == report
    assert report["modules_replaced"][0] == "model.embed_tokens" and report["lora_layers_merged"] == 8
    # independently of merge(): the adapter model (16-bit path, same base) against the saved directory
    ids, reference = adapter_logits(adapter)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert relative(logits_of(plain, ids), reference) <= 1e-4
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        REPORT_FILE,
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_saved_config_is_plain_and_extended(merged):
    _, out = merged
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "yarn" and config["rope_parameters"]["factor"] == 4.0
    assert config["rope_parameters"]["original_max_position_embeddings"] == 64  # YaRN needs it to load plainly
    assert config["max_position_embeddings"] == 256
    assert "quantization_config" not in config and "longqlora" not in json.dumps(config)
    assert config["use_cache"] is True
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config._attn_implementation == "sdpa"


def test_loads_in_a_process_without_the_toolkit(adapter, merged, tmp_path):
    _, out = merged
    ids, reference = adapter_logits(adapter)
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys; sys.modules['longqlora'] = None  # any import of the toolkit would fail\n"
        "import torch; from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32).eval()\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)\n"
        "with torch.no_grad(): logits = model(ids).logits\n"
        f"torch.save(logits, {str(tmp_path / 'logits.pt')!r})\n"
        "assert not [m for m in sys.modules if m.startswith('longqlora') and sys.modules[m] is not None]\n"
        "print(model.config._attn_implementation, type(model).__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["sdpa", "LlamaForCausalLM"]
    assert "Unrecognized keys" not in done.stderr  # the saved rope_parameters validate cleanly
    assert relative(torch.load(tmp_path / "logits.pt", weights_only=True), reference) <= 1e-4


def test_the_readme_loads_the_adapter_in_plain_peft(adapter, tmp_path):
    """The README's snippet, in a process without the toolkit: the base with the record's `config` and the adapter
    through plain PEFT give the logits of the toolkit's own loading; PEFT alone (the base's RoPE) does not."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = re.search(r"```python\n(import json\n.*?PeftModel.from_pretrained.*?)```", readme, re.S).group(1)
    assert 'run = "out/llama2-7b-8k"\n' in snippet
    ids, reference = adapter_logits(adapter)
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys; sys.modules['longqlora'] = None  # any import of the toolkit would fail\n"
        + snippet.replace('run = "out/llama2-7b-8k"', f"run = {str(adapter)!r}")
        + "import torch\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)\n"
        "with torch.no_grad(): torch.save(model.eval()(ids).logits, 'extended.pt')\n"
        "plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(record['model_path']), run)\n"
        "with torch.no_grad(): torch.save(plain.eval()(ids).logits, 'plain.pt')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert relative(torch.load(tmp_path / "extended.pt", weights_only=True), reference) <= 1e-5
    assert relative(torch.load(tmp_path / "plain.pt", weights_only=True), reference) > 1e-3


def test_merged_embedding_and_norms_are_the_trained_copies(adapter, merged):
    _, out = merged
    with (
        safe_open(str(adapter / "adapter_model.safetensors"), "pt") as a,
        safe_open(str(out / "model.safetensors"), "pt") as m,
        safe_open(str(adapter / "tiny-base" / "model.safetensors"), "pt") as b,
    ):
        for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"):
            trained = a.get_tensor(f"base_model.model.{name}")
            assert torch.equal(m.get_tensor(name), trained), name
            assert not torch.equal(b.get_tensor(name), trained), f"{name}: training did not change it"
        q = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(m.get_tensor(q), b.get_tensor(q))  # the LoRA product was added


def test_float16_merge(adapter, merged, tmp_path, monkeypatch):
    import longqlora.evaluation.loading as loading

    checks, check = [], loading.check_adapter_fits
    monkeypatch.setattr(loading, "check_adapter_fits", lambda *a, **k: checks.append(k["flag"]) or check(*a, **k))
    report = merge(MergeConfig(adapter=str(adapter), output=str(tmp_path / "f16"), dtype="float16", sample_tokens=200))
    assert checks == ["--base"]  # the adapter is checked against the base once, by the flag merge takes
    assert report["check"]["passed"] and report["check"]["tolerance"] == 2e-2
    assert report["check"]["relative_diff"] <= 2e-2
    with safe_open(str(tmp_path / "f16" / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F16"
    # the float16 model against the float32 merge: 16-bit rounding only
    ids, reference = adapter_logits(adapter)
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "f16", dtype=torch.float16).eval()
    assert relative(logits_of(half, ids), reference) <= 2e-2


def test_chat_template_is_saved(adapter, tmp_path):
    """An SFT adapter's tokenizer carries the Vicuna template (training/run.py sets it); the merged model keeps it,
    rendering the same text, with its {% generation %} markers (transformers' own tag, for the training loss)
    made plain if-blocks: Jinja without that tag (llama.cpp's and other renderers of a merged model) refuses it."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # plain Jinja's parser, no tags added

    from longqlora.data.formats import apply_vicuna_template

    chat = tmp_path / "chat-adapter"
    shutil.copytree(adapter, chat, ignore=shutil.ignore_patterns("tiny-base", "checkpoint-*"))
    tokenizer = AutoTokenizer.from_pretrained(chat)
    apply_vicuna_template(tokenizer)
    tokenizer.save_pretrained(chat)
    report = merge(
        MergeConfig(adapter=str(chat), base=str(adapter / "tiny-base"), output=str(tmp_path / "m"), dtype="float32")
    )
    assert report["chat_template"] and report["check"]["passed"]
    merged_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    turns += [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Two and two?"}]
    for prompt in (False, True):
        ours, theirs = (
            t.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)
            for t in (merged_tokenizer, tokenizer)
        )
        assert ours == theirs and "ASSISTANT: Hello.</s>" in ours
    with pytest.raises(jinja2.TemplateSyntaxError, match="generation"):
        ImmutableSandboxedEnvironment().from_string(tokenizer.chat_template)
    ImmutableSandboxedEnvironment().from_string(merged_tokenizer.chat_template)


def test_overwrite_replaces_and_a_failed_check_writes_nothing(adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    merge(MergeConfig(adapter=str(adapter), output=str(out), dtype="float32", overwrite=True))
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    with pytest.raises(ValueError, match=r"^--tolerance 1e-12: the merged model's logits differ"):
        merge(MergeConfig(adapter=str(adapter), output=str(tmp_path / "strict"), dtype="float32", tolerance=1e-12))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # neither output nor temporary folder


def test_flags_parse():
    (cfg,) = HfArgumentParser(MergeConfig).parse_args_into_dataclasses(
        args=["--adapter", "a", "--output", "o", "--dtype", "bfloat16", "--overwrite", "--tolerance", "1e-3"]
    )
    assert (cfg.base, cfg.dtype, cfg.overwrite, cfg.resolved_tolerance, cfg.sample_tokens) == (
        None,
        "bfloat16",
        True,
        1e-3,
        64,
    )
    assert MergeConfig(adapter="a", output="o", dtype="bfloat16").resolved_tolerance == 5e-2
    for kwargs, flag in (
        ({"dtype": "int4"}, "--dtype"),
        ({"tolerance": 0.0}, "--tolerance"),
        ({"sample_tokens": 0}, "--sample_tokens"),
    ):
        with pytest.raises(ValueError, match=f"^{flag} "):
            MergeConfig(adapter="a", output="o", **kwargs)


@pytest.fixture
def no_weights(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", fail)
    monkeypatch.setattr("peft.PeftModel.from_pretrained", fail)


def refusal(adapter, tmp_path, case):
    """(config kwargs, expected message start) for one refusal case."""
    base = adapter / "tiny-base"
    if case == "no adapter dir":
        return {"adapter": str(tmp_path / "nope")}, f"--adapter {tmp_path / 'nope'}: no such directory"
    if case == "no adapter_config.json":
        return {"adapter": str(base)}, f"--adapter {base}: not a PEFT adapter directory"
    if case == "base missing":
        return {"base": str(tmp_path / "gone")}, f"--base {tmp_path / 'gone'}: no model directory"
    if case == "recorded base missing":
        moved = tmp_path / "moved"
        shutil.copytree(adapter, moved, ignore=shutil.ignore_patterns("tiny-base", "checkpoint-*"))
        config = json.loads((moved / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(tmp_path / "gone")
        (moved / "adapter_config.json").write_text(json.dumps(config))
        return {"adapter": str(moved)}, f"--adapter {moved}: its recorded base {tmp_path / 'gone'}: no model directory"
    if case == "output is base":
        return {"output": str(base)}, f"--output {base}: is, contains or lies inside the base directory"
    if case == "output inside base":
        return {"output": str(base / "merged")}, f"--output {base / 'merged'}: is, contains or lies inside the base"
    if case == "output contains adapter":
        return {
            "output": str(adapter.parent),
            "overwrite": True,
        }, f"--output {adapter.parent}: is, contains or lies inside the"
    if case == "output not empty":
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "x").write_text("x")
        return {"output": str(tmp_path / "full")}, f"--output {tmp_path / 'full'}: is not empty; pass --overwrite"
    if case == "hidden mismatch":
        other = save_tiny_model(tmp_path / "odd", shape="odd", max_position_embeddings=64)
        return {"base": str(other)}, (
            f"--base {other}: the adapter was trained on {base} (hidden 128) but {other} has hidden 192"
        )
    if case == "vocab mismatch":
        other = save_tiny_model(tmp_path / "v384", shape="gqa", vocab_size=384, max_position_embeddings=64)
        return {"base": str(other)}, f"--base {other}: the adapter was trained on {base} (vocab 320) but"
    if case == "layer mismatch":
        other = save_tiny_model(tmp_path / "l1", shape="gqa", max_position_embeddings=64, num_hidden_layers=1)
        return {"base": str(other)}, f"--base {other}: the adapter has model.layers.1."
    if case == "sample too long":
        return {"sample_tokens": 300}, "--sample_tokens 300: longer than the adapter's context 256"
    raise AssertionError(case)


CASES = [
    "no adapter dir",
    "no adapter_config.json",
    "base missing",
    "recorded base missing",
    "output is base",
    "output inside base",
    "output contains adapter",
    "output not empty",
    "hidden mismatch",
    "vocab mismatch",
    "layer mismatch",
    "sample too long",
]


@pytest.mark.parametrize("case", CASES)
def test_refusals_are_one_line_before_weights_load(adapter, tmp_path, case, no_weights):
    overrides, message = refusal(adapter, tmp_path, case)
    kwargs = {"adapter": str(adapter), "output": str(tmp_path / "merged"), **overrides}
    with pytest.raises(ValueError) as err:
        merge(MergeConfig(**kwargs))
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "merged").exists()


def hub_cached(adapter, tmp_path, monkeypatch, repo="acme/tiny-base"):
    """A copy of `adapter` whose recorded base is the hub id `repo`, and a Hugging Face cache (offline) that holds
    the tiny base as that repo's snapshot: what a recipe trained from a hub id leaves behind."""
    import huggingface_hub.constants as hub

    cache = tmp_path / "hub"
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("c0ffee" * 7)[:40]
    shutil.copytree(adapter / "tiny-base", snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(snapshot.name)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    moved = tmp_path / "adapter"
    shutil.copytree(adapter, moved, ignore=shutil.ignore_patterns("tiny-base", "checkpoint-*"))
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": repo}))
    return moved, snapshot


def test_a_recorded_hub_id_resolves_to_its_cached_snapshot(adapter, merged, tmp_path, monkeypatch):
    """The recipes train from hub ids, so PEFT records one: merge and the inference loader read its cached
    snapshot, and give what the same adapter gives on the local base."""
    from longqlora.evaluation.loading import model_dir

    moved, snapshot = hub_cached(adapter, tmp_path, monkeypatch)
    assert model_dir(None, str(moved)) == str(snapshot)
    ids, reference = adapter_logits(adapter)
    assert torch.equal(adapter_logits(moved)[1], reference)
    report = merge(MergeConfig(adapter=str(moved), output=str(tmp_path / "merged"), dtype="float32", sample_tokens=200))
    assert report["base"] == str(snapshot.resolve())
    hub_model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    local_model = AutoModelForCausalLM.from_pretrained(merged[1], dtype=torch.float32)
    assert torch.equal(logits_of(hub_model, ids), logits_of(local_model, ids))


def test_a_hub_id_not_in_the_cache_is_one_line(adapter, tmp_path, monkeypatch, no_weights):
    from longqlora.evaluation.loading import load_for_inference

    moved, _ = hub_cached(adapter, tmp_path, monkeypatch, repo="acme/tiny-base")
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "acme/absent"}))
    start = f"--adapter {moved}: its recorded base acme/absent: not in the local Hugging Face cache"
    for call in (
        lambda: merge(MergeConfig(adapter=str(moved), output=str(tmp_path / "m"))),
        lambda: load_for_inference(None, adapter=str(moved)),
    ):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value).startswith(start) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "m").exists()


def test_a_checkpoint_loads_with_its_extension(adapter):
    """Every checkpoint carries the run's extension record, so evaluating `checkpoint-N` applies the scaling it
    trained with: the last checkpoint (step 4 of 4) gives the final adapter's logits (without the record it would
    load on the base's own RoPE)."""
    from longqlora.record import ExtensionRecord

    last = adapter / "checkpoint-4"
    final, saved = ExtensionRecord.read(adapter), ExtensionRecord.read(last)
    assert saved is not None and saved.train == {"checkpoint_step": 4}
    for checkpoint in adapter.glob("checkpoint-*"):  # written before trainer_state.json, which marks it complete
        state = (checkpoint / "trainer_state.json").stat().st_mtime_ns
        assert (checkpoint / "longqlora_extension.json").stat().st_mtime_ns <= state
    assert (saved.target_context, saved.rope_type, saved.pi_factor) == (256, "yarn", 4)
    assert (saved.model, saved.s2_options, saved.lora) == (final.model, final.s2_options, final.lora)
    # the schedule 16 -> 48 -> 128 over 4 steps: steps 0-1 train 16, so checkpoint-2 records only that group
    assert final.s2_options["group_sizes"] == [16, 48, 128]
    assert ExtensionRecord.read(adapter / "checkpoint-2").s2_options["group_sizes"] == [16]
    ids, reference = adapter_logits(adapter)
    _, from_checkpoint = adapter_logits(last)
    assert torch.equal(from_checkpoint, reference)


def test_an_adapter_is_not_applied_again_to_the_model_it_was_merged_into(adapter, merged, tmp_path, no_weights):
    """The merged model has the adapter's shapes, so every tensor check passes; its merge_report.json names the
    adapter folded in, and loading that adapter on it again (merge, perplexity, passkey, chat) is one line, before
    any weights load. Another adapter on the merged model (training on top of it) is not refused."""
    _, out = merged
    with pytest.raises(ValueError) as err:
        merge(MergeConfig(adapter=str(adapter), base=str(out), output=str(tmp_path / "again")))
    assert str(err.value).startswith(f"--base {out}: {adapter} is merged into it already (merge_report.json)")
    assert "there is nothing to merge again" in str(err.value) and "drop --adapter" not in str(err.value)
    assert "\n" not in str(err.value) and not (tmp_path / "again").exists()
    with pytest.raises(ValueError, match=f"^--model {out}: .* is merged into it already .*; drop --adapter"):
        load_for_inference(str(out), adapter=str(adapter))
    other = tmp_path / "other"
    shutil.copytree(adapter, other, ignore=shutil.ignore_patterns("tiny-base", "checkpoint-*"))
    with pytest.raises(AssertionError, match="weights were loaded"):  # past the checks, to the weights
        load_for_inference(str(out), adapter=str(other))


def test_a_base_recorded_relative_to_the_runs_folder_is_found_from_elsewhere(adapter, tmp_path, monkeypatch, caplog):
    """PEFT records a local base as the run named it (`models/base`, relative to where the run started, and shaped
    like a hub id); evaluated or merged from another folder, the absolute path the extension record keeps is taken,
    else (a moved project) the nearest folder above the adapter that holds it, with a warning (before: no such
    directory, or a hub lookup). What resolves nowhere stays as recorded."""
    from longqlora.evaluation.loading import adapter_base, model_dir

    project = tmp_path / "project"
    run = project / "out" / "run"
    shutil.copytree(adapter, run, ignore=shutil.ignore_patterns("tiny-base", "checkpoint-*"))
    shutil.copytree(adapter / "tiny-base", project / "models" / "base")
    config = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "models/base"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    record = json.loads((run / "longqlora_extension.json").read_text())
    assert record["model_path"] == str(adapter / "tiny-base")  # the run's base, absolute
    record["model"] = "models/base"  # as the run named it, PEFT's record alike
    (run / "longqlora_extension.json").write_text(json.dumps(record))
    assert adapter_base("../project/out/run") == str(adapter / "tiny-base")
    (run / "longqlora_extension.json").write_text(json.dumps({**record, "model_path": str(tmp_path / "moved")}))
    assert adapter_base("../project/out/run") == str(project / "models" / "base")
    assert "its recorded base models/base taken as" in caplog.text
    assert model_dir(None, "../project/out/run") == str(project / "models" / "base")
    (run / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/missing"}))
    assert adapter_base(str(run)) == "org/missing"


def test_the_recorded_original_context_reaches_inference_and_merge(adapter, merged, tmp_path, caplog):
    """A base whose config.json overstates its pre-trained context (Mistral-7B-v0.1: 32768 said, 8192 trained) is
    extended with --original_context; the adapter records it, so on such a base (the tiny base, trained at 64,
    whose config now says 256) the loader and merge stretch RoPE as the run did: the logits and the merged
    config equal those of the honest base; told the config's own 256 instead, nothing is stretched."""
    base = tmp_path / "base"
    shutil.copytree(adapter / "tiny-base", base)
    config = json.loads((base / "config.json").read_text())
    assert config["max_position_embeddings"] == 64
    (base / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 256}))
    ids, reference = adapter_logits(adapter)

    def logits(**kwargs):
        model, _, info = load_for_inference(str(base), adapter=str(adapter), compute_dtype="float32", **kwargs)
        return info, logits_of(model, ids)

    info, recorded = logits()
    assert (info.original_context, info.pi_factor) == (64, 4) and torch.equal(recorded, reference)
    info, unstretched = logits(original_context=256)
    assert info.pi_factor == 1 and not torch.allclose(unstretched, reference, atol=1e-3)
    assert "--original_context 256: the adapter trained from 64 (its record)" in caplog.text
    out = tmp_path / "merged"
    merge(MergeConfig(adapter=str(adapter), base=str(base), output=str(out), dtype="float32", sample_tokens=200))
    ours, honest = (json.loads((d / "config.json").read_text()) for d in (out, merged[1]))
    assert ours["rope_parameters"] == honest["rope_parameters"]
    assert ours["max_position_embeddings"] == honest["max_position_embeddings"] == 256


def test_a_target_within_the_bases_own_rope_scaling_trains_and_merges(tmp_path, caplog):
    """A Llama-3.1-like base (llama3 RoPE x8: 16 pre-trained, 128 positions) trained at 96 tokens: the RoPE stays
    the model's own, the run says so (not "position interpolation x8"), and merge keeps its 128 positions (it
    stopped after all its work, expecting 96)."""
    from conftest import load_script

    from longqlora.cli import run_recipe
    from longqlora.data.corpora import book_path

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0}
    rope.update(high_freq_factor=4.0, original_max_position_embeddings=16)
    base = save_tiny_model(tmp_path / "llama3", max_position_embeddings=128, rope_parameters=rope)
    recipe = load_script("recipes/extend_7b_8k.py")
    flags = ["--model_name_or_path", str(base), "--target_context", "96", "--dataset", book_path("austen_persuasion")]
    flags += ["--compute_dtype", "float32", "--attn_backend", "sdpa", "--load_in_4bit", "false", "--use_cpu", "true"]
    flags += ["--max_steps", "1", "--save_steps", "1", "--optim", "adamw_torch", "--gradient_accumulation_steps", "1"]
    caplog.set_level("INFO", logger="longqlora")
    out = run_recipe(recipe.Model, recipe.Data, recipe.Training, argv=[*flags, "--output_dir", str(tmp_path / "a")])
    assert any("llama3 RoPE x8, the model's own" in r.getMessage() for r in caplog.records)
    report = merge(MergeConfig(adapter=str(out), output=str(tmp_path / "m"), dtype="float32", sample_tokens=64))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["max_position_embeddings"] == 128 and config["rope_parameters"]["factor"] == 8.0
    assert report["check"]["relative_diff"] < 1e-4, report["check"]


def test_the_default_dtype_is_the_bases_own(adapter, tmp_path):
    """--dtype auto (the default): the base's dtype as its config.json names it (a float32 base merged into float16
    lost precision for nothing; a bfloat16 one, Llama 3's or Qwen's, may overflow in float16), float16 where it
    names none."""
    from longqlora.merge import _saved_dtype

    report = merge(MergeConfig(adapter=str(adapter), output=str(tmp_path / "m"), sample_tokens=64))
    base = Path(report["base"])
    assert report["dtype"] == _saved_dtype(base) == json.loads((base / "config.json").read_text())["dtype"]
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {f"torch.{report['dtype']}"}
    for saved, expected in (
        ({"dtype": "bfloat16"}, "bfloat16"),
        ({"torch_dtype": "float16"}, "float16"),
        ({}, "float16"),
    ):
        (tmp_path / "c").mkdir(exist_ok=True)
        (tmp_path / "c" / "config.json").write_text(json.dumps(saved))
        assert _saved_dtype(tmp_path / "c") == expected
