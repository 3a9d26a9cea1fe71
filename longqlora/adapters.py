"""Adapt a loaded base for long-context LoRA+ training (LongLoRA arXiv 2309.12307 §3.3): freeze it, put LoRA on the
attention projections (or every Linear), train the input embedding and every norm in full (PEFT's modules_to_save,
saved with the adapter), keep fp32 master weights for what trains and the residual stream in the compute dtype, and
switch on S2-Attn. model.load_model calls `adapt_for_training` after loading; bench/memory.py calls it on models it
builds itself, so the benchmark measures this very path.
"""

from __future__ import annotations

import logging
import warnings

import torch

logger = logging.getLogger(__name__)

ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # the names in Llama, Mistral and Qwen2
NORM_SUFFIXES = ("RMSNorm", "LayerNorm")


def modules_to_save(model, tokens) -> list[str] | None:
    """Names for LoraConfig.modules_to_save that wrap exactly the input embedding and/or every norm layer.

    PEFT matches them by plain string suffix on each module's full name, so short leaf names ("embed_tokens",
    "input_layernorm", "norm", ...) are used when their matches are exactly the wanted modules, else full names.
    """
    embedding = model.get_input_embeddings()
    wanted = set()
    for name, module in model.named_modules():
        if "embed" in tokens and module is embedding:
            wanted.add(name)
        if "norm" in tokens and type(module).__name__.endswith(NORM_SUFFIXES):
            wanted.add(name)
    if not wanted:
        return None
    leaves = sorted({name.rsplit(".", 1)[-1] for name in wanted})
    matched = {name for name, _ in model.named_modules() if name and any(name.endswith(s) for s in leaves)}
    return leaves if matched == wanted else sorted(wanted)


def _lora_targets(model, spec: str):
    """LoraConfig.target_modules for --lora_target, checked against the model's Linear layer names."""
    if spec == "all-linear":
        return "all-linear"
    names = ATTENTION_PROJECTIONS if spec == "attention" else [n.strip() for n in spec.split(",") if n.strip()]
    head = model.get_output_embeddings()
    head_name = next((n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head), None)
    if head_name in names:  # TRL refused it after the weights loaded
        raise ValueError(
            f"--lora_target {spec}: the output head ({head_name}) takes no LoRA here; drop it (--trainable_params "
            "lists what trains whole)"
        )
    leaves = {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head
    }
    missing = [n for n in names if n not in leaves]
    if missing:
        raise ValueError(
            f"--lora_target {spec}: this model has no Linear layer named {', '.join(missing)}; "
            f"pass a comma list of its names ({', '.join(sorted(leaves))}) or all-linear"
        )
    return names


def count_trainable(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; a packed bitsandbytes 4-bit tensor holds 2 values per byte.

    Each distinct tensor counts once, so a module in modules_to_save counts twice (its frozen original and its
    trained copy), which agrees with PEFT's print_trainable_parameters.
    """
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if type(param).__name__ == "Params4bit" and getattr(param, "bnb_quantized", True):
            n *= 2 * param.element_size()
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def add_adapters(model, cfg):
    """Wrap `model` in PEFT: LoRA on `--lora_target`, the embedding and/or norms trained in full (modules_to_save).
    Returns (peft_model, lora_config)."""
    from peft import LoraConfig, get_peft_model

    extra = {}
    output = model.get_output_embeddings()
    if "embed" in cfg.trainable_tokens and output is not None and output.weight is model.get_input_embeddings().weight:
        # Tied lm_head (e.g. small Qwen2): keep it tied to the trained embedding copy, as full fine-tuning would.
        extra["ensure_weight_tying"] = True
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=_lora_targets(model, cfg.lora_target),
        bias="none",
        task_type="CAUSAL_LM",
        modules_to_save=modules_to_save(model, cfg.trainable_tokens),
        **extra,
    )
    with warnings.catch_warnings():  # PEFT reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora), lora


def trainable_to_fp32(model) -> None:
    """Keep trainable parameters in fp32 (master weights): small AdamW steps on the trained embedding and norms
    would round to nothing in 16-bit, and TRL casts them to bf16 for quantized models (training/run.py calls this again
    after building the trainer). Autocast still computes in the compute dtype."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def stream_in_compute_dtype(model, dtype: torch.dtype) -> list:
    """Cast the outputs of the input embedding and of every norm layer to the compute dtype.

    The trained embedding and norms hold fp32 master weights, so their outputs are fp32 (Llama's RMSNorm multiplies
    by its weight last), and bitsandbytes' Linear4bit returns its input's dtype: without the cast the whole residual
    stream, q/k/v and every checkpointed hidden state would be fp32 under 16-bit autocast, twice the activation
    memory, and flash-attn/xformers would refuse the fp32 q/k/v. Returns the hook handles ([] in fp32).
    """
    if dtype == torch.float32:
        return []

    def cast(module, args, output):
        if isinstance(output, torch.Tensor) and output.is_floating_point() and output.dtype != dtype:
            return output.to(dtype)
        return output

    embedding = model.get_input_embeddings()
    targets = [embedding] + [m for m in model.modules() if type(m).__name__.endswith(NORM_SUFFIXES)]
    handles = [m.register_forward_hook(cast) for m in targets]
    model.__dict__.setdefault("_longqlora_stream_hooks", []).extend(handles)
    return handles


def adapt_for_training(
    model, cfg, compute_dtype: torch.dtype, *, gradient_checkpointing: bool = True, context_parallel=None
):
    """Freeze the loaded base, add LoRA and the trained embedding/norms, keep the residual stream in the compute
    dtype and switch on S2-Attn. Returns (peft_model, lora_config). `load_model` and bench/memory.py share it."""
    # Not peft.prepare_model_for_kbit_training: besides freezing, it upcasts every unquantized weight to fp32. The
    # frozen embedding, LM head and norms would then take twice the memory (0.49 GiB at Llama-2-7B, 2 GiB at
    # Llama-3.1-8B) and the fp32 norm weights would make every norm output, so every later activation and
    # checkpoint, fp32 (docs/gpu.md, finding 1). Only the trained copies need fp32 master weights (below).
    model.requires_grad_(False)
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no inputs that require grad (the reentrant kind would).
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model, lora = add_adapters(model, cfg)
    trainable_to_fp32(model)
    stream_in_compute_dtype(model, compute_dtype)
    if cfg.s2_attention or cfg.pose_window:
        from longqlora.attention import enable_s2_attention

        # Full attention with PoSE runs through the S2 op with every head full: transformers' packed-sequence
        # mask would read each of PoSE's position skips as a new document.
        enable_s2_attention(
            model,
            cfg.group_sizes[0],
            backend=cfg.attn_backend,
            shift=cfg.s2_shift,
            sink_tokens=cfg.s2_sink_tokens,
            full_heads=cfg.s2_full_heads if cfg.s2_attention else 1.0,
            context_parallel=context_parallel,
        )
    return model, lora
