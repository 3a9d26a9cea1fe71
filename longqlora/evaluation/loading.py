"""Loading a model to use it after training: evaluation, passkey retrieval and chat share this one loader.

A model is a plain or merged directory, or a base plus a PEFT adapter written by the recipes. The adapter's
`longqlora_extension.json` says which context it was trained for, so the base gets the same position interpolation;
attention is the model's own full attention (S2-Attn is only for training, LongLoRA §3.2).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from longqlora.errors import flags_renamed
from longqlora.hardware import DTYPES
from longqlora.record import REPORT_FILE, ExtensionRecord, adapter_config
from longqlora.rope import UNSCALED_TO, check_scaling

logger = logging.getLogger(__name__)


# generate() settings that decide which token comes next, at their neutral values. transformers fills whatever a
# call leaves unset from the model's generation_config.json (Qwen2-Instruct's repetition_penalty 1.05, a ban on
# repeated n-grams, beams, suppressed tokens), so passkey's greedy answer and chat pass these and then their own.
NEUTRAL_DECODING = {
    "do_sample": False,
    "num_beams": 1,
    "num_return_sequences": 1,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "min_p": None,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "min_length": 0,
    "max_length": None,  # Llama-2's 4096 there would warn against max_new_tokens at every call
    "min_new_tokens": None,
    "penalty_alpha": None,  # contrastive search and DoLa: other decoding methods, each a remote-code one now
    "dola_layers": None,
    "exponential_decay_length_penalty": None,
    "renormalize_logits": False,
    "guidance_scale": None,
    "watermarking_config": None,
}


@dataclass
class LoaderArgs:
    """The flags of every command that loads a model to use it (chat, passkey, perplexity): which model and adapter,
    and how to load them. Each command's config adds its own flags to these."""

    model: str | None = field(
        default=None,
        metadata={
            "help": "Model directory or hub id (plain, merged, or the base of --adapter; default: the "
            "adapter's recorded base)."
        },
    )
    adapter: str | None = field(
        default=None,
        metadata={"help": "A PEFT adapter directory from a recipe; its longqlora_extension.json sets the context."},
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "Load the base in NF4 (bitsandbytes), as trained; default 16-bit (fp32 on CPU)."},
    )
    compute_dtype: str = field(
        default="auto",
        metadata={"help": "auto (bf16 on Ampere+, fp16 on older GPUs, fp32 on CPU), bfloat16, float16 or float32."},
    )
    target_context: int | None = field(
        default=None,
        metadata={
            "help": "Stretch RoPE to this context (--rope_scaling; default: the adapter's, else the model's own)."
        },
    )
    rope_scaling: str | None = field(
        default=None,
        metadata={
            "help": "With --target_context on an unscaled RoPE: yarn or linear (position interpolation); default: "
            "the adapter's recorded type, else the training default (yarn)."
        },
    )
    original_context: int | None = field(
        default=None,
        metadata={
            "help": "The context the model was pre-trained at, when its config.json says more (Mistral-7B-v0.1: "
            "8192 of 32768); default: the adapter's recorded one, else config.json's."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow a model's own code from its directory (off: only transformers' code)."}
    )

    def __post_init__(self):
        for name in ("model", "adapter"):  # Python callers pass Path objects
            value = getattr(self, name)
            setattr(self, name, str(value) if value else None)
        if not self.model and not self.adapter:
            raise ValueError("--model: pass a model directory (or an --adapter whose base is recorded)")
        if self.compute_dtype not in ("auto", *DTYPES):
            raise ValueError(f"--compute_dtype {self.compute_dtype!r}: must be one of auto, {', '.join(DTYPES)}")
        if self.target_context is not None and self.target_context < 1:
            raise ValueError(f"--target_context {self.target_context}: must be a positive number of tokens")
        if self.rope_scaling is not None:
            check_scaling(self.rope_scaling)
        if self.original_context is not None and self.original_context < 1:
            raise ValueError(f"--original_context {self.original_context}: must be a positive number of tokens")

    def load(self, tokenizer=None):
        """`load_for_inference` with these flags: (model in eval mode, tokenizer, info); `tokenizer`: the one
        `inference_tokenizer` loaded already (to check the data before the weights), not loaded again."""
        return load_for_inference(
            self.model,
            tokenizer=tokenizer,
            adapter=self.adapter,
            load_in_4bit=self.load_in_4bit,
            compute_dtype=self.compute_dtype,
            target_context=self.target_context,
            rope_scaling=self.rope_scaling,
            original_context=self.original_context,
            trust_remote_code=self.trust_remote_code,
        )


def read_extension(adapter) -> ExtensionRecord | None:
    """The extension record of an adapter directory (None when it has none), after checking it is a PEFT adapter
    whose weights are intact (every command reads it first, so a damaged file is one line before any work)."""
    from longqlora.model_files import check_safetensors, not_a_directory

    path = Path(os.path.expanduser(str(adapter)))
    if not path.is_dir():
        why = not_a_directory(path, "an adapter directory")
        raise ValueError(f"--adapter {adapter}: {why}; pass the adapter directory a recipe wrote")
    adapter_config(adapter)  # one line when adapter_config.json is missing or not a JSON object
    check_safetensors(str(adapter), "--adapter", str(path), required=False)
    return ExtensionRecord.read(path)


def adapter_base(adapter) -> str:
    """The base model an adapter was trained on, as recorded by PEFT. PEFT records a local base as the run named
    it, relative to the folder that run started in; where that does not resolve from here, the absolute path the
    extension record keeps is taken, else (a project moved since) the nearest folder above the adapter that holds
    it with a config.json (the run's folder: its --output_dir lies below), said in a warning."""
    path = Path(os.path.expanduser(str(adapter)))
    base = adapter_config(adapter).get("base_model_name_or_path") or ""
    if not base or os.path.isabs(os.path.expanduser(base)) or os.path.exists(base):
        return base
    record = ExtensionRecord.read(path)
    if record and record.model == base and record.model_path and os.path.isdir(record.model_path):  # the same base
        return record.model_path
    for folder in path.resolve().parents:
        if (folder / base / "config.json").is_file():
            logger.warning("--adapter %s: its recorded base %s taken as %s (pass --model to choose)", adapter, base,
                           folder / base)  # fmt: skip
            return str(folder / base)
    return base


def model_dir(model: str | None, adapter: str | None = None) -> str:
    """The local directory `--model` names (default: the adapter's recorded base; a hub id resolves to its cached
    snapshot), checked before anything loads: one line naming the flag when it is missing or holds no
    config.json (never a hub lookup of a local path)."""
    path = model or (adapter_base(adapter) if adapter else "")
    flag = "--model" if model else f"--adapter {adapter}: its recorded base"
    if not path:
        raise ValueError("--model: pass a model directory (or an --adapter whose base is recorded)")
    from longqlora.model_files import local_model

    expanded = local_model(path, flag)
    if not os.path.isdir(expanded):
        what = "is a file, not a directory" if os.path.exists(expanded) else "no such directory"
        raise ValueError(
            f"{flag} {path}: {what}; pass a local model directory or a hub id" + ("" if model else " with --model")
        )
    if not os.path.isfile(os.path.join(expanded, "config.json")):
        raise ValueError(
            f"{flag} {path}: the directory has no config.json; pass a directory saved with save_pretrained"
        )
    from longqlora.model_files import check_config_json, check_safetensors

    check_config_json(f"{flag} {path}", expanded)
    check_safetensors(path, flag, expanded)
    return expanded


def adapter_tokenizer(adapter: str, *, trust_remote_code: bool = False):
    """The tokenizer saved with an adapter (None when it saved none), padding with an existing token."""
    from longqlora.model_files import load_tokenizer

    read_extension(adapter)  # one line when it is not an adapter directory
    if not (Path(os.path.expanduser(adapter)) / "tokenizer_config.json").is_file():
        return None
    tokenizer = load_tokenizer(
        adapter, "--adapter", "save the tokenizer with the adapter", trust_remote_code=trust_remote_code
    )
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def inference_tokenizer(model: str | None, adapter: str | None = None, *, trust_remote_code: bool = False):
    """The tokenizer `load_for_inference` uses: the adapter's when it saved one, else the model's; loading it
    fails in one line naming the flag."""
    from longqlora.model_files import load_tokenizer

    return (adapter and adapter_tokenizer(adapter, trust_remote_code=trust_remote_code)) or load_tokenizer(
        model_dir(model, adapter), "--model", "pass a local model directory", trust_remote_code=trust_remote_code
    )


def adapter_shapes(adapter: Path) -> dict:
    """Tensor name (without PEFT's prefix) -> shape, read from the safetensors header only."""
    from safetensors import safe_open

    file = adapter / "adapter_model.safetensors"
    if not file.is_file():
        raise ValueError(f"--adapter {adapter}: no adapter_model.safetensors; pass a directory saved by a recipe")
    with safe_open(str(file), framework="pt") as f:
        names = f.keys()
        return {k.removeprefix("base_model.model."): tuple(f.get_slice(k).get_shape()) for k in names}


def check_adapter_fits(
    adapter: Path, base: Path, *, flag: str, name: str, recorded: str, trust_remote_code: bool = False
) -> None:
    """One line when the adapter's tensors cannot belong to this base (`flag name`): the base is that adapter merged
    already (its merge_report.json), hidden or vocab size, then every tensor against the base's structure built on
    the meta device (no weights read)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from longqlora.model_files import load_config

    report = base / REPORT_FILE
    if report.is_file():  # the same shapes fit, and the adapter would be added a second time
        merged = json.loads(report.read_text())
        if Path(merged.get("adapter", "")).resolve() == adapter.resolve():
            fix = "drop --adapter, or pass" if flag == "--model" else "there is nothing to merge again; or pass"
            raise ValueError(
                f"{flag} {name}: {adapter} is merged into it already ({REPORT_FILE}); {fix} the base it was merged "
                f"into, {merged.get('base')}"
            )

    shapes = adapter_shapes(adapter)
    hf_config = load_config(str(base), flag, trust_remote_code=trust_remote_code)
    hidden = vocab = None
    for key, shape in shapes.items():
        if key.endswith("embed_tokens.weight") and len(shape) == 2:
            vocab, hidden = shape
        elif hidden is None and key.endswith("norm.weight") and len(shape) == 1:
            hidden = shape[0]
    for what, theirs, ours in (("hidden", hidden, hf_config.hidden_size), ("vocab", vocab, hf_config.vocab_size)):
        if theirs is not None and theirs != ours:
            raise ValueError(
                f"{flag} {name}: the adapter was trained on {recorded} ({what} {theirs}) but "
                f"{name} has {what} {ours}; pass the base it was trained on"
            )
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    params = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    for key, shape in shapes.items():
        if ".lora_A." in key or ".lora_B." in key:  # Linear weight (out, in); lora_A (r, in), lora_B (out, r)
            module, kind = key.split(".lora_")[0], key.split(".lora_")[1][0]
            want = params.get(f"{module}.weight")
            axis = 1 if kind == "A" else 0
            got, expected = shape[axis], None if want is None else want[axis]
        elif "lora_" in key:  # other adapter tensors (DoRA magnitudes, embedding LoRA) are PEFT's to check
            continue
        else:  # a trained full copy (embedding, norm)
            want = params.get(key)
            got, expected = shape, want
        if want is None:
            raise ValueError(
                f"{flag} {name}: the adapter has {key} but {name} has no such parameter; "
                f"pass the base it was trained on ({recorded})"
            )
        if got != expected:
            raise ValueError(
                f"{flag} {name}: the adapter's {key} has shape {list(shape)} but {name} "
                f"has {list(want)}; pass the base it was trained on ({recorded})"
            )


def inference_context(model: str | None, adapter: str | None = None, *, trust_remote_code: bool = False) -> int:
    """The context `load_for_inference` sets the model up for without a --target_context: the adapter's trained
    one, else what the model's config says (read without the weights)."""
    extension = read_extension(adapter) if adapter else None
    return _trained_context(model_dir(model, adapter), extension, trust_remote_code)


def _trained_context(expanded: str, extension, trust_remote_code: bool) -> int:
    from longqlora.model_files import load_config

    recorded = extension.target_context if extension else None
    return recorded or load_config(expanded, "--model", trust_remote_code=trust_remote_code).max_position_embeddings


def load_for_inference(
    model_path: str | None,
    *,
    adapter: str | None = None,
    load_in_4bit: bool = False,
    compute_dtype: str = "auto",
    target_context: int | None = None,
    rope_scaling: str | None = None,
    original_context: int | None = None,
    trust_remote_code: bool = False,
    adapter_checked: bool = False,
    tokenizer=None,
):
    """Returns (model in eval mode, tokenizer, ModelInfo).

    `model_path` defaults to the adapter's recorded base. Position interpolation: `target_context` when given
    (e.g. PI without training), else the adapter's trained context, else the model's config as saved; an
    unscaled RoPE becomes `rope_scaling` (yarn or linear), by default what the adapter was trained with, and
    counts from `original_context` (ModelConfig's --original_context), by default the adapter's recorded one.
    `adapter_checked`: the caller ran `check_adapter_fits` already, naming its own flags (merge's --base).
    `tokenizer`: what `inference_tokenizer` returned for these paths, when the caller has it already.
    """
    from longqlora.model import ModelConfig, check_model, fit_tokenizer_context, load_base

    as_saved = adapter is None and target_context is None  # the model as released: its sliding window kept
    extension = read_extension(adapter) if adapter else None
    expanded = model_dir(model_path, adapter)
    model_path = model_path or adapter_base(adapter)
    if adapter and not adapter_checked:
        check_adapter_fits(
            Path(os.path.expanduser(adapter)),
            Path(expanded),
            flag="--model",
            name=model_path,
            recorded=adapter_base(adapter) or model_path,
            trust_remote_code=trust_remote_code,
        )
    if target_context is None:
        target_context = _trained_context(expanded, extension, trust_remote_code)
    if rope_scaling is None and extension is None:
        rope_scaling = ModelConfig.rope_scaling
    elif rope_scaling is None:  # what the adapter trained with; records from before --rope_scaling trained with PI
        rope_scaling = extension.rope_type if extension.rope_type in UNSCALED_TO else "linear"
    if original_context is None and extension is not None:
        original_context = extension.original_context  # the base's own unless the run passed --original_context
    elif extension is not None and original_context != extension.original_context:
        logger.warning(
            "--original_context %d: the adapter trained from %d (its record)",
            original_context,
            extension.original_context,
        )
    cfg = ModelConfig(
        model_name_or_path=expanded,
        target_context=int(target_context),
        rope_scaling=rope_scaling,
        original_context=original_context or 0,
        load_in_4bit=load_in_4bit,
        compute_dtype=compute_dtype,
        s2_attention=False,
    )
    with flags_renamed({"--model_name_or_path": "--model"}):  # the training flag's name, --model here
        checked = check_model(cfg, trust_remote_code=trust_remote_code, keep_window=as_saved)
    if tokenizer is None and adapter:  # the adapter's own, when it saved one (else load_base loads the base's)
        tokenizer = adapter_tokenizer(adapter, trust_remote_code=trust_remote_code)
    model, tokenizer, info = load_base(cfg, checked=checked, trust_remote_code=trust_remote_code, tokenizer=tokenizer)
    tokenizer = fit_tokenizer_context(tokenizer, info.target_context)
    if adapter:
        from peft import PeftModel

        with warnings.catch_warnings():  # PEFT reads transformers' deprecated `is_gradient_checkpointing`
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(model, os.path.expanduser(adapter))
    logger.info(
        "loaded %s%s for inference: context %d (%s), %s",
        model_path,
        f" + adapter {adapter}" if adapter else "",
        info.target_context,
        info.scaling,
        "NF4" if load_in_4bit else info.compute_dtype,
    )
    return model.eval(), tokenizer, info
