"""Long instruction data: LongAlpaca, LongQLoRA, ShareGPT or role/content records as one chat format, with
length statistics and an explicit policy for conversations longer than the target context.

The output is a `messages` dataset: TRL renders it with the chat template and, with `assistant_only_loss=True`,
trains only the assistant tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import datasets
import numpy as np

from longqlora.data.formats import (
    EMPTY_REPLY,
    FORMATS,
    NOT_RENDERED,
    conversation_problem,
    detect_format,
    record_problem,
    to_messages,
    unrendered,
)
from longqlora.data.prepared import read_stats
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
from longqlora.data.text import length_stats

logger = logging.getLogger(__name__)

CONVERSATION_PACKING = {"none": None, "conversations": "bfd"}  # --pack: TRL's packing_strategy
OVERLONG = ("truncate", "drop")
INVALID = ("skip", "error")
MESSAGES = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})


@dataclass
class InstructionDataConfig:
    """Conversations for instruction tuning; the fields become flags through HfArgumentParser. The length limit is
    not a field (it would clash with SFTConfig's --max_length in the recipes' parser): pass it to `length_report`."""

    dataset: str = flag(
        "A .jsonl/.json(.gz) or .parquet file, a save_to_disk directory or a hub name holding "
        "LongAlpaca, LongQLoRA, ShareGPT, role/content messages or TRL prompt/completion records."
    )
    split: str = flag("Split of a save_to_disk DatasetDict or of a hub dataset.", default="train")
    overlong: str = flag(
        "Conversations over the length limit: truncate (kept; TRL cuts them) or drop.", default="truncate"
    )
    system_prompt: str | None = flag(
        "System message for conversations without one; unset: the chat template's default.", default=None
    )
    invalid_conversations: str = flag(
        "Conversations that do not alternate user/assistant ending with the assistant: skip (counted) or error.",
        default="skip",
    )
    pack: str = flag(
        "none: one conversation per row, padded; conversations: whole conversations packed into rows of the target "
        "context (TRL's bfd, no attention across them; an overlong one cut as --overlong truncate says).",
        default="none",
    )  # not `packing`: SFTConfig's --packing shares the recipes' parser
    num_proc: int | None = flag("Processes for loading and tokenizing.", default=None)
    eval_dataset: str | None = flag(
        "Held-out conversations in any --dataset form, read as --dataset is: their loss on the replies is logged "
        "every --eval_steps (default --save_steps), with full attention."
        " Recipes only: data_prep prepares held-out data in a run of its own.",
        default=None,
    )
    eval_split: str | None = flag(EVAL_SPLIT_HELP, default=None)

    def __post_init__(self):
        if not self.dataset.strip():
            bad("dataset", self.dataset, "pass a file, a directory or a hub dataset name")
        if self.overlong not in OVERLONG:
            bad("overlong", self.overlong, f"must be one of {', '.join(OVERLONG)}")
        if self.pack not in CONVERSATION_PACKING:
            bad("pack", self.pack, f"must be one of {', '.join(CONVERSATION_PACKING)}")
        if self.invalid_conversations not in INVALID:
            bad("invalid_conversations", self.invalid_conversations, f"must be one of {', '.join(INVALID)}")
        check_num_proc(self.num_proc)


def _convert_row(row: dict, system_prompt: str | None) -> dict:
    fmt = detect_format(row)
    shape = record_problem(row) if fmt else ""
    messages = to_messages(row, fmt, system_prompt) if fmt and not shape else []
    return {
        "messages": messages,
        "_format": fmt,
        "_shape": shape,
        "_problem": (unrendered(row, fmt) or conversation_problem(messages)) if fmt and not shape else "",
    }


def _check_formats(ds: datasets.Dataset, raw: datasets.Dataset, src: Source) -> str:
    """The file's one format; an unknown or mixed record is an error naming its place and keys."""
    formats = column(ds, "_format").to_numpy(zero_copy_only=False)
    known = "records with " + ", ".join("+".join(k) for k in FORMATS.values())  # the keys that name a format
    if formats[0] == "":
        raise ValueError(f"--dataset {where(src, 0)}: unknown format, keys: {fields(raw[0])}; expected {known}")
    other = np.flatnonzero(formats != formats[0])
    if len(other):
        i = int(other[0])
        raise ValueError(
            f"--dataset {where(src, i)}: {formats[i] or 'unknown'} format (keys: {fields(raw[i])}) "
            f"in a file whose first record is {formats[0]} ({len(other)} of its {len(formats)} records are other "
            "formats); use one format"
        )
    return str(formats[0])


def load_conversations(cfg: InstructionDataConfig, stats: dict | None = None) -> datasets.Dataset:
    """Load `cfg.dataset` as a Dataset with one `messages` column of role/content turns, format auto-detected.

    A record whose turns are not a list of role/content objects is an error naming its line. Conversations must
    alternate user/assistant (after an optional system message), end with the assistant and have no empty reply;
    others are skipped and counted (logged, and in `stats` if given), or raise with --invalid_conversations error."""
    src = resolve(cfg.dataset)
    raw = load_raw(src, cfg.split, cfg.num_proc, record_problem=record_problem)
    if not len(raw):
        raise ValueError(f"--dataset {cfg.dataset} holds no conversations")
    features = datasets.Features(
        {
            "messages": MESSAGES,
            "_format": datasets.Value("string"),
            "_shape": datasets.Value("string"),
            "_problem": datasets.Value("string"),
        }
    )
    ds = raw.map(
        _convert_row,
        remove_columns=raw.column_names,
        num_proc=cfg.num_proc,
        features=features,
        fn_kwargs={"system_prompt": cfg.system_prompt},
        desc="Converting to messages",
    )
    fmt = _check_formats(ds, raw, src)
    shapes = column(ds, "_shape").to_numpy(zero_copy_only=False)
    if (shapes != "").any():  # JSON files are checked line by line before; this catches Parquet and hub data
        i = int(np.flatnonzero(shapes != "")[0])
        raise ValueError(f"--dataset {where(src, i)}: {shapes[i]}")
    problems = column(ds, "_problem").to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(problems != "")
    texts = problems.astype(str)
    empty, hidden = int(np.char.endswith(texts, EMPTY_REPLY).sum()), int((np.char.find(texts, NOT_RENDERED) >= 0).sum())
    first = f"{where(src, int(bad[0]))}: {problems[bad[0]]}" if len(bad) else ""
    if len(bad):
        if cfg.invalid_conversations == "error":
            raise ValueError(f"--dataset {first}; fix it or pass --invalid_conversations skip")
        logger.warning(
            "skipped %d of %d conversations: %d with %s, %d with tool calls, reasoning or tools the chat template "
            "is not given, %d not user/assistant turns ending with the assistant (first: %s)",
            len(bad),
            len(ds),
            empty,
            EMPTY_REPLY,
            hidden,
            len(bad) - empty - hidden,
            first,
        )
        ds = ds.filter(lambda p: [not x for x in p], input_columns="_problem", batched=True, num_proc=cfg.num_proc)
    if not len(ds):
        raise ValueError(
            f"--dataset {cfg.dataset} holds no valid conversations ({len(bad)} skipped, {empty} of "
            f"them for {EMPTY_REPLY}; first: {first[:160]})"
        )
    if stats is not None:
        stats.update(
            format=fmt,
            conversations_in=len(raw),
            skipped_invalid=len(bad),
            skipped_empty_reply=empty,
            skipped_not_rendered=hidden,
            conversations_out=len(ds),
            shared_system_prompt=_shared_system(ds, cfg.num_proc),
        )
    logger.info("loaded %d %s conversations from %s", len(ds), fmt, cfg.dataset)
    return ds.remove_columns(["_format", "_shape", "_problem"])


def _shared_system(ds: datasets.Dataset, num_proc: int | None) -> str | None:
    """The system message every conversation opens with, when they share one (chat then renders it by default),
    else None. Read through a map of the first message only: the conversations may be long."""
    firsts = ds.map(
        lambda b: {"_system": [m[0]["content"] if m and m[0]["role"] == "system" else None for m in b]},
        input_columns="messages",
        batched=True,
        remove_columns=ds.column_names,
        features=datasets.Features({"_system": datasets.Value("string")}),
        num_proc=num_proc,
        desc="Reading system messages",
    )["_system"]
    return firsts[0] if len(set(firsts)) == 1 else None


def prepared_stats(cfg: InstructionDataConfig, max_length: int) -> dict:
    """The stats.json of a folder data_prep/prepare_instructions.py wrote ({} for other data), with a warning where
    the folder does not hold what this run would read from the raw data: conversations it dropped as longer than
    its --max_length that this run's rows would hold, or a system message baked into its rows that this run's
    --system_prompt does not change."""
    try:
        stats = read_stats(cfg.dataset)
    except ValueError:  # not a folder data_prep wrote, as far as this run is concerned
        return {}
    if "overlong" not in stats:
        return {}
    if stats.get("overlong") == "drop" and stats.get("dropped") and stats.get("max_length", max_length) < max_length:
        logger.warning(
            "--dataset %s was prepared with --max_length %d --overlong drop: it lacks the %d conversations longer than "
            "that, which this run's rows of %d tokens would hold; re-run prepare_instructions with --max_length %d",
            cfg.dataset, stats["max_length"], stats["dropped"], max_length, max_length,
        )  # fmt: skip
    if stats.get("system_prompt") is not None and cfg.system_prompt not in (None, stats["system_prompt"]):
        logger.warning(
            "--system_prompt %r: the conversations of --dataset %s were prepared with %r, which their rows hold; "
            "re-run prepare_instructions with this --system_prompt to train with it",
            cfg.system_prompt, cfg.dataset, stats["system_prompt"],
        )  # fmt: skip
    return stats


def _chat_lengths(batch, tokenizer, max_length: int, masks: bool):
    out = tokenizer.apply_chat_template(
        batch["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=masks
    )
    lengths = [len(ids) for ids in out["input_ids"]]
    answered = [1 in m[:max_length] for m in out["assistant_masks"]] if masks else [True] * len(lengths)
    return {"length": lengths, "answer_in_window": answered}


def length_report(
    ds: datasets.Dataset, tokenizer, max_length: int, overlong: str, num_proc: int | None = None, packed: bool = False
):
    """Token lengths through the chat template, and the `overlong` policy applied; returns (dataset, stats).

    "drop" removes conversations over `max_length`. "truncate" keeps them and TRL cuts them (trl 1.16): without
    packing `SFTTrainer._prepare_dataset` keeps the first max_length tokens (`truncation_mode="keep_start"`, the
    default) and drops examples left with no assistant token; packing "bfd" keeps the first max_length tokens
    (`_pack_bfd(on_seq_length_overflow="truncate")`); "bfd_split" instead splits the overflow into a separate
    sequence without its prompt, so prefer "bfd" or no packing for conversations. `answers_lost` counts overlong
    conversations whose first max_length tokens hold no assistant token (they train nothing under keep_start);
    TRL drops them unpacked, and `packed` (--pack conversations, whose rows TRL keeps) drops them here."""
    if overlong not in OVERLONG:
        bad("overlong", overlong, f"must be one of {', '.join(OVERLONG)}")
    if max_length < 1:
        bad("max_length", max_length, "must be a positive number of tokens, e.g. 8192")
    if not tokenizer.chat_template:
        raise ValueError("--tokenizer has no chat template; call longqlora.data.formats.apply_vicuna_template")
    from trl.chat_template_utils import has_generation_markers

    masks = has_generation_markers(tokenizer.chat_template)
    # only the two measures are written (datasets caches a map's output beside a saved dataset's files: with the
    # conversations kept, every training launch left a copy of them in the prepared folder)
    measured = ds.map(
        _chat_lengths,
        batched=True,
        num_proc=num_proc,
        remove_columns=ds.column_names,
        desc="Measuring conversations",
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "masks": masks},
    )
    lengths = column(measured, "length").to_numpy().astype(np.int64)
    over = lengths > max_length
    lost = over & ~column(measured, "answer_in_window").to_numpy(zero_copy_only=False).astype(bool)
    stats = {
        "count": len(lengths),
        **length_stats(lengths),
        "length_p90": round(float(np.percentile(lengths, 90)), 1),
        "tokens_total": int(lengths.sum()),
        "max_length": max_length,
        "over_max_length": int(over.sum()),
        "overlong": overlong,
        "dropped": 0,
        "truncated": 0,
        "answers_lost": 0,
    }
    if overlong == "truncate" and lost.all():  # TRL drops each; its sampler then fails on an empty dataset
        raise ValueError(
            f"--overlong truncate: all {len(lengths)} conversations exceed max_length {max_length} with no assistant "
            f"token in their first {max_length} tokens, so nothing would be trained (shortest: {lengths.min()} "
            "tokens); raise --target_context (data_prep's --max_length) or shorten the prompts"
        )
    if overlong == "drop" and over.all():
        raise ValueError(
            f"--overlong drop removes all {len(lengths)} conversations (shortest: {lengths.min()} "
            f"tokens); raise --target_context (data_prep's --max_length) or pass --overlong truncate"
        )
    if overlong == "drop" and over.any():
        ds = ds.select(np.flatnonzero(~over))  # an index mapping, no copy
        stats["dropped"] = int(over.sum())
        logger.warning(
            "dropped %d of %d conversations over max_length %d tokens (--overlong drop)",
            stats["dropped"],
            len(lengths),
            max_length,
        )
    elif over.any():
        stats.update(truncated=int(over.sum()), answers_lost=int(lost.sum()))
        if packed and lost.any():  # a packed row of them would train nothing yet take a step (and score 0)
            ds = ds.select(np.flatnonzero(~lost))
        logger.warning(
            "%d of %d conversations exceed max_length %d tokens; kept, TRL truncates them to their "
            "first %d tokens (%d then hold no assistant token: dropped)",
            stats["truncated"],
            len(lengths),
            max_length,
            max_length,
            stats["answers_lost"],
        )
    stats["count_out"] = len(ds)
    return ds, stats
