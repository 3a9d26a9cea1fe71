"""Peak memory and speed of LongQLoRA training steps on real model shapes, against plain QLoRA, and the longest
context that trains on this GPU.

Each model is built from its preset config with random weights, quantised to NF4 one Linear at a time (no download,
never a 16-bit copy of the whole model in memory). For each context it runs a few training steps and records peak
allocated/reserved memory and tokens/s for: ours with every memory switch on; ours without offloading; and the
baseline a user would pick instead (transformers Trainer + PEFT + bitsandbytes QLoRA, full SDPA attention, gradient
checkpointing, the model's own loss). The planner's prediction (longqlora.plan) sits beside each measurement.

    python bench/memory.py --output docs/memory.md            # on a GPU: Llama-2-7B/13B/70B, Llama-3.1-8B shapes
    python bench/memory.py --tiny --output /tmp/memory.md     # on a CPU: tiny shapes, the same code, in seconds

On a CPU the peak is read from the profiler's allocation events (tensors only); on a GPU from CUDA's allocator.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import sys
import time
from dataclasses import dataclass, field

import torch

from longqlora import memory
from longqlora import plan as planner
from longqlora.model import ModelConfig, add_adapters, stream_in_compute_dtype, trainable_to_fp32
from longqlora.report import markdown_table, write_text_atomic

logger = logging.getLogger("bench.memory")
VARIANTS = ("ours", "ours_no_offload", "baseline")


@dataclass
class BenchConfig:
    models: list[str] = field(default_factory=lambda: ["llama-2-7b", "llama-2-13b", "llama-3.1-8b", "llama-2-70b"])
    contexts: list[int] = field(default_factory=lambda: [8192, 16384, 32768])
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    steps: int = field(default=3, metadata={"help": "Training steps per point; the first is not timed."})
    rank: int = 8
    search_longest: bool = field(default=True, metadata={"help": "Also find the longest context ours trains at."})
    output: str = "docs/memory.md"
    tiny: bool = field(default=False, metadata={"help": "Tiny shapes on the CPU (tests): the same code, seconds."})

    def __post_init__(self):
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"--variants {' '.join(bad)}: use {', '.join(VARIANTS)}")
        if self.steps < 2:
            raise ValueError(f"--steps {self.steps}: at least 2 (the first step is not timed)")
        if self.tiny:
            self.models, self.search_longest = ["tiny"], False
            if self.contexts == BenchConfig.__dataclass_fields__["contexts"].default_factory():
                self.contexts = [256, 512]


# ------------------------------------------------------------------------------------------------- the model
def model_config(name: str):
    if name == "tiny":
        from longqlora.tiny import tiny_llama_config

        return tiny_llama_config("gqa", vocab_size=512, max_position_embeddings=8192)
    return planner.load_config(name)


def build_nf4(config, device: torch.device, dtype: torch.dtype):
    """The model with random weights, every decoder Linear quantised to NF4 (double quant) one at a time."""
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
            new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=dtype,
                                    compress_statistics=True, quant_type="nf4", device="meta")
            new.weight = bnb.nn.Params4bit(weight.mul_(0.02), requires_grad=False, compress_statistics=True,
                                           quant_type="nf4").to(device)
            setattr(parent, name, new)
    for module in model.modules():  # embeddings, norms, lm_head: still on the meta device
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device=device, recurse=False)
            for p in module.parameters(recurse=False):
                torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config).to(device)
    model.requires_grad_(False)
    return model


def prepare(model, variant: str, context: int, rank: int, dtype: torch.dtype):
    """Ours: LoRA+ (embeddings and norms trained), S2-Attn and the memory switches. Baseline: LoRA on q/k/v/o,
    full attention, plain checkpointing (what a user of transformers + PEFT + bitsandbytes would run)."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # as QLoRA (and we) load
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ours = variant != "baseline"
    cfg = ModelConfig(model_name_or_path="bench", target_context=context, lora_r=rank, lora_alpha=2 * rank,
                      trainable_params="embed,norm" if ours else "")
    model, _ = add_adapters(model, cfg)
    trainable_to_fp32(model)
    if ours:
        from longqlora.attention import enable_s2_attention

        enable_s2_attention(model, cfg.group_size)
        stream_in_compute_dtype(model, dtype)
        memory.enable_tiled_mlp(model, tile_tokens=16384, min_tokens=65536)
    return model, cfg


# -------------------------------------------------------------------------------------------------- the steps
def train_steps(model, variant: str, context: int, steps: int, device, dtype) -> dict:
    """`steps` optimizer steps on random tokens; the loss is TRL's fused one for ours, the model's for the baseline."""
    from trl.trainer.utils import add_fused_lm_head

    ours = variant != "baseline"
    if ours:
        add_fused_lm_head(model.get_base_model())
    hidden = model.config.get_text_config().hidden_size
    threshold = memory.offload_threshold_bytes("auto" if variant == "ours" else "off", 8192, hidden, dtype.itemsize)
    offload = memory.offload_context(model, threshold)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(3, model.config.vocab_size, (1, context), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    model.train()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with offload, autocast:
            out = model(input_ids=ids, labels=ids, **({"fused_lm_head": True} if ours else {}))
            out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"tokens_per_s": context / (sum(times[1:]) / len(times[1:])), "loss": out.loss.item()}


def measure(name: str, variant: str, context: int, cfg: BenchConfig, device, dtype) -> dict:
    """Build, prepare and train one point; returns peak memory (GiB), tokens/s and the planner's prediction."""
    config = model_config(name)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_nf4(config, device, dtype)
    model, model_cfg = prepare(model, variant, context, cfg.rank, dtype)
    if device.type == "cuda":
        result = train_steps(model, variant, context, cfg.steps, device, dtype)
        peak = torch.cuda.max_memory_allocated() / planner.GIB
        reserved = torch.cuda.max_memory_reserved() / planner.GIB
    else:
        resident = sum(t.untyped_storage().nbytes() for t in {id(t): t for t in _tensors(model)}.values())
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            result = train_steps(model, variant, context, cfg.steps, device, dtype)
        peak = (resident + _peak_from_events(prof)) / planner.GIB
        reserved = float("nan")
    predicted = planner.plan(config, planner.PlanConfig(
        model=name, context=context, rank=cfg.rank, trainable_params=model_cfg.trainable_params,
        offload=variant == "ours" and device.type == "cuda" and context >= 8192, tiled_mlp=False,
        chunked_loss=variant != "baseline", compute_dtype=str(dtype).removeprefix("torch.")))
    del model
    return {"model": name, "variant": variant, "context": context, "peak_gib": peak, "reserved_gib": reserved,
            "planned_gib": predicted["peak_allocated_gib"], **result}


def _tensors(model):
    yield from model.parameters()
    yield from model.buffers()
    for module in model.modules():  # bitsandbytes keeps the NF4 scales outside the parameter
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            yield from (t for t in (state.absmax, state.code, getattr(state.state2, "absmax", None),
                                    getattr(state.state2, "code", None)) if t is not None)


def _peak_from_events(prof) -> int:
    """The highest total of live CPU tensor bytes during the profiled steps (allocations minus frees, in order)."""
    events = sorted((e for e in prof.profiler.function_events if e.self_cpu_memory_usage),
                    key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def longest_context(name: str, cfg: BenchConfig, device, dtype, start: int = 32768) -> int:
    """The longest context (a multiple of 8192) at which ours trains a step without running out of memory."""
    def trains(n):
        try:
            measure(name, "ours", n, dataclasses.replace(cfg, steps=2), device, dtype)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    lo, hi = 0, start
    while trains(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 8192:
        mid = (lo + hi) // 2 // 8192 * 8192
        lo, hi = (mid, hi) if trains(mid) else (lo, mid)
    return lo


def run(cfg: BenchConfig, argv: list[str]) -> str:
    """Measure every (model, context, variant) point; returns the Markdown report."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows, longest = [], []
    for name in cfg.models:
        for context in cfg.contexts:
            for variant in cfg.variants:
                try:
                    r = measure(name, variant, context, cfg, device, dtype)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    rows.append([name, context, variant, "out of memory", "", "", ""])
                    continue
                logger.info("%s", r)
                error = 100 * (r["planned_gib"] - r["peak_gib"]) / r["peak_gib"]
                reserved = "n/a" if device.type == "cpu" else f"{r['reserved_gib']:.3f}"
                rows.append([name, context, variant, f"{r['peak_gib']:.3f}", reserved, f"{r['tokens_per_s']:.0f}",
                             f"{r['planned_gib']:.3f} ({error:+.0f}%)"])
        if cfg.search_longest and device.type == "cuda":
            longest.append([name, f"{longest_context(name, cfg, device, dtype):,}"])
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or 'unknown'})"
    lines = [f"# Training memory: {where}", "", f"`python bench/memory.py {' '.join(argv)}`".replace(" `", "`"), "",
             markdown_table(["model", "context", "variant", "peak allocated GiB", "peak reserved GiB", "tokens/s",
                             "planned GiB (error)"], rows)]
    if longest:
        lines += ["", "Longest context ours trains (LoRA+, S2-Attn, offload, chunked loss, tiled MLP):", "",
                  markdown_table(["model", "tokens"], longest)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    (cfg,) = HfArgumentParser(BenchConfig).parse_args_into_dataclasses(args=argv)
    report = run(cfg, argv)
    write_text_atomic(cfg.output, report)
    print(report)


if __name__ == "__main__":
    main()
