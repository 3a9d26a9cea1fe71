"""One process's memory under DeepSpeed ZeRO-3 (accelerate's, as `configs/accelerate/deepspeed_zero3.yaml` launches
it), measured on this CPU at a real model width, beside the planner's per-process prediction (`python -m longqlora
plan --processes N --sharding zero3`).

    for point in "2 4096" "2 8192" "4 4096" "4 8192" "12 4096" "12 4096 --live_values 1e8" \\
            "4 4096 --live_values 1e8" "2 4096 --live_values 1e8" "32 4096 --live_values 1e8"; do
        set -- $point  # a launch each: a process's memory clean (12 layers: 18 minutes, 32: 43)
        DS_ACCELERATOR=cpu python -m accelerate.commands.launch --config_file configs/accelerate/deepspeed_zero3.yaml \\
            --num_processes 2 --mixed_precision bf16 bench/zero3_memory.py --layers $1 --contexts $2 "${@:3}" \\
            --json docs/zero3_memory_cpu.json; done
    python bench/fsdp_memory.py --report_from docs/zero3_memory_cpu.json      # the tables of docs/distributed.md

As bench/fsdp_memory.py measures FSDP2 (the same model, variant, row and step), with DeepSpeed's engine from
`Accelerator.prepare`: the shipped JSON's "auto" sizes filled as the Trainer fills them (`--buckets defaults` drops
them: DeepSpeed's own), the model built before the Accelerator (else transformers builds it under `zero.Init`).
Each process's memory is what was resident before the measured step (every live CPU tensor's storage, counted once:
DeepSpeed's partitions, flat buffers and optimizer state are no module's parameters) plus the highest total of the
tensors the step's ops made (bench/memory_step.tracked_live); the optimizer step's own peak (`engine.step()`: the
planner's other candidate, below the loss on this CPU) is recorded apart, the graph dropped before it as the
Trainer's training_step drops it (points measured before that have no step peak). The first step, unmeasured,
creates the optimizer state, as a run has it from its second step on.
"""

from __future__ import annotations

import gc
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fsdp_memory import build, record_points, scale_bytes  # noqa: E402  (bench/fsdp_memory.py)
from memory_report import rank_point  # noqa: E402
from memory_step import tracked_live  # noqa: E402

from longqlora.cli import setup_logging
from longqlora.training.distributed import release_nf4_codes  # noqa: E402


@dataclass
class Zero3BenchConfig:
    models: list[str] = field(default_factory=lambda: ["llama-2-7b"], metadata={"help": "Presets."})
    layers: list[int] = field(default_factory=lambda: [2, 4], metadata={"help": "Decoder layers to build."})
    contexts: list[int] = field(default_factory=lambda: [4096, 8192], metadata={"help": "Tokens per row."})
    variant: str = field(default="ours", metadata={"help": "ours, or ours_lora (no trained embedding and norms)."})
    buckets: str = field(
        default="config", metadata={"help": "config: the shipped JSON's 'auto' sizes; defaults: DeepSpeed's own."}
    )
    live_values: float | None = field(
        default=None,
        metadata={"help": "stage3_max_live_parameters and stage3_max_reuse_distance (default: DeepSpeed's 1e9)."},
    )
    json: str | None = field(default=None, metadata={"help": "Write the points here (rank 0)."})

    def __post_init__(self):
        if self.variant not in ("ours", "ours_lora"):
            raise ValueError(f"--variant {self.variant!r}: ours or ours_lora")
        if self.buckets not in ("config", "defaults"):
            raise ValueError(f"--buckets {self.buckets!r}: config or defaults")


AUTO_SIZES = {  # what the Trainer writes for "auto" (transformers.integrations.deepspeed.trainer_config_finalize)
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


# left to DeepSpeed (1e9 each) by the shipped JSON, as the planner's --zero3_live_values; --live_values sets both
LIVE_KEYS = ("stage3_max_live_parameters", "stage3_max_reuse_distance")


def deepspeed_accelerator(hidden: int, buckets: str, live_values: float | None = None):
    """accelerate's Accelerator with the launch's DeepSpeed plugin, its JSON completed as the Trainer completes it
    for one row a process (or DeepSpeed's own bucket sizes with `buckets` defaults)."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config.update(train_micro_batch_size_per_gpu=1, train_batch_size=world, gradient_accumulation_steps=1)
    config.update(gradient_clipping=1.0, bf16={"enabled": True}, fp16={"enabled": False})
    zero = config["zero_optimization"]
    for key, size in AUTO_SIZES.items():
        if buckets == "defaults":
            zero.pop(key, None)
        elif zero.get(key) == "auto":
            zero[key] = size(hidden)
    if live_values is not None:
        zero.update(dict.fromkeys(LIVE_KEYS, int(live_values)))
    return accelerator


def live_cpu_bytes() -> int:
    """Every live CPU tensor's storage, counted once."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance on some of gc's objects (torch.distributed's) warns of deprecations
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for t in tensors:
        if t.device.type == "cpu" and not t.is_meta:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def measure(cfg: Zero3BenchConfig, name: str, layers: int, context: int) -> dict:
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    device, dtype = torch.device("cpu"), torch.bfloat16
    unset_hf_deepspeed_config()  # a plain build: ZeRO-3 partitions the model when the engine takes it
    model, optimizer, inputs, config = build(cfg.variant, name, layers, context)
    release_nf4_codes(model)  # as a run under ZeRO-3 does (training/run.py)
    torch.set_autocast_enabled("cuda", True)  # PEFT's LoRA takes the GPU's branch (bench/memory_step.train_steps)
    try:
        accelerator = deepspeed_accelerator(config.hidden_size, cfg.buckets, cfg.live_values)
        engine, optimizer = accelerator.prepare(model, optimizer)
        scales = scale_bytes(engine.module)

        phase, optimizer_step = {"now": "backward"}, [0]

        def step():
            phase["now"] = "backward"
            with torch.autocast(device.type, dtype=dtype):
                loss = engine(**inputs, fused_lm_head=True).loss
            engine.backward(loss)
            loss = loss.detach()  # the graph dropped before the step, as the Trainer's training_step returns
            phase["now"] = "step"  # DeepSpeed's step: the fp32 gradient partition, AdamW, the 16-bit copy
            engine.step()
            return loss

        def observe(live, op, module, backward):
            if phase["now"] == "step":
                optimizer_step[0] = max(optimizer_step[0], live)

        loss = step().item()  # the optimizer state, as from a run's second step on
        resident = live_cpu_bytes()
        peak, _ = tracked_live(step, observe=observe)
        zero = engine._config.zero_config
        buckets = {
            "reduce_bucket_size": zero.reduce_bucket_size,
            "param_persistence": zero.param_persistence_threshold,
            "max_live_parameters": zero.max_live_parameters,
            "max_reuse_distance": zero.max_reuse_distance,
        }
    finally:
        torch.set_autocast_enabled("cuda", False)
    accelerator.free_memory()
    mine = {"resident": resident, "step": peak, "optimizer_step": optimizer_step[0], "NF4 scales (in resident)": scales}
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, mine)
    return {
        **rank_point(name, layers, cfg.variant, context, [p["resident"] + p["step"] for p in peaks]),
        "processes": dist.get_world_size(),
        "sharding": "zero3",
        "buckets": cfg.buckets,
        "deepspeed": buckets,
        "peak_parts_by_rank": peaks,
        "step_peak_bytes_by_rank": [p["resident"] + p["optimizer_step"] for p in peaks],
        "loss": loss,
    }


def main(argv=None) -> None:
    from transformers import HfArgumentParser

    setup_logging()
    (cfg,) = HfArgumentParser(Zero3BenchConfig).parse_args_into_dataclasses(args=argv)
    torch.set_num_threads(1)
    points = [
        measure(cfg, name, layers, context) for name in cfg.models for layers in cfg.layers for context in cfg.contexts
    ]
    record_points(points, cfg.json, "configs/accelerate/deepspeed_zero3.yaml")


if __name__ == "__main__":
    main()
