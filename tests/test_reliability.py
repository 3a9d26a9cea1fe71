"""Every class of bad input ends in one line at every entry point (recipes, `python -m longqlora ...`, data_prep/):
exit status 2, no traceback, a last line under 300 characters naming the file or flag, no weights loaded, and the
output directory neither created nor changed. One table row per (input class, entry point); docs/reliability.md
lists them."""

import gzip
import json
import os
import random
import re
import shutil
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import pytest
import torch
from conftest import load_script
from safetensors.torch import save_file

from longqlora import cli
from longqlora.model_files import safetensors_problem
from longqlora.training import checkpoints
from longqlora.training.tiny import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


EXTEND, SFT = load_script("recipes/extend_7b_8k.py"), load_script("recipes/sft_vicuna_13b_8k.py")
TEXT, CHATS = load_script("data_prep/prepare_text.py"), load_script("data_prep/prepare_instructions.py")
QUICK = load_script("recipes/quickstart.py")
ENTRIES = {
    "recipe": lambda argv: cli.run_recipe(EXTEND.Model, EXTEND.Data, EXTEND.Training, argv),
    "sft recipe": lambda argv: cli.run_recipe(SFT.Model, SFT.Data, SFT.Training, argv),
    "prepare_text": TEXT.main,
    "prepare_instructions": CHATS.main,
    "command": lambda argv: sys.exit(cli.main(argv)),
    "quickstart": lambda argv: QUICK.main(QUICK.Quickstart, argv),
}


def jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def cut(path: Path) -> None:
    """Keep the first half of the file's bytes: a copy or download cut short."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def damaged_weights(d: Path) -> None:
    """Model and adapter directories whose safetensors are cut short or random bytes, and an intact empty adapter
    (to reach the base's weights)."""
    shutil.copytree(d / "model", d / "cut-model")
    cut(d / "cut-model" / "model.safetensors")
    shutil.copytree(d / "model", d / "garbage-model")
    (d / "garbage-model" / "model.safetensors").write_bytes(random.Random(0).randbytes(4096))
    for name, tensors in (
        ("cut-adapter", {"base_model.model.lm_head.weight": torch.ones(64, 64)}),
        ("empty-adapter", {}),
    ):
        (d / name).mkdir()
        (d / name / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": ""}))
        save_file(tensors, d / name / "adapter_model.safetensors")
    cut(d / "cut-adapter" / "adapter_model.safetensors")
    for name, text in (("json-adapter", '{"peft_type": '), ("list-adapter", "[1]")):
        shutil.copytree(d / "empty-adapter", d / name)
        (d / name / "adapter_config.json").write_text(text)
    (d / "bad-config").mkdir()
    (d / "bad-config" / "config.json").write_text('{"model_type": "llama",\n')


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    """One folder holding a tiny model and every malformed input."""
    d = tmp_path_factory.mktemp("bad")
    save_tiny_model(d / "model", max_position_embeddings=64)
    (d / "no-config").mkdir()
    (d / "a-file").write_text("not a directory")
    (d / "earlier-run" / "checkpoint-3").mkdir(parents=True)
    (d / "latin1.txt").write_bytes("caf\xe9 au lait. ".encode("latin-1") * 40)
    (d / "garbage.txt").write_bytes(bytes(range(256)) * 16)
    (d / "nul.txt").write_bytes(b"text with \x00 NUL bytes\n" * 10)
    (d / "plain.txt.gz").write_bytes(b"plain text, not gzip\n" * 40)
    whole = gzip.compress(b"All work and no play makes Jack a dull boy.\n" * 2000)
    (d / "cut.txt.gz").write_bytes(whole[: len(whole) // 2])
    whole = gzip.compress(b"".join(b'{"text": "document %d"}\n' % i for i in range(2000)))
    (d / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (d / "bytes.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "fine"}\n{"text": "bad \xff byte"}\n')
    (d / "json.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (d / "array.jsonl").write_text('{"text": "fine"}\n["not", "an", "object"]\n')
    (d / "number.jsonl").write_text('{"text": "fine"}\n{"text": 5}\n')
    (d / "object.jsonl").write_text('{"text": {"body": "fine"}}\n')
    (d / "books").mkdir()
    (d / "books" / "good.txt").write_text("A good book. " * 50)
    (d / "books" / "bad.txt").write_bytes(b"\xff\xfe" + "bad book".encode("utf-16-le"))
    (d / "notes").mkdir()
    (d / "notes" / "readme.md").write_text("no documents here")
    (d / "table.csv").write_text("text\nhello\n")
    jsonl(d / "msg-string.jsonl", [GOOD, {"messages": "hello there"}])
    jsonl(d / "msg-strings.jsonl", [GOOD, {"messages": ["hi", "hello"]}])
    jsonl(d / "msg-role.jsonl", [GOOD, {"messages": [{"role": 1, "content": "hi"}]}])
    jsonl(d / "conv-string.jsonl", [{"conversations": "hi"}])
    jsonl(d / "conv-strings.jsonl", [{"conversations": ["hi", "hello"]}])
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello", "weight": 0}]
    jsonl(d / "untrained.jsonl", [{"conversations": turns}])
    (d / "wrapped.json").write_text(json.dumps({"data": [GOOD]}, indent=2))
    jsonl(
        d / "empty-replies.jsonl",
        [
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]}
            for reply in ("", " ")
        ],
    )
    jsonl(d / "unknown.jsonl", [{"question": "hi", "answer": "hello"}])
    (d / "short.txt").write_text("A few words. " * 3)
    (d / "long-document.txt").write_text("A long document about the book. " * 40)  # past the model's 64 tokens
    long_turn = "A long question about the book. " * 60  # far past the 256 tokens of recipe_args
    jsonl(d / "long-chats.jsonl", [{"messages": [{"role": "user", "content": long_turn}, GOOD["messages"][-1]]}])
    for name, text in {
        "missing-colon.yaml": "lora_r: [8, 16\nlora_alpha: : 2\n",
        "list.yaml": "- lora_r\n",
        "null.yaml": "lora_r: null\n",
        "word.yaml": "lora_r: eight\n",
        "float.yaml": "lora_r: 8.5\n",
        "bool.yaml": "max_steps: true\n",
        "unknown.yaml": "lora_rank: 8\n",
        "retired.yaml": "max_seq_length: 8192\n",
        "section.yaml": "model:\n  lora_r: 8\n",
        "choice.yaml": "pack: sideways\n",
        "env-list.yaml": "env:\n  OMP_NUM_THREADS: [1, 2]\n",
        "env-key.yaml": "env:\n  1: x\n",
    }.items():
        (d / name).write_text(text)
    (d / "latin1.yaml").write_bytes("lora_r: 8 # caf\xe9\n".encode("latin-1"))
    damaged_weights(d)
    return d


@dataclass
class Case:
    input_class: str
    entry: str
    argv: Callable[[Path, Path], list]  # (bad, out) -> argv
    names: Callable[[Path, Path], str]  # the file or flag the last line must name


def recipe_args(bad: Path, out: Path, *more) -> list:
    return [
        "--model_name_or_path",
        str(bad / "model"),
        "--target_context",
        "256",
        "--compute_dtype",
        "float32",
        "--attn_backend",
        "sdpa",
        "--output_dir",
        str(out),
        *map(str, more),
    ]


def text_args(bad: Path, out: Path, dataset) -> list:
    return ["--dataset", str(dataset), "--tokenizer", str(bad / "model"), "--output_dir", str(out)]


def chats_args(bad: Path, out: Path, dataset) -> list:
    return [*text_args(bad, out, dataset), "--max_length", "256"]


def ppl_args(bad: Path, out: Path, data, model=None) -> list:
    return [
        "perplexity",
        "--model",
        str(model or bad / "model"),
        "--data",
        str(data),
        "--context_lengths",
        "32",
        "--output",
        str(out / "ppl.json"),
    ]


def cut_after(path: Path) -> str:
    """What a truncated gzip file's line says after its name: the last whole line read before its stream ends."""
    lines = zlib.decompressobj(wbits=31).decompress(path.read_bytes()).count(b"\n")
    return f": the gzip data is cut short after line {lines} "


def data_cases(input_class: str, file: str, *entries: str, where: str | Callable[[Path], str] = "") -> list:
    """One row per entry point reading `file` as training or evaluation text; the last line names the file followed
    by `where` (e.g. " line 3", or a function of the file's path), so a lost line number fails the row."""
    argv = {
        "recipe": lambda b, o: recipe_args(b, o, "--dataset", b / file),
        "prepare_text": lambda b, o: text_args(b, o, b / file),
        "command": lambda b, o: ppl_args(b, o, b / file),
    }
    at = where if callable(where) else lambda path: where
    return [Case(input_class, entry, argv[entry], lambda b, o: str(b / file) + at(b / file)) for entry in entries]


def flag_case(input_class: str, flags: tuple, names: str) -> Case:
    """A recipe run with `flags` added, whose last line names `names`."""
    return Case(input_class, "recipe", lambda b, o: recipe_args(b, o, *flags), lambda b, o: names)


def config_case(input_class: str, file: str, key: str = "", line: int = 0) -> Case:
    """A recipe run with `--config file`, whose last line names the file and then `key` or the `line` at fault."""
    return Case(
        input_class,
        "recipe",
        lambda b, o: recipe_args(b, o, "--config", b / file),
        lambda b, o: f"--config {b / file}" + (f": {key}" if key else f" line {line}: "),
    )


CASES = [
    Case(
        "--output_dir is a file",
        "recipe",
        lambda b, o: recipe_args(b, b / "a-file"),
        lambda b, o: f"--output_dir {b / 'a-file'}",
    ),
    Case(
        "--output_dir holding an earlier run's checkpoints",
        "recipe",
        lambda b, o: recipe_args(b, b / "earlier-run"),
        lambda b, o: f"--output_dir {b / 'earlier-run'} holds an earlier run's checkpoints (checkpoint-3",
    ),
    Case(
        "--output_dir holding files that are not a run's",
        "recipe",
        lambda b, o: recipe_args(b, b / "notes"),
        lambda b, o: f"--output_dir {b / 'notes'} holds files that are not a run's (readme.md)",
    ),
    Case(
        "--output_dir under a file",
        "prepare_text",
        lambda b, o: text_args(b, b / "a-file" / "out", b / "x.txt"),
        lambda b, o: "--output_dir",
    ),
    Case(
        "--output under a file",
        "command",
        lambda b, o: ppl_args(b, b / "a-file", b / "books" / "good.txt"),
        lambda b, o: "--output",
    ),
    Case(
        "--output_dir is a file",
        "command",
        lambda b, o: [
            "passkey",
            "--model",
            str(b / "model"),
            "--context_lengths",
            "64",
            "--output_dir",
            str(b / "a-file"),
        ],
        lambda b, o: "--output_dir",
    ),
    Case(
        "model directory missing",
        "recipe",
        lambda b, o: [*recipe_args(b, o), "--model_name_or_path", str(b / "nowhere")],
        lambda b, o: "--model_name_or_path",
    ),
    Case(  # a bare name is a path, never looked up on the hub (it retried the hub for half a minute offline)
        "model directory missing",
        "recipe",
        lambda b, o: [*recipe_args(b, o), "--model_name_or_path", "nowhere"],
        lambda b, o: "--model_name_or_path nowhere: no such directory",
    ),
    Case(
        "model directory missing",
        "command",
        lambda b, o: ppl_args(b, o, "x.txt", model=b / "nowhere"),
        lambda b, o: f"--model {b / 'nowhere'}",
    ),
    Case(
        "model directory missing",
        "command",
        lambda b, o: ["passkey", "--model", str(b / "nowhere"), "--output_dir", str(o)],
        lambda b, o: "--model",
    ),
    Case(
        "model directory missing",
        "command",
        lambda b, o: ["chat", "--model", "nowhere/at-all", "--prompt", "hi"],
        lambda b, o: "--model nowhere/at-all",
    ),
    Case(
        "model directory without config.json",
        "command",
        lambda b, o: ppl_args(b, o, "x", model=b / "no-config"),
        lambda b, o: "--model",
    ),
    Case(
        "not an adapter directory",
        "command",
        lambda b, o: ["merge", "--adapter", str(b / "model"), "--output", str(o)],
        lambda b, o: "--adapter",
    ),
    Case(
        "adapter directory missing",
        "command",
        lambda b, o: ["merge", "--adapter", str(b / "nowhere"), "--output", str(o)],
        lambda b, o: f"--adapter {b / 'nowhere'}: no such directory",
    ),
    *[
        Case(
            f"damaged safetensors ({how})",
            entry,
            argv,
            lambda b, o, f=flag, m=model: f"{f} {b / m}: model.safetensors is damaged",
        )
        for how, model in (("cut short", "cut-model"), ("random bytes", "garbage-model"))
        for entry, flag, argv in (
            (
                "recipe",
                "--model_name_or_path",
                lambda b, o, m=model: recipe_args(
                    b, o, "--dataset", b / "books" / "good.txt", "--model_name_or_path", b / m
                ),
            ),
            ("command", "--model", lambda b, o, m=model: ppl_args(b, o, b / "books" / "good.txt", model=b / m)),
        )
    ],
    Case(
        "damaged safetensors (random bytes)",
        "command",
        lambda b, o: ["chat", "--model", str(b / "garbage-model"), "--prompt", "hi"],
        lambda b, o: f"--model {b / 'garbage-model'}: model.safetensors is damaged",
    ),
    Case(
        "damaged safetensors (base of a merge)",
        "command",
        lambda b, o: [
            "merge",
            "--adapter",
            str(b / "empty-adapter"),
            "--base",
            str(b / "cut-model"),
            "--output",
            str(o),
        ],
        lambda b, o: f"--base {b / 'cut-model'}: model.safetensors is damaged",
    ),
    Case(
        "damaged adapter safetensors",
        "command",
        lambda b, o: ["merge", "--adapter", str(b / "cut-adapter"), "--output", str(o)],
        lambda b, o: f"--adapter {b / 'cut-adapter'}: adapter_model.safetensors is damaged",
    ),
    Case(
        "damaged adapter safetensors",
        "command",
        lambda b, o: [*ppl_args(b, o, b / "books" / "good.txt"), "--adapter", str(b / "cut-adapter")],
        lambda b, o: f"--adapter {b / 'cut-adapter'}: adapter_model.safetensors is damaged",
    ),
    *[
        Case(
            f"adapter_config.json {what}",
            entry,
            lambda b, o, a=adapter, argv=argv: argv(b, o, str(b / a)),
            lambda b, o, a=adapter, what=what: f"--adapter {b / a}: adapter_config.json is {what}",
        )
        for what, adapter in (("not valid JSON", "json-adapter"), ("not a JSON object", "list-adapter"))
        for entry, argv in (
            ("command", lambda b, o, a: ["merge", "--adapter", a, "--output", str(o)]),
            ("command", lambda b, o, a: [*ppl_args(b, o, b / "books" / "good.txt"), "--adapter", a]),
            ("command", lambda b, o, a: ["passkey", "--adapter", a, "--output_dir", str(o)]),
            ("command", lambda b, o, a: ["chat", "--model", str(b / "model"), "--adapter", a, "--prompt", "hi"]),
        )
    ],
    Case(
        "model path is a file",
        "recipe",
        lambda b, o: [*recipe_args(b, o), "--model_name_or_path", str(b / "a-file")],
        lambda b, o: f"--model_name_or_path {b / 'a-file'}: is a file, not a model directory",
    ),
    Case(
        "config.json not JSON",
        "command",
        lambda b, o: ["plan", "--model", str(b / "bad-config"), "--context", "8192"],
        lambda b, o: f"--model {b / 'bad-config'}: {b / 'bad-config' / 'config.json'} is not valid JSON",
    ),
    Case(
        "config.json not JSON",
        "recipe",
        lambda b, o: [*recipe_args(b, o), "--model_name_or_path", str(b / "bad-config")],
        lambda b, o: f"--model_name_or_path {b / 'bad-config'}: {b / 'bad-config' / 'config.json'} is not valid JSON",
    ),
    Case(
        "unknown subcommand",
        "command",
        lambda b, o: ["bogus", "--model", str(b / "model")],
        lambda b, o: f"unknown subcommand 'bogus'; choose one of {', '.join(cli.COMMANDS)}",
    ),
    Case(
        "--output_dir is a file",
        "quickstart",
        lambda b, o: ["--tiny", "--output_dir", str(b / "a-file")],
        lambda b, o: f"--output_dir {b / 'a-file'}: is a file, not a directory; choose a directory",
    ),
    Case(
        "prepare_text --max_length 0",
        "prepare_text",
        lambda b, o: [*text_args(b, o, b / "books" / "good.txt"), "--max_length", "0"],
        lambda b, o: "--max_length 0",
    ),
    Case(
        "tokenizer missing",
        "prepare_text",
        lambda b, o: [*text_args(b, o, b / "books" / "good.txt"), "--tokenizer", str(b / "nowhere")],
        lambda b, o: "--tokenizer",
    ),
    Case(  # a trailing slash is a directory, not a hub id (HF's repo-id validation error before)
        "tokenizer missing",
        "prepare_text",
        lambda b, o: [*text_args(b, o, b / "books" / "good.txt"), "--tokenizer", "nowhere/"],
        lambda b, o: "--tokenizer nowhere/: no such directory",
    ),
    Case(
        "--config missing",
        "recipe",
        lambda b, o: recipe_args(b, o, "--config", b / "none.yaml"),
        lambda b, o: f"--config {b / 'none.yaml'}",
    ),
    Case(
        "--config is a directory",
        "recipe",
        lambda b, o: recipe_args(b, o, "--config", b / "notes"),
        lambda b, o: "--config",
    ),
    config_case("--config not YAML", "missing-colon.yaml", line=2),
    config_case("--config not UTF-8", "latin1.yaml", line=1),
    config_case("--config not a mapping", "list.yaml", "must be a mapping"),
    config_case("--config null value", "null.yaml", "lora_r: null"),
    config_case("--config wrong type", "word.yaml", "lora_r"),
    config_case("--config wrong type", "float.yaml", "lora_r"),
    config_case("--config wrong type", "bool.yaml", "max_steps"),
    config_case("--config value refused by its dataclass", "choice.yaml", "--pack 'sideways'"),
    config_case("--config unknown key", "unknown.yaml", "lora_rank: not a flag of this command (did you mean lora_r?)"),
    config_case(
        "--config unknown key", "retired.yaml", "max_seq_length: not a flag of this command (TRL's --max_length"
    ),
    config_case("--config unknown key", "section.yaml", "model: not a flag; the keys are the flags themselves"),
    config_case("--config env value not a string", "env-list.yaml", "env: OMP_NUM_THREADS"),
    config_case("--config env value not a string", "env-key.yaml", "env: 1 is not a variable name"),
    flag_case("flag of the wrong type", ("--lora_r", "eight"), "--lora_r"),
    *[
        flag_case("a training number transformers takes unchecked", (flag, value), says)
        for flag, value, says in (
            ("--learning_rate", "-1", "--learning_rate -1.0"),
            ("--gradient_accumulation_steps", "0", "--gradient_accumulation_steps 0"),
            ("--save_steps", "0", "--save_steps 0"),
            ("--seed", "-1", "--seed -1"),
            ("--weight_decay", "-1", "--weight_decay -1.0"),
            ("--per_device_train_batch_size", "0", "--per_device_train_batch_size 0"),
        )
    ],
    flag_case("--offload_layers over the model's layers", ("--offload_layers", "99"), "--offload_layers 99"),
    flag_case(
        "--offload_layers with offloading off",
        ("--offload_layers", "4", "--offload_activations", "off"),
        "--offload_layers 4: splits the offloaded checkpoints, and --offload_activations is off",
    ),
    *[  # the Trainer's engine flags, a missing file included (transformers' own error named no fix before)
        flag_case("--deepspeed or --fsdp on the recipe", flags, f"{flags[0]}: set the engine with accelerate launch")
        for flags in (("--deepspeed", "missing.json"), ("--fsdp", "full_shard"))
    ],
    flag_case(
        "unknown or abbreviated flag",
        ("--lora_rr", "16"),
        "--lora_rr: not a flag of this command; did you mean --lora_r?",
    ),
    flag_case("unknown or abbreviated flag", ("--max_step", "3"), "did you mean --max_steps?"),
    flag_case(  # a flag older releases had, which tutorials still use: what replaced it, not a near spelling
        "unknown or abbreviated flag",
        ("--group_by_length", "true"),
        "--group_by_length: not a flag of this command (transformers 5 removed it;",
    ),
    # Trainer features the recipes cannot serve: refused before loading (the Trainer failed after it)
    flag_case(
        "an evaluation schedule without an evaluation set", ("--eval_strategy", "steps"), "--eval_strategy steps"
    ),
    flag_case(
        "an evaluation set with rows of another length",
        ("--pose_window", "128", "--eval_dataset", "held_out.txt"),
        "--eval_dataset: not supported with --pose_window yet",
    ),
    flag_case("a kernel that replaces the model's forward", ("--use_liger_kernel", "true"), "--use_liger_kernel"),
    flag_case(  # Phi-3 fuses q, k and v into qkv_proj: LoRA targets are checked on a meta-device model
        "LoRA target layers the model does not have",
        ("--lora_target", "q_proj,qkv_proj"),
        "--lora_target q_proj,qkv_proj: this model has no Linear layer named qkv_proj",
    ),
    Case(  # a required flag's typo: named itself, not as argparse's "required: --context"
        "unknown or abbreviated flag",
        "command",
        lambda b, o: ["plan", "--model", "llama-2-7b", "--contxt", "8192"],
        lambda b, o: "--contxt: not a flag of this command; did you mean --context?",
    ),
    Case(  # an abbreviation the subcommands took
        "unknown or abbreviated flag",
        "command",
        lambda b, o: ["merge", "--adapter", str(b / "model"), "--output", str(o), "--dtyp", "float16"],
        lambda b, o: "--dtyp: not a flag of this command; did you mean --dtype?",
    ),
    Case(
        "unknown or abbreviated flag",
        "prepare_text",
        lambda b, o: [*text_args(b, o, b / "books" / "good.txt"), "--min_lenght", "5"],
        lambda b, o: "--min_lenght: not a flag of this command; did you mean --min_length?",
    ),
    flag_case("--max_length, which the run sets from --target_context", ("--max_length", "128"), "--max_length 128"),
    Case(
        "--data neither a bundled book, a path nor an org/name hub id",
        "command",
        lambda b, o: ppl_args(b, o, "nosuchbook"),
        lambda b, o: "--data nosuchbook: not a bundled book (austen_emma",
    ),
    Case(
        "--dataset missing",
        "recipe",
        lambda b, o: recipe_args(b, o, "--dataset", b / "none.txt"),
        lambda b, o: "--dataset",
    ),
    *data_cases("text not UTF-8", "latin1.txt", "recipe", "prepare_text", "command", where=" line 1: not UTF-8"),
    *data_cases("binary garbage", "garbage.txt", "recipe", "prepare_text", where=" line 1: "),
    *data_cases("NUL bytes", "nul.txt", "prepare_text", where=" line 1: holds NUL bytes"),
    *data_cases(".gz that is not gzip", "plain.txt.gz", "recipe", "prepare_text", "command"),
    *data_cases("truncated gzip", "cut.txt.gz", "recipe", "prepare_text", "command", where=cut_after),
    *data_cases("truncated gzip", "cut.jsonl.gz", "prepare_text", where=cut_after),
    *data_cases("JSONL bad bytes", "bytes.jsonl", "recipe", "prepare_text", where=" line 3: not UTF-8"),
    *data_cases("JSONL bad JSON", "json.jsonl", "prepare_text", "command", where=" line 2: not valid JSON"),
    *data_cases("JSONL line not an object", "array.jsonl", "prepare_text", where=" line 2: not a JSON object"),
    *data_cases("text field not text", "number.jsonl", "recipe", "prepare_text", where=" line 2: 'text' is a number"),
    *data_cases("text field not text", "object.jsonl", "command", where=" line 1: 'text' is an object"),
    Case(
        "bad file inside a directory",
        "prepare_text",
        lambda b, o: text_args(b, o, b / "books"),
        lambda b, o: f"{b / 'books' / 'bad.txt'} line 1: not UTF-8",
    ),
    # found by tokenizing, which runs before the output lock and the weights
    Case(
        "too little text for one row",
        "recipe",
        lambda b, o: recipe_args(b, o, "--dataset", b / "short.txt"),
        lambda b, o: f"--dataset {b / 'short.txt'}",
    ),
    Case(
        "--min_length drops every document",
        "recipe",
        lambda b, o: recipe_args(b, o, "--dataset", b / "books" / "good.txt", "--min_length", 100_000),
        lambda b, o: "--min_length 100000",
    ),
    Case(
        "--overlong drop removes every conversation",
        "sft recipe",
        lambda b, o: recipe_args(b, o, "--dataset", b / "long-chats.jsonl", "--overlong", "drop"),
        lambda b, o: "--overlong drop",
    ),
    Case(
        "directory without documents",
        "prepare_text",
        lambda b, o: text_args(b, o, b / "notes"),
        lambda b, o: str(b / "notes"),
    ),
    Case(
        "unsupported file type",
        "prepare_text",
        lambda b, o: text_args(b, o, b / "table.csv"),
        lambda b, o: str(b / "table.csv"),
    ),
    *[
        Case(
            f"instruction turns {kind}",
            entry,
            lambda b, o, f=file, e=entry: (
                chats_args(b, o, b / f) if e == "prepare_instructions" else recipe_args(b, o, "--dataset", b / f)
            ),
            lambda b, o, f=file, n=line: f"{b / f} line {n}: ",
        )
        for kind, file, line in (
            ("a string", "msg-string.jsonl", 2),
            ("a list of strings", "msg-strings.jsonl", 2),
            ("with a non-text role", "msg-role.jsonl", 2),
            ("a string", "conv-string.jsonl", 1),
            ("a list of strings", "conv-strings.jsonl", 1),
            ("with a reply marked untrained (weight 0)", "untrained.jsonl", 1),
        )
        for entry in ("prepare_instructions", "sft recipe")
    ],
    *[
        Case(
            "one JSON object pretty-printed over several lines",
            entry,
            lambda b, o, e=entry: (
                chats_args(b, o, b / "wrapped.json")
                if e == "prepare_instructions"
                else recipe_args(b, o, "--dataset", b / "wrapped.json")
            ),
            lambda b, o: f"{b / 'wrapped.json'}: one JSON object over several lines (keys: data)",
        )
        for entry in ("prepare_instructions", "sft recipe")
    ],
    Case(
        "only empty assistant replies",
        "prepare_instructions",
        lambda b, o: chats_args(b, o, b / "empty-replies.jsonl"),
        lambda b, o: "2 skipped, 2 of them for an empty assistant reply",
    ),
    Case(
        "unknown instruction format",
        "prepare_instructions",
        lambda b, o: chats_args(b, o, b / "unknown.jsonl"),
        lambda b, o: f"{b / 'unknown.jsonl'} line 1",
    ),
    Case(
        "--context_file not UTF-8",
        "command",
        lambda b, o: ["chat", "--model", str(b / "model"), "--context_file", str(b / "latin1.txt"), "--prompt", "hi"],
        lambda b, o: f"--context_file {b / 'latin1.txt'} line 1: not UTF-8",
    ),
    Case(
        "--context_file missing",
        "command",
        lambda b, o: ["chat", "--model", str(b / "model"), "--context_file", str(b / "none.txt"), "--prompt", "hi"],
        lambda b, o: "--context_file",
    ),
    Case(
        "--context_file longer than the model's context",
        "command",
        lambda b, o: ["chat", "--model", str(b / "model"), "--context_file", str(b / "long-document.txt")],
        lambda b, o: f"--context_file {b / 'long-document.txt'}: ",
    ),
    Case(
        "--prompt and its reply longer than the model's context",
        "command",
        lambda b, o: ["chat", "--model", str(b / "model"), "--prompt", "hi", "--max_new_tokens", "64"],
        lambda b, o: "--prompt: the prompt takes",
    ),
]


def snapshot(*paths: Path) -> dict:
    """Every file and folder under `paths` with its size and modification time."""
    state = {}
    for root in paths:
        for p in [root, *root.rglob("*")] if root.exists() else []:
            stat = p.stat()
            state[str(p)] = (p.is_dir(), stat.st_size, stat.st_mtime_ns)
    return state


@pytest.fixture(autouse=True)
def no_weights_and_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(
        "transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("weights loaded for bad input")
    )


@pytest.mark.parametrize("case", CASES, ids=[f"{c.input_class} [{c.entry}]" for c in CASES])
def test_bad_input_is_one_line(case, bad, tmp_path, capfd):
    out = tmp_path / "out"
    before = snapshot(bad, out)
    with pytest.raises(SystemExit) as ended:  # any other exception is a traceback for the user
        ENTRIES[case.entry](case.argv(bad, out))
    err = capfd.readouterr().err
    last = err.strip().splitlines()[-1]
    assert ended.value.code == 2, err[-2000:]
    assert "Traceback" not in err
    assert "error:" in last and case.names(bad, out) in last, last
    assert len(last) < 300, last
    assert snapshot(bad, out) == before and not out.exists()
    if case.input_class in ("flag of the wrong type", "unknown or abbreviated flag"):
        assert err.strip() == last  # nothing before it: not argparse's usage of every flag


def test_table_covers_every_input_class_of_the_issue():
    classes = {c.input_class for c in CASES}
    assert len(classes) >= 30 and len(CASES) >= 50
    for needed in (
        "--output_dir is a file",
        "model directory missing",
        "--config not YAML",
        "--config missing",
        "--config null value",
        "--config wrong type",
        "text not UTF-8",
        "binary garbage",
        ".gz that is not gzip",
        "truncated gzip",
        "JSONL bad bytes",
        "instruction turns a string",
        "instruction turns a list of strings",
        "only empty assistant replies",
    ):
        assert needed in classes
    assert {c.entry for c in CASES} == set(ENTRIES)


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "recipes/extend_7b_8k.py", "--config", "{bad}/missing-colon.yaml", "--output_dir", "{out}"],
        [
            sys.executable,
            "data_prep/prepare_text.py",
            "--dataset",
            "{bad}/cut.txt.gz",
            "--tokenizer",
            "{bad}/model",
            "--output_dir",
            "{out}",
        ],
        [sys.executable, "-m", "longqlora", "perplexity", "--model", "{bad}/nowhere", "--output", "{out}/p.json"],
    ],
    ids=["recipe", "data_prep", "python -m longqlora"],
)
def test_a_real_process_ends_in_one_line(command, bad, tmp_path):
    out = tmp_path / "out"
    argv = [part.format(bad=bad, out=out) for part in command]
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf_cache"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert last.startswith("error: ") and str(bad) in last and len(last) < 300
    assert not out.exists()
    if "longqlora" in argv:  # the traceback on request (one entry point suffices: they share cli.fail)
        shown = subprocess.run(
            argv, capture_output=True, text=True, timeout=120, cwd=ROOT, env={**env, "LONGQLORA_TRACEBACK": "1"}
        )
        assert shown.returncode == 1 and "Traceback" in shown.stderr and "ValueError: --model" in shown.stderr


def test_a_damaged_safetensors_file_is_found_from_its_header(tmp_path):
    """One check (`model.safetensors_problem`) for models, adapters and checkpoints: the header must parse and the
    file must hold exactly the bytes it places, so a copy cut anywhere, even in its last bytes, is refused."""
    whole = tmp_path / "whole.safetensors"
    save_file({"a": torch.zeros(32, 32), "b": torch.ones(8)}, whole)
    data = whole.read_bytes()
    variants = {"half": data[: len(data) // 2], "tail": data[:-4], "extra": data + b"xx", "random": os.urandom(999)}
    variants.update({"short": data[:5], "empty": b""})
    assert safetensors_problem(whole) == ""
    for name, content in variants.items():
        (tmp_path / f"{name}.safetensors").write_bytes(content)
        assert safetensors_problem(tmp_path / f"{name}.safetensors"), name
    assert "cut short" in safetensors_problem(tmp_path / "tail.safetensors")
    assert "does not parse" in safetensors_problem(tmp_path / "random.safetensors")
    checkpoint = tmp_path / "checkpoint-2"  # the resume check uses the same function
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text('{"global_step": 2}')
    (checkpoint / "adapter_model.safetensors").write_bytes(variants["tail"])
    assert checkpoints.checkpoint_problem(checkpoint, with_optimizer=False) == "adapter_model.safetensors is damaged"
    (checkpoint / "adapter_model.safetensors").write_bytes(data)
    assert checkpoints.checkpoint_problem(checkpoint, with_optimizer=False) == ""


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only input errors become one line: a TypeError from inside the toolkit still raises."""

    def broken(*args, **kwargs):
        raise TypeError("a genuine bug")

    monkeypatch.setattr("longqlora.training.advice.advise", broken)
    with pytest.raises(TypeError, match="a genuine bug"):
        cli.main(["plan", "--model", "llama-2-7b", "--context", "8192"])


def test_empty_replies_are_counted_and_reported(bad, tmp_path, capsys):
    rows = [GOOD, *[json.loads(line) for line in (bad / "empty-replies.jsonl").read_text().splitlines()], GOOD]
    jsonl(tmp_path / "mixed.jsonl", rows)
    CHATS.main(chats_args(bad, tmp_path / "out", tmp_path / "mixed.jsonl"))
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert (
        stats["conversations_in"],
        stats["skipped_invalid"],
        stats["skipped_empty_reply"],
        stats["conversations_out"],
    ) == (4, 2, 2, 2)
    assert "skipped 2 invalid (2 for an empty assistant reply)" in capsys.readouterr().out


def test_a_checkpoint_of_another_run_is_refused_before_anything_is_written(tiny_adapter, tmp_path, capfd):
    """--resume_from_checkpoint naming a checkpoint that a run with other settings wrote (its longqlora_extension
    .json) ends in one line before anything is written: the Trainer would otherwise load that run's weights,
    optimizer, scheduler and step into this one. A checkpoint that does not exist is found before --tiny writes."""
    checkpoint = sorted(tiny_adapter.glob("checkpoint-*"))[-1]
    base = ["--model_name_or_path", str(tiny_adapter / "tiny-base"), "--compute_dtype", "float32"]
    out = tmp_path / "out"
    for more, said in (
        (["--target_context", "256", "--lora_r", "4"], "written by a run with --lora_r 8, this run has 4"),
        (["--target_context", "512"], "written by a run with --target_context 256, this run has 512"),
        (["--target_context", "256", "--lora_alpha", "64"], "written by a run with --lora_alpha 16, this run has 64"),
        (["--target_context", "256", "--rope_scaling", "linear"], "--rope_scaling yarn, this run has linear"),
        (["--target_context", "256", "--load_in_4bit", "false"], "--load_in_4bit True, this run has False"),
        (["--tiny", "--resume_from_checkpoint", str(tmp_path / "nowhere")], "nowhere: no such directory"),
    ):
        argv = [*base, "--output_dir", str(out), "--resume_from_checkpoint", str(checkpoint), *more]
        with pytest.raises(SystemExit) as ended:
            ENTRIES["recipe"](argv)
        last = capfd.readouterr().err.strip().splitlines()[-1]
        assert ended.value.code == 2 and said in last and "\n" not in last, last
        assert not out.exists()


def test_a_checkpoint_whose_state_is_for_another_step_is_not_complete(tiny_adapter, tmp_path):
    """A checkpoint folder whose trainer_state.json is another step's (a stale or copied state file) would resume
    at the wrong step and learning rate: it is not complete, and resuming takes the newest one that is."""
    from longqlora.training import checkpoints

    run = tmp_path / "run"
    shutil.copytree(tiny_adapter, run)
    shutil.copytree(run / "checkpoint-4", run / "checkpoint-6")
    assert checkpoints.checkpoint_problem(run / "checkpoint-6") == "trainer_state.json is for step 4"
    assert checkpoints.checkpoint_problem(run / "checkpoint-4") == ""
    assert checkpoints.resume_checkpoint(run, "auto") == str(run / "checkpoint-4")
    assert (run / "incomplete-checkpoint-6").is_dir() and not (run / "checkpoint-6").exists()


def test_a_copied_run_resumes_from_its_own_checkpoints(tiny_adapter, tmp_path):
    """The check that a checkpoint belongs to this run takes a copy of the run's folder (its --tiny base copied
    along, at another path) for the same model, and still refuses another LoRA rank."""
    from longqlora.training import checkpoints

    copy = tmp_path / "copy"
    shutil.copytree(tiny_adapter, copy)
    checkpoint = str(sorted(copy.glob("checkpoint-*"))[-1])
    record = json.loads((Path(checkpoint) / "longqlora_extension.json").read_text())
    assert Path(record["model"]).parent == tiny_adapter  # the record names the original folder's base
    ours = {
        "--model_name_or_path": str(copy / "tiny-base"),
        "--target_context": record["target_context"],
        "--lora_r": record["lora"]["r"],
    }
    checkpoints.check_same_run(checkpoint, ours)
    with pytest.raises(ValueError, match="written by a run with --lora_r 8, this run has 4"):
        checkpoints.check_same_run(checkpoint, {**ours, "--lora_r": 4})
    with pytest.raises(ValueError, match="written by a run with --original_context 64, this run has 16"):
        checkpoints.check_same_run(checkpoint, {**ours, "--original_context": 16})
    # what each step trained: the S2 schedule, the packing, the chat template, the data order's seed
    settings = record["settings"]
    assert settings["--s2_group_schedule"] == "0.25,0.75,2" and settings["--chat_template_path"] is None
    checkpoints.check_same_run(checkpoint, {**ours, **settings})
    from types import SimpleNamespace

    from longqlora.model_config import ModelConfig
    from longqlora.training.summary import ROWS_PER_STEP, trajectory_settings

    # values as they act: written otherwise, or of a switched-off feature, they are the same run's
    def run_of(chat_template_path=None, seed=0, data_seed=None, batch=1, accumulation=1):
        return SimpleNamespace(
            chat_template_path=chat_template_path,
            seed=seed,
            data_seed=data_seed,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
        )

    def settings_of(training=run_of(), **model):
        return trajectory_settings(ModelConfig(model_name_or_path="m", target_context=256, **model), None, training)

    assert settings_of(s2_group_schedule=" 0.25, 0.75,2 ") == settings_of(s2_group_schedule="0.25,0.75,2")
    assert settings_of(s2_attention=False, group_ratio=0.5) == settings_of(s2_attention=False, group_ratio=0.25)
    assert settings_of(pose_chunks=3) == settings_of(pose_chunks=2)  # no --pose_window: no chunks
    assert settings_of(run_of(data_seed=0)) == settings_of()
    assert settings_of(run_of(batch=2, accumulation=4)) == settings_of(run_of(batch=1, accumulation=8))  # same rows
    for folder in ("a", "b"):  # one template, wherever it lies
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "t.jinja").write_text("{{ messages }}")
    assert settings_of(run_of(str(tmp_path / "a" / "t.jinja"))) == settings_of(run_of(str(tmp_path / "b" / "t.jinja")))
    for flag, value in (("--s2_group_schedule", "none"), ("--pack", "concat"), ("--chat_template_path", "t.jinja"),
                        ("--seed", settings["--seed"] + 1), (ROWS_PER_STEP, settings[ROWS_PER_STEP] * 2)):  # fmt: skip
        with pytest.raises(
            ValueError, match=re.escape(f"written by a run with {flag} {settings[flag]}, this run has {value};")
        ):
            checkpoints.check_same_run(checkpoint, {**ours, **settings, flag: value})
    (copy / "tiny-base" / "config.json").write_text(
        json.dumps({**json.loads((copy / "tiny-base" / "config.json").read_text()), "hidden_size": 1})
    )
    with pytest.raises(ValueError, match="--model_name_or_path"):
        checkpoints.check_same_run(checkpoint, ours)
    # a base recorded relative to where that run started (not found from here) is not held against the run, and
    # the trained modules compare as a set
    record.update(model="elsewhere/tiny-base", lora={**record["lora"], "trainable_modules": "embed, norm"})
    (Path(checkpoint) / "longqlora_extension.json").write_text(json.dumps(record))
    checkpoints.check_same_run(checkpoint, {**ours, "--trainable_params": "norm,embed"})


def test_flags_are_what_argparse_takes_for_flags(tmp_path):
    """The unknown-flag check follows argparse: a value that starts with dashes but holds a space is a value,
    `--flag=value` and `--config=FILE` are flags, and an unknown flag names the nearest known one."""
    from trl import TrlParser

    from longqlora.config_file import parse_with_config
    from longqlora.training.config import RunConfig

    parser = lambda: TrlParser((EXTEND.Model, EXTEND.Data, RunConfig, EXTEND.Training))  # noqa: E731
    (tmp_path / "c.yaml").write_text("lora_r: 4\n")
    out = ["--output_dir", str(tmp_path / "o")]
    model, _, _, training = parse_with_config(
        parser(), [*out, "--run_name", "--a b", f"--config={tmp_path / 'c.yaml'}"]
    )
    assert (training.run_name, model.lora_r) == ("--a b", 4)
    assert parse_with_config(parser(), [*out, "--max_steps=7"])[3].max_steps == 7
    with pytest.raises(ValueError, match="^--lora_rr: not a flag of this command; did you mean --lora_r\\?$"):
        parse_with_config(parser(), [*out, "--lora_rr=3"])
