"""LongLoRA's ablations at small scale on this CPU, measured by the toolkit's own perplexity and passkey commands.

Pre-trains a ~4.5M-parameter Llama at 128 tokens on five Austen novels and the first 90% of the KJV (cached under
--output_dir; --pretrain_books austen: the novels only), then extends it to 512 tokens with every default variant
of experiments.ablations.VARIANTS (no fine-tuning; interpolation only; LoRA; LoRA+ with full attention, S2-Attn,
S2-Attn on an NF4 base; full fine-tuning; S2 with LongLoRA's rolled shift; with attention sinks; with a quarter of
the heads in full attention; with every 4th step in full attention; with a growing group size; YaRN instead of
position interpolation, untrained and with LoRA+, S2-Attn and the toolkit default), each with seeds 0, 1, 2,
and scores held-out text (Persuasion and the last 10% of the KJV) at 128, 256 and 512 tokens and passkey retrieval
at 512. Every (variant, seed) result is cached under --output_dir/results: a rerun resumes where it stopped.

    python bench/ablations.py --doc docs/ablations.md                     # the main table in docs/ablations.md
    python bench/ablations.py --variants loraplus-full,loraplus-s2,loraplus-s2-g50 --extend_steps 120 \
        --doc docs/ablations.md --section steps120                      # a targeted run: its own section
    python bench/ablations.py --context_mix true --num_layers 2 --copy_steps 1600 --pretrain_steps 400 \
        --pretrain_lr 1e-3 --output_dir out/ablations-context --base_cache out/ablations-context \
        --doc docs/ablations.md --section context      # a base that copies from its context (the section lists
                                                        # the variants it ran: all but the rolled shift)
    python bench/ablations.py --tiny --output_dir /tmp/abl-tiny            # 2-3 minutes: the same pipeline, tiny

The command line is recorded in the section it writes, with the compute time and the CPU. Run it alone: on a
2-core machine, another process doubles its time; when the CPU must be shared, prefix OMP_NUM_THREADS=1 (OpenMP
threads of two processes spinning against each other cost more than the second thread gains).
"""

import os
import shlex
import sys
from pathlib import Path

from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ sits beside bench/, not in the package
from experiments.ablations import AblationConfig, main  # noqa: E402
from longqlora.cli import setup_logging  # noqa: E402

if __name__ == "__main__":
    setup_logging()
    (cfg,) = HfArgumentParser(AblationConfig).parse_args_into_dataclasses()
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    cfg.command = cfg.command or f"{threads}python {shlex.join(sys.argv)}"
    print(main(cfg)["report"])
