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
from longqlora.output import write_text_atomic


@dataclass
class Args:
    lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192, 16384], metadata={"help": "tokens"})
    heads: int = field(default=8, metadata={"help": "attention heads (Llama-2 7B has 32)"})
    head_dim: int = field(default=128, metadata={"help": "per head (Llama-2: 128)"})
    group_ratio: float = field(default=0.25, metadata={"help": "S2 group size / length (LongLoRA: 1/4)"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16"})
    repeats: int = field(default=3, metadata={"help": "timed runs per cell; the median is reported"})
    backward: bool = field(default=True, metadata={"help": "also time forward+backward"})
    packed: bool = field(
        default=False,
        metadata={
            "help": "--documents documents per row: S2's packed path (varlen kernels on a GPU; one call per document, "
            "and the banded masks beside it, without them) against full attention within the documents"
        },
    )
    documents: int = field(default=4, metadata={"help": "documents per row with --packed"})
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


def measure(
    lengths,
    *,
    heads: int,
    head_dim: int = 128,
    group_ratio: float = 0.25,
    device="cpu",
    dtype=torch.float32,
    repeats: int = 3,
    backward: bool = True,
    packed: bool = False,
    documents: int = 4,
) -> list[dict]:
    """Median times of full causal SDPA and of S2-Attn per length. On CUDA both sides are held to SDPA's flash
    kernel for plain rows (a path that would fall back to another kernel raises instead of running slowly);
    `packed` rows (`documents` a row) take S2's varlen kernel on a GPU, and on a CPU its per-document path with the
    banded masks timed beside it, against full attention over the same documents."""
    from longqlora.attention import layout
    from longqlora.attention.layout import WHOLE

    device = torch.device(device)
    kernels = contextlib.nullcontext
    if device.type == "cuda" and not packed:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernels = lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])  # noqa: E731
    rows = []
    for n in lengths:
        group = max(1, round(group_ratio * n))
        # (B, N, H, D) memory seen as (B, H, N, D): the layout a transformers attention module hands over.
        shape = (1, n, heads, head_dim)
        q, k, v = (
            torch.randn(shape, device=device, dtype=dtype).transpose(1, 2).requires_grad_(backward) for _ in range(3)
        )
        pos = None
        if packed:
            size = n // documents
            pos = torch.cat(
                [torch.arange(size, device=device)] * (documents - 1)
                + [torch.arange(n - (documents - 1) * size, device=device)]
            )[None]
        # The operands are bound as defaults: each op runs inside this iteration, with this iteration's tensors.
        ops = {
            "full": (lambda q=q, k=k, v=v, pos=pos: s2_attention(q, k, v, WHOLE, position_ids=pos, full_heads=1.0))
            if packed
            else (lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
            "s2": lambda q=q, k=k, v=v, group=group, pos=pos: s2_attention(q, k, v, group, position_ids=pos),
        }
        if packed and device.type == "cpu":  # the banded masks, the fallback past layout.DOCUMENT_CALLS documents
            ops["s2_banded"] = lambda q=q, k=k, v=v, group=group, pos=pos: _banded(q, k, v, group, pos, layout)
        cells = {}
        for name, op in ops.items():

            def forward(op=op):
                with torch.no_grad(), kernels():
                    op()

            def both(op=op):
                with kernels():
                    op().sum().backward()

            cells[name] = (timed(forward, device, repeats), timed(both, device, repeats) if backward else float("nan"))
        rows.append(
            {
                "tokens": n,
                "group": group,
                "full_fwd_s": cells["full"][0],
                "full_fwd_bwd_s": cells["full"][1],
                "s2_fwd_s": cells["s2"][0],
                "s2_fwd_bwd_s": cells["s2"][1],
                **({"banded_fwd_s": cells["s2_banded"][0], "banded_fwd_bwd_s": cells["s2_banded"][1]}
                   if "s2_banded" in cells else {}),
            }
        )  # fmt: skip
        print(
            f"{n:>6} tokens  G={group:<5} forward full {cells['full'][0] * 1e3:9.1f} ms  "
            f"s2 {cells['s2'][0] * 1e3:9.1f} ms  ratio {cells['s2'][0] / cells['full'][0]:.3f}"
            + (f"  banded {cells['s2_banded'][0] * 1e3:9.1f} ms" if "s2_banded" in cells else ""),
            flush=True,
        )
    return rows


def _banded(q, k, v, group, pos, layout):
    """S2 on packed rows through the banded masks (a fresh position tensor: layouts are kept on the one they read)."""
    kept, layout.DOCUMENT_CALLS = layout.DOCUMENT_CALLS, 0
    try:
        return s2_attention(q, k, v, group, position_ids=pos.clone())
    finally:
        layout.DOCUMENT_CALLS = kept


def table(rows: list[dict], title: str) -> str:
    lines = [
        title,
        "",
        "| tokens | group | full fwd (ms) | S2 fwd (ms) | S2/full fwd | full fwd+bwd (ms) | S2 fwd+bwd (ms) | "
        "S2/full fwd+bwd |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    banded = "banded_fwd_s" in rows[0]
    if banded:  # the packed path's fallback beside it
        lines[2] += " banded fwd (ms) | banded fwd+bwd (ms) | S2/banded fwd+bwd |"
        lines[3] += "---:|---:|---:|"
    for r in rows:
        ff, sf, fb, sb = r["full_fwd_s"], r["s2_fwd_s"], r["full_fwd_bwd_s"], r["s2_fwd_bwd_s"]
        lines.append(
            f"| {r['tokens']} | {r['group']} | {ff * 1e3:.1f} | {sf * 1e3:.1f} | {sf / ff:.3f} | {fb * 1e3:.1f} | "
            f"{sb * 1e3:.1f} | {sb / fb:.3f} |"
            + (
                f" {r['banded_fwd_s'] * 1e3:.1f} | {r['banded_fwd_bwd_s'] * 1e3:.1f} | "
                f"{sb / r['banded_fwd_bwd_s']:.3f} |"
                if banded
                else ""
            )
        )
    return "\n".join(lines) + "\n"


def main():
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = measure(
        args.lengths,
        heads=args.heads,
        head_dim=args.head_dim,
        group_ratio=args.group_ratio,
        device=device,
        dtype=dtype,
        repeats=args.repeats,
        backward=args.backward,
        packed=args.packed,
        documents=args.documents,
    )
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    text = table(
        rows,
        f"S2-Attn vs full causal SDPA — {name}, torch {torch.__version__}, {args.dtype}, batch 1, "
        f"{args.heads} heads x {args.head_dim}, group = {args.group_ratio} x length, median of "
        f"{args.repeats}{f', packed rows ({args.documents} documents)' if args.packed else ''}.",
    )
    print(text)
    if args.output:
        write_text_atomic(args.output, text)


if __name__ == "__main__":
    main()
