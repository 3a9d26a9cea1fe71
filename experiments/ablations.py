"""The ablations of LongLoRA (arXiv 2309.12307 Tables 1-2, §3.2-3.3) at small scale, measured by the toolkit itself.

1. A small Llama is pre-trained from scratch at a short context L (small_base.pretrain_base; cached) on five Austen
   novels and the first 90% of the KJV (--pretrain_books austen: the novels only). Persuasion and the last 10% of
   the KJV are never trained on.
2. Every variant in `VARIANTS` extends it to 4L (position interpolation), seeded, through the toolkit's own
   training path (model.load_model + train.train, i.e. TRL's SFTTrainer), except full fine-tuning, which trains
   every weight and so cannot go through the LoRA loader (see `_extend_full`).
3. Every variant is scored by the toolkit's own commands on the held-out stream: `perplexity` (run_perplexity, one
   protocol for all: whole non-overlapping windows) at L, 2L and 4L, and `passkey` (run_passkey) at 4L.
4. Each (variant, seed) result is a JSON file under <output_dir>/results, named by a hash of every setting that
   affects it: a rerun skips it. ablation_report.py turns the results into a Markdown table and a PNG.
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

from experiments.ablation_data import train_texts, write_data
from experiments.ablation_variants import DEFAULT_VARIANTS, VARIANTS
from experiments.small_base import SmallLlamaConfig
from longqlora.output import write_json_atomic

logger = logging.getLogger(__name__)


@dataclass
class AblationConfig(SmallLlamaConfig):
    output_dir: str = field(default="out/ablations", metadata={"help": "Cached base, adapters and result JSONs."})
    variants: str = field(default=DEFAULT_VARIANTS, metadata={"help": "Comma list of variant ids to run."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Extension seeds."})
    pretrain_books: str = field(
        default="austen+kjv",
        metadata={
            "help": "austen+kjv: five Austen novels and the first 90%% of the KJV (the last 10%% joins Persuasion "
            "in the held-out text); austen: the five novels only (with --pretrain_steps 240 --base_cache "
            "out/quickstart, the quickstart's own cached base)."
        },
    )
    base_cache: str = field(default="out/ablations", metadata={"help": "Where the pre-trained base is cached."})
    pretrain_steps: int = field(default=400, metadata={"help": "Pre-training steps of 32 x L tokens."})
    seed: int = field(default=0, metadata={"help": "Seed of the base pre-training (one base for all variants)."})
    extend_steps: int = field(default=40, metadata={"help": "Extension steps of 8 x 4L tokens per variant."})
    extend_lr: float = field(default=1e-3, metadata={"help": "Extension learning rate (LoRA, LoRA+, full FT)."})
    group_ratio: float = field(default=0.25, metadata={"help": "S2 group size / 4L (variants may override)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of the LoRA variants."})
    extend_chars: int = field(
        default=300_000, metadata={"help": "Characters of each training book the extension reads."}
    )
    eval_tokens: int = field(default=16384, metadata={"help": "Held-out tokens scored at every length."})
    passkey_trials: int = field(default=2, metadata={"help": "Passkey keys per depth (5 depths) at 4L."})
    doc: str | None = field(default=None, metadata={"help": "Markdown file whose section --section is rewritten."})
    section: str = field(default="main", metadata={"help": "Name of the section of --doc (and of its PNG)."})
    command: str = field(default="", metadata={"help": "The command line, recorded in the report."})
    tiny: bool = field(default=False, metadata={"help": "A scaled-down run of the same pipeline (the tests run it)."})

    def __post_init__(self):
        unknown = [v for v in self.variant_ids if v not in VARIANTS]
        if unknown or not self.variant_ids:
            raise ValueError(
                f"--variants {self.variants}: unknown {', '.join(unknown) or 'empty list'}; choose from "
                f"{', '.join(VARIANTS)}"
            )
        if self.pretrain_books not in ("austen", "austen+kjv"):
            raise ValueError(f"--pretrain_books {self.pretrain_books}: must be austen or austen+kjv")
        if not self.seeds:
            raise ValueError("--seeds: pass at least one seed")
        super().__post_init__()
        if self.tiny:
            self.base_cache = self.output_dir
            self.short_context, self.hidden_size, self.intermediate_size, self.num_layers = 64, 64, 128, 2
            self.vocab_size, self.pretrain_steps, self.extend_steps, self.eval_tokens = 320, 2, 2, 512
            self.passkey_trials, self.extend_chars = 1, 20_000

    @property
    def variant_ids(self) -> list[str]:
        return [v.strip() for v in self.variants.split(",") if v.strip()]

    @property
    def lengths(self) -> list[int]:
        return [self.short_context, 2 * self.short_context, self.long_context]


# ------------------------------------------------------------------------------------------------------- data
# -------------------------------------------------------------------------------------------------- extension
def variant_settings(cfg: AblationConfig, vid: str) -> dict:
    v = VARIANTS[vid]
    return {
        "train": v.get("train", True),
        "pi": v.get("pi", True),
        "s2": v.get("s2", True),
        "nf4": v.get("nf4", False),
        "full_ft": v.get("full_ft", False),
        "trainable": v.get("trainable", "embed,norm"),
        "shift": v.get("shift", "leakfree"),
        "sinks": v.get("sinks", 0),
        "full_heads": v.get("full_heads", 0.0),
        "full_every": v.get("full_every", 0),
        "group_schedule": v.get("group_schedule", ""),
        "group_ratio": v.get("group_ratio", cfg.group_ratio),
        **({"pose": v["pose"]} if v.get("pose") else {}),
        **({"rope": v["rope"]} if v.get("rope") else {}),
    }  # only when set: the other variants' cache keys stay


def _model_config(cfg: AblationConfig, base: Path, s: dict):
    from longqlora.model import ModelConfig

    # Variants give schedules as ratios of 4L (and a fixed group as none); the flag takes multiples of group_ratio.
    ratios = [float(r) for r in s["group_schedule"].split(",") if r.strip()]
    schedule = ",".join(f"{r / s['group_ratio']:g}" for r in ratios) or "none"
    return ModelConfig(
        model_name_or_path=str(base),
        target_context=cfg.long_context,
        rope_scaling=s.get("rope", "linear"),
        group_ratio=s["group_ratio"],
        s2_attention=s["s2"],
        attn_backend="sdpa",
        load_in_4bit=s["nf4"],
        compute_dtype="float32",
        lora_r=cfg.lora_r,
        lora_alpha=2 * cfg.lora_r,
        lora_dropout=0.0,
        trainable_params=s["trainable"],
        s2_shift=s["shift"],
        s2_sink_tokens=s["sinks"],
        s2_full_heads=s["full_heads"],
        s2_full_every=s["full_every"],
        s2_group_schedule=schedule,
        pose_window=round(s.get("pose", 0) * cfg.long_context),
    )


def _training(cfg: AblationConfig, out: Path, seed: int, s: dict):
    from longqlora.training.config import TrainingConfig

    # The quickstart's extension settings; no gradient checkpointing: the model is small and CPU time is short.
    # PoSE's rows are shorter: more of them, the same tokens per step.
    rows = round(8 / s.get("pose", 1))
    return TrainingConfig(
        output_dir=str(out),
        max_steps=cfg.extend_steps,
        per_device_train_batch_size=rows,
        learning_rate=cfg.extend_lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(5, cfg.extend_steps),
        max_grad_norm=1.0,
        optim="adamw_torch",
        save_strategy="no",
        logging_steps=10,
        seed=seed,
        use_cpu=True,
        activation_checkpointing=False,
    )


def extend(cfg: AblationConfig, base: Path, data_dir: Path, s: dict, seed: int, out: Path) -> Path:
    """Train one variant; returns the adapter (or, for full fine-tuning, model) directory."""
    from longqlora.data.text import TextDataConfig
    from longqlora.training.config import RunConfig
    from longqlora.training.run import resolve, train

    # The documents joined ("concat"): plain rows, so the full-attention runs need no packed-document mask and
    # LongLoRA's rolled shift (which knows no documents) runs too; some of the mix's documents straddle two rows.
    data_cfg = TextDataConfig(dataset=str(data_dir), pack="concat")
    shutil.rmtree(out, ignore_errors=True)  # this experiment's own folder: an interrupted variant trains again
    run = resolve(_model_config(cfg, base, s), data_cfg, RunConfig(), _training(cfg, out, seed, s))
    return _extend_full(run) if s["full_ft"] else train(run)


def _extend_full(run) -> Path:
    """Full fine-tuning: every weight trains, so no LoRA wrapper (model.load_model always adds one); the rest is
    the toolkit's path: load_base (PI applied), the same dataset preparation, the same SFTTrainer settings."""
    from trl import SFTTrainer

    from longqlora.model import load_base
    from longqlora.output import atomic_directory
    from longqlora.training.run import prepare_dataset

    model_cfg, training = run.model, run.training
    torch.manual_seed(training.seed)
    model, tokenizer, _ = load_base(model_cfg, checked=(run.hf_config, run.info))
    model.requires_grad_(True)
    dataset, _ = prepare_dataset(run.data, tokenizer, model_cfg.target_context)
    trainer = SFTTrainer(model=model, args=training, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    out = Path(training.output_dir)
    with atomic_directory(out, into=True, last=("config.json",)) as tmp:  # config.json carries the interpolation
        trainer.model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out


# ------------------------------------------------------------------------------------------------- evaluation
def evaluate(cfg: AblationConfig, base: Path, eval_dir: Path, s: dict, trained: Path | None) -> dict:
    """The toolkit's perplexity command at L, 2L, 4L and its passkey command at 4L, on one variant."""
    from longqlora.evaluation.passkey import PasskeyConfig, run_passkey
    from longqlora.evaluation.perplexity import PerplexityConfig, run_perplexity

    if trained is None:
        where = dict(model=str(base), target_context=cfg.long_context if s["pi"] else None)
        if s["pi"]:  # explicit: the toolkit's default scaling is not what "pi" measures
            where["rope_scaling"] = s.get("rope", "linear")
    elif s["full_ft"]:
        where = dict(model=str(trained))
    else:
        where = dict(model=str(base), adapter=str(trained), load_in_4bit=s["nf4"])
    ppl = run_perplexity(
        PerplexityConfig(
            data=str(eval_dir),
            context_lengths=cfg.lengths,
            max_tokens=cfg.eval_tokens,
            compute_dtype="float32",
            **where,
        )
    )
    lengths = [cfg.long_context]
    if cfg.context_mix:  # every length the prompt fits in (a tiny run's L does not hold it)
        from transformers import AutoTokenizer

        from experiments.context_tasks import passkey_lengths

        lengths = passkey_lengths(AutoTokenizer.from_pretrained(base), cfg.lengths)
    key = run_passkey(
        PasskeyConfig(context_lengths=lengths, trials=cfg.passkey_trials, compute_dtype="float32", **where)
    )
    at_long = next(b for b in key["by_length"] if b["context_length"] == cfg.long_context)
    result = {
        "perplexity": {str(r["context_length"]): r["perplexity"] for r in ppl["results"]},
        "protocol": ppl["results"][0]["protocol"],
        "tokens_scored": ppl["results"][-1]["tokens_scored"],
        "passkey": at_long["accuracy"],
        "passkey_trials": at_long["trials"],
    }
    if cfg.context_mix:
        result["passkey_by_length"] = {str(b["context_length"]): b["accuracy"] for b in key["by_length"]}
        result["passkey_cells"] = key["cells"]
        result["repeat"] = repeat_perplexity(cfg, eval_dir, where)
    return result


def repeat_perplexity(cfg: AblationConfig, eval_dir: Path, where: dict) -> dict:
    """experiments.context_tasks.repeat_scores on the held-out text, with the model the evaluation loaded."""
    from experiments.context_tasks import repeat_distances, repeat_scores
    from longqlora.evaluation.loading import load_for_inference

    options = {k: v for k, v in where.items() if k != "model"}
    model, tokenizer, _ = load_for_inference(where["model"], compute_dtype="float32", **options)
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in sorted(eval_dir.glob("*.txt")))
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][: cfg.eval_tokens])
    samples = 4 if cfg.tiny else 32
    distances = repeat_distances(cfg.short_context, cfg.long_context)
    return repeat_scores(model.eval(), ids, distances, cfg.short_context // 8, samples)


PASSKEY_RULE = 2  # the key then more digits after whitespace is found (was: read as one longer number)


def result_key(cfg: AblationConfig, s: dict, seed: int) -> str:
    """Hash of everything that determines one (variant, seed) result."""
    fields = (
        "pretrain_books",
        "short_context",
        "factor",
        "vocab_size",
        "hidden_size",
        "num_layers",
        "intermediate_size",
        "num_heads",
        "pretrain_steps",
        "pretrain_lr",
        "seed",
        "extend_steps",
        "extend_lr",
        "lora_r",
        "eval_tokens",
        "passkey_trials",
        "extend_chars",
        "tiny",
    )
    if cfg.context_mix:
        fields += ("context_mix",)  # earlier results keep their keys
    used = {f: getattr(cfg, f) for f in fields}
    if cfg.context_mix:
        from experiments.context_tasks import MIX_VERSION

        used["mix_version"] = MIX_VERSION
        if cfg.copy_steps:  # a different base; results of bases without a copy phase keep their keys
            from experiments.small_base import COPY_LOOP

            used["copy_steps"] = [cfg.copy_steps, COPY_LOOP]
    if cfg.grow_from:  # a grown base (its source's folder name is the source's key)
        used["grow_from"] = Path(cfg.grow_from).name
    if cfg.context_mix:  # scored by the passkey rule of 2026-12-04 (docs/ablations.md): older results are not reused
        used["passkey_rule"] = PASSKEY_RULE
    if not s["train"]:
        skip = ("extend_steps", "extend_lr", "lora_r", "extend_chars")
        used = {f: v for f, v in used.items() if f not in skip}
    else:  # trained on full rows only (data.text.full_rows); results from before keep their keys
        used["concat_rows"] = "full"
    return hashlib.sha256(json.dumps([used, s, seed if s["train"] else 0]).encode()).hexdigest()[:12]


def run_one(cfg: AblationConfig, base: Path, train_dir: Path, eval_dir: Path, vid: str, seed: int) -> dict:
    s = variant_settings(cfg, vid)
    path = Path(cfg.output_dir) / "results" / f"{vid}-{result_key(cfg, s, seed)}.json"
    if path.exists():
        logger.info("cached: %s seed %d (%s)", vid, seed, path)
        return json.loads(path.read_text())
    started = time.perf_counter()
    trained = None
    if s["train"]:
        trained = extend(cfg, base, train_dir, s, seed, Path(cfg.output_dir) / "runs" / path.stem)
    train_s = time.perf_counter() - started
    result = {
        "variant": vid,
        "seed": seed,
        "settings": s,
        **evaluate(cfg, base, eval_dir, s, trained),
        "train_seconds": train_s,
        "seconds": time.perf_counter() - started,
    }
    write_json_atomic(path, result)
    logger.info("%s seed %d: %s", vid, seed, {k: round(v, 2) for k, v in result["perplexity"].items()})
    return result


def run(cfg: AblationConfig) -> dict:
    """Pre-train (cached), then every variant x seed (cached); returns {variant: [results]} and the wall time."""
    started = time.perf_counter()
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    Path(cfg.base_cache).mkdir(parents=True, exist_ok=True)
    from experiments.small_base import pretrain_base

    torch.manual_seed(cfg.seed)
    books = None
    if cfg.pretrain_books == "austen+kjv" or cfg.tiny:
        books = train_texts(200_000 if cfg.tiny else None, cfg.pretrain_books == "austen+kjv")
    base = pretrain_base(dataclasses.replace(cfg, output_dir=cfg.base_cache), books)
    train_dir, eval_dir = write_data(cfg, base)
    results = {vid: [] for vid in cfg.variant_ids}
    for seed in cfg.seeds:  # seed-major: an interrupted run has every variant at the first seeds
        for vid in cfg.variant_ids:
            if variant_settings(cfg, vid)["train"] or seed == cfg.seeds[0]:  # untrained: nothing random, run once
                results[vid].append(run_one(cfg, base, train_dir, eval_dir, vid, seed))
    pretrain = json.loads((base / "pretrain.json").read_text())
    return {"results": results, "seconds": time.perf_counter() - started, "base": str(base), "pretrain": pretrain}


def main(cfg: AblationConfig) -> dict:
    from experiments.ablation_report import plot, plot_context, report, write_section

    out = run(cfg)
    write_json_atomic(Path(cfg.output_dir) / f"summary-{cfg.section}.json", {"config": dataclasses.asdict(cfg), **out})
    if cfg.doc:
        doc = Path(cfg.doc)
        png, context_png = doc.with_name(f"{doc.stem}_{cfg.section}.png"), None
        plot(cfg, out["results"], png)
        if cfg.context_mix:
            context_png = plot_context(cfg, out["results"], doc.with_name(f"{doc.stem}_{cfg.section}_context.png"))
        out["report"] = report(cfg, out, png.name, context_png.name if context_png else "")
        write_section(doc, cfg.section, out["report"])
    else:
        out["report"] = report(cfg, out, "")
    return out
