"""LongLoRA's ablations at small scale on this CPU, measured by the toolkit's own perplexity and passkey commands.

Takes the quickstart's ~4.5M-parameter Llama pre-trained at 128 tokens on five Austen novels (the same cache as
recipes/quickstart.py, out/quickstart; pre-trained here when absent; --pretrain_books austen+kjv adds the first 90%
of the KJV and holds out the rest), then extends it to 512 tokens with every default variant of
longqlora.ablations.VARIANTS (no fine-tuning; interpolation only; LoRA; LoRA+ with full attention, S2-Attn, S2-Attn
on an NF4 base; full fine-tuning; S2 with LongLoRA's rolled shift; S2 with attention sinks; S2 with a quarter of the
heads in full attention), each with seeds 0, 1, 2, and scores held-out Persuasion at 128, 256 and 512 tokens and
passkey retrieval at 512.
Every (variant, seed) result is cached under --output_dir/results: a rerun resumes where it stopped.

    OMP_NUM_THREADS=1 python bench/ablations.py --doc docs/ablations.md    # the table in docs/ablations.md
    OMP_NUM_THREADS=1 python bench/ablations.py --variants loraplus-full,loraplus-s2,loraplus-s2-sink4 \\
        --extend_steps 120 --seeds 0 --doc docs/ablations.md --section steps120   # a targeted run: its own section
    python bench/ablations.py --tiny --output_dir /tmp/abl-tiny            # seconds: the same pipeline, tiny

The command line is recorded in the section it writes, with the compute time and the CPU. OMP_NUM_THREADS=1: on
a 2-core machine shared with other work, one thread per process avoids OpenMP threads spinning against each other
(measured: 6-14 s per pre-training step with 2 threads under contention, against 1.24 s alone).
"""

import logging
import os
import shlex
import sys

from transformers import HfArgumentParser

from longqlora.ablations import AblationConfig, main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    (cfg,) = HfArgumentParser(AblationConfig).parse_args_into_dataclasses()
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    cfg.command = cfg.command or f"{threads}python {shlex.join(sys.argv)}"
    print(main(cfg)["report"])
