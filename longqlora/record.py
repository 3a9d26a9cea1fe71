"""The extension record every adapter carries (`longqlora_extension.json`): one type, written by training and read
by inference, chat and merge.

It says what the adapter extends (base, pre-trained and target context, PI factor), how it was trained (attention
with the group sizes actually scheduled, PoSE, LoRA, precision, the memory plan) and what came of it (data and
training statistics). Readers take what they know and ignore the rest, so records of older versions still load.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from longqlora.output import write_json_atomic

EXTENSION_FILE = "longqlora_extension.json"
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's
REPORT_FILE = "merge_report.json"  # what merge writes beside a merged model (inference reads it too)


@dataclass(frozen=True)
class ExtensionRecord:
    model: str  # the base as the run named it
    original_context: int
    target_context: int
    pi_factor: float
    rope_type: str | None = None
    compute_dtype: str | None = None
    load_in_4bit: bool | None = None
    attn_backend: str | None = None
    s2_attention: bool = False
    # shift, sink_tokens, full_heads, full_every and group_sizes: the groups trained, in order, one per equal share
    # of the steps (not a single nominal group: the default schedule trains three)
    s2_options: dict | None = None
    pose: dict | None = None  # {"window", "chunks"} when PoSE trained the adapter
    lora: dict = field(default_factory=dict)  # r, target, trainable_modules, trainable_params, total_params
    memory_plan: dict | None = None
    data: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    model_path: str | None = None  # the base's absolute path, where the run named a local directory
    # the base's config attributes as trained (RoPE scaling, context): from_pretrained(base, **config) applies them
    config: dict | None = None
    settings: dict | None = None  # flag -> value of what decided each step (a resume must keep them)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def write(self, directory) -> Path:
        """Write the record into `directory` atomically; returns its path."""
        return write_json_atomic(Path(directory) / EXTENSION_FILE, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> ExtensionRecord:
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__}, not an object")
        data = dict(data)
        # Records written before this type kept the LoRA settings at the top level: read them into `lora`.
        old = {
            "lora_r": "r",
            "lora_target": "target",
            "trainable_modules": "trainable_modules",
            "trainable_params": "trainable_params",
            "total_params": "total_params",
        }
        lora = {new: data.pop(key) for key, new in old.items() if key in data}
        if lora and not data.get("lora"):
            data["lora"] = lora
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def read(cls, directory) -> ExtensionRecord | None:
        """The record in `directory`, or None when it has none (an adapter not written by this toolkit)."""
        path = Path(os.path.expanduser(str(directory))) / EXTENSION_FILE
        if not path.is_file():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as err:  # bad JSON, or a record without the contexts
            raise ValueError(
                f"{path}: not a valid extension record ({err}); retrain, or remove the file to load "
                "the adapter with --target_context"
            ) from err


def adapter_config(adapter) -> dict:
    """`--adapter`'s adapter_config.json as a dict: every reader of the file goes through here, so a missing or
    malformed one is one line naming the flag and the file (PEFT's own error named neither)."""
    file = Path(os.path.expanduser(str(adapter))) / ADAPTER_CONFIG
    if not file.is_file():
        raise ValueError(f"--adapter {adapter}: not a PEFT adapter directory (no {ADAPTER_CONFIG})")
    try:
        config = json.loads(file.read_bytes())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(
            f"--adapter {adapter}: {ADAPTER_CONFIG} is not valid JSON ({err}); save the adapter again"
        ) from err
    if not isinstance(config, dict):
        raise ValueError(
            f"--adapter {adapter}: {ADAPTER_CONFIG} is not a JSON object (a {type(config).__name__}); "
            "save the adapter again"
        )
    return config
