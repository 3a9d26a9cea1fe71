"""Where training data comes from: local text/JSON/Parquet files, save_to_disk folders or hub datasets, read with
the `datasets` library (its cache included), with errors that name the flag, the file and the line."""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets

TEXT_SUFFIXES = (".txt", ".txt.gz")
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
FILE_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + (".parquet",)
DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def bad(flag: str, value, fix: str):
    raise ValueError(f"--{flag} {value!r}: {fix}")


def flag(help: str, **default):
    """A dataclass field that HfArgumentParser turns into a flag with this help; required without a default."""
    return field(metadata={"help": help}, **default)


def check_num_proc(num_proc: int | None) -> None:
    if num_proc is not None and num_proc < 1:
        bad("num_proc", num_proc, "must be at least 1, or left unset")


@dataclass(frozen=True)
class Source:
    name: str  # as the user wrote it, for messages
    path: str  # expanded
    kind: str  # txt, txtdir, json, parquet, disk or hub


def resolve(name: str) -> Source:
    """Which loader `--dataset name` needs; a missing local path is an error, anything else may be a hub name."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, m)) for m in DISK_MARKERS):
            return Source(name, path, "disk")
        return Source(name, path, "txtdir")
    if os.path.isfile(path):
        if path.endswith(TEXT_SUFFIXES):
            return Source(name, path, "txt")
        if path.endswith(JSON_SUFFIXES):
            return Source(name, path, "json")
        if path.endswith(".parquet"):
            return Source(name, path, "parquet")
        raise ValueError(f"--dataset {name}: unsupported file type; use {', '.join(FILE_SUFFIXES)} or a directory")
    if name.startswith(("/", ".", "~")) or name.endswith(FILE_SUFFIXES) or name.count("/") > 1:
        raise ValueError(f"--dataset {name}: no such file or directory")
    return Source(name, name, "hub")


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


def load_raw(src: Source, split: str, num_proc: int | None) -> datasets.Dataset:
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


def where(src: Source, index: int) -> str:
    """A record's place for messages: 'data.jsonl line 17' for JSON lines, else 'data.parquet record 18'."""
    if src.kind == "json" and not _is_json_array(src.path):
        with _open_text(src.path) as f:
            seen = 0
            for lineno, line in enumerate(f, start=1):
                seen += bool(line.strip())  # datasets skips blank lines, so row i is the (i+1)-th non-blank one
                if seen == index + 1:
                    return f"{src.name} line {lineno}"
    return f"{src.name} record {index + 1}"


def column(ds: datasets.Dataset, name: str):
    """A whole column as Arrow, for numpy; iterating a datasets Column row by row is ~1000x slower."""
    return ds.with_format("arrow", columns=[name])[:][name]


def fields(row: dict) -> str:
    return ", ".join(k for k, v in row.items() if v is not None) or "none"


