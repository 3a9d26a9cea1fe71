"""Load a Llama-family model for long-context LoRA+ training: NF4 weights, position interpolation, S2-Attn.

The recipe: the frozen base is quantized to 4-bit NF4 with double quantization (LongQLoRA, arXiv 2311.04879,
after QLoRA), RoPE is position-interpolated to the target context (rope.py), LoRA adapters go on the attention
projections, and the input embedding and every norm layer are trained in full and saved with the adapter ("LoRA+",
LongLoRA arXiv 2309.12307 §3.3: without them LoRA does not close the gap to full fine-tuning at long context).
Training attention is shifted sparse attention (S2-Attn, LongLoRA §3.2), switched on by longqlora.attention.

Everything that can fail before the weights load is checked first by `check_model`, each failure one line naming
the flag to change.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import logging
import os
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

from longqlora import hardware, rope
from longqlora.adapters import adapt_for_training, add_adapters, count_trainable
from longqlora.hardware import DTYPES
from longqlora.model_config import DEFAULT_SCHEDULE, TRAINABLE_TOKENS, ModelConfig
from longqlora.model_files import check_safetensors, first_line, load_config, load_tokenizer

__all__ = ["DEFAULT_SCHEDULE", "TRAINABLE_TOKENS", "ModelConfig", "ModelInfo", "check_model", "load_base", "load_model"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What `check_model` found before any weights load: the contexts, the interpolation, and the precision and
    kernels this machine runs. `load_model` adds the parameter counts and the pad token."""

    model: str
    original_context: int
    target_context: int
    pi_factor: float
    rope_type: str | None
    compute_dtype: str
    attn_backend: str
    attn_backend_requested: str
    load_in_4bit: bool
    device: str
    trainable_params: int | None = None
    total_params: int | None = None
    modules_to_save: tuple[str, ...] | None = None
    pad_token: str | None = None
    rope_changed: bool = True  # False: the target lies within the RoPE scaling the model already has

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.compute_dtype]

    @property
    def scaling(self) -> str:
        """The context extension in words for logs and reports, e.g. "YaRN x2", "position interpolation x4" or, for
        a target within a Llama-3.1's own scaling, "llama3 RoPE x8, the model's own"."""
        if self.pi_factor == 1:
            return "no RoPE scaling"
        name = rope.UNSCALED_TO.get(self.rope_type, f"{self.rope_type} RoPE")
        return f"{name} x{self.pi_factor:.4g}" + ("" if self.rope_changed else ", the model's own")


ROPE_IN_WINDOWED_LAYERS_ONLY = ("cohere2",)  # Command R7B: its global layers have no position encoding


def check_model(
    cfg: ModelConfig, *, trust_remote_code: bool = False, prefer_preset: bool = False, keep_window: bool = False
) -> tuple[object, ModelInfo]:
    """Check everything that can fail before weights load; returns (hf_config with PI applied, ModelInfo).

    Raises one ValueError line naming the flag and the fix: a bad path or hub id, no RoPE, a target below the
    pre-trained context, an attention backend or compute dtype this machine cannot run, bitsandbytes missing.
    `prefer_preset` (dry runs, planning) reads a known model's built-in config instead of the hub; `keep_window`
    (a plain model evaluated as saved) keeps a sliding window that a run would clear.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.attn_backend != "auto":
        problem = hardware.backend_problem(cfg.attn_backend)
        if problem:
            raise ValueError(problem)
    backend = hardware.resolve_backend(cfg.attn_backend, device)
    if backend == "auto":
        backend = hardware.auto_kernels(device)
    dtype = hardware.resolve_dtype(cfg.compute_dtype)
    if dtype == torch.bfloat16 and not hardware.supports_bf16():
        major, minor = hardware.cuda_capability()
        raise ValueError(f"--compute_dtype bfloat16: this GPU (sm_{major}{minor}) has no bf16; use float16")
    if cfg.load_in_4bit:
        try:
            importlib.import_module("bitsandbytes")
        except Exception as err:  # ImportError, or a broken CUDA build failing at import
            raise ValueError(
                f"--load_in_4bit: bitsandbytes does not import ({first_line(err)}); "
                "`pip install bitsandbytes` or pass --load_in_4bit false"
            ) from err

    hf_config = load_config(
        cfg.model_name_or_path,
        "--model_name_or_path",
        revision=cfg.revision,
        trust_remote_code=trust_remote_code,
        prefer_preset=prefer_preset,
    )
    if getattr(hf_config, "attn_logit_softcapping", None):  # else transformers' own error after the config checks
        raise ValueError(
            f"--model_name_or_path: {hf_config.model_type} soft-caps its attention scores (attn_logit_softcapping), "
            "which S2-Attn and SDPA do not compute; this model is not supported"
        )
    if hf_config.model_type in ROPE_IN_WINDOWED_LAYERS_ONLY and not keep_window:  # cleared: no layer with RoPE
        raise ValueError(
            f"--model_name_or_path: {hf_config.model_type} applies RoPE only in its sliding-window layers, which "
            "S2-Attn and a whole-context window do not keep; this model is not supported"
        )
    check_safetensors(cfg.model_name_or_path, "--model_name_or_path", required=False)  # damaged: before any output
    rope.set_original_context(hf_config, cfg.original_context)  # where config.json overstates it (0: as it says)
    original = rope.original_context(hf_config)  # raises naming --target_context for a model without RoPE
    if cfg.target_context < original:
        raise ValueError(
            f"--target_context {cfg.target_context} is below the model's pre-trained context "
            f"{original}; pass --target_context {original} or more (or --original_context, if the model was "
            "pre-trained on fewer tokens than its config.json says)"
        )
    before = rope.rope_summary(hf_config)
    pi_factor = rope.apply_position_interpolation(hf_config, cfg.target_context, cfg.rope_scaling)
    if not keep_window:
        clear_short_window(hf_config, cfg.target_context)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    if backend == "flash_attn" and head_dim > 256:  # else flash-attn's own error at the first step
        raise ValueError(
            f"--attn_backend flash_attn: this model's head_dim {head_dim} is over flash-attn's 256; use "
            "--attn_backend auto or sdpa"
        )
    info = ModelInfo(
        model=cfg.model_name_or_path,
        original_context=original,
        target_context=cfg.target_context,
        pi_factor=pi_factor,
        rope_type=rope.rope_summary(hf_config).get("rope_type"),
        compute_dtype=str(dtype).removeprefix("torch."),
        attn_backend=backend,
        attn_backend_requested=cfg.attn_backend,
        load_in_4bit=cfg.load_in_4bit,
        device=device,
        rope_changed=rope.rope_summary(hf_config) != before,
    )
    return hf_config, info


def clear_short_window(hf_config, target: int) -> None:
    """Attend the whole target context: a sliding window shorter than it (Mistral-7B-v0.1: 4096) is cleared.
    S2-Attn attends whole groups and its full-attention steps whole rows, with no window, so training, evaluation
    and the merged model all attend alike only without one; a window also defeats what the extension is for
    (Mistral-7B-v0.2 dropped v0.1's window for its 32k context)."""
    window = getattr(hf_config, "sliding_window", None)
    if window is None or window >= target:
        return
    hf_config.sliding_window = None
    if getattr(hf_config, "use_sliding_window", None):  # Qwen2's switch
        hf_config.use_sliding_window = False
    if getattr(hf_config, "layer_types", None):  # per-layer kinds derived from the window at load
        hf_config.layer_types = ["full_attention"] * len(hf_config.layer_types)
    logger.warning(
        "sliding_window %d is shorter than the target context %d: cleared (whole-context attention)", window, target
    )


# What `check_model` may set on the base's config: RoPE scaling, the context, a cleared sliding window.
EXTENDED_KEYS = ("rope_parameters", "max_position_embeddings", "sliding_window", "use_sliding_window", "layer_types")


def extended_config(hf_config) -> dict:
    """Those attributes of the config a run trained with, as keyword arguments for `from_pretrained`: plain
    transformers and PEFT load the base as the adapter was trained (the extension record keeps them)."""
    return {key: copy.deepcopy(getattr(hf_config, key)) for key in EXTENDED_KEYS if hasattr(hf_config, key)}


def base_tokenizer(cfg: ModelConfig, trust_remote_code: bool = False):
    """The base's tokenizer (training loads it before the weights, to check and tokenize the data first)."""
    flag, fix = "--model_name_or_path", "save the tokenizer next to the weights"
    tokenizer = load_tokenizer(
        cfg.model_name_or_path, flag, fix, revision=cfg.revision, trust_remote_code=trust_remote_code
    )
    return fit_tokenizer_context(tokenizer, cfg.target_context)


def fit_tokenizer_context(tokenizer, context: int):
    """Raise the tokenizer's `model_max_length` to `context` where it holds the base's shorter one (transformers
    truncates to it and warns past it), so that the tokenizer saved with an adapter or a merged model says the
    extended context; the library's own "no limit" value is far above any context and stays."""
    if (tokenizer.model_max_length or 0) < context:
        tokenizer.model_max_length = context
    return tokenizer


def load_base(cfg: ModelConfig, *, checked: tuple | None = None, trust_remote_code: bool = False, tokenizer=None):
    """Load the tokenizer (unless given: `base_tokenizer`'s) and the (4-bit NF4) base model with PI applied; no
    adapters yet. `checked` is what `check_model` returned for `cfg` (a resolved run passes it; else checked here).

    Returns (model, tokenizer, ModelInfo). Also what evaluation uses before `PeftModel.from_pretrained`.
    """
    from transformers import BitsAndBytesConfig

    hf_config, info = checked or check_model(cfg, trust_remote_code=trust_remote_code)
    if (info.model, info.target_context) != (cfg.model_name_or_path, cfg.target_context):
        raise RuntimeError(
            f"load_base: checked= was made for {info.model} at {info.target_context} tokens, not this config"
        )
    path = os.path.expanduser(cfg.model_name_or_path)
    if os.path.isdir(path):  # an adapter's config names its base by this path: one that works from anywhere
        path = os.path.abspath(path)
    tokenizer = base_tokenizer(cfg, trust_remote_code) if tokenizer is None else tokenizer
    if tokenizer.pad_token is None:
        # Reuse an existing token rather than adding one: a new row would change the vocabulary of the base.
        source = "unk" if tokenizer.unk_token is not None else "eos"
        tokenizer.pad_token = tokenizer.unk_token if source == "unk" else tokenizer.eos_token
        pad = (source, tokenizer.pad_token, tokenizer.pad_token_id)
        logger.info("tokenizer has no pad token; padding with the %s token %r (id %d)", *pad)
    info = dataclasses.replace(info, pad_token=tokenizer.pad_token)
    check_safetensors(cfg.model_name_or_path, "--model_name_or_path")

    dtype = info.dtype
    quant = None
    launched = hardware.launch()
    if cfg.load_in_4bit:  # LongQLoRA: NF4 with double quantization of the scales
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # FSDP shards and all-gathers parameters of one dtype: packed NF4 bytes stored as the compute dtype
            # (the default uint8 storage crashes FSDP2 or trains with loss 0).
            bnb_4bit_quant_storage=dtype if launched.shards_weights else torch.uint8,
        )
    device_map = hardware.device_map(info.device, launched)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        config=hf_config,
        dtype=dtype,
        quantization_config=quant,
        device_map=device_map,
        use_safetensors=True,
        revision=cfg.revision,
        trust_remote_code=trust_remote_code,
        attn_implementation="sdpa",
    )
    model.config.use_cache = False
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, info


def count_trainable_without_weights(cfg: ModelConfig, hf_config=None, *, trust_remote_code: bool = False) -> dict:
    """Trainable and total parameter counts of the adapted model, computed on the meta device (no weights load);
    the base's Linear layers count as full-size here, as they would in 16-bit. `hf_config`: the model's config
    as `check_model` returned it (read here when not given)."""
    from accelerate import init_empty_weights

    if hf_config is None:
        hf_config, _ = check_model(cfg, trust_remote_code=trust_remote_code, prefer_preset=True)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    model.tie_weights()  # on the meta device the tied head is a second tensor (counted twice, PEFT warned)
    model.requires_grad_(False)
    model, _ = add_adapters(model, cfg)
    trainable, total = count_trainable(model)
    return {"trainable_params": trainable, "total_params": total}


def load_model(
    cfg: ModelConfig,
    *,
    checked: tuple | None = None,
    gradient_checkpointing: bool = True,
    trust_remote_code: bool = False,
    context_parallel=None,
    tokenizer=None,
):
    """Load the base (`load_base`, with `tokenizer` when given) and adapt it for training (`adapt_for_training`);
    `context_parallel`: this process's attention.context_parallel.CPGroup when rows are split over processes.

    Returns (peft_model, tokenizer, ModelInfo) ready for training, the info with the parameter counts.
    """
    model, tokenizer, info = load_base(cfg, checked=checked, trust_remote_code=trust_remote_code, tokenizer=tokenizer)
    model, lora = adapt_for_training(
        model, cfg, info.dtype, gradient_checkpointing=gradient_checkpointing, context_parallel=context_parallel
    )
    trainable, total = count_trainable(model)
    saved = tuple(lora.modules_to_save) if lora.modules_to_save else None
    info = dataclasses.replace(info, trainable_params=trainable, total_params=total, modules_to_save=saved)
    logger.debug(  # a run's configuration block states them
        "trainable parameters: %d of %d (%.2f%%): LoRA r=%d on %s, full %s",
        trainable,
        total,
        100 * trainable / max(total, 1),
        cfg.lora_r,
        cfg.lora_target,
        cfg.trainable_params or "nothing else",
    )
    return model, tokenizer, info
