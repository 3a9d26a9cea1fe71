"""Instruction data as public datasets shape it: OpenAI content parts, tool calls and reasoning the chat template is
not given, per-turn loss switches, LongAlpaca without an instruction, a pretty-printed JSON object, and a JSONL file
whose later records add a field. Each is trained as written, skipped and counted, or refused in one line."""

import json

import pytest

from longqlora.data import instructions as I
from longqlora.data.instructions import InstructionDataConfig

USER, REPLY = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}


def jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def load(path, **kw):
    stats = {}
    return I.load_conversations(InstructionDataConfig(path, **kw), stats=stats), stats


def error_of(path, **kw) -> str:
    with pytest.raises(ValueError) as info:
        load(path, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_text_content_parts_are_joined_and_other_parts_skipped(tmp_path):
    parts = [{"type": "text", "text": "Read this. "}, {"type": "text", "text": "Then answer."}]
    image = [{"type": "image_url", "image_url": {"url": "x.png"}}, {"type": "text", "text": "What is it?"}]
    rows = [{"messages": [{"role": "user", "content": parts}, {**REPLY, "content": [parts[1]]}]}]
    rows += [{"messages": [{"role": "user", "content": image}, REPLY]}]
    ds, stats = load(jsonl(tmp_path / "parts.jsonl", rows))
    assert ds[0]["messages"] == [
        {"role": "user", "content": "Read this. Then answer."},
        {**REPLY, "content": "Then answer."},
    ]
    assert len(ds) == 1 and stats["skipped_invalid"] == 1  # an image is not text: skipped, counted


def test_tool_calls_reasoning_and_tools_are_skipped_and_counted(tmp_path, caplog):
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    rows = [
        {"messages": [USER, {**REPLY, "content": "Let me check.", "tool_calls": [call]}]},
        {"messages": [USER, {**REPLY, "reasoning_content": "The user greets me."}]},
        {"messages": [USER, REPLY], "tools": [{"type": "function", "function": {"name": "weather"}}]},
        {"messages": [USER, {**REPLY, "tool_calls": []}]},  # an empty field holds nothing: trained
    ]
    path = jsonl(tmp_path / "tools.jsonl", rows)
    with caplog.at_level("WARNING"):
        ds, stats = load(path)
    assert len(ds) == 1 and stats["skipped_invalid"] == 3 == stats["skipped_not_rendered"]
    assert "3 with tool calls, reasoning or tools the chat template is not given" in caplog.text
    assert error_of(path, invalid_conversations="error") == (
        f"--dataset {path} line 1: message 2 has tool_calls, which the chat template is not given (only role and "
        "content); fix it or pass --invalid_conversations skip"
    )


@pytest.mark.parametrize("switch", [{"weight": 0}, {"train": False}, {"training": False}])
def test_a_reply_marked_untrained_is_refused_in_one_line(tmp_path, switch):
    sharegpt = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "not this one", **switch}]
    fine = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a"}]
    path = jsonl(tmp_path / "weights.jsonl", [{"conversations": fine}, {"conversations": sharegpt}])
    key, value = next(iter(switch.items()))
    assert error_of(path) == (
        f"--dataset {path} line 2: 'conversations' item 2: '{key}' {json.dumps(value)} leaves a reply out of the "
        "loss, which is not supported (every reply trains); remove the key, or end the conversation before that reply"
    )
    # axolotl's data marks every system and user turn weight 0: they never train, so that changes nothing
    trained = [{"from": "system", "value": "Be brief.", "weight": 0}, {"from": "human", "value": "hi", "weight": 0}]
    trained += [{"from": "gpt", "value": "this one", "weight": 1}]
    ds, _ = load(jsonl(tmp_path / "ones.jsonl", [{"conversations": trained}]))
    assert ds[0]["messages"][2] == {"role": "assistant", "content": "this one"}
    messages = [{**USER, "weight": 0}, {**REPLY, "weight": 0}]
    assert "line 1: 'messages' item 2: 'weight' 0 leaves a reply out" in error_of(
        jsonl(tmp_path / "m.jsonl", [{"messages": messages}])
    )


def test_longalpaca_without_an_instruction_is_its_input_alone(tmp_path):
    ds, _ = load(jsonl(tmp_path / "la.jsonl", [{"instruction": "", "input": "Document text", "output": "ok"}]))
    assert ds[0]["messages"][0] == {"role": "user", "content": "Document text"}


def test_a_pretty_printed_object_is_named_as_such(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": [{"instruction": "a", "output": "b"}]}, indent=2))
    assert error_of(str(path)) == (
        f"--dataset {path}: one JSON object over several lines (keys: data), not records; pass a JSON array of "
        "records or one record per line (JSONL)"
    )


def test_a_field_first_seen_after_the_first_block_loads(tmp_path):
    """datasets' json loader types columns from its first block (~10 MB): a `system` field first seen after it
    failed to cast; the file is then read whole, every record kept."""
    filler = "word " * 2000
    rows = [{"instruction": f"q{i}", "input": filler, "output": "a"} for i in range(1200)]
    rows += [{"instruction": "late", "input": "", "output": "a", "system": "LATE SYSTEM"}]
    ds, stats = load(jsonl(tmp_path / "big.jsonl", rows))
    assert (tmp_path / "big.jsonl").stat().st_size > 11e6 and stats["conversations_out"] == 1201 == len(ds)
    assert ds[-1]["messages"][0] == {"role": "system", "content": "LATE SYSTEM"}


def test_a_prepared_folder_that_lacks_what_the_run_would_read_is_told(tmp_path, caplog):
    """A folder prepare_instructions wrote with a shorter --max_length and --overlong drop lacks the conversations
    this run's longer rows would hold; one prepared with a system prompt holds it in its rows: both are warned of,
    and a folder prepared as the run would read it is not."""
    import datasets

    folder = tmp_path / "prepared"
    datasets.Dataset.from_dict({"messages": [[USER, REPLY]]}).save_to_disk(folder)
    stats = {"overlong": "drop", "max_length": 256, "dropped": 2, "system_prompt": "A chat.", "count_out": 1}
    (folder / "stats.json").write_text(json.dumps(stats))
    with caplog.at_level("WARNING"):
        assert I.prepared_stats(InstructionDataConfig(str(folder)), 256) == stats
        assert I.prepared_stats(InstructionDataConfig(str(folder), system_prompt="A chat."), 256) == stats
        assert not caplog.text
        I.prepared_stats(InstructionDataConfig(str(folder), system_prompt="Other."), 1024)
    assert (
        "prepared with --max_length 256 --overlong drop: it lacks the 2 conversations longer than that" in caplog.text
    )
    assert "--system_prompt 'Other.': the conversations of --dataset" in caplog.text
    assert (
        I.prepared_stats(InstructionDataConfig(jsonl(tmp_path / "raw.jsonl", [{"messages": [USER, REPLY]}])), 9) == {}
    )
    caplog.clear()  # prepared without a system message: --system_prompt fills it in at training, nothing to tell
    (folder / "stats.json").write_text(json.dumps({**stats, "system_prompt": None}))
    with caplog.at_level("WARNING"):
        I.prepared_stats(InstructionDataConfig(str(folder), system_prompt="Other."), 256)
    assert not caplog.text


def test_the_record_names_the_system_prompt_the_rows_hold():
    """A prepared folder's rows hold the system message they were prepared with, whatever --system_prompt says:
    that one is recorded (chat takes it by default); without a prepared one, --system_prompt."""
    from longqlora.training.summary import _data_record

    cfg = InstructionDataConfig("prepared", system_prompt="Other.")
    assert _data_record(cfg, {"prepared": {"system_prompt": "A chat."}})["system_prompt"] == "A chat."
    assert _data_record(cfg, {"prepared": {"system_prompt": None}})["system_prompt"] == "Other."
    assert "system_prompt" not in _data_record(InstructionDataConfig("raw.jsonl"), {})
