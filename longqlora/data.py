"""Training data for long-context fine-tuning: plain text for language modeling, conversations for instructions.

The output is what TRL 1.16's `SFTTrainer` takes as is: a tokenized `input_ids` dataset (text; TRL skips its own
tokenization then) or a `messages` dataset (conversations; TRL renders them with the chat template and, with
`assistant_only_loss=True`, trains only the assistant tokens). Packing is TRL's (`trl.data_utils.pack_dataset`),
chosen by `--pack`:

* "documents" -> `packing_strategy="bfd_split"` (default): best-fit-decreasing bins that keep documents apart; each
  packed row carries `seq_lengths`, from which TRL's collator builds `position_ids` restarting at 0 per document.
  No token attends across documents, and positions are true distances inside one text. A document longer than the
  row is split into row-sized pieces, each its own sequence.
* "concat" -> `packing_strategy="wrapped"` (LongLoRA's way): everything joined and cut into full rows, so tokens
  attend across unrelated documents.

Every error is one line naming the flag and the fix.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np

from longqlora.chat_template import FORMATS, conversation_problem, detect_format, to_messages
from longqlora.report import write_json_atomic

logger = logging.getLogger(__name__)

PACKING = {"documents": "bfd_split", "concat": "wrapped"}
OVERLONG = ("truncate", "drop")
INVALID = ("skip", "error")
TEXT_SUFFIXES = (".txt", ".txt.gz")
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
FILE_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + (".parquet",)
DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
MESSAGES = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})


def _bad(flag: str, value, fix: str):
    raise ValueError(f"--{flag} {value!r}: {fix}")


def _flag(help: str, **default):
    """A dataclass field that HfArgumentParser turns into a flag with this help; required without a default."""
    return field(metadata={"help": help}, **default)


def _check_num_proc(num_proc: int | None) -> None:
    if num_proc is not None and num_proc < 1:
        _bad("num_proc", num_proc, "must be at least 1, or left unset")


@dataclass
class TextDataConfig:
    """Plain-text documents for language modeling; the fields become flags through HfArgumentParser."""

    dataset: str = _flag("A .txt/.txt.gz file (one document), a directory of them (one document each), a "
                         ".jsonl/.json(.gz) or .parquet file, a save_to_disk directory, or a hub dataset name.")
    text_field: str = _flag("Field holding the text in json/parquet/hub data.", default="text")
    split: str = _flag("Split of a save_to_disk DatasetDict or of a hub dataset.", default="train")
    pack: str = _flag("documents: TRL bfd_split, no attention across documents; concat: TRL wrapped (LongLoRA).",
                      default="documents")  # not `packing`: SFTConfig's --packing shares the recipes' parser
    min_length: int = _flag("Drop documents shorter than this many tokens.", default=0)
    num_proc: int | None = _flag("Processes for loading and tokenizing.", default=None)
    max_documents: int | None = _flag("Keep only the first N documents.", default=None)

    def __post_init__(self):
        if not self.dataset.strip():
            _bad("dataset", self.dataset, "pass a file, a directory or a hub dataset name")
        if not self.text_field:
            _bad("text_field", self.text_field, "pass the name of the field that holds the text, e.g. text")
        if self.pack not in PACKING:
            _bad("pack", self.pack, f"must be one of {', '.join(PACKING)}")
        if self.min_length < 0:
            _bad("min_length", self.min_length, "must be 0 (keep all) or a positive number of tokens")
        if self.max_documents is not None and self.max_documents < 1:
            _bad("max_documents", self.max_documents, "must be at least 1, or left unset for all")
        _check_num_proc(self.num_proc)

    @property
    def packing(self) -> str:
        return self.pack


@dataclass
class InstructionDataConfig:
    """Conversations for instruction tuning; the fields become flags through HfArgumentParser. The length limit is
    not a field (it would clash with SFTConfig's --max_length in the recipes' parser): pass it to `length_report`."""

    dataset: str = _flag("A .jsonl/.json(.gz) or .parquet file, a save_to_disk directory or a hub name holding "
                         "LongAlpaca, LongQLoRA, ShareGPT or role/content messages records.")
    split: str = _flag("Split of a save_to_disk DatasetDict or of a hub dataset.", default="train")
    overlong: str = _flag("Conversations over the length limit: truncate (kept; TRL cuts them) or drop.",
                          default="truncate")
    system_prompt: str | None = _flag("System message for conversations without one; unset: the chat "
                                      "template's default.", default=None)
    invalid_conversations: str = _flag("Conversations that do not alternate user/assistant ending with the "
                                       "assistant: skip (counted) or error.", default="skip")
    num_proc: int | None = _flag("Processes for loading and tokenizing.", default=None)

    def __post_init__(self):
        if not self.dataset.strip():
            _bad("dataset", self.dataset, "pass a file, a directory or a hub dataset name")
        if self.overlong not in OVERLONG:
            _bad("overlong", self.overlong, f"must be one of {', '.join(OVERLONG)}")
        if self.invalid_conversations not in INVALID:
            _bad("invalid_conversations", self.invalid_conversations, f"must be one of {', '.join(INVALID)}")
        _check_num_proc(self.num_proc)


@dataclass(frozen=True)
class _Source:
    name: str  # as the user wrote it, for messages
    path: str  # expanded
    kind: str  # txt, txtdir, json, parquet, disk or hub


def _resolve(name: str) -> _Source:
    """Which loader `--dataset name` needs; a missing local path is an error, anything else may be a hub name."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, m)) for m in DISK_MARKERS):
            return _Source(name, path, "disk")
        return _Source(name, path, "txtdir")
    if os.path.isfile(path):
        if path.endswith(TEXT_SUFFIXES):
            return _Source(name, path, "txt")
        if path.endswith(JSON_SUFFIXES):
            return _Source(name, path, "json")
        if path.endswith(".parquet"):
            return _Source(name, path, "parquet")
        raise ValueError(f"--dataset {name}: unsupported file type; use {', '.join(FILE_SUFFIXES)} or a directory")
    if name.startswith(("/", ".", "~")) or name.endswith(FILE_SUFFIXES) or name.count("/") > 1:
        raise ValueError(f"--dataset {name}: no such file or directory")
    return _Source(name, name, "hub")


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def _is_json_array(path: str) -> bool:
    with _open_text(path) as f:
        return f.read(4096).lstrip().startswith("[")


def _is_blank(path: str) -> bool:
    with _open_text(path) as f:
        return not any(line.strip() for line in f)


def _json_problem(path: str) -> str | None:
    """Where and why a JSON/JSONL file does not parse ("line 17: not valid JSON (...)"), or None if it does.

    datasets' own error names neither line nor cause, so on failure we read the file once more ourselves."""
    if _is_json_array(path):
        try:
            with _open_text(path) as f:
                records = json.load(f)
        except json.JSONDecodeError as e:
            return f"line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})"
        bad = [i for i, r in enumerate(records) if not isinstance(r, dict)]
        return f"record {bad[0] + 1}: not a JSON object" if bad else None
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {lineno}: not valid JSON ({e.msg} at column {e.colno})"
            if not isinstance(record, dict):
                return f"line {lineno}: not a JSON object (found {type(record).__name__})"
    return None


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _load_raw(src: _Source, split: str, num_proc: int | None) -> datasets.Dataset:
    """The source as a datasets.Dataset (cached by datasets under HF_DATASETS_CACHE for files)."""
    if src.kind == "disk":
        loaded = datasets.load_from_disk(src.path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"--split {split}: {src.name} has splits {', '.join(loaded)}; pass --split")
            loaded = loaded[split]
        return loaded
    if src.kind == "hub":
        try:
            return datasets.load_dataset(src.path, split=split, num_proc=num_proc)
        except Exception as e:  # no network, no such dataset, no such split: all end the same way
            raise ValueError(f"--dataset {src.name}: not a local file or directory, and loading it from the Hugging "
                             f"Face hub failed ({_root_cause(e)}); pass a local file or directory") from None
    if src.kind in ("txt", "txtdir"):
        files = [src.path] if src.kind == "txt" else sorted(
            str(p) for p in Path(src.path).rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise ValueError(f"--dataset {src.name}: the directory holds no {'/'.join(TEXT_SUFFIXES)} files and is "
                             "not a save_to_disk dataset")
        return datasets.load_dataset("text", data_files=files, sample_by="document", split="train",
                                     num_proc=num_proc)
    builder = "parquet" if src.kind == "parquet" else "json"
    try:
        return datasets.load_dataset(builder, data_files=src.path, split="train", num_proc=num_proc)
    except Exception as e:
        if builder == "json" and _is_blank(src.path):
            return datasets.Dataset.from_dict({})  # datasets fails on it with a bare StopIteration
        problem = _json_problem(src.path) if builder == "json" else None
        if problem:
            raise ValueError(f"--dataset {src.name} {problem}") from None
        raise ValueError(f"--dataset {src.name}: datasets could not load it ({_root_cause(e)})") from None


def _where(src: _Source, index: int) -> str:
    """A record's place for messages: 'data.jsonl line 17' for JSON lines, else 'data.parquet record 18'."""
    if src.kind == "json" and not _is_json_array(src.path):
        with _open_text(src.path) as f:
            seen = 0
            for lineno, line in enumerate(f, start=1):
                seen += bool(line.strip())  # datasets skips blank lines, so row i is the (i+1)-th non-blank one
                if seen == index + 1:
                    return f"{src.name} line {lineno}"
    return f"{src.name} record {index + 1}"


def _column(ds: datasets.Dataset, name: str):
    """A whole column as Arrow, for numpy; iterating a datasets Column row by row is ~1000x slower."""
    return ds.with_format("arrow", columns=[name])[:][name]


def _fields(row: dict) -> str:
    return ", ".join(k for k, v in row.items() if v is not None) or "none"


def _select_text(ds: datasets.Dataset, src: _Source, text_field: str) -> datasets.Dataset:
    """Only the text, as column `text`; a record without it is an error naming the record and its fields."""
    flag = f"--text_field {text_field}"
    if src.kind in ("txt", "txtdir"):
        return ds
    if text_field not in ds.column_names:
        raise ValueError(f"{flag}: {_where(src, 0)} has no '{text_field}' field (fields: {_fields(ds[0])}); "
                         "pass --text_field")
    dtype = getattr(ds.features[text_field], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise ValueError(f"{flag}: the field holds {ds.features[text_field]}, not text; pass --text_field")
    missing = np.flatnonzero(_column(ds, text_field).is_null().to_numpy(zero_copy_only=False))
    if len(missing):
        i = int(missing[0])
        raise ValueError(f"{flag}: {_where(src, i)} has no '{text_field}' field (fields: {_fields(ds[i])}); "
                         f"pass --text_field ({len(missing)} of {len(ds)} records lack it)")
    ds = ds.select_columns([text_field])
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


def load_documents(cfg: TextDataConfig) -> datasets.Dataset:
    """Load `cfg.dataset` as a Dataset with one `text` column, one row per document; empty documents are dropped."""
    src = _resolve(cfg.dataset)
    ds = _load_raw(src, cfg.split, cfg.num_proc)
    if not len(ds):
        raise ValueError(f"--dataset {cfg.dataset} holds no documents")
    ds = _select_text(ds, src, cfg.text_field)
    n = len(ds)
    ds = ds.filter(lambda texts: [bool(t.strip()) for t in texts], input_columns="text", batched=True,
                   num_proc=cfg.num_proc, desc="Dropping empty documents")
    if len(ds) < n:
        logger.warning("dropped %d empty documents of %d in %s", n - len(ds), n, cfg.dataset)
    if not len(ds):
        raise ValueError(f"--dataset {cfg.dataset} holds no documents")
    if cfg.max_documents is not None and cfg.max_documents < len(ds):
        logger.info("keeping the first %d of %d documents (--max_documents)", cfg.max_documents, len(ds))
        ds = ds.select(range(cfg.max_documents))
    logger.info("loaded %d documents from %s", len(ds), cfg.dataset)
    return ds


def _tokenize_batch(batch, tokenizer, eos_id: int | None):
    ids = tokenizer(batch["text"])["input_ids"]  # with the tokenizer's special tokens (Llama: <s>), as TRL does
    if eos_id is not None:
        ids = [x if x and x[-1] == eos_id else x + [eos_id] for x in ids]
    return {"input_ids": ids, "length": [len(x) for x in ids]}


def _length_stats(lengths: np.ndarray) -> dict:
    return {"length_min": int(lengths.min()), "length_median": float(np.median(lengths)),
            "length_max": int(lengths.max())}


def tokenize_documents(ds: datasets.Dataset, tokenizer, cfg: TextDataConfig, *, add_eos: bool = True):
    """Tokenize the `text` column into `input_ids` (+ EOS so packed documents stay separated), drop documents under
    `cfg.min_length` tokens, and return (dataset, stats). No truncation: TRL's packing splits or cuts long ones."""
    eos_id = tokenizer.eos_token_id if add_eos else None
    if add_eos and eos_id is None:
        raise ValueError("--tokenizer has no eos_token, so documents could not be separated; set one")
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                                  "length": datasets.Value("int64")})
    ds = ds.map(_tokenize_batch, batched=True, num_proc=cfg.num_proc, remove_columns=ds.column_names,
                features=features, fn_kwargs={"tokenizer": tokenizer, "eos_id": eos_id}, desc="Tokenizing documents")
    lengths = _column(ds, "length").to_numpy().astype(np.int64)
    keep = lengths >= cfg.min_length
    if not keep.any():
        raise ValueError(f"--min_length {cfg.min_length} drops all {len(lengths)} documents of --dataset "
                         f"{cfg.dataset} (longest: {lengths.max()} tokens); lower --min_length")
    if not keep.all():
        ds = ds.filter(lambda n: [x >= cfg.min_length for x in n], input_columns="length", batched=True,
                       num_proc=cfg.num_proc, desc=f"Dropping documents under {cfg.min_length} tokens")
        logger.warning("dropped %d of %d documents shorter than --min_length %d tokens",
                       int((~keep).sum()), len(lengths), cfg.min_length)
    kept = lengths[keep]
    stats = {"dataset": cfg.dataset, "documents_in": len(lengths), "documents_out": int(keep.sum()), "dropped_short": int((~keep).sum()),
             "min_length": cfg.min_length, "tokens_total": int(kept.sum()),
             "tokens_dropped": int(lengths[~keep].sum()), **_length_stats(kept), "eos_appended": add_eos,
             "pack": cfg.pack, "packing_strategy": packing_strategy(cfg.pack)}
    logger.info("%d documents, %d tokens (median %.0f, max %d per document)", stats["documents_out"],
                stats["tokens_total"], stats["length_median"], stats["length_max"])
    return ds.remove_columns("length"), stats


def check_packable(stats: dict, max_length: int, dataset: str = "") -> None:
    """Raise if the documents cannot fill even one packed row of `max_length` tokens."""
    if stats["tokens_total"] < max_length:
        raise ValueError(f"--dataset {dataset or stats.get('dataset', '(text)')} holds {stats['tokens_total']} tokens, fewer than one row "
                         f"of --max_length {max_length}; add text or lower --target_context")


def packing_strategy(packing: str) -> str:
    """TRL's `SFTConfig.packing_strategy` for our `--pack`: documents -> bfd_split, concat -> wrapped."""
    if packing not in PACKING:
        _bad("pack", packing, f"must be one of {', '.join(PACKING)}")
    return PACKING[packing]


def _convert_row(row: dict, system_prompt: str | None) -> dict:
    fmt = detect_format(row)
    messages = to_messages(row, fmt, system_prompt) if fmt else []
    return {"messages": messages, "_format": fmt, "_problem": conversation_problem(messages) if fmt else ""}


def _check_formats(ds: datasets.Dataset, raw: datasets.Dataset, src: _Source) -> str:
    """The file's one format; an unknown or mixed record is an error naming its place and keys."""
    formats = _column(ds, "_format").to_numpy(zero_copy_only=False)
    known = ", ".join(f"{n} ({'+'.join(k)})" for n, k in FORMATS.items())
    if formats[0] == "":
        raise ValueError(f"--dataset {_where(src, 0)}: unknown format, keys: {_fields(raw[0])}; expected {known}")
    other = np.flatnonzero(formats != formats[0])
    if len(other):
        i = int(other[0])
        raise ValueError(f"--dataset {_where(src, i)}: {formats[i] or 'unknown'} format (keys: {_fields(raw[i])}) "
                         f"in a {formats[0]} file ({len(other)} such records); use one format")
    return str(formats[0])


def load_conversations(cfg: InstructionDataConfig, stats: dict | None = None) -> datasets.Dataset:
    """Load `cfg.dataset` as a Dataset with one `messages` column of role/content turns, format auto-detected.

    Conversations must alternate user/assistant (after an optional system message) and end with the assistant;
    others are skipped and counted (logged, and in `stats` if given), or raise with --invalid_conversations error."""
    src = _resolve(cfg.dataset)
    raw = _load_raw(src, cfg.split, cfg.num_proc)
    if not len(raw):
        raise ValueError(f"--dataset {cfg.dataset} holds no conversations")
    features = datasets.Features({"messages": MESSAGES, "_format": datasets.Value("string"),
                                  "_problem": datasets.Value("string")})
    ds = raw.map(_convert_row, remove_columns=raw.column_names, num_proc=cfg.num_proc, features=features,
                 fn_kwargs={"system_prompt": cfg.system_prompt}, desc="Converting to messages")
    fmt = _check_formats(ds, raw, src)
    problems = _column(ds, "_problem").to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(problems != "")
    if len(bad):
        first = f"{_where(src, int(bad[0]))}: {problems[bad[0]]}"
        if cfg.invalid_conversations == "error":
            raise ValueError(f"--dataset {first}; fix it or pass --invalid_conversations skip")
        logger.warning("skipped %d of %d conversations that are not user/assistant turns ending with the assistant "
                       "(first: %s)", len(bad), len(ds), first)
        ds = ds.filter(lambda p: [not x for x in p], input_columns="_problem", batched=True, num_proc=cfg.num_proc)
    if not len(ds):
        raise ValueError(f"--dataset {cfg.dataset} holds no valid conversations ({len(bad)} skipped)")
    if stats is not None:
        stats.update(format=fmt, conversations_in=len(raw), skipped_invalid=len(bad), conversations_out=len(ds))
    logger.info("loaded %d %s conversations from %s", len(ds), fmt, cfg.dataset)
    return ds.remove_columns(["_format", "_problem"])


def _chat_lengths(batch, tokenizer, max_length: int, masks: bool):
    out = tokenizer.apply_chat_template(batch["messages"], tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=masks)
    lengths = [len(ids) for ids in out["input_ids"]]
    answered = [1 in m[:max_length] for m in out["assistant_masks"]] if masks else [True] * len(lengths)
    return {"length": lengths, "answer_in_window": answered}


def length_report(ds: datasets.Dataset, tokenizer, max_length: int, overlong: str, num_proc: int | None = None):
    """Token lengths through the chat template, and the `overlong` policy applied; returns (dataset, stats).

    "drop" removes conversations over `max_length`. "truncate" keeps them and TRL cuts them (trl 1.16): without
    packing `SFTTrainer._prepare_dataset` keeps the first max_length tokens (`truncation_mode="keep_start"`, the
    default) and drops examples left with no assistant token; packing "bfd" keeps the first max_length tokens
    (`_pack_bfd(on_seq_length_overflow="truncate")`); "bfd_split" instead splits the overflow into a separate
    sequence without its prompt, so prefer "bfd" or no packing for conversations. `answers_lost` counts overlong
    conversations whose first max_length tokens hold no assistant token (they train nothing under keep_start)."""
    if overlong not in OVERLONG:
        _bad("overlong", overlong, f"must be one of {', '.join(OVERLONG)}")
    if max_length < 1:
        _bad("max_length", max_length, "must be a positive number of tokens, e.g. 8192")
    if not tokenizer.chat_template:
        raise ValueError("--tokenizer has no chat template; call longqlora.chat_template.apply_vicuna_template")
    from trl.chat_template_utils import has_generation_markers

    masks = has_generation_markers(tokenizer.chat_template)
    ds = ds.map(_chat_lengths, batched=True, num_proc=num_proc, desc="Measuring conversations",
                fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "masks": masks})
    lengths = _column(ds, "length").to_numpy().astype(np.int64)
    over = lengths > max_length
    lost = over & ~_column(ds, "answer_in_window").to_numpy(zero_copy_only=False).astype(bool)
    stats = {"count": len(lengths), **_length_stats(lengths), "length_p90": round(float(np.percentile(lengths, 90)), 1),
             "tokens_total": int(lengths.sum()), "max_length": max_length, "over_max_length": int(over.sum()),
             "overlong": overlong, "dropped": 0, "truncated": 0, "answers_lost": 0}
    if overlong == "drop" and over.all():
        raise ValueError(f"--overlong drop removes all {len(lengths)} conversations (shortest: {lengths.min()} "
                         f"tokens); raise --target_context (--max_length) or pass --overlong truncate")
    if overlong == "drop" and over.any():
        ds = ds.filter(lambda n: [x <= max_length for x in n], input_columns="length", batched=True,
                       num_proc=num_proc, desc="Dropping overlong conversations")
        stats["dropped"] = int(over.sum())
        logger.warning("dropped %d of %d conversations over max_length %d tokens (--overlong drop)",
                       stats["dropped"], len(lengths), max_length)
    elif over.any():
        stats.update(truncated=int(over.sum()), answers_lost=int(lost.sum()))
        logger.warning("%d of %d conversations exceed max_length %d tokens; kept, TRL truncates them to their "
                       "first %d tokens (%d then hold no assistant token)", stats["truncated"], len(lengths),
                       max_length, max_length, stats["answers_lost"])
    stats["count_out"] = len(ds)
    return ds.remove_columns(["length", "answer_in_window"]), stats


def check_output_dir(output_dir, overwrite: bool = False) -> Path:
    """Fail early, before any work, if `output_dir` exists and may not be replaced."""
    out = Path(output_dir)
    if out.exists() and not overwrite:
        raise ValueError(f"--output_dir {out}: already exists; pass --overwrite or another directory")
    return out


def save_dataset_atomic(ds: datasets.Dataset, output_dir, files: dict | None = None, overwrite: bool = False):
    """`save_to_disk` into a temporary sibling directory, add `files` ({name: JSON data}), then rename it into place,
    so a killed run never leaves a half-written dataset."""
    out = check_output_dir(output_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # a sibling, so the rename stays on one file system
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ds.save_to_disk(str(tmp))
        for name, data in (files or {}).items():
            write_json_atomic(tmp / name, data)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
