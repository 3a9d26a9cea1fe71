"""Llama-2 13B: 4k -> 8k context by continued pre-training on long text (LongQLoRA's schedule, one 32 GB V100).

NF4 4-bit base, YaRN x2, S2-Attn (mean group 2048), LoRA r=8 on q/k/v/o plus trainable embeddings and
norms; 1000 steps of batch 1 x accumulation 16, constant LR after 20 warm-up steps, max grad norm 0.3, paged
AdamW (one 32 GB V100); LongLoRA's learning rate 2e-5 and rank 8 (LongQLoRA's own runs: `--learning_rate 2e-4
--lora_r 64`).

    python data_prep/prepare_text.py --dataset pg19/train --tokenizer meta-llama/Llama-2-13b-hf \
        --min_length 8192 --output_dir data/pg19-llama2-13b       # once: tokenized long documents
    python recipes/extend_13b_8k.py --dataset data/pg19-llama2-13b --output_dir out/llama2-13b-8k
    python recipes/extend_13b_8k.py --dry_run                  # the resolved configuration, no weights loaded
    python recipes/extend_13b_8k.py --output_dir out/llama2-13b-8k-pose --pose_window 4096
        # PoSE (arXiv 2309.10400): 4096-token rows whose position ids skip to span 8192
    python recipes/extend_13b_8k.py --tiny --output_dir /tmp/tiny-13b_8k   # the same recipe on CPU, tiny model

Every default below is a flag (`--max_steps 200`), or set them in `--config my.yaml`.
"""

from dataclasses import dataclass

from longqlora.cli import run_recipe
from longqlora.data.text import TextDataConfig
from longqlora.model import ModelConfig
from longqlora.training.config import TrainingConfig


@dataclass
class Model(ModelConfig):
    model_name_or_path: str = "meta-llama/Llama-2-13b-hf"
    target_context: int = 8192
    group_ratio: float = 0.25
    compute_dtype: str = "float16"  # a V100 has no bf16
    attn_backend: str = "auto"  # xformers when installed, else SDPA
    lora_r: int = 8
    lora_alpha: int = 16
    lora_target: str = "attention"
    trainable_params: str = "embed,norm"


@dataclass
class Data(TextDataConfig):
    dataset: str = "data/pg19-llama2-13b"
    pack: str = "documents"


@dataclass
class Training(TrainingConfig):
    output_dir: str = "out/llama2-13b-8k"
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
