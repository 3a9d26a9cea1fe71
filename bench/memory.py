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

On a GPU the peak is CUDA's allocator's; on a CPU it is the highest total of live tensor bytes, from the profiler's
allocation events plus what was resident before the step (weights, optimizer state). With `--layers`, every point is
measured at each depth and the peak is fitted as fixed + layers x per-layer (exact at two depths) and extrapolated
to the model's full depth. Optimizer state is created before the measured steps, so one step shows the peak.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import platform
import sys
import time
from dataclasses import dataclass, field

import torch

from longqlora.cli import setup_logging
from longqlora.output import markdown_table, write_json_atomic, write_text_atomic
from longqlora.training import memory
from longqlora.training import plan as planner

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
    "ours_full_attention": Variant(s2=False),
    "baseline": Variant(lora_plus=False, ours=False, recompute_norms=False, recompute_dropout=False, offload="off"),
    "baseline_plus": Variant(ours=False, recompute_norms=False, recompute_dropout=False, offload="off"),
}


@dataclass
class BenchConfig:
    models: list[str] = field(default_factory=lambda: ["llama-2-7b", "llama-2-13b", "llama-3.1-8b", "llama-2-70b"])
    contexts: list[int] = field(default_factory=lambda: [8192, 16384, 32768])
    variants: list[str] = field(default_factory=lambda: ["ours", "ours_no_offload", "baseline", "baseline_plus"])
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
            "under the profiler), the others tokens/s (the first if alone)."
        },
    )
    rank: int = 8
    lora_dropout: float = 0.05
    tiled_mlp_tokens: int = 16384
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
    output: str = "docs/memory.md"
    json: str | None = field(
        default=None,
        metadata={"help": "Also write every measured point as JSON (the planner's calibration test reads it)."},
    )
    tiny: bool = field(default=False, metadata={"help": "Tiny shapes on the CPU (tests): the same code, seconds."})
    report_from: str | None = field(
        default=None,
        metadata={"help": "Measure nothing: render --output from the points of this JSON, with the current planner."},
    )

    def __post_init__(self):
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"--variants {' '.join(bad)}: use {', '.join(VARIANTS)}")
        if self.steps < 1:
            raise ValueError(f"--steps {self.steps}: at least 1")
        if any(n < 1 for n in self.layers):
            raise ValueError(f"--layers {self.layers}: positive layer counts, e.g. 2 4")
        if self.rows not in ("plain", "packed"):
            raise ValueError(f"--rows {self.rows!r}: plain or packed")
        if self.dtype not in ("auto", *planner.BYTES):
            raise ValueError(f"--dtype {self.dtype!r}: auto, {', '.join(planner.BYTES)}")
        if self.tiny:
            self.models, self.search_longest = ["tiny"], False
            if self.contexts == BenchConfig.__dataclass_fields__["contexts"].default_factory():
                self.contexts = [256, 512]


# ------------------------------------------------------------------------------------------------- the model
def model_config(name: str, layers: int | None = None):
    if name == "tiny":
        from longqlora.training.tiny import tiny_llama_config

        config = tiny_llama_config("gqa", vocab_size=512, max_position_embeddings=8192)
    else:
        config = planner.load_config(name)
    if layers:
        config.num_hidden_layers = layers
    return config


def build_nf4(config, device: torch.device, dtype: torch.dtype):
    """The model with random weights, every decoder Linear quantised to NF4 (double quant) one at a time, marked as
    loaded in 4 bit so that PEFT gives it its 4-bit LoRA layers, as `from_pretrained` would."""
    import bitsandbytes as bnb
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    gen = torch.Generator(device=device).manual_seed(0)
    for parent in list(model.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear):
                continue
            weight = torch.randn(child.out_features, child.in_features, generator=gen, device=device, dtype=dtype)
            new = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=False,
                compute_dtype=dtype,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            new.weight = bnb.nn.Params4bit(
                weight.mul_(0.02), requires_grad=False, compress_statistics=True, quant_type="nf4"
            ).to(device)
            setattr(parent, name, new)
            del weight
    for module in model.modules():  # embeddings, norms, lm_head: still on the meta device
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device=device, recurse=False)
            for p in module.parameters(recurse=False):
                torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config).to(device)
    model.requires_grad_(False)
    model.is_loaded_in_4bit = True  # what from_pretrained sets; PEFT dispatches its bnb 4-bit LoRA layers on it
    model.config.use_cache = False
    return model


def prepare(model, variant: Variant, context: int, cfg: BenchConfig, dtype: torch.dtype):
    """Ours through the toolkit's adaptation and switches; the baseline as QLoRA users set it up."""
    from longqlora.adapters import adapt_for_training, add_adapters
    from longqlora.model import ModelConfig

    mcfg = ModelConfig(
        model_name_or_path="bench",
        target_context=context,
        lora_r=cfg.rank,
        lora_alpha=2 * cfg.rank,
        lora_dropout=cfg.lora_dropout,
        trainable_params="embed,norm" if variant.lora_plus else "",
        s2_attention=variant.ours and variant.s2,
        s2_group_schedule="none",
    )
    if variant.ours:
        model, _ = adapt_for_training(model, mcfg, dtype)
        if variant.recompute_norms:
            memory.recompute_norms(model)
        if variant.recompute_dropout:
            memory.recompute_lora_dropout(model)
        if variant.tiled_mlp != "off":
            memory.enable_tiled_mlp(
                model, cfg.tiled_mlp_tokens, 0 if variant.tiled_mlp == "on" else 4 * cfg.tiled_mlp_tokens
            )
    else:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model, _ = add_adapters(model, mcfg)
    return model


def optimizer_for(params, name: str):
    if name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-5)
    return torch.optim.AdamW(params, lr=1e-5)


# -------------------------------------------------------------------------------------------------- the steps
def batch(vocab: int, context: int, rows: str, device):
    ids = torch.randint(3, vocab, (1, context), device=device)
    if rows == "plain":
        return {"input_ids": ids, "labels": ids}
    cut = [context // 4] * 3 + [context - 3 * (context // 4)]
    pos = torch.cat([torch.arange(n, device=device) for n in cut]).unsqueeze(0)
    return {"input_ids": ids, "labels": ids, "position_ids": pos}


def train_steps(model, variant: Variant, context: int, cfg: BenchConfig, device, dtype, measure_cpu=None) -> dict:
    """Optimizer state first (one zero-gradient step), then `cfg.steps` measured steps on random tokens."""
    from trl.trainer.utils import add_fused_lm_head

    if variant.ours:
        add_fused_lm_head(model.get_base_model())
    hidden = model.config.get_text_config().hidden_size
    threshold = memory.offload_threshold_bytes(variant.offload if variant.ours else "off", 8192, hidden, dtype.itemsize)
    offload = memory.offload_context(model, threshold)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_for(params, variant.optim)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    inputs = batch(model.config.vocab_size, context, cfg.rows, device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    model.train()
    times, losses = [], []

    def one_step():
        start = time.perf_counter()
        with offload, autocast:
            out = model(**inputs, **({"fused_lm_head": True} if variant.ours else {}))
            loss = out.loss
            del out  # the baseline's logits must not outlive the step
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())

    if device.type == "cpu" and dtype != torch.float32:
        # PEFT's LoRA layers ask torch.is_autocast_enabled(), which means CUDA's autocast: under the CPU's they cast
        # every LoRA input to fp32 (a 4-byte copy per adapted projection that a GPU step never makes). Raising that
        # flag for the whole step, backward and recomputation included, makes the CPU step take the GPU's branch.
        torch.set_autocast_enabled("cuda", True)
    try:
        cpu_peak = _measured_steps(
            one_step, cfg.steps, measure_cpu and (lambda run: _resident_bytes(model, optimizer) + measure_cpu(run))
        )
    finally:
        torch.set_autocast_enabled("cuda", False)
    timed = times[1:] or times  # the first step warms up (and on a CPU runs under the profiler)
    return {
        "tokens_per_s": context / (sum(timed) / len(timed)),
        "loss": losses[-1],
        "cpu_peak": cpu_peak,
        "timed_steps": len(times) - 1 if measure_cpu or len(times) > 1 else 1,
    }


def _measured_steps(one_step, steps: int, measure_cpu) -> int | None:
    """The first step under `measure_cpu` (its peak) when given, the others plain; returns that peak."""
    cpu_peak = None
    if measure_cpu is not None:  # the first step under the profiler (its memory), the others timed without it
        cpu_peak = measure_cpu(one_step)
    else:
        one_step()
    for _ in range(steps - 1):
        one_step()
    return cpu_peak


def _resident_bytes(model, optimizer) -> int:
    """Bytes of every tensor alive before the step: parameters, buffers, NF4 scales, optimizer state."""
    tensors = list(model.parameters()) + list(model.buffers())
    for module in model.modules():  # bitsandbytes keeps the NF4 scales outside the parameter
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            tensors += [
                t
                for t in (
                    state.absmax,
                    state.code,
                    getattr(state.state2, "absmax", None),
                    getattr(state.state2, "code", None),
                )
                if t is not None
            ]
    for state in optimizer.state.values():
        tensors += [t for t in state.values() if isinstance(t, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _profile_peak(run) -> int:
    """The highest total of live CPU tensor bytes above the start while `run()` runs (allocation events in order)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted(
        (e for e in prof.profiler.function_events if e.self_cpu_memory_usage), key=lambda e: e.time_range.start
    )
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def plan_for(config, name: str, variant: Variant, context: int, cfg: BenchConfig, device, dtype) -> dict:
    """The planner's prediction for this point, with the switches the variant runs with."""
    offload = (
        variant.ours
        and device.type == "cuda"
        and (variant.offload == "on" or (variant.offload == "auto" and context >= 8192))
    )
    tiled = (
        variant.ours
        and context > cfg.tiled_mlp_tokens
        and (variant.tiled_mlp == "on" or (variant.tiled_mlp == "auto" and context >= 4 * cfg.tiled_mlp_tokens))
    )
    return planner.plan(
        config,
        planner.PlanConfig(
            model=name,
            context=context,
            rank=cfg.rank,
            trainable_params="embed,norm" if variant.lora_plus else "",
            offload=offload,
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
            model, variant, context, cfg, device, dtype, measure_cpu=_profile_peak if device.type == "cpu" else None
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


# ------------------------------------------------------------------------------------------------- the report
def fit_depth(points: list[dict], full_layers: int) -> dict | None:
    """peak = fixed + layers x per_layer from the points of one (model, variant, context) at two or more depths
    (least squares), and the peak extrapolated to `full_layers`."""
    if len({p["layers"] for p in points}) < 2:
        return None
    xs, ys = [p["layers"] for p in points], [p["peak_bytes"] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    per_layer = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    fixed = my - per_layer * mx
    return {
        "fixed_bytes": fixed,
        "per_layer_bytes": per_layer,
        "full_layers": full_layers,
        "extrapolated_bytes": fixed + per_layer * full_layers,
    }


def report(points: list[dict], cfg: BenchConfig, argv: list[str], device, longest: list) -> tuple[str, list]:
    gib = planner.GIB
    where = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    )
    lines = [
        f"# Training memory: {where}, torch {torch.__version__}",
        "",
        f"`python bench/memory.py {' '.join(argv)}`".replace(" `", "`"),
        "",
    ]
    rows = []
    for p in points:
        if "error" in p:
            rows.append([p["model"], p["layers"], p["context"], p["variant"], p["error"], "", "", ""])
            continue
        p = {
            **p,
            "planned_bytes": plan_for(
                model_config(p["model"], p["layers"]),
                p["model"],
                VARIANTS[p["variant"]],
                p["context"],
                cfg,
                torch.device(p["device"]),
                getattr(torch, p["dtype"]),
            )["peak_allocated_gib"]
            * gib,
        }  # the current planner, also for points measured before it changed
        err = 100 * (p["planned_bytes"] - p["peak_bytes"]) / p["peak_bytes"]
        reserved = "n/a" if p["reserved_bytes"] is None else f"{p['reserved_bytes'] / gib:.3f}"
        rows.append(
            [
                p["model"],
                p["layers"],
                p["context"],
                p["variant"],
                f"{p['peak_bytes'] / gib:.3f}",
                reserved,
                f"{p['tokens_per_s']:.0f}" if p.get("timed_steps") else "(profiled)",
                f"{p['planned_bytes'] / gib:.3f} ({err:+.1f}%)",
            ]
        )
    lines.append(
        markdown_table(
            [
                "model",
                "layers",
                "context",
                "variant",
                "peak allocated GiB",
                "peak reserved GiB",
                "tokens/s",
                "planned GiB (error)",
            ],
            rows,
        )
    )
    fits = []
    groups = {}
    for p in points:
        if "error" not in p:
            groups.setdefault((p["model"], p["variant"], p["context"]), []).append(p)
    for (name, variant, context), group in groups.items():
        full = model_config(name).num_hidden_layers
        fit = fit_depth(group, full)
        if fit is None:
            continue
        dtype = getattr(torch, group[0]["dtype"])
        planned = (
            plan_for(
                model_config(name), name, VARIANTS[variant], context, cfg, torch.device(group[0]["device"]), dtype
            )["peak_allocated_gib"]
            * gib
        )
        on_gpu = plan_for(model_config(name), name, VARIANTS[variant], context, cfg, torch.device("cuda"), dtype)
        err = 100 * (planned - fit["extrapolated_bytes"]) / fit["extrapolated_bytes"]
        fits.append(
            {
                "model": name,
                "variant": variant,
                "context": context,
                **fit,
                "planned_bytes": planned,
                "planned_gpu_need_gib": on_gpu["device_need_gib"],
            }
        )
        fits[-1]["row"] = [
            name,
            context,
            variant,
            f"{fit['fixed_bytes'] / gib:.3f}",
            f"{fit['per_layer_bytes'] / gib:.4f}",
            full,
            f"{fit['extrapolated_bytes'] / gib:.2f}",
            f"{planned / gib:.2f} ({err:+.1f}%)",
            f"{on_gpu['device_need_gib']:.2f}",
        ]
    if fits:
        lines += [
            "",
            "Fitted as fixed + layers x per-layer and extrapolated to the model's full depth, beside the "
            "planner for the same step on this device and, last, what it plans a GPU needs for it (CUDA "
            "rules, the variant's offloading, CUDA context and fragmentation included; not yet measured):",
            "",
            markdown_table(
                [
                    "model",
                    "context",
                    "variant",
                    "fixed GiB",
                    "per layer GiB",
                    "full depth",
                    "extrapolated GiB",
                    "planned GiB (error)",
                    "planned GPU need GiB",
                ],
                [f.pop("row") for f in fits],
            ),
        ]
    speed = speed_rows(points)
    if speed:
        lines += [
            "",
            "Speed where steps ran without the profiler (ratios within one command's run; the same "
            "machine, one after the other):",
            "",
            markdown_table(["model", "layers", "context", "variant", "tokens/s", "time per step vs ours"], speed),
        ]
    if longest:
        lines += [
            "",
            "Longest context ours trains (LoRA+, S2-Attn, every switch):",
            "",
            markdown_table(["model", "tokens"], longest),
        ]
    return "\n".join(lines) + "\n", fits


def speed_rows(points: list[dict]) -> list[list]:
    """Tokens/s of every timed point, and its step time relative to ours at the same model, depth and context."""
    timed = [p for p in points if p.get("timed_steps") and "error" not in p]
    ours = {(p["model"], p["layers"], p["context"]): p["tokens_per_s"] for p in timed if p["variant"] == "ours"}
    rows = []
    for p in timed:
        ref = ours.get((p["model"], p["layers"], p["context"]))
        rows.append(
            [
                p["model"],
                p["layers"],
                p["context"],
                p["variant"],
                f"{p['tokens_per_s']:.1f}",
                f"{ref / p['tokens_per_s']:.2f}" if ref else "",
            ]
        )
    return rows


def run(cfg: BenchConfig, argv: list[str]) -> tuple[str, dict]:
    """Measure every (model, depth, context, variant) point; returns the Markdown report and the JSON record."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.dtype == "auto":
        from longqlora.hardware import supports_bf16

        dtype = torch.bfloat16 if supports_bf16() else torch.float16
    else:
        dtype = getattr(torch, cfg.dtype)
    points, longest = [], []
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
                    logger.info("%s", {k: v for k, v in point.items() if k != "plan"})
                    points.append(point)
                    if cfg.json:  # every point kept as it comes: a long CPU run cut short loses nothing measured
                        write_json_atomic(
                            cfg.json, merge_record(cfg.json, {"command": _command(argv), "points": points, "fits": []})
                        )
        if cfg.search_longest and device.type == "cuda" and not cfg.layers:
            longest.append([name, f"{longest_context(name, cfg, device, dtype):,}"])
    text, fits = report(points, cfg, argv, device, longest)
    return text, {
        "command": _command(argv),
        "device": device.type,
        "torch": torch.__version__,
        "points": points,
        "fits": fits,
    }


def _command(argv: list[str]) -> str:
    return f"python bench/memory.py {' '.join(argv)}"


def main(argv=None) -> None:
    from transformers import HfArgumentParser

    setup_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    (cfg,) = HfArgumentParser(BenchConfig).parse_args_into_dataclasses(args=argv)
    if cfg.report_from:
        import json

        with open(cfg.report_from, encoding="utf-8") as f:
            record = json.load(f)
        points = record["points"]
        text, _ = report(points, cfg, argv, torch.device(points[0]["device"] if points else "cpu"), [])
        text = text.replace(
            "\n\n",
            "\n\nPoints measured by:\n\n" + "\n".join(f"- `{c}`" for c in record.get("commands", [])) + "\n\n",
            1,
        )
        write_text_atomic(cfg.output, text)
        print(text)
        return
    text, record = run(cfg, argv)
    write_text_atomic(cfg.output, text)
    if cfg.json:
        write_json_atomic(cfg.json, merge_record(cfg.json, record))
    print(text)


def merge_record(path: str, record: dict) -> dict:
    """`record` added to the JSON at `path` if there is one: several commands (models that need different contexts,
    say) build one calibration file; a point measured again replaces the old one."""
    import json
    import os

    if not os.path.exists(path):
        return {"commands": [record["command"]], "points": record["points"], "fits": record["fits"]}
    with open(path, encoding="utf-8") as f:
        old = json.load(f)
    key = lambda p: (p["model"], p["layers"], p["variant"], p["context"], p.get("rows"), p.get("dtype"))  # noqa: E731
    fresh = {key(p) for p in record["points"]}
    fit_key = lambda f: (f["model"], f["variant"], f["context"])  # noqa: E731
    new_fits = {fit_key(f) for f in record["fits"]}
    return {
        "commands": [c for c in old.get("commands", []) if c != record["command"]] + [record["command"]],
        "points": [p for p in old["points"] if key(p) not in fresh] + record["points"],
        "fits": [f for f in old.get("fits", []) if fit_key(f) not in new_fits] + record["fits"],
    }


if __name__ == "__main__":
    main()
