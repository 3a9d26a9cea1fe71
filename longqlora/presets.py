"""Built-in configs of the models the recipes and the memory planner name, so `--dry_run` and planning need no
download. Values are those of the models' published config.json files."""

from __future__ import annotations

_LLAMA2 = dict(
    model_type="llama",
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)

PRESETS = {
    "meta-llama/Llama-2-7b-hf": dict(
        _LLAMA2,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
    "meta-llama/Llama-2-13b-hf": dict(
        _LLAMA2,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
    ),
    "meta-llama/Llama-2-70b-hf": dict(
        _LLAMA2,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
    "lmsys/vicuna-13b-v1.5": dict(
        _LLAMA2,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
    ),
    "meta-llama/Llama-3.1-8B": dict(
        model_type="llama",
        vocab_size=128256,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "mistralai/Mistral-7B-v0.1": dict(
        model_type="mistral",
        vocab_size=32000,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=10000.0,
        sliding_window=4096,
        tie_word_embeddings=False,
    ),
}
ALIASES = {
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "vicuna-13b": "lmsys/vicuna-13b-v1.5",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
}


def preset_config(name: str):
    """A transformers config for a preset hub id or alias (e.g. "llama-2-7b"), or None if it is not one."""
    from transformers import AutoConfig

    values = PRESETS.get(ALIASES.get(name, name))
    if values is None:
        return None
    values = dict(values)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def preset_or_local_config(name: str):
    """A preset's built-in config (no download) or a local model directory's (`model.load_config`, whose one-line
    errors name --model); anything else is refused, never looked up on the hub."""
    import os

    from longqlora.model_files import load_config

    config = preset_config(name)
    if config is not None:
        return config
    if not os.path.isdir(os.path.expanduser(name)):
        raise ValueError(
            f"--model {name}: neither a preset ({', '.join(ALIASES)}) nor a local directory with a config.json"
        )
    return load_config(name, "--model")
