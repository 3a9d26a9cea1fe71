"""The quickstart: a real context extension at small scale, on a CPU, in minutes.

1. Pre-train a small Llama from scratch at a short context L (cached for reruns): with --context_mix (the recipe's
   default) first on random tokens whose runs recur, until it copies from its context (--copy_steps), then on the
   mix of experiments/context_tasks.py (Austen, passkey documents, repeated passages); else on five Austen novels.
2. Extend it to 4L with the toolkit's own path (NF4 + S2-Attn + LoRA with trainable embeddings and norms), and once
   more with full attention instead of S2-Attn, for comparison; each with every RoPE scaling of --rope_scalings
   (position interpolation, YaRN).
3. Score every model, and the base without and with each scaling untrained: held-out text (Persuasion, never
   trained on) at L and 4L, over whole windows and over the positions beyond L alone; with the mix also passkeys
   at L, 2L and 4L and the perplexity of a passage repeated at four distances back.
4. Write results.json, report.md and a plot into the output directory: retrieval by length and repeats by distance
   (context.png), or without the mix perplexity by position (perplexity.png).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from experiments.small_base import HELD_OUT, TRAIN_BOOKS, SmallLlamaConfig, pretrain_base
from longqlora.data import corpora
from longqlora.output import atomic_directory, check_output_path, markdown_table, write_json_atomic, write_text_atomic
from longqlora.rope import UNSCALED_TO

logger = logging.getLogger(__name__)


@dataclass
class QuickstartConfig(SmallLlamaConfig):
    output_dir: str = field(default="out/quickstart", metadata={"help": "Results, adapters and the cached base."})
    extend_steps: int = field(default=40, metadata={"help": "Extension steps of 8 x 4L tokens, per variant."})
    extend_lr: float = field(default=1e-3, metadata={"help": "Extension learning rate, every variant."})
    group_ratio: float = field(default=0.25, metadata={"help": "S2 group size / target context."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of the extended variants."})
    eval_tokens: int = field(default=32768, metadata={"help": "Held-out tokens scored per context length."})
    passkey_trials: int = field(default=4, metadata={"help": "With --context_mix: passkey keys per depth and length."})
    rope_scalings: str = field(
        default="linear",
        metadata={
            "help": "How RoPE is stretched to 4L, comma list: linear (position interpolation) and/or yarn; each is "
            "scored untrained and extended with S2-Attn and with full attention."
        },
    )
    tiny: bool = field(
        default=False, metadata={"help": "A scaled-down run of the same pipeline (minutes on 2 cores; tests)."}
    )
    dry_run: bool = field(default=False, metadata={"help": "Print the plan and exit."})

    def __post_init__(self):
        super().__post_init__()
        if not self.scalings or set(self.scalings) - set(UNSCALED_TO):
            raise ValueError(f"--rope_scalings {self.rope_scalings!r}: a comma list of {', '.join(UNSCALED_TO)}")
        if self.tiny:
            default_dir = next(f.default for f in dataclasses.fields(self) if f.name == "output_dir")
            if self.output_dir == default_dir:  # a smoke run never takes the real run's folder (as the recipes)
                self.output_dir = f"{default_dir}-tiny"
            self.pretrain_steps, self.extend_steps, self.passkey_trials = 3, 2, 1
            self.copy_steps = min(self.copy_steps, 2)
            self.eval_tokens = 4 * self.short_context * self.factor

    @property
    def scalings(self) -> list[str]:
        return [s.strip() for s in self.rope_scalings.split(",") if s.strip()]


# What each model is called in the table and plot, by RoPE scaling (linear PI keeps the names of earlier reports).
def untrained_label(rope: str) -> str:
    return "base + interpolation, untrained" if rope == "linear" else f"base + {UNSCALED_TO[rope]}, untrained"


def extended_label(rope: str, s2: bool) -> str:
    kind = "S2-Attn (ours)" if s2 else "full attention"
    return f"extended, {kind}" if rope == "linear" else f"extended with {UNSCALED_TO[rope]}, {kind}"


# ------------------------------------------------------------------------------------------------------ extension
def extend(cfg: QuickstartConfig, base: Path, data_dir: Path, s2: bool, rope: str = "linear") -> Path:
    """The toolkit's own extension path, S2-Attn or full attention; returns the adapter directory."""
    from longqlora.data.text import TextDataConfig
    from longqlora.model import ModelConfig
    from longqlora.training.config import RunConfig, TrainingConfig
    from longqlora.training.run import resolve, train

    name = ("extended-s2" if s2 else "extended-full") + ("" if rope == "linear" else f"-{rope}")
    model_cfg = ModelConfig(
        model_name_or_path=str(base),
        target_context=cfg.long_context,
        rope_scaling=rope,
        group_ratio=cfg.group_ratio,
        s2_attention=s2,
        compute_dtype="float32",
        attn_backend="sdpa",
        lora_r=cfg.lora_r,
        lora_alpha=2 * cfg.lora_r,
        lora_dropout=0.0,
    )
    # Five long books: joining them ("concat") differs from keeping documents apart at four boundaries in ~1M
    # tokens, and it keeps the full-attention baseline on plain rows (packed rows would cost it an N x N mask).
    data_cfg = TextDataConfig(dataset=str(data_dir), pack="concat")
    training = TrainingConfig(
        output_dir=str(Path(cfg.output_dir) / name),
        max_steps=cfg.extend_steps,
        per_device_train_batch_size=8,
        learning_rate=cfg.extend_lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(5, cfg.extend_steps),
        max_grad_norm=1.0,
        optim="adamw_torch",
        save_strategy="no",
        logging_steps=10,
        seed=cfg.seed,
        use_cpu=True,
    )
    # the variant's folder is this experiment's own: a rerun trains it again (a new run refuses a finished one's)
    shutil.rmtree(training.output_dir, ignore_errors=True)
    return train(resolve(model_cfg, data_cfg, RunConfig(), training))


# ----------------------------------------------------------------------------------------------------- evaluation
def _held_out_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    ids = tokenizer(corpora.book(HELD_OUT), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[:n_tokens])


def evaluate(cfg: QuickstartConfig, base: Path, adapters: dict) -> dict:
    """Perplexity of every model at L and 4L (stride = window: whole, non-overlapping windows); with the context
    mix also passkey retrieval at L, 2L, 4L and the perplexity of a repeated passage by its distance back."""
    from transformers import AutoTokenizer

    from experiments.context_tasks import passkey_lengths, repeat_distances, repeat_scores
    from longqlora.evaluation.loading import load_for_inference
    from longqlora.evaluation.passkey import evaluate_passkey
    from longqlora.evaluation.perplexity import window_scores

    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = _held_out_ids(tokenizer, cfg.eval_tokens)
    short, long = cfg.short_context, cfg.long_context
    lengths = passkey_lengths(tokenizer, [short, 2 * short, long])

    def loader(adapter=None, **kwargs):
        return lambda: load_for_inference(str(base), adapter=adapter, compute_dtype="float32", **kwargs)[0]

    models = {"base, no interpolation": loader()}
    models.update({untrained_label(r): loader(target_context=long, rope_scaling=r) for r in cfg.scalings})
    # The extensions run on the NF4-quantized base: this row separates the cost of quantization.
    models["base in NF4, no interpolation"] = loader(load_in_4bit=True)
    for label, adapter in adapters.items():
        models[label] = loader(adapter, load_in_4bit=True)
    results = {}
    for label, load in models.items():
        model = load().eval()
        at_short = window_scores(model, ids, short, progress=False)
        at_long = window_scores(model, ids, long, progress=False)
        buckets = [(start, start + short // 2) for start in range(0, long, short // 2)]
        row = results[label] = {
            f"ppl@{short}": at_short.perplexity(),
            f"ppl@{long}": at_long.perplexity(),
            f"ppl@{long} positions>={short}": at_long.perplexity(short),
            f"ppl@{long} positions<{short}": at_long.perplexity(0, short),
            "by_position": [[a, b, at_long.perplexity(a, b)] for a, b in buckets],
            "protocol": at_long.protocol(),
            "tokens_scored": {str(short): at_short.tokens(), str(long): at_long.tokens()},
        }
        if cfg.context_mix:
            keys = evaluate_passkey(model, tokenizer, lengths, DEPTHS, cfg.passkey_trials, progress=False)
            row["passkey"] = {str(b["context_length"]): b["accuracy"] for b in keys["by_length"]}
            samples = 4 if cfg.tiny else 32
            row["repeat"] = repeat_scores(model, ids, repeat_distances(short, long), short // 8, samples)
        logger.info("%s: %s", label, {k: round(v, 2) for k, v in row.items() if k.startswith("ppl")})
        del model
    return results


DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
PLOT = {True: "context.png", False: "perplexity.png"}  # by --context_mix
NOT_PLOTTED = ["base in NF4, no interpolation"]  # in the table only


def plot(results: dict, path: Path, short: int, long: int) -> None:
    """With the context mix: retrieval accuracy by context length and repeated-passage perplexity by distance;
    without: perplexity by position."""
    from longqlora.output import new_figure, save_figure

    if "repeat" not in next(iter(results.values())):
        fig, ax = new_figure(figsize=(7, 4.2))
        for label, r in results.items():
            xs = [(a + b) / 2 for a, b, _ in r["by_position"]]
            ax.plot(xs, [p for _, _, p in r["by_position"]], marker="o", label=label)
        ax.axvline(short, color="grey", linestyle="--", linewidth=1)
        ax.set(xlabel="position in the window (tokens of context)", ylabel="perplexity (held-out Persuasion)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.set_title(f"Extending a small Llama from {short} to {long} tokens")
        return save_figure(fig, path)
    fig, _ = new_figure(figsize=(12, 4.6))
    fig.clf()
    keys, repeat = fig.subplots(1, 2)
    for label in [label for label in results if label not in NOT_PLOTTED]:
        r = results[label]
        lengths = [int(n) for n in r["passkey"]]
        keys.plot(lengths, [100 * r["passkey"][str(n)] for n in lengths], marker="o", label=label)
        distances = [int(d) for d in r["repeat"] if d != "first"]
        line = repeat.plot(distances, [r["repeat"][str(d)] for d in distances], marker="o", label=label)[0]
        repeat.axhline(r["repeat"]["first"], color=line.get_color(), linestyle=":", linewidth=1)
    for ax, ticks in ((keys, lengths), (repeat, distances)):
        ax.axvline(short, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])  # token counts, not powers of two
    keys.set(xlabel="context length (tokens)", ylabel="passkey retrieved (%)", ylim=(-5, 105))
    keys.set_title(f"Find a key hidden in the context (pre-trained at {short})")
    repeat.set(xlabel="distance back to the passage's first occurrence (tokens)", ylabel="perplexity")
    repeat.set_yscale("log")
    repeat.set_title("A passage seen before: perplexity of its repeat\n(dotted: its first occurrence)")
    keys.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def report(cfg: QuickstartConfig, results: dict, meta: dict) -> str:
    short, long = cfg.short_context, cfg.long_context
    cols = [f"ppl@{short}", f"ppl@{long}", f"ppl@{long} positions<{short}", f"ppl@{long} positions>={short}"]
    header = ["model", f"{short} (whole windows)", f"{long} (whole windows)"]
    header += [f"{long}, positions < {short}", f"{long}, positions >= {short}"]
    first = next(iter(results.values()))
    lengths = list(first.get("passkey", {}))
    distances = [d for d in first.get("repeat", {}) if d != "first"]
    header += [f"passkey @{n}" for n in lengths] + (["repeat: first"] if distances else [])
    header += [f"repeat @{d} back" for d in distances]
    rows = []
    for label, r in results.items():
        row = [label] + [round(r[c], 2) for c in cols] + [f"{r['passkey'][n]:.0%}" for n in lengths]
        rows.append(row + [round(r["repeat"][d], 1) for d in (["first", *distances] if distances else [])])
    books = ", ".join(TRAIN_BOOKS)
    data = f"the context mix of {books} (experiments/context_tasks.py)" if cfg.context_mix else books
    copies = ""
    if cfg.context_mix and cfg.copy_steps:
        copies = f"{cfg.copy_steps} steps on random tokens whose runs recur (an induction head forms), then "
    ropes = " or ".join(UNSCALED_TO[r] for r in cfg.scalings)
    lines = [
        f"# Quickstart: {short} -> {long} tokens",
        "",
        f"Base: {meta['base_parameters']:,}-parameter Llama pre-trained from scratch at {short} tokens for "
        f"{copies}{cfg.pretrain_steps} steps on {data}; extended x{cfg.factor} for {cfg.extend_steps} steps (NF4 base, "
        f"{ropes}, LoRA r={cfg.lora_r} + trainable embeddings and norms; S2-Attn group "
        f"{s2_groups(cfg)} or full attention). Perplexity on the first {cfg.eval_tokens} tokens of held-out "
        f"{HELD_OUT}; {first['protocol']}.",
    ]
    if cfg.context_mix:
        lines[-1] += (
            f" Passkey: {len(DEPTHS)} depths x {cfg.passkey_trials} keys per length (keys never trained on). Repeat:"
            f" perplexity of a {short // 8}-token held-out passage where it recurs d tokens after its first start "
            "(other held-out text between), and of its first occurrence."
        )
    return "\n".join(
        lines + ["", markdown_table(header, rows), f"Seed {cfg.seed}; wall time {meta['seconds']:.0f} s; "
                 f"`{reproduce_command(cfg)}` reproduces it.", ""]
    )  # fmt: skip


def reproduce_command(cfg: QuickstartConfig) -> str:
    """The quickstart recipe's command with --tiny when set and every flag this run set away from the recipe's
    defaults (those of --tiny when set)."""
    defaults = type(cfg)(tiny=cfg.tiny)
    flags = ["--tiny"] if cfg.tiny else []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value != getattr(defaults, f.name):
            flags += [f"--{f.name}", *map(str, value if isinstance(value, list | tuple) else [value])]
    return shlex.join(["python", "recipes/quickstart.py", *flags])


def s2_groups(cfg: QuickstartConfig) -> str:
    """The S2 group sizes the extension trains with, e.g. "32 -> 96 -> 256 over 3 equal shares of the steps"."""
    from longqlora.model import ModelConfig

    model = ModelConfig(model_name_or_path="-", target_context=cfg.long_context, group_ratio=cfg.group_ratio)
    sizes = model.group_sizes
    return " -> ".join(map(str, sizes)) + (f" over {len(sizes)} equal shares of the steps" if len(sizes) > 1 else "")


def run(cfg: QuickstartConfig) -> dict:
    out = check_output_path(cfg.output_dir, "--output_dir")  # the recipes' check and wording, before any work
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    base = pretrain_base(cfg)
    data_dir = out / "train-books"
    if cfg.context_mix:  # the pre-training mix at 4L: passkeys and repeats the extension must reach across
        from transformers import AutoTokenizer

        from experiments.context_tasks import write_mix

        data_dir = out / f"train-mix-{base.name}-{cfg.long_context}-{cfg.extend_steps}.jsonl"
        if not data_dir.exists():
            books = [corpora.book(name) for name in TRAIN_BOOKS]
            rows = 2 * cfg.extend_steps * 8  # twice what the steps read
            write_mix(data_dir, AutoTokenizer.from_pretrained(base), books, rows, cfg.long_context, cfg.short_context)
    elif not data_dir.exists():
        with atomic_directory(data_dir) as tmp:
            for name in TRAIN_BOOKS:
                (tmp / f"{name}.txt").write_text(corpora.book(name), encoding="utf-8")
    adapters = {
        extended_label(rope, s2): extend(cfg, base, data_dir, s2=s2, rope=rope)
        for rope in cfg.scalings
        for s2 in (True, False)
    }
    results = evaluate(cfg, base, adapters)
    meta = {
        "seconds": time.perf_counter() - started,
        "config": dataclasses.asdict(cfg),
        "base_parameters": json.loads((base / "pretrain.json").read_text())["parameters"],
        "pretrain": json.loads((base / "pretrain.json").read_text()),
    }
    write_json_atomic(out / "results.json", {"results": results, **meta})
    text = report(cfg, results, meta)
    write_text_atomic(out / "report.md", text)
    plot(results, out / PLOT[cfg.context_mix], cfg.short_context, cfg.long_context)
    return {"results": results, "report": text, **meta}


def main(config_cls, argv=None) -> dict | None:
    """Parse the quickstart's flags (`--config x.yaml` too), run it and print its report."""
    from trl import TrlParser

    from longqlora.cli import one_line_errors, setup_logging, with_parent_help
    from longqlora.config_file import parse_with_config

    setup_logging()
    with one_line_errors():
        (cfg,) = parse_with_config(TrlParser((with_parent_help(config_cls),)), argv)
        if cfg.dry_run:
            print(
                f"quickstart: pre-train a {cfg.hidden_size}-wide {cfg.num_layers}-layer Llama at "
                f"{cfg.short_context} tokens for {cfg.copy_steps} copy + {cfg.pretrain_steps} text steps, extend to "
                f"{cfg.long_context} with RoPE {' and '.join(cfg.scalings)} (S2-Attn group {s2_groups(cfg)}, and "
                f"full attention) for {cfg.extend_steps} steps each, score {cfg.eval_tokens} held-out tokens; "
                f"output {cfg.output_dir}"
            )
            return None
        result = run(cfg)
        print(result["report"])  # inside: a reader that stops early (`| head`) is caught there
    return result
