"""Memory planning for one process of a sharded launch: FSDP2 and DeepSpeed ZeRO-3 as accelerate launches them
(configs/accelerate/), the parts that replace the one-process plan's (training/plan.py) where the engine shards,
gathers or buckets. Measured on this CPU with 2 gloo processes at real widths: bench/fsdp_memory.py and
bench/zero3_memory.py (docs/distributed.md)."""

from __future__ import annotations

from longqlora.training.optimizer import FOREACH_TEMPORARIES, optimizer_name
from longqlora.training.plan import (
    CPU_STEP_COPIES,
    NF4_BYTES_PER_PARAM,
    PlanConfig,
    Shapes,
    _Bytes,
    step_temporary_bytes,
)


def sharded_parts(s: Shapes, cfg: PlanConfig, params: dict, alone: dict) -> tuple[dict, float]:
    """The parts of one process of `cfg.sharding` over `cfg.processes` that replace those of one process (`alone`,
    training/plan.py): resident parts sharded, the gathered parameters added to a layer's and the loss's working
    set, and ZeRO-3's gradient bucket; and what the optimizer step holds beyond the resident parts."""
    engine = fsdp2_bytes(s, cfg, params) if cfg.sharding == "fsdp2" else zero3_bytes(s, cfg, params)
    parts = {
        "weights": engine["weights"],
        "trainable_state": engine["trainable_state"],
        "layer_recompute": alone["layer_recompute"] + engine["gathered"],
        "loss": alone["loss"] + engine["gathered_at_loss"],
        "gradients_and_step": engine["gradients_and_step"],
    }
    if engine.get("bucket"):
        parts["zero3_bucket"] = engine["bucket"]
    return parts, engine["step"]


def _common(s: Shapes, cfg: PlanConfig, params: dict) -> dict:
    """What both engines share: the weights sharded but the NF4 scales (module attributes, not parameters, whole in
    every process); one decoder layer gathered in 16 bits."""
    b, n = _Bytes.of(cfg), cfg.processes
    linear = s.linear_shapes(all_linear=True)
    scales = s.layers * sum(i * o for i, o in linear) * (NF4_BYTES_PER_PARAM - 0.5) if cfg.load_in_4bit else 0
    lora = cfg.rank * sum(i + o for i, o in s.linear_shapes(cfg.lora_target == "all-linear"))
    return {
        "weights": (params["weights"] - scales) / n + scales,
        "layer": sum(i * o for i, o in linear) * (0.5 if cfg.load_in_4bit else b.c) + (lora + 2 * s.hidden) * b.c,
    }


def fsdp2_bytes(s: Shapes, cfg: PlanConfig, params: dict) -> dict:
    """FSDP2, wrapped as accelerate wraps it (every decoder layer a unit, the embedding one, the final norm with the
    LM head one that is not resharded after its forward; bf16 mixed precision): parameters, optimizer state and
    gradients sharded. Gathered while in use: a layer recomputed and the next one prefetched in the backward; at the
    loss the LM head whole (by its unit for the plain loss; TRL's fused head, which never calls the head, gathers it
    itself with `DTensor.full_tensor`) beside the last layer prefetched for the backward; at the backward's end the
    embedding with its 16-bit gradient before the reduce-scatter (docs/fsdp_memory_cpu.json). The optimizer step
    runs on the shards: the gradients' and its temporaries' share (training/plan.step_temporary_bytes)."""
    b, n, common = _Bytes.of(cfg), cfg.processes, _common(s, cfg, params)
    head = s.vocab * s.hidden * b.kept  # a tied head is the embedding's table: gathered at the loss all the same
    embedding = 0
    if "embed" in cfg.trainable:  # the frozen original and the trained copy gathered, and the copy's 16-bit gradient
        embedding = 3 * s.vocab * s.hidden * b.c + cfg.batch * cfg.context * s.hidden * 4
    temporaries = step_temporary_bytes(cfg, params) / n  # FSDP2 shards every trained tensor's first dimension
    return {
        "weights": common["weights"],
        "trainable_state": params["trainable_state"] / n,
        "gathered": 2 * common["layer"],
        "gathered_at_loss": head + common["layer"],
        "gradients_and_step": params["gradients"] / n + max(embedding, temporaries),
        "step": params["gradients"] / n + temporaries,
    }


def zero3_bytes(s: Shapes, cfg: PlanConfig, params: dict) -> dict:
    """DeepSpeed ZeRO-3 with configs/accelerate/deepspeed_zero3.json as the Trainer completes it. Each process keeps
    a partition of every parameter, and of the trained ones an fp32 master, a 16-bit copy, a 16-bit gradient and
    the optimizer state; trained tensors of at most 10 x hidden values (the persistence threshold: LoRA's A and B at
    small ranks) whole in 16 bits; a gradient bucket of hidden x hidden 16-bit values.

    Gathered from the loss through the backward: the LM head (TRL's fused loss gathers it and keeps it for its
    backward), the embedding when the whole model fits --zero3_live_values (DeepSpeed's stage3_max_live_parameters:
    from a run's second step on, what its prefetcher finds already gathered within that many values ahead in its
    recorded trace is not released), and the layers DeepSpeed keeps: the most recently used up to that many (under
    DeepSpeed's default of 1e9, which the shipped JSON leaves, layers 15-31 of Llama-2-7B's 32 in 16 bits, counted
    by bench/zero3_keep.py), NF4 layers as 16-bit ones (training/distributed.release_nf4_codes: bitsandbytes' own
    MatMul4Bit would keep every layer's gathered codes on its autograd node to the end of the step). Its optimizer
    step: an fp32 copy of the gradient partition and the optimizer's temporaries (bench/zero3_memory.py)."""
    b, n, common = _Bytes.of(cfg), cfg.processes, _common(s, cfg, params)
    trained = params["trainable_params"]
    persistent = sum(k * v for k, v in params["trained_tensors"] if v <= 10 * s.hidden)
    layer, table = common["layer"] / b.c, s.vocab * s.hidden  # values as DeepSpeed counts them (16-bit elements)
    live = cfg.zero3_live_values
    by_deepspeed = min(s.layers, max(0, int((live - table) // layer)))  # the last ones, beside the head
    embedding = table if 2 * table + s.layers * layer <= live else 0  # the head, every layer and the embedding fit
    kept = table + embedding + by_deepspeed * layer
    again = (2 - min(2, by_deepspeed)) * layer  # the layer recomputed and the next, gathered unless DeepSpeed kept them
    # the step: an fp32 copy of the gradient partition, and the optimizer's temporaries over the flat fp32 partition
    # (one tensor: CUDA's foreach copies it once, a CPU's single-tensor AdamW CPU_STEP_COPIES times)
    foreach = optimizer_name(cfg.optim) in FOREACH_TEMPORARIES
    step = 4 * trained / n * (1 + (CPU_STEP_COPIES if cfg.device == "cpu" else 1) * foreach)
    return {
        "weights": common["weights"],
        "trainable_state": (params["trainable_state"] + 2 * b.c * trained) / n + persistent * b.c,
        "bucket": s.hidden * s.hidden * b.c,
        "gathered": (kept + again) * b.c,
        "gathered_at_loss": kept * b.c,
        "gradients_and_step": step,
        "step": step,
    }
