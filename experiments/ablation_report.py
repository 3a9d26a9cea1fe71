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
    rows, trials = [], {}
    for vid, runs in results.items():
        trials.setdefault(sum(r["passkey_trials"] for r in runs), []).append(vid)
        keys = [f"{statistics.fmean(r['passkey_by_length'][n] for r in runs):.0%}" for n in lengths]
        repeat = [f"{mean:.1f}" for mean in _mean_repeats(runs).values()]
        rows.append([VARIANTS[vid]["label"], f"`{vid}`", *keys, *repeat])
    usual = max(trials, key=lambda n: len(trials[n]))
    counts = f"{usual} per variant" + "".join(
        f"; {n} for {', '.join(f'`{v}`' for v in vids)}" for n, vids in trials.items() if n != usual
    )
    return markdown_table(header, rows) + f"\n\n(passkey trials per length, over each variant's seeds: {counts})"


def _mean_repeats(runs: list[dict]) -> dict[str, float]:
    """Repeat perplexity by distance ("first" first, as recorded), mean over seeds."""
    return {d: statistics.fmean(r["repeat"][d] for r in runs) for d in runs[0]["repeat"]}


def _paired_values(runs: list[dict], ref: list[dict], length: int) -> list[float]:
    by_seed = {r["seed"]: r["perplexity"][str(length)] for r in ref}
    return [100 * (r["perplexity"][str(length)] / by_seed[r["seed"]] - 1) for r in runs if r["seed"] in by_seed]


def plot(cfg: AblationConfig, results: dict, path: Path) -> Path:
    """Left: perplexity by evaluation length (mean ± sd); right: the same paired by seed against the reference."""
    import matplotlib
    from matplotlib.ticker import ScalarFormatter

    from longqlora.output import new_figure, save_figure

    fig, _ = new_figure(figsize=(12, 4.8))
    fig.clf()
    left, right = fig.subplots(1, 2)
    ref, colors = reference(results), matplotlib.colormaps["tab20"]  # up to 20 variants, each its own colour
    for i, (vid, runs) in enumerate(results.items()):
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
            color=colors(i % 20),
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


def plot_context(cfg: AblationConfig, results: dict, path: Path) -> Path:
    """With the context mix. Left: perplexity of a repeated passage by its distance back (mean over seeds; dotted:
    the first occurrence); right: passkey accuracy by length and depth (the heat map), one row per variant."""
    import matplotlib

    from longqlora.output import new_figure, save_figure

    fig, _ = new_figure(figsize=(13, 5.2))
    fig.clf()
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
    cells = sorted({(c["context_length"], c["depth"]) for rs in results.values() for c in rs[0]["passkey_cells"]})
    grid, colors = [], matplotlib.colormaps["tab20"]  # up to 20 variants, each its own colour
    for i, (vid, runs) in enumerate(results.items()):
        mean = _mean_repeats(runs)
        distances = [d for d in mean if d != "first"]
        trained = variant_settings(cfg, vid)["train"]
        style = "-" if trained else "--"
        xs, ys = [int(d) for d in distances], [mean[d] for d in distances]
        line = left.plot(xs, ys, marker="o", linestyle=style, color=colors(i % 20))[0]
        line.set_label(vid)
        left.axhline(mean["first"], color=line.get_color(), linestyle=":", linewidth=0.8)
        seen = [c for r in runs for c in r["passkey_cells"]]
        grid.append([_percent_correct([c for c in seen if (c["context_length"], c["depth"]) == k]) for k in cells])
    left.set_xscale("log", base=2)
    left.set_xticks(xs, [str(x) for x in xs])  # the distances, every variant's the same
    left.axvline(cfg.short_context, color="grey", linestyle="--", linewidth=1)
    left.set(xlabel="distance back to the passage's first occurrence (tokens)", ylabel="perplexity (mean over seeds)")
    left.set_yscale("log")
    left.set_title("A passage seen before: perplexity of its repeat (dotted: first occurrence)", fontsize=10)
    left.legend(fontsize=7, ncol=2)
    image = right.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=100)
    right.set_yticks(range(len(results)), list(results), fontsize=7)
    right.set_xticks(range(len(cells)), [f"{n}\n{d:g}" if d == 0 else f"{d:g}" for n, d in cells], fontsize=7)
    right.set_xlabel("context length (first column of each) and depth of the key")
    right.set_title("Passkey retrieved (%), all seeds", fontsize=10)
    fig.colorbar(image, ax=right, fraction=0.04)
    fig.tight_layout()
    return save_figure(fig, path)


def _percent_correct(cells: list[dict]) -> float:
    """Keys retrieved over these passkey cells (all seeds), in percent; NaN where a variant has none."""
    trials = sum(c["trials"] for c in cells)
    return 100 * sum(c["correct"] for c in cells) / trials if trials else float("nan")


def report(cfg: AblationConfig, out: dict, png_name: str, context_png: str = "") -> str:
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
            f"Base: {p['parameters']:,}-parameter Llama, {_grown_text(p)}pre-trained {_copy_text(p)}{p['steps']} "
            f"steps x 32 x {cfg.short_context} tokens on {'the context mix of ' * cfg.context_mix}"
            f"{', '.join(p['books'])}."
            f" Extension to {cfg.long_context}: {cfg.extend_steps} steps x 8 x "
            f"{cfg.long_context} tokens, lr {cfg.extend_lr:g}, LoRA r={cfg.lora_r}, S2 group {cfg.group_ratio:g} x "
            f"{cfg.long_context} unless the variant says otherwise; fp32 base unless NF4. Seeds {cfg.seeds} (extension "
            f"data order and LoRA init; one base). Evaluation: `longqlora perplexity` on the first {cfg.eval_tokens} "
            f"tokens of held-out Persuasion{held_kjv}, {first['protocol']} (shown for "
            f"{cfg.lengths[0]}; the same at every length); `longqlora passkey` at {cfg.long_context}, 5 depths x "
            f"{cfg.passkey_trials} keys (the same prompts for every seed: passkey's own seed). Mean ± sample "
            "standard deviation over seeds; train seconds are wall time on a CPU shared with other work (not a cost "
            "measurement).",
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
            *([f"![repeats by distance and the passkey heat map]({context_png})"] if context_png else []),
            "",
        ]
    )


def _copy_text(pretrain: dict) -> str:
    steps = pretrain.get("copy_steps")
    return f"{steps} steps on random-token rows whose runs recur (experiments/small_base.py), then " if steps else ""


def _grown_text(pretrain: dict) -> str:
    if not pretrain.get("grown_from"):
        return ""
    return (
        f"grown from the {pretrain['grown_from_parameters']:,}-parameter base `{pretrain['grown_from']}` (the same "
        "function, wider and deeper: experiments/grow.py), then "
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
