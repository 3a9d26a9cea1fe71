"""Load a Llama-family model for long-context LoRA+ training: NF4 weights, position interpolation, S2-Attn.

The recipe: the frozen base is quantized to 4-bit NF4 with double quantization (LongQLoRA, arXiv 2311.04879,
after QLoRA), RoPE is position-interpolated to the target context (rope.py), LoRA adapters go on the attention
projections, and the input embedding and every norm layer are trained in full and saved with the adapter ("LoRA+",
LongLoRA arXiv 2309.12307 §3.3: without them LoRA does not close the gap to full fine-tuning at long context).
Training attention is shifted sparse attention (S2-Attn, LongLoRA §3.2), switched on by attention.py.

Everything that can fail before the weights load is checked first by `check_model`, each failure one line naming
the flag to change.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from longqlora import hardware, rope
from longqlora.attention.experimental import check_variant
from longqlora.adapters import adapt_for_training, add_adapters, count_trainable
from longqlora.hardware import DTYPES

logger = logging.getLogger(__name__)

TRAINABLE_TOKENS = ("embed", "norm")


# S2-Attn's default group-size schedule, as multiples of --group_ratio (mean 1: a fixed group's attention cost).
# docs/ablations.md ("Default"): better than a fixed group on every seed in fp32, and at 120 steps on NF4.
DEFAULT_SCHEDULE = "0.25,0.75,2"


@dataclass
class ModelConfig:
    """Which model to load and how to adapt it; the fields become command-line flags through HfArgumentParser."""

    model_name_or_path: str = field(metadata={"help": "Local model directory or hub id of a RoPE decoder (Llama, "
                                                      "Mistral, Qwen2)."})
    target_context: int = field(metadata={"help": "Context length to extend to, e.g. 8192; RoPE is "
                                                  "position-interpolated by target / pre-trained context."})
    group_ratio: float = field(default=0.25, metadata={"help": "S2-Attn group size as a fraction of the training "
                                                                "length (--target_context, or --pose_window), in "
                                                                "(0, 1] (LongLoRA §3.2 uses 1/4)."})
    s2_attention: bool = field(default=True, metadata={"help": "Train with shifted sparse attention; false trains "
                                                                "with full attention (ablation)."})
    s2_shift: str = field(default="leakfree", metadata={"help": "S2-Attn shift: leakfree (ours: half groups at "
                                                                 "the ends) or rolled (LongLoRA's original roll, "
                                                                 "which wraps around; ablation)."})
    s2_sink_tokens: int = field(default=0, metadata={"help": "S2-Attn attention sinks (SinkLoRA): the first N "
                                                              "tokens of each document visible to every query."})
    s2_full_heads: float = field(default=0.0, metadata={"help": "Share of attention heads in full causal attention "
                                                                 "during S2 training, in [0, 1]."})
    s2_full_every: int = field(default=0, metadata={"help": "Train every Nth step with full attention in all heads "
                                                             "and the others with S2-Attn (N >= 2); 0 = never."})
    s2_group_schedule: str = field(default=DEFAULT_SCHEDULE, metadata={
        "help": "S2-Attn group-size schedule: multiples of --group_ratio (capped at the training length) that share "
                "the training steps in order; their mean is the attention cost relative to a fixed group "
                "(docs/ablations.md); none = --group_ratio throughout."})
    # PoSE lives with the model, not the data: it decides which positions RoPE (interpolated to --target_context)
    # sees and how long the rows whose S2 groups are set here are; the data config only says what is packed.
    pose_window: int = field(default=0, metadata={"help": "PoSE (arXiv 2309.10400): train in rows of this many "
                                                           "tokens whose position ids skip so that they span "
                                                           "--target_context; 0 = off (rows of --target_context)."})
    pose_chunks: int = field(default=2, metadata={"help": "PoSE: chunks per document; each after the first skips "
                                                           "a random number of positions (the paper uses 2)."})
    attn_backend: str = field(default="auto", metadata={"help": "Attention kernel: auto, sdpa, flash_attn or "
                                                                 "xformers."})
    load_in_4bit: bool = field(default=True, metadata={"help": "Quantize the frozen base to 4-bit NF4 with double "
                                                                "quantization (bitsandbytes)."})
    compute_dtype: str = field(default="auto", metadata={"help": "Dtype of activations and 4-bit matmuls: auto "
                                                                  "(bf16 where supported, else fp16), bfloat16, "
                                                                  "float16 or float32."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    lora_target: str = field(default="attention", metadata={"help": "Modules that get LoRA: attention (q/k/v/o "
                                                                     "projections), all-linear, or a comma list "
                                                                     "of module names."})
    trainable_params: str = field(default="embed,norm", metadata={"help": "Modules trained in full and saved with "
                                                                           "the adapter (LongLoRA §3.3): comma list "
                                                                           "of embed, norm; empty for plain LoRA."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit) to load."})

    def __post_init__(self):
        def bad(flag, value, fix):
            raise ValueError(f"--{flag} {value!r}: {fix}")

        if self.target_context < 1:
            bad("target_context", self.target_context, "must be a positive number of tokens, e.g. 8192")
        if not 0 < self.group_ratio <= 1:
            bad("group_ratio", self.group_ratio, "must be in (0, 1]; LongLoRA uses 0.25")
        check_variant(self.s2_shift, self.s2_sink_tokens, self.s2_full_heads)
        if self.s2_full_every < 0 or self.s2_full_every == 1:
            bad("s2_full_every", self.s2_full_every, "must be 0 (never) or >= 2; every step in full attention is "
                                                     "--s2_attention false")
        try:
            multiples = self.group_schedule
        except ValueError:
            multiples = [0.0]
        if not multiples or not all(m > 0 for m in multiples):
            bad("s2_group_schedule", self.s2_group_schedule, f"must be none or a comma list of positive multiples "
                f"of --group_ratio, e.g. {DEFAULT_SCHEDULE}")
        if self.pose_window < 0 or self.pose_window >= self.target_context:
            bad("pose_window", self.pose_window, f"must be 0 (off) or a row length below --target_context "
                f"{self.target_context}, e.g. {self.target_context // 4}")
        if self.pose_chunks < 2:
            bad("pose_chunks", self.pose_chunks, "must be at least 2: the first chunk keeps positions from 0, the "
                                                 "others skip")
        if self.pose_window and self.pose_chunks > self.pose_window:
            bad("pose_chunks", self.pose_chunks, f"must be at most --pose_window {self.pose_window}")
        if self.pose_window and self.s2_shift == "rolled":
            bad("s2_shift", self.s2_shift, "LongLoRA's roll knows no position ids; PoSE takes --s2_shift leakfree")
        if self.s2_shift == "rolled" and any(self.target_context % g for g in self.group_sizes):
            bad("s2_group_schedule", self.s2_group_schedule, f"--s2_shift rolled needs groups that divide "
                f"--target_context {self.target_context}, got {self.group_sizes}; use --s2_group_schedule none")
        if self.lora_r < 1:
            bad("lora_r", self.lora_r, "must be at least 1, e.g. 8")
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", self.lora_dropout, "must be in [0, 1), e.g. 0.05")
        if self.compute_dtype not in ("auto", *DTYPES):
            bad("compute_dtype", self.compute_dtype, f"must be one of auto, {', '.join(DTYPES)}")
        if self.attn_backend not in ("auto", *hardware.BACKENDS):
            bad("attn_backend", self.attn_backend, f"must be one of auto, {', '.join(hardware.BACKENDS)}")
        unknown = [t for t in self.trainable_tokens if t not in TRAINABLE_TOKENS]
        if unknown:
            bad("trainable_params", self.trainable_params,
                f"unknown {', '.join(unknown)}; use a comma list of {', '.join(TRAINABLE_TOKENS)}, or '' for none")
        if not self.lora_target.strip(" ,"):
            bad("lora_target", self.lora_target, "use attention, all-linear or a comma list of module names")

    @property
    def train_length(self) -> int:
        """Tokens per training row: --pose_window with PoSE, else --target_context."""
        return self.pose_window or self.target_context

    @property
    def group_size(self) -> int:
        """S2-Attn group size in tokens: group_ratio x the training length, at least 1."""
        return max(1, int(round(self.group_ratio * self.train_length)))

    @property
    def group_schedule(self) -> list[float]:
        """The parsed `s2_group_schedule`, multiples of group_ratio ([1.0] for none); ValueError on a non-number."""
        if self.s2_group_schedule.strip().lower() in ("", "none"):
            return [1.0]
        return [float(m) for m in self.s2_group_schedule.split(",") if m.strip()]

    @property
    def group_sizes(self) -> list[int]:
        """S2-Attn group sizes in tokens, one per equal share of the training steps (at most the training length:
        with --group_ratio above 1/2 the default schedule's last share is one whole-row group)."""
        return [max(1, min(self.train_length, int(round(m * self.group_ratio * self.train_length))))
                for m in self.group_schedule]

    @property
    def trainable_tokens(self) -> list[str]:
        """The parsed `trainable_params` list, e.g. ["embed", "norm"]."""
        return [t.strip() for t in self.trainable_params.split(",") if t.strip()]


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

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.compute_dtype]


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub id: starts with / . ~, has more than one slash, or its first part exists."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.path.exists(name.split("/")[0])


def _why(err: Exception) -> str:
    """One line for a transformers loading error; a directory with its own Python code gets the flag it needs."""
    if "custom code" in str(err):
        return "it ships its own Python code, which is never run without --trust_remote_code true"
    return _first_line(err)


def check_safetensors(name: str, flag: str) -> None:
    """Weights load from safetensors only: refuse a local model directory that holds none (pickle .bin files
    could run code when loaded, so they are never read)."""
    path = Path(os.path.expanduser(name))
    if path.is_dir() and not any(path.glob("*.safetensors")):
        raise ValueError(f"{flag} {name}: no .safetensors weights (pickle .bin files are never loaded); save the "
                         "model with safe_serialization=True")


def load_tokenizer(name: str, flag: str = "--tokenizer", fix: str = "pass a tokenizer or model directory, or a hub id",
                   **kwargs):
    """`AutoTokenizer.from_pretrained(name, **kwargs)`, or one ValueError line naming `flag` and the `fix`; a local
    path that does not exist is refused here rather than looked up on the hub."""
    name = str(name)  # Python callers pass Path objects
    path = os.path.expanduser(name)
    if _looks_like_path(name) and not os.path.isdir(path):
        raise ValueError(f"{flag} {name}: no such directory; {fix}")
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"{flag} {name}: cannot load its tokenizer ({_why(err)}); {fix}") from err


def load_config(name: str, flag: str, *, revision: str | None = None, trust_remote_code: bool = False,
                prefer_preset: bool = False):
    """The transformers config of model `name` (a directory or hub id), or one ValueError line naming `flag` and
    what to pass instead. With `prefer_preset`, a model the toolkit knows (presets.py) uses its built-in config."""
    from longqlora.presets import preset_config

    name = str(name)
    flag = f"{flag} {name}"
    path = os.path.expanduser(name)
    local = _looks_like_path(name)
    preset = None if local or not prefer_preset else preset_config(name)
    if preset is not None:
        return preset
    if local and not os.path.isdir(path):
        raise ValueError(f"{flag}: no such directory; pass a local model directory or a hub id")
    if local and not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{flag}: the directory has no config.json; pass a directory saved with save_pretrained")
    try:
        return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as err:
        if local:
            raise ValueError(f"{flag}: cannot read its config ({_first_line(err)})") from err
        raise ValueError(f"{flag}: could not be found locally or on the hub (offline?); pass a local model "
                         "directory") from err
    except ValueError as err:
        raise ValueError(f"{flag}: {_why(err)}") from err


def check_model(cfg: ModelConfig, *, trust_remote_code: bool = False,
                prefer_preset: bool = False) -> tuple[object, ModelInfo]:
    """Check everything that can fail before weights load; returns (hf_config with PI applied, ModelInfo).

    Raises one ValueError line naming the flag and the fix: a bad path or hub id, no RoPE, a target below the
    pre-trained context, an attention backend or compute dtype this machine cannot run, bitsandbytes missing.
    `prefer_preset` (dry runs, planning) reads a known model's built-in config instead of the hub.
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
            raise ValueError(f"--load_in_4bit: bitsandbytes does not import ({_first_line(err)}); "
                             "`pip install bitsandbytes` or pass --load_in_4bit false") from err

    hf_config = load_config(cfg.model_name_or_path, "--model_name_or_path", revision=cfg.revision,
                            trust_remote_code=trust_remote_code, prefer_preset=prefer_preset)
    original = rope.original_context(hf_config)  # raises naming --target_context for a model without RoPE
    if cfg.target_context < original:
        raise ValueError(f"--target_context {cfg.target_context} is below the model's pre-trained context "
                         f"{original}; pass --target_context {original} or more")
    pi_factor = rope.apply_position_interpolation(hf_config, cfg.target_context)
    info = ModelInfo(model=cfg.model_name_or_path, original_context=original, target_context=cfg.target_context,
                     pi_factor=pi_factor, rope_type=rope.rope_summary(hf_config).get("rope_type"),
                     compute_dtype=str(dtype).removeprefix("torch."), attn_backend=backend,
                     attn_backend_requested=cfg.attn_backend, load_in_4bit=cfg.load_in_4bit, device=device)
    return hf_config, info


def load_base(cfg: ModelConfig, *, checked: tuple | None = None, trust_remote_code: bool = False):
    """Load the tokenizer and the (4-bit NF4) base model with PI applied; no adapters yet. `checked` is what
    `check_model` returned for `cfg` (a resolved run passes it; checked here when not given).

    Returns (model, tokenizer, ModelInfo). Also what evaluation uses before `PeftModel.from_pretrained`.
    """
    from transformers import BitsAndBytesConfig

    hf_config, info = checked or check_model(cfg, trust_remote_code=trust_remote_code)
    path = os.path.expanduser(cfg.model_name_or_path)
    tokenizer = load_tokenizer(cfg.model_name_or_path, "--model_name_or_path", "save the tokenizer next to the "
                               "weights", revision=cfg.revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        # Reuse an existing token rather than adding one: a new row would change the vocabulary of the base.
        source = "unk" if tokenizer.unk_token is not None else "eos"
        tokenizer.pad_token = tokenizer.unk_token if source == "unk" else tokenizer.eos_token
        logger.info("tokenizer has no pad token; padding with the %s token %r (id %d)", source,
                    tokenizer.pad_token, tokenizer.pad_token_id)
    info = dataclasses.replace(info, pad_token=tokenizer.pad_token)
    check_safetensors(cfg.model_name_or_path, "--model_name_or_path")

    dtype = info.dtype
    quant = None
    if cfg.load_in_4bit:  # LongQLoRA: NF4 with double quantization of the scales
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
    device_map = {"": torch.cuda.current_device()} if info.device == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(
        path, config=hf_config, dtype=dtype, quantization_config=quant, device_map=device_map,
        use_safetensors=True, revision=cfg.revision, trust_remote_code=trust_remote_code,
        attn_implementation="sdpa")
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
    model.requires_grad_(False)
    model, _ = add_adapters(model, cfg)
    trainable, total = count_trainable(model)
    return {"trainable_params": trainable, "total_params": total}


def load_model(cfg: ModelConfig, *, checked: tuple | None = None, gradient_checkpointing: bool = True,
               trust_remote_code: bool = False):
    """Load the base (`load_base`) and adapt it for training (`adapt_for_training`).

    Returns (peft_model, tokenizer, ModelInfo) ready for training, the info with the parameter counts.
    """
    model, tokenizer, info = load_base(cfg, checked=checked, trust_remote_code=trust_remote_code)
    model, lora = adapt_for_training(model, cfg, info.dtype, gradient_checkpointing=gradient_checkpointing)
    trainable, total = count_trainable(model)
    saved = tuple(lora.modules_to_save) if lora.modules_to_save else None
    info = dataclasses.replace(info, trainable_params=trainable, total_params=total, modules_to_save=saved)
    logger.info("trainable parameters: %d of %d (%.2f%%): LoRA r=%d on %s, full %s", trainable, total,
                100 * trainable / max(total, 1), cfg.lora_r, cfg.lora_target, cfg.trainable_params or "nothing else")
    return model, tokenizer, info
