"""Llama-2 7B: 4k -> 32k context on one A100/H100 (bf16, flash-attn varlen S2-Attn when installed).

NF4 4-bit base, YaRN x8, S2-Attn (mean group 8192), LoRA r=8 on q/k/v/o, trainable embeddings and
norms; 1000 steps of batch 1 x accumulation 16, constant LR after 20 warm-up steps, max grad norm 0.3, paged
AdamW (one 80 GB A100 or H100).

    python data_prep/prepare_text.py --dataset pg19/train --tokenizer meta-llama/Llama-2-7b-hf \
        --min_length 32768 --output_dir data/pg19-llama2       # once: tokenized long documents
    python recipes/extend_7b_32k_a100.py --dataset data/pg19-llama2 --output_dir out/llama2-7b-32k
    python recipes/extend_7b_32k_a100.py --dry_run                  # the resolved configuration, no weights loaded
    python recipes/extend_7b_32k_a100.py --output_dir out/llama2-7b-32k-pose --pose_window 4096
        # PoSE (arXiv 2309.10400): 4096-token rows whose position ids skip to span 32768
    python recipes/extend_7b_32k_a100.py --tiny --output_dir /tmp/tiny-7b_32k_a100
        # the same recipe on CPU, tiny model

Every default below is a flag (`--max_steps 200`), or set them in `--config my.yaml`.
"""

from dataclasses import dataclass

from longqlora.cli import run_recipe
from longqlora.data.text import TextDataConfig
from longqlora.model import ModelConfig
from longqlora.training.config import TrainingConfig


@dataclass
class Model(ModelConfig):
    model_name_or_path: str = "meta-llama/Llama-2-7b-hf"
    target_context: int = 32768
    group_ratio: float = 0.25
    compute_dtype: str = "bfloat16"  # Ampere and newer
    attn_backend: str = "auto"  # flash-attn varlen when installed, else SDPA
    lora_r: int = 8
    lora_alpha: int = 16
    lora_target: str = "attention"
    trainable_params: str = "embed,norm"


@dataclass
class Data(TextDataConfig):
    dataset: str = "data/pg19-llama2"
    pack: str = "documents"


@dataclass
class Training(TrainingConfig):
    output_dir: str = "out/llama2-7b-32k"
    max_steps: int = 1000
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 16
    learning_rate: float = 2e-5
    lr_scheduler_type: str = "constant_with_warmup"
    warmup_steps: float = 20  # a number of steps, or below 1 a ratio of the run
    max_grad_norm: float = 0.3
    optim: str = "paged_adamw_32bit"
    save_steps: float = 100


if __name__ == "__main__":
    run_recipe(Model, Data, Training)
