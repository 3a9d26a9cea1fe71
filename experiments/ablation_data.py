"""The ablations' text (experiments/ablations.py): the pre-training books, the held-out stream (Persuasion and the
last 10% of the KJV, never trained on) and the extension's training text, written once per setting."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from experiments.small_base import TRAIN_BOOKS
from longqlora.data import corpora
from longqlora.output import write_text_atomic

if TYPE_CHECKING:
    from experiments.ablations import AblationConfig

HELD_OUT_KJV = 0.1  # the last 10% of the KJV (by characters, cut at a line) is held out


def _kjv_split() -> tuple[str, str]:
    text = corpora.book("kjv_bible")
    cut = text.index("\n", int(len(text) * (1 - HELD_OUT_KJV)))
    return text[:cut], text[cut + 1 :]


def train_texts(chars: int | None = None, kjv: bool = True) -> dict[str, str]:
    """The pre-training books (the first `chars` characters of each, when given)."""
    texts = {name: corpora.book(name) for name in TRAIN_BOOKS}
    if kjv:
        texts["kjv_bible[:90%]"] = _kjv_split()[0]
    return {name: text[:chars] for name, text in texts.items()}


def write_data(cfg: AblationConfig, base: Path) -> tuple[Path, Path]:
    """The extension's training text and the held-out evaluation folder; written once. With --context_mix the
    training text is the pre-training mix at the target length (natural text, passkey documents and repeated
    passages of L to 4L tokens, tokenized by `base`'s tokenizer).

    The extension reads the first `extend_chars` characters of each training book (about 3x the tokens its steps
    consume), so that every run does not re-tokenize 8 MB of text; it is text the base was pre-trained on.
    """
    out = Path(cfg.output_dir)
    kjv = cfg.pretrain_books == "austen+kjv"
    tag = f"{cfg.pretrain_books.replace('+', '-')}-"
    train_dir, eval_dir = out / f"extend-{tag}{cfg.extend_chars}", out / f"held-out-{tag}{cfg.eval_tokens}"
    if cfg.context_mix:  # the pre-training mix at the target length: one JSONL of documents
        # keyed by the base too (its folder name hashes its tokenizer's settings and the mix's version)
        train_dir = out / f"extend-mix-{tag}{cfg.extend_chars}-{cfg.long_context}-{cfg.extend_steps}-{base.name}.jsonl"
    if cfg.context_mix and not train_dir.exists():
        from transformers import AutoTokenizer

        from experiments.context_tasks import write_mix

        books = list(train_texts(cfg.extend_chars, kjv).values())
        rows = 2 * cfg.extend_steps * 8  # twice what the steps read
        write_mix(train_dir, AutoTokenizer.from_pretrained(base), books, rows, cfg.long_context, cfg.short_context)
    elif not train_dir.exists():
        for name, text in train_texts(cfg.extend_chars, kjv).items():
            write_text_atomic(train_dir / f"{name.replace('[:90%]', '_head')}.txt", text)
    if not eval_dir.exists():
        chars = 4 * cfg.eval_tokens  # more than enough: the stream is cut at eval_tokens tokens
        write_text_atomic(eval_dir / "1_persuasion.txt", corpora.book("austen_persuasion")[: chars // (1 + kjv)])
        if kjv:
            write_text_atomic(eval_dir / "2_kjv_tail.txt", _kjv_split()[1][: chars // 2])
    return train_dir, eval_dir
