"""S2-Attn op time against full causal SDPA at 2k-16k tokens, in one run (ratios, not absolute speed claims).

    python bench/s2_speed.py                                   # this CPU, float32, writes nothing
    python bench/s2_speed.py --output docs/s2_speed_cpu.md     # and keep the table
    python bench/s2_speed.py --device cuda --dtype bfloat16 --heads 32 --output docs/s2_speed_gpu.md

Shapes are one Llama-2 layer's attention (head_dim 128, batch 1); --heads 8 by default on CPU so that 16k fits the
time. Both sides use torch SDPA (on CUDA restricted to its flash kernel); S2 uses group = ratio x length.
"""

import contextlib
import platform
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import HfArgumentParser

from longqlora.attention import s2_attention
from longqlora.report import write_text_atomic


@dataclass
class Args:
    lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192, 16384], metadata={"help": "tokens"})
    heads: int = field(default=8, metadata={"help": "attention heads (Llama-2 7B has 32)"})
    head_dim: int = 128
    group_ratio: float = field(default=0.25, metadata={"help": "S2 group size / length (LongLoRA: 1/4)"})
    device: str = "cpu"
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16"})
    repeats: int = field(default=3, metadata={"help": "timed runs per cell; the median is reported"})
    backward: bool = field(default=True, metadata={"help": "also time forward+backward"})
    output: str | None = field(default=None, metadata={"help": "write the Markdown table here"})


def timed(fn, device, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    kernels = contextlib.nullcontext
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernels = lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])  # noqa: E731
    rows = []
    for n in args.lengths:
        group = max(1, round(args.group_ratio * n))
        # (B, N, H, D) memory seen as (B, H, N, D): the layout a transformers attention module hands over.
        shape = (1, n, args.heads, args.head_dim)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype).transpose(1, 2).requires_grad_(args.backward)
                   for _ in range(3))
        ops = {"full": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
               "s2": lambda: s2_attention(q, k, v, group, backend="sdpa")}
        cells = {}
        for name, op in ops.items():
            def forward(op=op):
                with torch.no_grad(), kernels():
                    op()

            def both(op=op):
                with kernels():
                    op().sum().backward()

            cells[name] = (timed(forward, device, args.repeats),
                           timed(both, device, args.repeats) if args.backward else float("nan"))
        rows.append((n, group, *cells["full"], *cells["s2"]))
        print(f"{n:>6} tokens  G={group:<5} forward full {cells['full'][0]*1e3:9.1f} ms  s2 {cells['s2'][0]*1e3:9.1f} ms"
              f"  ratio {cells['s2'][0]/cells['full'][0]:.3f}", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    lines = [f"S2-Attn vs full causal SDPA — {name}, torch {torch.__version__}, {args.dtype}, batch 1, "
             f"{args.heads} heads x {args.head_dim}, group = {args.group_ratio} x length, median of {args.repeats}.",
             "",
             "| tokens | group | full fwd (ms) | S2 fwd (ms) | S2/full fwd | full fwd+bwd (ms) | S2 fwd+bwd (ms) | S2/full fwd+bwd |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, group, ff, fb, sf, sb in rows:
        lines.append(f"| {n} | {group} | {ff*1e3:.1f} | {sf*1e3:.1f} | {sf/ff:.3f} | {fb*1e3:.1f} | {sb*1e3:.1f} | {sb/fb:.3f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.output:
        write_text_atomic(args.output, table)


if __name__ == "__main__":
    main()
