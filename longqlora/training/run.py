"""Training: one function runs every recipe through TRL's SFTTrainer, with checkpoints, resume and atomic output.

Continued pre-training on long text (LongLoRA §4, LongQLoRA §3) and supervised fine-tuning on long conversations
share the same path: check everything that can be checked before weights load, load the NF4 + PI + S2-Attn + LoRA+
model, pack the data with TRL, train, and write a PEFT adapter directory holding the LoRA weights, the trained
embeddings and norms, the tokenizer and `longqlora_extension.json`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import set_seed

from longqlora.adapters import trainable_to_fp32
from longqlora.attention.schedule import s2_schedule_callbacks
from longqlora.data import instructions, pose
from longqlora.data import text as data_lib
from longqlora.evaluation.loading import EXTENSION_FILE
from longqlora.model import ModelConfig, check_model, load_model
from longqlora.output import check_output_path, write_json_atomic
from longqlora.training import checkpoints, memory
from longqlora.training.callbacks import ThroughputCallback
from longqlora.training.config import RunConfig, TrainingConfig

logger = logging.getLogger(__name__)





# ------------------------------------------------------------------------------------------------ configuration
def tiny_overrides(model_cfg, data_cfg, training):
    """The same recipe scaled down to a CPU: a tiny random Llama (context 64 -> 256) and bundled text."""
    from longqlora.data import corpora
    from longqlora.training.tiny import save_tiny_model, tiny_instruction_file

    out = Path(training.output_dir)
    base = out / "tiny-base"
    if not (base / "config.json").exists():  # written whole, then renamed: a killed run leaves no half a base
        partial = out / ".tiny-base.partial"
        shutil.rmtree(partial, ignore_errors=True)
        save_tiny_model(partial, shape="gqa", texts=[corpora.book("austen_persuasion")[:200_000]],
                        max_position_embeddings=64)
        shutil.rmtree(base, ignore_errors=True)
        os.replace(partial, base)
    model_cfg = dataclasses.replace(model_cfg, model_name_or_path=str(base), target_context=256,
                                    compute_dtype="float32", attn_backend="sdpa", pose_window=pose.tiny_window(
                                        model_cfg.pose_window, model_cfg.target_context, 256, model_cfg.pose_chunks))
    if isinstance(data_cfg, instructions.InstructionDataConfig):
        data_cfg = dataclasses.replace(data_cfg, dataset=str(tiny_instruction_file(out / "tiny-data.jsonl")),
                                       num_proc=None, system_prompt=data_cfg.system_prompt or "A chat.")
    else:
        data_cfg = dataclasses.replace(data_cfg, dataset=corpora.book_path("austen_persuasion"), min_length=0,
                                       num_proc=None, max_documents=None)
    training = dataclasses.replace(
        training, max_steps=min(training.max_steps, 4) if training.max_steps > 0 else 4, save_steps=2,
        per_device_train_batch_size=1, gradient_accumulation_steps=2, warmup_steps=1, logging_steps=1,
        optim="adamw_torch", dataset_num_proc=None, use_cpu=True, fp16=False, bf16=False,
        learning_rate=max(training.learning_rate, 1e-3))
    return model_cfg, data_cfg, training


def finalize_training(model_cfg: ModelConfig, data_cfg, training: TrainingConfig, info: dict) -> TrainingConfig:
    """Derive what follows from the model settings: sequence length, precision, an optimiser that runs here."""
    dtype = info["compute_dtype"]
    changes = {"max_length": model_cfg.train_length,
               "fp16": dtype == "float16" and torch.cuda.is_available(),
               "bf16": dtype == "bfloat16" and torch.cuda.is_available()}
    if isinstance(data_cfg, instructions.InstructionDataConfig):
        changes.update(packing=False, assistant_only_loss=True)
    else:
        changes.update(packing=True, packing_strategy=data_lib.packing_strategy(data_cfg.pack))
    if "paged" in str(training.optim) and not torch.cuda.is_available():
        logger.info("--optim %s needs CUDA; using adamw_torch on this machine", training.optim)
        changes["optim"] = "adamw_torch"
    return dataclasses.replace(training, **changes)


def _attention_text(info: dict) -> str:
    """How the run trains attention: full, or S2-Attn with its group size(s) and variant options."""
    if not info["s2_attention"]:
        return "full"
    o = info.get("s2_options") or {"group_sizes": [info["group_size"]]}
    sizes = o["group_sizes"]
    text = f"S2-Attn, group {sizes[0]}" if len(sizes) == 1 else \
        f"S2-Attn, group {' -> '.join(map(str, sizes))} (equal shares of the steps)"
    extras = [f"1 step in {o['full_every']} full" if o.get("full_every") else "",
              f"{o['sink_tokens']} sink tokens" if o.get("sink_tokens") else "",
              f"{o['full_heads']:.0%} of heads full" if o.get("full_heads") else "",
              "rolled shift" if o.get("shift") == "rolled" else ""]
    return ", ".join([text, *filter(None, extras)])


def describe(info: dict, training: TrainingConfig, data_cfg) -> str:
    """The resolved configuration, as `--dry_run` prints it and the run logs it."""
    def plain(value):  # TrainingArguments turns some strings into enums
        return getattr(value, "value", value)

    steps = f"{training.max_steps} steps" if training.max_steps > 0 else f"{training.num_train_epochs:g} epoch(s)"

    lines = [
        f"model              {info['model']}",
        f"context            {info['original_context']} -> {info['target_context']} tokens "
        f"(position interpolation x{info['pi_factor']:.4g}, rope {info['rope_type']})",
        *pose.describe(info),
        f"attention          {_attention_text(info)} (training), full at inference; backend "
        f"{info['attn_backend_requested']} ({info['attn_backend']} here)",
        f"weights            {'NF4 4-bit, double quant' if info['load_in_4bit'] else info['compute_dtype']}, "
        f"compute {info['compute_dtype']}",
        f"trainable          {info['trainable_params']:,} of {info['total_params']:,} parameters "
        f"(LoRA r={info['lora_r']} on {info['lora_target']}; full: {info['trainable_modules'] or 'nothing'})",
        f"data               {data_cfg.dataset}",
        f"steps              {steps} of batch {training.per_device_train_batch_size} x accumulation "
        f"{training.gradient_accumulation_steps}, lr {training.learning_rate} ({plain(training.lr_scheduler_type)}, "
        f"warmup {training.warmup_steps}), max grad norm {training.max_grad_norm}, optim {plain(training.optim)}",
        f"precision          {info['compute_dtype']} compute"
        + (" (mixed precision on the GPU)" if info["compute_dtype"] != "float32" else ""),
        f"output             {training.output_dir}",
    ]
    plan = info.get("memory_plan")
    if plan:
        on = [k for k, v in plan["switches"].items() if v]
        parts = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in plan["parts_gib"].items())
        fit = "" if plan.get("fits") is None else (" - fits this GPU" if plan["fits"] else
                                                    f" - does NOT fit this GPU ({plan['device_gib']:.1f} GiB)")
        lines.append(f"memory (planned)   peak {plan['peak_allocated_gib']:.2f} GiB allocated + "
                     f"{plan['overhead_gib']:.2f} overhead on a GPU ({parts}; on: {', '.join(on) or 'none'}){fit}")
    return "\n".join(lines)


def memory_plan(hf_config, model_cfg: ModelConfig, training: TrainingConfig, info: dict) -> dict:
    """The planner's prediction (longqlora.training.plan) for this run's switches, against this GPU when there is one."""
    from longqlora.training.plan import PlanConfig, plan

    tokens = training.per_device_train_batch_size * model_cfg.train_length
    mode = training.offload_activations
    offload = mode == "on" or (mode == "auto" and tokens >= training.offload_min_tokens)
    cfg = PlanConfig(
        model=model_cfg.model_name_or_path, context=model_cfg.train_length,
        batch=training.per_device_train_batch_size, rank=model_cfg.lora_r,
        lora_target="all-linear" if model_cfg.lora_target == "all-linear" else "attention",
        trainable_params=model_cfg.trainable_params, offload=offload,
        chunked_loss=training.chunked_loss, tile_tokens=training.tiled_mlp_tokens,
        tiled_mlp=memory.tiled_mlp_active(training.tiled_mlp, tokens, training.tiled_mlp_min_tokens),
        compute_dtype=info["compute_dtype"], load_in_4bit=model_cfg.load_in_4bit, lora_dropout=model_cfg.lora_dropout,
        recompute_norms=training.recompute_norms, recompute_dropout=training.recompute_lora_dropout,
        optim=plan_optimizer(training.optim),
        gpu_memory=torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None)
    return plan(hf_config, cfg)


def plan_optimizer(optim) -> str:
    """The planner's name for a TrainingArguments --optim: its state size and temporaries."""
    name = str(getattr(optim, "value", optim))
    return "adamw_8bit" if "8bit" in name else "paged_adamw" if "paged" in name or "bnb" in name else "adamw"


def apply_memory_switches(trainer, training: TrainingConfig, info: dict) -> None:
    """Switch on, for this trainer's model, what --offload_activations, --tiled_mlp, --recompute_norms and
    --recompute_lora_dropout ask for."""
    model = trainer.model
    dtype = getattr(torch, info["compute_dtype"])
    hidden = model.config.get_text_config().hidden_size
    threshold = memory.offload_threshold_bytes(training.offload_activations, training.offload_min_tokens, hidden,
                                               dtype.itemsize)
    # TRL builds its offloading context only from its own boolean flag; ours carries the size threshold.
    trainer.maybe_activation_offload_context = memory.offload_context(model, threshold)
    tiled = 0
    if training.tiled_mlp != "off":
        tiled = memory.enable_tiled_mlp(model, training.tiled_mlp_tokens, training.tiled_mlp_min_tokens)
    norms = memory.recompute_norms(model, training.tiled_mlp_tokens) if training.recompute_norms else 0
    dropouts = memory.recompute_lora_dropout(model) if training.recompute_lora_dropout else 0
    logger.info("memory switches: offload %s (tensors >= %s bytes), chunked loss %s, tiled MLP %s in %d layers, "
                "%d norms and %d LoRA dropouts recomputed", training.offload_activations, threshold,
                training.chunked_loss, training.tiled_mlp, tiled, norms, dropouts)


# --------------------------------------------------------------------------------------------------- callbacks






# ---------------------------------------------------------------------------------------------------- output
def save_adapter_atomic(model, tokenizer, output_dir, extension: dict) -> Path:
    """Write the adapter, tokenizer and extension record into a temporary folder, then move the files into
    `output_dir`, weights first and adapter_config.json last: a killed run never leaves a half-written adapter."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".adapter-*"):  # left by a killed run (the output lock makes this run the only writer)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=out))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / EXTENSION_FILE, extension)
        names = sorted(p.name for p in tmp.iterdir())
        names.sort(key=lambda n: n == "adapter_config.json")
        (out / "adapter_config.json").unlink(missing_ok=True)  # not an adapter until the new config comes, last
        for name in names:
            os.chmod(tmp / name, 0o755 if (tmp / name).is_dir() else 0o644)  # some writers create 0600 files
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------------------- run
def load_data(data_cfg):
    """The training data read and checked, before any weights load: documents (text) or conversations."""
    if isinstance(data_cfg, instructions.InstructionDataConfig):
        return instructions.load_conversations(data_cfg)
    return data_lib.load_documents(data_cfg)


def prepare_dataset(data_cfg, tokenizer, max_length: int, loaded=None):
    """Tokenized documents (text) or chat messages (instructions), with their statistics; `loaded` is what
    `load_data` returned (read now when not given)."""
    loaded = load_data(data_cfg) if loaded is None else loaded
    if isinstance(data_cfg, instructions.InstructionDataConfig):
        from longqlora.data.formats import apply_vicuna_template

        if not tokenizer.chat_template:
            apply_vicuna_template(tokenizer)
        return instructions.length_report(loaded, tokenizer, max_length, data_cfg.overlong)
    tokenized, stats = data_lib.tokenize_documents(loaded, tokenizer, data_cfg)
    data_lib.check_packable(stats, max_length)
    return tokenized, stats


def resolve(model_cfg: ModelConfig, data_cfg, run_cfg: RunConfig, training: TrainingConfig):
    """Apply --tiny, run every check that needs no weights, and derive the training settings.

    Returns (model_cfg, data_cfg, training, info); `info` is what `describe` prints.
    """
    check_output_path(training.output_dir, "--output_dir")
    if run_cfg.tiny:
        model_cfg, data_cfg, training = tiny_overrides(model_cfg, data_cfg, training)
    if model_cfg.pose_window and isinstance(data_cfg, instructions.InstructionDataConfig):
        raise ValueError(f"--pose_window {model_cfg.pose_window}: PoSE trains on rows cut from long text, but "
                         "conversations train whole; pass a text --dataset, or --pose_window 0")
    hf_config, info = check_model(model_cfg, trust_remote_code=training.trust_remote_code,
                                  prefer_preset=run_cfg.dry_run)
    training = finalize_training(model_cfg, data_cfg, training, info)
    info["memory_plan"] = memory_plan(hf_config, model_cfg, training, info)
    return model_cfg, data_cfg, training, info


def train(model_cfg: ModelConfig, data_cfg, training: TrainingConfig) -> Path:
    """Load, train and save one recipe (already resolved); returns the adapter directory."""
    from trl import SFTTrainer

    hf_config, checked = check_model(model_cfg, trust_remote_code=training.trust_remote_code)
    plan = memory_plan(hf_config, model_cfg, training, checked)
    if plan.get("fits") is False:
        logger.warning("this run is predicted to need %.1f GiB of this GPU's %.1f GiB and will likely run out of "
                       "memory; `python -m longqlora plan --model %s --context %d --gpu_memory %.0f` shows the "
                       "parts and the switches that fit", plan["device_need_gib"], plan["device_gib"],
                       model_cfg.model_name_or_path, model_cfg.train_length, plan["device_gib"])
    loaded = load_data(data_cfg)  # every input file is checked before anything is written or loaded
    with checkpoints.locked_run(training.output_dir, training.resume_from_checkpoint,
                                with_optimizer=not training.save_only_model) as resume:
        set_seed(training.seed)  # LoRA's A matrices are drawn here, before the Trainer seeds: --seed fixes them too
        model, tokenizer, info = load_model(model_cfg, gradient_checkpointing=training.gradient_checkpointing,
                                            trust_remote_code=training.trust_remote_code)
        info["memory_plan"] = plan
        logger.info("configuration:\n%s", describe(info, training, data_cfg))
        dataset, stats = prepare_dataset(data_cfg, tokenizer, model_cfg.train_length, loaded)
        guard = checkpoints.CheckpointGuard()
        trainer = SFTTrainer(model=model, args=training, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[ThroughputCallback(), guard, *s2_schedule_callbacks(model_cfg)],
                             compute_loss_func=None if training.chunked_loss else memory.plain_causal_lm_loss)
        if model_cfg.pose_window:
            pose.enable_pose(trainer, model_cfg.target_context, model_cfg.pose_chunks, training.seed)
        trainable_to_fp32(trainer.model)
        apply_memory_switches(trainer, training, info)
        extension = {**info, "data": {"dataset": data_cfg.dataset, **stats}, "train": {
            **checkpoints.run_training(trainer, resume, guard),
            **({"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30} if torch.cuda.is_available() else {})}}
        out = save_adapter_atomic(trainer.model, tokenizer, training.output_dir, extension)
        checkpoints.remove_aside(out)
    logger.info("adapter written to %s", out)
    return out
