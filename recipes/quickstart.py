"""Quickstart: extend a small Llama 4x on a CPU with the toolkit's own path, and measure it honestly.

Pre-trains a ~4.5M-parameter Llama at 128 tokens on five bundled Austen novels (cached), extends it to 512 tokens
with NF4 + position interpolation + S2-Attn + LoRA with trainable embeddings and norms (and, to compare, the same
with full attention), then scores held-out Persuasion at 128 and 512 tokens. Writes results.json, report.md and
perplexity.png into --output_dir and prints the table. About 9 minutes on 2 CPU cores; seeded.

    python recipes/quickstart.py                         # the README's first command
    python recipes/quickstart.py --output_dir /tmp/qs --extend_steps 100
    python recipes/quickstart.py --tiny --output_dir /tmp/qs-tiny     # seconds: the same pipeline, tiny
    python recipes/quickstart.py --dry_run
"""

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ sits beside recipes/, not in the package
from experiments.quickstart import QuickstartConfig, main  # noqa: E402


@dataclass
class Quickstart(QuickstartConfig):
    output_dir: str = "out/quickstart"
    short_context: int = 128
    factor: int = 4
    pretrain_steps: int = 240
    extend_steps: int = 40
    group_ratio: float = 0.25
    lora_r: int = 16
    seed: int = 0


if __name__ == "__main__":
    main(Quickstart)
