"""Quickstart: extend a small Llama 4x on a CPU with the toolkit's own path, and see what the extension buys.

Pre-trains a ~1M-parameter Llama at 128 tokens (cached): first on random tokens whose runs recur, until it learns to
copy from its context, then on a mix of five bundled Austen novels, passkey documents and repeated passages. Extends
it to 512 tokens with NF4 + S2-Attn + LoRA with trainable embeddings and norms (and, to compare, full attention),
stretching RoPE by position interpolation (LongLoRA's choice) and by YaRN. Then asks every model for passkeys at
128, 256 and 512 tokens and scores held-out Persuasion, plain and with passages repeated up to 496 tokens back.
Writes results.json, report.md and context.png into --output_dir and prints the table. About 7 minutes on 2 CPU
cores; seeded.

    python recipes/quickstart.py                         # the README's first command
    python recipes/quickstart.py --output_dir /tmp/qs --extend_steps 100
    python recipes/quickstart.py --context_mix false --copy_steps 0 --rope_scalings linear   # books only
    python recipes/quickstart.py --tiny            # minutes: the same pipeline, tiny, into out/quickstart-tiny
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
    hidden_size: int = 128
    num_layers: int = 2
    intermediate_size: int = 384
    num_heads: int = 2
    context_mix: bool = True
    copy_steps: int = 1200
    pretrain_steps: int = 400
    pretrain_lr: float = 1e-3
    extend_steps: int = 40
    rope_scalings: str = "linear,yarn"
    group_ratio: float = 0.25
    lora_r: int = 16
    seed: int = 0


if __name__ == "__main__":
    main(Quickstart)
