"""Trainer callbacks of every run: throughput and peak memory in each log line, the extension record in every
checkpoint (the S2 schedule's callback lives with the schedule, attention/schedule.py; the checkpoint guard with the
checkpoints)."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


class ThroughputCallback(TrainerCallback):
    """Adds tokens/s and peak memory to every log line (transformers' callback interface, not a subclass tree)."""

    def __init__(self):
        self._last = None

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():  # the training peak, not the loading's
            torch.cuda.reset_peak_memory_stats()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        now, seen = time.perf_counter(), state.num_input_tokens_seen
        if self._last is not None and now > self._last[0]:
            logs["tokens_per_second"] = round((seen - self._last[1]) / (now - self._last[0]), 1)
        self._last = (now, seen)
        if torch.cuda.is_available():
            logs["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        else:  # peak resident memory of this process (Linux reports KiB)
            logs["peak_memory_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


class RecordCallback(TrainerCallback):
    """Writes the extension record into every checkpoint the Trainer is about to save, so that evaluating, chatting
    with or merging a `checkpoint-N` applies the context extension it trained with (without it, the base's own
    RoPE). Before the save, not after: the Trainer writes trainer_state.json, which marks a checkpoint complete,
    last. `record(step)` builds the record of the run at that step."""

    def __init__(self, record: Callable):
        self._record = record

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save and args.should_save:  # after DefaultFlowCallback and the guard decided
            path = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            path.mkdir(parents=True, exist_ok=True)
            self._record(state.global_step).write(path)
