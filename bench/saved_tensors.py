"""What one decoder layer keeps for its backward, per token: the inventory the memory planner's per-layer term is
written from (longqlora.training.plan.layer_bytes).

    python bench/saved_tensors.py --output docs/memory_inventory.md

One layer of the model's real width (random NF4 weights, built as bench/memory.py builds them) runs forward with
gradients under bf16 autocast, without checkpointing, inside a saved-tensor hook that records every distinct storage
autograd keeps (deduplicated: views of one tensor count once), grouped by dtype, shape and the op that produced it.
The layer's input (the checkpoint, kept anyway) is left out. The CPU's dropout keeps a noise tensor of its input's
dtype where CUDA keeps a 1-byte mask: the table says which rows differ.
"""

from __future__ import annotations

import collections
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import memory as memory_bench  # noqa: E402  (bench/memory.py)

from longqlora.output import markdown_table, write_text_atomic  # noqa: E402


@dataclass
class InventoryConfig:
    model: str = field(default="llama-2-7b", metadata={"help": "A preset: one layer at its real width."})
    tokens: int = field(default=1024, metadata={"help": "Tokens in the inventoried forward."})
    variants: list[str] = field(
        default_factory=lambda: ["ours", "ours_no_cuts", "baseline"],
        metadata={"help": "bench/memory.py's variants to inventory."},
    )
    output: str | None = field(default=None, metadata={"help": "Also write the Markdown report here."})


def inventory(name: str, variant: str, tokens: int, min_bytes: int = 64) -> tuple[list, int]:
    """[(bytes per token, dtype, shape, producer)] of what one layer saves, largest first, and the total (tensors of
    at least `min_bytes` a token)."""
    variant_cfg = memory_bench.VARIANTS[variant]
    bench = memory_bench.BenchConfig(models=[name], contexts=[tokens], variants=[variant])
    config = memory_bench.model_config(name, 1)
    dtype = torch.bfloat16
    model = memory_bench.prepare(
        memory_bench.build_nf4(config, torch.device("cpu"), dtype), variant_cfg, tokens, bench, dtype
    )
    hf = model.get_base_model()
    hf.activation_checkpointing_disable()
    model.train()
    layer = hf.model.layers[0]
    stream = dtype if variant_cfg.ours else torch.float32  # the baseline's stream is fp32 (finding 1, docs/gpu.md)
    x = torch.randn(1, tokens, config.hidden_size, dtype=stream, requires_grad=True)
    rope = hf.model.rotary_emb(x, torch.arange(tokens)[None])
    # the layer's input and the rotary cos/sin (shared by every layer; the planner counts them with the checkpoints)
    seen = {x.untyped_storage().data_ptr(), *(t.untyped_storage().data_ptr() for t in rope)}
    rows = collections.Counter()

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen and storage.nbytes() >= tokens * min_bytes:
            seen.add(storage.data_ptr())
            shape = tuple(t.shape[1:]) if t.shape[0] == 1 else tuple(t.shape)
            rows[(str(t.dtype).removeprefix("torch."), shape, type(t.grad_fn).__name__ if t.grad_fn else "leaf")] += (
                storage.nbytes()
            )
        return t

    torch.set_autocast_enabled("cuda", True)  # PEFT's GPU branch, as in bench/memory.py
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=dtype):
            layer(x, position_embeddings=rope)
    finally:
        torch.set_autocast_enabled("cuda", False)
    listed = sorted(((n / tokens, *key) for key, n in rows.items()), reverse=True)
    return listed, sum(rows.values()) // tokens


def main(argv=None) -> None:
    from transformers import HfArgumentParser

    argv = sys.argv[1:] if argv is None else list(argv)
    (cfg,) = HfArgumentParser(InventoryConfig).parse_args_into_dataclasses(args=argv)
    config = memory_bench.model_config(cfg.model)
    lines = [
        f"`python bench/saved_tensors.py {' '.join(argv)}`".replace(" `", "`"),
        "",
        f"{cfg.model}, one layer (hidden {config.hidden_size}, MLP {config.intermediate_size}), "
        f"{cfg.tokens} tokens, "
        "bf16 autocast on the CPU; bytes per token of every distinct tensor autograd keeps, the layer's input "
        "left out.",
        "",
    ]
    for variant in cfg.variants:
        listed, total = inventory(cfg.model, variant, cfg.tokens)
        lines += [
            f"**{variant}**: {total:,} bytes per token ({total / config.hidden_size:.1f} x hidden)",
            "",
            markdown_table(
                ["bytes/token", "dtype", "shape", "made by"], [[f"{n:,.0f}", d, str(s), op] for n, d, s, op in listed]
            ),
            "",
        ]
    text = "\n".join(lines)
    print(text)
    if cfg.output:
        write_text_atomic(cfg.output, text)


if __name__ == "__main__":
    main()
