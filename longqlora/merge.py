"""Merge a trained adapter into its base: one plain transformers model that needs neither PEFT nor this toolkit.

The base is reloaded in 16-bit (or float32), never in NF4: merging a LoRA delta into 4-bit weights re-quantizes
them and changes generations. The adapter's position interpolation is applied first (evaluation/loading.py reads it from
`longqlora_extension.json`), the trained embedding and norms (LongLoRA §3.3, PEFT modules_to_save) replace the
base's, the LoRA products are added into the projections, and the result is saved with the adapter's tokenizer.
S2-Attn is a training-time attention only, so the saved model uses ordinary attention.

The merge checks itself: on a fixed sample the merged model, and the saved directory reloaded with plain
`AutoModelForCausalLM.from_pretrained`, must give the unmerged adapter model's logits within a stated tolerance
(the adapter on the same 16-bit base: the NF4 base it trained on gives other logits by its quantization error).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from longqlora.data.markers import without_generation_markers
from longqlora.hardware import DTYPES
from longqlora.record import REPORT_FILE

logger = logging.getLogger(__name__)

# Relative tolerance: max |merged - adapter logits| / max |adapter logits| on the check sample, both models in the
# same dtype on the same base. Measured with 256 tokens on random Llamas (hidden 1024 x 4 and x 32 layers, 4096 x 2;
# LoRA r=64 on q/k/v/o, trained embedding and norms; logits up to 25-50) and on the tiny trained adapter of
# tests/test_merge.py: float32 1e-6..2e-6 (summation order only), float16 1.8e-3..3.0e-3, bfloat16 1.3e-2..2.5e-2
# (8-bit mantissa; grows with depth). The 16-bit differences are not merge errors: the merged W + BA is rounded
# once more to 16 bits while PEFT runs the unmerged LoRA branch in float32. Dropping the adapter moves the logits by
# far more (0.44 relative for the tiny adapter after 4 steps, 0.8+ on the random ones); the trained embedding and
# norm copies are also compared exactly (fold_adapter). Defaults: float32 1e-4, float16 2e-2, bfloat16 5e-2 (2x the
# deepest measurement, as 40-80-layer models accumulate more rounding).
DEFAULT_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}
SAMPLE_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
    "in want of a wife. The pass key is 71432. Remember it. Call me Ishmael. Some years ago, never mind "
    "how long precisely, having little or no money in my purse, I thought I would sail about a little. "
)


@dataclass
class MergeConfig:
    """`python -m longqlora merge`: fold an adapter (LoRA + trained embedding and norms) into a plain model."""

    adapter: str = field(metadata={"help": "Adapter directory written by a recipe (a PEFT directory)."})
    output: str = field(metadata={"help": "Directory for the merged model (safetensors, tokenizer, config)."})
    base: str | None = field(
        default=None,
        metadata={
            "help": "Base model directory or hub id (from the local Hugging Face cache); default: the "
            "base recorded in the adapter's adapter_config.json."
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Dtype of the merged weights: auto (the base's own, as its config.json names it; float16 when it "
            "names none), float16, bfloat16 or float32 (never 4-bit: merging into NF4 changes outputs)."
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty --output directory."})
    tolerance: float | None = field(
        default=None,
        metadata={
            "help": "Largest allowed max|merged - adapter| / "
            "max|adapter logits| on the check sample; "
            "default 1e-4 float32, 2e-2 float16, 5e-2 "
            "bfloat16."
        },
    )
    sample_tokens: int = field(default=64, metadata={"help": "Length of the fixed token sample the check runs on."})

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:  # the one dtype table (hardware.DTYPES)
            raise ValueError(f"--dtype {self.dtype!r}: must be auto or one of {', '.join(DTYPES)}")
        if self.tolerance is not None and not self.tolerance > 0:
            raise ValueError(f"--tolerance {self.tolerance}: must be a positive number, e.g. 1e-4")
        if self.sample_tokens < 1:
            raise ValueError(f"--sample_tokens {self.sample_tokens}: must be at least 1, e.g. 64")

    @property
    def resolved_tolerance(self) -> float:
        return self.tolerance if self.tolerance is not None else DEFAULT_TOLERANCE[self.dtype]


# ------------------------------------------------------------------------------------------------------ checks
def _path(name) -> Path:
    return Path(os.path.expanduser(str(name))).resolve()


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_merge(cfg: MergeConfig) -> dict:
    """Everything that can be refused before weights load; returns the resolved paths and extension record."""
    from longqlora.evaluation.loading import adapter_base, check_adapter_fits, read_extension
    from longqlora.model_files import check_safetensors, local_model
    from longqlora.output import check_output_path

    extension = read_extension(cfg.adapter)  # raises "--adapter X: not a PEFT adapter directory"
    adapter = _path(cfg.adapter)
    recorded = adapter_base(adapter)
    if not cfg.base and not recorded:
        raise ValueError(f"--adapter {cfg.adapter}: records no base model; pass --base")
    base_name = cfg.base or recorded
    flag = "--base" if cfg.base else f"--adapter {cfg.adapter}: its recorded base"
    base = _path(local_model(base_name, flag))  # a hub id (what the recipes record): its cached snapshot
    if not (base / "config.json").is_file():
        raise ValueError(
            f"{flag} {base_name}: no model directory (no config.json) there; pass --base DIR, the "
            "local base model (or hub id) the adapter was trained on"
        )
    check_safetensors(base_name, flag, str(base))  # no weights, or damaged ones: named by the flag the user gave
    out = _path(cfg.output)
    for name, path in (("base", base), ("adapter", adapter)):
        if _within(out, path) or _within(path, out):
            raise ValueError(
                f"--output {cfg.output}: is, contains or lies inside the {name} directory {path}; "
                "choose a separate directory"
            )
    check_output_path(out, "--output")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise ValueError(f"--output {cfg.output}: is not empty; pass --overwrite to replace it, or a new directory")
    target = extension.target_context if extension else None
    if target and cfg.sample_tokens > int(target):
        raise ValueError(
            f"--sample_tokens {cfg.sample_tokens}: longer than the adapter's context {target}; pass at most {target}"
        )
    check_adapter_fits(adapter, base, flag="--base", name=base_name, recorded=recorded or base_name)
    return {"adapter": adapter, "base": base, "output": out, "extension": extension, "recorded_base": recorded}


# ------------------------------------------------------------------------------------------------------- merge
def sample_ids(tokenizer, n: int):
    """The fixed check sample: `n` token ids of SAMPLE_TEXT (repeated as needed), shape (1, n)."""
    import torch

    ids = tokenizer(SAMPLE_TEXT, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError("--adapter: its tokenizer turns the check sample into no tokens")
    ids = (ids * (n // len(ids) + 1))[:n]
    return torch.tensor([ids], dtype=torch.long)


def logits_of(model, ids):
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()


def fold_adapter(peft_model):
    """merge_and_unload, then verify that every trained copy (embedding, norms) is what the merged model holds.

    Returns (merged model, names of the replaced modules, number of LoRA layers merged).
    """
    import torch
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    active = peft_model.active_adapter
    inner = peft_model.get_base_model()
    trained = {
        name: m.modules_to_save[active] for name, m in inner.named_modules() if isinstance(m, ModulesToSaveWrapper)
    }
    lora_layers = sum(isinstance(m, LoraLayer) for m in inner.modules())
    merged = peft_model.merge_and_unload(progressbar=True)
    for name, copy in trained.items():
        module = merged.get_submodule(name)
        for pname, param in copy.named_parameters():
            if not torch.equal(module.get_parameter(pname), param):
                raise RuntimeError(f"merge: {name}.{pname} of the merged model is not the adapter's trained copy")
    return merged, sorted(trained), lora_layers


def plain_config(model) -> None:
    """Leave only what a plain transformers model needs: ordinary attention, caching on, no quantization."""
    config = model.config
    for key in [k for k in vars(config) if "longqlora" in k.lower()]:
        delattr(config, key)
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if key in vars(config):
            delattr(config, key)
    params = dict(getattr(config, "rope_parameters", None) or {})
    original = params.get("original_max_position_embeddings")
    if (
        params.get("rope_type") == "linear"
        and original
        and original * params.get("factor", 1) == config.max_position_embeddings
    ):
        # Plain transformers warns about this key for linear scaling; max_position_embeddings / factor recovers it.
        params.pop("original_max_position_embeddings")
        config.rope_parameters = params
    if config._attn_implementation != "sdpa":
        model.set_attn_implementation("sdpa")
    config.use_cache = True


def _check_saved_config(folder: Path, positions: int) -> dict:
    """The saved config.json is plain (no quantization, nothing of ours) and has the merged model's positions (the
    target, or more where it lay within the base's own RoPE scaling, as Llama-3.1's 131072 holds 32768)."""
    saved = json.loads((folder / "config.json").read_text())
    text = json.dumps(saved)
    if "quantization_config" in saved or "longqlora" in text or saved.get("max_position_embeddings") != positions:
        raise RuntimeError(f"merge: the saved config.json is not a plain extended config: {text[:300]}")
    return {"rope_parameters": saved.get("rope_parameters"), "max_position_embeddings": positions}


def stop_at_turn_end(model, tokenizer) -> None:
    """Add the token the chat template ends a reply with to the generation_config's stop tokens, so that plain
    transformers, vLLM or llama.cpp stop where the fine-tuned model does (a base's config lists its EOS only)."""
    from longqlora.data.formats import turn_end_id

    end, config = turn_end_id(tokenizer), getattr(model, "generation_config", None)
    if end is None or config is None:
        return
    stops = [config.eos_token_id] if isinstance(config.eos_token_id, int) else list(config.eos_token_id or [])
    if end not in stops:
        config.eos_token_id = stops + [end] if stops else end


def _saved_dtype(base: Path) -> str:
    """The dtype the base's config.json names (`dtype`, or `torch_dtype` before transformers 5), else float16."""
    try:
        saved = json.loads((base / "config.json").read_text())
    except (OSError, ValueError):
        return "float16"
    named = str(saved.get("dtype") or saved.get("torch_dtype") or "").removeprefix("torch.")
    return named if named in DTYPES else "float16"


def merge(cfg: MergeConfig) -> dict:
    """Merge `cfg.adapter` into its base and save a plain model to `cfg.output`; returns the report (also written
    there as merge_report.json). Raises ValueError when the merged logits miss the tolerance."""
    import torch
    from transformers import AutoModelForCausalLM

    from longqlora.evaluation.loading import load_for_inference
    from longqlora.output import atomic_directory, write_json_atomic

    start = time.perf_counter()
    paths = check_merge(cfg)
    if cfg.dtype == "auto":  # a bfloat16 base (Llama 3, Qwen) merged into float16 may overflow; a float32 one loses
        cfg = dataclasses.replace(cfg, dtype=_saved_dtype(paths["base"]))
    out, tolerance = paths["output"], cfg.resolved_tolerance
    model, tokenizer, info = load_for_inference(
        str(paths["base"]),
        adapter=str(paths["adapter"]),
        load_in_4bit=False,
        compute_dtype=cfg.dtype,
        adapter_checked=True,  # by check_merge
    )
    device = next(model.parameters()).device
    ids = sample_ids(tokenizer, cfg.sample_tokens)
    reference = logits_of(model, ids)
    merged, replaced, lora_layers = fold_adapter(model)
    merged_diff = float((reference - logits_of(merged, ids)).abs().max())
    plain_config(merged)
    stop_at_turn_end(merged, tokenizer)

    with atomic_directory(out) as tmp:  # an existing output (--overwrite) is replaced only by a checked model
        merged.save_pretrained(tmp)  # transformers 5 writes safetensors only
        if isinstance(getattr(tokenizer, "chat_template", None), str):  # what the merged model's users render
            tokenizer.chat_template = without_generation_markers(tokenizer.chat_template)
        tokenizer.save_pretrained(tmp)
        positions = merged.config.max_position_embeddings
        del model, merged
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if positions < info.target_context:
            raise RuntimeError(f"merge: the merged model holds {positions} positions, fewer than the target")
        # the target, unless it lay within the base's own RoPE scaling (which the merged model keeps)
        saved_config = _check_saved_config(tmp, info.target_context if info.rope_changed else positions)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=DTYPES[cfg.dtype], device_map={"": device}).eval()
        reloaded_logits = logits_of(reloaded, ids)
        del reloaded
        reloaded_diff = float((reference - reloaded_logits).abs().max())
        scale = float(reference.abs().max()) or 1.0
        worst = max(merged_diff, reloaded_diff)
        report = {
            "adapter": str(paths["adapter"]),
            "base": str(paths["base"]),
            "output": str(out),
            "dtype": cfg.dtype,
            "original_context": info.original_context,
            "target_context": info.target_context,
            "pi_factor": info.pi_factor,
            "scaling": info.scaling,
            **saved_config,
            "modules_replaced": replaced,
            "lora_layers_merged": lora_layers,
            "chat_template": bool(getattr(tokenizer, "chat_template", None)),
            "check": {
                "sample_tokens": cfg.sample_tokens,
                "metric": "max |merged - adapter logits| / max |adapter logits|, same dtype and base",
                "max_abs_logit": scale,
                "merged_max_abs_diff": merged_diff,
                "reloaded_max_abs_diff": reloaded_diff,
                "relative_diff": worst / scale,
                "tolerance": tolerance,
                "top1_agreement": float((reloaded_logits.argmax(-1) == reference.argmax(-1)).float().mean()),
                "passed": worst / scale <= tolerance,
            },
            "seconds": round(time.perf_counter() - start, 2),
        }
        if not report["check"]["passed"]:
            raise ValueError(
                f"--tolerance {tolerance:g}: the merged model's logits differ from the adapter's by "
                f"{worst:.3g} ({worst / scale:.3g} relative); nothing written to {out}. Try --dtype "
                "float32, or a larger --tolerance if this difference is acceptable"
            )
        write_json_atomic(tmp / REPORT_FILE, report)
    logger.info(
        "merged %s into %s: %s, max |diff| %.3g (%.3g relative, tolerance %g)",
        paths["adapter"],
        out,
        cfg.dtype,
        report["check"]["reloaded_max_abs_diff"],
        report["check"]["relative_diff"],
        tolerance,
    )
    return report


def describe(report: dict) -> str:
    """The lines `python -m longqlora merge` prints."""
    check, replaced = report["check"], report["modules_replaced"]
    return (
        f"merged {report['adapter']} with its base {report['base']} ({report['dtype']}, context "
        f"{report['original_context']} -> {report['target_context']}, {report['scaling']}): "
        f"{report['lora_layers_merged']} LoRA layers, {len(replaced)} trained modules ({', '.join(replaced[:3])}"
        f"{', ...' if len(replaced) > 3 else ''})\nwritten to {report['output']}\ncheck on "
        f"{check['sample_tokens']} tokens, saved model reloaded: max |logit diff| "
        f"{check['reloaded_max_abs_diff']:.3g} = {check['relative_diff']:.3g} of max |logit|, tolerance "
        f"{check['tolerance']:g}: "
        f"{'pass' if check['passed'] else 'FAIL'}"
    )
