"""What a run is, in words and on disk: the description `--dry_run` prints and the run logs, and the extension
record (longqlora.record) every adapter and checkpoint carries."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from longqlora import hardware
from longqlora.attention.schedule import step_settings
from longqlora.data import pose
from longqlora.model import ModelConfig, ModelInfo, extended_config
from longqlora.record import ExtensionRecord
from longqlora.training.optimizer import optimizer_name

if TYPE_CHECKING:
    from longqlora.training.run import ResolvedRun


def s2_options(model_cfg: ModelConfig, max_steps: int | None = None, steps_done: int | None = None) -> dict | None:
    """The S2-Attn settings a run trains with, as recorded: the group sizes in order (one per equal share of the
    steps; with `max_steps`, those that a run of `max_steps` steps reaches, or has reached after `steps_done` of
    them: a checkpoint's record) and the variant options; None with full attention."""
    if not model_cfg.s2_attention:
        return None
    sizes = model_cfg.group_sizes
    if max_steps:
        done = max_steps if steps_done is None else min(steps_done, max_steps)
        reached = [step_settings(step, max_steps, sizes)[0] for step in range(done)]
        sizes = list(dict.fromkeys(reached))
    return {
        "group_sizes": sizes,
        "shift": model_cfg.s2_shift,
        "sink_tokens": model_cfg.s2_sink_tokens,
        "full_heads": model_cfg.s2_full_heads,
        "full_every": model_cfg.s2_full_every,
    }


S2_OPTIONS = ("group_ratio", "s2_shift", "s2_sink_tokens", "s2_full_heads", "s2_full_every")


def resume_settings(model_cfg: ModelConfig, data_cfg, training, info: ModelInfo) -> dict:
    """Flag -> value for what a checkpoint to resume from must have been trained with (checkpoints.check_same_run):
    the weights' shapes and what they were fitted to, and what each step trained."""
    return {
        "--model_name_or_path": info.model,
        "--target_context": info.target_context,
        "--lora_r": model_cfg.lora_r,
        "--lora_alpha": model_cfg.lora_alpha,  # the scale of what the checkpoint's LoRA weights add
        "--lora_target": model_cfg.lora_target,
        "--trainable_params": model_cfg.trainable_params,
        "--rope_scaling": info.rope_type,  # the positions the checkpoint's weights were trained at
        "--original_context": info.original_context,  # and the factor they were stretched by
        "--load_in_4bit": info.load_in_4bit,  # the base (and quantization error) its LoRA weights were fitted to
        **trajectory_settings(model_cfg, data_cfg, training),
    }


def trajectory_settings(model_cfg: ModelConfig, data_cfg, training) -> dict:
    """Flag -> value for the settings that decide what each step trains and in which order: a run resumed with
    another would match neither run and be recorded as the second (the record keeps them for that check). Values
    as they act: a switched-off feature's options are None, the S2 schedule as parsed, the data seed the Trainer
    takes, the chat template by its content."""
    s2 = model_cfg.s2_attention
    return {
        "--s2_attention": s2,
        **{f"--{name}": getattr(model_cfg, name) if s2 else None for name in S2_OPTIONS},
        "--s2_group_schedule": _schedule(model_cfg) if s2 else None,
        "--pose_window": model_cfg.pose_window,
        "--pose_chunks": model_cfg.pose_chunks if model_cfg.pose_window else None,
        "--lora_dropout": model_cfg.lora_dropout,
        "--pack": getattr(data_cfg, "pack", None),
        "--seed": training.seed,
        "--data_seed": training.seed if training.data_seed is None else training.data_seed,
        "--chat_template_path": _file_digest(training.chat_template_path),
        # the Trainer skips a resumed run's first steps x accumulation batches of this run's shape
        ROWS_PER_STEP: training.per_device_train_batch_size
        * training.gradient_accumulation_steps
        * max(1, hardware.launch().world_size // max(1, model_cfg.context_parallel)),
    }


ROWS_PER_STEP = "rows per step (--per_device_train_batch_size x --gradient_accumulation_steps x processes)"


def _schedule(model_cfg: ModelConfig) -> str:
    """The S2 schedule as parsed: " 0.25, 0.75,2" is "0.25,0.75,2", and "1" is "none"."""
    schedule = model_cfg.group_schedule
    return "none" if schedule == [1.0] else ",".join(f"{m:g}" for m in schedule)


def _file_digest(path: str | None) -> str | None:
    if not path:
        return None
    try:
        with open(os.path.expanduser(path), "rb") as f:
            return "sha256:" + hashlib.sha256(f.read()).hexdigest()[:16]
    except OSError:  # read, and refused in one line, where the run takes the template
        return path


def _data_record(data_cfg, stats: dict) -> dict:
    """The data as recorded: the dataset and split read, its statistics (the held-out set's, under "eval", name
    theirs), and the system message conversations without one trained with, or the one every record held (chat
    takes it by default), if any."""
    record = {"dataset": data_cfg.dataset, "split": data_cfg.split, **stats}
    # a prepared folder's rows hold the system message they were prepared with; --system_prompt fills in the others
    prepared = stats.get("prepared") if isinstance(stats.get("prepared"), dict) else {}  # text: True
    system = prepared.get("system_prompt") or getattr(data_cfg, "system_prompt", None)
    system = system or prepared.get("shared_system_prompt") or stats.get("shared_system_prompt")  # the records' own
    if system is not None:
        record["system_prompt"] = system
    return record


def _attention_text(model_cfg: ModelConfig) -> str:
    """How the run trains attention: full, or S2-Attn with its group size(s) and variant options."""
    o = s2_options(model_cfg)
    if o is None:
        return "full"
    sizes = o["group_sizes"]
    text = (
        f"S2-Attn, group {sizes[0]}"
        if len(sizes) == 1
        else f"S2-Attn, group {' -> '.join(map(str, sizes))} (equal shares of the steps)"
    )
    extras = [
        f"1 step in {o['full_every']} full" if o["full_every"] else "",
        f"{o['sink_tokens']} sink tokens" if o["sink_tokens"] else "",
        f"{o['full_heads']:.0%} of heads full" if o["full_heads"] else "",
        "rolled shift" if o["shift"] == "rolled" else "",
    ]
    return ", ".join([text, *filter(None, extras)])


def describe(run: ResolvedRun, trainable_params: int | None = None, total_params: int | None = None) -> str:
    """The resolved configuration, as `--dry_run` prints it and the run logs it, with the parameter counts (of the
    loaded model, or counted without weights)."""

    def plain(value):  # TrainingArguments turns some strings into enums
        return getattr(value, "value", value)

    info, cfg, training = run.info, run.model, run.training
    gpu_optim = (run.plan.get("config") or {}).get("optim", plain(training.optim))  # what the plan is of
    trainable, total = trainable_params, total_params
    steps = f"{training.max_steps} steps" if training.max_steps > 0 else f"{training.num_train_epochs:g} epoch(s)"
    if training.max_steps > 0:  # the workload: rows of the training length (packed rows are full)
        rows = training.max_steps * training.per_device_train_batch_size * training.gradient_accumulation_steps
        steps += f" ({rows:,} rows, {rows * cfg.train_length / 1e6:,.4g}M tokens per data-parallel process)"
    lines = [
        f"model              {info.model}",
        f"context            {info.original_context} -> {info.target_context} tokens "
        f"({info.scaling}, rope {info.rope_type})"
        + (
            "; config.json's max_position_embeddings taken as the pre-trained context "
            "(--original_context N if the model was trained on fewer)"
            if info.pi_factor == 1 and info.rope_type == "default" and not cfg.original_context
            else ""
        ),
        *pose.describe(cfg),
        f"attention          {_attention_text(cfg)} (training), full at inference; backend "
        f"{info.attn_backend_requested} ({info.attn_backend} here)",
        f"weights            {'NF4 4-bit, double quant' if info.load_in_4bit else info.compute_dtype}, "
        f"compute {info.compute_dtype}",
        f"trainable          {'?' if trainable is None else f'{trainable:,}'} of "
        f"{'?' if total is None else f'{total:,}'} parameters "
        f"(LoRA r={cfg.lora_r} on {cfg.lora_target}; full: {cfg.trainable_params or 'nothing'})",
        f"data               {run.data.dataset}"
        + (f" (--pack {run.data.pack})" if getattr(run.data, "pack", None) else ""),
        *(
            [  # the run's settled evaluation (held_out.evaluation_settings): every epoch or --eval_steps steps
                f"evaluation         {held_out} every "
                + ("epoch" if plain(training.eval_strategy) == "epoch" else f"{training.eval_steps:g} steps")
                + ", full attention"
            ]
            if (held_out := getattr(run.data, "eval_dataset", None)) and plain(training.eval_strategy) != "no"
            else []
        ),
        f"steps              {steps} of batch {training.per_device_train_batch_size} x accumulation "
        f"{training.gradient_accumulation_steps}, lr {training.learning_rate} ({plain(training.lr_scheduler_type)}, "
        f"warmup {training.warmup_steps}), max grad norm {training.max_grad_norm}, optim {plain(training.optim)}"
        + (f" here, {gpu_optim} on a GPU" if gpu_optim != optimizer_name(plain(training.optim)) else ""),
        f"precision          {info.compute_dtype} compute"
        + (
            ""
            if info.compute_dtype == "float32"
            else " (mixed precision)"
            if info.device == "cuda"
            else " (mixed precision on a GPU; none on this CPU)"
        ),
        f"output             {training.output_dir}",
    ]
    plan = run.plan
    if plan:
        on = [k for k, v in plan["switches"].items() if v]
        parts = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in plan["parts_gib"].items())
        fit = (
            ""
            if plan.get("fits") is None
            else (" - fits this GPU" if plan["fits"] else f" - does NOT fit this GPU ({plan['device_gib']:.1f} GiB)")
        )
        paged = plan.get("paged_optimizer_gib") or 0
        lines.append(
            f"memory (planned)   peak {plan['peak_allocated_gib']:.2f} GiB allocated"
            + (f" per rank of {plan['context_parallel']}" if plan["context_parallel"] > 1 else "")
            + f" + {plan['overhead_gib']:.2f} overhead on a GPU ({parts}; on: {', '.join(on) or 'none'})"
            + (f" + {paged:.2f} paged optimizer state (managed, evictable)" if paged else "")
            + fit
        )
        if "unplanned_gib" in plan:  # a plan of a checkpointed run (training/plan_config.memory_plan)
            where = "pinned host memory (offloaded)" if plan["switches"]["offload"] else "GPU memory"
            lines.append(
                f"                   activation checkpointing off: every layer keeps its activations for the "
                f"backward, about {plan['unplanned_gib']:.2f} GiB more {where} than planned"
            )
    return "\n".join(lines)


def extension_record(
    run: ResolvedRun,
    info: ModelInfo,
    data_stats: dict,
    train_stats: dict,
    max_steps: int | None = None,
    steps_done: int | None = None,
) -> ExtensionRecord:
    """What the adapter records about its run (longqlora.record); `max_steps`: the steps the run was set for,
    `steps_done`: those a checkpoint holds (its record lists only the group sizes trained so far)."""
    cfg = run.model
    return ExtensionRecord(
        model=info.model,
        original_context=info.original_context,
        target_context=info.target_context,
        pi_factor=info.pi_factor,
        rope_type=info.rope_type,
        compute_dtype=info.compute_dtype,
        load_in_4bit=info.load_in_4bit,
        attn_backend=info.attn_backend,
        s2_attention=cfg.s2_attention,
        s2_options=s2_options(cfg, max_steps, steps_done),
        pose={"window": cfg.pose_window, "chunks": cfg.pose_chunks} if cfg.pose_window else None,
        lora={
            "r": cfg.lora_r,
            "alpha": cfg.lora_alpha,
            "target": cfg.lora_target,
            "trainable_modules": cfg.trainable_params,
            "trainable_params": info.trainable_params,
            "total_params": info.total_params,
        },
        memory_plan=run.plan,
        data=_data_record(run.data, data_stats),
        train=train_stats,
        model_path=os.path.abspath(local) if os.path.isdir(local := os.path.expanduser(info.model)) else None,
        config=extended_config(run.hf_config),
        settings=trajectory_settings(cfg, run.data, run.training),
    )


def written(out: Path, report_to, conversations: bool = False) -> str:
    """The last line of a run: where its adapter is, and the commands that try, measure and merge it (a chat first
    for a run on conversations)."""
    out = Path(out).resolve()
    lines = [
        f"adapter written to {out}; next:",
        *([f"  python -m longqlora chat --adapter {out}"] if conversations else []),
        f"  python -m longqlora perplexity --adapter {out} --data HELD_OUT.txt --context_lengths ...",
        f"  python -m longqlora passkey --adapter {out} --context_lengths ...",
        f"  python -m longqlora merge --adapter {out} --output MERGED_DIR",
    ]
    if "tensorboard" in (report_to or []):
        lines.append(f"  tensorboard --logdir {out / 'runs'}")
    return "\n".join(lines)


def run_losses(state) -> dict:
    """The run's steps, its mean loss (`mean_loss`), the last logged one (`last_loss`) and its tokens."""
    logged = [entry["loss"] for entry in state.log_history if "loss" in entry]
    return {
        "steps": state.global_step,
        "mean_loss": mean_loss(state),
        "last_loss": logged[-1] if logged else None,
        "tokens_total": state.num_input_tokens_seen,
    }


def mean_loss(state) -> float | None:
    """The mean training loss per step over the logged steps of the whole run (a resumed one included): each logged
    loss is the mean of the steps since the previous log, so each is weighted by that interval."""
    total, steps, previous = 0.0, 0, 0
    for entry in state.log_history:
        if "loss" in entry and "step" in entry:
            total += entry["loss"] * (entry["step"] - previous)
            steps, previous = steps + entry["step"] - previous, entry["step"]
    return total / steps if steps else None
