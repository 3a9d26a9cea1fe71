"""--eval_dataset during training: when it is evaluated (--eval_strategy, --eval_steps), how it is read (its own
flags and split), how many packed rows are scored (--eval_max_rows), and evaluations that leave the training as it
would be without them."""

from __future__ import annotations

import dataclasses
import logging

import torch

from longqlora.data.sources import held_out_split
from longqlora.errors import flags_renamed
from longqlora.model import ModelConfig
from longqlora.training.config import TrainingConfig

logger = logging.getLogger(__name__)


def evaluation_settings(model_cfg: ModelConfig, data_cfg, training: TrainingConfig) -> dict:
    """The evaluation settings: with --eval_dataset, every --eval_steps (default --save_steps) unless
    --eval_strategy says otherwise; without one, an evaluation schedule is refused (the Trainer refused it after
    the weights had loaded)."""
    strategy = getattr(training.eval_strategy, "value", training.eval_strategy)  # None: not set
    held_out = getattr(data_cfg, "eval_dataset", None)
    if not held_out:
        if strategy not in (None, "no"):
            raise ValueError(
                f"--eval_strategy {strategy}: there is no evaluation set; pass --eval_dataset, or measure checkpoints "
                "with `python -m longqlora perplexity --adapter DIR/checkpoint-N`"
            )
        return {"eval_strategy": "no"}
    if strategy == "no":
        logger.info("--eval_strategy no: --eval_dataset %s is read and checked, never evaluated", held_out)
        return {"eval_strategy": "no"}
    if model_cfg.pose_window or model_cfg.context_parallel > 1:  # rows of another length / split across processes
        flag = "--pose_window" if model_cfg.pose_window else "--context_parallel"
        raise ValueError(f"--eval_dataset: not supported with {flag} yet; evaluate checkpoints with perplexity")
    if strategy is None:
        return {"eval_strategy": "steps", "eval_steps": training.eval_steps or training.save_steps}
    return {}


def held_out_flags():
    """The data layer names --dataset and --split: within this block they are --eval_dataset and --eval_split."""
    return flags_renamed({"--dataset": "--eval_dataset", "--split": "--eval_split"})


def held_out_config(data_cfg):
    """`data_cfg` for reading --eval_dataset: its path and split (never the training data's own split)."""
    split = held_out_split(data_cfg.dataset, data_cfg.split, data_cfg.eval_dataset, data_cfg.eval_split)
    return dataclasses.replace(data_cfg, dataset=data_cfg.eval_dataset, eval_dataset=None, split=split)


def evaluate_apart(trainer) -> None:
    """Evaluations leave the training as it would be without them, so that a run with --eval_dataset trains as one
    without, and a resumed one (its checkpoint written after an evaluation) as an uninterrupted one: they run on a
    copy of torch's random generators (each DataLoader iterator draws a seed), and bitsandbytes is kept from
    repacking NF4 weights for its CPU inference kernel (it does so for good at the first forward in eval mode on
    AVX512-BF16 CPUs, and every later training step then computes through that kernel)."""
    for module in trainer.model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    evaluate = trainer.evaluate

    def forked(*args, **kwargs):
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            return evaluate(*args, **kwargs)

    trainer.evaluate = forked


def score_first_rows(trainer, max_rows: int | None) -> int:
    """Keep the first --eval_max_rows rows of the trainer's evaluation set, as TRL packed them (a row of the training
    length: selecting before packing counted documents, and one book is one document); returns the rows scored."""
    if max_rows:
        trainer.eval_dataset = trainer.eval_dataset.select(range(min(len(trainer.eval_dataset), max_rows)))
    return len(trainer.eval_dataset)
