"""The extension record (longqlora.record): written and read back equal, older records still read, a broken one is one
line naming the file."""

import json

import pytest

from longqlora.evaluation.loading import read_extension
from longqlora.record import EXTENSION_FILE, ExtensionRecord


def record() -> ExtensionRecord:
    return ExtensionRecord(
        model="base",
        original_context=4096,
        target_context=16384,
        pi_factor=4.0,
        rope_type="linear",
        compute_dtype="bfloat16",
        load_in_4bit=True,
        s2_attention=True,
        s2_options={"group_sizes": [1024, 3072, 8192], "shift": "leakfree"},
        lora={"r": 8, "trainable_params": 123},
        train={"steps": 2, "final_loss": 1.5},
    )


def test_write_then_read_is_equal(tmp_path):
    written = record()
    path = written.write(tmp_path)
    assert path == tmp_path / EXTENSION_FILE and (path.stat().st_mode & 0o777) == 0o644
    assert ExtensionRecord.read(tmp_path) == written
    assert json.loads(path.read_text())["s2_options"]["group_sizes"] == [1024, 3072, 8192]


def test_a_record_of_an_older_version_reads_and_its_unknown_keys_are_ignored(tmp_path):
    old = {
        "model": "base",
        "original_context": 128,
        "target_context": 512,
        "pi_factor": 4.0,
        "group_size": 128,  # the nominal group older versions recorded
        "lora_r": 8,
        "trainable_modules": "embed,norm",
        "train": {"final_loss": 2.0},
    }
    (tmp_path / EXTENSION_FILE).write_text(json.dumps(old))
    got = ExtensionRecord.read(tmp_path)
    assert (got.target_context, got.pi_factor, got.train) == (512, 4.0, {"final_loss": 2.0})
    assert got.s2_options is None and got.lora == {"r": 8, "trainable_modules": "embed,norm"}


def test_no_record_and_a_broken_record(tmp_path):
    assert ExtensionRecord.read(tmp_path) is None
    (tmp_path / "adapter_config.json").write_text("{}")
    assert read_extension(tmp_path) is None  # a PEFT adapter not written by this toolkit
    (tmp_path / EXTENSION_FILE).write_text('{"model": "base"}')  # no contexts
    with pytest.raises(ValueError, match=f"{EXTENSION_FILE}: not a valid extension record"):
        read_extension(tmp_path)
    for broken in ("{not json", "null", "[1, 2]"):
        (tmp_path / EXTENSION_FILE).write_text(broken)
        with pytest.raises(ValueError, match="not a valid extension record"):
            ExtensionRecord.read(tmp_path)
