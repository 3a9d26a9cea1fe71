"""What DeepSpeed ZeRO-3 keeps gathered at the loss, counted: which parameters are AVAILABLE (not re-partitioned)
when the final norm has run, in each step, by depth and by DeepSpeed's stage3_max_live_parameters and
stage3_max_reuse_distance. Counts, not bytes: each kept value is one 16-bit element in every process (the NF4 codes
stored in the compute dtype), so no memory tracker is needed and a full-depth model runs in minutes.

    DS_ACCELERATOR=cpu python -m accelerate.commands.launch --config_file configs/accelerate/deepspeed_zero3.yaml \\
        --num_processes 2 --mixed_precision bf16 bench/zero3_keep.py --models llama-2-7b --layers 32 \\
        --limits 1e9 --steps 2 --json docs/zero3_keep_cpu.json

(docs/zero3_keep_cpu.json: one launch per depth and limit, 4 and 12 layers at 1e8, 32 at 1e9, each merged in.)

The same model, variant and row as bench/zero3_memory.py (its ZeRO-3 engine from `Accelerator.prepare`, the JSON's
"auto" sizes filled as the Trainer fills them), with both limits set to each of `--limits` (DeepSpeed's default is
1e9 each, which configs/accelerate/deepspeed_zero3.json keeps). The first step records DeepSpeed's trace and releases
everything; from the second on, what its prefetcher finds already gathered is kept (plan_sharding.zero3_bytes).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fsdp_memory import build  # noqa: E402  (bench/fsdp_memory.py)
from zero3_memory import deepspeed_accelerator  # noqa: E402

from longqlora.cli import setup_logging
from longqlora.output import write_json_atomic


@dataclass
class KeepConfig:
    models: list[str] = field(default_factory=lambda: ["llama-2-7b"], metadata={"help": "Presets, or tiny."})
    layers: list[int] = field(default_factory=lambda: [32], metadata={"help": "Decoder layers to build."})
    limits: list[float] = field(
        default_factory=lambda: [1e9, 1e8],
        metadata={"help": "stage3_max_live_parameters = stage3_max_reuse_distance, one engine each."},
    )
    context: int = field(default=512, metadata={"help": "Tokens in the row (what is kept does not depend on it)."})
    steps: int = field(default=3, metadata={"help": "Training steps; the first records DeepSpeed's trace."})
    json: str | None = field(default=None, metadata={"help": "Write the counts here (rank 0)."})


def _part(name: str) -> str:
    """`layer N`, `embedding`, `head` or `other` for a parameter name of the prepared model."""
    if ".layers." in name:
        return f"layer {int(name.split('.layers.')[1].split('.')[0])}"
    return "head" if "lm_head" in name else "embedding" if "embed_tokens" in name else "other"


def count(name: str, layers: int, limit: int, cfg: KeepConfig) -> dict:
    """One engine: the non-persistent values kept at the final norm in each step, and by part in the last."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # a plain build: ZeRO-3 partitions the model when the engine takes it
    model, optimizer, inputs, config = build("ours", name, layers, cfg.context)
    torch.set_autocast_enabled("cuda", True)  # PEFT's LoRA takes the GPU's branch, as in bench/zero3_memory.py
    try:
        accelerator = deepspeed_accelerator(config.hidden_size, "config", limit)  # both limits, as --live_values
        engine, optimizer = accelerator.prepare(model, optimizer)
        params = [(n, p) for n, p in engine.module.named_parameters() if not p.ds_persist]
        kept_by_step, last = [], {}

        def at_norm(module, args, output):
            last.clear()
            for n, p in params:
                if p.ds_status == ZeroParamStatus.AVAILABLE:
                    last[_part(n)] = last.get(_part(n), 0) + p.ds_numel
            kept_by_step.append(sum(last.values()))

        norm = next(m for n, m in engine.module.named_modules() if n.endswith("model.norm"))
        handle = norm.register_forward_hook(at_norm)
        for _ in range(cfg.steps):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = engine(**inputs, fused_lm_head=True).loss
            engine.backward(loss)
            engine.step()
        handle.remove()
        totals = {}
        for n, p in params:
            part = "layers" if _part(n).startswith("layer ") else _part(n)
            totals[part] = totals.get(part, 0) + p.ds_numel
    finally:
        torch.set_autocast_enabled("cuda", False)
    accelerator.free_memory()
    kept_layers = sorted(int(k.split()[1]) for k in last if k.startswith("layer "))
    return {
        "model": name,
        "layers": layers,
        "limit": limit,
        "values": totals,
        "per_layer": totals["layers"] // layers,
        "kept_by_step": kept_by_step,
        "kept_layers": kept_layers,
        "kept": last,
    }


def main(argv=None) -> None:
    from transformers import HfArgumentParser

    setup_logging()
    (cfg,) = HfArgumentParser(KeepConfig).parse_args_into_dataclasses(args=argv)
    torch.set_num_threads(1)
    points = [count(m, n, int(limit), cfg) for m in cfg.models for n in cfg.layers for limit in cfg.limits]
    if dist.get_rank() == 0:
        for p in points:
            kept, rest = p["kept_layers"], [f"{k} {v:,}" for k, v in p["kept"].items() if not k.startswith("layer")]
            span = f"layers {kept[0]}-{kept[-1]}" if kept else "no layer"
            print(
                f"{p['model']}, {p['layers']} layers, limits {p['limit']:.0e}: {p['kept_by_step'][-1]:,} values kept "
                f"at the loss by step {p['kept_by_step']}: {span} ({len(kept)} of {p['layers']}), {', '.join(rest)}"
            )
        if cfg.json:
            launch = "accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml --num_processes"
            command = " ".join([launch, str(dist.get_world_size()), "--mixed_precision bf16", *sys.argv])
            path, fresh = Path(cfg.json), {(p["model"], p["layers"], p["limit"]) for p in points}
            old = json.loads(path.read_text())["points"] if path.exists() else []  # one launch a point, merged
            kept = [p for p in old if (p["model"], p["layers"], p["limit"]) not in fresh]
            write_json_atomic(path, {"points": kept + [{**p, "command": command} for p in points]})
    dist.barrier()


if __name__ == "__main__":
    main()
