"""The quickstart: a real context extension at small scale, on a CPU, in minutes.

1. Pre-train a small Llama from scratch at a short context L on five bundled Austen novels (cached for reruns).
2. Extend it to 4L with the toolkit's own path (NF4 + position interpolation + S2-Attn + LoRA with trainable
   embeddings and norms), and once more with full attention instead of S2-Attn, for comparison.
3. Score held-out text (Persuasion, never trained on) at L and 4L, over whole windows and over the positions beyond
   L alone, for: the base without interpolation, the base with interpolation and no training, and both extensions.
4. Write results.json, report.md and a plot of perplexity against position into the output directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from longqlora.data import corpora
from longqlora.output import atomic_directory, markdown_table, write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

TRAIN_BOOKS = [f"austen_{n}" for n in corpora.AUSTEN if n != "persuasion"]
HELD_OUT = "austen_persuasion"


@dataclass
class SmallLlamaConfig:
    """The small Llama pre-trained from scratch by the quickstart and the ablations: `pretrain_base` builds it from
    these fields and caches it by them (and `output_dir`, which each config adds)."""

    short_context: int = field(default=128, metadata={"help": "Context L the base is pre-trained at."})
    factor: int = field(default=4, metadata={"help": "Extend to factor x L."})
    vocab_size: int = 2048
    hidden_size: int = 256
    num_layers: int = 4
    intermediate_size: int = 768
    num_heads: int = 4
    pretrain_steps: int = field(default=240, metadata={"help": "Pre-training steps of 32 x L tokens."})
    pretrain_lr: float = 3e-3
    seed: int = 0
    context_mix: bool = field(
        default=False,
        metadata={
            "help": "Pre-train (and extend) on a mix that rewards the whole context: half natural text, a quarter "
            "passkey documents, a quarter passages repeated later in the row (experiments/context_tasks.py)."
        },
    )

    def __post_init__(self):
        if self.short_context < 16 or self.short_context % 16:
            raise ValueError(f"--short_context must be a multiple of 16, at least 16; got {self.short_context}")
        if self.factor < 2:
            raise ValueError(f"--factor must be at least 2, got {self.factor}")
        for name in ("vocab_size", "hidden_size", "intermediate_size"):
            if getattr(self, name) % 64:
                raise ValueError(f"--{name} must be a multiple of 64 (bitsandbytes' CPU 4-bit path needs it)")

    @property
    def long_context(self) -> int:
        return self.short_context * self.factor


@dataclass
class QuickstartConfig(SmallLlamaConfig):
    output_dir: str = field(default="out/quickstart", metadata={"help": "Results, adapters and the cached base."})
    extend_steps: int = field(default=40, metadata={"help": "Extension steps of 8 x 4L tokens, per variant."})
    extend_lr: float = 1e-3
    group_ratio: float = field(default=0.25, metadata={"help": "S2 group size / target context."})
    lora_r: int = 16
    eval_tokens: int = field(default=32768, metadata={"help": "Held-out tokens scored per context length."})
    tiny: bool = field(default=False, metadata={"help": "A seconds-long smoke run of the same pipeline (tests)."})
    dry_run: bool = field(default=False, metadata={"help": "Print the plan and exit."})

    def __post_init__(self):
        super().__post_init__()
        if self.tiny:
            self.pretrain_steps, self.extend_steps, self.eval_tokens = 3, 2, 4 * self.short_context * self.factor


# -------------------------------------------------------------------------------------------------- pre-training
def _base_key(cfg: SmallLlamaConfig, books: list[str] | None = None) -> str:
    fields = (
        "short_context",
        "vocab_size",
        "hidden_size",
        "num_layers",
        "intermediate_size",
        "num_heads",
        "pretrain_steps",
        "pretrain_lr",
        "seed",
    )
    key = [getattr(cfg, f) for f in fields] + ([books] if books is not None else [])
    key += ["context_mix"] if cfg.context_mix else []  # earlier bases keep their keys
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def pretrain_base(cfg: SmallLlamaConfig, texts: dict[str, str] | None = None) -> Path:
    """A small Llama trained from scratch at the short context into `cfg.output_dir`; reused when its settings match.

    `texts` (name -> text) replaces the five training novels (the ablations add most of the KJV).
    """
    from transformers import LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from longqlora.training.tiny import tiny_llama_config, train_tokenizer

    names = list(texts) if texts is not None else TRAIN_BOOKS
    out = Path(cfg.output_dir) / f"base-{_base_key(cfg, None if texts is None else names)}"
    if (out / "pretrain.json").exists():
        logger.info("reusing the pre-trained base in %s", out)
        return out
    texts = list(texts.values()) if texts is not None else [corpora.book(name) for name in TRAIN_BOOKS]
    if cfg.context_mix:
        from experiments.context_tasks import context_mix, tokenizer_sample

        tokenizer = train_tokenizer(texts + tokenizer_sample(), vocab_size=cfg.vocab_size)
        rows = cfg.pretrain_steps * 32
        texts = context_mix(tokenizer, texts, rows, cfg.short_context, cfg.seed)
    else:
        tokenizer = train_tokenizer(texts, vocab_size=cfg.vocab_size)
    config = tiny_llama_config(
        "gqa",
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.short_context,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        intermediate_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config)
    with atomic_directory(out) as tmp:  # a killed pre-training leaves no half a base
        args = SFTConfig(
            output_dir=str(tmp / "trainer"),
            max_steps=cfg.pretrain_steps,
            per_device_train_batch_size=32,
            learning_rate=cfg.pretrain_lr,
            lr_scheduler_type="cosine",
            warmup_steps=min(20, cfg.pretrain_steps),
            weight_decay=0.1,
            max_length=cfg.short_context,
            packing=True,
            # The mix's documents are one row each (bfd keeps them whole); the books alone are one stream.
            packing_strategy="bfd_split" if cfg.context_mix else "wrapped",
            logging_steps=25,
            save_strategy="no",
            report_to="none",
            seed=cfg.seed,
            use_cpu=True,
            dataset_text_field="text",
            bf16=False,
        )
        from datasets import Dataset

        trainer = SFTTrainer(
            model=model, args=args, processing_class=tokenizer, train_dataset=Dataset.from_dict({"text": texts})
        )
        started = time.perf_counter()
        result = trainer.train()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(
            tmp / "pretrain.json",
            {
                "steps": cfg.pretrain_steps,
                "final_loss": result.training_loss,
                "seconds": time.perf_counter() - started,
                "parameters": model.num_parameters(),
                "books": names,
            },
        )
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------------------ extension
def extend(cfg: QuickstartConfig, base: Path, data_dir: Path, s2: bool) -> Path:
    """The toolkit's own extension path, S2-Attn or full attention; returns the adapter directory."""
    from longqlora.data.text import TextDataConfig
    from longqlora.model import ModelConfig
    from longqlora.training.config import RunConfig, TrainingConfig
    from longqlora.training.run import resolve, train

    name = "extended-s2" if s2 else "extended-full"
    model_cfg = ModelConfig(
        model_name_or_path=str(base),
        target_context=cfg.long_context,
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
    return train(resolve(model_cfg, data_cfg, RunConfig(), training))


# ----------------------------------------------------------------------------------------------------- evaluation
def _held_out_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    ids = tokenizer(corpora.book(HELD_OUT), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[:n_tokens])


def evaluate(cfg: QuickstartConfig, base: Path, adapters: dict) -> dict:
    """Perplexity of every model at L and 4L (stride = window: whole, non-overlapping windows)."""
    from transformers import AutoTokenizer

    from longqlora.evaluation.loading import load_for_inference
    from longqlora.evaluation.perplexity import window_scores

    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = _held_out_ids(tokenizer, cfg.eval_tokens)
    short, long = cfg.short_context, cfg.long_context

    def loader(adapter=None, **kwargs):
        return lambda: load_for_inference(str(base), adapter=adapter, compute_dtype="float32", **kwargs)[0]

    models = {
        "base, no interpolation": loader(),
        "base + interpolation, untrained": loader(target_context=long),
        # The extensions run on the NF4-quantized base: this row separates the cost of quantization.
        "base in NF4, no interpolation": loader(load_in_4bit=True),
    }
    for label, adapter in adapters.items():
        models[label] = loader(adapter, load_in_4bit=True)
    results = {}
    for label, load in models.items():
        model = load().eval()
        at_short = window_scores(model, ids, short, progress=False)
        at_long = window_scores(model, ids, long, progress=False)
        buckets = [(start, start + short // 2) for start in range(0, long, short // 2)]
        results[label] = {
            f"ppl@{short}": at_short.perplexity(),
            f"ppl@{long}": at_long.perplexity(),
            f"ppl@{long} positions>={short}": at_long.perplexity(short),
            f"ppl@{long} positions<{short}": at_long.perplexity(0, short),
            "by_position": [[a, b, at_long.perplexity(a, b)] for a, b in buckets],
            "protocol": at_long.protocol(),
            "tokens_scored": {str(short): at_short.tokens(), str(long): at_long.tokens()},
        }
        logger.info("%s: %s", label, {k: round(v, 2) for k, v in results[label].items() if k.startswith("ppl")})
        del model
    return results


def plot(results: dict, path: Path, short: int, long: int) -> None:
    from longqlora.output import new_figure, save_figure

    fig, ax = new_figure(figsize=(7, 4.2))
    for label, r in results.items():
        xs = [(a + b) / 2 for a, b, _ in r["by_position"]]
        ax.plot(xs, [p for _, _, p in r["by_position"]], marker="o", label=label)
    ax.axvline(short, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("position in the window (tokens of context)")
    ax.set_ylabel("perplexity (held-out Persuasion)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"Extending a small Llama from {short} to {long} tokens")
    save_figure(fig, path)


def report(cfg: QuickstartConfig, results: dict, meta: dict) -> str:
    short, long = cfg.short_context, cfg.long_context
    cols = [f"ppl@{short}", f"ppl@{long}", f"ppl@{long} positions<{short}", f"ppl@{long} positions>={short}"]
    table = markdown_table(
        [
            "model",
            f"{short} (whole windows)",
            f"{long} (whole windows)",
            f"{long}, positions < {short}",
            f"{long}, positions >= {short}",
        ],
        [[label] + [round(r[c], 2) for c in cols] for label, r in results.items()],
    )
    return "\n".join(
        [
            f"# Quickstart: {short} -> {long} tokens",
            "",
            f"Base: {meta['base_parameters']:,}-parameter Llama pre-trained from scratch at {short} tokens for "
            f"{cfg.pretrain_steps} steps on {', '.join(TRAIN_BOOKS)}; extended x{cfg.factor} for {cfg.extend_steps} "
            f"steps (NF4 base, position interpolation, LoRA r={cfg.lora_r} + trainable embeddings and norms; S2-Attn "
            f"group {s2_groups(cfg)} or full attention). Perplexity on the first {cfg.eval_tokens} tokens "
            f"of held-out {HELD_OUT}; {results[next(iter(results))]['protocol']}.",
            "",
            table,
            f"Seed {cfg.seed}; wall time {meta['seconds']:.0f} s; `python recipes/quickstart.py` reproduces it.",
            "",
        ]
    )


def s2_groups(cfg: QuickstartConfig) -> str:
    """The S2 group sizes the extension trains with, e.g. "32 -> 96 -> 256 over 3 equal shares of the steps"."""
    from longqlora.model import ModelConfig

    model = ModelConfig(model_name_or_path="-", target_context=cfg.long_context, group_ratio=cfg.group_ratio)
    sizes = model.group_sizes
    return " -> ".join(map(str, sizes)) + (f" over {len(sizes)} equal shares of the steps" if len(sizes) > 1 else "")


def run(cfg: QuickstartConfig) -> dict:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data_dir = out / "train-books"
    if not data_dir.exists():
        with atomic_directory(data_dir) as tmp:
            for name in TRAIN_BOOKS:
                (tmp / f"{name}.txt").write_text(corpora.book(name), encoding="utf-8")
    torch.manual_seed(cfg.seed)
    base = pretrain_base(cfg)
    adapters = {
        "extended, S2-Attn (ours)": extend(cfg, base, data_dir, s2=True),
        "extended, full attention": extend(cfg, base, data_dir, s2=False),
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
    plot(results, out / "perplexity.png", cfg.short_context, cfg.long_context)
    return {"results": results, "report": text, **meta}


def main(config_cls, argv=None) -> dict | None:
    """Parse the quickstart's flags (`--config x.yaml` too), run it and print its report."""
    from trl import TrlParser

    from longqlora.cli import one_line_errors, setup_logging
    from longqlora.config_file import parse_with_config

    setup_logging()
    with one_line_errors():
        (cfg,) = parse_with_config(TrlParser((config_cls,)), argv)
        if cfg.dry_run:
            print(
                f"quickstart: pre-train a {cfg.hidden_size}-wide {cfg.num_layers}-layer Llama at "
                f"{cfg.short_context} tokens for {cfg.pretrain_steps} steps, extend to {cfg.long_context} "
                f"(S2-Attn group {s2_groups(cfg)}, and full attention) for "
                f"{cfg.extend_steps} steps each, score {cfg.eval_tokens} held-out tokens; output {cfg.output_dir}"
            )
            return None
        result = run(cfg)
    print(result["report"])
    return result
