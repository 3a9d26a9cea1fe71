"""Peak memory and speed of LongQLoRA training steps at real model widths, ours against plain QLoRA, beside the
planner's prediction; the longest context ours trains at on this GPU.

Each model is built from its preset config with random weights, every decoder Linear quantised to NF4 one at a
time (no download, never a 16-bit copy of the model). Ours goes through the toolkit's own adaptation
(`adapters.adapt_for_training`: 16-bit frozen weights, fp32 trained copies, the residual stream in the compute dtype,
S2-Attn) and memory switches (`longqlora.training.memory`); the baseline is what a user of transformers + PEFT +
bitsandbytes runs instead (`prepare_model_for_kbit_training`, LoRA on q/k/v/o, SDPA full attention, gradient
checkpointing, the model's own loss), with plain LoRA and with the same trained embedding and norms as ours.

    python bench/memory.py --output docs/memory_gpu.md                 # a GPU: full depth, 8k-32k, longest context
    python bench/memory.py --layers 2 4 --contexts 2048 4096 8192 \\
        --output docs/memory_cpu.md --json docs/memory_cpu.json        # this CPU: real width, few layers, bf16
    python bench/memory.py --tiny --output /tmp/memory.md              # tiny shapes, the same code, in seconds

On a GPU the peak is CUDA's allocator's; on a CPU it is the highest total of live tensor bytes that the step's ops
made (torch's MemTracker, bench/memory_step.tracked_live) plus what was resident before the step (weights, optimizer
state). With `--layers`, every point is
measured at each depth and the peak is fitted as fixed + layers x per-layer (exact at two depths) and extrapolated
to the model's full depth. Optimizer state is created before the measured steps, so one step shows the peak.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory_report  # noqa: E402  (bench/memory_report.py)
from memory_step import build_nf4, model_config, prepare, tracked_peak, train_steps  # noqa: E402

from longqlora.cli import one_line_errors, setup_logging
from longqlora.output import write_json_atomic, write_text_atomic
from longqlora.training import plan as planner
from longqlora.training.config import check_offload_layers

logger = logging.getLogger("bench.memory")


@dataclass(frozen=True)
class Variant:
    """One way to train: ours with a set of switches, or the baseline."""

    lora_plus: bool = True  # the embedding and every norm trained in full
    ours: bool = True  # false: plain QLoRA (prepare_model_for_kbit_training, full attention, the model's loss)
    recompute_norms: bool = True
    recompute_dropout: bool = True
    tiled_mlp: str = "auto"
    offload: str = "auto"
    optim: str = "adamw"  # or adamw_8bit (bitsandbytes)
    s2: bool = True  # ours with full attention instead of S2-Attn (the speed comparison)


VARIANTS = {
    "ours": Variant(),
    "ours_lora": Variant(lora_plus=False),
    "ours_no_cuts": Variant(recompute_norms=False, recompute_dropout=False),
    "ours_no_norms": Variant(recompute_norms=False),
    "ours_no_dropout": Variant(recompute_dropout=False),
    "ours_tiled": Variant(tiled_mlp="on"),
    "ours_8bit": Variant(optim="adamw_8bit"),
    "ours_no_offload": Variant(offload="off"),
    "ours_lora_no_offload": Variant(lora_plus=False, offload="off"),  # the longest on a GPU when the host is short
    "ours_full_attention": Variant(s2=False),
    "baseline": Variant(lora_plus=False, ours=False, recompute_norms=False, recompute_dropout=False, offload="off"),
    "baseline_plus": Variant(ours=False, recompute_norms=False, recompute_dropout=False, offload="off"),
}


@dataclass
class BenchConfig:
    models: list[str] = field(
        default_factory=lambda: ["llama-2-7b", "llama-2-13b", "llama-3.1-8b", "llama-2-70b"],
        metadata={"help": "Presets or model/config directories to measure."},
    )
    contexts: list[int] = field(
        default_factory=lambda: [8192, 16384, 32768], metadata={"help": "Training lengths (tokens) to measure."}
    )
    variants: list[str] = field(
        default_factory=lambda: ["ours", "ours_no_offload", "baseline", "baseline_plus"],
        metadata={"help": "Which setups to measure (VARIANTS in this file)."},
    )
    layers: list[int] = field(
        default_factory=list,
        metadata={
            "help": "Decoder layers to build (the preset's width, heads, vocabulary and MLP); two or more depths fit "
            "fixed + layers x per-layer and extrapolate to full depth. Empty: the full model."
        },
    )
    steps: int = field(
        default=2,
        metadata={
            "help": "Training steps per point: the first gives the peak (on a CPU "
            "under the memory tracker), the others tokens/s (the first if alone)."
        },
    )
    offload_layers: int | None = field(
        default=None,
        metadata={"help": "Ours offloads only the first N layers' checkpoints (training's --offload_layers)."},
    )
    rank: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    tiled_mlp_tokens: int = field(default=16384, metadata={"help": "Tokens per MLP tile (ours)."})
    rows: str = field(
        default="plain",
        metadata={
            "help": "plain rows, or packed: 4 documents per row (S2's varlen "
            "path; the baseline gets the same position ids)."
        },
    )
    dtype: str = field(
        default="auto", metadata={"help": "Compute dtype: auto (bf16, fp16 on a V100), bfloat16, float16, float32."}
    )
    search_longest: bool = field(
        default=True, metadata={"help": "On a GPU, also find the longest context ours trains at (full depth)."}
    )
    output: str | None = field(
        default=None,
        metadata={"help": "Also write the Markdown report here (always printed; docs/memory.md is hand-written)."},
    )
    json: str | None = field(
        default=None,
        metadata={"help": "Also write every measured point as JSON (the planner's calibration test reads it)."},
    )
    tiny: bool = field(default=False, metadata={"help": "Tiny shapes on the CPU (tests): the same code, seconds."})
    report_from: str | None = field(
        default=None,
        metadata={"help": "Measure nothing: report the points of this JSON (printed; --output too), planned today."},
    )
    gpu_from: str = field(
        default="docs/memory_gpu.json",
        metadata={
            "help": "A GPU's JSON record (relative: from the repository root) whose full-depth points of the same "
            "model, context and variant fill the depth fits' GPU column; 'not yet measured' where none, or no file."
        },
    )

    def __post_init__(self):
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"--variants {' '.join(bad)}: use {', '.join(VARIANTS)}")
        check_offload_layers(self.offload_layers)
        if self.steps < 1:
            raise ValueError(f"--steps {self.steps}: at least 1")
        if any(n < 1 for n in self.layers):
            raise ValueError(f"--layers {self.layers}: positive layer counts, e.g. 2 4")
        if self.rows not in ("plain", "packed"):
            raise ValueError(f"--rows {self.rows!r}: plain or packed")
        if self.dtype not in ("auto", *planner.BYTES):
            raise ValueError(f"--dtype {self.dtype!r}: auto, {', '.join(planner.BYTES)}")
        if self.report_from and not Path(self.report_from).is_file():
            raise ValueError(f"--report_from {self.report_from}: no such file; give a JSON that --json wrote")
        if self.tiny:
            self.models, self.search_longest = ["tiny"], False
            if self.contexts == BenchConfig.__dataclass_fields__["contexts"].default_factory():
                self.contexts = [256, 512]


def plan_for(
    config,
    name: str,
    variant: Variant,
    context: int,
    cfg: BenchConfig,
    device,
    dtype,
    cp: int = 1,
    processes: int = 1,
    sharding: str = "none",
    zero3_live_values: int = planner.PlanConfig.zero3_live_values,
) -> dict:
    """The planner's prediction for this point, with the switches the variant runs with (per rank of `cp` sharing
    each row, over `processes` when more than one: under DDP, bench/cp_memory.py, or sharded by FSDP2 with
    `sharding` fsdp2, bench/fsdp_memory.py)."""
    tokens = context // cp  # a rank's
    offload = (
        variant.ours
        and device.type == "cuda"
        and (variant.offload == "on" or (variant.offload == "auto" and tokens >= 8192))
    )
    tiled = (
        variant.ours
        and tokens > cfg.tiled_mlp_tokens
        and (variant.tiled_mlp == "on" or (variant.tiled_mlp == "auto" and tokens >= 4 * cfg.tiled_mlp_tokens))
    )
    return planner.plan(
        config,
        planner.PlanConfig(
            model=name,
            context=context,
            context_parallel=cp,
            processes=processes,
            sharding=sharding,
            zero3_live_values=zero3_live_values,
            rank=cfg.rank,
            trainable_params="embed,norm" if variant.lora_plus else "",
            offload=offload,
            offload_layers=cfg.offload_layers,
            chunked_loss=variant.ours,
            tiled_mlp=tiled,
            tile_tokens=cfg.tiled_mlp_tokens,
            compute_dtype=str(dtype).removeprefix("torch."),
            lora_dropout=cfg.lora_dropout,
            baseline=not variant.ours,
            recompute_norms=variant.recompute_norms,
            recompute_dropout=variant.recompute_dropout,
            optim=variant.optim,
            device=device.type,
        ),
    )


def measure(name: str, layers: int | None, variant_name: str, context: int, cfg: BenchConfig, device, dtype) -> dict:
    """Build, prepare and train one point; peak memory in bytes, tokens/s and the planner's prediction."""
    variant = VARIANTS[variant_name]
    config = model_config(name, layers)
    _free(device)
    model = prepare(build_nf4(config, device, dtype), variant, context, cfg, dtype)
    try:
        result = train_steps(
            model, variant, context, cfg, device, dtype, measure_cpu=tracked_peak if device.type == "cpu" else None
        )
    finally:
        del model
    if device.type == "cuda":
        peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    else:
        peak, reserved = result["cpu_peak"], None
    predicted = plan_for(config, name, variant, context, cfg, device, dtype)
    return {
        "model": name,
        "layers": config.num_hidden_layers,
        "variant": variant_name,
        "context": context,
        "rows": cfg.rows,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device.type,
        "peak_bytes": peak,
        "reserved_bytes": reserved,
        "tokens_per_s": result["tokens_per_s"],
        "timed_steps": result["timed_steps"],
        "loss": result["loss"],
        "planned_bytes": predicted["peak_allocated_gib"] * planner.GIB,
        "plan": predicted["config"],
    }


def _free(device) -> None:
    gc.collect()  # method-bound forwards (PEFT, TRL, ours) make reference cycles: free the last model first
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        host_empty = getattr(torch._C, "_host_emptyCache", None)  # cached pinned blocks: empty_cache keeps them
        if host_empty is not None:
            host_empty()


def longest_context(name: str, cfg: BenchConfig, device, dtype, start: int = 32768, limit: int = 1 << 21) -> int:
    """The longest context (a multiple of 8192) at which ours trains a step without running out of memory."""

    def trains(n):
        out_of_memory = False
        try:
            measure(name, None, "ours", n, dataclasses.replace(cfg, steps=1), device, dtype)
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True  # handled outside the except block, once the traceback's tensors are gone
        _free(device)
        return not out_of_memory

    lo, hi = 0, start
    while hi <= limit and trains(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 8192:
        mid = (lo + hi) // 2 // 8192 * 8192
        lo, hi = (mid, hi) if trains(mid) else (lo, mid)
    return lo


def run(cfg: BenchConfig, argv: list[str]) -> tuple[str, dict]:
    """Measure every (model, depth, context, variant) point; returns the Markdown report and the JSON record."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.dtype == "auto":
        from longqlora.hardware import supports_bf16

        dtype = torch.bfloat16 if supports_bf16() else torch.float16
    else:
        dtype = getattr(torch, cfg.dtype)
    points, longest, where = [], [], memory_report.machine(device)
    for name in cfg.models:
        for layers in cfg.layers or [None]:
            for context in cfg.contexts:
                for variant in cfg.variants:
                    out_of_memory = False
                    try:
                        point = measure(name, layers, variant, context, cfg, device, dtype)
                    except torch.cuda.OutOfMemoryError:
                        out_of_memory = True  # freed below, once the traceback's frames are gone
                    if out_of_memory:
                        _free(device)
                        point = {
                            "model": name,
                            "layers": layers or model_config(name).num_hidden_layers,
                            "variant": variant,
                            "context": context,
                            "error": "out of memory",
                        }
                    point["command"] = _command(argv)  # speed ratios compare points of one command's run only
                    logger.info("%s", {k: v for k, v in point.items() if k != "plan"})
                    points.append(point)
                    if cfg.json:  # every point kept as it comes: a long CPU run cut short loses nothing measured
                        write_json_atomic(
                            cfg.json,
                            memory_report.merge_record(
                                cfg.json, {"command": _command(argv), "points": points, "fits": [], "machine": where}
                            ),
                        )
        if cfg.search_longest and device.type == "cuda" and not cfg.layers:
            longest.append([name, f"{longest_context(name, cfg, device, dtype):,}"])
    text, fits = memory_report.report(points, argv, device, longest, _planned(cfg), _full_depth, gpu=_gpu(cfg))
    return text, {
        "command": _command(argv),
        "device": device.type,
        "torch": torch.__version__,
        "machine": where,
        "points": points,
        "fits": fits,
    }


def _planned(cfg: BenchConfig):
    """The planner's prediction for a point of the report, named by strings as the JSON records it."""

    def planned(name, layers, variant: str, context: int, device: str, dtype: str, offload_layers=None) -> dict:
        at = dataclasses.replace(cfg, offload_layers=offload_layers)
        config = model_config(name, layers)
        return plan_for(config, name, VARIANTS[variant], context, at, torch.device(device), getattr(torch, dtype))

    return planned


def _gpu(cfg: BenchConfig) -> dict | None:
    """The GPU record of --gpu_from (relative to the repository; an absolute path stays as given), or None."""
    return memory_report.read_record(Path(__file__).resolve().parents[1] / cfg.gpu_from)


def _full_depth(name: str) -> int:
    return model_config(name).num_hidden_layers


def _command(argv: list[str]) -> str:
    return f"python bench/memory.py {' '.join(argv)}"


def main(argv=None) -> None:
    from transformers import HfArgumentParser

    setup_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    with one_line_errors():  # --layers 0, --variants bogus, a missing --report_from: one line, exit 2
        (cfg,) = HfArgumentParser(BenchConfig).parse_args_into_dataclasses(args=argv)
        text = _report_from(cfg, argv) if cfg.report_from else _measure(cfg, argv)
        print(text)


def _report_from(cfg: BenchConfig, argv: list[str]) -> str:
    """The report of the points a JSON records, planned with today's planner (written to --output too)."""
    record = memory_report.read_record(cfg.report_from)
    points = record["points"]
    device = torch.device(points[0]["device"] if points else "cpu")
    where = record.get("machine")
    text, _ = memory_report.report(points, argv, device, [], _planned(cfg), _full_depth, where, _gpu(cfg))
    text = text.replace(
        "\n\n", "\n\nPoints measured by:\n\n" + "\n".join(f"- `{c}`" for c in record.get("commands", [])) + "\n\n", 1
    )
    if cfg.output:
        write_text_atomic(cfg.output, text)
    return text


def _measure(cfg: BenchConfig, argv: list[str]) -> str:
    """Measure every point; the report (written to --output too) and the JSON record merged into --json."""
    text, record = run(cfg, argv)
    if cfg.output:
        write_text_atomic(cfg.output, text)
    if cfg.json:
        write_json_atomic(cfg.json, memory_report.merge_record(cfg.json, record))
    return text


if __name__ == "__main__":
    main()
