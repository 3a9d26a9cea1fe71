"""More than one process: what `accelerate launch` or `torchrun` started, which combinations this toolkit trains
(the others are refused in one line before any weights load), the rows a context-parallel group shares, and the
adapter gathered and written once.

Sharding and data parallelism are accelerate's (FSDP2, DeepSpeed ZeRO-3, DDP; configs/accelerate/), reached through
the Trainer; what is this toolkit's own is S2-Attn context parallelism (attention/context_parallel.py): every rank
of a group gets the same rows (`share_rows`), keeps its contiguous chunk of each (`ContextParallelCollator`), and
borrows half a group of keys/values from its neighbour in every attention layer.
"""

from __future__ import annotations

import logging

import torch

from longqlora.hardware import Launch, launch
from longqlora.training.config import refuse_trainer_engine

logger = logging.getLogger(__name__)


def check_launch(model_cfg, training, run: Launch | None = None) -> Launch:
    """Refuse, in one line and before any weights load, a launch this toolkit does not train. Returns it."""
    run = run or launch()
    cp = model_cfg.context_parallel
    if run.engine == "fsdp1":
        raise ValueError(
            "accelerate launch with fsdp_version 1: QLoRA with trained embeddings and norms runs on FSDP2; use "
            "configs/accelerate/fsdp2_qlora.yaml (fsdp_version: 2)"
        )
    if run.engine == "deepspeed" and run.zero_stage != 3:
        raise ValueError(
            f"accelerate launch with DeepSpeed ZeRO stage {run.zero_stage}: this toolkit supports stage 3 "
            "(configs/accelerate/deepspeed_zero3.yaml), or FSDP2, or DDP"
        )
    refuse_trainer_engine(training)
    if run.shards_weights and not run.whole_state_dict:
        setting = (
            "fsdp_state_dict_type: FULL_STATE_DICT" if run.engine != "deepspeed" else "zero3_save_16bit_model: true"
        )
        raise ValueError(
            f"accelerate launch with {run.engine}: the adapter is gathered whole to be written; set {setting} in "
            "the launch config (as configs/accelerate/ has it)"
        )
    if cp > 1:
        if not training.average_tokens_across_devices:
            raise ValueError(
                f"--average_tokens_across_devices false: --context_parallel {cp} divides the loss by the label "
                "tokens of every rank; keep it true"
            )
        if training.dataloader_num_workers:
            raise ValueError(
                f"--dataloader_num_workers {training.dataloader_num_workers}: --context_parallel {cp} checks that "
                "the ranks cut the same rows in the collator, in the main process; use 0"
            )
        if run.world_size % cp:
            raise ValueError(
                f"--context_parallel {cp}: needs {cp} processes (or a multiple), launched with `torchrun "
                f"--nproc_per_node {cp} <recipe>`; this launch has {run.world_size}"
            )
        if not training.chunked_loss:
            raise ValueError(
                f"--chunked_loss false: the loss of a chunk needs the next rank's first label; keep TRL's chunked "
                f"loss with --context_parallel {cp}"
            )
    if run.world_size > 1 and run.main:
        logger.info(
            "%d processes (%s%s)", run.world_size, run.engine, f", rows split over groups of {cp}" if cp > 1 else ""
        )
    return run


def check_precision(run: Launch, compute_dtype: str, load_in_4bit: bool) -> None:
    """NF4 bytes stored in the compute dtype (to be sharded) must not be cast by the engine's mixed precision."""
    wanted = {"bfloat16": "bf16", "float16": "fp16"}.get(compute_dtype, "no")
    if load_in_4bit and run.shards_weights and run.mixed_precision not in ("no", wanted):
        # the V100 recipes (float16) under the shipped configs (bf16): either side can change
        other = {"bf16": "bfloat16", "fp16": "float16"}.get(run.mixed_precision)
        raise ValueError(
            f"accelerate launch --mixed_precision {run.mixed_precision} with --compute_dtype {compute_dtype}: "
            f"{run.engine} would cast the NF4 weights stored as {compute_dtype}; add --mixed_precision {wanted} to "
            "`accelerate launch`, before the recipe"
            + (f", or pass --compute_dtype {other} to the recipe" if other else "")
        )


# ------------------------------------------------------------------------------------------ ZeRO-3 with NF4
class _Released4bit(torch.autograd.Function):
    """bitsandbytes' Linear4bit forward on x, keeping nothing of the weight for the backward, which reads the layer's
    weight again (gathered anew by DeepSpeed's pre-backward hook) and returns x's gradient as bitsandbytes'
    MatMul4Bit computes it: grad @ dequantize(codes). MatMul4Bit keeps the gathered codes on its node instead
    (`ctx.tensors`), where DeepSpeed's release (a new `param.data`) does not reach them."""

    @staticmethod
    def forward(ctx, x, layer, plain):
        ctx.layer, ctx.dtype = layer, x.dtype
        return plain(x)  # grad mode is off in here: bitsandbytes' no-grad path, nothing saved

    @staticmethod
    def backward(ctx, grad):
        import bitsandbytes.functional as bnb_functional
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        layer = ctx.layer
        fix_4bit_weight_quant_state_from_module(layer)
        weight = layer.weight
        compute = layer.compute_dtype or grad.dtype
        codes = bnb_functional.dequantize_4bit(weight.view(-1, 1), weight.quant_state).to(compute)  # (out, in)
        return torch.matmul(grad.to(compute), codes).to(ctx.dtype), None, None


def _released_forward(layer, plain, x):
    if torch.is_grad_enabled() and x.requires_grad and (layer.bias is None or not layer.bias.requires_grad):
        return _Released4bit.apply(x, layer, plain)
    return plain(x)  # no backward to feed (inference, or a frozen input), or a trained bias: bitsandbytes' own


def release_nf4_codes(model) -> int:
    """Under DeepSpeed ZeRO-3, let every NF4 layer's gathered codes go when DeepSpeed releases the layer: each
    bitsandbytes Linear4bit of `model` runs its forward through `_Released4bit` (a per-instance forward; the class is
    untouched). FSDP2 frees its gathered buffers by resizing their storage and needs none of it. Returns how many."""
    import functools

    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and "forward" not in module.__dict__:
            module.forward = functools.partial(_released_forward, module, module.forward)
            count += 1
    return count


# ------------------------------------------------------------------------------------------- context parallel
def share_rows(dataset, per_device_batch: int, cp: int, seed: int | None, epochs: int = 1):
    """`dataset` reordered so that the ranks of one context-parallel group read the same rows, for `epochs` epochs.

    accelerate hands batch j*W + r of a sequentially read dataset to rank r of W; here that batch holds the rows of
    the group of r (r // cp) for its j-th step (the Trainer must then read sequentially:
    `train_sampling_strategy="sequential"`). Epoch e reads the rows in a shuffle drawn from `seed` + e, as a
    shuffling sampler would; with seed None every epoch reads them in the dataset's order.
    """
    import numpy as np

    world, replicas, steps = _shared_steps(len(dataset), per_device_batch, cp)
    if steps == 0:
        raise ValueError(
            f"--context_parallel {cp}: {len(dataset)} packed rows are fewer than one step of {replicas} "
            f"replica(s) x --per_device_train_batch_size {per_device_batch}; give more data"
        )
    left = len(dataset) - steps * replicas * per_device_batch
    if left:  # a part step would leave some ranks of a group without rows: the collective exchange would hang
        logger.warning(
            "--context_parallel %d: %d of %d packed rows do not fill a step of %d replica(s) x %d and are not used "
            "in an epoch",
            cp,
            left,
            len(dataset),
            replicas,
            per_device_batch,
        )
    indices, n = [], len(dataset)
    for epoch in range(epochs):
        order = np.arange(n) if seed is None else np.random.default_rng(seed + epoch).permutation(n)
        for step in range(steps):
            for rank in range(world):
                first = (step * replicas + rank // cp) * per_device_batch
                indices.extend(order[first : first + per_device_batch].tolist())
    return dataset.select(indices)


def _shared_steps(rows: int, per_device_batch: int, cp: int) -> tuple[int, int, int]:
    """(processes, replicas of a context-parallel group, steps of whole batches in an epoch of `rows`)."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else cp
    replicas = world // cp
    return world, replicas, rows // (replicas * per_device_batch)


def epochs_to_share(args, steps_per_epoch: int) -> int:
    """How many epochs of rows a run reads (`share_rows` lays them out in advance, each in its own shuffle):
    --max_steps optimizer steps of --gradient_accumulation_steps batches, else --num_train_epochs rounded up."""
    import math

    if args.max_steps > 0:
        return max(1, math.ceil(args.max_steps * args.gradient_accumulation_steps / steps_per_epoch))
    return max(1, math.ceil(args.num_train_epochs))


class ContextParallelCollator:
    """Wraps the Trainer's collator: the whole batch is built as usual, checked to be the same on every rank of
    the group, padded to a multiple of the training length, and this rank's contiguous chunk of every row kept.
    The labels are shifted before cutting (`shift_labels`: a chunk's last token predicts the next rank's first),
    and position ids (0..N-1 where the collator gives none) travel with each chunk for RoPE and S2's segments."""

    def __init__(self, collate, group, train_length: int, pad_token_id: int):
        self.collate, self.group = collate, group
        self.train_length, self.pad_token_id = train_length, pad_token_id

    def __call__(self, examples):
        batch = self.collate(examples)
        ids = batch["input_ids"]
        b, n = ids.shape
        self._check_same_rows(ids)
        if "position_ids" not in batch:
            batch["position_ids"] = torch.arange(n).expand(b, n).clone()
        for key in [k for k in batch if k.startswith(("cu_seq_lens", "max_length", "seq_idx"))]:
            del batch[key]  # whole-row packing metadata: wrong for a chunk (S2 reads the position ids)
        labels = batch.get("labels", ids)
        batch["shift_labels"] = torch.cat([labels[:, 1:], labels.new_full((b, 1), -100)], dim=1)
        batch["labels"] = batch["shift_labels"]
        pad = -n % self.train_length
        if pad:  # the padding is a document of its own, never attended by real tokens and never scored
            fill = {"input_ids": self.pad_token_id, "labels": -100, "shift_labels": -100, "attention_mask": 0}
            tail = torch.arange(pad).expand(b, pad)
            for key, value in batch.items():
                if torch.is_tensor(value) and value.shape[:2] == (b, n):
                    extra = tail if key == "position_ids" else value.new_full((b, pad), fill.get(key, 0))
                    batch[key] = torch.cat([value, extra.to(value.dtype)], dim=1)
            n += pad
        chunk = n // self.group.size
        part = slice(self.group.index * chunk, (self.group.index + 1) * chunk)
        return {
            key: value[:, part].contiguous() if torch.is_tensor(value) and value.shape[:2] == (b, n) else value
            for key, value in batch.items()
        }

    def _check_same_rows(self, ids: torch.Tensor) -> None:
        """Every rank of the group must cut the same rows; a cheap fingerprint says so, or the run stops."""
        import torch.distributed as dist

        weights = torch.arange(1, ids.numel() + 1, dtype=torch.float64)
        mine = torch.stack(
            [torch.tensor(float(ids.numel()), dtype=torch.float64), (ids.double().flatten() * weights).sum()]
        )
        seen = [torch.zeros_like(mine) for _ in range(self.group.size)]
        dist.all_gather(seen, mine, group=self.group.cpu_group)
        if any(not torch.equal(s, mine) for s in seen):
            raise RuntimeError(
                "context parallel: the ranks of one group received different rows; the training data must be "
                "read sequentially (distributed.share_rows)"
            )


def enable_context_parallel(trainer, group, train_length: int, pad_token_id: int, seed: int) -> None:
    """Give `trainer` the shared rows and the chunking collator of context-parallel `group` (after TRL has
    tokenized and packed the data: the packed rows are what the group shares). The rows are shuffled with `seed`,
    each epoch anew, unless --train_sampling_strategy is sequential. The Trainer reads them sequentially, so the
    epochs a run reads are laid out in advance; with --num_train_epochs its epochs become fractions of that layout
    (the steps are the same; its logged epoch counts the layout)."""
    args = trainer.args
    shuffle = args.train_sampling_strategy != "sequential"
    args.train_sampling_strategy = "sequential"
    steps = _shared_steps(len(trainer.train_dataset), args.per_device_train_batch_size, group.size)[2]
    epochs = epochs_to_share(args, steps) if shuffle and steps else 1
    trainer.train_dataset = share_rows(
        trainer.train_dataset, args.per_device_train_batch_size, group.size, seed if shuffle else None, epochs
    )
    if args.max_steps <= 0:
        args.num_train_epochs /= epochs
    trainer.data_collator = ContextParallelCollator(trainer.data_collator, group, train_length, pad_token_id)


# ---------------------------------------------------------------------------------------------------- output
def gathered_state_dict(trainer):
    """The whole model's state dict on the main process when FSDP or DeepSpeed hold it in pieces (a collective:
    every process calls it, as transformers' Trainer.save_model does), else None (the model saves its own: also when
    the run resumed at its last step and the engine never took the model)."""
    engine = getattr(trainer, "deepspeed", None)
    if getattr(trainer, "is_deepspeed_enabled", False) and engine is not None:
        if engine.zero_optimization_stage() == 3:  # the trained weights only, not the whole frozen base, on rank 0
            return engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
        return trainer.accelerator.get_state_dict(engine)
    if getattr(trainer, "is_fsdp_enabled", False):
        return trainer.accelerator.get_state_dict(trainer.model)
    return None


def wait_for_file(path, timeout: float = 600.0) -> None:
    """Wait until the main process has written `path` (before torch.distributed can be used for a barrier)."""
    import time
    from pathlib import Path

    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"waited {timeout:.0f} s for the main process to write {path}")
        time.sleep(0.1)


def from_main(value):
    """`value` as the main process has it, on every process (one broadcast; as it is with one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def end_processes() -> None:
    """Destroy the launch's process group once the run is over, every process at the same point: left to the
    interpreter's exit, the gloo group's threads were torn down in any order, and a process could abort
    ("terminate called without an active exception") after its work was done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
