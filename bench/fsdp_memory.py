"""One process's memory under FSDP2 (accelerate's, as `configs/accelerate/fsdp2_qlora.yaml` launches it), measured
on this CPU at a real model width, beside the planner's per-process prediction (`python -m longqlora plan
--processes N --sharding fsdp2`).

    python -m accelerate.commands.launch --config_file configs/accelerate/fsdp2_qlora.yaml --num_processes 2 \\
        --mixed_precision bf16 bench/fsdp_memory.py --models llama-2-7b --layers 2 4 --contexts 4096 8192 \\
        --json docs/fsdp_memory_cpu.json
    python bench/fsdp_memory.py --report_from docs/fsdp_memory_cpu.json      # the table of docs/distributed.md

Every process builds the same random NF4 model (bench/memory_step.py; the codes stored in the compute dtype, as
the toolkit loads them under FSDP), prepared as ours (bench/memory.py's `ours` or `--variant ours_lora`), hands it
with its AdamW to `Accelerator.prepare` (accelerate's FSDP2: every decoder layer, the embedding and the final norm
with the LM head sharded apiece, bf16 mixed precision), and trains one step in bf16 autocast on its own row. A CPU
run of accelerate keeps multi-process runs plain DDP, so the accelerator is switched to FSDP with the plugin the
launch configured, as tests/fsdp_worker.py does. The peak is the highest total of live tensor bytes during the
measured step, counted by torch's FSDPMemTracker (bench/memory_step.tracked_live's method, knowing FSDP2's sharded
and gathered parameters and its communication buffers), plus the NF4 scales, which every process keeps whole as
module attributes outside the tracker's view; the optimizer step's own peak (the planner's other candidate, below the
loss on this CPU) is recorded apart. Rank 0 writes every process's peaks and the plans.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cp_memory import depth_fits, planned_bytes, sharded  # noqa: E402  (bench/cp_memory.py)
from memory import VARIANTS, BenchConfig  # noqa: E402  (bench/memory.py)
from memory_report import machine, merge_record, rank_point  # noqa: E402
from memory_step import batch, build_nf4, model_config, prepare  # noqa: E402

from longqlora.cli import setup_logging
from longqlora.output import write_json_atomic
from longqlora.training import plan as planner

logger = logging.getLogger("bench.fsdp_memory")


@dataclass
class FSDPBenchConfig:
    models: list[str] = field(
        default_factory=lambda: ["llama-2-7b"], metadata={"help": "Presets (their width, heads, vocabulary and MLP)."}
    )
    layers: list[int] = field(default_factory=lambda: [2, 4], metadata={"help": "Decoder layers to build."})
    contexts: list[int] = field(default_factory=lambda: [4096, 8192], metadata={"help": "Tokens per row."})
    variant: str = field(default="ours", metadata={"help": "ours, or ours_lora (no trained embedding and norms)."})
    json: str | None = field(default=None, metadata={"help": "Write the points here (rank 0)."})
    report_from: str | None = field(
        default=None, metadata={"help": "Measure nothing (no launch): print the tables of this JSON."}
    )


def fsdp_accelerator():
    """accelerate's Accelerator switched to FSDP with the launch's plugin and bf16 mixed precision (on a CPU
    accelerate would run the processes as plain DDP)."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator = Accelerator(cpu=True)
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch set
    plugin.set_mixed_precision("bf16")
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    return accelerator


def scale_bytes(model) -> int:
    """The NF4 codebooks and absmax scales every process keeps whole (module attributes, not parameters, so neither
    FSDP2 nor the tracker sees them): on the layer once FSDP2 has swapped its weight for a shard, on the weight
    before."""
    total, seen = 0, set()
    for module in model.modules():
        for state in (
            getattr(module, "quant_state", None),
            getattr(getattr(module, "weight", None), "quant_state", None),
        ):
            for owner in (state, getattr(state, "state2", None)):
                for name in ("absmax", "code", "offset"):
                    t = getattr(owner, name, None)
                    if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                        seen.add(t.data_ptr())
                        total += t.numel() * t.element_size()
    return total


def memory_tracker(model, optimizer, observe=None):
    """torch's FSDPMemTracker (every tensor an op makes, freed when its storage dies in whatever thread, so the
    gather buffers and reduce-scatter inputs are counted where the profiler under gloo misses frees), except for a
    unit that never ran forward: the LM head, whose weight TRL's fused head gathers itself (`DTensor.full_tensor`)
    without calling the head; the tracker's post-backward hook would fail on it (torch 2.13), so it keeps FSDP's.
    `observe(total, in_optimizer_step)`, when given, sees the tracked CPU total after every op."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    class Tracker(FSDPMemTracker):
        def _fsdp_param_group_post_backward(self, fsdp_mod, orig):
            tracked = super()._fsdp_param_group_post_backward(fsdp_mod, orig)
            return lambda *a, **k: (tracked if fsdp_mod in self.memory_tracking else orig)(*a, **k)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if observe is not None and out is not NotImplemented:
                observe(self._curr_mem_snap.get(torch.device("cpu"), {}).get("Total", 0), self._in_opt)
            return out

    return Tracker(model, optimizer)


def build(variant_name: str, name: str, layers: int, context: int) -> tuple:
    """(model, its AdamW, one row, the config): the same random NF4 model in every process, its codes stored in the
    compute dtype as the toolkit loads them for a sharding engine, prepared as `variant_name` with TRL's fused head."""
    from trl.trainer.utils import add_fused_lm_head

    bench = BenchConfig(models=[name], contexts=[context], variants=[variant_name], steps=1, search_longest=False)
    dtype = torch.bfloat16
    config = model_config(name, layers)
    torch.manual_seed(0)
    model = build_nf4(config, torch.device("cpu"), dtype, quant_storage=dtype)
    model = prepare(model, VARIANTS[variant_name], context, bench, dtype)
    add_fused_lm_head(model.get_base_model())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, optimizer, batch(config.vocab_size, context, "plain", torch.device("cpu")), config


def measure(cfg: FSDPBenchConfig, accelerator, name: str, layers: int, context: int) -> dict:
    device, dtype = torch.device("cpu"), torch.bfloat16
    model, optimizer, inputs, config = build(cfg.variant, name, layers, context)
    torch.set_autocast_enabled("cuda", True)  # PEFT's LoRA takes the GPU's branch (bench/memory_step.train_steps)
    try:
        model, optimizer = accelerator.prepare(model, optimizer)
        scales = scale_bytes(model)
        model.train()
        measured, optimizer_step = [False], [0]

        def observe(total, in_step):  # the measured optimizer step's peak: the planner's other candidate
            if measured[0] and in_step:
                optimizer_step[0] = max(optimizer_step[0], total)

        tracker = memory_tracker(model, optimizer.optimizer, observe)  # the torch optimizer accelerate wraps
        with tracker:
            for p in model.parameters():  # the optimizer state first, as a run has it from its second step on
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            measured[0] = True
            with torch.autocast(device.type, dtype=dtype):
                loss = model(**inputs, fused_lm_head=True).loss
            loss.backward()
            loss = loss.detach()  # the graph dropped before the step, as the Trainer's training_step returns
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        snapshot = tracker.get_tracker_snapshot("peak")[device]
        if dist.get_rank() == 0:
            tracker.display_modulewise_snapshots(depth=6, units="MiB")
        loss = loss.item()
        del model, optimizer, tracker
    finally:
        torch.set_autocast_enabled("cuda", False)
    accelerator.free_memory()
    peaks = [None] * dist.get_world_size()
    mine = {k: int(v) for k, v in snapshot.items()}
    mine["NF4 scales"] = scales
    mine["optimizer step"] = optimizer_step[0]
    dist.all_gather_object(peaks, mine)
    return {  # planned when rendered or tested, by the planner of the day (planned_bytes)
        **rank_point(name, layers, cfg.variant, context, [p["Total"] + p["NF4 scales"] for p in peaks]),
        "processes": dist.get_world_size(),
        "sharding": "fsdp2",
        "peak_parts_by_rank": peaks,
        "step_peak_bytes_by_rank": [p["optimizer step"] + p["NF4 scales"] for p in peaks],
        "loss": loss,
    }


def as_cp_points(points: list[dict]) -> list[dict]:
    """The points as bench/cp_memory.py's helpers read them: one rank per row, S2 groups of a quarter of the row
    (bench/memory_step.prepare's default)."""
    return [{"context_parallel": 1, "group": p["context"] // 4, **p} for p in points]


def render(record: dict) -> str:
    """The measured points and the full-depth extrapolation as Markdown tables (docs/distributed.md), planned by
    today's planner (bench/cp_memory.py's helpers, also for points measured before it changed)."""
    from longqlora.output import markdown_table

    gib = lambda b: f"{b / planner.GIB:.2f}"  # noqa: E731
    every = as_cp_points(record["points"])
    points = [p for p in every if p.get("buckets", "config") == "config"]  # planned as the shipped configs run
    zero3 = any(p.get("sharding") == "zero3" for p in points)
    limit = lambda p: f"{sharded(p).get('zero3_live_values', 1e9):.0e}".replace("+0", "")  # noqa: E731
    rows = []
    for p in points:
        plan, whole = planned_bytes(p), planned_bytes({**p, "processes": 1, "sharding": "none"})
        rows.append(
            [p["model"], "LoRA" if p["variant"] == "ours_lora" else "LoRA+", p["layers"], f"{p['context']:,}",
             p["processes"], *map(gib, p["peak_bytes_by_rank"][:2]), gib(plan), f"{plan / p['peak_bytes'] - 1:+.1%}",
             gib(whole)] + ([limit(p)] if zero3 else [])
        )  # fmt: skip
    table = markdown_table(
        ["model", "trained", "layers", "row", "processes", "rank 0", "rank 1", "planned a process", "error",
         "planned, one process"] + (["DeepSpeed's live limit"] if zero3 else []),
        rows,
    )  # fmt: skip
    fits = markdown_table(
        ["model", "layers", "row", "processes", "measured, extrapolated", "planned a process", "planned, one process"],
        [
            [f["model"], f["layers"], f"{f['context']:,}", f["processes"], gib(f["extrapolated_bytes"]),
             gib(f["planned_bytes"]), gib(f["planned_one_process_bytes"])]
            for f in depth_fits(points)
            if f["extrapolated_bytes"] is not None
        ],
    )  # fmt: skip
    stepped = [(p, planned_bytes(p, "step")) for p in points if "step_peak_bytes_by_rank" in p]
    steps = markdown_table(
        ["model", "sharding", "layers", "row", "rank 0", "rank 1", "planned a process", "error", "limit"],
        [
            [p["model"], p["sharding"], p["layers"], f"{p['context']:,}", *map(gib, p["step_peak_bytes_by_rank"][:2]),
             gib(step), f"{step / max(p['step_peak_bytes_by_rank']) - 1:+.1%}",
             limit(p) if p.get("sharding") == "zero3" else "-"]
            for p, step in stepped
        ],
    )  # fmt: skip
    steps = f"\n\nThe optimizer step's own peak (GiB a process):\n\n{steps}" if stepped else ""
    aside = "".join(
        f"\n\nWith DeepSpeed's default bucket sizes ({p['layers']} layers, {p['context']:,} tokens): "
        f"{gib(p['peak_bytes'])} GiB a process, {gib(p['peak_parts_by_rank'][0]['resident'])} of it resident before "
        "the step."
        for p in every
        if p.get("buckets") == "defaults"
    )
    return (
        f"{table}{steps}{aside}\n\nFull depth (fitted as fixed + layers x per-layer from the 2- and 4-layer "
        f"points):\n\n{fits}"
    )


def record_points(points: list[dict], json_path: str | None, launch_config: str) -> None:
    """Rank 0: each point against today's plan in the log, the tables printed, the record merged into `json_path`
    (bench/zero3_memory.py's points too). Every process waits for it."""
    if dist.get_rank() == 0:
        for p in as_cp_points(points):
            planned = planned_bytes(p)
            logger.info(
                "%s, %d layers, %d tokens, %s over %d: measured %.2f GiB on the fuller process, planned %.2f (%+.1f%%)",
                p["model"], p["layers"], p["context"], p["sharding"], p["processes"], p["peak_bytes"] / planner.GIB,
                planned / planner.GIB, 100 * (planned / p["peak_bytes"] - 1),
            )  # fmt: skip
            if "step_peak_bytes_by_rank" in p:
                step, planned_step = max(p["step_peak_bytes_by_rank"]), planned_bytes(p, "step")
                logger.info(
                    "  its optimizer step: measured %.2f GiB, planned %.2f (%+.1f%%)",
                    step / planner.GIB, planned_step / planner.GIB, 100 * (planned_step / step - 1),
                )  # fmt: skip
        command = " ".join(
            [f"accelerate launch --config_file {launch_config} --num_processes", str(dist.get_world_size()),
             "--mixed_precision bf16", *sys.argv]
        )  # fmt: skip
        record = {
            "command": command,
            "points": [{**p, "command": command} for p in points],
            "fits": depth_fits(as_cp_points(points)),
            "machine": machine(torch.device("cpu")),
        }
        print(render(record))
        if json_path:  # merged with the points other commands wrote there
            write_json_atomic(Path(json_path), merge_record(json_path, record))
    dist.barrier()


def main(argv=None) -> None:
    from transformers import HfArgumentParser

    setup_logging()
    (cfg,) = HfArgumentParser(FSDPBenchConfig).parse_args_into_dataclasses(args=argv)
    if cfg.variant not in ("ours", "ours_lora"):
        raise SystemExit(f"--variant {cfg.variant!r}: ours or ours_lora")
    if cfg.report_from:
        print(render(json.loads(Path(cfg.report_from).read_text())))
        return
    accelerator = fsdp_accelerator()
    torch.set_num_threads(1)
    points = [
        measure(cfg, accelerator, name, layers, context)
        for name in cfg.models
        for layers in cfg.layers
        for context in cfg.contexts
    ]
    record_points(points, cfg.json, "configs/accelerate/fsdp2_qlora.yaml")


if __name__ == "__main__":
    main()
