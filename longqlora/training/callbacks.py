"""Trainer callbacks of every run: throughput and peak memory in each log line (the S2 schedule's callback lives
with the schedule, attention/schedule.py; the checkpoint guard with the checkpoints)."""

from __future__ import annotations

import resource
import time

import torch
from transformers import TrainerCallback


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
