"""Training: one function runs every recipe through TRL's SFTTrainer, with checkpoints, resume and atomic output.

Continued pre-training on long text (LongLoRA §4, LongQLoRA §3) and supervised fine-tuning on long conversations
share the same path: check everything that can be checked before weights load, load the NF4 + PI + S2-Attn + LoRA+
model, pack the data with TRL, train, and write a PEFT adapter directory holding the LoRA weights, the trained
embeddings and norms, the tokenizer and `longqlora_extension.json`.

`resolve` does everything that needs no weights once and returns a `ResolvedRun`; `train(run)` loads, trains
and saves from it without checking anything again.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed

from longqlora import hardware
from longqlora.adapters import trainable_to_fp32
from longqlora.attention.schedule import s2_schedule_callbacks
from longqlora.data import instructions, pose
from longqlora.data import sources as data_sources
from longqlora.data import text as data_lib
from longqlora.model import ModelConfig, ModelInfo, base_tokenizer, check_model, load_model
from longqlora.output import atomic_directory, check_output_path
from longqlora.record import ExtensionRecord
from longqlora.training import checkpoints, distributed, held_out, memory, plan_config
from longqlora.training.advice import host_memory_warning, out_of_memory_warning
from longqlora.training.callbacks import RecordCallback, ThroughputCallback, lead, peak_memory_gib
from longqlora.training.config import RunConfig, TrainingConfig, recipe_default, refuse_flags_the_run_sets
from longqlora.training.summary import describe, extension_record, resume_settings, written

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ configuration
def finalize_training(model_cfg: ModelConfig, data_cfg, training: TrainingConfig, info: ModelInfo) -> TrainingConfig:
    """Derive what follows from the model settings: sequence length, precision, an optimiser that runs here."""
    dtype = info.compute_dtype
    changes = {
        "max_length": model_cfg.train_length,
        "fp16": dtype == "float16" and torch.cuda.is_available(),
        "bf16": dtype == "bfloat16" and torch.cuda.is_available(),
        # pinned batches only help a copy to a GPU; without one, torch warns at every DataLoader
        "dataloader_pin_memory": training.dataloader_pin_memory and torch.cuda.is_available(),
    }
    if isinstance(data_cfg, instructions.InstructionDataConfig):
        strategy = instructions.CONVERSATION_PACKING[data_cfg.pack]
        changes.update(packing=strategy is not None, packing_strategy=strategy or "bfd", assistant_only_loss=True)
    else:
        changes.update(
            packing=True, packing_strategy=data_lib.packing_strategy(data_cfg.pack), assistant_only_loss=False
        )
    changes.update(held_out.evaluation_settings(model_cfg, data_cfg, training))
    warmup = training.warmup_steps or 0
    if training.max_steps > 0 and warmup >= 1 and warmup >= training.max_steps:  # below 1 it is a ratio
        logger.warning(
            "--warmup_steps %g is not shorter than --max_steps %d: the learning rate never reaches --learning_rate %g",
            warmup,
            training.max_steps,
            training.learning_rate,
        )
    launched = hardware.launch()
    if launched.world_size > 1 and not torch.cuda.is_available():
        changes["use_cpu"] = True  # else transformers takes the processes for one (accelerate's state on a CPU)
    if "paged" in training.optim_name and (not torch.cuda.is_available() or launched.shards_weights):
        # bitsandbytes' paged optimizers run on CUDA only and are untested on FSDP's and ZeRO-3's sharded parameters
        why = "needs CUDA" if not torch.cuda.is_available() else f"is not used with {launched.engine}'s shards"
        level = logging.INFO if torch.cuda.is_available() else logging.DEBUG  # the configuration says "here"
        logger.log(level, "--optim %s %s; using adamw_torch", training.optim_name, why)
        changes["optim"] = "adamw_torch"
    return dataclasses.replace(training, **changes)


@dataclass(frozen=True)
class ResolvedRun:
    """One recipe run, resolved once before any weights load by `resolve`: the configs after --tiny with the
    training settings derived from the model's, the model's transformers config with position interpolation
    applied, what `check_model` found, and the memory plan. `train` takes it and checks nothing again."""

    model: ModelConfig
    data: Any  # TextDataConfig or InstructionDataConfig
    training: TrainingConfig
    hf_config: Any  # transformers PretrainedConfig, PI applied
    info: ModelInfo
    plan: dict


# ---------------------------------------------------------------------------------------------------- output
def save_adapter_atomic(model, tokenizer, output_dir, record: ExtensionRecord, state_dict=None) -> Path:
    """Write the adapter, tokenizer and extension record into `output_dir` (beside its checkpoints), weights first
    and adapter_config.json last: a killed run never leaves a half-written adapter. `state_dict`: the whole model's,
    gathered, when FSDP or DeepSpeed hold it in pieces."""
    with atomic_directory(output_dir, into=True, last=("adapter_config.json",)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        record.write(tmp)
    return Path(output_dir)


# ------------------------------------------------------------------------------------------------------- run
def load_data(data_cfg, vocab_size: int | None = None):
    """The training data read and checked, before any weights load: documents or prepared token rows (text; no id
    beyond `vocab_size`, the model's embeddings, when given), or conversations."""
    if isinstance(data_cfg, instructions.InstructionDataConfig):
        return instructions.load_conversations(data_cfg)
    return data_lib.load_training_text(data_cfg, vocab_size)


def prepare_dataset(
    data_cfg, tokenizer, max_length: int, loaded=None, prepared: dict | None = None, chat_template_path=None
):
    """Tokenized documents or checked prepared rows (text), or chat messages (instructions), with their statistics;
    `loaded` is what `load_data` returned (read now when not given), `prepared` what `check_tokenizer` returned
    for its token rows (checked now when not given), `chat_template_path` the run's --chat_template_path."""
    loaded = load_data(data_cfg) if loaded is None else loaded
    if isinstance(data_cfg, instructions.InstructionDataConfig):
        from longqlora.data.formats import training_chat_template

        template = training_chat_template(tokenizer, "--model_name_or_path", chat_template_path)
        made = instructions.prepared_stats(data_cfg, max_length)  # data_prep's counts, beside this run's
        dataset, stats = instructions.length_report(
            loaded, tokenizer, max_length, data_cfg.overlong, data_cfg.num_proc, data_cfg.pack == "conversations"
        )
        return dataset, {"chat_template": template, **stats, **({"prepared": made} if made else {})}
    return data_lib.prepare_training_text(loaded, tokenizer, data_cfg, max_length, prepared)


def check_sources(data_cfg) -> None:
    """--dataset and --eval_dataset name readable data, the held-out split not the training one (`train` reads)."""
    data_sources.resolve(data_cfg.dataset)
    if getattr(data_cfg, "eval_dataset", None):
        with held_out.held_out_flags():
            held_out.held_out_config(data_cfg)


def resolve(model_cfg: ModelConfig, data_cfg, run_cfg: RunConfig, training: TrainingConfig) -> ResolvedRun:
    """Apply --tiny, run every check that needs no weights, and derive the training settings and memory plan."""
    recipe_dir = recipe_default(training, "output_dir")
    if run_cfg.tiny and training.output_dir == recipe_dir:  # a smoke run never takes the real run's folder
        training = dataclasses.replace(training, output_dir=f"{recipe_dir}-tiny")
        logger.info("--tiny: writing to %s (pass --output_dir to choose)", training.output_dir)
    check_output_path(training.output_dir, "--output_dir")
    try:
        checkpoints.check_new_run(training.output_dir, training.resume_from_checkpoint)
    except ValueError as err:
        if not run_cfg.dry_run:
            raise
        logger.warning("the run itself would stop here: %s", err)  # a dry run still shows the plan
    named = checkpoints.check_named_resume(
        training.output_dir, training.resume_from_checkpoint, with_optimizer=not training.save_only_model
    )
    distributed.check_launch(model_cfg, training)
    if model_cfg.s2_attention and model_cfg.s2_shift == "rolled" and getattr(data_cfg, "pack", None) != "concat":
        raise ValueError(
            "--s2_shift rolled: LongLoRA's roll knows no document boundaries or padding, so it trains on full "
            "joined rows only; pass a text --dataset with --pack concat, or --s2_shift leakfree"
        )
    if run_cfg.tiny:
        from longqlora.training.tiny import tiny_overrides

        model_cfg, data_cfg, training = tiny_overrides(model_cfg, data_cfg, training)
    if model_cfg.pose_window and isinstance(data_cfg, instructions.InstructionDataConfig):
        raise ValueError(
            f"--pose_window {model_cfg.pose_window}: PoSE trains on rows cut from long text, but "
            "conversations train whole; pass a text --dataset, or --pose_window 0"
        )
    hf_config, info = check_model(
        model_cfg, trust_remote_code=training.trust_remote_code, prefer_preset=run_cfg.dry_run
    )
    # --max_length is SFTConfig's flag; a run sets it from --target_context
    if training.max_length not in (recipe_default(training, "max_length"), model_cfg.train_length):
        raise ValueError(
            f"--max_length {training.max_length}: a run trains rows of --target_context tokens (--pose_window "
            "with PoSE); drop --max_length and set those"
        )
    text_data = not isinstance(data_cfg, instructions.InstructionDataConfig)
    refuse_flags_the_run_sets(training, text_data, info.compute_dtype)
    layers = getattr(hf_config, "num_hidden_layers", None)
    if training.offload_layers is not None and layers is not None and training.offload_layers > layers:
        raise ValueError(
            f"--offload_layers {training.offload_layers}: {model_cfg.model_name_or_path} has {layers} decoder "
            f"layers; pass at most {layers}, or leave it unset (all)"
        )
    checkpoints.check_same_run(named, resume_settings(model_cfg, data_cfg, training, info))
    distributed.check_precision(hardware.launch(), info.compute_dtype, model_cfg.load_in_4bit)
    asked = training.optim
    training = finalize_training(model_cfg, data_cfg, training, info)
    try:
        check_sources(data_cfg)
    except ValueError as err:
        if not run_cfg.dry_run:
            raise
        logger.warning("the run itself would stop here: %s", err)  # the data may live on the machine that trains
    # The plan is a GPU step's: a run without CUDA (a --dry_run on a laptop) plans the paged optimizer it replaced.
    optim = training.optim if hardware.launch().shards_weights else asked
    plan = plan_config.memory_plan(hf_config, model_cfg, training, info.compute_dtype, optim=optim)
    return ResolvedRun(model=model_cfg, data=data_cfg, training=training, hf_config=hf_config, info=info, plan=plan)


def train(run: ResolvedRun) -> Path:
    """Load, train and save one resolved run; returns the adapter directory."""
    with data_sources.maps_written_apart(run.data.dataset, getattr(run.data, "eval_dataset", None)):
        return _train(run)


def _train(run: ResolvedRun) -> Path:
    model_cfg, data_cfg, training, plan = run.model, run.data, run.training, run.plan
    if too_big := out_of_memory_warning(run.hf_config, plan):
        logger.warning(too_big)
    if torch.cuda.is_available() and (host := host_memory_warning(run.hf_config, plan)):  # nothing offloads on a CPU
        logger.warning(host)
    # every input file is read, checked and tokenized before anything is written or any weights load
    vocab = getattr(run.hf_config, "vocab_size", None)
    loaded = load_data(data_cfg, vocab)
    tokenizer = base_tokenizer(model_cfg, training.trust_remote_code)
    template = training.chat_template_path
    dataset, stats = prepare_dataset(data_cfg, tokenizer, model_cfg.train_length, loaded, chat_template_path=template)
    eval_set = None
    if getattr(data_cfg, "eval_dataset", None):  # read, checked and prepared as --dataset is
        with held_out.held_out_flags():
            held_cfg = held_out.held_out_config(data_cfg)
            loaded = load_data(held_cfg, vocab)
            eval_set, held = prepare_dataset(
                held_cfg, tokenizer, model_cfg.train_length, loaded, chat_template_path=template
            )
        stats["eval"] = {"dataset": held_cfg.dataset, "split": held_cfg.split, **held}
        if "chat_template" in stats:
            stats["eval"]["chat_template"] = stats["chat_template"]  # the same (now the tokenizer's own)
    longest = stats.get("length_max", 0)
    if (
        getattr(data_cfg, "pack", None) == "documents"
        and not model_cfg.pose_window
        and longest <= run.info.original_context
    ):
        # S2-Attn and the packed rows never attend across documents: no distance past the longest one is trained
        logger.warning(
            "no document is longer than the pre-trained context %d (the longest: %d tokens): with --pack documents "
            "nothing attends further, so the extension to %d is not trained; use longer documents (--min_length), "
            "--pack concat or --pose_window",
            run.info.original_context,
            longest,
            run.info.target_context,
        )
    launched = hardware.launch()
    if launched.world_size > 1:
        _ = training.device  # starts torch.distributed (accelerate's state), which the steps below use
    with checkpoints.locked_run(
        training.output_dir,
        training.resume_from_checkpoint,
        with_optimizer=not training.save_only_model,
        lock=launched.main,
    ) as resume:
        resume = distributed.from_main(resume)  # the main process looked (and moved incomplete ones aside)
        if str(training.resume_from_checkpoint).lower() in checkpoints.AUTO:  # a named one was checked in resolve
            checkpoints.check_same_run(resume, resume_settings(model_cfg, data_cfg, training, run.info))
        set_seed(training.seed)  # LoRA's A matrices are drawn here, before the Trainer seeds: --seed fixes them too
        cp_group = None
        if model_cfg.context_parallel > 1:
            from longqlora.attention.context_parallel import new_group

            cp_group = new_group(model_cfg.context_parallel)
        model, tokenizer, info = load_model(
            model_cfg,
            checked=(run.hf_config, run.info),
            tokenizer=tokenizer,
            gradient_checkpointing=bool(training.activation_checkpointing),
            trust_remote_code=training.trust_remote_code,
            context_parallel=cp_group,
        )
        if launched.engine == "deepspeed" and model_cfg.load_in_4bit:
            logger.info("ZeRO-3: %d NF4 layers release their codes", distributed.release_nf4_codes(model))
        logger.info("configuration:\n%s", describe(run, info.trainable_params, info.total_params))
        guard = checkpoints.CheckpointGuard()
        record = RecordCallback(
            lambda step: extension_record(run, info, stats, {"checkpoint_step": step}, trainer.state.max_steps, step)
        )
        trainer = memory.trainer_class(training.chunked_loss)(
            model=model,
            args=training,
            train_dataset=dataset,
            eval_dataset=eval_set,
            processing_class=tokenizer,
            callbacks=[guard, record, *s2_schedule_callbacks(model_cfg)],
        )
        lead(trainer, ThroughputCallback())
        if eval_set is not None:
            stats["eval"]["rows_scored"] = held_out.score_first_rows(trainer, training.eval_max_rows)
            held_out.evaluate_apart(trainer)
        if model_cfg.pose_window:
            pose.enable_pose(trainer, model_cfg.target_context, model_cfg.pose_chunks, training.seed)
        if cp_group is not None:
            distributed.enable_context_parallel(
                trainer, cp_group, model_cfg.train_length, tokenizer.pad_token_id, training.seed
            )
        trainable_to_fp32(trainer.model)
        memory.apply_memory_switches(trainer, training, info.dtype)
        trained = checkpoints.run_training(trainer, resume, guard)
        since = trained.get("resumed_at_step") or 0  # a resumed run's history holds the evaluations before it too
        at_end = eval_set is not None and trainer.state.global_step == since > 0  # resumed at its last step
        if at_end:  # scored here: the checkpoint's evaluation came before the resume (maybe of another set)
            trainer.evaluate()
        evaluated = [h for h in trainer.state.log_history if "eval_loss" in h and (h["step"] > since or at_end)]
        if eval_set is not None and evaluated:  # the last evaluation (at the last step when they coincide)
            trained.update(eval_loss=evaluated[-1]["eval_loss"], eval_step=evaluated[-1]["step"])
        if torch.cuda.is_available():
            trained.update(
                peak_allocated_gib=peak_memory_gib(), peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30
            )
        if launched.world_size > 1:
            trained.update(
                processes=launched.world_size, engine=launched.engine, context_parallel=cp_group.size if cp_group else 1
            )
        state_dict = distributed.gathered_state_dict(trainer)  # every process takes part
        out = Path(training.output_dir)
        if launched.main:
            save_adapter_atomic(
                trainer.model,
                tokenizer,
                training.output_dir,
                extension_record(run, info, stats, trained, trainer.state.max_steps),
                state_dict=state_dict,
            )
            checkpoints.remove_aside(out)
            logger.info(written(out, training.report_to, isinstance(data_cfg, instructions.InstructionDataConfig)))
        trainer.accelerator.wait_for_everyone()
    return out
