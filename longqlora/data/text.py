"""Long text for continued pre-training: documents, tokenization, packing choice, atomic saving.

The output is what TRL 1.16's `SFTTrainer` takes as is: a tokenized `input_ids` dataset (TRL skips its own
tokenization then). Conversations live in instructions.py, file reading in sources.py. Packing is TRL's
(`trl.data_utils.pack_dataset`), chosen by `--pack`:

* "documents" -> `packing_strategy="bfd_split"` (default): best-fit-decreasing bins that keep documents apart; each
  packed row carries `seq_lengths`, from which TRL's collator builds `position_ids` restarting at 0 per document.
  No token attends across documents, and positions are true distances inside one text. A document longer than the
  row is split into row-sized pieces, each its own sequence.
* "concat" -> `packing_strategy="wrapped"` (LongLoRA's way): everything joined and cut into full rows, so tokens
  attend across unrelated documents. `full_rows` joins the whole dataset first and drops the remainder shorter
  than a row (as LongLoRA and transformers' run_clm do): TRL wraps each map batch of 1000 documents on its own,
  which would leave one short padded row per batch.

A `save_to_disk` folder written by data_prep/prepare_text.py (an `input_ids` column, no text) trains as it is:
`load_training_text` and `prepare_training_text` take its token rows where they take documents, and TRL skips its
own tokenization for an `input_ids` column. Its stats.json records the tokenizer (`prepared.tokenizer_record`), and
a model whose tokenizer differs is refused.

Every error is one line naming the flag and the fix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import datasets
import numpy as np
import pyarrow.compute as pc

from longqlora.data.formats import json_kind
from longqlora.data.prepared import PREPARE, check_tokenizer, max_id
from longqlora.data.sources import (
    EVAL_SPLIT_HELP,
    Source,
    bad,
    check_num_proc,
    column,
    fields,
    flag,
    load_raw,
    resolve,
    where,
)

logger = logging.getLogger(__name__)

PACKING = {"documents": "bfd_split", "concat": "wrapped"}
INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


@dataclass
class TextDataConfig:
    """Plain-text documents for language modeling; the fields become flags through HfArgumentParser."""

    dataset: str = flag(
        "A .txt/.txt.gz file (one document), a directory of them (one document each), a "
        ".jsonl/.json(.gz) or .parquet file, a save_to_disk directory, a bundled book (austen_emma, kjv_bible, "
        "... as --haystack lists them) or a hub dataset name."
    )
    text_field: str = flag("Field holding the text in json/parquet/hub data.", default="text")
    split: str = flag("Split of a save_to_disk DatasetDict or of a hub dataset.", default="train")
    pack: str = flag(
        "documents: TRL bfd_split, no attention across documents; concat: TRL wrapped (LongLoRA).", default="documents"
    )  # not `packing`: SFTConfig's --packing shares the recipes' parser
    min_length: int = flag("Drop documents shorter than this many tokens.", default=0)
    num_proc: int | None = flag("Processes for loading and tokenizing.", default=None)
    max_documents: int | None = flag("Keep only the first N documents.", default=None)
    eval_dataset: str | None = flag(
        "Held-out text in any --dataset form, read and packed as --dataset is (--min_length, --max_documents too): "
        "its loss is logged every --eval_steps (default --save_steps) at the full context, with full attention."
        " Recipes only: data_prep prepares held-out data in a run of its own.",
        default=None,
    )
    eval_split: str | None = flag(EVAL_SPLIT_HELP, default=None)

    def __post_init__(self):
        if not self.dataset.strip():
            bad("dataset", self.dataset, "pass a file, a directory or a hub dataset name")
        if not self.text_field:
            bad("text_field", self.text_field, "pass the name of the field that holds the text, e.g. text")
        if self.pack not in PACKING:
            bad("pack", self.pack, f"must be one of {', '.join(PACKING)}")
        if self.min_length < 0:
            bad("min_length", self.min_length, "must be 0 (keep all) or a positive number of tokens")
        if self.max_documents is not None and self.max_documents < 1:
            bad("max_documents", self.max_documents, "must be at least 1, or left unset for all")
        check_num_proc(self.num_proc)


def _select_text(ds: datasets.Dataset, src: Source, text_field: str) -> datasets.Dataset:
    """Only the text, as column `text`; a record without it is an error naming the record and its fields."""
    flag = f"--text_field {text_field}"
    if src.kind in ("txt", "txtdir"):
        return ds
    if text_field not in ds.column_names and "input_ids" in ds.column_names:
        raise ValueError(f"--dataset {src.name}: holds token ids (input_ids), not text; pass the text it came from")
    if text_field not in ds.column_names:
        raise ValueError(
            f"{flag}: {where(src, 0)} has no '{text_field}' field (fields: {fields(ds[0])}); pass --text_field"
        )
    dtype = getattr(ds.features[text_field], "dtype", None)
    if dtype not in ("string", "large_string"):  # the first record whose value is not text, in plain words
        i = next((i for i, v in enumerate(ds[text_field]) if not isinstance(v, str | None)), 0)
        raise ValueError(
            f"{flag}: {where(src, i)}: '{text_field}' is {json_kind(ds[i][text_field])}, not text; pass --text_field "
            "naming the field that holds the documents"
        )
    missing = np.flatnonzero(column(ds, text_field).is_null().to_numpy(zero_copy_only=False))
    if len(missing):
        i = int(missing[0])
        raise ValueError(
            f"{flag}: {where(src, i)} has no '{text_field}' field (fields: {fields(ds[i])}); "
            f"pass --text_field ({len(missing)} of {len(ds)} records lack it)"
        )
    ds = ds.select_columns([text_field])
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


def load_documents(cfg: TextDataConfig) -> datasets.Dataset:
    """Load `cfg.dataset` as a Dataset with one `text` column, one row per document; empty documents are dropped."""
    src = resolve(cfg.dataset)
    return _documents(load_raw(src, cfg.split, cfg.num_proc), src, cfg)


def _keep_first(ds: datasets.Dataset, cfg: TextDataConfig, what: str) -> datasets.Dataset:
    if cfg.max_documents is not None and cfg.max_documents < len(ds):
        logger.info("keeping the first %d of %d %s (--max_documents)", cfg.max_documents, len(ds), what)
        ds = ds.select(range(cfg.max_documents))
    logger.info("loaded %d %s from %s", len(ds), what, cfg.dataset)
    return ds


def _documents(ds: datasets.Dataset, src: Source, cfg: TextDataConfig) -> datasets.Dataset:
    if not len(ds):
        raise ValueError(f"--dataset {cfg.dataset} holds no documents")
    ds = _select_text(ds, src, cfg.text_field)
    n = len(ds)
    ds = ds.filter(
        lambda texts: [bool(t.strip()) for t in texts],
        input_columns="text",
        batched=True,
        num_proc=cfg.num_proc,
        desc="Dropping empty documents",
    )
    if len(ds) < n:
        logger.warning("dropped %d empty documents of %d in %s", n - len(ds), n, cfg.dataset)
    if not len(ds):
        raise ValueError(f"--dataset {cfg.dataset} holds no documents")
    return _keep_first(ds, cfg, "documents")


def load_training_text(cfg: TextDataConfig, vocab_size: int | None = None) -> datasets.Dataset:
    """What a recipe trains on, read and checked before any weights load: `load_documents`'s `text` column or, for
    a save_to_disk folder with an `input_ids` column and no `--text_field` column (prepare_text.py's), its token
    rows, each below `vocab_size` (the model's embedding rows) when given."""
    src = resolve(cfg.dataset)
    ds = load_raw(src, cfg.split, cfg.num_proc)
    if src.kind == "disk" and "input_ids" in ds.column_names and cfg.text_field not in ds.column_names:
        return _token_rows(ds, cfg, vocab_size)
    return _documents(ds, src, cfg)


def _lengths(ds: datasets.Dataset) -> np.ndarray:
    return pc.list_value_length(column(ds, "input_ids")).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


def _token_rows(ds: datasets.Dataset, cfg: TextDataConfig, vocab_size: int | None) -> datasets.Dataset:
    """prepare_text.py's rows, kept as they are (each document and its EOS): lists of integer ids, empty rows
    dropped and --max_documents applied as for documents, no id beyond the model's `vocab_size`."""
    flag = f"--dataset {cfg.dataset}"
    feature = ds.features["input_ids"]
    if getattr(getattr(feature, "feature", None), "dtype", None) not in INT_DTYPES:
        raise ValueError(f"{flag}: its input_ids column holds {feature}, not lists of token ids; {PREPARE}")
    unused = [c for c in ds.column_names if c != "input_ids"]
    if unused:  # the text path trains on every token of a document: no labels or masks of someone else's
        logger.warning("%s: training on its input_ids only; not using %s", flag, ", ".join(unused))
        ds = ds.select_columns(["input_ids"])
    lengths = _lengths(ds)
    if not lengths.any():
        raise ValueError(f"{flag} holds no documents")
    if not lengths.all():
        logger.warning("dropped %d empty rows of %d in %s", int((lengths == 0).sum()), len(lengths), cfg.dataset)
        ds = ds.select(np.flatnonzero(lengths))
    ds = _keep_first(ds, cfg, "tokenized documents")
    high = max_id(ds, flag)
    if vocab_size is not None and high >= vocab_size:
        raise ValueError(
            f"{flag}: holds token id {high}, beyond the model's {vocab_size} embeddings: tokenized with another "
            f"tokenizer; {PREPARE} with the model's --tokenizer"
        )
    return ds


# Documents per tokenizer call and per written Arrow batch: the tokenizer's Python lists cost ~150 bytes a token, so
# datasets' default 1000 book-length documents (~100M tokens) would hold ~15 GB per process.
TOKENIZE_BATCH = 16


def _tokenize_batch(batch, tokenizer, eos_id: int | None):
    # with the tokenizer's special tokens (Llama: <s>), as TRL does
    ids = tokenizer(batch["text"], return_attention_mask=False)["input_ids"]
    if eos_id is not None:
        ids = [x if x and x[-1] == eos_id else x + [eos_id] for x in ids]
    return {"input_ids": ids, "length": [len(x) for x in ids]}


def length_stats(lengths: np.ndarray) -> dict:
    return {
        "length_min": int(lengths.min()),
        "length_median": float(np.median(lengths)),
        "length_max": int(lengths.max()),
    }


def tokenize_documents(ds: datasets.Dataset, tokenizer, cfg: TextDataConfig, *, add_eos: bool = True):
    """Tokenize the `text` column into `input_ids` (+ EOS so packed documents stay separated), drop documents under
    `cfg.min_length` tokens, and return (dataset, stats). No truncation: TRL's packing splits or cuts long ones."""
    eos_id = tokenizer.eos_token_id if add_eos else None
    if add_eos and eos_id is None:
        raise ValueError("--tokenizer has no eos_token, so documents could not be separated; set one")
    features = datasets.Features(
        {"input_ids": datasets.List(datasets.Value("int32")), "length": datasets.Value("int64")}
    )
    ds = ds.map(
        _tokenize_batch,
        batched=True,
        batch_size=TOKENIZE_BATCH,
        writer_batch_size=TOKENIZE_BATCH,
        num_proc=cfg.num_proc,
        remove_columns=ds.column_names,
        features=features,
        fn_kwargs={"tokenizer": tokenizer, "eos_id": eos_id},
        desc="Tokenizing documents",
    )
    lengths = column(ds, "length").to_numpy().astype(np.int64)
    ds, stats = _keep_long_enough(ds, lengths, cfg, add_eos)
    return ds.remove_columns("length"), stats


def _keep_long_enough(ds: datasets.Dataset, lengths: np.ndarray, cfg: TextDataConfig, eos_appended) -> tuple:
    """Drop the documents under `cfg.min_length` tokens (`lengths`: of each row of `ds`) and count the rest."""
    keep = lengths >= cfg.min_length
    if not keep.any():
        raise ValueError(
            f"--min_length {cfg.min_length} drops all {len(lengths)} documents of --dataset "
            f"{cfg.dataset} (longest: {lengths.max()} tokens); lower --min_length"
        )
    if not keep.all():
        ds = ds.select(np.flatnonzero(keep))
        logger.warning(
            "dropped %d of %d documents shorter than --min_length %d tokens",
            int((~keep).sum()),
            len(lengths),
            cfg.min_length,
        )
    kept = lengths[keep]
    stats = {
        "dataset": cfg.dataset,
        "documents_in": len(lengths),
        "documents_out": int(keep.sum()),
        "dropped_short": int((~keep).sum()),
        "min_length": cfg.min_length,
        "tokens_total": int(kept.sum()),
        "tokens_dropped": int(lengths[~keep].sum()),
        **length_stats(kept),
        "eos_appended": eos_appended,
        "pack": cfg.pack,
        "packing_strategy": packing_strategy(cfg.pack),
    }
    logger.info(
        "%d documents, %d tokens (median %.0f, max %d per document)",
        stats["documents_out"],
        stats["tokens_total"],
        stats["length_median"],
        stats["length_max"],
    )
    return ds, stats


def prepare_training_text(
    loaded: datasets.Dataset, tokenizer, cfg: TextDataConfig, max_length: int, prepared: dict | None = None
) -> tuple:
    """The rows SFTTrainer packs, and their statistics, from what `load_training_text` returned: documents are
    tokenized; prepared token rows are checked against the model's `tokenizer` (unless `prepared`, what
    `check_tokenizer` returned for them, says they were) and kept as they are (TRL's packing
    splits a row longer than `max_length`, as it does a long document). Then `--min_length`, at least one full row,
    and `--pack concat`'s full rows, the same for both."""
    if "input_ids" not in loaded.column_names:
        tokenized, stats = tokenize_documents(loaded, tokenizer, cfg)
    else:
        prepared = check_tokenizer(cfg, tokenizer, loaded) if prepared is None else prepared
        if prepared.get("pack", cfg.pack) != cfg.pack:  # prepare_text records it, but the rows do not depend on it
            logger.warning(
                "--dataset %s was prepared with --pack %s (its stats.json); this run packs --pack %s: pass --pack "
                "%s to train as prepared",
                cfg.dataset,
                prepared["pack"],
                cfg.pack,
                prepared["pack"],
            )
        tokenized, stats = _keep_long_enough(loaded, _lengths(loaded), cfg, prepared.get("eos_appended"))
        stats.update(prepared=True, **{k: v for k, v in prepared.items() if k.startswith("tokenizer")})
    check_packable(stats, max_length)
    if cfg.pack == "concat":
        tokenized, stats = full_rows(tokenized, stats, max_length)
    return tokenized, stats


def full_rows(ds: datasets.Dataset, stats: dict, max_length: int) -> tuple[datasets.Dataset, dict]:
    """`--pack concat`: the tokenized documents joined into one stream and cut into rows of exactly `max_length`
    tokens; the remainder (under one row) is dropped. TRL's "wrapped" packing, applied to the whole dataset as one
    map batch: per batch of 1000 documents (its default) every batch would end in a short row, which the collator
    pads, costing compute and refused by LongLoRA's rolled shift mid-training. TRL's own packing of these rows
    then leaves them as they are. Holds the token ids in memory once (4 bytes per token), and only there: a cache
    file of the rows would be written beside a prepared dataset's own files, once per row length."""
    from trl.data_utils import pack_dataset

    if (total := stats.get("tokens_total", 0)) >= 2**31:  # one Arrow list of int32 offsets holds the whole stream
        raise ValueError(
            f"--pack concat: {total:,} tokens are over the 2,147,483,647 that one joined stream holds; "
            "use --pack documents (the default), or split --dataset into parts and train on one at a time"
        )
    rows = pack_dataset(ds, max_length, strategy="wrapped", map_kwargs={"batch_size": None, "keep_in_memory": True})
    n = len(rows)
    last = len(rows[n - 1]["input_ids"]) if n else 0
    if last < max_length:
        rows = rows.select(range(n - 1))
    dropped = last if last < max_length else 0
    stats = {**stats, "rows": len(rows), "tokens_dropped_remainder": dropped}
    if dropped:
        logger.info(
            "--pack concat: %d rows of %d tokens; the last %d tokens (less than a row) are not trained on",
            len(rows),
            max_length,
            dropped,
        )
    return rows, stats


def check_packable(stats: dict, max_length: int, dataset: str = "") -> None:
    """Raise if the documents cannot fill even one packed row of `max_length` tokens."""
    if stats["tokens_total"] < max_length:
        raise ValueError(
            f"--dataset {dataset or stats.get('dataset', '(text)')} holds {stats['tokens_total']} tokens, fewer "
            f"than one row of {max_length} (--target_context, --pose_window with PoSE; data_prep's --max_length); "
            "add text or lower it"
        )


def packing_strategy(packing: str) -> str:
    """TRL's `SFTConfig.packing_strategy` for our `--pack`: documents -> bfd_split, concat -> wrapped."""
    if packing not in PACKING:
        bad("pack", packing, f"must be one of {', '.join(PACKING)}")
    return PACKING[packing]
