"""More than one process, measured on this CPU, and the communication of S2-Attn context parallelism by arithmetic.

    python bench/distributed.py comm                  # per-layer traffic: S2 halo vs ring attention vs Ulysses
    python bench/distributed.py plan                  # the planner's longest context by ranks (CP, then FSDP2)
    python bench/distributed.py check --out /tmp/d    # the tiny recipe on 1 process, --context_parallel 2 (DDP,
                                                      # FSDP2, ZeRO-3), DDP, FSDP2 and ZeRO-3 (2 gloo processes
                                                      # each) and both resumed

`check` writes docs/distributed.json (with --record) and prints the table in docs/distributed.md; the same runs are
asserted by tests/test_distributed.py, which imports `run_all` from here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = "recipes/extend_7b_8k.py"
SFT = "recipes/sft_vicuna_13b_8k.py"  # conversations: padded rows, assistant-only loss
# 3 steps through the S2 group schedule (16 -> 48 -> 128 of 256 tokens), every launch reading the same rows in the
# same order, no dropout: the runs differ only in how the work is split.
TINY = ["--tiny", "--max_steps", "3", "--save_steps", "2", "--lora_dropout", "0"]
TINY += ["--train_sampling_strategy", "sequential"]


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", LONGQLORA_TRACEBACK="1", DS_ACCELERATOR="cpu")
    return env


def free_port() -> int:
    """A TCP port nothing listens on now, for one launch's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int) -> list[str]:
    """torchrun on this machine; --standalone binds its rendezvous store to a free port itself (a port picked here
    and bound later could be taken in between by another launch on the same machine)."""
    return [
        *[sys.executable, "-m", "torch.distributed.run", "--standalone", "--local_addr", "127.0.0.1"],
        *["--nproc_per_node", str(n)],
    ]


def accelerate(config: str, n: int) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / config),
        "--num_processes", str(n), "--mixed_precision", "no", "--main_process_port", str(free_port()),
    ]  # fmt: skip


def run(argv: list[str], out: Path) -> dict:
    """Run a launcher and the recipe into `out`: the adapter's tensors, the logged (loss, grad norm) per step, the
    log and the wall time."""
    from safetensors.torch import load_file

    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stdout[-3000:]}{done.stderr[-6000:]}")
    state = json.loads(sorted(out.glob("checkpoint-*/trainer_state.json"))[-1].read_text())
    return {
        "tensors": load_file(out / "adapter_model.safetensors"),
        "steps": [(e["loss"], e["grad_norm"]) for e in state["log_history"] if "loss" in e],
        "log": done.stderr,
        "seconds": seconds,
        "record": json.loads((out / "longqlora_extension.json").read_text()),
        "dir": out,
    }


def largest_difference(a: dict, b: dict) -> float:
    """Largest absolute difference of two adapters' tensors, after checking they have the same keys and shapes."""
    if sorted(a) != sorted(b) or any(a[k].shape != b[k].shape for k in a):
        raise AssertionError("the adapters differ in keys or shapes")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _resume(launcher, source: Path, out: Path) -> dict:
    """Copy a finished run, drop its step-3 checkpoint and adapter, and resume it from step 2."""
    shutil.copytree(source, out)
    for name in ("checkpoint-3", "adapter_model.safetensors", "adapter_config.json"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    return run([*launcher(), *TINY, "--output_dir", str(out), "--resume_from_checkpoint", "auto"], out)


def run_all(root: Path) -> dict:
    """Every launch of the check into `root`/<name>."""
    names = ("single", "single_x4", "cp", "cp_dp", "cp_fsdp", "cp_zero3", "sft", "sft_cp", "ddp", "fsdp")
    names += ("fsdp_resumed", "zero3", "zero3_resumed")
    out = {n: root / n for n in names}

    # each launch picks its port when it starts (accelerate takes no port 0): never one picked minutes before
    def fsdp():
        return [*accelerate("configs/accelerate/fsdp2_qlora.yaml", 2), "tests/fsdp_worker.py", RECIPE]

    def zero3():
        return [*accelerate("configs/accelerate/deepspeed_zero3.yaml", 2), RECIPE]

    results = {
        "single": run([sys.executable, RECIPE, *TINY, "--output_dir", str(out["single"])], out["single"]),
        # the rows of 2 processes x accumulation 2 in one process: what DDP, FSDP2 and ZeRO-3 must equal
        "single_x4": run(
            [sys.executable, RECIPE, *TINY, "--gradient_accumulation_steps", "4", "--output_dir", out["single_x4"]],
            out["single_x4"],
        ),
        "cp": run([*torchrun(2), RECIPE, *TINY, "--context_parallel", "2", "--output_dir", str(out["cp"])], out["cp"]),
        "cp_dp": run(
            [*torchrun(4), RECIPE, *TINY, "--context_parallel", "2", "--output_dir", str(out["cp_dp"])], out["cp_dp"]
        ),
        "cp_fsdp": run(
            [*fsdp(), *TINY, "--context_parallel", "2", "--output_dir", str(out["cp_fsdp"])], out["cp_fsdp"]
        ),
        "cp_zero3": run(
            [*zero3(), *TINY, "--context_parallel", "2", "--output_dir", str(out["cp_zero3"])], out["cp_zero3"]
        ),
        "sft": run([sys.executable, SFT, *TINY, "--output_dir", str(out["sft"])], out["sft"]),
        "sft_cp": run(
            [*torchrun(2), SFT, *TINY, "--context_parallel", "2", "--output_dir", str(out["sft_cp"])], out["sft_cp"]
        ),
        "ddp": run([*torchrun(2), RECIPE, *TINY, "--output_dir", str(out["ddp"])], out["ddp"]),
        "fsdp": run([*fsdp(), *TINY, "--output_dir", str(out["fsdp"])], out["fsdp"]),
        "zero3": run([*zero3(), *TINY, "--output_dir", str(out["zero3"])], out["zero3"]),
    }
    results["fsdp_resumed"] = _resume(fsdp, out["fsdp"], out["fsdp_resumed"])
    results["zero3_resumed"] = _resume(zero3, out["zero3"], out["zero3_resumed"])
    return results


def summary(results: dict) -> list[dict]:
    """One row per launch: what it is compared with, the largest adapter difference, its losses and time."""
    rows = []
    for name, reference, what in [
        ("single", None, "1 process"),
        ("cp", "single", "2 processes, --context_parallel 2 (each half of every row)"),
        ("cp_fsdp", "single", "2 processes, FSDP2 and --context_parallel 2"),
        ("cp_zero3", "single", "2 processes, DeepSpeed ZeRO-3 and --context_parallel 2"),
        ("sft", None, "conversations (Vicuna SFT recipe), 1 process"),
        ("sft_cp", "sft", "conversations, 2 processes, --context_parallel 2"),
        ("single_x4", None, "1 process, accumulation 4 (the rows of 2 processes x accumulation 2)"),
        ("ddp", "single_x4", "2 processes, DDP (torchrun)"),
        ("cp_dp", "ddp", "4 processes: 2 replicas x --context_parallel 2"),
        ("fsdp", "single_x4", "2 processes, FSDP2 (fsdp2_qlora.yaml)"),
        ("fsdp_resumed", "fsdp", "FSDP2 resumed from checkpoint-2"),
        ("zero3", "single_x4", "2 processes, DeepSpeed ZeRO-3 (deepspeed_zero3.yaml)"),
        ("zero3_resumed", "zero3", "ZeRO-3 resumed from checkpoint-2"),
    ]:
        r = results[name]
        rows.append(
            {
                "launch": what,
                "compared_with": reference,
                "largest_adapter_difference": largest_difference(results[reference]["tensors"], r["tensors"])
                if reference
                else None,
                "losses": [round(loss, 4) for loss, _ in r["steps"]],
                "grad_norms": [round(norm, 4) for _, norm in r["steps"]],
                "seconds": round(r["seconds"], 1),
            }
        )
    return rows


# --------------------------------------------------------------------------------------------- the arithmetic
def traffic(model: str, tokens: int, ranks: int, group: int, bytes_per_value: int = 2) -> dict:
    """MiB that one rank receives per layer in the forward (the backward sends as much back) for: S2 context
    parallelism on plain rows (the shifted heads' K/V of G/2 tokens) and on packed rows (all heads, G tokens),
    ring attention (every other chunk's K/V) and Ulysses (all-to-all of Q, K, V and the output)."""
    from longqlora.presets import PRESETS

    cfg = PRESETS[model]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg["hidden_size"] // heads
    chunk = tokens // ranks
    kv_token = 2 * kv_heads * head_dim * bytes_per_value  # K and V of one token, all KV heads
    shifted_kv = kv_heads - (heads // 2) // (heads // kv_heads)  # KV heads the shifted query heads read
    mib = 2**20
    return {
        "model": model,
        "tokens": tokens,
        "ranks": ranks,
        "group": group,
        "chunk": chunk,
        "s2_plain_mib": group // 2 * 2 * shifted_kv * head_dim * bytes_per_value / mib,
        "s2_packed_mib": group * kv_token / mib,
        "ring_mib": (ranks - 1) * chunk * kv_token / mib,
        "ulysses_mib": (2 * heads + 2 * kv_heads) * head_dim * bytes_per_value * chunk * (ranks - 1) / ranks / mib,
    }


def comm_table() -> list[dict]:
    rows = []
    for model in ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-3.1-8B"):
        for ranks, group in ((8, 8192), (8, 16384), (4, 32768)):
            rows.append(traffic(model, 131072, ranks, group))
    return rows


def longest_table(gpu: str = "h100-80gb") -> list[dict]:
    """The planner's longest context per rank count (S2-Attn context parallelism, DDP: weights and trained state
    whole on every rank), as asked (no offload) and with every memory switch on, 128 GiB of pinned host memory."""
    from longqlora.presets import preset_config
    from longqlora.training.advice import longest_context
    from longqlora.training.plan import PlanConfig

    rows = []
    for model, trainable in (("llama-2-7b", "embed,norm"), ("llama-3.1-8b", "")):
        config = preset_config(model)
        for ranks in (1, 2, 4, 8):
            cfg = PlanConfig(model=model, context=8192, context_parallel=ranks, gpu=gpu, trainable_params=trainable)
            every = dataclasses.replace(cfg, offload=True, tiled_mlp=True, host_memory=128)
            rows.append(
                {
                    "model": model,
                    "trainable_params": trainable or "LoRA only",
                    "ranks": ranks,
                    "longest": longest_context(config, cfg),
                    "longest_all_switches": longest_context(config, every),
                }
            )
    return rows


def fsdp2_table(gpu: str = "h100-80gb") -> list[dict]:
    """The planner's longest context for one process of FSDP2 over 1 (no sharding) to 8 processes, plain LoRA, with
    every memory switch on (128 GiB of pinned host memory a process): the model sharded alone, and sharded with
    every process also holding 1/N of each row (--context_parallel N, S2-Attn); and ZeRO-3 instead of FSDP2."""
    from longqlora.presets import preset_config
    from longqlora.training.advice import longest_context
    from longqlora.training.plan import PlanConfig

    rows = []
    for model in ("llama-3.1-8b", "llama-2-70b"):
        config = preset_config(model)
        for n in (1, 2, 4, 8):
            sharded = {"processes": n, "sharding": "fsdp2"} if n > 1 else {}
            cfg = PlanConfig(model=model, context=8192, gpu=gpu, trainable_params="", **sharded)
            every = dataclasses.replace(cfg, offload=True, tiled_mlp=True, host_memory=128)
            rows.append(
                {
                    "model": model,
                    "processes": n,
                    "longest": longest_context(config, cfg),
                    "longest_all_switches": longest_context(config, every),
                    "longest_context_parallel": longest_context(config, dataclasses.replace(every, context_parallel=n)),
                    "longest_zero3": longest_context(config, dataclasses.replace(every, sharding="zero3"))
                    if n > 1
                    else 0,
                }
            )
    return rows


def main() -> None:
    from longqlora.cli import setup_logging
    from longqlora.output import markdown_table, write_json_atomic

    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["comm", "check", "plan"])
    parser.add_argument("--out", default="out/distributed_check", help="Where `check` runs (emptied first).")
    parser.add_argument("--record", action="store_true", help="Write docs/distributed.json.")
    args = parser.parse_args()
    if args.what == "comm":
        rows = comm_table()
        header = ["model", "ranks", "chunk", "group G", "S2 plain", "S2 packed", "ring", "Ulysses"]
        print(
            markdown_table(
                header,
                [
                    [
                        r["model"].split("/")[1],
                        r["ranks"],
                        r["chunk"],
                        r["group"],
                        f"{r['s2_plain_mib']:.0f}",
                        f"{r['s2_packed_mib']:.0f}",
                        f"{r['ring_mib']:.0f}",
                        f"{r['ulysses_mib']:.0f}",
                    ]
                    for r in rows
                ],
            )  # fmt: skip
        )
        return
    if args.what == "plan":
        rows = longest_table()
        print(
            markdown_table(
                ["model", "trained", "ranks", "longest, as asked", "longest, every switch (128 GiB pinned a rank)"],
                [
                    [
                        r["model"],
                        r["trainable_params"],
                        r["ranks"],
                        f"{r['longest']:,}",
                        f"{r['longest_all_switches']:,}",
                    ]
                    for r in rows
                ],
            )
        )
        print()
        print(
            markdown_table(
                [
                    "model",
                    "FSDP2 processes",
                    "longest, as asked",
                    "every switch (128 GiB pinned a process)",
                    "every switch and --context_parallel N",
                    "ZeRO-3 instead, every switch",
                ],
                [
                    [
                        r["model"],
                        r["processes"],
                        f"{r['longest']:,}",
                        f"{r['longest_all_switches']:,}",
                        f"{r['longest_context_parallel']:,}",
                        f"{r['longest_zero3']:,}" if r["longest_zero3"] else "-",
                    ]
                    for r in fsdp2_table()
                ],
            )  # fmt: skip
        )
        return
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows = summary(run_all(out))
    print(
        markdown_table(
            ["launch", "compared with", "largest adapter difference", "losses", "grad norms", "seconds"],
            [
                [
                    r["launch"],
                    r["compared_with"] or "",
                    "" if r["largest_adapter_difference"] is None else f"{r['largest_adapter_difference']:.1e}",
                    " ".join(map(str, r["losses"])),
                    " ".join(map(str, r["grad_norms"])),
                    r["seconds"],
                ]
                for r in rows
            ],
        )  # fmt: skip
    )
    if args.record:
        write_json_atomic(ROOT / "docs" / "distributed.json", {"check": rows, "comm": comm_table()})


if __name__ == "__main__":
    main()
