"""Folders data_prep wrote, read back: their stats.json (`read_stats`), and for prepare_text's token rows whose
tokenizer made them (the record in that stats.json, `tokenizer_record`), checked against the model's before any
weights load."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import datasets
import pyarrow.compute as pc

from longqlora.data.sources import column, origins, resolve

logger = logging.getLogger(__name__)

PREPARE = "re-run data_prep/prepare_text.py"


def max_id(ds: datasets.Dataset, flag: str) -> int:
    """The largest token id in `ds`; a negative one is refused. Arrow, not Python: billions of ids."""
    low, high = pc.min_max(pc.list_flatten(column(ds, "input_ids"))).values()
    if low.as_py() is not None and low.as_py() < 0:
        raise ValueError(f"{flag}: holds the negative token id {low.as_py()}, not a token; {PREPARE}")
    return -1 if high.as_py() is None else high.as_py()


def tokenizer_record(tokenizer) -> dict:
    """What identifies a tokenizer, for a prepared dataset's stats.json: its name, its size and a digest of its
    vocabulary (the size alone cannot tell Llama-2's 32000 tokens from Mistral's)."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "tokenizer_name_or_path": tokenizer.name_or_path,
        "tokenizer_vocab_size": len(tokenizer),
        "tokenizer_vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest()[:16],
        # one vocabulary, other ends: Llama-3's base ends documents with <|end_of_text|>, its Instruct with <|eot_id|>
        "tokenizer_bos_eos": [tokenizer.bos_token_id, tokenizer.eos_token_id],
    }


def check_prepare_flags(cfg) -> None:
    """data_prep's one line for the recipes' held-out flags, which the data configs share with them."""
    for flag in ("eval_dataset", "eval_split"):
        if getattr(cfg, flag):
            raise ValueError(f"--{flag}: prepare held-out data with its own run of this script (--dataset held_out)")


def source_record(cfg) -> dict:
    """What a prepared folder's stats.json says of the data it came from: the name given, its real path and its
    split where it has splits (sources.held_out_split compares them with a run's --eval_dataset)."""
    path, split = (origins(cfg.dataset, cfg.split) or [(None, None)])[0]
    return {"dataset": cfg.dataset, "source_path": path, "source_split": split}


def read_stats(dataset: str) -> dict:
    """The stats.json data_prep wrote into a prepared folder, {} where there is none; one line when it is not
    readable JSON of an object."""
    flag, path = f"--dataset {dataset}", Path(resolve(dataset).path) / "stats.json"
    try:
        stats = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (ValueError, OSError) as err:
        raise ValueError(f"{flag}: cannot read its stats.json ({err}); {PREPARE}") from None
    if not isinstance(stats, dict):
        raise ValueError(f"{flag}: its stats.json holds a {type(stats).__name__}, not prepare_text's; {PREPARE}")
    return stats


def _described(record: list) -> str:
    ends = f", BOS/EOS ids {record[2][0]}/{record[2][1]}" if len(record) > 2 else ""
    return f"{record[0]} tokens, vocabulary {record[1]}{ends}"


def check_tokenizer(cfg, tokenizer, ds: datasets.Dataset) -> dict:
    """Refuse prepared token rows that `tokenizer` (the model's) did not make: the record in their stats.json
    (`tokenizer_record`) must match. Without a record (a folder written otherwise, or by an older prepare_text),
    every id must at least lie below the tokenizer's size. Returns the folder's stats.json, or {}."""
    flag = f"--dataset {cfg.dataset}"
    ours = tokenizer_record(tokenizer)
    fix = f"{PREPARE} with --tokenizer {ours['tokenizer_name_or_path']}"
    prepared = read_stats(cfg.dataset)
    keys = ("tokenizer_vocab_size", "tokenizer_vocab_sha256", "tokenizer_bos_eos")[
        : 2 + ("tokenizer_bos_eos" in prepared)
    ]
    if all(k in prepared for k in keys):
        theirs = [prepared[k] for k in keys]
        if theirs != [ours[k] for k in keys]:
            raise ValueError(
                f"{flag}: tokenized by {prepared.get('tokenizer_name_or_path')} ({_described(theirs)}), not by the "
                f"model's tokenizer ({_described([ours[k] for k in keys])}); {fix}"
            )
        return prepared
    high = max_id(ds, flag)
    if high >= len(tokenizer):
        raise ValueError(
            f"{flag}: holds token id {high}, beyond the model's tokenizer of {len(tokenizer)} tokens: tokenized "
            f"with another tokenizer; {fix}"
        )
    logger.warning(
        "%s: its stats.json records no tokenizer, so whether these are the model's tokens is unchecked", flag
    )
    return prepared
