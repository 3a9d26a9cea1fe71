"""longqlora.data.text, longqlora.data.formats and the data_prep scripts: every input format, the error lines, the
stats, the Vicuna template and its assistant mask, and TRL 1.16's packing on our output. CPU only, all in tmp_path."""

import copy
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from longqlora.data import instructions as I
from longqlora.data import text as D
from longqlora.data.formats import VICUNA_V1_1_SYSTEM, VICUNA_V1_1_TEMPLATE, apply_vicuna_template
from longqlora.data.instructions import InstructionDataConfig
from longqlora.data.text import TextDataConfig
from longqlora.training.tiny import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    "The pass key is 12345. Remember it.",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of "
    "a wife. " * 3,
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep. " * 2,
]
CHAT = [
    {"role": "user", "content": "Summarize\n\nthe long document"},
    {"role": "assistant", "content": "a short summary"},
    {"role": "user", "content": "more"},
    {"role": "assistant", "content": "sure"},
]


@pytest.fixture(scope="module")
def tok():
    return apply_vicuna_template(
        train_tokenizer(DOCS * 4 + ["USER: ASSISTANT: hi hello more sure summary"], vocab_size=320)
    )


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keep datasets' file cache inside the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def write_jsonl(path, rows):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def direct_lengths(tok, texts):
    return [len(tok(t)["input_ids"]) + 1 for t in texts]  # + EOS


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------- text: formats


def make_source(kind, tmp_path):
    """A dataset of kind `kind` holding DOCS in order, and the --dataset string for it."""
    if kind in ("txt", "txt.gz"):
        path = tmp_path / f"book.{kind}"
        (gzip.open if kind.endswith("gz") else open)(path, "wt", encoding="utf-8").write(DOCS[1])
        return str(path), [DOCS[1]]
    if kind == "dir":
        (tmp_path / "books" / "sub").mkdir(parents=True)
        for i, doc in enumerate(DOCS):  # names sort in DOCS order; one compressed, one nested
            path = tmp_path / "books" / ("sub/" if i == 3 else "") / f"{i}.txt{'.gz' if i == 2 else ''}"
            (gzip.open if i == 2 else open)(path, "wt", encoding="utf-8").write(doc)
        (tmp_path / "books" / "notes.md").write_text("not a document")
        return str(tmp_path / "books"), DOCS
    if kind in ("jsonl", "jsonl.gz"):
        return str(write_jsonl(tmp_path / f"d.{kind}", [{"text": d, "id": i} for i, d in enumerate(DOCS)])), DOCS
    if kind == "json":
        (tmp_path / "d.json").write_text(json.dumps([{"text": d} for d in DOCS]))
        return str(tmp_path / "d.json"), DOCS
    ds = datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))})
    if kind == "parquet":
        ds.to_parquet(tmp_path / "d.parquet")
        return str(tmp_path / "d.parquet"), DOCS
    if kind == "disk":
        ds.save_to_disk(tmp_path / "saved")
        return str(tmp_path / "saved"), DOCS
    datasets.DatasetDict({"train": ds.select([0]), "validation": ds}).save_to_disk(tmp_path / "saved_dict")
    return str(tmp_path / "saved_dict"), DOCS


@pytest.mark.parametrize("kind", ["txt", "txt.gz", "dir", "jsonl", "jsonl.gz", "json", "parquet", "disk", "dict"])
def test_each_format_loads_its_documents(kind, tmp_path):
    name, expected = make_source(kind, tmp_path)
    ds = D.load_documents(TextDataConfig(name, split="validation" if kind == "dict" else "train"))
    assert ds.column_names == ["text"]
    assert list(ds["text"]) == expected


def test_text_field_max_documents_and_empty_documents(tmp_path):
    rows = [{"body": d} for d in DOCS[:2]] + [{"body": "  \n"}] + [{"body": d} for d in DOCS[2:]]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert list(D.load_documents(TextDataConfig(str(path), text_field="body"))["text"]) == DOCS  # blank one dropped
    assert list(D.load_documents(TextDataConfig(str(path), text_field="body", max_documents=3))["text"]) == DOCS[:3]


def test_split_missing_from_a_saved_dict(tmp_path):
    name, _ = make_source("dict", tmp_path)
    assert error_of(D.load_documents, TextDataConfig(name, split="test")) == (
        f"--split test: {name} has splits train, validation; pass --split"
    )


def test_the_held_out_split_is_never_the_training_data(tmp_path):
    """--eval_dataset reads a DatasetDict's test/validation/eval split unless --eval_split names one; the very
    split --dataset trains on is refused in one line (its loss would not be held out)."""
    from longqlora.data.sources import held_out_split

    both, _ = make_source("dict", tmp_path)  # train + validation
    assert held_out_split(both, "train", both, None) == "validation"
    assert held_out_split(both, "validation", both, "train") == "train"
    assert error_of(held_out_split, both, "train", both, "train") == (
        f"--eval_dataset {both}: the training data itself (split train); pass --eval_split validation"
    )
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "a document"}) + "\n")
    assert error_of(held_out_split, str(one), "train", str(tmp_path / "." / "one.jsonl"), None).endswith(
        "the training data itself (split train); pass other data"
    )
    other = tmp_path / "other.jsonl"
    other.write_text(one.read_text())
    assert held_out_split(str(one), "train", str(other), None) == "train"  # a file has only its one split
    assert error_of(held_out_split, str(one), "train", str(other), "test") == (  # read whole, whatever the split
        f"--eval_split test: --eval_dataset {other} has no splits (a file or a single dataset); leave --eval_split out"
    )
    assert error_of(held_out_split, "org/data", "train", "org/data", None).endswith("; pass --eval_split test")
    # a file of the training folder, or the data a prepared folder was made from, is no held-out text either
    books = tmp_path / "books"
    books.mkdir()
    (books / "emma.txt").write_text("Emma Woodhouse, handsome, clever, and rich.")
    assert error_of(held_out_split, str(books), "train", str(books / "emma.txt"), None) == (
        f"--eval_dataset {books / 'emma.txt'}: the training data ({books}) holds it too "
        f"({os.path.realpath(books / 'emma.txt')}); pass held-out text"
    )
    prepared = tmp_path / "prepared"
    datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]]}).save_to_disk(str(prepared))
    (prepared / "stats.json").write_text(json.dumps({"dataset": "books", "source_path": str(books)}))
    assert "the training data (" in error_of(held_out_split, str(prepared), "train", str(books), None)
    assert held_out_split(str(prepared), "train", str(one), None) == "train"  # other files: held out
    linked = tmp_path / "linked"  # a folder reading the held-out file through a symlink
    linked.mkdir()
    (linked / "emma.txt").symlink_to(books / "emma.txt")
    assert "holds it too" in error_of(held_out_split, str(linked), "train", str(books / "emma.txt"), None)
    # folders prepared from two splits of one DatasetDict are apart; from the same split, the same data
    for name, split in (("prep_train", "train"), ("prep_test", "validation")):
        datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]]}).save_to_disk(str(tmp_path / name))
        (tmp_path / name / "stats.json").write_text(json.dumps({"source_path": both, "source_split": split}))
    assert held_out_split(str(tmp_path / "prep_train"), "train", str(tmp_path / "prep_test"), None) == "train"
    assert held_out_split(both, "train", str(tmp_path / "prep_test"), None) == "train"
    assert "holds it too" in error_of(held_out_split, both, "train", str(tmp_path / "prep_train"), None)


def test_a_file_rewritten_with_its_old_time_is_read_anew(tmp_path):
    """datasets keys a local file's cache by its path and modification time: a file rewritten with its old time
    (a copy that keeps times, `touch -r`) was read from its old content's cache; files are keyed by content."""
    for name, old, new in (("a.jsonl", '{"text": "old words"}\n', '{"text": "NEW WORDS"}\n'), ("b.txt", "old", "NEW")):
        path = tmp_path / name
        path.write_text(old)
        assert D.load_documents(TextDataConfig(str(path)))["text"] == ["old words" if name == "a.jsonl" else "old"]
        kept = path.stat()
        path.write_text(new)
        os.utime(path, ns=(kept.st_atime_ns, kept.st_mtime_ns))
        assert path.stat().st_mtime_ns == kept.st_mtime_ns
        assert D.load_documents(TextDataConfig(str(path)))["text"] == ["NEW WORDS" if name == "a.jsonl" else "NEW"]


# ------------------------------------------------------------------------------------------- text: errors


def test_malformed_jsonl_names_the_line(tmp_path):
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(15)]
    lines[14] = '{"text": "doc 14",}'
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines[:5]) + "\n\n\n" + "\n".join(lines[5:]) + "\n")  # 6, 7 blank: row 14 on line 17
    message = error_of(D.load_documents, TextDataConfig(str(path)))
    assert message.startswith(f"--dataset {path} line 17: not valid JSON (Expecting property name")


def test_missing_field_names_field_line_and_fields(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "a"}, {"text": "b"}, {"a": 1, "b": "x"}, {"text": "c"}])
    assert error_of(D.load_documents, TextDataConfig(str(path))) == (
        f"--text_field text: {path} line 3 has no 'text' field (fields: a, b); pass --text_field "
        "(1 of 4 records lack it)"
    )
    assert error_of(D.load_documents, TextDataConfig(str(path), text_field="body")).startswith(
        f"--text_field body: {path} line 1 has no 'body' field (fields: text"
    )


def test_missing_empty_and_unsupported_inputs(tmp_path, monkeypatch):
    assert error_of(D.load_documents, TextDataConfig(str(tmp_path / "nope.jsonl"))) == (
        f"--dataset {tmp_path / 'nope.jsonl'}: no such file or directory"
    )
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert error_of(D.load_documents, TextDataConfig(str(tmp_path / "empty.jsonl"))).endswith("holds no documents")
    write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": " "}])
    assert error_of(D.load_documents, TextDataConfig(str(tmp_path / "blank.jsonl"))) == (
        f"--dataset {tmp_path / 'blank.jsonl'} holds no documents"
    )
    (tmp_path / "empty_dir").mkdir()
    assert "holds no .txt/.txt.gz files" in error_of(D.load_documents, TextDataConfig(str(tmp_path / "empty_dir")))
    (tmp_path / "d.csv").write_text("text\na\n")
    assert "unsupported file type" in error_of(D.load_documents, TextDataConfig(str(tmp_path / "d.csv")))

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr("longqlora.data.sources.datasets.load_dataset", offline)
    assert error_of(D.load_documents, TextDataConfig("someone/corpus")).startswith(
        "--dataset someone/corpus: not a local file or directory, and loading it from the Hugging Face hub failed "
        "(ConnectionError: Couldn't reach"
    )


@pytest.mark.parametrize(
    "flag, kwargs",
    [
        ("pack", {"pack": "wrap"}),
        ("min_length", {"min_length": -1}),
        ("num_proc", {"num_proc": 0}),
        ("max_documents", {"max_documents": 0}),
        ("text_field", {"text_field": ""}),
    ],
)
def test_text_config_errors_name_the_flag(flag, kwargs):
    assert error_of(TextDataConfig, "d.jsonl", **kwargs).startswith(f"--{flag} ")


@pytest.mark.parametrize(
    "flag, kwargs",
    [
        ("overlong", {"overlong": "cut"}),
        ("num_proc", {"num_proc": -2}),
        ("invalid_conversations", {"invalid_conversations": "fix"}),
    ],
)
def test_instruction_config_errors_name_the_flag(flag, kwargs):
    assert error_of(InstructionDataConfig, "d.jsonl", **kwargs).startswith(f"--{flag} ")


@pytest.mark.parametrize("data_cls", [TextDataConfig, InstructionDataConfig])
def test_configs_share_a_parser_with_sft_config(data_cls):
    """The recipes parse our config and TRL's SFTConfig together: no flag may clash (--packing, --max_length)."""
    from trl import SFTConfig, TrlParser

    data_cfg, sft = TrlParser((data_cls, SFTConfig)).parse_args_into_dataclasses(
        [
            "--dataset",
            "d.jsonl",
            "--output_dir",
            "o",
            "--max_length",
            "64",
            "--packing",
            "false",
            "--use_cpu",
            "--bf16",
            "false",
            "--activation_checkpointing",  # TRL's default, under transformers 5's name (the old one warns)
            "true",
        ]
    )
    assert (data_cfg.dataset, sft.max_length, sft.packing) == ("d.jsonl", 64, False)


# ------------------------------------------------------------------------------------------- text: tokens


def test_tokens_and_stats_equal_a_direct_tokenization(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    cfg = TextDataConfig(str(path))
    tokenized, stats = D.tokenize_documents(D.load_documents(cfg), tok, cfg)
    lengths = direct_lengths(tok, DOCS)
    assert tokenized.column_names == ["input_ids"]
    for ids, doc in zip(tokenized["input_ids"], DOCS):
        assert ids == tok(doc)["input_ids"] + [tok.eos_token_id]  # EOS appended once, text untouched
    assert stats["documents_in"] == stats["documents_out"] == 4 and stats["dropped_short"] == 0
    assert stats["tokens_total"] == sum(lengths)
    assert (stats["length_min"], stats["length_median"], stats["length_max"]) == (
        min(lengths),
        float(np.median(lengths)),
        max(lengths),
    )
    assert (stats["pack"], stats["packing_strategy"]) == ("documents", "bfd_split")


def test_eos_is_not_doubled_and_can_be_left_out(tok):
    ds = datasets.Dataset.from_dict({"text": ["hello</s>", "hello"]})
    tokenized, stats = D.tokenize_documents(ds, tok, TextDataConfig("x"))
    assert [ids.count(tok.eos_token_id) for ids in tokenized["input_ids"]] == [1, 1]
    tokenized, stats = D.tokenize_documents(ds.select([1]), tok, TextDataConfig("x"), add_eos=False)
    assert tokenized["input_ids"][0] == tok("hello")["input_ids"] and not stats["eos_appended"]


def test_min_length_drops_exactly_the_short_documents(tok):
    lengths = direct_lengths(tok, DOCS)
    cut = sorted(lengths)[2]  # two documents are shorter
    ds = datasets.Dataset.from_dict({"text": DOCS})
    tokenized, stats = D.tokenize_documents(ds, tok, TextDataConfig("x", min_length=cut))
    kept = [d for d, n in zip(DOCS, lengths) if n >= cut]
    assert len(kept) == 2 and stats["dropped_short"] == 2 and stats["documents_out"] == 2
    assert [tok.decode(ids[:-1]) for ids in tokenized["input_ids"]] == kept
    assert stats["tokens_total"] == sum(n for n in lengths if n >= cut)
    assert stats["tokens_dropped"] == sum(n for n in lengths if n < cut)
    message = error_of(D.tokenize_documents, ds, tok, TextDataConfig("x", min_length=max(lengths) + 1))
    assert message == (
        f"--min_length {max(lengths) + 1} drops all 4 documents of --dataset x (longest: "
        f"{max(lengths)} tokens); lower --min_length"
    )


def test_check_packable_and_packing_strategy():
    D.check_packable({"tokens_total": 100}, 100)
    assert error_of(D.check_packable, {"dataset": "b.txt", "tokens_total": 9}, 10).startswith("--dataset b.txt holds 9")
    assert error_of(D.check_packable, {"tokens_total": 99}, 100, "d.jsonl") == (
        "--dataset d.jsonl holds 99 tokens, fewer than one row of 100 (--target_context, --pose_window with PoSE; "
        "data_prep's --max_length); add text or lower it"
    )
    assert (D.packing_strategy("documents"), D.packing_strategy("concat")) == ("bfd_split", "wrapped")
    assert error_of(D.packing_strategy, "bfd").startswith("--pack 'bfd'")


# ------------------------------------------------------------------------------------------- TRL packing


def test_trl_bfd_split_keeps_documents_apart(tok):
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    max_length = 48
    tokenized, stats = D.tokenize_documents(datasets.Dataset.from_dict({"text": DOCS * 3}), tok, TextDataConfig("x"))
    assert stats["length_max"] > max_length  # one document must be split
    packed = pack_dataset(tokenized, max_length, strategy=D.packing_strategy("documents"))
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    total = 0
    for row in packed:
        positions = collator.get_position_ids_from_packed_seq_lengths([row["seq_lengths"]])[0].tolist()
        starts = np.cumsum([0] + row["seq_lengths"][:-1]).tolist()
        assert len(row["input_ids"]) == len(positions) <= max_length
        assert [i for i, p in enumerate(positions) if p == 0] == starts  # positions restart at each document
        assert max(positions) < max_length
        for start, n in zip(starts, row["seq_lengths"]):  # each piece is a run of one document, at most one EOS
            assert row["input_ids"][start : start + n - 1].count(tok.eos_token_id) == 0
        total += len(row["input_ids"])
    assert total == stats["tokens_total"]  # bfd_split loses nothing

    wrapped = pack_dataset(tokenized, max_length, strategy=D.packing_strategy("concat"))
    assert [len(ids) for ids in wrapped["input_ids"]][:-1] == [max_length] * (len(wrapped) - 1)
    assert sum(len(ids) for ids in wrapped["input_ids"]) == stats["tokens_total"]


def test_sft_trainer_takes_our_outputs(tok, tmp_path):
    from transformers import LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from longqlora.training.tiny import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    common = dict(
        output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, bf16=False, shuffle_dataset=False,
        activation_checkpointing=True,  # TRL's default, under transformers 5's name (the old one warns)
    )  # fmt: skip
    tokenized, stats = D.tokenize_documents(datasets.Dataset.from_dict({"text": DOCS}), tok, TextDataConfig("x"))
    trainer = SFTTrainer(
        model=model,
        processing_class=tok,
        train_dataset=tokenized,
        args=SFTConfig(packing=True, packing_strategy="bfd_split", max_length=40, **common),
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    assert batch["input_ids"].shape[1] == stats["tokens_total"]  # untouched by TRL: no second EOS, no truncation
    assert int(batch["position_ids"].max()) == 39

    conversations = datasets.Dataset.from_dict({"messages": [[{"role": "system", "content": "S"}, *CHAT]]})
    trainer = SFTTrainer(
        model=model,
        processing_class=tok,
        train_dataset=conversations,
        args=SFTConfig(assistant_only_loss=True, max_length=256, **common),
    )
    row = trainer.train_dataset[0]
    trained = tok.decode([i for i, label in zip(row["input_ids"], row["labels"]) if label != -100])
    assert trained == " a short summary</s> sure</s>"  # the space after "ASSISTANT:" merges into the reply's token

    # --pack conversations: whole conversations share rows, trained on the same reply tokens as one per row, each
    # with its own positions (S2-Attn and the varlen kernels take documents from them)
    chats = [[{"role": "system", "content": "S"}, *CHAT], CHAT[:2], CHAT[2:], [*CHAT[2:], *CHAT[:2]]] * 3
    rows = {}
    for strategy in (None, I.CONVERSATION_PACKING["conversations"]):
        packing = dict(packing=True, packing_strategy=strategy) if strategy else {}
        trainer = SFTTrainer(
            model=model,
            processing_class=tok,
            train_dataset=datasets.Dataset.from_dict({"messages": chats}),
            args=SFTConfig(assistant_only_loss=True, max_length=256, **packing, **common),
        )
        data = trainer.train_dataset
        batch = trainer.data_collator([data[i] for i in range(len(data))])
        rows[strategy] = (len(data), sorted(int(t) for t in batch["labels"].flatten() if t != -100))
        if strategy:
            starts = int((batch["position_ids"] == 0).sum())
            assert starts == len(chats) and int(batch["position_ids"].max()) < 256
    assert rows[None][0] == len(chats) > rows["bfd"][0] and rows[None][1] == rows["bfd"][1]


# ------------------------------------------------------------------------------------------- instructions


def write_instruction_formats(tmp_path):
    """The same two conversations (one of two turns where the format allows it) in each format."""
    long_q = "Summarize\n\nthe long document"
    formats = {
        "longalpaca": [
            {"instruction": "Summarize", "input": "the long document", "output": "a short summary", "file": "x.pdf"},
            {"instruction": "more", "input": "", "output": "sure"},
        ],
        "longqlora": [{"input": long_q, "output": "a short summary"}, {"input": "more", "output": "sure"}],
        "sharegpt": [
            {
                "conversations": [
                    {"from": "human", "value": long_q},
                    {"from": "gpt", "value": "a short summary"},
                    {"from": "human", "value": "more"},
                    {"from": "gpt", "value": "sure"},
                ]
            }
        ],
        "longqlora_conversation": [
            {
                "conversation_id": 7,
                "conversation": [
                    {"human": long_q, "assistant": "a short summary"},
                    {"human": "more", "assistant": "sure"},
                ],
            }
        ],
        "messages": [{"messages": CHAT}],
        "prompt_completion": [
            {"prompt": long_q, "completion": "a short summary"},
            {"prompt": "more", "completion": "sure"},
        ],
    }
    return {name: str(write_jsonl(tmp_path / f"{name}.jsonl", rows)) for name, rows in formats.items()}


def test_each_instruction_format_gives_the_same_messages(tmp_path):
    two_singles = [CHAT[:2], CHAT[2:]]
    for name, path in write_instruction_formats(tmp_path).items():
        stats = {}
        ds = I.load_conversations(InstructionDataConfig(path), stats=stats)
        expected = two_singles if name in ("longalpaca", "longqlora", "prompt_completion") else [CHAT]
        assert list(ds["messages"]) == expected, name
        assert stats == {
            "format": name,
            "conversations_in": len(expected),
            "skipped_invalid": 0,
            "skipped_empty_reply": 0,
            "skipped_not_rendered": 0,
            "conversations_out": len(expected),
            "shared_system_prompt": None,
        }


def test_a_system_message_every_record_holds_is_recorded_for_chat(tmp_path):
    """Records that all open with one system message: the run's record keeps it (chat renders it by default; the
    template's own default system message is not what the model trained with); records that differ: none."""
    from longqlora.training.summary import _data_record

    system = {"role": "system", "content": "You answer questions about Austen."}
    same = write_jsonl(tmp_path / "same.jsonl", [{"messages": [system, *CHAT]}, {"messages": [system, *CHAT[:2]]}])
    stats = {}
    cfg = InstructionDataConfig(str(same))
    I.load_conversations(cfg, stats=stats)
    assert stats["shared_system_prompt"] == system["content"]
    assert _data_record(cfg, stats)["system_prompt"] == system["content"]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"messages": [system, *CHAT]}, {"messages": CHAT[:2]}])
    stats = {}
    I.load_conversations(InstructionDataConfig(str(mixed)), stats=stats)
    assert stats["shared_system_prompt"] is None and "system_prompt" not in _data_record(cfg, stats)


def test_trl_conversational_prompt_completion_and_its_shape_errors(tmp_path):
    """TRL's prompt-completion records whose two fields are message lists: the prompt's turns (a system turn
    included) then the completion's; a record mixing a list and a string, or a list of strings, is named with
    its line."""
    system = {"role": "system", "content": "Be brief."}
    good = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": [system, *CHAT[:3]], "completion": CHAT[3:]}])
    assert list(I.load_conversations(InstructionDataConfig(str(good)))["messages"]) == [[system, *CHAT]]
    for rows, said in (
        ([{"prompt": CHAT[:1], "completion": "sure"}], "'completion' is a string, not a list of messages"),
        ([{"prompt": ["Summarize"], "completion": CHAT[1:2]}], "'prompt' item 1 is not a {role, content} object"),
    ):
        path = write_jsonl(tmp_path / "bad.jsonl", rows)
        message = error_of(I.load_conversations, InstructionDataConfig(str(path), invalid_conversations="error"))
        assert "bad.jsonl line 1" in message and said in message, message


def test_system_prompt_and_sharegpt_system_turn(tmp_path):
    path = write_jsonl(
        tmp_path / "sg.jsonl",
        [
            {
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    {"from": "human", "value": "hi"},
                    {"from": "gpt", "value": "hello"},
                ]
            },
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        ],
    )
    ds = I.load_conversations(InstructionDataConfig(str(path), system_prompt="Default."))
    assert [m[0] for m in ds["messages"]] == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Default."},
    ]


def test_invalid_conversations_are_counted_or_raise(tmp_path):
    rows = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"conversations": [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "hi"}]},
        {"conversations": [{"from": "human", "value": "hi"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    ]
    path = str(write_jsonl(tmp_path / "sg.jsonl", rows))
    stats = {}
    ds = I.load_conversations(InstructionDataConfig(path), stats=stats)
    assert len(ds) == 2 and stats["skipped_invalid"] == 2 and stats["conversations_in"] == 4
    assert error_of(I.load_conversations, InstructionDataConfig(path, invalid_conversations="error")) == (
        f"--dataset {path} line 2: message 1 is assistant, expected user; fix it or pass --invalid_conversations skip"
    )


def test_unknown_and_mixed_formats_name_line_and_keys(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [{"question": "q", "answer": "a"}])
    assert error_of(I.load_conversations, InstructionDataConfig(str(path))).startswith(
        f"--dataset {path} line 1: unknown format, keys: question, answer; expected records with messages, "
    )
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [{"instruction": "a", "output": "b"}] * 2
        + [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}],
    )
    assert error_of(I.load_conversations, InstructionDataConfig(str(path))) == (
        f"--dataset {path} line 3: sharegpt format (keys: conversations) in a file whose first record is longalpaca "
        "(1 of its 3 records are other formats); use one format"
    )


# ------------------------------------------------------------------------------------------- Vicuna template


def test_vicuna_renders_fastchat_exactly(tok):
    messages = [
        {"role": "system", "content": "SYSTEM"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "sure"},
    ]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<s>SYSTEM USER: hi ASSISTANT: hello</s>USER: more ASSISTANT: sure</s>"
    )
    assert tok.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True) == (
        f"<s>{VICUNA_V1_1_SYSTEM} USER: hi ASSISTANT:"
    )
    assert tok.chat_template == VICUNA_V1_1_TEMPLATE
    with pytest.raises(Exception, match="expected user"):
        tok.apply_chat_template(messages[2:], tokenize=False)


def test_vicuna_assistant_mask_is_the_replies_and_stop_tokens(tok):
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    out = tok.apply_chat_template(
        [{"role": "system", "content": "SYSTEM"}, *CHAT], return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    runs, current = [], []
    for token, bit in zip(ids + [None], mask + [0]):
        if bit:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    # The space after "ASSISTANT:" merges into the reply's first token (as "▁" does in Llama's tokenizer).
    assert [tok.decode(run) for run in runs] == [" a short summary</s>", " sure</s>"]
    assert [run[-1] for run in runs] == [tok.eos_token_id] * 2
    unmasked = tok.decode([t for t, bit in zip(ids, mask) if not bit])
    assert unmasked == "<s>SYSTEM USER: Summarize\n\nthe long document ASSISTANT:USER: more ASSISTANT:"
    assert has_generation_markers(tok.chat_template) and is_chat_template_stop_token_trained(tok)


def test_vicuna_trains_the_first_token_written_after_the_generation_prompt(tok):
    """Chat's prompt ends at "ASSISTANT:"; where the space after it stays a token of its own (here before a digit or
    a quote, as Llama's tokenizer does before a digit), that space is the first token the model writes, so it is
    trained: the first masked position is the prompt's length (it was one later)."""
    for reply in ["12345 it is.", '"Yes," she said.', "a short summary"]:
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]
        out = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        prompt = tok.apply_chat_template(messages[:1], add_generation_prompt=True, return_dict=True)["input_ids"]
        assert out["input_ids"][: len(prompt)] == prompt
        assert out["assistant_masks"].index(1) == len(prompt), reply
        assert sum(out["assistant_masks"]) == len(out["input_ids"]) - len(prompt)  # to the stop token


def test_vicuna_masks_replies_where_offsets_leave_out_the_space(tok):
    """A byte-level tokenizer with trim_offsets puts the space after "ASSISTANT:" in no token's offsets: the markers
    before it would mask nothing (TRL then fails after the weights load), so they go after it; the same text."""
    from tokenizers import processors

    from longqlora.data.formats import VICUNA_V1_1_TEMPLATE_SPACE_UNTRAINED

    trimmed = copy.deepcopy(tok)
    trimmed._tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    trimmed.chat_template = VICUNA_V1_1_TEMPLATE
    messages = [{"role": "system", "content": "SYSTEM"}, *CHAT]
    masks = lambda t: t.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)  # noqa: E731
    assert 1 not in masks(trimmed)["assistant_masks"]
    apply_vicuna_template(trimmed)
    assert trimmed.chat_template == VICUNA_V1_1_TEMPLATE_SPACE_UNTRAINED
    out = masks(trimmed)
    replies = [trimmed.decode(t) for t, bit in zip(out["input_ids"], out["assistant_masks"]) if bit]
    assert "".join(replies).replace(" ", "") == "ashortsummary</s>sure</s>"
    assert trimmed.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages, tokenize=False)


def test_vicuna_renders_without_a_bos_token(tok):
    no_bos = copy.deepcopy(tok)
    no_bos.bos_token = None
    assert no_bos.apply_chat_template([{"role": "system", "content": "S"}, *CHAT[:2]], tokenize=False) == (
        "S USER: Summarize\n\nthe long document ASSISTANT: a short summary</s>"
    )


OWN_WITHOUT_MARKERS = (  # a model's own template (Llama-2-chat-like) that TRL has no training version of
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


SMOLLM2_TEMPLATE = (  # SmolLM2-Instruct's own ChatML template: one expression for every turn, no markers
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_a_chatml_template_that_trl_cannot_patch_gets_reply_markers(tok):
    """SmolLM2-Instruct's template (TRL has no training version of it; the SFT recipe refused the model): the
    replies get {% generation %} markers, the marked template renders the very same text, and the loss mask covers
    each reply and its <|im_end|> exactly; merge's plain-Jinja form renders it too."""
    from longqlora.data.formats import training_chat_template
    from longqlora.data.markers import without_generation_markers

    own = copy.deepcopy(tok)
    own.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    own.chat_template = SMOLLM2_TEMPLATE
    assert training_chat_template(own, "--tokenizer") == "the tokenizer's own, reply markers added"
    turns = [{"role": "user", "content": "What is two and two?"}, {"role": "assistant", "content": "Four."}]
    turns += [{"role": "user", "content": "And three?"}, {"role": "assistant", "content": "Six, no: five."}]
    for template in (own.chat_template, without_generation_markers(own.chat_template)):
        assert own.apply_chat_template(turns, chat_template=template, tokenize=False) == own.apply_chat_template(
            turns, chat_template=SMOLLM2_TEMPLATE, tokenize=False
        )
    out = own.apply_chat_template(turns, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = [t if m else None for t, m in zip(out["input_ids"], out["assistant_masks"])]
    spans = [own.decode([t for t in span if t is not None]) for span in _runs(marked)]
    assert spans == ["Four.<|im_end|>", "Six, no: five.<|im_end|>"]
    other = copy.deepcopy(tok)
    other.chat_template = SMOLLM2_TEMPLATE.replace("message['content'] + '<|im_end|>'", "message['content'] + '</s>'")
    with pytest.raises(ValueError, match="has no \\{% generation"):  # not ChatML's expression: refused as before
        training_chat_template(other, "--tokenizer")


def _runs(items):
    """The runs of items that are not None, in order."""
    runs, current = [], []
    for item in items + [None]:
        if item is None:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(item)
    return runs


def test_data_prep_and_training_measure_through_the_same_chat_template(tok, tmp_path):
    """data_prep's lengths and stats and training's come from one choice: the tokenizer's own template where it has
    one (chat renders with it too), Vicuna v1.1 where it has none; an own template whose replies TRL cannot mask is
    refused in one line naming the flag, before any weights load (SFTTrainer refused it after)."""
    from conftest import load_script

    from longqlora.data.formats import training_chat_template
    from longqlora.training.run import prepare_dataset

    prep = load_script("data_prep/prepare_instructions.py")
    chats = write_instruction_formats(tmp_path)["longalpaca"]
    own = copy.deepcopy(tok)
    own.chat_template = VICUNA_V1_1_TEMPLATE.replace("USER: ", "Q: ").replace("'ASSISTANT:'", "'A:'")
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    for name, tokenizer, expected in (("own", own, "the tokenizer's own"), ("bare", bare, "vicuna_v1.1")):
        tokenizer.save_pretrained(tmp_path / name)
        args = prep.ScriptArguments(
            tokenizer=str(tmp_path / name), output_dir=str(tmp_path / f"{name}_out"), max_length=4096
        )
        stats = prep.run(InstructionDataConfig(dataset=chats), args)
        trained = copy.deepcopy(tokenizer)
        _, train_stats = prepare_dataset(InstructionDataConfig(dataset=chats), trained, 4096)
        assert stats["chat_template"] == train_stats["chat_template"] == expected
        assert stats["tokens_total"] == train_stats["tokens_total"]
        _, from_folder = prepare_dataset(InstructionDataConfig(dataset=args.output_dir), trained, 4096)
        assert from_folder["prepared"] == stats and from_folder["tokens_total"] == stats["tokens_total"]
    assert trained.chat_template == VICUNA_V1_1_TEMPLATE
    assert stats["tokens_total"] > json.loads((tmp_path / "own_out" / "stats.json").read_text())["tokens_total"]

    unmaskable = copy.deepcopy(tok)
    unmaskable.chat_template = OWN_WITHOUT_MARKERS
    with pytest.raises(ValueError, match=r"^--tokenizer: the tokenizer's own chat template has no \{% generation"):
        training_chat_template(unmaskable, "--tokenizer")


def test_prepare_instructions_says_how_many_will_train(tok, tmp_path, capsys):
    """A conversation whose first --max_length tokens hold no reply is kept in the folder (TRL drops it when
    training): the last line says how many will train, not only how many exceed."""
    from conftest import load_script

    prep = load_script("data_prep/prepare_instructions.py")
    tok.save_pretrained(tmp_path / "tok")
    long_question = " ".join(DOCS[1].split()[:600])
    rows = [{"instruction": "Say hi.", "input": "", "output": "Hi."}] * 2
    rows.append({"instruction": long_question, "input": "", "output": "Fine."})
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--dataset", str(tmp_path / "chats.jsonl"), "--tokenizer", str(tmp_path / "tok")]
    prep.main(argv + ["--output_dir", str(tmp_path / "out"), "--max_length", "256"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "1 exceed --max_length 256 (--overlong truncate; 1 keep no reply token within it" in last, last
    assert last.endswith("training drops them: 2 will train)")


def test_generation_markers_made_plain_render_the_same_text(tok):
    """A merged model's template without {% generation %} (TRL's training templates, which also quote the markers
    in their header comments): the same text as transformers renders the original, and a Jinja parser without
    transformers' tag (its loop controls kept, as transformers' and llama.cpp's have them) takes it."""
    import glob

    import jinja2
    import trl
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from longqlora.data.markers import without_generation_markers

    turns = [{"role": "system", "content": "Be brief."}, *CHAT]
    rendered = 0
    for path in sorted(glob.glob(os.path.join(os.path.dirname(trl.__file__), "chat_templates", "*_training.jinja"))):
        template = Path(path).read_text()
        try:
            want = tok.apply_chat_template(turns, chat_template=template, tokenize=False)
        except Exception:  # a template that needs its own model's tokens or tools
            continue
        plain = without_generation_markers(template)
        parser = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"])
        with pytest.raises(jinja2.TemplateSyntaxError, match="generation"):
            parser.from_string(template)
        parser.from_string(plain)
        assert tok.apply_chat_template(turns, chat_template=plain, tokenize=False) == want, path
        rendered += 1
    assert rendered >= 20


def test_a_chat_template_file_is_what_data_prep_and_training_measure_and_mask(tok, tmp_path):
    """--chat_template_path (a .jinja file, as TRL's SFTTrainer applies it) replaces the tokenizer's own template
    for data_prep's lengths and training's alike, and its {% generation %} markers give the loss exactly the
    replies; a file without markers, or a path that is not a .jinja file, is refused naming the flag."""
    from conftest import load_script

    from longqlora.data.formats import training_chat_template
    from longqlora.training.config import TrainingConfig
    from longqlora.training.run import prepare_dataset

    marked = OWN_WITHOUT_MARKERS.replace(
        "{{ m['content'] }}{{ eos_token }}", "{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}"
    )
    template = tmp_path / "inst.jinja"
    template.write_text(marked)
    prep = load_script("data_prep/prepare_instructions.py")
    chats = write_instruction_formats(tmp_path)["longalpaca"]
    own = copy.deepcopy(tok)
    own.chat_template = OWN_WITHOUT_MARKERS  # unmaskable: refused on its own, replaced by the file
    own.save_pretrained(tmp_path / "own")
    args = prep.ScriptArguments(
        tokenizer=str(tmp_path / "own"), output_dir=str(tmp_path / "out"), max_length=4096,
        chat_template_path=str(template),
    )  # fmt: skip
    stats = prep.run(InstructionDataConfig(dataset=chats), args)
    trained = copy.deepcopy(own)
    _, train_stats = prepare_dataset(InstructionDataConfig(dataset=chats), trained, 4096, None, None, str(template))
    assert stats["chat_template"] == train_stats["chat_template"] == str(template)
    assert stats["tokens_total"] == train_stats["tokens_total"] and trained.chat_template == marked
    turns = [{"role": "user", "content": "What is two and two?"}, {"role": "assistant", "content": "Four."}]
    out = trained.apply_chat_template(turns, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    reply = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert trained.decode(reply) == "Four." + trained.eos_token and reply[-1] == trained.eos_token_id
    bare = tmp_path / "bare.jinja"
    bare.write_text(OWN_WITHOUT_MARKERS)
    with pytest.raises(ValueError, match=rf"^--chat_template_path {bare}: the template in this file has no "):
        training_chat_template(copy.deepcopy(tok), "--tokenizer", str(bare))
    for path, said in ((tmp_path / "own", "pass a .jinja or .j2 file"), (tmp_path / "missing.jinja", "no such file")):
        with pytest.raises(ValueError, match=rf"^--chat_template_path {path}: {said}"):
            TrainingConfig(output_dir=str(tmp_path / "run"), chat_template_path=str(path))
    broken = tmp_path / "broken.jinja"  # markers, and a filter Jinja has not
    broken.write_text(marked.replace("{{ m['content'] }}{{ eos_token }}", "{{ m['content'] | nosuch }}"))
    with pytest.raises(ValueError, match=rf"^--chat_template_path {broken}: the template in this file does not render"):
        training_chat_template(copy.deepcopy(tok), "--tokenizer", str(broken))


# ------------------------------------------------------------------------------------------- lengths


def test_length_report_counts_and_policies(tok):
    conversations = [
        [{"role": "system", "content": "S"}, *CHAT[:2]],
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": DOCS[1]},
            {"role": "assistant", "content": "a short summary"},
        ],
        [{"role": "system", "content": "S"}, *CHAT],
    ]
    lengths = [len(tok.apply_chat_template(c)["input_ids"]) for c in conversations]
    max_length = sorted(lengths)[0]  # the two longer ones exceed it; the long-document one loses its answer
    ds = datasets.Dataset.from_dict({"messages": conversations})
    kept, stats = I.length_report(ds, tok, max_length, "truncate")
    assert len(kept) == 3 and (stats["over_max_length"], stats["truncated"], stats["dropped"]) == (2, 2, 0)
    assert stats["answers_lost"] == 1
    assert (stats["length_min"], stats["length_max"], stats["tokens_total"]) == (
        min(lengths),
        max(lengths),
        sum(lengths),
    )
    assert stats["length_p90"] == pytest.approx(float(np.percentile(lengths, 90)), abs=0.05)
    # packed (--pack conversations), TRL keeps a row whose reply was cut away: dropped here instead
    packed, stats = I.length_report(ds, tok, max_length, "truncate", packed=True)
    assert list(packed["messages"]) == [conversations[0], conversations[2]] and stats["answers_lost"] == 1
    short, stats = I.length_report(ds, tok, max_length, "drop")
    assert list(short["messages"]) == conversations[:1] and stats["dropped"] == 2 and stats["count_out"] == 1
    assert error_of(I.length_report, ds, tok, max_length - 1, "drop").startswith("--overlong drop removes all 3")
    assert error_of(I.length_report, ds, tok, 0, "drop").startswith("--max_length 0: must be a positive")
    # truncated to 3 tokens, no conversation keeps a reply: refused here, not by the sampler of an empty dataset
    assert error_of(I.length_report, ds, tok, 3, "truncate").startswith(
        "--overlong truncate: all 3 conversations exceed max_length 3 with no assistant token"
    )


# ------------------------------------------------------------------------------------------- scripts


def run_script(name, *args, tmp_path):
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf_cache"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "data_prep" / name), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )


def test_prepare_text_help(tmp_path):
    result = run_script("prepare_text.py", "--help", tmp_path=tmp_path)
    assert result.returncode == 0 and "--min_length" in result.stdout and "--tokenizer" in result.stdout


@pytest.mark.parametrize("script", ["prepare_text.py", "prepare_instructions.py"])
@pytest.mark.parametrize("flags", [["--eval_dataset", "held_out"], ["--eval_split", "test"]])
def test_data_prep_refuses_the_recipes_held_out_flags(script, flags, tmp_path):
    """--eval_dataset and --eval_split are the recipes' (the data configs share them): one line each, before any
    reading (--eval_split was accepted and ignored)."""
    flags = ["--dataset", "d.jsonl", "--tokenizer", "t", "--output_dir", "o", "--max_length", "64", *flags]
    result = run_script(script, *flags, tmp_path=tmp_path)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and last.startswith(f"error: {flags[8]}: prepare held-out data with its own run")


@pytest.mark.slow  # both data_prep scripts as processes, about 12 s
def test_scripts_end_to_end(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    texts = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])
    result = run_script(
        "prepare_text.py",
        "--dataset",
        str(texts),
        "--tokenizer",
        str(tmp_path / "tok"),
        "--output_dir",
        str(tmp_path / "text_out"),
        "--max_length",
        "64",
        tmp_path=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "text_out" / "stats.json").read_text())
    assert stats["tokens_total"] == sum(direct_lengths(tok, DOCS)) and "| tokens_total |" in result.stdout
    assert (stats["source_path"], stats["source_split"]) == (os.path.realpath(texts), None)  # for --eval_dataset
    saved = datasets.load_from_disk(str(tmp_path / "text_out"))
    assert [len(ids) for ids in saved["input_ids"]] == direct_lengths(tok, DOCS)
    assert stats["tokenizer_vocab_size"] == len(tok) and stats["tokenizer_name_or_path"] == str(tmp_path / "tok")
    assert f"--dataset {tmp_path / 'text_out'}" in result.stdout  # how to train on it
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".text_out")]  # no temporary left behind

    again = run_script(
        "prepare_text.py",
        "--dataset",
        str(texts),
        "--tokenizer",
        str(tmp_path / "tok"),
        "--output_dir",
        str(tmp_path / "text_out"),
        "--max_length",
        "100000",
        tmp_path=tmp_path,
    )
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].startswith("error: --output_dir")

    chats = write_instruction_formats(tmp_path)["longalpaca"]
    result = run_script(
        "prepare_instructions.py",
        "--dataset",
        chats,
        "--tokenizer",
        str(tmp_path / "tok"),
        "--output_dir",
        str(tmp_path / "chat_out"),
        "--max_length",
        "4096",
        tmp_path=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "chat_out" / "stats.json").read_text())
    assert (stats["format"], stats["count_out"], stats["over_max_length"]) == ("longalpaca", 2, 0)
    assert list(datasets.load_from_disk(str(tmp_path / "chat_out"))["messages"]) == [CHAT[:2], CHAT[2:]]
    assert stats["system_prompt"] is None  # what its rows were given: training with another is told


def test_concat_rows_are_all_full_where_trl_wraps_each_batch_alone(tok):
    """TRL's "wrapped" packs each map batch of 1000 documents alone, leaving a short row per batch; `full_rows`
    joins all of them: every row exactly max_length, the stream in order, only the final remainder dropped, and
    TRL's own packing of the result (what SFTTrainer does next) changes nothing."""
    from trl.data_utils import pack_dataset

    max_length = 48
    texts = [DOCS[i % len(DOCS)][: 10 + 7 * (i % 9)] for i in range(2500)]
    tokenized, stats = D.tokenize_documents(datasets.Dataset.from_dict({"text": texts}), tok, TextDataConfig("x"))
    short = [n for n in map(len, pack_dataset(tokenized, max_length, "wrapped")["input_ids"]) if n < max_length]
    assert len(short) >= 2  # batches of 1000 documents end in short rows, not only the last: padded mid-stream

    rows, out = D.full_rows(tokenized, stats, max_length)
    stream = [t for ids in tokenized["input_ids"] for t in ids]
    assert {len(ids) for ids in rows["input_ids"]} == {max_length}
    assert out["rows"] == len(rows) == len(stream) // max_length
    assert out["tokens_dropped_remainder"] == len(stream) % max_length > 0
    assert [t for ids in rows["input_ids"] for t in ids] == stream[: len(rows) * max_length]
    assert pack_dataset(rows, max_length, "wrapped")["input_ids"] == rows["input_ids"]

    exact = tokenized.select(range(1))  # a stream of exactly one row: nothing to drop
    one, out = D.full_rows(exact, {}, len(exact[0]["input_ids"]))
    assert (len(one), out["tokens_dropped_remainder"]) == (1, 0)


def test_big_inputs_are_tokenized_in_small_batches_and_prepared_folders_stay_as_written(tok, tmp_path, monkeypatch):
    """Scale: documents reach the tokenizer at most TOKENIZE_BATCH at a time (datasets' default 1000 book-length
    documents held ~15 GB of Python lists per process); --pack concat over a prepared folder writes no cache copy
    of the rows into it, nor does measuring a prepared folder of conversations copy them there; and a stream over
    int32 offsets is refused in one line before packing."""
    seen = []
    real = D._tokenize_batch
    monkeypatch.setattr(D, "_tokenize_batch", lambda batch, **kw: seen.append(len(batch["text"])) or real(batch, **kw))
    texts = [DOCS[i % len(DOCS)] for i in range(40)]
    tokenized, stats = D.tokenize_documents(datasets.Dataset.from_dict({"text": texts}), tok, TextDataConfig("x"))
    assert len(tokenized) == 40 and max(seen) == D.TOKENIZE_BATCH < 40 and sum(seen) == 40
    folder = tmp_path / "prepared"
    tokenized.save_to_disk(str(folder))
    before = sorted(p.name for p in folder.iterdir())
    rows, _ = D.full_rows(datasets.load_from_disk(str(folder)), stats, 32)
    assert len(rows) == stats["tokens_total"] // 32 and sorted(p.name for p in folder.iterdir()) == before
    chats = tmp_path / "chats"
    datasets.Dataset.from_dict({"messages": [CHAT] * 30}).save_to_disk(str(chats))
    sizes = {p.name: p.stat().st_size for p in chats.iterdir()}
    I.length_report(datasets.load_from_disk(str(chats)), tok, 4096, "truncate")
    added = sum(p.stat().st_size for p in chats.iterdir() if p.name not in sizes)
    assert added < sum(sizes.values()) / 4  # the lengths only, not another copy of the conversations
    with pytest.raises(ValueError, match=r"^--pack concat: 2,147,483,648 tokens are over the 2,147,483,647"):
        D.full_rows(tokenized, {**stats, "tokens_total": 2**31}, 32)


def test_a_text_file_too_big_for_one_document_is_warned_of(tmp_path, monkeypatch, caplog):
    """A .txt file is one document, tokenized in one call: above ONE_DOCUMENT_WARN_CHARS the user is told what it
    costs and how to split it; a smaller one is read without a word."""
    from longqlora.data import sources

    monkeypatch.setattr(sources, "ONE_DOCUMENT_WARN_CHARS", 1000)
    for name, chars in (("small.txt", 900), ("big.txt", 4000)):
        (tmp_path / name).write_text("word " * (chars // 5))
        sources.check_text_file(f"--dataset {name}", str(tmp_path / name))
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and warned[0].startswith("--dataset big.txt: 0 MB of text is one document")
    assert "one file per document or JSONL" in warned[0]


def test_rolled_shift_refuses_rows_it_cannot_train_before_loading(tmp_path):
    """LongLoRA's roll knows no documents or padding: --pack documents and conversations are refused by resolve in
    one line (before, a packed batch failed inside the first forward)."""
    from longqlora.model import ModelConfig
    from longqlora.training.config import RunConfig, TrainingConfig
    from longqlora.training.run import resolve

    model_cfg = ModelConfig(
        model_name_or_path="unused", target_context=4096, s2_shift="rolled", s2_group_schedule="none"
    )
    for data_cfg in (TextDataConfig(dataset="unused"), InstructionDataConfig(dataset="unused")):
        with pytest.raises(ValueError, match=r"^--s2_shift rolled: .*--pack concat"):
            resolve(model_cfg, data_cfg, RunConfig(tiny=True), TrainingConfig(output_dir=str(tmp_path / "o")))
    assert not (tmp_path / "o" / "tiny-base").exists()


def test_a_bad_turn_is_numbered_as_in_the_record():
    from longqlora.data.formats import conversation_problem

    turns = [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]
    assert conversation_problem(turns) == "message 2 is user, expected assistant"
    with_system = [{"role": "system", "content": "be brief"}, *turns]
    assert conversation_problem(with_system) == "message 3 is user, expected assistant"


# ------------------------------------------------------------------------------------------- prepared token rows


def prepare(tok, tmp_path, name="prepared", **cfg):
    """The README's first step, data_prep/prepare_text.py's run: DOCS as a folder of .txt files, tokenized by `tok`
    (saved, then loaded by its path as the script does) into save_to_disk + stats.json."""
    from conftest import load_script

    books = tmp_path / "books"
    if not books.exists():
        books.mkdir()
        for i, doc in enumerate(DOCS):
            (books / f"{i}.txt").write_text(doc)
    tok_dir = tmp_path / f"tok_{name}"
    tok.save_pretrained(tok_dir)
    script = load_script("data_prep/prepare_text.py")
    out = tmp_path / name
    script.run(TextDataConfig(str(books), **cfg), script.ScriptArguments(tokenizer=str(tok_dir), output_dir=str(out)))
    return str(books), str(out)


@pytest.mark.parametrize("pack", ["documents", "concat"])
def test_prepared_rows_train_as_the_text_they_came_from(tok, tmp_path, pack, caplog):
    """README: prepare_text.py --output_dir D, then a recipe's --dataset D. The training data path takes the saved
    token rows as they are (no second tokenization, no second EOS) and yields exactly the ids the text path does:
    --min_length, the packable check and --pack concat's full rows apply the same; TRL packs them unchanged."""
    from transformers import LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from longqlora.training.run import load_data, prepare_dataset
    from longqlora.training.tiny import tiny_llama_config

    books, out = prepare(tok, tmp_path)
    saved = [list(ids) for ids in datasets.load_from_disk(out)["input_ids"]]
    assert saved == [tok(d)["input_ids"] + [tok.eos_token_id] for d in DOCS]
    cut, max_length = min(map(len, saved)) + 1, 40  # --min_length drops the shortest documents
    cfg = TextDataConfig(out, pack=pack, min_length=cut)
    loaded = load_data(cfg, vocab_size=len(tok))
    assert loaded.column_names == ["input_ids"] and [list(ids) for ids in loaded["input_ids"]] == saved
    rows, stats = prepare_dataset(cfg, tok, max_length, loaded)
    # prepared with the default --pack documents (stats.json says so): training with another --pack is told
    assert ("was prepared with --pack documents (its stats.json); this run packs --pack concat" in caplog.text) == (
        pack == "concat"
    )
    kept = [ids for ids in saved if len(ids) >= cut]
    if pack == "documents":
        assert [list(ids) for ids in rows["input_ids"]] == kept
    else:
        stream = [t for ids in kept for t in ids]
        assert [list(ids) for ids in rows["input_ids"]] == [
            stream[i : i + max_length] for i in range(0, len(stream) - max_length + 1, max_length)
        ]
    from_text, text_stats = prepare_dataset(TextDataConfig(books, pack=pack, min_length=cut), tok, max_length)
    assert rows["input_ids"] == from_text["input_ids"]
    assert {k: v for k, v in stats.items() if k not in ("dataset", "prepared") and not k.startswith("tokenizer")} == (
        {k: v for k, v in text_stats.items() if k != "dataset"}
    )
    assert (
        stats["prepared"]
        and stats["tokenizer_vocab_size"] == len(tok)
        and stats["documents_out"] == len(kept) < len(DOCS)
    )

    trainer = SFTTrainer(
        model=LlamaForCausalLM(tiny_llama_config()),
        processing_class=tok,
        train_dataset=rows,
        args=SFTConfig(
            output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True, bf16=False, shuffle_dataset=False,
            activation_checkpointing=True, packing=True, packing_strategy=D.packing_strategy(pack),
            max_length=max_length,
        ),
    )  # fmt: skip
    packed = trainer.train_dataset["input_ids"]
    assert sorted(t for ids in packed for t in ids) == sorted(t for ids in rows["input_ids"] for t in ids)
    if pack == "concat":
        assert packed == rows["input_ids"]


def test_prepared_rows_of_another_tokenizer_are_refused_in_one_line(tok, tmp_path):
    books, out = prepare(tok, tmp_path)
    cfg = TextDataConfig(out)
    loaded = D.load_training_text(cfg)
    from longqlora.data import corpora

    other = train_tokenizer([corpora.book("austen_persuasion")[:20_000]], vocab_size=320)
    assert len(other) == len(tok)  # the same size: only the vocabulary tells them apart
    message = error_of(D.prepare_training_text, loaded, other, cfg, 40)
    assert message.startswith(f"--dataset {out}: tokenized by {tmp_path / 'tok_prepared'} (320 tokens, vocabulary ")
    assert message.endswith(f"re-run data_prep/prepare_text.py with --tokenizer {other.name_or_path}")
    # the same vocabulary with another EOS (Llama-3 base and Instruct): every row would end in the other token
    other_end = copy.deepcopy(tok)
    other_end.eos_token = "<unk>"
    message = error_of(D.prepare_training_text, loaded, other_end, cfg, 40)
    assert ", BOS/EOS ids 1/2), not by the model's tokenizer (320 tokens, vocabulary " in message
    assert "BOS/EOS ids 1/0); re-run" in message
    high = max(max(ids) for ids in loaded["input_ids"])
    assert error_of(D.load_training_text, cfg, vocab_size=high) == (  # before any weights load
        f"--dataset {out}: holds token id {high}, beyond the model's {high} embeddings: tokenized with another "
        "tokenizer; re-run data_prep/prepare_text.py with the model's --tokenizer"
    )
    D.load_training_text(cfg, vocab_size=high + 1)

    # token rows saved some other way (no stats.json): ids beyond the model's tokenizer are refused, others warn
    saved = datasets.load_from_disk(out)
    bare = str(tmp_path / "bare")
    saved.save_to_disk(bare)
    small = train_tokenizer(DOCS, vocab_size=high)  # one id short
    bare_cfg = TextDataConfig(bare)
    message = error_of(D.prepare_training_text, D.load_training_text(bare_cfg), small, bare_cfg, 40)
    assert message.startswith(f"--dataset {bare}: holds token id {high}, beyond the model's tokenizer of {len(small)}")
    rows, stats = D.prepare_training_text(D.load_training_text(bare_cfg), tok, bare_cfg, 40)
    assert rows["input_ids"] == saved["input_ids"] and stats["eos_appended"] is None

    assert (
        error_of(D.load_documents, cfg)
        == f"--dataset {out}: holds token ids (input_ids), not text; pass the text it came from"
    )
    datasets.Dataset.from_dict({"input_ids": [["a", "b"]]}).save_to_disk(tmp_path / "strings")
    assert error_of(D.load_training_text, TextDataConfig(str(tmp_path / "strings"))).startswith(
        f"--dataset {tmp_path / 'strings'}: its input_ids column holds List(Value('string')), not lists of token ids"
    )
    datasets.Dataset.from_dict({"input_ids": [[], [5, -1]]}).save_to_disk(tmp_path / "negative")
    assert error_of(D.load_training_text, TextDataConfig(str(tmp_path / "negative"))) == (
        f"--dataset {tmp_path / 'negative'}: holds the negative token id -1, not a token; "
        "re-run data_prep/prepare_text.py"
    )


def test_recipe_trains_on_prepared_data(tmp_path, monkeypatch, capsys):
    """The README's two commands on a tiny random Llama: prepare_text.py, then the recipe with --dataset."""
    from conftest import load_script
    from safetensors.torch import load_file

    from longqlora.cli import run_recipe
    from longqlora.data import corpora
    from longqlora.model_files import load_tokenizer
    from longqlora.training.tiny import save_tiny_model

    text = corpora.book("austen_persuasion")[:40_000]
    base = save_tiny_model(tmp_path / "base", texts=[text], max_position_embeddings=64)
    books, out = prepare(load_tokenizer(str(base)), tmp_path)
    written = sorted(p.name for p in Path(out).iterdir())
    recipe = load_script("recipes/extend_7b_8k.py")
    argv = f"""--model_name_or_path {base} --target_context 256 --compute_dtype float32 --attn_backend sdpa
        --dataset {out} --output_dir {tmp_path / "run"} --max_steps 2 --save_steps 2 --logging_steps 1
        --gradient_accumulation_steps 1 --warmup_steps 0 --optim adamw_torch --use_cpu true --learning_rate 1e-3"""
    adapter = run_recipe(recipe.Model, recipe.Data, recipe.Training, argv=argv.split())
    record = json.loads((adapter / "longqlora_extension.json").read_text())
    assert record["data"]["prepared"] and record["data"]["tokenizer_vocab_size"] == 320
    assert np.isfinite(record["train"]["mean_loss"]) and record["train"]["steps"] == 2
    assert any("lora_A" in name for name in load_file(adapter / "adapter_model.safetensors"))
    assert sorted(p.name for p in Path(out).iterdir()) == written  # no cache of the run's maps left in the folder
    assert datasets.is_caching_enabled()  # the run turned datasets' caching off for its maps only

    # a model whose tokenizer did not make the rows (same size, other vocabulary): refused before weights load
    other = save_tiny_model(
        tmp_path / "other", texts=[corpora.book("austen_emma")[:40_000]], max_position_embeddings=64
    )
    argv = argv.replace(str(base), str(other)).replace(str(tmp_path / "run"), str(tmp_path / "run2"))

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the prepared rows' tokenizer was checked")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_weights)
    with pytest.raises(SystemExit) as ended:
        run_recipe(recipe.Model, recipe.Data, recipe.Training, argv=argv.split())
    assert ended.value.code == 2 and f"--dataset {out}: tokenized by " in capsys.readouterr().err
    assert not (tmp_path / "run2").exists()


def test_a_bundled_book_is_a_dataset_by_name(tmp_path, monkeypatch):
    """--dataset austen_emma reads the bundled book (as --haystack and perplexity's --data take it), never the hub;
    a local path of that name comes first."""
    from longqlora.data import corpora, sources

    found = sources.resolve("austen_emma")
    assert (found.kind, found.path) == ("txt", corpora.book_path("austen_emma"))
    assert sources.resolve("someone/corpus").kind == "hub"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "austen_emma").mkdir()
    assert sources.resolve("austen_emma").path == "austen_emma"
