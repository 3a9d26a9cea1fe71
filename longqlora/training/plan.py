"""Memory planning: predict the peak GPU memory of a LongQLoRA training step from a model's config alone.

The prediction is a sum of parts, each computed from the shapes (LongQLoRA arXiv 2311.04879 §3 sizes its V100 runs
the same way): NF4 weights with double-quantised scales, the 16-bit embedding and LM head, the trainable LoRA and
embedding/norm parameters with their fp32 gradients and AdamW state, the checkpointed hidden states (one per layer,
or the few in flight when they are offloaded to host memory), the recomputation of one layer in the backward, and the
loss. The peak is at the start of the backward: everything persistent, every checkpoint, plus the larger of the
loss's and one layer's working set. CUDA's own context and the allocator's fragmentation come on top, as overhead.
A paged optimizer's state (bitsandbytes, CUDA managed memory) is outside the allocator's peak: reported apart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from longqlora.hardware import DTYPES
from longqlora.training.optimizer import FOREACH_TEMPORARIES, optimizer_name, optimizer_state_bytes
from longqlora.training.plan_config import PlanConfig

GIB = 2**30
CUDA_CONTEXT_GIB = 0.5  # the CUDA context and cuBLAS workspaces, outside PyTorch's allocator
# Reserved-but-unallocated share of the caching allocator: the median of ours' points on an H200 (default allocator
# settings; 7% to 33%, docs/memory_gpu.json). A ceiling on the need: the allocator frees its cache before an OOM.
FRAGMENTATION = 0.23
# Checkpoints on the GPU while offloading, during the backward: the one in use, the one whose copy back has not been
# released yet, and the copies in flight on the side stream; fitted to the offloaded points measured on an H200.
OFFLOAD_IN_FLIGHT = 4
LOSS_TILE = (4096, 32768)  # TRL's fused LM head: tokens x vocabulary columns per projection tile
# (tokens x intermediate) gradients alive at the MLP's backward peak beyond what the layer saved, in the stream's
# dtype: 3 on the CPU (at the gated product's backward: the incoming gradient and the gradients of both factors;
# traced by op on the 13B's 2-layer point, which the plain QLoRA's fp32 MLP makes its peak), 2.5 on CUDA (fitted to
# docs/memory_gpu.json, an H200). Both calibrations are tests (tests/test_plan.py).
MLP_BACKWARD_COPIES = {"cpu": 3, "cuda": 2.5}
PLAIN_LOSS_FP32_COPIES = 2  # fp32 (tokens x vocab) tensors at the plain loss's peak
PLAIN_LOSS_16BIT_COPIES = 2  # and 16-bit ones: the logits and their gradient cast back (12 bytes a logit in bf16,
# measured by bench/memory_step.tracked_live on transformers' ForCausalLMLoss)
LOSS_TILES = 1  # (4096 x 32768) logit tiles of the fused loss alive at once
# Bytes per logit of one tile while TRL folds it: on CUDA its Triton kernel folds the tile in place; on the CPU its
# torch fallback folds the whole tile at once, 7 fp32 copies and a bool mask at its backward's peak (memory_cpu.json)
LOSS_FOLD_BYTES = {"cpu": 29, "cuda": 0}
# fp32 copies of the largest trained tensor that torch's single-tensor AdamW (the CPU's default; CUDA's is foreach,
# FOREACH_TEMPORARIES) makes in its step: the second moment's square root, then its quotient (docs/memory_cpu.json)
CPU_STEP_COPIES = 2
PAGED_MIN_VALUES = 100_000  # bitsandbytes' paged optimizers page the state of tensors this large, not smaller ones
BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}  # the one dtype table
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit absmax per 64 + fp32 per 256 absmax


@dataclass(frozen=True)
class Shapes:
    """What the plan needs from a transformers config."""

    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def of(cls, config) -> Shapes:
        """From a decoder's config (a multimodal one's text part); one line naming --model where it lacks a shape."""
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        try:
            heads, vocab, hidden = config.num_attention_heads, config.vocab_size, config.hidden_size
            layers, intermediate = config.num_hidden_layers, config.intermediate_size
        except AttributeError as err:
            raise ValueError(
                f"--model: {type(config).__name__} has no {err.name}; the planner knows decoders shaped like "
                "Llama's (hidden_size, intermediate_size, num_attention_heads, num_hidden_layers, vocab_size)"
            ) from None
        return cls(
            vocab=vocab,
            hidden=hidden,
            layers=layers,
            intermediate=intermediate,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
        )

    def linear_shapes(self, all_linear: bool) -> list[tuple[int, int]]:
        """(in, out) of one layer's projections: q, k, v, o, then gate, up, down with `all_linear`."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        attention = [(h, q), (h, kv), (h, kv), (q, h)]
        return attention + ([(h, i), (h, i), (i, h)] if all_linear else [])


# ------------------------------------------------------------------------------------------------- the parts
@dataclass(frozen=True)
class _Bytes:
    """Element sizes of one planned step: c the compute dtype, st the residual stream (fp32 for the baseline, whose
    fp32 norm weights promote it), kept the frozen unquantized weights, mask a dropout mask element (0: the CPU's
    noise tensor, as large as the input)."""

    c: int
    st: int
    kept: int
    mask: int

    @classmethod
    def of(cls, cfg: PlanConfig) -> _Bytes:
        c = BYTES[cfg.compute_dtype]
        upcast = cfg.baseline and cfg.load_in_4bit  # prepare_model_for_kbit_training
        return cls(c=c, st=4 if upcast else c, kept=4 if upcast else c, mask=1 if cfg.device == "cuda" else 0)


def _switched(cfg: PlanConfig) -> tuple[bool, bool]:
    """(norms recomputed, LoRA dropout redrawn): ours' switches, never the baseline's."""
    return cfg.recompute_norms and not cfg.baseline, cfg.recompute_dropout and not cfg.baseline


def parameter_bytes(s: Shapes, cfg: PlanConfig) -> dict:
    """Frozen weights, trainable parameters (fp32) with their optimizer state (a paged optimizer's apart: in CUDA
    managed memory, bitsandbytes' get_paged, for tensors of PAGED_MIN_VALUES or more), and their fp32 gradients."""
    b = _Bytes.of(cfg)
    linear = s.layers * sum(i * o for i, o in s.linear_shapes(all_linear=True))
    frozen = linear * (NF4_BYTES_PER_PARAM if cfg.load_in_4bit else b.c)
    frozen += s.vocab * s.hidden * b.kept * (1 if s.tied else 2) + (2 * s.layers + 1) * s.hidden * b.kept
    # (how many, values) of each trained tensor: LoRA's A and B, the embedding, the norms (the originals: `frozen`)
    tensors = [(s.layers, cfg.rank * n) for shape in s.linear_shapes(cfg.lora_target == "all-linear") for n in shape]
    tensors += [(1, s.vocab * s.hidden)] if "embed" in cfg.trainable else []
    tensors += [(2 * s.layers + 1, s.hidden)] if "norm" in cfg.trainable else []
    trainable = sum(k * n for k, n in tensors)
    pages = optimizer_name(cfg.optim).startswith("paged_") and cfg.device == "cuda"  # bnb pages nothing on a CPU
    paged = sum(k * n for k, n in tensors if pages and n >= PAGED_MIN_VALUES)
    state = optimizer_state_bytes(cfg.optim)  # an 8-bit state's absmax (4 bytes per 256, not paged) counted with it
    return {
        "weights": frozen,
        "trainable_params": trainable,
        "trainable_state": 4 * trainable + state * (trainable - paged),
        "paged_state": state * paged,
        "gradients": 4 * trainable,
        "largest_trained": max((n for _, n in tensors), default=0),
        "trained_tensors": tensors,
    }


def checkpoint_bytes(s: Shapes, cfg: PlanConfig) -> int:
    """Every checkpointed layer's input (in the residual stream's dtype), or only those in flight when offloaded,
    and the rotary cos/sin that every layer shares."""
    b = _Bytes.of(cfg)
    tokens = cfg.batch * cfg.context
    moved = offloaded_layers(s, cfg)
    kept = s.layers - moved + min(moved, OFFLOAD_IN_FLIGHT)
    return kept * tokens * s.hidden * b.st + tokens * 2 * s.head_dim * b.c


def _lora_input_bytes(b: _Bytes, cfg: PlanConfig, dtype: int, sharing: int) -> int:
    """Bytes per value that the LoRA A of `sharing` projections fed one input (of `dtype` bytes) keep."""
    _, redrawn = _switched(cfg)
    if cfg.lora_dropout > 0 and not redrawn:  # a mask and the dropped copy (cast to c by autocast) each
        return sharing * ((b.mask or dtype) + b.c)
    if cfg.lora_dropout > 0:  # ours: the shared input, the mask redrawn in the backward
        return dtype
    return dtype if dtype == b.c else sharing * b.c  # autocast casts the input once per projection


def _norm_bytes(b: _Bytes, cfg: PlanConfig, s: Shapes, input_is_checkpoint: bool) -> int:
    """What one RMSNorm keeps per token: its input only when recomputed; Llama's own keeps an fp32 copy of its
    input (the input itself when that is fp32) and, when it trains, the normalised output in the input's dtype."""
    recomputed, _ = _switched(cfg)
    if recomputed:
        return 0 if input_is_checkpoint else b.st * s.hidden
    upcast = 0 if (input_is_checkpoint and b.st == 4) else 4 * s.hidden
    return upcast + (b.st * s.hidden if "norm" in cfg.trainable else 0)


def layer_saved_per_token(s: Shapes, cfg: PlanConfig) -> tuple[int, int]:
    """(bytes per token, of which the MLP's) that one decoder layer's forward keeps for its backward, the layer's
    input (its checkpoint) aside: the inventory of bench/saved_tensors.py (docs/memory_inventory.md), which
    tests/test_plan.py checks this against. Attention (S2's grouped or varlen kernels, or full SDPA) keeps q, k, v
    and its output, the o projection's LoRA its input; an NF4 matmul keeps none of its input."""
    b = _Bytes.of(cfg)
    h, q, kv, i = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.intermediate
    out = b.st if cfg.baseline else b.c  # a norm's output: ours is cast to the compute dtype
    norms = _norm_bytes(b, cfg, s, True) + _norm_bytes(b, cfg, s, False)
    attention = _lora_input_bytes(b, cfg, out, 3) * h + b.c * (q + 2 * kv) + b.c * q + 4 * s.heads
    attention += _lora_input_bytes(b, cfg, b.c, 1) * q  # o_proj's input, the attention output
    attention += 4 * cfg.rank * b.c  # each LoRA A's output, kept by its B
    mlp = 3 * out * i  # gate, up and their product's input (SiLU's output)
    if cfg.lora_target == "all-linear":
        mlp += _lora_input_bytes(b, cfg, out, 2) * h + _lora_input_bytes(b, cfg, out, 1) * i + 3 * cfg.rank * b.c
    return norms + attention + mlp, mlp


def layer_bytes(s: Shapes, cfg: PlanConfig) -> int:
    """One decoder layer recomputed with gradients at the start of its backward: what it saved plus the stream's
    gradient in and out (and MLP_BACKWARD_COPIES gradients of the MLP's width). With the tiled MLP, the MLP's part
    exists for one tile (`tile_tokens` of every row) and the MLP keeps only its input per token."""
    b = _Bytes.of(cfg)
    saved, mlp = layer_saved_per_token(s, cfg)
    mlp_peak = mlp + MLP_BACKWARD_COPIES[cfg.device] * (b.st if cfg.baseline else b.c) * s.intermediate
    other = saved - mlp + 2 * b.st * s.hidden  # the stream's gradient in and out
    tokens = cfg.batch * cfg.context
    if not cfg.mlp_tiled:
        return tokens * (other + mlp_peak)
    mlp_input = (b.st if cfg.baseline else b.c) * s.hidden
    return tokens * (other + mlp_input) + cfg.rows[0] * cfg.tile_tokens * mlp_peak  # a tile: tile_tokens per row


def loss_bytes(s: Shapes, cfg: PlanConfig) -> int:
    """The final norm and the loss at the start of the backward. TRL's fused head keeps the final hidden states
    and builds their fp32 gradient (then its 16-bit copy) with (4096 x 32768) logit tiles, each folded in place on
    CUDA and with LOSS_FOLD_BYTES a logit on a CPU; the plain loss holds (tokens x vocab) tensors: the logits and
    their gradient in 16 bits, the log-softmax's fp32 output and gradient."""
    b = _Bytes.of(cfg)
    tokens = cfg.batch * cfg.context
    norm = _norm_bytes(b, cfg, s, False)
    if cfg.chunked_loss:
        tile = min(tokens, LOSS_TILE[0]) * min(s.vocab, LOSS_TILE[1])
        scatter = b.c if cfg.device == "cuda" else 0  # on CUDA the scored tokens are compacted, then scattered back
        fold = tile * (LOSS_TILES * b.c + LOSS_FOLD_BYTES[cfg.device])
        return tokens * (norm + s.hidden * (b.c + 4 + b.c + scatter)) + fold
    head_cast = s.vocab * s.hidden * b.c if b.kept != b.c else 0  # autocast's 16-bit copy of an fp32 head, kept
    logits = PLAIN_LOSS_16BIT_COPIES * b.c + 4 * PLAIN_LOSS_FP32_COPIES  # bytes of (tokens x vocab) tensors a logit
    return tokens * (norm + s.hidden * b.c + s.vocab * logits) + head_cast


def step_bytes(s: Shapes, cfg: PlanConfig, params: dict) -> int:
    """The end of the backward and the optimizer step: every gradient allocated (the embedding's last, beside the
    fp32 gradient of its output) and the optimizer's temporaries (step_temporary_bytes)."""
    tokens = cfg.batch * cfg.context
    embedding = tokens * s.hidden * 4 if "embed" in cfg.trainable else 0
    return params["gradients"] + max(embedding, step_temporary_bytes(cfg, params))


def step_temporary_bytes(cfg: PlanConfig, params: dict) -> float:
    """What the optimizer's step allocates beyond its state: torch's optimizers one fp32 copy of every trained
    tensor on CUDA (foreach), CPU_STEP_COPIES of the largest on a CPU (one tensor at a time); bitsandbytes' none."""
    if optimizer_name(cfg.optim) not in FOREACH_TEMPORARIES:
        return 0
    return params["gradients"] if cfg.device == "cuda" else CPU_STEP_COPIES * 4 * params["largest_trained"]


def pinned_block_bytes(s: Shapes, cfg: PlanConfig) -> int:
    """One offloaded checkpoint in pinned host memory: rounded up to a power of two by torch's caching host
    allocator (CachingHostAllocator.h; torch 2.13 can turn the rounding off with
    PYTORCH_ALLOC_CONF=pinned_max_round_threshold_mb:N, not measured here)."""
    block = cfg.batch * cfg.context * s.hidden * _Bytes.of(cfg).st
    return 1 << (block - 1).bit_length()


def offloaded_layers(s: Shapes, cfg: PlanConfig) -> int:
    """How many layers' checkpoints go to the host: none without --offload, else --offload_layers, else all or, with
    --host_memory, as many as it can pin (the first ones; the rest stay on the GPU: training's --offload_layers),
    and none when that is no more than the OFFLOAD_IN_FLIGHT the GPU holds anyway (pinning would save nothing)."""
    if not cfg.offload:
        return 0
    if cfg.offload_layers is not None:
        return min(cfg.offload_layers, s.layers)
    if cfg.host_memory is None:
        return s.layers
    pinned = min(s.layers, int(cfg.host_memory * GIB // pinned_block_bytes(s, cfg)))
    return pinned if pinned == s.layers or pinned > OFFLOAD_IN_FLIGHT else 0


def halo_bytes(s: Shapes, cfg: PlanConfig) -> int:
    """S2-Attn context parallelism (attention/context_parallel.py): a rank's attention runs on its chunk behind the
    keys/values it borrows from the previous rank (zero queries in front, their outputs dropped), at most one group,
    and a group is never longer than the chunk (the run refuses it). Planned as a whole chunk of every head, q, k, v
    and the output kept and their gradients built in the backward, as a GPU's varlen kernel keeps them; a CPU runs
    the borrowed rows through the banded fallback, which keeps more (2G-key windows and a mask; measured in
    docs/distributed.md). 0 without context parallelism."""
    if cfg.context_parallel == 1:
        return 0
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    borrowed = cfg.batch * cfg.context // cfg.context_parallel
    return borrowed * _Bytes.of(cfg).c * (2 * q + 2 * kv) * 2


def ddp_bucket_bytes(params: dict) -> int:
    """DDP (torch's Reducer) allocates its communication buckets when it wraps the model: one fp32 slot per trained
    value, kept for the whole run beside the parameters' own .grad (the Trainer's DDP does not make the gradients
    views of the buckets, and with that view the gradients set to None each step are still allocated anew before
    their copy into the bucket). tests/test_plan.py checks this against the bucket sizes DDP logs."""
    return params["gradients"]


# --------------------------------------------------------------------------------------------------- the plan
def plan(config, cfg: PlanConfig) -> dict:
    """The predicted peak (GiB) with its parts, and whether it fits `cfg`'s device: the larger of the backward's
    start (persistent + checkpoints + the larger of one layer's and the loss's working set) and its end (persistent
    + every gradient + the optimizer's temporaries)."""
    s = Shapes.of(config)
    if cfg.offload_layers is not None and cfg.offload_layers > s.layers:
        raise ValueError(
            f"--offload_layers {cfg.offload_layers}: {cfg.model} has {s.layers} decoder layers; pass at most "
            f"{s.layers}, or leave it unset (all)"
        )
    local = cfg.rank_share  # the tokens one rank holds: all of them without --context_parallel
    params = parameter_bytes(s, local)
    parts = {
        "weights": params["weights"],
        "trainable_state": params["trainable_state"],
        "checkpoints": checkpoint_bytes(s, local),
        "layer_recompute": layer_bytes(s, local) + halo_bytes(s, cfg),
        "loss": loss_bytes(s, local),
        "gradients_and_step": step_bytes(s, local, params),
    }
    step = params["gradients"] + step_temporary_bytes(local, params)  # the optimizer step alone
    if cfg.sharding != "none":  # FSDP2 or ZeRO-3: the parts the engine shards, gathers or buckets, replaced
        from longqlora.training.plan_sharding import sharded_parts  # its terms build on this module's

        sharded, step = sharded_parts(s, local, params, parts)
        parts.update(sharded)
    elif cfg.processes > 1:  # DDP's buckets: a second fp32 copy of every trained gradient (measured)
        parts["ddp_buckets"] = ddp_bucket_bytes(params)
    persistent = (
        parts["weights"] + parts["trainable_state"] + parts.get("ddp_buckets", 0) + parts.get("zero3_bucket", 0)
    )
    backward = persistent + parts["checkpoints"] + max(parts["layer_recompute"], parts["loss"])
    peak = max(backward, persistent + parts["gradients_and_step"])
    overhead = peak * FRAGMENTATION + CUDA_CONTEXT_GIB * GIB if cfg.device == "cuda" else 0.0
    result = {
        "model": cfg.model,
        "context": cfg.context,
        "batch": cfg.batch,
        "config": dataclasses.asdict(cfg),
        "context_parallel": cfg.context_parallel,
        "processes": cfg.processes,
        "sharding": cfg.sharding,
        "switches": {"offload": cfg.offload, "chunked_loss": cfg.chunked_loss, "tiled_mlp": local.mlp_tiled},
        "trainable_params": params["trainable_params"],
        "parts_gib": {k: v / GIB for k, v in parts.items()},
        "peak_allocated_gib": peak / GIB,
        # the backward's start (its first layer recomputed, or the loss) and the optimizer step alone; the peak's
        # other candidate, the gradients with the larger of the backward's end and the step, is in parts_gib
        "phase_peaks_gib": {"backward": backward / GIB, "step": (persistent + step) / GIB},
        "overhead_gib": overhead / GIB,
        "device_need_gib": (peak + overhead) / GIB,
        "device_gib": cfg.device_gib,
        "host_offload_gib": offloaded_layers(s, local) * pinned_block_bytes(s, local) / GIB,  # at the backward's start
        # Not in the need: the driver evicts managed memory to the host when the device is short (slower, no OOM).
        "paged_optimizer_gib": params["paged_state"] / GIB,
        "offload_layers": offloaded_layers(s, local),
        "layers": s.layers,
    }
    if cfg.device_gib is not None:
        result["fits"] = result["device_need_gib"] <= cfg.device_gib and (
            cfg.host_memory is None or result["host_offload_gib"] <= cfg.host_memory
        )
    return result
