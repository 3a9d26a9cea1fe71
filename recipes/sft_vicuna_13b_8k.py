"""Vicuna-13B v1.5: 4k -> 8k by supervised fine-tuning on long instructions (LongQLoRA's SFT setting, one V100).

NF4 base, YaRN x2, S2-Attn, LoRA r=64 (alpha 16) on q/k/v/o plus trainable embeddings and norms; Vicuna v1.1
conversation template as the chat template (a tokenizer's own where it has one), multi-turn, loss on assistant
tokens only; one epoch of batch 1 x accumulation 16, lr 1e-4 constant after 20 warm-up steps, paged AdamW, fp16.

    python data_prep/prepare_instructions.py --dataset LongAlpaca-12k.json --tokenizer lmsys/vicuna-13b-v1.5 \
        --max_length 8192 --output_dir data/longalpaca-vicuna   # once: checked, converted conversations
    python recipes/sft_vicuna_13b_8k.py --dataset data/longalpaca-vicuna --output_dir out/vicuna-13b-8k
    python recipes/sft_vicuna_13b_8k.py --dry_run
    python recipes/sft_vicuna_13b_8k.py --tiny --output_dir /tmp/tiny-vicuna   # the same recipe on CPU

Every default below is a flag, or set them in `--config my.yaml`.
"""

from dataclasses import dataclass

from longqlora.cli import run_recipe
from longqlora.data.instructions import InstructionDataConfig
from longqlora.model import ModelConfig
from longqlora.training.config import TrainingConfig


@dataclass
class Model(ModelConfig):
    model_name_or_path: str = "lmsys/vicuna-13b-v1.5"
    target_context: int = 8192
    group_ratio: float = 0.25
    compute_dtype: str = "float16"  # a V100 has no bf16
    attn_backend: str = "auto"
    lora_r: int = 64
    lora_alpha: int = 16
    lora_target: str = "attention"
    trainable_params: str = "embed,norm"


@dataclass
class Data(InstructionDataConfig):
    dataset: str = "data/longalpaca-vicuna"
    overlong: str = "truncate"  # counted and reported either way


@dataclass
class Training(TrainingConfig):
    output_dir: str = "out/vicuna-13b-8k"
    num_train_epochs: float = 1
    max_steps: int = -1
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 16
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "constant_with_warmup"
    warmup_steps: float = 20  # a number of steps, or below 1 a ratio of the run
    max_grad_norm: float = 0.3
    optim: str = "paged_adamw_32bit"
    save_steps: float = 100


if __name__ == "__main__":
    run_recipe(Model, Data, Training)
