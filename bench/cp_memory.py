"""One rank's memory under S2-Attn context parallelism, measured on this CPU at a real model width, beside the
planner's per-rank prediction (`python -m longqlora plan --context_parallel N`).

    export MALLOC_MMAP_THRESHOLD_=131072   # large blocks unmapped when freed: two ranks' peaks fit in 24 GB
    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/cp_memory.py \
        --models llama-2-7b --layers 2 4 --contexts 4096 8192 --json docs/cp_memory_cpu.json
    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/cp_memory.py \
        --models llama-2-7b --group_ratio 0.5 --layers 2 4 --contexts 12288 --json docs/cp_memory_cpu.json
        # a group as long as the chunk: the most a rank borrows
    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/cp_memory.py \
        --models llama-2-7b --ddp --layers 2 --contexts 4096 8192 --json docs/cp_memory_cpu.json   # under DDP
    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/cp_memory.py \
        --models llama-3.1-8b --variant ours_lora --layers 2 4 --contexts 4096 --json docs/cp_memory_cpu.json
        # GQA, plain LoRA: its trained embedding, or 4 of its layers at 8k, would not fit twice in this CPU's 24 GB
    python bench/cp_memory.py --report_from docs/cp_memory_cpu.json        # the tables of docs/distributed.md

Every rank builds the same random NF4 model (bench/memory_step.py, as bench/memory.py does), prepared as ours
(bench/memory.py's variant `ours`, or `--variant ours_lora`) with the context-parallel attention
(attention/context_parallel.py), takes its contiguous chunk of the same row, cut by the training collator (global
position ids, labels shifted before the cut) and trains `--steps` steps in bf16 autocast; the first step's peak is
the tensors its ops made (tracked by storage) plus what was resident before it, as in bench/memory.py. The peaks at
two depths are fitted as fixed + layers x per-layer and extrapolated to the full depth
(bench/memory_report.fit_depth). Rank 0 writes every rank's peak and the plans, per rank and for one process holding
the whole row. With `--ddp` the model
is wrapped in DDP as a training run's is, and what the wrap allocates (its gradient buckets) counts as resident;
without it there are no buckets, and the plan is for `--processes 1`.
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
from memory import VARIANTS, BenchConfig, plan_for  # noqa: E402  (bench/memory.py)
from memory_report import fit_depth, machine, merge_record, rank_point  # noqa: E402
from memory_step import build_nf4, model_config, prepare, tracked_live, tracked_peak, train_steps  # noqa: E402

from longqlora.attention.context_parallel import new_group
from longqlora.cli import setup_logging
from longqlora.output import write_json_atomic
from longqlora.training import plan as planner

logger = logging.getLogger("bench.cp_memory")


@dataclass
class CPBenchConfig:
    models: list[str] = field(
        default_factory=lambda: ["llama-2-7b"], metadata={"help": "Presets (their width, heads, vocabulary and MLP)."}
    )
    layers: list[int] = field(default_factory=lambda: [2, 4], metadata={"help": "Decoder layers to build."})
    contexts: list[int] = field(default_factory=lambda: [4096, 8192], metadata={"help": "Whole-row lengths."})
    variant: str = field(default="ours", metadata={"help": "ours, or ours_lora (no trained embedding and norms)."})
    group_ratio: float = field(
        default=0.25,
        metadata={
            "help": "S2 group / row length; 0.5 at 2 ranks makes a group as long as a chunk (the most borrowed)."
        },
    )
    ddp: bool = field(
        default=False,
        metadata={"help": "Wrap the model in DDP, as a training run does: its gradient buckets measured and planned."},
    )
    steps: int = field(default=1, metadata={"help": "Training steps; the first gives the peak."})
    json: str | None = field(default=None, metadata={"help": "Write the points here (rank 0)."})
    report_from: str | None = field(
        default=None, metadata={"help": "Measure nothing (no torchrun): print the tables of this JSON."}
    )


def chunk_of_row(vocab: int, context: int, group) -> dict:
    """This rank's part of one random row (the same on every rank), cut by the training collator itself."""
    from longqlora.training.distributed import ContextParallelCollator

    ids = torch.randint(3, vocab, (1, context), generator=torch.Generator().manual_seed(context))
    return ContextParallelCollator(lambda _: {"input_ids": ids, "labels": ids}, group, context, pad_token_id=0)([])


def ddp_wrap(model):
    """The model in torch's DDP with the Trainer's settings (no unused parameters, gradients not bucket views), and
    the bytes its construction left allocated (the buckets; the peak of the parameters' broadcast passes)."""
    wrapped = []
    _, left = tracked_live(lambda: wrapped.append(torch.nn.parallel.DistributedDataParallel(model)), model)
    return wrapped[0], left


def measure(cfg: CPBenchConfig, name: str, layers: int, context: int, group) -> dict:
    bench = BenchConfig(
        models=[name], contexts=[context], variants=[cfg.variant], steps=cfg.steps, search_longest=False
    )
    variant, device, dtype = VARIANTS[cfg.variant], torch.device("cpu"), torch.bfloat16
    config = model_config(name, layers)
    torch.manual_seed(0)  # the same weights on every rank
    model = prepare(
        build_nf4(config, device, dtype),
        variant,
        context,
        bench,
        dtype,
        context_parallel=group,
        group_ratio=cfg.group_ratio,
    )
    inputs = chunk_of_row(config.vocab_size, context, group)
    result = train_steps(
        model,
        variant,
        context // group.size,
        bench,
        device,
        dtype,
        measure_cpu=tracked_peak,
        inputs=inputs,
        wrap=ddp_wrap if cfg.ddp else None,
    )
    del model
    peaks = [None] * group.size
    dist.all_gather_object(peaks, result["cpu_peak"])
    processes = dist.get_world_size() if cfg.ddp else 1
    planned = plan_for(config, name, variant, context, bench, device, dtype, cp=group.size, processes=processes)
    single = plan_for(config, name, variant, context, bench, device, dtype)
    return {
        **rank_point(name, layers, cfg.variant, context, peaks),  # peak_bytes: the fuller rank (the one that borrows)
        "group": int(cfg.group_ratio * context),
        "context_parallel": group.size,
        "processes": processes,
        "planned_bytes": planned["peak_allocated_gib"] * planner.GIB,
        "planned_one_process_bytes": single["peak_allocated_gib"] * planner.GIB,
        "plan": planned["config"],
        "loss": result["loss"],
    }


def full_depth(points: list[dict], ranks: int) -> dict:
    """The fuller rank's peak extrapolated to the model's depth, beside the plans at that depth (and sharded over
    the points' processes when they were: bench/fsdp_memory.py, bench/zero3_memory.py)."""
    name, context, variant = points[0]["model"], points[0]["context"], points[0]["variant"]
    bench = BenchConfig(models=[name], variants=[variant], search_longest=False)
    config = model_config(name)
    args = (config, name, VARIANTS[variant], context, bench, torch.device("cpu"), torch.bfloat16)
    fit = fit_depth(points, config.num_hidden_layers) or {}
    return {
        "model": name,
        "variant": variant,
        "group": points[0]["group"],
        "layers": config.num_hidden_layers,
        "context": context,
        "context_parallel": ranks,
        "processes": points[0].get("processes", 1),
        "extrapolated_bytes": fit.get("extrapolated_bytes"),
        "planned_bytes": plan_for(*args, cp=ranks, **sharded(points[0]))["peak_allocated_gib"] * planner.GIB,
        "planned_one_process_bytes": plan_for(*args)["peak_allocated_gib"] * planner.GIB,
    }


def sharded(p: dict) -> dict:
    """How a point's processes shared the model: their count, the sharding, and for ZeRO-3 the live-parameter limit
    it ran with (bench/zero3_memory.py records it: DeepSpeed's 1e9 unless --live_values set another)."""
    limit = p.get("deepspeed", {}).get("max_live_parameters")
    return {"processes": p.get("processes", 1), "sharding": p.get("sharding", "none")} | (
        {"zero3_live_values": limit} if limit else {}
    )


def planned_bytes(p: dict, phase: str | None = None) -> float:
    """Today's plan for a measured point's fuller rank (as tests/test_plan.py recomputes it): its peak, or with
    `phase` (backward, step) that phase's."""
    args = (model_config(p["model"], p["layers"]), p["model"], VARIANTS[p["variant"]], p["context"])
    bench = BenchConfig(models=[p["model"]])
    where = (torch.device("cpu"), torch.bfloat16)
    planned = plan_for(*args, bench, *where, cp=p["context_parallel"], **sharded(p))
    return (planned["phase_peaks_gib"][phase] if phase else planned["peak_allocated_gib"]) * planner.GIB


def depth_fits(points: list[dict]) -> list[dict]:
    """The full-depth fit of every (model, variant, row, group) measured at two depths, without DDP (sharded by
    FSDP2 or ZeRO-3, or in one process)."""
    groups = {}
    for p in points:
        if p.get("processes", 1) == 1 or p.get("sharding", "none") != "none":
            limit = sharded(p).get("zero3_live_values")
            key = (p["model"], p["variant"], p["context"], p["group"], p.get("sharding"), p.get("buckets"), limit)
            groups.setdefault(key, []).append(p)
    return [full_depth(g, g[0]["context_parallel"]) for g in groups.values()]


def render(record: dict) -> str:
    """The measured points and the full-depth extrapolation as Markdown tables (docs/distributed.md), planned by
    today's planner (also for points measured before it changed)."""
    from longqlora.output import markdown_table

    gib = lambda b: f"{b / planner.GIB:.2f}"  # noqa: E731
    rows = []
    for p in record["points"]:
        plan = planned_bytes(p)
        rows.append(
            [p["model"], "LoRA" if p["variant"] == "ours_lora" else "LoRA+", p["layers"], f"{p['context']:,}",
             f"{p['group']:,}", "yes" if p.get("processes", 1) > 1 else "no", *map(gib, p["peak_bytes_by_rank"]),
             gib(plan), f"{plan / p['peak_bytes'] - 1:+.1%}"]
        )  # fmt: skip
    points = markdown_table(
        ["model", "trained", "layers", "row", "S2 group", "DDP", "rank 0", "rank 1 (borrows)", "planned a rank",
         "error"],
        rows,
    )  # fmt: skip
    fits = markdown_table(
        ["model", "layers", "row", "S2 group", "measured, extrapolated", "planned a rank", "planned, one process"],
        [
            [f["model"], f["layers"], f"{f['context']:,}", f"{f['group']:,}",
             gib(f["extrapolated_bytes"]), gib(f["planned_bytes"]), gib(f["planned_one_process_bytes"])]
            for f in depth_fits(record["points"])
            if f["extrapolated_bytes"] is not None
        ],
    )  # fmt: skip
    return f"{points}\n\nFull depth (fitted as fixed + layers x per-layer from the 2- and 4-layer points):\n\n{fits}"


def main(argv=None) -> None:
    from transformers import HfArgumentParser

    setup_logging()
    (cfg,) = HfArgumentParser(CPBenchConfig).parse_args_into_dataclasses(args=argv)
    if cfg.variant not in ("ours", "ours_lora"):
        raise SystemExit(f"--variant {cfg.variant!r}: ours or ours_lora")
    if cfg.report_from:
        print(render(json.loads(Path(cfg.report_from).read_text())))
        return
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    group = new_group(dist.get_world_size())
    command = " ".join(["torchrun --nproc_per_node", str(group.size), *sys.argv])

    def record(fits: list, where) -> dict:
        return {
            "command": command,
            "points": [{**p, "command": command} for p in points],
            "fits": fits,
            "machine": where,
        }

    points = []
    for name in cfg.models:
        for layers in cfg.layers:
            for context in cfg.contexts:
                points.append(measure(cfg, name, layers, context, group))
                p = points[-1]
                if dist.get_rank() == 0 and cfg.json:  # every point kept as it comes: a run killed later loses none
                    write_json_atomic(Path(cfg.json), merge_record(cfg.json, record([], None)))
                if dist.get_rank() == 0:
                    logger.info(
                        "%s, %d layers, %d tokens over %d ranks: measured %.2f GiB on the fuller rank, planned %.2f "
                        "(%+.1f%%)",
                        name,
                        layers,
                        context,
                        group.size,
                        p["peak_bytes"] / planner.GIB,
                        p["planned_bytes"] / planner.GIB,
                        100 * (p["planned_bytes"] / p["peak_bytes"] - 1),
                    )
    if dist.get_rank() == 0:
        final = record(depth_fits(points), machine(torch.device("cpu")))
        print(render(final))
        if cfg.json:  # merged with the points other commands wrote there
            write_json_atomic(Path(cfg.json), merge_record(cfg.json, final))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
