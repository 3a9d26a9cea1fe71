"""More than one process, on this CPU with gloo (docs/distributed.md): S2-Attn context parallelism equals the
single-process op and the single-process run; DDP, FSDP2 and DeepSpeed ZeRO-3 train, save and resume the same
adapter as one process on the same rows; a signal to one process stops all; the accelerate configs parse and
validate; unsupported launches are refused in one line."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import types

import pytest
import torch
from conftest import ROOT, load_script
from safetensors.torch import load_file

from longqlora import hardware
from longqlora.hardware import Launch, launch
from longqlora.model import ModelConfig
from longqlora.training import checkpoints, distributed

BENCH = load_script("bench/distributed.py")  # the launches and their comparison, shared with the benchmark


# ------------------------------------------------------------------------------------------ the op, 3 processes
def test_context_parallel_op_equals_single_process(tmp_path):
    """Each of 3 ranks holds a third of the sequence; output and q/k/v gradients equal the single-process op (float64)
    for plain rows (GQA, an odd head count, an odd group that does not align with the chunks), packed documents,
    right padding, and left padding that ends in a chunk's borrowed tail while the next chunk, with no padding of
    its own, gets no mask; without the borrowed tokens they would not. The forward computes what needs nothing
    borrowed while the borrowed keys and values are in flight, and the backward its gradient while theirs are."""
    done = subprocess.run(
        [*BENCH.torchrun(3), "tests/cp_op_worker.py", str(tmp_path)],
        cwd=ROOT, env=BENCH.environment(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in range(3):
        cases = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(cases) == 6
        for name, d in cases.items():
            for key in ("out", "grad_q", "grad_k", "grad_v"):
                assert d[key] < 1e-12, (rank, name, key, d[key])
            assert d["reference_grad_k"] > 0.1, (rank, name)
            assert d["halo_cached"], (rank, name)
            if rank == 2 or (rank == 1 and not name.startswith("packed")):
                assert d["without_halo"] > 0.1, (rank, name)  # the exchange carries what the chunk needs
        # Plain rows on group boundaries borrow half a group of the shifted heads only; packed rows a whole group.
        plain = cases["plain, GQA 6/2, G = chunk"]
        assert (plain["halo_tokens"], plain["shifted_heads_only"]) == (24, True)
        packed = cases["packed documents, one starting on a chunk boundary"]
        assert (packed["halo_tokens"], packed["shifted_heads_only"]) == (32, False)
        # The transfer overlaps what needs nothing borrowed: the first rank's every head, on plain rows every
        # rank's unshifted heads, in the forward and in the backward (the gradient of the borrowed tokens is posted
        # before their backward and waited for after it); packed rows wait first (every head may need the previous
        # rank's keys). A "wait" is a wait for transfers still pending (one done at once would leave nothing).
        order = json.loads((tmp_path / f"order{rank}.json").read_text())
        if rank == 0:
            overlapped = ["post", "all", "wait", "post", "all backward", "wait"]
            assert order == {"plain": overlapped, "packed": overlapped}
        else:
            assert order == {
                "plain": ["post", "plain", "wait", "shifted", "shifted backward", "post", "plain backward", "wait"],
                "packed": ["post", "wait", "all", "all backward", "post", "wait"],
            }


# ------------------------------------------------------------------------------------ recipes, 1 and 2 processes
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny 7B-8k recipe (3 steps, S2 groups 16 -> 48 -> 128) in one process (accumulation 2 and 4); with
    --context_parallel 2 on 2 processes (DDP, FSDP2, ZeRO-3) and on 4 (2 replicas); under DDP, FSDP2 and ZeRO-3 (2
    processes each); FSDP2 and ZeRO-3 resumed from their step-2 checkpoints."""
    return BENCH.run_all(tmp_path_factory.mktemp("distributed"))


# slow: the `runs` fixture launches the recipe 13 times in 1, 2 and 4 processes: 123 s on this 2-core CPU (the
# seconds of docs/distributed.json, summed; test_the_slow_launches_take_what_the_docs_say)
@pytest.mark.slow
@pytest.mark.parametrize(
    "name, reference",
    [("cp", "single"), ("cp_fsdp", "single"), ("cp_zero3", "single"), ("cp_dp", "ddp"), ("sft_cp", "sft")],
)
def test_context_parallel_run_equals_one_rank_per_row(runs, name, reference):
    """Ranks each holding half of every 256-token row train the same adapter as one rank per row: 2 ranks (DDP,
    FSDP2 or ZeRO-3) as one process, on packed text and on padded conversations with assistant-only loss, 4 ranks (2
    replicas of 2) as 2 DDP processes. Same losses and gradient norms at every
    step (through the group schedule), adapter tensors within 1e-5."""
    one, cp = runs[reference], runs[name]
    assert len(cp["steps"]) == 3
    for (loss_a, norm_a), (loss_b, norm_b) in zip(one["steps"], cp["steps"], strict=True):
        assert abs(loss_a - loss_b) < 1e-4 and abs(norm_a - norm_b) < 1e-4 * max(1.0, norm_a)
    assert BENCH.largest_difference(one["tensors"], cp["tensors"]) < 1e-5
    train = cp["record"]["train"]
    assert train["context_parallel"] == 2 and train["processes"] == (4 if name == "cp_dp" else 2)
    assert train["engine"] == {"cp_fsdp": "fsdp2", "cp_zero3": "deepspeed"}.get(name, "ddp")
    assert "GiB allocated per rank of 2 + " in cp["log"]  # the plan is one rank's: half of every row
    if name == "cp_zero3":  # TRL turns PEFT's checkpointing reentrant under ZeRO-3: the exchange runs through it
        assert "`use_reentrant` is forced to `True`" in cp["log"]


@pytest.mark.slow
@pytest.mark.parametrize("engine, name", [("ddp", "ddp"), ("fsdp", "fsdp2"), ("zero3", "deepspeed")])
def test_engines_train_like_one_process(runs, engine, name):
    """QLoRA with trained embeddings and norms under DDP, FSDP2 and DeepSpeed ZeRO-3 (NF4 stored as the compute
    dtype, sharded), 2 processes x accumulation 2: the same losses and gradient norms at every step and the same
    adapter as one process with accumulation 4 on the same rows (under ZeRO-3 with each NF4 layer's codes released
    with the layer: distributed.release_nf4_codes)."""
    one, launched = runs["single_x4"], runs[engine]
    assert BENCH.largest_difference(one["tensors"], launched["tensors"]) < 1e-6
    assert len(launched["steps"]) == 3
    for (loss_a, norm_a), (loss_b, norm_b) in zip(one["steps"], launched["steps"], strict=True):
        assert abs(loss_a - loss_b) < 1e-4 and abs(norm_a - norm_b) < 1e-4 * max(1.0, norm_a)
    assert launched["record"]["train"]["engine"] == name and launched["record"]["train"]["processes"] == 2
    # under ZeRO-3 every NF4 layer (2 layers x 7 projections) lets its codes go with DeepSpeed's release
    assert ("ZeRO-3: 14 NF4 layers release their codes" in launched["log"]) == (engine == "zero3")


def test_the_slow_launches_take_what_the_docs_say():
    """The time of the `runs` fixture's launches, as docs/distributed.md and the comment above state it: the seconds
    that `bench/distributed.py check --record` wrote to docs/distributed.json, summed."""
    launches = json.loads((ROOT / "docs/distributed.json").read_text())["check"]
    said = f"{round(sum(r['seconds'] for r in launches))} s on this 2-core CPU"
    doc, here = (ROOT / "docs/distributed.md").read_text(), (ROOT / "tests/test_distributed.py").read_text()
    assert said in doc and said in here and f"the same {len(launches)} launches" in doc, said
    assert f"launches the recipe {len(launches)} times" in here


def test_the_supported_table_names_tests_that_exist():
    """docs/distributed.md's supported table says which test trains or checks each cell: every one it names exists."""
    text = (ROOT / "docs/distributed.md").read_text()
    table = text.split("## What is supported")[1].split("Also refused in one line")[0]
    named = set(re.findall(r"\b(test_\w+)\b(?!\.py)", table))  # the tests, not their files
    defined = {
        m for p in (ROOT / "tests").glob("test_*.py") for m in re.findall(r"^def (test_\w+)", p.read_text(), re.M)
    }
    assert len(named) >= 8 and named <= defined, named - defined


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_sharded_engines_resume_and_train_the_embeddings(runs, engine):
    """A sharded run resumed from its step-2 checkpoint (FSDP's optimizer.bin, DeepSpeed's global_step2) ends at the
    same adapter; the trained embedding, sharded like any weight, moved from the base."""
    fsdp, resumed = runs[engine], runs[f"{engine}_resumed"]
    assert "resuming from" in resumed["log"] and "checkpoint-2" in resumed["log"]
    assert BENCH.largest_difference(fsdp["tensors"], resumed["tensors"]) < 1e-6
    (embed,) = [v for k, v in fsdp["tensors"].items() if "embed_tokens" in k]
    base = load_file(fsdp["dir"] / "tiny-base" / "model.safetensors")["model.embed_tokens.weight"]
    assert (embed.float() - base.float()).abs().max() > 1e-4


@pytest.mark.slow
def test_a_signal_to_one_process_stops_every_process_after_the_same_step(runs, tmp_path):
    """SIGTERM reaching rank 1 alone during step 1: both ranks save checkpoint-1 (not a scheduled save) and stop in
    one line each; resumed on 2 processes, the run ends at the uninterrupted DDP run's adapter."""
    out = tmp_path / "stopped"
    done = subprocess.run(
        [*BENCH.torchrun(2), "tests/kill_points.py", "sigterm:1:1", BENCH.RECIPE, *BENCH.TINY, "--output_dir", out],
        cwd=ROOT, env=BENCH.environment(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    text = done.stdout + done.stderr
    assert done.returncode != 0 and "exitcode  : 130" in text, text[-3000:]
    for cause in ("SIGTERM", "a signal to another process"):  # rank 1, and rank 0 told by it
        assert f"interrupted: {cause} at step 1 of 3: checkpoint-1 in {out} holds the run" in text, text[-3000:]
    assert checkpoints.checkpoint_problem(out / "checkpoint-1") == ""
    assert not (out / "checkpoint-2").exists() and not (out / "adapter_config.json").exists()
    resumed = BENCH.run(
        [*BENCH.torchrun(2), BENCH.RECIPE, *BENCH.TINY, "--output_dir", str(out), "--resume_from_checkpoint", "auto"],
        out,
    )
    assert "checkpoint-1" in resumed["log"]
    assert BENCH.largest_difference(runs["ddp"]["tensors"], resumed["tensors"]) < 1e-6


@pytest.mark.slow
def test_the_context_parallel_memory_bench_measures_every_rank(tmp_path):
    """bench/cp_memory.py on 2 processes (tiny shapes): a peak per rank, the borrowing rank's never lower (rank 0
    borrows nothing; both peak in TRL's CPU fold of the logits here), and the per-rank plan below the plan of one
    process holding the whole row."""
    out = tmp_path / "cp.json"
    done = subprocess.run(
        [*BENCH.torchrun(2), "bench/cp_memory.py", "--models", "tiny", "--layers", "2", "--contexts", "1024",
         "--json", out],
        cwd=ROOT, env=BENCH.environment(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (point,) = json.loads(out.read_text())["points"]
    first, second = point["peak_bytes_by_rank"]
    assert second >= first > 0 and point["peak_bytes"] == second
    assert point["planned_bytes"] < point["planned_one_process_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, bench, sharding", [("fsdp2_qlora", "fsdp_memory", "fsdp2"), ("deepspeed_zero3", "zero3_memory", "zero3")]
)
def test_the_sharded_memory_benches_measure_every_process(config, bench, sharding, tmp_path):
    """bench/fsdp_memory.py and bench/zero3_memory.py on 2 processes (tiny shapes, 1 and 2 layers): a point per
    depth with each process's peak, as the sharded calibration (tests/test_plan.py) reads them, and the tables
    rendered from the record."""
    out = tmp_path / f"{bench}.json"
    done = subprocess.run(
        [*BENCH.accelerate(f"configs/accelerate/{config}.yaml", 2), "--mixed_precision", "bf16", f"bench/{bench}.py",
         "--models", "tiny",
         "--layers", "1", "2", "--contexts", "256", "--json", out],
        cwd=ROOT, env=BENCH.environment(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    points = json.loads(out.read_text())["points"]
    assert [(p["layers"], p["processes"], p["sharding"]) for p in points] == [(1, 2, sharding), (2, 2, sharding)]
    assert all(p["peak_bytes"] == max(p["peak_bytes_by_rank"]) > 0 for p in points)
    # the optimizer step's own peak: recorded in every process, at most the whole step's
    assert all(0 < s <= p for q in points for s, p in zip(q["step_peak_bytes_by_rank"], q["peak_bytes_by_rank"]))
    shown = subprocess.run(
        [sys.executable, "bench/fsdp_memory.py", "--report_from", out], cwd=ROOT, capture_output=True, text=True
    )
    assert shown.returncode == 0 and "| tiny | LoRA+ | 2 | 256 | 2 |" in shown.stdout, shown.stderr[-2000:]
    assert f"| tiny | {sharding} | 2 | 256 |" in shown.stdout.split("optimizer step's own peak")[1]


@pytest.mark.slow
def test_zero3_keeps_the_most_recent_parameters_up_to_its_limit(tmp_path):
    """bench/zero3_keep.py (tiny, 4 layers, 2 processes): the first step releases everything; from the second on,
    with DeepSpeed's default limit every layer, the head and the used embedding stay gathered at the loss, and with a
    limit below the head's size only the head (plan_sharding.zero3_bytes' rule at both ends)."""
    out = tmp_path / "keep.json"
    done = subprocess.run(
        [*BENCH.accelerate("configs/accelerate/deepspeed_zero3.yaml", 2), "--mixed_precision", "bf16",
         "bench/zero3_keep.py", "--models", "tiny", "--layers", "4", "--limits", "1e9", "6e4", "--context", "256",
         "--json", out],
        cwd=ROOT, env=BENCH.environment(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    default, small = json.loads(out.read_text())["points"]  # in the order measured
    for p in (default, small):
        assert p["kept_by_step"][0] == 0 and p["kept_by_step"][1] == p["kept_by_step"][2] > 0
    values = default["values"]  # the embedding's two tables: the frozen original (never called) and the trained copy
    assert default["kept_layers"] == [0, 1, 2, 3] and default["kept"]["head"] == values["head"]
    assert default["kept_by_step"][-1] == values["layers"] + values["head"] + values["embedding"] // 2
    assert small["kept"] == {"head": values["head"]} and values["head"] > 6e4


# ----------------------------------------------------------------------------------------------- the configs
@pytest.mark.parametrize("name", ["fsdp2_qlora", "deepspeed_zero3"])
def test_accelerate_configs_parse_and_validate(name, monkeypatch):
    """Every key of the shipped configs is one accelerate launch knows (its YAML loader checks only the top level),
    the launch validates, and the environment it sets is what this toolkit reads as FSDP2 / ZeRO-3."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = ROOT / "configs/accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    parser = launch_command_parser()
    known = {action.dest for action in parser._actions}
    nested = {**(config.fsdp_config or {}), **(config.deepspeed_config or {})}
    assert nested and set(nested) <= known, set(nested) - known
    args = parser.parse_args(["--config_file", str(path), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "FSDP_VERSION", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(key, raising=False)
    if name == "fsdp2_qlora":
        env = prepare_multi_gpu_env(args)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and "FULL_STATE_DICT" in str(plugin.state_dict_type)
        assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
        assert (launch().engine, launch().shards_weights) == ("fsdp2", True)
    else:
        assert args.use_deepspeed
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
        cmd, env = prepare_deepspeed_cmd_env(args)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert (launch().engine, launch().zero_stage, launch().shards_weights) == ("deepspeed", 3, True)
        assert launch().whole_state_dict  # stage3_gather_16bit_weights_on_model_save, from the DeepSpeed JSON
        assert_buckets_sized_by_the_model(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"])


def assert_buckets_sized_by_the_model(config_file: str) -> None:
    """The shipped DeepSpeed JSON, as the Trainer completes it for a 4096-wide model: the gradient bucket is
    hidden x hidden values (DeepSpeed's default, 500M, is a 0.93 GiB bf16 buffer in every process), and the rest of
    the run's settings come from the launch and the Trainer."""
    import types

    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    config = HfTrainerDeepSpeedConfig(json.loads((ROOT / config_file).read_text()))
    args = TrainingArguments(
        output_dir="unused", use_cpu=True, bf16=True, per_device_train_batch_size=1, gradient_accumulation_steps=2
    )
    config.trainer_config_process(args)
    config.trainer_config_finalize(args, types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=4096)), 10)
    zero = config.config["zero_optimization"]
    assert (zero["stage"], zero["reduce_bucket_size"], zero["stage3_param_persistence_threshold"]) == (
        3,
        4096 * 4096,
        10 * 4096,
    )
    assert zero["stage3_gather_16bit_weights_on_model_save"] and config.config["bf16"] == {"enabled": True}
    assert config.config["gradient_accumulation_steps"] == 2


# ------------------------------------------------------------------------- the documented accelerate commands
CONFIGS = sorted((ROOT / "configs/accelerate").glob("*.yaml"))
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.py") if p.stem != "quickstart")  # quickstart: 1 CPU


def documented_commands() -> list[str]:
    """Every `accelerate launch` command of the README, docs/ and the configs' comments, as written."""
    texts = [p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *CONFIGS]]
    lines = [line.lstrip("# ").strip() for text in texts for line in text.splitlines()]
    return [line for line in lines if line.startswith("accelerate launch ")]


def precision_table() -> dict[str, list[tuple[list[str], list[str]]]]:
    """docs/distributed.md's table of precision flags: recipe -> each documented launch, as (accelerate flags,
    recipe flags)."""
    table = {}
    for line in (ROOT / "docs/distributed.md").read_text().splitlines():
        cells = line.split("|")
        if line.startswith("| `") and len(cells) == 5:
            flags = [shlex.split(f) for f in re.findall(r"`([^`]+)`", cells[3])] or [[]]
            launches = [(f, []) if f[:1] == ["--mixed_precision"] else ([], f) for f in flags]
            table.update(dict.fromkeys(re.findall(r"`(\w+)`", cells[1]), launches))
    return table


@pytest.fixture
def accelerate_launch(monkeypatch, tmp_path):
    """`accelerate_launch(argv)`: the recipe of `accelerate launch <argv>` resolved (--dry_run's checks, no weights)
    in the environment that launch gives its processes, set here as in the config test above; the process count in
    `hardware.launch` (WORLD_SIZE > 1 would make TrainingArguments join a process group)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.state import AcceleratorState
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    from trl import TrlParser

    from longqlora.config_file import parse_with_config
    from longqlora.training.config import RunConfig
    from longqlora.training.run import resolve

    def forget():  # transformers' ZeRO-3 switch (set by TrainingArguments under DeepSpeed) and accelerate's state
        unset_hf_deepspeed_config()
        AcceleratorState._reset_state(reset_partial_state=True)

    def resolved(argv: list[str]):
        forget()
        args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
        if args.use_deepspeed:
            args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
            env = prepare_deepspeed_cmd_env(args)[1]
        else:
            env = prepare_multi_gpu_env(args)
        for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))] + [
            "WORLD_SIZE",
            "RANK",
            "LOCAL_RANK",
        ]:
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        read = launch
        monkeypatch.setattr(hardware, "launch", lambda: dataclasses.replace(read(), world_size=args.num_processes))
        monkeypatch.setattr(distributed, "launch", hardware.launch)
        recipe = load_script(args.training_script)
        parser = TrlParser((recipe.Model, recipe.Data, RunConfig, recipe.Training))
        argv = [*args.training_script_args, "--output_dir", str(tmp_path / "out"), "--dry_run"]
        return resolve(*parse_with_config(parser, argv))

    yield resolved
    monkeypatch.undo()
    forget()


@pytest.mark.parametrize("command", documented_commands())
def test_every_documented_accelerate_command_resolves(command, accelerate_launch):
    """... and counts its parameters as --dry_run does (under ZeRO-3 without starting torch.distributed)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from longqlora.cli import dry_run_counts

    argv = shlex.split(command, comments=True)[2:]
    run = accelerate_launch(argv)
    assert hardware.launch().engine in ("fsdp2", "deepspeed") and hardware.launch().world_size == 8
    assert hardware.launch().mixed_precision == {"float16": "fp16", "bfloat16": "bf16"}[run.info.compute_dtype]
    zero3 = is_deepspeed_zero3_enabled()
    assert zero3 == (hardware.launch().engine == "deepspeed")
    counts = dry_run_counts(run)
    assert counts["trainable_params"] > 0 and counts["total_params"] > 6e9
    assert is_deepspeed_zero3_enabled() == zero3  # the switch is back for training


def test_the_precision_table_names_every_recipe():
    table = precision_table()
    assert sorted(table) == RECIPES
    assert len(documented_commands()) >= 2 * len(CONFIGS) + 1


@pytest.mark.parametrize("config", [p.name for p in CONFIGS])
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_launches_under_every_config_as_documented(config, recipe, accelerate_launch):
    """Each launch the table documents resolves: a V100 recipe (float16) with --mixed_precision fp16 or with
    --compute_dtype bfloat16, an A100 recipe as it is; without either, a V100 recipe under the configs' bf16 is
    refused in one line that names both."""
    for launcher, flags in precision_table()[recipe]:
        argv = ["--config_file", f"configs/accelerate/{config}", *launcher, f"recipes/{recipe}.py", *flags]
        run = accelerate_launch(argv)
        assert hardware.launch().shards_weights and run.model.load_in_4bit
        assert hardware.launch().mixed_precision == {"float16": "fp16", "bfloat16": "bf16"}[run.info.compute_dtype]
    if load_script(f"recipes/{recipe}.py").Model.compute_dtype == "float16":
        with pytest.raises(ValueError) as err:
            accelerate_launch(["--config_file", f"configs/accelerate/{config}", f"recipes/{recipe}.py"])
        message = str(err.value)
        assert "\n" not in message and len(message) < 300, message
        assert "--mixed_precision bf16 with --compute_dtype float16" in message
        assert "add --mixed_precision fp16" in message and "--compute_dtype bfloat16" in message


@pytest.mark.parametrize("version", ["1", "2"])
@pytest.mark.parametrize("state_dict_type", [None, "FULL_STATE_DICT", "SHARDED_STATE_DICT"])
def test_the_state_dict_type_is_read_as_accelerate_reads_it(version, state_dict_type, monkeypatch):
    """A launch config without fsdp_state_dict_type is SHARDED under FSDP2 (accelerate's default): refused, not
    taken for a whole state dict."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", version)
    if state_dict_type is None:
        monkeypatch.delenv("FSDP_STATE_DICT_TYPE", raising=False)
    else:
        monkeypatch.setenv("FSDP_STATE_DICT_TYPE", state_dict_type)
    plugin = FullyShardedDataParallelPlugin()
    assert launch().whole_state_dict == ("FULL_STATE_DICT" in str(plugin.state_dict_type))
    assert launch().whole_state_dict == (
        state_dict_type == "FULL_STATE_DICT" or (state_dict_type, version) == (None, "1")
    )


# ------------------------------------------------------------------------------------------ checks, one process
def _training(**changes):
    """The training flags with `changes`; the engine flags (TrainingArguments validates them against files and a
    GPU, and a DeepSpeed config would switch transformers' global ZeRO-3 state) only as the attributes read."""
    import types

    from longqlora.training.config import TrainingConfig

    engine = {k: changes.pop(k) for k in ("deepspeed", "fsdp") if k in changes}
    training = TrainingConfig(output_dir="/tmp/unused", **changes)
    return types.SimpleNamespace(**{**vars(training), **engine}) if engine else training


@pytest.mark.parametrize(
    "run, model, training, flag",
    [
        (Launch(8, 0, 0, "fsdp1"), {}, {}, "fsdp_version 1"),
        (Launch(8, 0, 0, "deepspeed", 2), {"load_in_4bit": False}, {}, "stage 2"),
        (Launch(3, 0, 0, "ddp"), {"context_parallel": 2}, {}, "--context_parallel 2"),
        (Launch(2, 0, 0, "ddp"), {"context_parallel": 2}, {"chunked_loss": False}, "--chunked_loss false"),
        (Launch(2, 0, 0, "ddp"), {"context_parallel": 2}, {"average_tokens_across_devices": False}, "--average_tokens"),
        (Launch(2, 0, 0, "ddp"), {"context_parallel": 2}, {"dataloader_num_workers": 2}, "--dataloader_num_workers 2"),
        (Launch(2, 0, 0, "fsdp2", None, False), {}, {}, "fsdp_state_dict_type: FULL_STATE_DICT"),
        (Launch(2, 0, 0, "deepspeed", 3, False), {}, {}, "zero3_save_16bit_model: true"),
        (Launch(2, 0, 0, "none"), {}, {"deepspeed": "ds.json"}, "--deepspeed"),
        (Launch(2, 0, 0, "none"), {}, {"fsdp": "full_shard"}, "--fsdp"),
    ],
)
def test_unsupported_launches_are_refused_in_one_line(run, model, training, flag):
    cfg = ModelConfig(model_name_or_path="x", target_context=8192, **model)
    with pytest.raises(ValueError) as err:
        distributed.check_launch(cfg, _training(**training), run)
    message = str(err.value)
    assert flag in message and "\n" not in message and len(message) < 300


def test_nf4_weights_are_never_cast_by_the_engine():
    """NF4 bytes stored as the compute dtype under FSDP2/ZeRO-3: a launch whose mixed precision differs is refused."""
    distributed.check_precision(Launch(8, 0, 0, "fsdp2", mixed_precision="bf16"), "bfloat16", True)
    distributed.check_precision(Launch(8, 0, 0, "ddp", mixed_precision="fp16"), "bfloat16", True)  # not sharded
    distributed.check_precision(Launch(8, 0, 0, "fsdp2", mixed_precision="fp16"), "bfloat16", False)  # no NF4
    with pytest.raises(ValueError, match="--mixed_precision bf16"):
        distributed.check_precision(Launch(8, 0, 0, "deepspeed", 3, mixed_precision="fp16"), "bfloat16", True)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from longqlora.training.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "gqa", shape="gqa")


@pytest.mark.parametrize(
    "run, storage",
    [
        (Launch(2, 0, 0, "fsdp2"), torch.bfloat16),
        (Launch(2, 0, 0, "deepspeed", 3), torch.bfloat16),
        (Launch(2, 0, 0, "ddp"), torch.uint8),
        (Launch(1, 0, 0, "none"), torch.uint8),
    ],
)
def test_nf4_is_stored_in_the_compute_dtype_where_the_engine_shards_weights(run, storage, tiny_base, monkeypatch):
    """Under FSDP2 and ZeRO-3 the NF4 codes are stored in the compute dtype (FSDP shards and gathers one dtype;
    uint8 storage crashes FSDP2 or trains with loss 0), elsewhere in bitsandbytes' uint8: the quantization config
    and every Linear4bit weight of the loaded tiny model."""
    import bitsandbytes as bnb

    from longqlora.model import load_base

    monkeypatch.setattr(hardware, "launch", lambda: run)
    cfg = ModelConfig(model_name_or_path=str(tiny_base), target_context=256, compute_dtype="bfloat16")
    model, _, _ = load_base(cfg)
    assert model.config.quantization_config.bnb_4bit_quant_storage == storage
    nf4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(nf4) == 2 * 7 and {m.weight.dtype for m in nf4} == {storage}  # 2 layers x q/k/v/o/gate/up/down


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_nf4_layers_released_keep_nothing_of_their_codes_for_the_backward():
    """Under ZeRO-3 each NF4 layer runs through `_Released4bit`: the same output and input gradient as bitsandbytes'
    own, with nothing of the weight kept on the autograd node: a weight swapped after the forward (as DeepSpeed
    releases and gathers a layer) is what the backward uses, where bitsandbytes' node keeps the codes it had."""
    _released_against_bitsandbytes("cpu")


@pytest.mark.gpu
@CUDA
def test_nf4_layers_released_on_cuda_equal_bitsandbytes():
    """The same on CUDA, through bitsandbytes' CUDA kernels."""
    _released_against_bitsandbytes("cuda")


def _released_against_bitsandbytes(device):
    import bitsandbytes as bnb

    def layer(seed):
        torch.manual_seed(seed)
        linear = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        return linear.requires_grad_(False).to(device)

    x = torch.randn(2, 5, 128, device=device)
    ours, theirs, other = layer(0), layer(0), layer(1)
    assert distributed.release_nf4_codes(torch.nn.Sequential(ours)) == 1
    assert distributed.release_nf4_codes(torch.nn.Sequential(ours)) == 0  # once per layer
    outputs, grads = [], []
    for linear, swap in ((theirs, False), (ours, False), (theirs, True), (ours, True)):
        xi = x.clone().requires_grad_()
        out = linear(xi)
        if swap:  # another layer's codes in place of these (quant_state with them), as a new param.data
            kept = linear.weight.data, linear.weight.quant_state
            linear.weight.data, linear.weight.quant_state = other.weight.data, other.weight.quant_state
        out.float().square().sum().backward()
        if swap:
            linear.weight.data, linear.weight.quant_state = kept
        outputs.append(out)
        grads.append(xi.grad)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(grads[0], grads[1])  # bitsandbytes' results exactly
    assert torch.equal(grads[2], grads[0])  # bitsandbytes' node kept its codes
    assert (grads[3] - grads[1]).abs().max() > 0.1  # ours read the weight again: the swapped one
    with torch.no_grad():  # inference: bitsandbytes' own path
        assert torch.equal(ours(x), theirs(x))


def test_launch_reads_a_deepspeed_json(tmp_path, monkeypatch):
    config = tmp_path / "ds.json"
    config.write_text('{"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": false}}')
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", raising=False)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    run = launch()
    assert (run.engine, run.zero_stage, run.whole_state_dict) == ("deepspeed", 3, False)
    # strings as DeepSpeed reads them ("false" is false), "auto" as accelerate fills it (its setting; stage 2 unset)
    for stage, save, env, expected in (
        (3, '"false"', {}, (3, False)),
        ('"auto"', '"auto"', {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, (3, False)),
        ('"auto"', '"auto"', {"ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true"}, (2, True)),
        (3, '"true"', {}, (3, True)),
    ):
        config.write_text(
            f'{{"zero_optimization": {{"stage": {stage}, "stage3_gather_16bit_weights_on_model_save": {save}}}}}'
        )
        for name in ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        run = launch()
        assert (run.zero_stage, run.whole_state_dict) == expected


@pytest.mark.parametrize(
    "text",
    [
        '{"zero_optimization": {"stage": 3,}',
        '["stage", 3]',
        '{"zero_optimization": 3}',
        '{"bf16": {"enabled": true}}',
        '{"zero_optimization": {"stage": 3, "stage3_max_live_parameters": -5}}',
    ],
)
def test_a_malformed_deepspeed_json_is_named_in_one_line(text, tmp_path, monkeypatch):
    """A DeepSpeed JSON that does not parse, holds no zero_optimization object or a negative live limit, is refused
    naming the file; accelerate's "none" (no JSON) is no file; a limit as a string is read as DeepSpeed reads it."""
    config = tmp_path / "ds.json"
    config.write_text(text)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    with pytest.raises(ValueError) as refused:
        launch()
    assert str(refused.value).startswith(str(config)) and "\n" not in str(refused.value)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    assert launch().zero3_live_values == 1_000_000_000
    config.write_text('{"zero_optimization": {"stage": 3, "stage3_max_live_parameters": "1e8", '
                      '"stage3_max_reuse_distance": "100000000"}}')  # fmt: skip
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    assert launch().zero3_live_values == 100_000_000


@pytest.mark.parametrize("written, says", [(True, "not valid JSON"), (False, "no such file")])
def test_a_recipe_names_a_malformed_deepspeed_json_before_accelerate_reads_it(written, says, tmp_path):
    """accelerate parses the launch's DeepSpeed JSON while the recipe's SFTConfig is built, and its error names no
    file (or, for a missing one, no fix: the shipped yaml names its JSON relative to the repository's root): the
    recipe reads the launch first and ends on one line naming it (exit 2, no traceback)."""
    config = tmp_path / "ds.json"
    if written:
        config.write_text('{"zero_optimization": {"stage": 3,}')
    env = {**os.environ, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(config)}
    done = subprocess.run(
        [sys.executable, "recipes/extend_7b_8k.py", "--dry_run"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert str(config) in last and says in last and len(last) < 300


def test_supported_launches_pass():
    for run, model in [
        (Launch(1, 0, 0, "none"), {}),
        (Launch(8, 0, 0, "fsdp2"), {}),
        (Launch(8, 0, 0, "deepspeed", 3), {}),
        (Launch(4, 0, 0, "ddp"), {"context_parallel": 2}),
        (Launch(4, 0, 0, "fsdp2"), {"context_parallel": 4, "s2_group_schedule": "none"}),
        (Launch(2, 0, 0, "deepspeed", 3), {"context_parallel": 2, "load_in_4bit": False}),
    ]:
        cfg = ModelConfig(model_name_or_path="x", target_context=8192, **model)
        assert distributed.check_launch(cfg, _training(), run) is run


@pytest.mark.parametrize("cp", [1, 2])
@pytest.mark.parametrize("trainable", ["", "embed,norm"])
@pytest.mark.parametrize("load_in_4bit", [True, False])
@pytest.mark.parametrize("engine", ["none", "ddp", "fsdp2", "zero3", "fsdp1", "zero2"])
def test_every_cell_of_the_supported_table_is_checked(engine, load_in_4bit, trainable, cp):
    """docs/distributed.md's table, every engine x NF4 / 16-bit x LoRA / LoRA+ x context parallel, in a bf16 launch
    of 2 processes: the supported cells pass the checks made before weights load (launch and precision); FSDP1,
    ZeRO-2 and one process with --context_parallel are refused in one line. A cell this test alone covers is
    "checked", not trained."""
    stage = {"zero3": 3, "zero2": 2}.get(engine)
    run = Launch(1 if engine == "none" else 2, 0, 0, "deepspeed" if stage else engine, stage)
    run = dataclasses.replace(run, mixed_precision="no" if engine == "none" else "bf16")
    cfg = ModelConfig(
        model_name_or_path="x", target_context=8192, compute_dtype="bfloat16", load_in_4bit=load_in_4bit,
        trainable_params=trainable, context_parallel=cp,
    )  # fmt: skip
    refused = {"fsdp1": "fsdp_version 1", "zero2": "ZeRO stage 2"}.get(engine)
    if engine == "none" and cp > 1:
        refused = "--context_parallel 2: needs 2 processes"
    if refused:
        with pytest.raises(ValueError, match=refused) as err:
            distributed.check_launch(cfg, _training(), run)
        assert "\n" not in str(err.value)
        return
    assert distributed.check_launch(cfg, _training(), run) is run
    distributed.check_precision(run, cfg.compute_dtype, cfg.load_in_4bit)


@pytest.mark.parametrize(
    "changes, flag",
    [
        ({"context_parallel": 8}, "--context_parallel 8"),  # 1024-token chunks < the last group (4096)
        ({"context_parallel": 3}, "--context_parallel 3"),  # 8192 / 3 is not whole
        ({"context_parallel": 2, "s2_attention": False}, "--context_parallel 2"),
        ({"context_parallel": 2, "pose_window": 2048}, "--pose_window 2048"),
        ({"context_parallel": 2, "s2_full_every": 4}, "--s2_full_every 4"),
        ({"context_parallel": 0}, "--context_parallel 0"),
    ],
)
def test_context_parallel_config_is_checked(changes, flag):
    with pytest.raises(ValueError, match=flag.replace("-", r"\-")):
        ModelConfig(model_name_or_path="x", target_context=8192, **changes)
    ok = ModelConfig(model_name_or_path="x", target_context=8192, context_parallel=4, s2_group_schedule="none")
    assert ok.group_sizes == [2048]  # 2048-token chunks hold the one 2048-token group


def test_share_rows_gives_a_group_the_same_rows_through_accelerate_sharding(monkeypatch, caplog):
    """accelerate's own batch sharding (BatchSamplerShard over a sequential sampler) applied to `share_rows`: with
    4 processes in 2 groups of 2, both ranks of a group read the same rows, the groups different ones, and every
    row is read once per epoch (up to the last incomplete step), each epoch in a shuffle of its own."""
    from accelerate.data_loader import BatchSamplerShard
    from datasets import Dataset
    from torch.utils.data import BatchSampler, SequentialSampler

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    data = Dataset.from_dict({"row": list(range(23))})
    with caplog.at_level("WARNING", logger="longqlora.training.distributed"):
        shared = distributed.share_rows(data, per_device_batch=2, cp=2, seed=0)
    assert "3 of 23 packed rows do not fill a step" in caplog.text  # said, not dropped silently
    read = {}
    for rank in range(4):
        sampler = BatchSamplerShard(BatchSampler(SequentialSampler(shared), 2, False), 4, rank)
        read[rank] = [[shared[i]["row"] for i in batch] for batch in sampler]
    assert read[0] == read[1] and read[2] == read[3] and read[0] != read[2]
    rows = [r for rank in (0, 2) for batch in read[rank] for r in batch]
    assert len(rows) == len(set(rows)) == 20  # 5 steps x 2 groups x 2 rows; 3 rows left over
    in_order = distributed.share_rows(data, per_device_batch=2, cp=2, seed=None)
    assert [in_order[i]["row"] for i in range(8)] == [0, 1, 0, 1, 2, 3, 2, 3]
    # Each epoch in its own shuffle, as a shuffling sampler would: laid out in advance for the epochs a run reads.
    two = distributed.share_rows(data, per_device_batch=2, cp=2, seed=0, epochs=2)
    assert len(two) == 2 * len(shared) and [two[i]["row"] for i in range(len(shared))] == shared["row"]
    epochs = []
    for rank in (0, 1, 2, 3):
        batches = BatchSamplerShard(BatchSampler(SequentialSampler(two), 2, False), 4, rank)
        epochs.append([[two[i]["row"] for i in batch] for batch in batches])
    assert epochs[0] == epochs[1] and epochs[2] == epochs[3]
    first, second = ([r for rank in (0, 2) for b in epochs[rank][e * 5 : e * 5 + 5] for r in b] for e in (0, 1))
    assert len(set(first)) == len(set(second)) == 20 and first != second
    args = types.SimpleNamespace(max_steps=7, gradient_accumulation_steps=2, num_train_epochs=3.0)
    assert distributed.epochs_to_share(args, steps_per_epoch=5) == 3  # 14 batches of 5 an epoch
    args.max_steps = -1
    assert distributed.epochs_to_share(args, steps_per_epoch=5) == 3
    args.num_train_epochs = 0.5
    assert distributed.epochs_to_share(args, steps_per_epoch=5) == 1


def test_collator_cuts_shifted_labels_and_positions(monkeypatch):
    """The second of 2 ranks keeps the second half of each row: its labels are the row's shifted labels (the
    last one -100), positions and padding follow the chunk, and rows are padded to the training length first."""
    from longqlora.attention.context_parallel import CPGroup

    group = CPGroup(group=None, index=1, size=2, first_rank=0)
    monkeypatch.setattr(distributed.ContextParallelCollator, "_check_same_rows", lambda self, ids: None)
    ids = torch.arange(10, 16).unsqueeze(0)  # 6 tokens, padded to 8
    collate = distributed.ContextParallelCollator(lambda ex: {"input_ids": ids, "labels": ids.clone()}, group, 8, 0)
    batch = collate([{}])
    assert batch["input_ids"].tolist() == [[14, 15, 0, 0]]
    assert batch["shift_labels"].tolist() == [[15, -100, -100, -100]] == batch["labels"].tolist()
    assert batch["position_ids"].tolist() == [[4, 5, 0, 1]]  # the padding is a document of its own
