"""Loading a model to use it after training: evaluation, passkey retrieval and chat share this one loader.

A model is a plain or merged directory, or a base plus a PEFT adapter written by the recipes. The adapter's
`longqlora_extension.json` says which context it was trained for, so the base gets the same position interpolation;
attention is the model's own full attention (S2-Attn is only for training, LongLoRA §3.2).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

EXTENSION_FILE = "longqlora_extension.json"


def read_extension(adapter) -> dict:
    """The extension record of an adapter directory ({} when it has none), after checking it is a PEFT adapter."""
    path = Path(os.path.expanduser(str(adapter)))
    if not (path / "adapter_config.json").is_file():
        raise ValueError(f"--adapter {adapter}: not a PEFT adapter directory (no adapter_config.json)")
    record = path / EXTENSION_FILE
    return json.loads(record.read_text()) if record.is_file() else {}


def adapter_base(adapter) -> str:
    """The base model an adapter was trained on, as recorded by PEFT."""
    path = Path(os.path.expanduser(str(adapter)))
    return json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""


def load_for_inference(model_path: str | None, *, adapter: str | None = None, load_in_4bit: bool = False,
                       compute_dtype: str = "auto", target_context: int | None = None,
                       trust_remote_code: bool = False):
    """Returns (model in eval mode, tokenizer, info).

    `model_path` defaults to the adapter's recorded base. Position interpolation: `target_context` when given
    (e.g. PI without training), else the adapter's trained context, else the model's config as saved.
    """
    from transformers import AutoConfig

    from longqlora.model import ModelConfig, load_base

    extension = read_extension(adapter) if adapter else {}
    if not model_path:
        if not adapter:
            raise ValueError("--model: pass a model directory (or an --adapter whose base is recorded)")
        model_path = adapter_base(adapter)
    expanded = os.path.expanduser(model_path)
    if not os.path.isdir(expanded):
        raise ValueError(f"--model {model_path}: no such directory; pass a local model directory")
    if target_context is None:
        target_context = extension.get("target_context") or AutoConfig.from_pretrained(
            expanded, trust_remote_code=trust_remote_code).max_position_embeddings
    cfg = ModelConfig(model_name_or_path=expanded, target_context=int(target_context), load_in_4bit=load_in_4bit,
                      compute_dtype=compute_dtype, s2_attention=False)
    model, tokenizer, info = load_base(cfg, trust_remote_code=trust_remote_code)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, os.path.expanduser(adapter))
        if (Path(os.path.expanduser(adapter)) / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(adapter))
            tokenizer.pad_token = tokenizer.pad_token or tokenizer.unk_token or tokenizer.eos_token
    info.update(adapter=adapter, extension=extension)
    logger.info("loaded %s%s for inference: context %d (PI x%.4g), %s", model_path,
                f" + adapter {adapter}" if adapter else "", info["target_context"], info["pi_factor"],
                "NF4" if load_in_4bit else info["compute_dtype"])
    return model.eval(), tokenizer, info
