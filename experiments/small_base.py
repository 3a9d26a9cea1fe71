"""The small Llama that the quickstart and the ablations pre-train from scratch at a short context L, and extend.

Cached under its settings (`pretrain_base`), so every variant and rerun starts from the same weights. With
`--context_mix` it is pre-trained on material that rewards its whole window (experiments/context_tasks.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from longqlora.data import corpora
from longqlora.output import atomic_directory, write_json_atomic

logger = logging.getLogger(__name__)

TRAIN_BOOKS = [f"austen_{n}" for n in corpora.AUSTEN if n != "persuasion"]
HELD_OUT = "austen_persuasion"
COPY_LOOP = 2  # how the copy rows are trained (2: `_copy_pretrain`'s plain loop); in the cache keys


@dataclass
class SmallLlamaConfig:
    """The small Llama pre-trained from scratch by the quickstart and the ablations: `pretrain_base` builds it from
    these fields and caches it by them (and `output_dir`, which each config adds)."""

    short_context: int = field(default=128, metadata={"help": "Context L the base is pre-trained at."})
    factor: int = field(default=4, metadata={"help": "Extend to factor x L."})
    vocab_size: int = field(
        default=2048, metadata={"help": "Size of the byte-level BPE vocabulary trained on its text."}
    )
    hidden_size: int = field(default=256, metadata={"help": "Width of the base (a multiple of 64: NF4 on CPU)."})
    num_layers: int = field(default=4, metadata={"help": "Decoder layers of the base."})
    intermediate_size: int = field(default=768, metadata={"help": "MLP width of the base (a multiple of 64)."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads of the base."})
    pretrain_steps: int = field(default=240, metadata={"help": "Pre-training steps of 32 x L tokens."})
    pretrain_lr: float = field(default=3e-3, metadata={"help": "Pre-training learning rate (copy and text steps)."})
    copy_steps: int = field(
        default=0,
        metadata={
            "help": "With --context_mix: steps on random ids whose runs recur at varying offsets before the mix, "
            "to form an induction head first (experiments/context_tasks.py varied_repeat_ids)."
        },
    )
    grow_from: str = field(
        default="",
        metadata={
            "help": "A pre-trained base folder (out/.../base-<key>) to grow into this shape, keeping what it computes "
            "(experiments/grow.py), before the mix: a larger base that copies from its first step. Its tokenizer is "
            "reused."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the base, the data and every variant."})
    context_mix: bool = field(
        default=False,
        metadata={
            "help": "Pre-train (and extend) on a mix that rewards the whole context: 3/8 natural text, 1/4 passkey "
            "documents, 1/8 passages repeated later in the row, 1/4 random runs twice (experiments/context_tasks.py)."
        },
    )

    def __post_init__(self):
        if self.short_context < 16 or self.short_context % 16:
            raise ValueError(f"--short_context must be a multiple of 16, at least 16; got {self.short_context}")
        if self.factor < 2:
            raise ValueError(f"--factor must be at least 2, got {self.factor}")
        if self.copy_steps < 0 or (self.copy_steps and not self.context_mix):
            raise ValueError(f"--copy_steps {self.copy_steps}: 0 or more, and only with --context_mix true")
        if self.grow_from and not (Path(self.grow_from) / "pretrain.json").is_file():
            raise ValueError(f"--grow_from {self.grow_from}: not a pre-trained base (no pretrain.json in it)")
        for name in ("vocab_size", "hidden_size", "intermediate_size"):
            if getattr(self, name) % 64:
                raise ValueError(f"--{name} must be a multiple of 64 (bitsandbytes' CPU 4-bit path needs it)")

    @property
    def long_context(self) -> int:
        return self.short_context * self.factor


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
    if cfg.context_mix:  # earlier bases keep their keys
        from experiments.context_tasks import MIX_VERSION

        key += ["context_mix", MIX_VERSION]
        key += [{"copy_steps": cfg.copy_steps, "copy_loop": COPY_LOOP}] if cfg.copy_steps else []
    key += [{"grow_from": Path(cfg.grow_from).name}] if cfg.grow_from else []  # the folder name is its base's key
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def pretrain_base(cfg: SmallLlamaConfig, texts: dict[str, str] | None = None) -> Path:
    """A small Llama trained from scratch at the short context into `cfg.output_dir`; reused when its settings match.

    `texts` (name -> text) replaces the five training novels (the ablations add most of the KJV); `context_mix`
    replaces them with the mix of experiments/context_tasks.py, as token ids.
    """
    from transformers import LlamaForCausalLM

    from longqlora.training.tiny import tiny_llama_config, train_tokenizer

    names = list(texts) if texts is not None else TRAIN_BOOKS
    out = Path(cfg.output_dir) / f"base-{_base_key(cfg, None if texts is None else names)}"
    if (out / "pretrain.json").exists():
        logger.info("reusing the pre-trained base in %s", out)
        return out
    texts = list(texts.values()) if texts is not None else [corpora.book(name) for name in TRAIN_BOOKS]
    copies = []
    from experiments.context_tasks import context_mix, tokenizer_sample, varied_repeat_ids

    small = None
    if cfg.grow_from:  # the grown base keeps its source's tokenizer: its embedding rows are that vocabulary
        from transformers import AutoTokenizer

        small = LlamaForCausalLM.from_pretrained(cfg.grow_from, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(cfg.grow_from)
    else:
        sample = tokenizer_sample() if cfg.context_mix else []
        tokenizer = train_tokenizer(texts + sample, vocab_size=cfg.vocab_size)
    if cfg.context_mix:
        texts = context_mix(tokenizer, texts, cfg.pretrain_steps * 32, cfg.short_context, cfg.seed, as_ids=True)
        copies = varied_repeat_ids(tokenizer, cfg.copy_steps * 32, cfg.short_context, cfg.seed)
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
    if small is not None:
        from experiments.grow import grow_llama

        model = grow_llama(small, config, cfg.seed)
    else:
        model = LlamaForCausalLM(config)
    with atomic_directory(out) as tmp:  # a killed pre-training leaves no half a base
        started = time.perf_counter()
        if copies:  # an induction head first: the mix alone does not form one in budget (docs/ablations.md)
            _copy_pretrain(cfg, model, copies)
        loss = _sft_pretrain(cfg, model, tokenizer, texts, tmp / "trainer")
        model.save_pretrained(tmp)  # transformers 5 writes safetensors only
        tokenizer.save_pretrained(tmp)
        write_json_atomic(
            tmp / "pretrain.json",
            {
                "steps": cfg.pretrain_steps,
                "copy_steps": len(copies) // 32,
                "final_loss": loss,
                "seconds": time.perf_counter() - started,
                "parameters": model.num_parameters(),
                "books": names,
                **(
                    {"grown_from": Path(cfg.grow_from).name, "grown_from_parameters": small.num_parameters()}
                    if small is not None
                    else {}
                ),
            },
        )
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
    return out


def _copy_pretrain(cfg: SmallLlamaConfig, model, rows: list[list[int]]) -> float:
    """`cfg.copy_steps` steps of 32 rows on the copy rows (all of length L, nothing to pad or pack); returns the
    mean loss. A plain loop, not TRL's SFTTrainer: its chunked log-prob LM head is two thirds of a step of this
    small model on a CPU (profiled), and a step here is only the model's own causal-LM loss."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.1)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20))
    model.train()
    total = 0.0
    for step in tqdm(range(cfg.copy_steps), desc="copy rows", mininterval=5):
        ids = torch.tensor(rows[32 * step : 32 * (step + 1)])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step(), warmup.step(), optimizer.zero_grad()
        total += loss.item()
        if (step + 1) % 100 == 0:
            logger.info("copy rows: step %d, loss %.3f", step + 1, loss.item())
    return total / max(1, cfg.copy_steps)


def _sft_pretrain(cfg: SmallLlamaConfig, model, tokenizer, texts: list, out: Path) -> float:
    """`cfg.pretrain_steps` steps of 32 rows of L tokens on `texts` (strings, or lists of token ids) through TRL's
    SFTTrainer, cosine schedule; returns the mean training loss."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(out),
        activation_checkpointing=True,  # TRL's default, under transformers 5's name (the old one warns)
        max_steps=cfg.pretrain_steps,
        per_device_train_batch_size=32,
        learning_rate=cfg.pretrain_lr,
        lr_scheduler_type="cosine",
        warmup_steps=min(20, cfg.pretrain_steps),
        weight_decay=0.1,
        max_length=cfg.short_context,
        # The books alone are one stream, cut into full rows. The mix's documents (L/2 to L tokens) are one row
        # each, padded to the batch's longest: TRL's bfd packing would flatten the batch into one padding-free
        # row of 32 x L tokens, which SDPA (no varlen kernel on CPU) attends with a 32L x 32L mask: 32x the work.
        packing=not cfg.context_mix,
        packing_strategy="wrapped",
        logging_steps=25,
        save_strategy="no",
        report_to="none",
        seed=cfg.seed,
        use_cpu=True,
        dataset_text_field="text",
        bf16=False,
    )
    column = "input_ids" if texts and not isinstance(texts[0], str) else "text"  # token ids go in as they are
    dataset = Dataset.from_dict({column: texts})
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=dataset)
    return trainer.train().training_loss
