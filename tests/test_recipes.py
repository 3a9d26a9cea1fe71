"""Every recipe: --help, --dry_run and a tiny end-to-end run on CPU; resume after an interruption."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from conftest import load_script
from safetensors.torch import load_file

from longqlora.cli import run_recipe
from longqlora.record import EXTENSION_FILE
from longqlora.training import callbacks as train_callbacks

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.py") if p.stem != "quickstart")


def load_recipe(name):
    return load_script(f"recipes/{name}.py")


def run(name, *argv):
    recipe = load_recipe(name)
    return run_recipe(recipe.Model, recipe.Data, recipe.Training, argv=list(argv))


def test_recipes_exist():
    assert {
        "extend_7b_8k",
        "extend_7b_12k",
        "extend_13b_8k",
        "extend_13b_12k",
        "extend_7b_32k_a100",
        "sft_vicuna_13b_8k",
    } <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES + ["quickstart"])
def test_help(name, capsys):
    """Every recipe's --help, parsed in this process (a fresh interpreter per recipe spends ~8 s importing)."""
    recipe = load_recipe(name)
    with pytest.raises(SystemExit) as done:
        recipe.main(recipe.Quickstart, ["--help"]) if name == "quickstart" else run(name, "--help")
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--output_dir" in text and "--dry_run" in text and "--tiny" in text
    assert "--config FILE.yaml: flag defaults from a YAML file" in text  # read before the parser, listed all the same
    if name == "quickstart":  # every flag says what it is (argparse shows a default only beside a help text)
        from trl import TrlParser

        from longqlora.cli import with_parent_help

        parser = TrlParser((with_parent_help(recipe.Quickstart),))
        assert [a.dest for a in parser._actions if a.option_strings and not a.help] == []
    if name != "quickstart":  # a field the recipe re-declares keeps its help, with the recipe's value as default
        recipe = load_recipe(name)
        flat = " ".join(text.split())
        for value in (recipe.Model.target_context, recipe.Training.max_steps, recipe.Training.learning_rate):
            assert f"(default: {value})" in flat
        assert "Context length to extend to" in flat
        # its own flags first, then SFTConfig's and TrainingArguments' (~500 of them), a refused one saying why
        ours, theirs = flat.split("TRL's SFTConfig and transformers' TrainingArguments:")
        assert "--offload_activations" in ours and "--eval_max_rows" in ours and "--dataset " in ours
        assert "--adam_beta1" in theirs and "--packing" not in ours
        assert "--packing [PACKING] Not taken by a recipe: a run sets it from --pack." in theirs
        assert text.splitlines()[0].endswith(".py [--flag value ...] [--config FILE.yaml] [--help]")  # one line


@pytest.mark.parametrize("name", ["extend_7b_8k", "quickstart"])
def test_help_as_a_script(name):
    """`python recipes/<name>.py --help` as a user types it: a recipe and the quickstart (the other recipes share
    the first's code path)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / f"{name}.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "--output_dir" in out.stdout and "--dry_run" in out.stdout and "--tiny" in out.stdout


@pytest.mark.parametrize("name", RECIPES)
def test_dry_run_prints_the_resolved_plan_without_weights(name, capsys, monkeypatch):
    monkeypatch.setattr(
        "transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("--dry_run loaded weights")
    )
    recipe = load_recipe(name)
    assert run(name, "--dry_run") is None
    text = capsys.readouterr().out
    target = recipe.Model.target_context
    assert f"4096 -> {target} tokens (YaRN x{target / 4096:g}, rope yarn)" in text
    sizes = [round(m * recipe.Model.group_ratio * target) for m in recipe.Model().group_schedule]
    assert f"S2-Attn, group {' -> '.join(map(str, sizes))}" in text
    assert "trainable" in text and "parameters" in text and "backend" in text
    assert recipe.Model.compute_dtype in text


def test_dry_run_shows_the_s2_schedule(capsys):
    run("extend_7b_8k", "--dry_run", "--s2_group_schedule", "0.25,0.75,2", "--s2_full_every", "4")
    assert "S2-Attn, group 512 -> 1536 -> 4096 (equal shares of the steps), 1 step in 4 full" in capsys.readouterr().out


def test_dry_run_over_an_earlier_run_still_shows_the_plan(tmp_path, capsys, caplog):
    """The docstrings' --dry_run after their training command: the output directory holds that run's checkpoints,
    which a new run refuses; the dry run shows the plan and says what the run would do."""
    out = tmp_path / "llama2-7b-8k"
    (out / "checkpoint-3").mkdir(parents=True)
    assert run("extend_7b_8k", "--dry_run", "--output_dir", str(out)) is None
    assert "4096 -> 8192 tokens" in capsys.readouterr().out
    assert any("the run itself would stop here: --output_dir" in r.getMessage() for r in caplog.records)
    with pytest.raises(SystemExit) as ended:
        run("extend_7b_8k", "--output_dir", str(out), "--max_steps", "1")
    assert ended.value.code == 2 and "holds an earlier run's checkpoints" in capsys.readouterr().err


def test_dry_run_says_when_the_data_cannot_be_read(tmp_path, capsys, caplog):
    """--dry_run shows the plan and warns that the run would stop at a missing --dataset or at an --eval_dataset
    that is the training data (the data may live on the machine that trains)."""
    held_out = tmp_path / "held.txt"
    held_out.write_text("held-out text")
    for flags, said in (
        (["--dataset", str(tmp_path / "missing.txt")], f"--dataset {tmp_path / 'missing.txt'}: no such file"),
        (["--dataset", str(held_out), "--eval_dataset", str(held_out)], "the training data itself (split train)"),
        (  # a file of the training folder: named as the held-out flag (the data layer's --dataset is renamed)
            ["--dataset", str(tmp_path), "--eval_dataset", str(held_out)],
            f"--eval_dataset {held_out}: the training data ({tmp_path}) holds it too",
        ),
    ):
        assert run("extend_7b_8k", "--dry_run", "--output_dir", str(tmp_path / "o"), *flags) is None
        assert "4096 -> 8192 tokens" in capsys.readouterr().out
        assert any(said in r.getMessage() and "run itself would stop" in r.getMessage() for r in caplog.records)
        caplog.clear()


def test_dry_run_says_which_pre_trained_context_it_took(capsys):
    """Mistral-7B-v0.1's config says 32768 tokens, it was trained at 8192: at 32k nothing is stretched unless
    --original_context says so, and the dry run says which context it took."""
    run("extend_7b_8k", "--dry_run", "--model_name_or_path", "mistral-7b", "--target_context", "32768")
    text = capsys.readouterr().out
    assert "32768 -> 32768 tokens (no RoPE scaling, rope default); config.json's max_position_embeddings" in text
    assert "--original_context N if the model was trained on fewer" in text
    run("extend_7b_8k", "--dry_run", "--model_name_or_path", "mistral-7b", "--target_context", "32768",
        "--original_context", "8192")  # fmt: skip
    text = capsys.readouterr().out
    assert "8192 -> 32768 tokens (YaRN x4, rope yarn)" in text and "--original_context N" not in text


def test_dry_run_trainable_count_is_exact_for_llama2_7b(capsys):
    run("extend_7b_8k", "--dry_run")
    text = capsys.readouterr().out
    lora = 32 * 4 * 8 * (4096 + 4096)  # r=8 on q, k, v, o of 32 layers
    embed, norms = 32000 * 4096, (2 * 32 + 1) * 4096
    assert f"trainable          {lora + embed + norms:,} of" in text


@pytest.mark.parametrize("name", RECIPES)
def test_tiny_run_end_to_end(name, tmp_path, caplog):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    caplog.set_level(logging.INFO, logger="longqlora")
    out = run(name, "--tiny", "--output_dir", str(tmp_path / name))
    resolved = [r.getMessage() for r in caplog.records if r.name == "longqlora.rope"]
    assert len(resolved) == 1, resolved  # the model config is read, checked and interpolated once per run
    weights = load_file(out / "adapter_model.safetensors")
    names = list(weights)
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert any("embed_tokens" in n for n in names), "trained embeddings missing from the adapter"
    assert sum("layernorm" in n or n.endswith("norm.weight") for n in names) == 2 * 2 + 1, "norms missing"
    extension = (out / EXTENSION_FILE).read_text()
    assert '"pi_factor": 4.0' in extension
    # the groups trained (the default schedule 0.25, 0.75, 2 x 1/4 of 256 tokens), not one nominal group
    assert json.loads(extension)["s2_options"]["group_sizes"] == [16, 48, 128]
    assert (out / "tokenizer.json").exists()
    base = AutoModelForCausalLM.from_pretrained(out / "tiny-base")
    embed_before = base.get_input_embeddings().weight.detach().clone()
    model = PeftModel.from_pretrained(base, out)
    trained = [w for n, w in weights.items() if "embed_tokens" in n][0]
    assert not torch.allclose(trained.float(), embed_before), "embeddings did not train"
    torch.testing.assert_close(model.get_input_embeddings().weight.detach(), trained.float())
    assert model.peft_config["default"].base_model_name_or_path == str(out / "tiny-base")


class Interrupt(Exception):
    pass


def test_resume_after_interruption_ends_at_the_same_weights(tmp_path, monkeypatch, caplog, capsys):
    steps = ["--max_steps", "4", "--save_steps", "2", "--seed", "3"]
    whole = run("extend_7b_8k", "--tiny", "--output_dir", str(tmp_path / "whole"), *steps)
    # The seeded tiny run is pinned: data, model, LoRA initialisation and training order are all fixed by --seed, so
    # any change of behaviour (not of speed) shows here. 5.75868 measured on this project's CPU, torch 2.13.
    record = json.loads((whole / EXTENSION_FILE).read_text())
    assert record["train"]["mean_loss"] == pytest.approx(5.75868, rel=1e-4)  # seed 4: 5.74907

    def stop_at_three(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise Interrupt

    monkeypatch.setattr(train_callbacks.ThroughputCallback, "on_step_end", stop_at_three, raising=False)
    cut = tmp_path / "cut"
    with pytest.raises(Interrupt):
        run("extend_7b_8k", "--tiny", "--output_dir", str(cut), *steps)
    assert (cut / "checkpoint-2").exists() and not (cut / "adapter_model.safetensors").exists()
    monkeypatch.undo()
    resumed = run("extend_7b_8k", "--tiny", "--output_dir", str(cut), *steps, "--resume_from_checkpoint", "auto")
    a, b = load_file(whole / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    # resumed with another --max_steps, its learning rate and S2 schedule follow the new count: said
    shutil.copytree(cut / "checkpoint-2", tmp_path / "longer" / "checkpoint-2")
    caplog.set_level(logging.WARNING, logger="longqlora")
    short = ["--max_steps", "3", "--save_steps", "2", "--seed", "3", "--resume_from_checkpoint", "auto"]
    run("extend_7b_8k", "--tiny", "--output_dir", str(tmp_path / "longer"), *short)
    said = [r.getMessage() for r in caplog.records if "is of a run set for 4 steps" in r.getMessage()]
    assert len(said) == 1 and "this one has --max_steps 3" in said[0]
    # resumed with another S2 schedule, its first steps would have trained otherwise than the record says: refused
    shutil.copytree(cut / "checkpoint-2", tmp_path / "other" / "checkpoint-2")
    with pytest.raises(SystemExit) as ended:
        run("extend_7b_8k", "--tiny", "--output_dir", str(tmp_path / "other"), *steps, "--s2_group_schedule", "none",
            "--resume_from_checkpoint", "auto")  # fmt: skip
    assert ended.value.code == 2 and not (tmp_path / "other" / "adapter_model.safetensors").exists()
    assert "written by a run with --s2_group_schedule 0.25,0.75,2, this run has none" in capsys.readouterr().err


def test_documents_shorter_than_the_pre_trained_context_are_warned_of(tmp_path, caplog):
    """With --pack documents nothing attends across documents: when none is longer than the pre-trained context
    (the tiny base's 128 tokens), the extension is not trained, and the run says so; --pack concat trains it."""
    data = tmp_path / "short.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"A short note, number {i}, on a small matter."}) + "\n" for i in range(200))
    )
    from longqlora.training.tiny import save_tiny_model

    base = save_tiny_model(tmp_path / "base")
    caplog.set_level(logging.WARNING, logger="longqlora")
    for pack, warned in (("documents", True), ("concat", False)):
        flags = ["--model_name_or_path", str(base), "--target_context", "256", "--compute_dtype", "float32"]
        flags += ["--dataset", str(data), "--pack", pack, "--output_dir", str(tmp_path / pack)]
        run("extend_7b_8k", *flags, "--max_steps", "1", "--gradient_accumulation_steps", "1", "--optim", "adamw_torch")
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("no document is longer than")]
        assert bool(said) == warned and (not said or "the pre-trained context 128" in said[0])
        caplog.clear()


def test_an_evaluation_set_is_scored_at_full_context_with_full_attention(tmp_path):
    """--eval_dataset: held-out text read and packed as --dataset is and scored every --save_steps in eval mode
    (full attention); the last evaluation equals the final adapter's mean loss over the same rows of the target
    context, computed apart (the tiny run: NF4, x4 to 256 tokens, S2-Attn in training)."""
    from longqlora.data.corpora import book
    from longqlora.evaluation.loading import load_for_inference

    held_out = tmp_path / "held_out.txt"
    held_out.write_text(book("austen_emma")[20000:26000])
    out = run("extend_7b_8k", "--tiny", "--pack", "concat", "--eval_dataset", str(held_out), "--output_dir",
              str(tmp_path / "run"))  # fmt: skip
    record = json.loads((out / EXTENSION_FILE).read_text())
    history = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "eval_loss" in h] == [2, 4]  # every --save_steps (2 in a tiny run)
    model, tokenizer, _ = load_for_inference(None, adapter=str(out), load_in_4bit=True, compute_dtype="float32")
    stream = tokenizer(held_out.read_text())["input_ids"] + [tokenizer.eos_token_id]
    rows = torch.tensor(stream[: len(stream) // 256 * 256]).view(-1, 256)
    assert record["data"]["eval"]["rows"] == len(rows) > 8 and record["data"]["eval"]["rows_scored"] == 8  # --tiny's
    rows = rows[:8]
    assert (record["data"]["eval"]["dataset"], record["data"]["eval"]["split"]) == (str(held_out), "train")
    with torch.no_grad():
        apart = sum(float(model(input_ids=r[None], labels=r[None]).loss) for r in rows) / len(rows)
    assert record["train"]["eval_loss"] == pytest.approx(apart, rel=1e-3)
    # a run killed as it saved its final adapter resumes at its last checkpoint and scores the held-out set there
    # (here another one: the checkpoint's own score is of the first)
    shutil.copytree(out / "checkpoint-4", tmp_path / "ended" / "checkpoint-4")
    other = tmp_path / "other_held_out.txt"
    other.write_text(book("austen_persuasion")[30000:36000])
    ended = run("extend_7b_8k", "--tiny", "--pack", "concat", "--eval_dataset", str(other), "--output_dir",
                str(tmp_path / "ended"), "--resume_from_checkpoint", "auto", "--eval_max_rows", "2")  # fmt: skip
    again = json.loads((ended / EXTENSION_FILE).read_text())
    assert again["train"]["eval_step"] == 4 and again["train"]["eval_loss"] != record["train"]["eval_loss"]
    # --eval_max_rows 2: the first two rows of the held-out set, scored by the same weights
    assert again["data"]["eval"]["rows_scored"] == 2 < again["data"]["eval"]["rows"]
    stream = tokenizer(other.read_text())["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        first = [torch.tensor(stream[i * 256 : (i + 1) * 256]) for i in range(2)]
        apart = sum(float(model(input_ids=r[None], labels=r[None]).loss) for r in first) / 2
    assert again["train"]["eval_loss"] == pytest.approx(apart, rel=1e-3)
    # evaluating takes nothing from the training: the run without it ends at the same adapter, bit for bit
    plain = run("extend_7b_8k", "--tiny", "--pack", "concat", "--output_dir", str(tmp_path / "plain"))
    a, b = load_file(out / "adapter_model.safetensors"), load_file(plain / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_max_rows_counts_the_packed_rows_of_one_long_document(tmp_path):
    """--eval_max_rows (--tiny: 8) keeps rows as TRL packed them (--pack documents): a held-out book is one
    document, which selecting before packing kept whole (its ~2,000 rows were scored at every evaluation)."""
    from longqlora.data.corpora import book

    held_out = tmp_path / "held_out.txt"
    held_out.write_text(book("austen_emma")[:60000])
    out = run("extend_7b_8k", "--tiny", "--eval_dataset", str(held_out), "--max_steps", "2",
              "--output_dir", str(tmp_path / "run"))  # fmt: skip
    record = json.loads((out / EXTENSION_FILE).read_text())
    assert record["data"]["eval"]["documents_out"] == 1 and record["data"]["eval"]["rows_scored"] == 8
    history = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    (scored,) = [h for h in history if "eval_loss" in h]
    assert scored["eval_runtime"] * scored["eval_steps_per_second"] == pytest.approx(8, rel=0.05)


def test_evaluation_schedule_and_errors_name_the_evaluation_set(tmp_path, capsys):
    """--eval_strategy steps without --eval_steps evaluates every --save_steps (transformers would fill in
    --logging_steps, every step here); a problem with the held-out data names --eval_dataset, before loading."""
    from longqlora.data.text import TextDataConfig
    from longqlora.model import ModelConfig
    from longqlora.training.config import TrainingConfig
    from longqlora.training.held_out import evaluation_settings as _evaluation

    model = ModelConfig(model_name_or_path="m", target_context=8192)
    data = TextDataConfig("d", eval_dataset="e")
    for flags, steps in (
        ({}, 100),
        ({"eval_strategy": "steps"}, 100),
        ({"eval_strategy": "steps", "eval_steps": 30}, 30),
        ({"eval_strategy": "steps", "eval_steps": 1}, 1),  # --logging_steps' value, set: kept
        ({"eval_steps": 1}, 1),
    ):
        training = TrainingConfig(output_dir=str(tmp_path / "o"), save_steps=100, logging_steps=1, **flags)
        settled = {**vars(training), **_evaluation(model, data, training)}
        assert settled["eval_steps"] == steps and settled["eval_strategy"] == "steps"
    # an explicit --eval_strategy no is kept (the default, unset, evaluates): the held-out set is only checked
    off = TrainingConfig(output_dir=str(tmp_path / "o"), eval_strategy="no")
    assert _evaluation(model, data, off) == {"eval_strategy": "no"}
    assert _evaluation(model, TextDataConfig("d"), TrainingConfig(output_dir=str(tmp_path / "o"))) == {
        "eval_strategy": "no"
    }
    short = tmp_path / "short.txt"
    short.write_text("Too short to fill a row.")
    with pytest.raises(SystemExit) as ended:
        run("extend_7b_8k", "--tiny", "--eval_dataset", str(short), "--output_dir", str(tmp_path / "run"))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert ended.value.code == 2 and last.startswith(f"error: --eval_dataset {short} holds "), last
    chats = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x"]})})
    chats.save_to_disk(tmp_path / "dict")
    with pytest.raises(SystemExit) as ended:  # the held-out split named by --eval_split, not --split
        run("extend_7b_8k", "--tiny", "--eval_dataset", str(tmp_path / "dict"), "--eval_split", "dev",
            "--output_dir", str(tmp_path / "run"))  # fmt: skip
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"error: --eval_split dev: {tmp_path / 'dict'} has splits train; pass --eval_split", last


def test_held_out_conversations_are_scored_on_their_replies(tmp_path):
    """The SFT recipe's --eval_dataset: conversations read and checked as --dataset is, scored every --save_steps
    (2 in a tiny run), the last score kept in the adapter's record."""
    chats = tmp_path / "held_out.jsonl"
    turn = [{"role": "user", "content": "How was the weather in the village today?"}]
    turn += [{"role": "assistant", "content": "It rained all morning and cleared by noon."}]
    chats.write_text("".join(json.dumps({"messages": turn}) + "\n" for _ in range(6)))
    out = run("sft_vicuna_13b_8k", "--tiny", "--eval_dataset", str(chats), "--output_dir", str(tmp_path / "run"))
    history = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    evals = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4] and all(h["eval_loss"] > 0 for h in evals)
    record = json.loads((out / EXTENSION_FILE).read_text())
    assert record["train"]["eval_loss"] == evals[-1]["eval_loss"] and record["data"]["eval"]["count_out"] == 6


def test_bad_input_is_one_line(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "recipes" / "extend_7b_8k.py"),
            "--model_name_or_path",
            str(tmp_path / "nowhere"),
            "--output_dir",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: --model_name_or_path")
    assert "Traceback" not in out.stderr


def test_rope_scaling_linear_trains_records_and_reloads_as_linear(tmp_path):
    """--rope_scaling linear (position interpolation, the papers' choice; the default is yarn) is recorded in the
    adapter, and inference follows the record, not the default."""
    from longqlora.evaluation.loading import load_for_inference

    argv = ["--tiny", "--output_dir", str(tmp_path / "pi"), "--rope_scaling", "linear", "--max_steps", "2"]
    out = run("extend_7b_8k", *argv)
    assert json.loads((out / EXTENSION_FILE).read_text())["rope_type"] == "linear"
    model, tokenizer, info = load_for_inference(None, adapter=str(out))
    assert info.rope_type == "linear" and model.config.rope_parameters["rope_type"] == "linear"
    assert info.scaling == "position interpolation x4"
    ids = torch.arange(5, 5 + 200)[None] % model.config.vocab_size
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        yarn = load_for_inference(None, adapter=str(out), rope_scaling="yarn")[0]
        assert yarn.config.rope_parameters["rope_type"] == "yarn"
        # the recorded type matters: the same adapter under YaRN gives other logits
        assert (logits - yarn(input_ids=ids).logits).abs().max() > 1e-3


def test_tensorboard_when_asked(tmp_path):
    out = run(
        "extend_7b_8k", "--tiny", "--output_dir", str(tmp_path / "tb"), "--report_to", "tensorboard", "--max_steps", "2"
    )
    events = list(out.rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert events[0].relative_to(out).parts[0] == "runs"  # where the run's last line points tensorboard
    # tokens/s and peak memory reach TensorBoard and the log history, not transformers' or TRL's second counters
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert {"train/tokens_per_second", "train/peak_memory_gib"} <= set(tags), tags
    assert not {"train/train_tokens_per_second", "train/num_tokens"} & set(tags), tags
    history = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    assert all(h["tokens_per_second"] > 0 and h["peak_memory_gib"] > 0 for h in history if "loss" in h)


def test_throughput_counts_training_steps_only(monkeypatch):
    """tokens/s divides the tokens since the previous line by the time spent in training steps: an evaluation or a
    checkpoint save between two steps (here 3 of the 4 seconds) does not count."""
    from types import SimpleNamespace

    clock = iter([0.0, 0.5, 3.5, 4.0])  # step 1 begins, ends; 3 s of saving; step 2 begins, ends
    monkeypatch.setattr(train_callbacks.time, "perf_counter", lambda: next(clock))
    callback = train_callbacks.ThroughputCallback()
    state = SimpleNamespace(num_input_tokens_seen=100, log_history=[])
    callback.on_train_begin(None, state, None)
    for _ in range(2):
        callback.on_step_begin(None, state, None)
        state.num_input_tokens_seen += 500
        callback.on_step_end(None, state, None)
    logs = {"loss": 1.0, "train_tokens_per_second": 250.0, "num_tokens": 7}
    state.log_history.append({**logs, "step": 2})
    callback.on_log(None, state, None, logs=logs)
    assert logs["tokens_per_second"] == 1000.0 and "train_tokens_per_second" not in logs and "num_tokens" not in logs
    assert state.log_history[-1] == {
        "loss": 1.0,
        "step": 2,
        **{k: logs[k] for k in ("tokens_per_second", "peak_memory_gib")},
    }


def test_quickstart_dry_run_shows_the_groups_it_trains():
    from longqlora.model import ModelConfig

    out = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "quickstart.py"), "--dry_run"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    sizes = ModelConfig(model_name_or_path="-", target_context=512).group_sizes  # the quickstart: 128 -> 512
    assert out.returncode == 0 and f"S2-Attn group {' -> '.join(map(str, sizes))} over" in out.stdout, out.stderr
    assert "1200 copy + 400 text steps" in out.stdout and out.stdout.strip().endswith("output out/quickstart")
    tiny = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "quickstart.py"), "--dry_run", "--tiny"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    # a smoke run without --output_dir never writes over the real run's results (it did: out/quickstart)
    assert tiny.returncode == 0 and tiny.stdout.strip().endswith("output out/quickstart-tiny"), tiny.stderr


@pytest.mark.parametrize(
    "argv, on",
    [
        ([], True),
        (["--activation_checkpointing"], True),
        (["--no_activation_checkpointing"], False),
        (["--activation_checkpointing", "false"], False),
        (["--gradient_checkpointing"], True),  # transformers 5's deprecated name, still every form of it
        (["--no_gradient_checkpointing"], False),
        (["--gradient_checkpointing", "false"], False),
    ],
)
def test_checkpointing_flags_under_either_name(argv, on, recwarn):
    """Activation checkpointing is on by default, non-reentrant, and every form of either name's flag turns it on or
    off; the default run gives no deprecation warning."""
    from trl import TrlParser

    from longqlora.training.config import RunConfig

    recipe = load_recipe("extend_7b_8k")
    parser = TrlParser((recipe.Model, recipe.Data, RunConfig, recipe.Training))
    training = parser.parse_args_and_config([*argv, "--output_dir", "out/x"])[3]
    assert training.activation_checkpointing is on and training.gradient_checkpointing is on
    assert training.activation_checkpointing_kwargs == {"use_reentrant": False}
    if not argv:
        assert not [w for w in recwarn if "checkpointing" in str(w.message)]


@pytest.mark.parametrize("argv, shape", [([], (1, 2)), (["--gradient_accumulation_steps", "4"], (1, 4))])
def test_tiny_keeps_the_batch_shape_set_on_the_command_line(argv, shape, tmp_path):
    """--tiny scales the recipe's batch 1 x accumulation 16 down to 1 x 2, but keeps a value the user set: one process
    with accumulation 4 then reads the rows of 2 processes x 2 (what tests/test_distributed.py compares)."""
    from trl import TrlParser

    from longqlora.training.config import RunConfig
    from longqlora.training.tiny import tiny_overrides

    recipe = load_recipe("extend_7b_8k")
    parser = TrlParser((recipe.Model, recipe.Data, RunConfig, recipe.Training))
    model, data, _, training = parser.parse_args_and_config([*argv, "--output_dir", str(tmp_path)])
    training = tiny_overrides(model, data, training)[2]
    assert (training.per_device_train_batch_size, training.gradient_accumulation_steps) == shape


def test_tiny_says_which_of_the_users_values_it_replaces(tmp_path, caplog):
    """--tiny replaces the context, steps and learning rate; values the user set among them are named in one warning,
    the recipe's own defaults are not."""
    import logging

    from trl import TrlParser

    from longqlora.training.config import RunConfig
    from longqlora.training.tiny import tiny_overrides

    recipe = load_recipe("extend_7b_8k")
    parser = TrlParser((recipe.Model, recipe.Data, RunConfig, recipe.Training))
    for argv, said in (
        ([], None),
        (["--target_context", "250", "--max_steps", "6"], "--target_context 250 -> 256, --max_steps 6 -> 4"),
    ):
        caplog.clear()
        model, data, _, training = parser.parse_args_and_config([*argv, "--output_dir", str(tmp_path)])
        with caplog.at_level(logging.WARNING, logger="longqlora.training.tiny"):
            tiny_overrides(model, data, training)
        warned = [r.getMessage() for r in caplog.records if "--tiny replaces" in r.getMessage()]
        assert warned == ([] if said is None else [f"--tiny replaces what was set: {said}"])


def test_a_tiny_run_without_output_dir_keeps_out_of_the_real_runs_folder(tmp_path, monkeypatch):
    """--tiny without --output_dir writes to the recipe's folder + '-tiny': a smoke run never leaves checkpoints
    where the real run would then refuse to start."""
    from trl import TrlParser

    from longqlora.training.config import RunConfig
    from longqlora.training.run import resolve

    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("extend_7b_8k")
    parser = TrlParser((recipe.Model, recipe.Data, RunConfig, recipe.Training))
    default = recipe.Training().output_dir
    for argv, expected in ((["--tiny"], f"{default}-tiny"), (["--tiny", "--output_dir", "mine"], "mine")):
        model, data, run_cfg, training = parser.parse_args_and_config(argv)
        assert resolve(model, data, run_cfg, training).training.output_dir == expected
    assert (tmp_path / f"{default}-tiny" / "tiny-base" / "config.json").is_file() and not (tmp_path / default).exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's settings")
def test_a_cpu_run_pins_no_batches(tmp_path, tiny_adapter):
    """Pinned batches only help a copy to a GPU; without one, torch warns at every DataLoader (the Trainer's
    default pins)."""
    from longqlora.data.text import TextDataConfig
    from longqlora.model import ModelConfig
    from longqlora.training.config import RunConfig, TrainingConfig
    from longqlora.training.run import resolve

    training = TrainingConfig(output_dir=str(tmp_path / "o"))
    assert training.dataloader_pin_memory
    model = ModelConfig(model_name_or_path=str(tiny_adapter / "tiny-base"), target_context=256, compute_dtype="float32")
    run = resolve(model, TextDataConfig("austen_persuasion"), RunConfig(), training)
    assert run.training.dataloader_pin_memory is False


@pytest.mark.parametrize(
    "flags,said",
    [
        (["--dataset_kwargs", '{"skip_prepare_dataset": true}'], "--dataset_kwargs {'skip_prepare_dataset': True}: a"),
        (
            ["--load_best_model_at_end", "true", "--eval_strategy", "steps", "--eval_steps", "2", "--save_steps", "2"],
            "--load_best_model_at_end True: the adapter a run writes",
        ),
        (["--activation_offloading", "true"], "--activation_offloading True: the toolkit offloads with"),
        (["--padding_free", "true"], "--padding_free True: a run sets it from --pack"),
        (["--assistant_only_loss", "false"], "--assistant_only_loss False: conversations train on the replies only"),
        (["--assistant_only_loss"], "--assistant_only_loss True: conversations train on the replies only"),
        (["--dataset_text_field", "body"], "--dataset_text_field body: a text --dataset names its field with"),
        (["--include_num_input_tokens_seen", "no"], "--include_num_input_tokens_seen no: the run's tokens/s"),
        (["--chat_template_path", "CHAT"], "--chat_template_path CHAT: text data trains no conversations"),
        (["--push_to_hub", "true"], "--push_to_hub True: the Trainer would push its checkpoints"),
        (["--model_init_kwargs", '{"dtype": "float16"}'], "--model_init_kwargs {'dtype': 'float16'}: the model loads"),
    ],
)
def test_flags_a_run_would_overrule_are_refused_before_loading(tmp_path, capsys, monkeypatch, flags, said):
    """SFTConfig flags that the run sets itself, or that would train otherwise than the run reports (whole uncut
    documents, the best checkpoint's weights under the last step's record, no token count): one line, exit 2."""
    import longqlora.model

    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}")
    flags = [str(template) if f == "CHAT" else f for f in flags]
    monkeypatch.setattr(longqlora.model, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(SystemExit) as ended:
        run("extend_7b_8k", "--tiny", "--output_dir", str(tmp_path / "out"), *flags)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert ended.value.code == 2 and last.startswith("error: " + said.replace("CHAT", str(template))), last
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_a_precision_flag_that_disagrees_with_compute_dtype_is_refused(tmp_path):
    import re

    from longqlora.training.config import TrainingConfig, refuse_flags_the_run_sets

    out = str(tmp_path / "o")
    refuse_flags_the_run_sets(TrainingConfig(output_dir=out, bf16=True, use_cpu=True), True, "bfloat16")
    for flags, dtype, said in (
        ({"bf16": True}, "float16", "--bf16 true: the precision follows --compute_dtype (float16 here)"),
        ({"fp16": True}, "bfloat16", "--fp16 true: the precision follows --compute_dtype (bfloat16 here)"),
    ):
        with pytest.raises(ValueError, match=re.escape(said)):
            refuse_flags_the_run_sets(TrainingConfig(output_dir=out, use_cpu=True, **flags), True, dtype)


def test_resuming_a_weights_only_checkpoint_says_the_optimizer_starts_anew(tmp_path, caplog, capsys):
    out = tmp_path / "run"
    run("extend_7b_8k", "--tiny", "--output_dir", str(out), "--max_steps", "2", "--save_only_model", "true")
    assert not (out / "checkpoint-2" / "optimizer.pt").exists()
    with pytest.raises(SystemExit):  # run again as it was: the run is finished, not to be continued as it is
        run("extend_7b_8k", "--tiny", "--output_dir", str(out), "--max_steps", "2")
    assert "holds a finished run (its adapter and 1 checkpoints): choose another" in capsys.readouterr().err
    caplog.set_level(logging.WARNING, logger="longqlora")
    flags = ["--max_steps", "3", "--save_only_model", "true", "--resume_from_checkpoint", "auto"]
    run("extend_7b_8k", "--tiny", "--output_dir", str(out), *flags)
    said = [r.getMessage() for r in caplog.records if "holds no optimizer state" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(str(out / "checkpoint-2")), said


@pytest.mark.slow  # a recipe run as a process, about 10 s
def test_a_tiny_run_as_a_script_writes_log_lines_apart_from_its_progress_bar(tmp_path):
    """`python recipes/extend_7b_8k.py --tiny` as a user runs it: every log line written during training starts a
    line of its own (one ended up glued to the end of the progress bar), and no DeepSpeed CPU warning."""
    import re

    done = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "extend_7b_8k.py"), "--tiny", "--output_dir", str(tmp_path / "a")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    pieces = re.split(r"[\r\n]", done.stderr)
    bar_end = re.compile(r"(it/s|s/it)\]")  # tqdm's rate: iterations per second, or seconds per iteration
    glued = [p for p in pieces if bar_end.search(p) and p[bar_end.search(p).end() :].strip()]
    assert not glued, glued
    assert "Setting accelerator to CPU" not in done.stdout + done.stderr


def test_the_last_line_names_the_adapter_and_the_next_commands(tmp_path):
    from longqlora.training.summary import written

    text = written(tmp_path / "out", ["tensorboard"])
    assert text.splitlines()[0] == f"adapter written to {(tmp_path / 'out').resolve()}; next:"
    assert f"python -m longqlora merge --adapter {(tmp_path / 'out').resolve()} --output" in text
    assert text.splitlines()[-1].endswith(f"--logdir {(tmp_path / 'out').resolve() / 'runs'}")
    assert "tensorboard" not in written(tmp_path / "out", ["none"]) and " chat " not in text
    assert written(tmp_path / "out", [], True).splitlines()[1].strip().startswith("python -m longqlora chat --adapter")


def test_yaml_words_and_lists_are_read_as_the_flags_take_them(tmp_path):
    """YAML 1.1 reads an unquoted on/off as a bool and a comma-list flag may be written as a YAML list: both reach
    the flag as it is written on the command line; a bool for another word flag, and a second --config, are one
    line saying what to write."""
    from trl import TrlParser

    from longqlora.cli import with_parent_help
    from longqlora.config_file import parse_with_config
    from longqlora.training.config import RunConfig

    recipe = load_recipe("extend_7b_8k")
    parser = TrlParser(tuple(map(with_parent_help, (recipe.Model, recipe.Data, RunConfig, recipe.Training))))
    config = tmp_path / "c.yaml"
    config.write_text(
        "offload_activations: off\ntiled_mlp: on\nlora_target: [q_proj, v_proj]\ns2_group_schedule: [0.5, 1]\n"
    )
    model, _, _, training = parse_with_config(parser, ["--config", str(config), "--output_dir", str(tmp_path)])
    assert (training.offload_activations, training.tiled_mlp) == ("off", "on")
    assert (model.lora_target, model.s2_group_schedule) == ("q_proj,v_proj", "0.5,1")
    # a ratio of the run, as the help says (the recipes declared both as int)
    config.write_text("warmup_steps: 0.1\n")
    training = parse_with_config(parser, ["--config", str(config), "--save_steps", "0.25"])[3]
    assert (training.warmup_steps, training.save_steps) == (0.1, 0.25)
    config.write_text("pack: no\n")
    with pytest.raises(ValueError, match=r"c.yaml: pack: YAML read the word as false; quote it, e.g. pack: 'no'$"):
        parse_with_config(parser, ["--config", str(config)])
    config.write_text("save_strategy: no\n")  # a flag of choices: not "False must be one of no, steps, ..."
    with pytest.raises(ValueError, match=r"save_strategy: YAML read the word as false; quote it"):
        parse_with_config(parser, ["--config", str(config)])
    with pytest.raises(ValueError, match="^--config: given twice; pass one YAML file"):
        parse_with_config(parser, ["--config", str(config), f"--config={config}"])


def test_the_thread_count_of_a_config_is_torchs(tmp_path, monkeypatch):
    """env: OMP_NUM_THREADS sets torch's thread count (torch read the variable at import, before the file)."""
    from trl import TrlParser

    from longqlora.cli import with_parent_help
    from longqlora.config_file import parse_with_config
    from longqlora.training.config import RunConfig

    recipe = load_recipe("extend_7b_8k")
    parser = TrlParser(tuple(map(with_parent_help, (recipe.Model, recipe.Data, RunConfig, recipe.Training))))
    config = tmp_path / "c.yaml"
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the file's value is taken back after the test
    config.write_text("env:\n  OMP_NUM_THREADS: 1\n")
    try:
        parse_with_config(parser, ["--config", str(config)])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
