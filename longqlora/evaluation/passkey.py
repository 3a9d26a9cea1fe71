"""Passkey retrieval (LongLoRA's `passkey_retrivial.py` protocol): can the model find a 5-digit key hidden at a
given depth inside filler text that fills its context?

Protocol (recorded in every result):
- prompt = task description, filler words before the key line, the key line, filler words after it, the question,
  joined with newlines; the filler is the five-sentence block below repeated, cut at a word;
- per context length the prompt is made as long as fits in `context_length - max_new_tokens` tokens (counted with
  the tokenizer, special tokens included), so prompt and answer fit in the context; the key line sits after
  `round(depth * W)` of the W filler words;
- keys are 5-digit numbers drawn from `random.Random(seed)` in (length, depth, trial) order;
- greedy decoding with the model's own full attention; a trial succeeds when the generated text starts with the
  key's digits and no digit follows them directly (a longer number fails; the key said twice succeeds).

Harder variants, after RULER's needle-in-a-haystack tasks (arXiv 2404.06654, Section 3.1), since a model can pass the
repeated filler by spotting the one line that differs: `--haystack` hides the key in real text (a bundled book or a
file, its words in order) and `--distractors N` hides N other keys, each with its own label, at random depths (from
`random.Random("distractors-<seed>")`, so the asked-for keys stay those of the plain run); the key line and the
question then name the label, and an answer that is another hidden key is wrong (counted apart).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from longqlora.data.corpora import BOOKS
from longqlora.evaluation import evaluating
from longqlora.evaluation.haystack import (
    FILLER,
    KEY_LINE,
    LABELED_KEY_LINE,
    LABELED_QUESTION,
    LABELS,
    QUESTION,
    TASK,
    plan_trials,
)
from longqlora.evaluation.loading import NEUTRAL_DECODING, LoaderArgs

logger = logging.getLogger(__name__)

MIN_CONTEXT = 64
SAMPLE_CHARS = 40


@dataclass
class PasskeyConfig(LoaderArgs):
    """`python -m longqlora passkey`: the fields are its flags."""

    context_lengths: list[int] = field(
        default_factory=lambda: [1024, 2048, 4096, 8192],
        metadata={"help": "Context lengths to test; each prompt fills its context minus the answer tokens."},
    )
    trials: int = field(default=10, metadata={"help": "Random keys per (context length, depth)."})
    depths: list[float] = field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
        metadata={"help": "Where the key line goes, as a fraction of the filler (0 = first, 1 = last)."},
    )
    seed: int = field(default=42, metadata={"help": "Seed of the key generator; the same seed gives the same keys."})
    haystack: str = field(
        default="repeat",
        metadata={
            "help": "The text the key hides in: repeat (LongLoRA's five filler sentences), a bundled book ("
            "austen_emma, ..., kjv_bible) or a UTF-8 text file; its words in order, repeated when a context needs more."
        },
    )
    distractors: int = field(
        default=0,
        metadata={"help": "Other keys hidden at random depths, each with its own label; the question names one."},
    )
    output_dir: str | None = field(default=None, metadata={"help": "Write passkey.json and passkey.png here."})

    def __post_init__(self):
        super().__post_init__()
        self.output_dir = str(self.output_dir) if self.output_dir else None  # Python callers pass Path objects
        if not self.context_lengths or min(self.context_lengths) < MIN_CONTEXT:
            raise ValueError(
                f"--context_lengths {' '.join(map(str, self.context_lengths))}: each must be at least "
                f"{MIN_CONTEXT} tokens, e.g. --context_lengths 1024 2048 4096"
            )
        if len(set(self.context_lengths)) != len(self.context_lengths):
            raise ValueError(f"--context_lengths {' '.join(map(str, self.context_lengths))}: list each length once")
        if self.trials < 1:
            raise ValueError(f"--trials {self.trials}: must be at least 1, e.g. 10")
        if not self.depths or any(not 0 <= d <= 1 for d in self.depths) or len(set(self.depths)) != len(self.depths):
            raise ValueError(
                f"--depths {' '.join(map(str, self.depths))}: pass distinct fractions in [0, 1], e.g. 0 0.25 0.5 0.75 1"
            )
        if not 0 <= self.distractors < len(LABELS):
            raise ValueError(f"--distractors {self.distractors}: pass 0 to {len(LABELS) - 1}, e.g. 3")
        if self.haystack != "repeat" and self.haystack not in BOOKS and not Path(self.haystack).is_file():
            raise ValueError(
                f"--haystack {self.haystack}: no such file; pass repeat, a bundled book ({', '.join(BOOKS)}) "
                "or a UTF-8 text file"
            )


# ---------------------------------------------------------------------------------------------------- scoring
def is_correct(key: str, generated: str) -> bool:
    """The generated text starts with the key's digits (whitespace between them allowed: some tokenizers decode
    digits apart) and no digit follows directly: a longer number fails, the key said twice (`71432 71432`) does not."""
    return re.match(r"\s*" + r"\s*".join(key) + r"(?!\d)", generated) is not None


@torch.no_grad()
def generate_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt`, decoded without special tokens (batch 1: no padding, no mask of our own);
    greedy whatever the model's generation_config holds (a repetition penalty would count the key's digits in the
    prompt against the answer)."""
    enc = tokenizer(prompt, return_tensors="pt").to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings = {**NEUTRAL_DECODING, "max_new_tokens": max_new_tokens, "pad_token_id": pad, "use_cache": True}
    out = model.generate(**enc, **settings)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def summarize(records: list[dict], context_lengths, depths) -> dict:
    """Accuracy per length and per (length, depth), with the prompt token counts actually used."""

    def block(rows):
        tokens = [r["tokens"] for r in rows]
        return {
            "trials": len(rows),
            "correct": sum(r["correct"] for r in rows),
            "accuracy": sum(r["correct"] for r in rows) / len(rows),
            "distractor_answers": sum(r["distractor"] for r in rows),
            "prompt_tokens_min": min(tokens),
            "prompt_tokens_max": max(tokens),
        }

    by_length = [
        {"context_length": n, **block([r for r in records if r["context_length"] == n])} for n in context_lengths
    ]
    cells = [
        {"context_length": n, "depth": d, **block([r for r in records if r["context_length"] == n and r["depth"] == d])}
        for n in context_lengths
        for d in depths
    ]
    return {"accuracy": sum(r["correct"] for r in records) / len(records), "by_length": by_length, "cells": cells}


def evaluate_passkey(
    model,
    tokenizer,
    context_lengths,
    depths,
    trials: int,
    seed: int = 42,
    progress: bool = True,
    planned=None,
    distractors: int = 0,
    haystack: str = "repeat",
) -> dict:
    """Run every trial on a loaded model; returns the accuracies, the protocol and a few samples (no files).
    `planned`: what `plan_trials` returned for these arguments, when the caller has it already."""
    cases, max_new = planned or plan_trials(tokenizer, context_lengths, depths, trials, seed, distractors, haystack)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    for n in context_lengths:
        if limit and n > limit:
            logger.warning(
                "--context_lengths %d is beyond the %d tokens the model is set up for (extrapolation)", n, limit
            )
    records, samples = [], []
    with evaluating(model):
        for case in tqdm(cases, desc="passkey", disable=not progress):
            generated = generate_answer(model, tokenizer, case["prompt"], max_new)
            records.append(
                {
                    **{k: case[k] for k in ("context_length", "depth", "trial", "key", "tokens")},
                    "correct": is_correct(case["key"], generated),
                    "distractor": any(is_correct(other, generated) for other in case["others"]),
                }
            )
            if case["trial"] == 0:
                samples.append({**records[-1], "output": generated[:SAMPLE_CHARS]})
    summary = summarize(records, context_lengths, depths)
    for row in summary["by_length"]:
        logger.info(
            "passkey @%d: %d/%d correct (%.0f%%)%s",
            row["context_length"],
            row["correct"],
            row["trials"],
            100 * row["accuracy"],
            f", {row['distractor_answers']} answered another key" if distractors else "",
        )
    protocol = {
        "task": TASK,
        "filler": FILLER if haystack == "repeat" else None,  # else the haystack's words
        "key_line": KEY_LINE if not distractors else LABELED_KEY_LINE,
        "question": QUESTION if not distractors else LABELED_QUESTION,
        "haystack": haystack,
        "distractors": distractors,
        "joiner": "\\n",
        "key_digits": 5,
        "seed": seed,
        "trials": trials,
        "max_new_tokens": max_new,
        "prompt_tokens_target": f"context_length - {max_new}",
        "model_context": limit,
        "decoding": "greedy (do_sample=False), full attention, KV cache",
        "success": "generated text starts with the key's digits (whitespace between them allowed), no digit after",
    }
    return {"protocol": protocol, **summary, "samples": samples, "keys": [r["key"] for r in records]}


# ---------------------------------------------------------------------------------------------------- command
def run_passkey(cfg: PasskeyConfig) -> dict:
    """Check every prompt fits, load the model (optionally + adapter, NF4), run the trials, write JSON and PNG."""
    from longqlora.evaluation.loading import adapter_base, inference_tokenizer
    from longqlora.output import check_output_path, write_json_atomic

    if cfg.output_dir:
        check_output_path(cfg.output_dir, "--output_dir")
    tokenizer = inference_tokenizer(cfg.model, cfg.adapter, trust_remote_code=cfg.trust_remote_code)
    variant = {"distractors": cfg.distractors, "haystack": cfg.haystack}
    planned = plan_trials(tokenizer, cfg.context_lengths, cfg.depths, cfg.trials, cfg.seed, **variant)  # fails first
    model, tokenizer, info = cfg.load(tokenizer)
    evaluated = evaluate_passkey(
        model, tokenizer, cfg.context_lengths, cfg.depths, cfg.trials, cfg.seed, planned=planned, **variant
    )
    result = {
        "model": cfg.model or adapter_base(cfg.adapter),
        "adapter": cfg.adapter,
        "config": asdict(cfg),
        "original_context": info.original_context,
        "model_context": info.target_context,
        "pi_factor": info.pi_factor,
        "scaling": info.scaling,
        "load_in_4bit": cfg.load_in_4bit,
        "compute_dtype": info.compute_dtype,
        **evaluated,
    }
    if cfg.output_dir:
        out = Path(cfg.output_dir)
        result["files"] = {"json": str(out / "passkey.json"), "png": str(out / "passkey.png")}
        title = result["model"] + (f" + {cfg.adapter}" if cfg.adapter else "")
        plot_heatmap(result["cells"], cfg.context_lengths, cfg.depths, out / "passkey.png", title)
        write_json_atomic(out / "passkey.json", result)
    return result


def plot_heatmap(cells, context_lengths, depths, path: Path, title: str) -> Path:
    """Accuracy by context length (x) and depth (y), each cell annotated; written atomically."""
    from longqlora.output import new_figure, save_figure

    grid = [
        [next(c["accuracy"] for c in cells if c["context_length"] == n and c["depth"] == d) for n in context_lengths]
        for d in depths
    ]
    fig, ax = new_figure(figsize=(1.2 * len(context_lengths) + 2.5, 0.6 * len(depths) + 2))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(grid):
        for j, acc in enumerate(row):
            ax.text(
                j,
                i,
                f"{acc:.0%}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if acc < 0.25 or acc > 0.85 else "black",
            )  # readable on the dark ends
    ax.set_xticks(range(len(context_lengths)), [str(n) for n in context_lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("key depth (fraction of filler)")
    ax.set_title(f"passkey retrieval: {title}", fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy")
    return save_figure(fig, path)
