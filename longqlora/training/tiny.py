"""Tiny random Llama models and a bundled-text tokenizer, so that every path runs on a CPU without downloads.

Every Linear dimension is a multiple of 64: bitsandbytes' CPU 4-bit path fails otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# name -> (hidden, heads, kv_heads, layers, intermediate). "gqa": grouped-query attention with an even head count;
# "odd": 3 query heads sharing one KV head, so the two S2 head halves (1 and 2 heads) split a KV group.
TINY_SHAPES = {"mha": (128, 4, 4, 2, 256), "gqa": (128, 4, 2, 2, 256), "odd": (192, 3, 1, 2, 256)}


def tiny_llama_config(shape: str = "gqa", *, vocab_size: int = 320, max_position_embeddings: int = 128, **overrides):
    """A LlamaConfig of one of `TINY_SHAPES` (head_dim 32 or 64), for tests and `--tiny` runs."""
    from transformers import LlamaConfig

    if shape not in TINY_SHAPES:
        raise ValueError(f"--tiny_shape must be one of {sorted(TINY_SHAPES)}, got {shape!r}")
    if vocab_size % 64:
        raise ValueError(f"vocab_size must be a multiple of 64 (bitsandbytes CPU 4-bit), got {vocab_size}")
    hidden, heads, kv_heads, layers, inter = TINY_SHAPES[shape]
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def train_tokenizer(texts, vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on `texts` with Llama's special tokens (<unk>=0, <s>=1, </s>=2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", model_max_length=1 << 30
    )


def save_tiny_model(
    path,
    *,
    shape: str = "gqa",
    texts=None,
    vocab_size: int = 320,
    max_position_embeddings=128,
    seed: int = 0,
    **overrides,
) -> Path:
    """Write a random tiny Llama and its tokenizer to `path` (safetensors), as a stand-in for a hub checkpoint."""
    import torch
    from transformers import LlamaForCausalLM

    path = Path(path)
    texts = list(texts) if texts is not None else [_FALLBACK_TEXT]
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    config = tiny_llama_config(
        shape, vocab_size=vocab_size, max_position_embeddings=max_position_embeddings, **overrides
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)  # transformers 5 writes safetensors only
    tokenizer.save_pretrained(path)
    logger.debug("wrote a tiny random Llama (%s, %d params) to %s", shape, model.num_parameters(), path)
    return path


_FALLBACK_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep. The pass key is 12345. Remember it. What is the pass key? "
) * 4


def tiny_instruction_file(path, n: int = 24) -> Path:
    """A small LongAlpaca-style JSONL (instruction, input, output) cut from a bundled novel, for `--tiny` SFT runs:
    each sample asks for the first sentence of a passage."""
    import json

    from longqlora.data import corpora
    from longqlora.output import write_text_atomic

    paragraphs = [" ".join(p.split()) for p in corpora.book("austen_persuasion").split("\n\n")]
    paragraphs = [p for p in paragraphs if 80 <= len(p) <= 200 and ". " in p][:n]  # fits a 256-token context
    rows = []
    for i, passage in enumerate(paragraphs):
        first = passage.split(". ")[0] + "."
        rows.append({"instruction": "What is the first sentence of this passage?", "input": passage, "output": first})
        if i % 2:  # vary the wording
            rows[-1]["instruction"] = "Quote the opening sentence of the passage below."
    return write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def tiny_overrides(model_cfg, data_cfg, training):
    """The same recipe scaled down to a CPU: a tiny random Llama (context 64 -> 256) and bundled text."""
    import dataclasses

    from filelock import FileLock

    from longqlora import hardware
    from longqlora.data import corpora, instructions, pose
    from longqlora.output import atomic_directory
    from longqlora.training import distributed

    asked = (model_cfg, data_cfg, training)
    out = Path(training.output_dir)
    base = out / "tiny-base"
    if hardware.launch().main:
        out.mkdir(parents=True, exist_ok=True)
        with FileLock(str(out / ".tiny-base.lock")):  # written whole, then renamed: never half a base
            if not (base / "config.json").exists():
                with atomic_directory(base) as partial:
                    save_tiny_model(
                        partial,
                        shape="gqa",
                        texts=[corpora.book("austen_persuasion")[:200_000]],
                        max_position_embeddings=64,
                    )
                logger.info("--tiny: a random tiny Llama base written to %s", base)
    else:  # transformers writes weights from rank 0 only once torch.distributed runs: wait for the main process
        distributed.wait_for_file(base / "config.json")
    model_cfg = dataclasses.replace(
        model_cfg,
        model_name_or_path=str(base),
        target_context=256,
        original_context=0,  # the tiny base's own 64
        compute_dtype="float32",
        attn_backend="sdpa",
        pose_window=pose.tiny_window(model_cfg.pose_window, model_cfg.target_context, 256, model_cfg.pose_chunks),
    )
    if isinstance(data_cfg, instructions.InstructionDataConfig):
        data_cfg = dataclasses.replace(
            data_cfg,
            dataset=str(tiny_instruction_file(out / "tiny-data.jsonl")),
            num_proc=None,
            system_prompt=data_cfg.system_prompt or "A chat.",
        )
    else:
        data_cfg = dataclasses.replace(
            data_cfg, dataset=corpora.book_path("austen_persuasion"), min_length=0, num_proc=None, max_documents=None
        )
    training = dataclasses.replace(
        training,
        max_steps=min(training.max_steps, 4) if training.max_steps > 0 else 4,
        save_steps=2,
        eval_max_rows=_set_or(training, "eval_max_rows", 8),  # a whole held-out book took minutes an evaluation
        eval_steps=min(training.eval_steps, 2) if training.eval_steps else None,
        # the recipe's batch shape scaled down, unless set on the command line or in --config: then kept, so that
        # one process with accumulation 4 can be compared with 2 processes x accumulation 2 (docs/distributed.md)
        per_device_train_batch_size=_set_or(training, "per_device_train_batch_size", 1),
        gradient_accumulation_steps=_set_or(training, "gradient_accumulation_steps", 2),
        warmup_steps=1 if training.max_steps != 1 else 0,
        logging_steps=1,
        optim="adamw_torch",
        dataset_num_proc=None,
        use_cpu=True,
        fp16=False,
        bf16=False,
        learning_rate=max(training.learning_rate, 1e-3),
    )
    names = (
        ("model_name_or_path", "target_context", "compute_dtype", "attn_backend"),
        ("dataset",),
        ("max_steps", "learning_rate", "save_steps", "warmup_steps", "optim", "logging_steps"),
    )
    replaced = [
        change
        for before, after, fields in zip(asked, (model_cfg, data_cfg, training), names, strict=True)
        for change in _user_values_replaced(before, after, fields)
    ]
    if replaced:
        logger.warning("--tiny replaces what was set: %s", ", ".join(replaced))
    return model_cfg, data_cfg, training


def _user_values_replaced(before, after, names) -> list[str]:
    """'--name old -> new' for each of `names` that was set away from its recipe default and that --tiny changed."""
    from longqlora.training.config import recipe_default

    return [
        f"--{name} {getattr(before, name)} -> {getattr(after, name)}"
        for name in names
        if getattr(before, name) != recipe_default(before, name) and getattr(before, name) != getattr(after, name)
    ]


def _set_or(config, name: str, tiny):
    """`config.name` where it differs from its recipe's default (so the user set it), else the tiny value."""
    from longqlora.training.config import recipe_default

    value = getattr(config, name)
    return value if value != recipe_default(config, name) else tiny
