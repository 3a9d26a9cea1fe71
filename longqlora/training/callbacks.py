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


def peak_memory_gib() -> float:
    """The peak GPU memory allocated since the last reset, or on a CPU the process's peak resident memory."""
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # Linux reports KiB


# Left out of every log line: transformers' tokens/s since the start (evaluations and saves counted) beside ours,
# and TRL's token counters, which restart at a resume and count training tokens in evaluation lines. (The runtime
# stays: a run finished from its checkpoint has no other record of its training time.)
NOISY_KEYS = ("train_tokens_per_second", "num_tokens", "eval_num_tokens")


class ThroughputCallback(TrainerCallback):
    """Adds to every training log line its tokens/s over the training steps since the previous line (evaluation
    and checkpoint saving left out) and the peak memory (`peak_memory_gib`), in the line, the Trainer's log history
    and every reporter (TensorBoard): `lead` puts it before them. Transformers' callback interface, no subclass."""

    def __init__(self):
        self._tokens, self._seconds, self._began = None, 0.0, None

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():  # the training peak, not the loading's
            torch.cuda.reset_peak_memory_stats()
        self._tokens = state.num_input_tokens_seen  # a resumed run's count at its checkpoint

    def on_step_begin(self, args, state, control, **kwargs):
        self._began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._began is not None:
            self._seconds += time.perf_counter() - self._began
            self._began = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        added, noisy = {}, NOISY_KEYS if "loss" in logs or "eval_loss" in logs else ()
        if "loss" in logs:
            seen = state.num_input_tokens_seen
            if self._seconds > 0 and self._tokens is not None:
                added["tokens_per_second"] = round((seen - self._tokens) / self._seconds, 1)
            self._tokens, self._seconds = seen, 0.0
            added["peak_memory_gib"] = peak_memory_gib()
        for entry in (logs, state.log_history[-1] if state.log_history else {}):  # the history holds a copy
            for key in noisy:
                entry.pop(key, None)
            entry.update(added)


def lead(trainer, callback: TrainerCallback) -> None:
    """Put `callback` first among the trainer's callbacks, before the reporters, so what it adds to a log line
    reaches them (the Trainer puts its own and the reporters before the callbacks it is given)."""
    trainer.callback_handler.callbacks.insert(0, callback)


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
