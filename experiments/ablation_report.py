"""Tables, plot and Markdown sections for experiments.ablations: mean ± sd over seeds, and differences paired by seed
against a reference variant (the seed's data-order effect cancels)."""

from __future__ import annotations

import math
import os
import platform
import statistics
from pathlib import Path

import torch

from experiments.ablations import VARIANTS, AblationConfig, variant_settings
from longqlora.output import markdown_table, write_text_atomic


def summary(runs: list[dict], length: int) -> tuple[float, float]:
    """(mean, spread) of perplexity at `length` over seeds; spread = sample standard deviation (0 for one run)."""
    values = [r["perplexity"][str(length)] for r in runs]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def reference(results: dict) -> str | None:
    """The variant the others are compared with, seed by seed: full-attention LoRA+, else plain S2."""
    return next((v for v in ("loraplus-full", "loraplus-s2") if v in results), None)


def paired(runs: list[dict], ref: list[dict], length: int) -> str:
    """Mean ± sd over shared seeds of 100 x (ppl / reference ppl - 1) at `length`: the seed (data order) effect,
    larger than most differences between variants, cancels."""
    diffs = _paired_values(runs, ref, length)
    if not diffs or runs is ref:
        return ""
    if len(diffs) == 1:
        return f"{diffs[0]:+.2f}% (1 seed)"
    better = sum(d < 0 for d in diffs)
    return f"{statistics.fmean(diffs):+.2f}% ± {statistics.stdev(diffs):.2f} ({better}/{len(diffs)})"


def table(cfg: AblationConfig, results: dict) -> str:
    ref = reference(results)
    header = (
        ["variant", "id", "seeds"]
        + [f"ppl @{n}" for n in cfg.lengths]
        + [f"passkey @{cfg.long_context}", "train s / run"]
    )
    if ref:
        header.append(f"@{cfg.long_context} vs `{ref}`, paired by seed (seeds better)")
    rows = []
    for vid, runs in results.items():
        cells = []
        for n in cfg.lengths:
            mean, spread = summary(runs, n)
            cells.append(f"{mean:.2f} ± {spread:.2f}" if math.isfinite(mean) else "nan")
        accuracy = statistics.fmean(r["passkey"] for r in runs)
        trials = sum(r["passkey_trials"] for r in runs)
        rows.append(
            [VARIANTS[vid]["label"], f"`{vid}`", len(runs)]
            + cells
            + [f"{accuracy:.0%} of {trials}", f"{statistics.fmean(r['train_seconds'] for r in runs):.0f}"]
            + (
                [paired(runs, results[ref], cfg.long_context) if variant_settings(cfg, vid)["train"] else ""]
                if ref
                else []
            )
        )
    return markdown_table(header, rows)


def context_table(cfg: AblationConfig, results: dict) -> str:
    """With --context_mix: passkey accuracy at every length and the perplexity of a passage's second occurrence
    by its distance from the first (mean over seeds; "first": the first occurrence, nothing to copy from)."""
    runs0 = next(iter(results.values()))
    lengths = list(runs0[0]["passkey_by_length"])
    distances = [d for d in runs0[0]["repeat"] if d != "first"]
    header = ["variant", "id"] + [f"passkey @{n}" for n in lengths] + ["repeat: first"]
    header += [f"repeat @{d} back" for d in distances]
    rows = []
    for vid, runs in results.items():
        trials = sum(r["passkey_trials"] for r in runs)
        keys = [f"{statistics.fmean(r['passkey_by_length'][n] for r in runs):.0%}" for n in lengths]
        repeat = [f"{statistics.fmean(r['repeat'][d] for r in runs):.1f}" for d in ["first", *distances]]
        rows.append([VARIANTS[vid]["label"], f"`{vid}`", *keys, *repeat])
    return markdown_table(header, rows) + f"\n\n(passkey: {trials} trials per length and variant over its seeds)"


def _paired_values(runs: list[dict], ref: list[dict], length: int) -> list[float]:
    by_seed = {r["seed"]: r["perplexity"][str(length)] for r in ref}
    return [100 * (r["perplexity"][str(length)] / by_seed[r["seed"]] - 1) for r in runs if r["seed"] in by_seed]


def plot(cfg: AblationConfig, results: dict, path: Path) -> Path:
    """Left: perplexity by evaluation length (mean ± sd); right: the same paired by seed against the reference."""
    from matplotlib.ticker import ScalarFormatter

    from longqlora.output import new_figure, save_figure

    fig, _ = new_figure(figsize=(12, 4.8))
    fig.clf()
    left, right = fig.subplots(1, 2)
    ref = reference(results)
    for vid, runs in results.items():
        trained = variant_settings(cfg, vid)["train"]
        means = [summary(runs, n) for n in cfg.lengths]
        line = left.errorbar(
            cfg.lengths,
            [m for m, _ in means],
            yerr=[s for _, s in means],
            marker="o",
            capsize=3,
            label=vid,
            linestyle="-" if trained else "--",
        )
        if ref and trained and vid != ref:
            diffs = [_paired_values(runs, results[ref], n) for n in cfg.lengths]
            right.errorbar(
                cfg.lengths,
                [statistics.fmean(d) for d in diffs],
                marker="o",
                capsize=3,
                label=vid,
                yerr=[statistics.stdev(d) if len(d) > 1 else 0 for d in diffs],
                color=line[0].get_color(),
            )
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(cfg.lengths, [str(n) for n in cfg.lengths])
        ax.set_xlabel("evaluation context (tokens)")
    left.set_yscale("log")
    left.yaxis.set_major_formatter(ScalarFormatter())
    left.yaxis.set_minor_formatter(ScalarFormatter())
    left.set_ylabel("held-out perplexity (mean ± sd over seeds)")
    left.legend(fontsize=7, ncol=2)
    left.set_title(f"Extending a small Llama {cfg.short_context} -> {cfg.long_context}", fontsize=10)
    if ref:
        right.axhline(0, color="grey", linewidth=1)
        right.set_ylabel(f"% perplexity vs {ref}, same seed (mean ± sd)")
        right.set_title(f"paired by seed against {ref} (below 0: better)", fontsize=10)
        right.legend(fontsize=7)
    return save_figure(fig, path)


def report(cfg: AblationConfig, out: dict, png_name: str) -> str:
    p = out["pretrain"]
    held_kjv = " then the last 10% of the KJV" if cfg.pretrain_books == "austen+kjv" else ""
    first = next(iter(out["results"].values()))[0]
    return "\n".join(
        [
            f"Command: `{cfg.command or 'python bench/ablations.py'}`  ",
            f"Compute time {_compute_minutes(out):.1f} min on {_cpu()}: pre-training {p['seconds'] / 60:.1f} min plus "
            f"every (variant, seed) run, training and evaluation, as recorded in the cached results (this invocation's "
            f"wall time: {out['seconds'] / 60:.1f} min).",
            "",
            f"Base: {p['parameters']:,}-parameter Llama, pre-trained {p['steps']} steps x 32 x {cfg.short_context} "
            f"tokens on {', '.join(p['books'])}. Extension to {cfg.long_context}: {cfg.extend_steps} steps x 8 x "
            f"{cfg.long_context} tokens, lr {cfg.extend_lr:g}, LoRA r={cfg.lora_r}, S2 group {cfg.group_ratio:g} x "
            f"{cfg.long_context} unless the variant says otherwise; fp32 base unless NF4. Seeds {cfg.seeds} (extension "
            f"data order and LoRA init; one base). Evaluation: `longqlora perplexity` on the first {cfg.eval_tokens} "
            f"tokens of held-out Persuasion{held_kjv}, {first['protocol']} (shown for "
            f"{cfg.lengths[0]}; the same at every length); `longqlora passkey` at {cfg.long_context}, 5 depths x "
            f"{cfg.passkey_trials} keys per seed. Mean ± sample standard deviation over seeds; train seconds are wall "
            f"time on a CPU shared with other work (not a cost measurement).",
            "",
            table(cfg, out["results"]),
            *(
                [
                    "",
                    "Retrieval and long-range copying (experiments/context_tasks.py):",
                    "",
                    context_table(cfg, out["results"]),
                ]
                if "repeat" in first
                else []
            ),
            f"![perplexity by evaluation length]({png_name})",
            "",
        ]
    )


def _compute_minutes(out: dict) -> float:
    runs = [r for rs in out["results"].values() for r in rs]
    return (out["pretrain"]["seconds"] + sum(r["seconds"] for r in runs)) / 60


def _cpu() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}"


def write_section(doc: Path, section: str, text: str) -> Path:
    """Replace the text between the section's markers in `doc` (appended when absent); the rest is kept."""
    start, end = f"<!-- ablation:{section} -->", f"<!-- /ablation:{section} -->"
    old = doc.read_text(encoding="utf-8") if doc.exists() else ""
    block = f"{start}\n{text}\n{end}"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end) :]
    else:
        new = (old.rstrip() + "\n\n" if old else "") + block + "\n"
    return write_text_atomic(doc, new)
