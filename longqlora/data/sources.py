"""Where training data comes from: local text/JSON/Parquet files, save_to_disk folders or hub datasets, read with
the `datasets` library (its cache included), with errors that name the flag, the file and the line."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from longqlora.data import corpora

logger = logging.getLogger(__name__)

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


def _saved_dataset(path: str) -> bool:
    """Whether the folder `path` holds a datasets `save_to_disk` dataset (or dataset dict)."""
    return any(os.path.exists(os.path.join(path, m)) for m in DISK_MARKERS)


def resolve(name: str) -> Source:
    """Which loader `--dataset name` needs; a missing local path is an error, anything else may be a hub name."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return Source(name, path, "disk" if _saved_dataset(path) else "txtdir")
    if os.path.isfile(path):
        if path.endswith(TEXT_SUFFIXES):
            return Source(name, path, "txt")
        if path.endswith(JSON_SUFFIXES):
            return Source(name, path, "json")
        if path.endswith(".parquet"):
            return Source(name, path, "parquet")
        raise ValueError(f"--dataset {name}: unsupported file type; use {', '.join(FILE_SUFFIXES)} or a directory")
    if name.startswith(("/", ".", "~")) or name.endswith((*FILE_SUFFIXES, "/")) or name.count("/") > 1:
        raise ValueError(f"--dataset {name}: no such file or directory")
    if name in corpora.BOOKS:  # a bundled book, as --haystack takes it (a local path of that name comes first)
        return Source(name, corpora.book_path(name), "txt")
    return Source(name, name, "hub")


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def _is_json_array(path: str) -> bool:
    with _open_text(path) as f:
        return f.read(4096).lstrip().startswith("[")


def _lines(flag: str, path: str, digest=None):
    """(line number, UTF-8 text) of every line of a plain or gzip file, read to its end; one ValueError line
    naming the file and line for a gzip that is not one, is damaged or cut short (never a shorter document),
    bytes that are not UTF-8, or NUL bytes (binary data). A newline byte never occurs inside a UTF-8 sequence,
    so decoding line by line finds exactly the errors decoding the whole file would. `digest` (a hashlib object)
    takes every byte read."""
    lineno = 0
    try:
        with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if digest is not None:
                    digest.update(raw)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(
                        f"{flag} line {lineno}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                        f"{err.start + 1}); convert the file to UTF-8"
                    ) from None
                if "\0" in line:
                    raise ValueError(f"{flag} line {lineno}: holds NUL bytes: binary data, not text")
                yield lineno, line
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        if isinstance(err, gzip.BadGzipFile) and lineno == 0 and "Not a gzipped file" in str(err):
            raise ValueError(f"{flag}: not a gzip file; rename it without .gz if it is plain text") from None
        where = f" after line {lineno}" if lineno else ""
        what = f"is cut short{where} (a truncated file)" if isinstance(err, EOFError) else f"is damaged{where} ({err})"
        raise ValueError(f"{flag}: the gzip data {what}; re-download or recompress it") from None


# One .txt file is one document, tokenized in one call: the tokenizer's Python lists take ~500 bytes a token.
ONE_DOCUMENT_WARN_CHARS = 64 * 2**20


def check_text_file(flag: str, path: str, digest=None) -> None:
    """Read a .txt/.txt.gz document to its end before `datasets` does; see `_lines` for what is refused. A file
    too big to be one document gets a warning with the memory its tokenization takes."""
    chars = sum(len(line) for _, line in _lines(flag, path, digest))
    if chars > ONE_DOCUMENT_WARN_CHARS:
        logger.warning(
            "%s: %d MB of text is one document, tokenized in one call (about %.0f GB of memory at ~4 characters "
            "and ~500 bytes a token); if it holds many documents, pass one file per document or JSONL with one "
            "per line",
            flag,
            chars // 2**20,
            chars / 4 * 500 / 1e9,
        )


def read_text(flag: str, path: str) -> str:
    """The whole text of a plain or .gz file, refused as `_lines` refuses it (bad bytes named by line)."""
    return "".join(line for _, line in _lines(flag, path))


def check_json_file(flag: str, path: str, record_problem=None, digest=None) -> int:
    """Parse a JSON/JSONL(.gz) file before `datasets` does and return its number of records; one ValueError
    line naming the file and line (record, for a JSON array) of the first bad bytes, bad JSON, non-object or,
    with `record_problem(record) -> str`, the first record of the wrong shape. (datasets' own errors name
    neither the line nor the cause.)"""

    def check(record, place: str) -> None:
        if not isinstance(record, dict):
            raise ValueError(f"{flag} {place}: not a JSON object (found {type(record).__name__})")
        problem = record_problem(record) if record_problem else ""
        if problem:
            raise ValueError(f"{flag} {place}: {problem}")

    def parse(text: str, lineno: int):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{flag} line {lineno + e.lineno - 1}: not valid JSON ({e.msg} at column {e.colno})"
            ) from None

    lines = _lines(flag, path, digest)
    count = 0
    for lineno, line in lines:
        if not line.strip():
            continue
        if count == 0 and line.lstrip().startswith("["):  # a JSON array: parsed whole
            records = parse(line + "".join(text for _, text in lines), lineno)
            for i, record in enumerate(records):
                check(record, f"record {i + 1}")
            return len(records)
        if count == 0 and line.lstrip().startswith("{") and not _parses(line):  # one object over several lines?
            whole = line + "".join(text for _, text in lines)
            if _parses(whole) and isinstance(json.loads(whole), dict):
                keys = ", ".join(json.loads(whole))[:80]
                raise ValueError(
                    f"{flag}: one JSON object over several lines (keys: {keys}), not records; pass a JSON array of "
                    "records or one record per line (JSONL)"
                )
        check(parse(line, lineno), f"line {lineno}")
        count += 1
    return count


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


EVAL_SPLITS = ("test", "validation", "eval")  # what a held-out split is called, in the order one is taken
EVAL_SPLIT_HELP = (
    "Split of a DatasetDict folder or hub --eval_dataset; unset: a folder's test/validation/eval, else --split. "
    "Recipes only."
)


def split_names(src: Source) -> list[str]:
    """The splits of a save_to_disk DatasetDict folder, from its dataset_dict.json; [] for anything else (a file or
    a single Dataset has one split; a hub dataset's would need the network)."""
    try:
        with open(os.path.join(src.path, "dataset_dict.json"), encoding="utf-8") as f:
            return list(json.load(f)["splits"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def held_out_split(dataset: str, split: str, eval_dataset: str, eval_split: str | None) -> str:
    """The split --eval_dataset is read from: --eval_split, else the first of `EVAL_SPLITS` that a DatasetDict folder
    holds, else --split; one line when that is the data --dataset trains on (its loss would not be held out)."""
    held_out = resolve(eval_dataset)
    names = split_names(held_out) if held_out.kind == "disk" else []
    if eval_split and not names and held_out.kind != "hub":  # a file or one Dataset: read whole, whatever the split
        raise ValueError(
            f"--eval_split {eval_split}: --eval_dataset {eval_dataset} has no splits (a file or a single dataset); "
            "leave --eval_split out"
        )
    chosen = eval_split or next((name for name in EVAL_SPLITS if name in names), split)
    if os.path.realpath(held_out.path) == os.path.realpath(resolve(dataset).path):
        if chosen == split:
            others = [name for name in names if name != split] or (["test"] if held_out.kind == "hub" else [])
            fix = f"pass --eval_split {others[0]}" if others else "pass other data"
            raise ValueError(f"--eval_dataset {eval_dataset}: the training data itself (split {split}); {fix}")
        return chosen
    shared = [
        (a, b)
        for a in origins(dataset, split)
        for b in origins(eval_dataset, chosen)
        if a == b or ((_within(a[0], b[0]) or _within(b[0], a[0])) and None in (a[1], b[1]))
    ]
    if shared:  # a file of a training folder, or the data a prepared folder was made from (the same split)
        raise ValueError(
            f"--eval_dataset {eval_dataset}: the training data ({dataset}) holds it too ({shared[0][1][0]}); "
            "pass held-out text"
        )
    return chosen


def origins(name: str, split: str = "train") -> list[tuple[str, str | None]]:
    """(real path, split or None where it has no splits) of the local data `name` read at `split`, and for a folder
    data_prep wrote, of the data it was prepared from (`source_path`, `source_split` in its stats.json); none for a
    hub dataset."""
    src = resolve(name)
    if src.kind == "hub":
        return []
    found = [(os.path.realpath(src.path), split if split_names(src) else None)]
    if src.kind == "txtdir":  # files it reads through symlinks, which lie elsewhere
        found += [(real, None) for f in text_files(src.path) if not _within(real := os.path.realpath(f), found[0][0])]
    try:
        with open(os.path.join(src.path, "stats.json"), encoding="utf-8") as f:
            stats = json.load(f)
        recorded, recorded_split = stats.get("source_path"), stats.get("source_split")
    except (OSError, ValueError, AttributeError):  # no stats.json (or not data_prep's): the folder alone
        recorded = recorded_split = None
    return found + ([(os.path.realpath(recorded), recorded_split)] if isinstance(recorded, str) else [])


def text_files(folder: str) -> list[str]:
    """The .txt/.txt.gz files a folder dataset reads, in order (symlinked ones followed)."""
    return sorted(str(p) for p in Path(folder).rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@contextlib.contextmanager
def maps_written_apart(*names: str | None):
    """datasets caches a map's output beside the files of the dataset mapped: for a save_to_disk folder (one that
    data_prep wrote) inside that folder, a copy per run setting. With such a folder among `names`, maps within this
    block write temporary files instead, removed when the process ends."""
    saved = any(name and _saved_dataset(os.path.expanduser(name)) for name in names)  # (not `resolve`: no errors)
    if not datasets.is_caching_enabled() or not saved:  # files and .txt folders: datasets reads them into its cache
        yield
        return
    datasets.disable_caching()
    try:
        yield
    finally:
        datasets.enable_caching()


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def load_raw(src: Source, split: str, num_proc: int | None, record_problem=None) -> datasets.Dataset:
    """The source as a datasets.Dataset (cached by datasets under HF_DATASETS_CACHE for files). Local text and
    JSON files are read through once first (`check_text_file`, `check_json_file` with `record_problem`)."""
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
            raise ValueError(
                f"--dataset {src.name}: not a local file or directory, and loading it from the Hugging "
                f"Face hub failed ({_root_cause(e)}); pass a local file or directory"
            ) from None
    if src.kind in ("txt", "txtdir"):
        files = [src.path] if src.kind == "txt" else text_files(src.path)
        if not files:
            raise ValueError(
                f"--dataset {src.name}: the directory holds no {'/'.join(TEXT_SUFFIXES)} files and is "
                "not a save_to_disk dataset"
            )
        digest = hashlib.sha256()
        for file in files:
            check_text_file(f"--dataset {src.name}" + ("" if src.kind == "txt" else f": {file}"), file, digest)
        return datasets.load_dataset(
            "text", data_files=files, sample_by="document", split="train", num_proc=num_proc, cache_dir=_by(digest)
        )
    builder, digest = ("parquet" if src.kind == "parquet" else "json"), hashlib.sha256()
    if builder == "json" and not check_json_file(f"--dataset {src.name}", src.path, record_problem, digest):
        return datasets.Dataset.from_dict({})  # datasets fails on a file without records with a bare StopIteration
    try:
        cache = _by(digest) if builder == "json" else None  # Parquet is not read here: datasets' own key
        return datasets.load_dataset(builder, data_files=src.path, split="train", num_proc=num_proc, cache_dir=cache)
    except Exception as e:
        if builder == "json" and _root_cause(e).startswith(("CastError", "ArrowInvalid", "DatasetGenerationCast")):
            logger.info("%s: a field first seen after the first block; reading the whole file at once", src.name)
            try:
                return _json_table(src.path)
            except Exception as again:  # types that no one column holds (a text in one record, a list in another)
                e = again
        raise ValueError(f"--dataset {src.name}: datasets could not load it ({_root_cause(e)})") from None


def _by(digest) -> str:
    """datasets' cache for files read whole here, under their content's digest: datasets keys a local file by its
    path and modification time, and a file rewritten with its old time (copies that keep times, `touch -r`) was
    read from the cache of its old content."""
    return os.path.join(str(datasets.config.HF_DATASETS_CACHE), "longqlora-by-content", digest.hexdigest()[:16])


def _json_table(path: str) -> datasets.Dataset:
    """Every record of a checked JSON/JSONL file in one table, each column typed from all its values. datasets'
    json loader types the columns from the first block (about 10 MB) and fails on a key first seen later."""
    with _open_text(path) as f:
        rows = json.load(f) if _is_json_array(path) else [json.loads(line) for line in f if line.strip()]
    keys = dict.fromkeys(key for row in rows for key in row)
    return datasets.Dataset.from_dict({key: [row.get(key) for row in rows] for key in keys})


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
