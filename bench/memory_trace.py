"""Where a CPU training step's memory peaks: the highest live total of each phase (a decoder layer's forward or
backward, the loss, the head), beside the planner's parts for the same step.

    python bench/memory_trace.py --model llama-2-13b --layers 2 --context 4096 --variants ours baseline

One step as bench/memory.py measures it (real width, `--layers` decoder layers, NF4, bf16 autocast), under the same
tracker (bench/memory_step.tracked_live), which here also sees the live total after every op and the innermost
module running it. Bytes are above the step's start, so what was resident before (weights, optimizer state) is out;
the planner's comparable figures are its checkpoints plus one layer's working set (`layer_recompute`) and its
checkpoints plus the loss's. Found with it: the plain QLoRA's 13B peaks in a layer's MLP backward, not in its loss
(plan.MLP_BACKWARD_COPIES).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import memory as memory_bench  # noqa: E402  (bench/memory.py)
from memory_step import tracked_live  # noqa: E402

from longqlora.output import markdown_table, write_text_atomic  # noqa: E402
from longqlora.training.plan import GIB  # noqa: E402


@dataclass
class TraceConfig:
    model: str = field(default="llama-2-13b", metadata={"help": "A preset (its width, heads, vocabulary, MLP)."})
    layers: int = field(default=2, metadata={"help": "Decoder layers built at the preset's width."})
    context: int = field(default=4096, metadata={"help": "Tokens in the traced step."})
    variants: list[str] = field(
        default_factory=lambda: ["ours", "baseline"], metadata={"help": "bench/memory.py's variants to trace."}
    )
    output: str | None = field(default=None, metadata={"help": "Also write the Markdown report here."})

    def __post_init__(self):
        bad = [v for v in self.variants if v not in memory_bench.VARIANTS]
        if bad:
            raise ValueError(f"--variants {' '.join(bad)}: use {', '.join(memory_bench.VARIANTS)}")
        if self.layers < 1 or self.context < 1:
            raise ValueError(f"--layers {self.layers} --context {self.context}: positive numbers")


def phase_of(module: str, backward: bool) -> str:
    """A decoder layer as one phase (its attention, MLP and norms together), any other module as its own."""
    layer = re.match(r".*?layers\.\d+", module)
    return ("backward " if backward else "forward ") + (layer.group(0) if layer else module)


def trace(name: str, layers: int, variant: str, context: int) -> list[tuple[str, int, str]]:
    """[(phase, highest bytes above the step's start, the op that reached it)] in the order the phases began."""
    bench = memory_bench.BenchConfig(models=[name], layers=[layers], contexts=[context], variants=[variant], steps=1)
    config = memory_bench.model_config(name, layers)
    cpu, dtype = torch.device("cpu"), torch.bfloat16
    highest: dict[str, tuple[int, str]] = {}  # insertion order: the order the phases began

    def observe(live, op, module, backward):
        module = module.removeprefix("PeftModelForCausalLM.base_model.model").removeprefix(".")
        phase = phase_of({"": "the causal LM (head and loss)", "Global": "no module"}.get(module, module), backward)
        if live > highest.get(phase, (-1, ""))[0]:
            highest[phase] = (live, op)

    def measure(run, *known):
        return tracked_live(run, *known, observe=observe)[0]

    model = memory_bench.prepare(
        memory_bench.build_nf4(config, cpu, dtype), memory_bench.VARIANTS[variant], context, bench, dtype
    )
    memory_bench.train_steps(model, memory_bench.VARIANTS[variant], context, bench, cpu, dtype, measure_cpu=measure)
    return [(phase, live, op) for phase, (live, op) in highest.items()]


def main(argv=None) -> None:
    from transformers import HfArgumentParser

    argv = sys.argv[1:] if argv is None else list(argv)
    (cfg,) = HfArgumentParser(TraceConfig).parse_args_into_dataclasses(args=argv)
    lines = [f"`python bench/memory_trace.py {' '.join(argv)}`".replace(" `", "`"), ""]
    config = memory_bench.model_config(cfg.model, cfg.layers)
    for variant in cfg.variants:
        parts = memory_bench.plan_for(
            config,
            cfg.model,
            memory_bench.VARIANTS[variant],
            cfg.context,
            memory_bench.BenchConfig(models=[cfg.model]),
            torch.device("cpu"),
            torch.bfloat16,
        )["parts_gib"]
        rows = [
            [phase, f"{live / GIB:.3f}", op] for phase, live, op in trace(cfg.model, cfg.layers, variant, cfg.context)
        ]
        lines += [
            f"**{variant}**, {cfg.model} with {cfg.layers} layers, {cfg.context} tokens, bf16 autocast on the CPU. "
            f"Planned above the step's start: checkpoints + one layer "
            f"{parts['checkpoints'] + parts['layer_recompute']:.3f} GiB, checkpoints + loss "
            f"{parts['checkpoints'] + parts['loss']:.3f} GiB.",
            "",
            markdown_table(["phase", "highest GiB above the step's start", "op"], rows),
            "",
        ]
    text = "\n".join(lines)
    print(text)
    if cfg.output:
        write_text_atomic(cfg.output, text)


if __name__ == "__main__":
    main()
