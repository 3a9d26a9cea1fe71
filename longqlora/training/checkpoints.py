"""Interruptions lose nothing: one run per output directory, checkpoints known to be complete, resume from the
last complete one, and a clean stop on Ctrl-C or SIGTERM.

transformers' Trainer writes `checkpoint-N` in place (`Trainer._save_checkpoint`): the weights, then the optimizer,
scheduler and RNG state, and `trainer_state.json` last. A kill -9 in between leaves a folder that
`get_last_checkpoint` would hand to `resume_from_checkpoint`, and a missing optimizer.pt is silently skipped there.
Here a checkpoint counts as complete only when its trainer_state.json parses and names its step and the files
written before it are present (safetensors headers intact); a newer folder that is not complete is moved aside
(`incomplete-checkpoint-N`) with a warning and never loaded. Before the Trainer saves over an existing folder, its
trainer_state.json is removed, so a save cut short there is not taken for complete either.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

LOCK_FILE = ".longqlora.lock"
STATE_FILE = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")  # transformers.trainer_utils._re_checkpoint
ASIDE_PREFIX = "incomplete-"  # not matched by the Trainer's `checkpoint-*` rotation nor by get_last_checkpoint
AUTO = ("auto", "last", "true")
# What a run leaves in its output directory before its first checkpoint: the lock, and --tiny's random base
# (training/tiny.py), which a rerun of --tiny reuses, with its lock and, while the main process writes it (the other
# processes of a launch check the folder meanwhile), its partial folder `.tiny-base.partial-*`
OWN_BEFORE_TRAINING = (LOCK_FILE, "tiny-base")
TINY_BASE_TEMPORARIES = ".tiny-base."


@contextmanager
def output_lock(output_dir):
    """Hold `output_dir`'s lock file while a run writes there: a second run on it refuses in one line. The lock is
    an OS file lock (filelock: flock on Unix), released by the kernel when the process ends, even by kill -9."""
    from filelock import FileLock, Timeout

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ValueError(
            f"--output_dir {output_dir}: another run is writing there (it holds {LOCK_FILE}); wait "
            "for it to end or choose another --output_dir"
        ) from None
    try:
        yield out
    finally:
        lock.release()


def checkpoint_problem(path: Path, *, with_optimizer: bool = True) -> str:
    """Why the checkpoint folder `path` cannot be resumed from, or '' when it is complete."""
    from longqlora.model_files import safetensors_problem

    state = path / STATE_FILE
    if not state.is_file():
        return f"no {STATE_FILE} (written last): the save was cut short"
    try:
        step = json.loads(state.read_text())["global_step"]
    except (ValueError, KeyError, TypeError):
        return f"{STATE_FILE} does not parse: the save was cut short"
    match = CHECKPOINT.match(path.name)
    if match and step != int(match.group(1)):
        return f"{STATE_FILE} is for step {step}"
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        return "no .safetensors weights"
    for file in weights:
        if safetensors_problem(file):  # the header must read and the file cover its data
            return f"{file.name} is damaged"
    # One process writes optimizer.pt; FSDP writes optimizer.bin (or a folder of shards), DeepSpeed a
    # global_step* folder that holds the optimizer and scheduler.
    deepspeed = any(path.glob("global_step*"))
    optimizer = deepspeed or any((path / name).exists() for name in ("optimizer.pt", "optimizer.bin", "optimizer_0"))
    missing = []
    if with_optimizer and not optimizer:
        missing.append("optimizer.pt")
    if with_optimizer and not (deepspeed or (path / "scheduler.pt").is_file()):
        missing.append("scheduler.pt")
    if with_optimizer and not any(path.glob("rng_state*.pth")):
        missing.append("rng_state.pth")
    return f"no {', '.join(missing)}" if missing else ""


def _move_aside(path: Path) -> Path:
    aside = path.with_name(ASIDE_PREFIX + path.name)
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{ASIDE_PREFIX}{path.name}-{n}")
    path.rename(aside)
    return aside


def _checkpoints(output_dir) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint-N` folder in `output_dir`, newest first."""
    out = Path(output_dir)
    children = out.iterdir() if out.is_dir() else ()
    return sorted(
        ((int(m.group(1)), p) for p in children if p.is_dir() and (m := CHECKPOINT.match(p.name))), reverse=True
    )


def _resuming(requested) -> bool:
    return requested is not None and str(requested).lower() not in ("", "false", "none")


def check_new_run(output_dir, requested) -> None:
    """A new run (no resume asked) refuses an `output_dir` that holds an earlier run's checkpoints: resumed later
    with auto, it would take the other run's newest checkpoint (its steps outnumber the new run's), and the
    Trainer's rotation (`save_total_limit`) would delete the new run's own checkpoints first. It refuses anything
    else it did not write there too (a finished run's adapter, the user's files): it would write its adapter, README,
    tokenizer and record over files of the same names and mix its folder with the others."""
    if _resuming(requested):
        return
    found = _checkpoints(output_dir)
    if found and (Path(output_dir) / "adapter_config.json").exists():
        raise ValueError(
            f"--output_dir {output_dir} holds a finished run (its adapter and {len(found)} checkpoints): choose "
            "another --output_dir, or train it further with --resume_from_checkpoint auto and a larger --max_steps"
        )
    if found:
        raise ValueError(
            f"--output_dir {output_dir} holds an earlier run's checkpoints ({found[0][1].name}, {len(found)} in "
            "all): pass --resume_from_checkpoint auto to continue that run, or choose another --output_dir"
        )
    out = Path(output_dir)
    own = lambda name: name in OWN_BEFORE_TRAINING or name.startswith((ASIDE_PREFIX, TINY_BASE_TEMPORARIES))  # noqa: E731
    others = sorted(p.name for p in out.iterdir() if not own(p.name)) if out.is_dir() else []
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        what = "a finished run's adapter" if "adapter_config.json" in others else "files that are not a run's"
        raise ValueError(
            f"--output_dir {output_dir} holds {what} ({shown}), which a new run would write over or among: "
            "choose a new or empty --output_dir"
        )


def check_named_resume(output_dir, requested, *, with_optimizer: bool = True) -> str | None:
    """A checkpoint named by path, checked before --tiny writes its base or any input is read (auto looks under the
    output lock only, in `locked_run`); None for auto or no resume."""
    if _resuming(requested) and str(requested).lower() not in AUTO:
        return resume_checkpoint(output_dir, requested, with_optimizer=with_optimizer)
    return None


def check_same_run(checkpoint: str | None, run: dict) -> None:
    """Refuse a checkpoint that another run wrote: the Trainer would load its weights, optimizer, scheduler (its
    learning rate) and step into this run without a word. `run` maps flags to this run's values, compared with the
    record the checkpoint holds (RecordCallback); a checkpoint without a record is not checked, nor a setting that
    an older record lacks."""
    from longqlora.record import ExtensionRecord

    record = ExtensionRecord.read(checkpoint) if checkpoint else None
    if record is None:
        return
    lora = record.lora or {}
    recorded = {
        "--model_name_or_path": record.model,
        "--target_context": record.target_context,
        "--lora_r": lora.get("r"),
        "--lora_alpha": lora.get("alpha"),
        "--lora_target": lora.get("target"),
        "--trainable_params": lora.get("trainable_modules"),
        "--rope_scaling": record.rope_type,
        "--original_context": record.original_context,
        "--load_in_4bit": record.load_in_4bit,
    }
    theirs = {flag: value for flag, value in recorded.items() if value is not None} | (record.settings or {})
    for flag, ours in run.items():
        if flag not in theirs:  # a record of an older version
            continue
        other = theirs[flag]
        same = other == ours
        if flag in ("--lora_target", "--trainable_params") and not same:  # comma lists: any order, any spaces
            same = _items(other) == _items(ours)
        if flag == "--model_name_or_path" and not same:
            same = _same_model(Path(os.path.expanduser(str(other))), Path(os.path.expanduser(str(ours))))
        if not same:
            raise ValueError(
                f"--resume_from_checkpoint {checkpoint}: written by a run with {flag} {other}, this run has {ours}; "
                "resume with that run's settings, or start anew in another --output_dir"
            )


def _items(spec) -> set[str]:
    return {item.strip() for item in str(spec).split(",") if item.strip()}


def _same_model(a: Path, b: Path) -> bool:
    """Whether two names can be the same model: one folder, or copies (a run's output folder copied elsewhere takes
    its --tiny base along: the same config.json and safetensors file sizes). A recorded path that does not exist
    from here (relative to where that run started) cannot be compared and is taken as the same; two names that
    are no folders (hub ids) are the same only when equal."""
    if a.is_dir() != b.is_dir():
        return not a.exists() or not b.exists()
    if not a.is_dir():
        return False
    if a.resolve() == b.resolve():
        return True

    def identity(folder: Path):
        config = folder / "config.json"
        saved = json.loads(config.read_text()) if config.is_file() else None
        if isinstance(saved, dict):
            saved.pop("_name_or_path", None)
        return saved, sorted((f.name, f.stat().st_size) for f in folder.glob("*.safetensors"))

    return identity(a) == identity(b)


def resume_checkpoint(output_dir, requested, *, with_optimizer: bool = True) -> str | None:
    """The checkpoint `--resume_from_checkpoint requested` means: for auto/last/true the newest complete one in
    `output_dir` (newer incomplete ones are moved aside with a warning) or None; a path must be complete. A new run
    is checked by `check_new_run`, which `training.run.resolve` calls before any input is read."""
    if not _resuming(requested):
        return None
    if str(requested).lower() in AUTO:
        for _, path in _checkpoints(output_dir):
            problem = checkpoint_problem(path, with_optimizer=with_optimizer)
            if not problem:
                logger.info("resuming from %s", path)
                return str(path)
            if with_optimizer and not checkpoint_problem(path, with_optimizer=False):
                # Its trainer_state.json (written last) is there: a finished save of weights only, not a cut one.
                raise ValueError(
                    f"--resume_from_checkpoint {requested}: {path.name} holds weights but {problem} (saved with "
                    "--save_only_model true); resume with --save_only_model true (a new optimizer state) or choose "
                    "another --output_dir"
                )
            logger.warning("skipping %s: %s; moved to %s, never loaded", path, problem, _move_aside(path).name)
        logger.info("no complete checkpoint in %s: starting from step 0", output_dir)
        return None
    path = Path(str(requested)).expanduser()
    problem = checkpoint_problem(path, with_optimizer=with_optimizer) if path.is_dir() else "no such directory"
    if problem:
        raise ValueError(
            f"--resume_from_checkpoint {requested}: {problem}; pass auto to take the last complete checkpoint"
        )
    return str(path)


@contextmanager
def locked_run(output_dir, requested, *, with_optimizer: bool = True, lock: bool = True):
    """Hold the output lock for a training run and yield the checkpoint to resume from (`resume_checkpoint`): a
    named checkpoint is checked before anything is written; auto looks, and moves aside, under the lock only.
    lock=False (the other processes of a multi-process run, whose main process holds the lock): yield None."""
    if not lock:
        yield None
        return
    auto = str(requested).lower() in AUTO
    resume = None if auto else resume_checkpoint(output_dir, requested, with_optimizer=with_optimizer)
    with output_lock(output_dir):
        yield resume_checkpoint(output_dir, requested, with_optimizer=with_optimizer) if auto else resume


def remove_aside(output_dir) -> None:
    """After a run completes, the incomplete checkpoints moved aside on resume are of no use: remove them."""
    for path in Path(output_dir).glob(f"{ASIDE_PREFIX}checkpoint-*"):
        shutil.rmtree(path, ignore_errors=True)


class CheckpointGuard(TrainerCallback):
    """Removes a checkpoint folder's trainer_state.json before the Trainer saves over it, and, once `stop_signal`
    is set (by `stop_on_signals`), saves a checkpoint after the current step and stops training."""

    def __init__(self):
        self.stop_signal: str | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if args.world_size > 1:  # a signal may reach the processes on either side of a step: all stop at the same one
            import torch
            import torch.distributed as dist

            flag = torch.tensor([int(self.stop_signal is not None)], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and self.stop_signal is None:
                self.stop_signal = "a signal to another process"
        if self.stop_signal is not None and not control.should_training_stop:
            logger.warning("%s: saving checkpoint-%d and stopping", self.stop_signal, state.global_step)
            control.should_save = control.should_training_stop = True
        if control.should_save and state.is_world_process_zero:  # set by DefaultFlowCallback, which runs first
            (Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE).unlink(missing_ok=True)
        return control

    def on_save(self, args, state, control, **kwargs):
        # a signal during this step's evaluation or save: the checkpoint just written is the one to stop at (one
        # process; several agree on a signal at a step's end only)
        if self.stop_signal is not None and args.world_size == 1 and not control.should_training_stop:
            logger.warning("%s: checkpoint-%d saved; stopping", self.stop_signal, state.global_step)
            control.should_training_stop = True
        return control


def run_training(trainer, resume: str | None, guard: CheckpointGuard):
    """`trainer.train(resume_from_checkpoint=resume)` under `stop_on_signals(guard)`; returns the run's steps, mean
    and last loss and tokens (`tokens_total`), and the tokens and seconds of this call (a resumed run's from its
    checkpoint on, so that tokens / seconds is its throughput). A checkpoint that already holds the run's last
    step is loaded as it is: resumed there, the Trainer would train one step past --max_steps. Raises Interrupted
    when a signal stopped the run."""
    from transformers import TrainerState

    from longqlora.errors import Interrupted
    from longqlora.training.summary import run_losses

    max_steps = trainer.args.max_steps
    saved = json.loads((Path(resume) / STATE_FILE).read_text()) if resume else {}
    resumed_at = saved.get("global_step")
    if saved.get("max_steps", max_steps) != max_steps and max_steps > 0:
        logger.warning(
            "%s is of a run set for %d steps; this one has --max_steps %d: from here the learning rate and the S2 "
            "group schedule follow the new count (the steps trained so far followed the old)",
            resume,
            saved["max_steps"],
            max_steps,
        )
    if resume and max_steps > 0 and resumed_at >= max_steps:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        logger.info("%s holds the last step (%d): the adapter is written from it", resume, max_steps)
        set_peft_model_state_dict(trainer.model, load_file(str(Path(resume) / "adapter_model.safetensors")))
        state = TrainerState.load_from_json(str(Path(resume) / STATE_FILE))
        trainer.state = state  # the run's record reads its schedule (max_steps) from here, as after training
        return {**run_losses(state), "tokens": 0, "seconds": 0.0, "resumed_at_step": resumed_at}
    if resume and checkpoint_problem(Path(resume)):  # complete for --save_only_model: weights and step only
        logger.warning(
            "%s holds no optimizer state (--save_only_model): the optimizer and the learning rate's warm-up start "
            "anew from it",
            resume,
        )
    from tqdm.contrib.logging import logging_redirect_tqdm

    # log lines written above the progress bar, not glued to its end
    with stop_on_signals(guard), logging_redirect_tqdm([logging.getLogger(), logging.getLogger("transformers")]):
        result = trainer.train(resume_from_checkpoint=resume)
    state = trainer.state
    if guard.stop_signal and state.global_step < state.max_steps:
        raise Interrupted(
            f"{guard.stop_signal} at step {state.global_step} of {state.max_steps}: checkpoint-"
            f"{state.global_step} in {trainer.args.output_dir} holds the run; continue with "
            "--resume_from_checkpoint auto"
        )
    out = {
        **run_losses(state),  # the whole run's: trainer.train's training_loss averages only the steps of this call,
        **({} if resume else {"mean_loss": result.training_loss}),  # which are the run's, unlogged ones too
        "tokens": state.num_input_tokens_seen - saved.get("num_input_tokens_seen", 0),
        "seconds": result.metrics.get("train_runtime"),
    }
    if resume:
        out["resumed_at_step"] = resumed_at
    return out


@contextmanager
def stop_on_signals(guard: CheckpointGuard):
    """While training: the first Ctrl-C (SIGINT) or SIGTERM asks `guard` to save and stop after the current step;
    a second Ctrl-C stops at once (KeyboardInterrupt, possibly inside a save: that checkpoint is then skipped)."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield guard
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        guard.stop_signal = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield guard
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
