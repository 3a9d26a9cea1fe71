"""Memory planning: predict the peak GPU memory of a LongQLoRA training step from a model's config alone.

The prediction is a sum of parts, each computed from the shapes (LongQLoRA arXiv 2311.04879 §3 sizes its V100 runs
the same way): NF4 weights with double-quantised scales, the 16-bit embedding and LM head, the trainable LoRA and
embedding/norm parameters with their fp32 gradients and AdamW state, the checkpointed hidden states (one per layer,
or the few in flight when they are offloaded to host memory), the recomputation of one layer in the backward, and the
loss. The peak is at the start of the backward: everything persistent, every checkpoint, plus the larger of the
loss's and one layer's working set. CUDA's own context and the allocator's fragmentation come on top, as overhead.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

GIB = 2 ** 30
# Total device memory as CUDA reports it (GiB), for --gpu.
GPUS = {"v100-32gb": 31.7, "a10-24gb": 22.5, "4090-24gb": 24.0, "a100-40gb": 39.4, "a100-80gb": 79.2,
        "h100-80gb": 79.1}
CUDA_CONTEXT_GIB = 0.5  # the CUDA context and cuBLAS workspaces, outside PyTorch's allocator
FRAGMENTATION = 0.05  # reserved-but-unallocated share of the caching allocator
OFFLOAD_IN_FLIGHT = 4  # checkpoints still on the GPU while offloading (copies in flight, prefetched ones)
LOSS_TILE = (4096, 32768)  # TRL's fused LM head: tokens x vocabulary columns per projection tile
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit absmax per 64 + fp32 per 256 absmax


@dataclass
class PlanConfig:
    """`python -m longqlora plan`: predicted peak GPU memory of a training step, and the longest context that fits."""

    model: str = field(metadata={"help": "Preset (llama-2-7b, llama-2-13b, llama-2-70b, vicuna-13b, llama-3.1-8b, "
                                         "mistral-7b, or their hub ids) or a local model directory."})
    context: int = field(metadata={"help": "Training sequence length in tokens, e.g. 8192."})
    batch: int = field(default=1, metadata={"help": "Sequences per device step (per_device_train_batch_size)."})
    rank: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_target: str = field(default="attention", metadata={"help": "attention (q/k/v/o) or all-linear."})
    trainable_params: str = field(default="embed,norm", metadata={"help": "Trained in full: comma list of embed, "
                                                                           "norm; empty for plain LoRA."})
    gpu: str | None = field(default=None, metadata={"help": f"One of {', '.join(GPUS)}."})
    gpu_memory: float | None = field(default=None, metadata={"help": "Device memory in GiB, instead of --gpu."})
    offload: bool = field(default=False, metadata={"help": "Checkpointed hidden states offloaded to host memory."})
    chunked_loss: bool = field(default=True, metadata={"help": "TRL's chunked loss (false: full fp32 logits)."})
    tiled_mlp: bool = field(default=False, metadata={"help": "MLPs run in sequence tiles of --tile_tokens."})
    tile_tokens: int = field(default=16384, metadata={"help": "Tokens per MLP tile."})
    compute_dtype: str = field(default="bfloat16", metadata={"help": "bfloat16, float16 or float32."})
    load_in_4bit: bool = field(default=True, metadata={"help": "NF4 base (false: 16-bit base)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (p > 0 keeps a mask and a copy)."})
    json: bool = field(default=False, metadata={"help": "Print JSON instead of a table."})

    def __post_init__(self):
        if self.context < 1:
            raise ValueError(f"--context {self.context}: must be a positive number of tokens, e.g. 8192")
        if self.batch < 1:
            raise ValueError(f"--batch {self.batch}: must be at least 1")
        if self.rank < 1:
            raise ValueError(f"--rank {self.rank}: must be at least 1, e.g. 8")
        if self.lora_target not in ("attention", "all-linear"):
            raise ValueError(f"--lora_target {self.lora_target!r}: use attention or all-linear")
        unknown = [t for t in self.trainable if t not in ("embed", "norm")]
        if unknown:
            raise ValueError(f"--trainable_params {self.trainable_params!r}: unknown {', '.join(unknown)}; "
                             "use a comma list of embed, norm")
        if self.gpu is not None and self.gpu not in GPUS:
            raise ValueError(f"--gpu {self.gpu!r}: use one of {', '.join(GPUS)}, or --gpu_memory GIB")
        if self.gpu is not None and self.gpu_memory is not None:
            raise ValueError("--gpu and --gpu_memory: pass one of them")
        if self.gpu_memory is not None and self.gpu_memory <= 0:
            raise ValueError(f"--gpu_memory {self.gpu_memory}: must be a positive number of GiB, e.g. 24")
        if self.compute_dtype not in BYTES:
            raise ValueError(f"--compute_dtype {self.compute_dtype!r}: use one of {', '.join(BYTES)}")
        if self.tile_tokens < 1:
            raise ValueError(f"--tile_tokens {self.tile_tokens}: must be a positive number of tokens")

    @property
    def trainable(self) -> list[str]:
        return [t.strip() for t in self.trainable_params.split(",") if t.strip()]

    @property
    def device_gib(self) -> float | None:
        return GPUS[self.gpu] if self.gpu else self.gpu_memory


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
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(vocab=config.vocab_size, hidden=config.hidden_size, layers=config.num_hidden_layers,
                   intermediate=config.intermediate_size, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   tied=bool(getattr(config, "tie_word_embeddings", False)))

    def linear_shapes(self, all_linear: bool) -> list[tuple[int, int]]:
        """(in, out) of one layer's projections: q, k, v, o, then gate, up, down with `all_linear`."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        attention = [(h, q), (h, kv), (h, kv), (q, h)]
        return attention + ([(h, i), (h, i), (i, h)] if all_linear else [])


def load_config(name: str):
    """A preset's built-in config (no download) or a local model directory's config.json."""
    import os

    from transformers import AutoConfig

    from longqlora.presets import ALIASES, preset_config

    config = preset_config(name)
    if config is not None:
        return config
    path = os.path.expanduser(name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--model {name}: neither a preset ({', '.join(ALIASES)}) nor a local directory with a "
                         "config.json")
    return AutoConfig.from_pretrained(path)


# ------------------------------------------------------------------------------------------------- the parts
def parameter_bytes(s: Shapes, cfg: PlanConfig) -> dict:
    """Frozen weights and the trainable state (fp32 parameter, fp32 gradient, two fp32 AdamW moments)."""
    c = BYTES[cfg.compute_dtype]
    linear = s.layers * sum(i * o for i, o in s.linear_shapes(all_linear=True))
    frozen = linear * (NF4_BYTES_PER_PARAM if cfg.load_in_4bit else c)
    # peft.prepare_model_for_kbit_training (model.load_model) upcasts the unquantised weights to fp32
    kept = 4 if cfg.load_in_4bit else c
    frozen += s.vocab * s.hidden * kept * (1 if s.tied else 2) + (2 * s.layers + 1) * s.hidden * kept
    lora = s.layers * cfg.rank * sum(i + o for i, o in s.linear_shapes(cfg.lora_target == "all-linear"))
    full = (s.vocab * s.hidden if "embed" in cfg.trainable else 0)
    full += (2 * s.layers + 1) * s.hidden if "norm" in cfg.trainable else 0
    trainable = lora + full  # PEFT keeps the frozen originals of modules_to_save, counted in `frozen`
    return {"weights": frozen, "trainable_params": trainable, "trainable_state": trainable * (4 + 4 + 8)}


def checkpoint_bytes(s: Shapes, cfg: PlanConfig) -> int:
    """The hidden state saved at every checkpointed layer's input (the residual stream runs in the compute dtype,
    memory.stream_in_compute_dtype), or only those in flight when offloaded."""
    tokens = cfg.batch * cfg.context
    kept = min(s.layers, OFFLOAD_IN_FLIGHT) if cfg.offload else s.layers + 1
    return kept * tokens * s.hidden * BYTES[cfg.compute_dtype]


def layer_bytes(s: Shapes, cfg: PlanConfig) -> int:
    """One decoder layer recomputed with gradients: the tensors its forward saves for the backward, plus the MLP
    backward's gradients (the first part of the backward, so everything saved is still alive). Per token, with c
    the compute dtype's bytes and n the norms' output bytes (fp32 when the norms train, as their weights are fp32)."""
    c = BYTES[cfg.compute_dtype]
    n = 4 if "norm" in cfg.trainable else c
    h, q, kv, i = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.intermediate
    cast = c if n != c else 0  # a 16-bit matmul fed an fp32 input saves its own 16-bit copy
    drop = (n + 1) if cfg.lora_dropout > 0 else 0  # LoRA dropout saves its output and a byte mask per input
    norm = ((4 if c != 4 else 0) + (c if c != 4 else 4)) * h + n * h  # fp32 upcast, normalised, output
    lora_inputs = [a for a, _ in s.linear_shapes(cfg.lora_target == "all-linear")]
    lora = sum((drop + cast) * a for a in lora_inputs)  # LoRA A's input: dropped copy, autocast copy
    qkv = 3 * cast * h  # the frozen NF4 q/k/v each save their 16-bit input
    rotary = 3 * c * (q + kv)  # q, k and their rotated halves, saved by the products; the outputs
    attention = 5 * c * q + 2 * c * kv  # S2 regrouped q and GQA-expanded k/v, output, output transposed; k, v
    mlp_inputs = 2 * cast * h
    mlp = (4 + 2) * c * i  # gate, up, act, product saved; two gradients of that size in the backward
    stream = 2 * c * h  # the gradient flowing in and the one flowing out
    tokens = cfg.batch * cfg.context
    mlp_tokens = min(tokens, cfg.tile_tokens) if cfg.tiled_mlp else tokens
    per_token = 2 * norm + lora + qkv + rotary + attention + mlp_inputs + stream
    return tokens * per_token + mlp_tokens * mlp + (tokens * c * h if cfg.tiled_mlp else 0)  # tiled: output


def loss_bytes(s: Shapes, cfg: PlanConfig) -> int:
    """The loss and its backward: TRL's fused head keeps the final hidden states and an fp32 gradient for them plus
    a few projection tiles; the plain loss holds (tokens x vocab) logits, their fp32 copies and gradient."""
    c = BYTES[cfg.compute_dtype]
    n = 4 if "norm" in cfg.trainable else c
    tokens = cfg.batch * cfg.context
    if cfg.chunked_loss:
        tile = min(tokens, LOSS_TILE[0]) * min(s.vocab, LOSS_TILE[1])
        return tokens * s.hidden * (n + n + 4) + 3 * tile * 4
    return tokens * s.hidden * (n + 4) + tokens * s.vocab * (c + 4 + 4 + 4 + 4)


# --------------------------------------------------------------------------------------------------- the plan
def plan(config, cfg: PlanConfig) -> dict:
    """The predicted peak (GiB) with its parts, and whether it fits `cfg`'s device."""
    s = Shapes.of(config)
    params = parameter_bytes(s, cfg)
    parts = {"weights": params["weights"], "trainable_state": params["trainable_state"],
             "checkpoints": checkpoint_bytes(s, cfg), "layer_recompute": layer_bytes(s, cfg),
             "loss": loss_bytes(s, cfg)}
    peak = parts["weights"] + parts["trainable_state"] + parts["checkpoints"]
    peak += max(parts["layer_recompute"], parts["loss"])
    overhead = peak * FRAGMENTATION + CUDA_CONTEXT_GIB * GIB
    result = {"model": cfg.model, "context": cfg.context, "batch": cfg.batch,
              "switches": {"offload": cfg.offload, "chunked_loss": cfg.chunked_loss, "tiled_mlp": cfg.tiled_mlp},
              "trainable_params": params["trainable_params"],
              "parts_gib": {k: v / GIB for k, v in parts.items()},
              "peak_allocated_gib": peak / GIB, "overhead_gib": overhead / GIB,
              "device_need_gib": (peak + overhead) / GIB, "device_gib": cfg.device_gib}
    if cfg.device_gib is not None:
        result["fits"] = result["device_need_gib"] <= cfg.device_gib
    return result


def longest_context(config, cfg: PlanConfig, step: int = 1024, limit: int = 1 << 23) -> int:
    """The longest context (a multiple of `step`) whose plan fits `cfg`'s device, 0 if none does."""
    if cfg.device_gib is None:
        raise ValueError("--gpu or --gpu_memory: needed to find the longest context that fits")

    def fits(n):
        return plan(config, replace(cfg, context=n))["fits"]

    lo, hi = 0, limit // step
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid * step) else (lo, mid - 1)
    return lo * step


def advise(config, cfg: PlanConfig) -> dict:
    """The plan, the longest context that fits as asked and with every switch on, and the switches to turn on."""
    result = plan(config, cfg)
    if cfg.device_gib is None:
        return result
    everything = replace(cfg, offload=True, chunked_loss=True, tiled_mlp=True)
    result["longest_context"] = longest_context(config, cfg)
    result["longest_context_all_switches"] = longest_context(config, everything)
    advice = []
    if not result["fits"]:
        for switches in ({"chunked_loss": True}, {"chunked_loss": True, "offload": True},
                         {"chunked_loss": True, "offload": True, "tiled_mlp": True}):
            if plan(config, replace(cfg, **switches))["fits"]:
                advice = [name for name, on in switches.items() if on and not getattr(cfg, name)]
                break
        else:
            advice = ["none fits: lower --context or --batch, or use a larger GPU"]
    result["turn_on"] = advice
    return result


def render(result: dict) -> str:
    """The plan as a short human-readable report."""
    names = {"weights": "frozen weights (NF4 + embedding/head)",
             "trainable_state": "trainable: params + grads + AdamW (fp32)",
             "checkpoints": "checkpointed hidden states", "layer_recompute": "one layer's recomputation",
             "loss": "loss and its backward"}
    on = [k for k, v in result["switches"].items() if v]
    lines = [f"{result['model']} at {result['context']:,} tokens x batch {result['batch']} "
             f"(switches on: {', '.join(on) or 'none'}); {result['trainable_params']:,} trainable parameters"]
    lines += [f"  {names[k]:<46} {v:8.2f} GiB" for k, v in result["parts_gib"].items()]
    lines.append(f"  {'peak allocated (persistent + checkpoints + max)':<46} "
                 f"{result['peak_allocated_gib']:8.2f} GiB")
    lines.append(f"  {'+ CUDA context and fragmentation':<46} {result['overhead_gib']:8.2f} GiB")
    if result.get("device_gib") is not None:
        verdict = "fits" if result["fits"] else "does NOT fit"
        lines.append(f"needs {result['device_need_gib']:.2f} of {result['device_gib']:.1f} GiB: {verdict}")
    if "longest_context" in result:
        lines.append(f"longest context that fits: {result['longest_context']:,} tokens as asked, "
                     f"{result['longest_context_all_switches']:,} with offload + chunked loss + tiled MLP")
    if result.get("turn_on"):
        lines.append("turn on: " + ", ".join(result["turn_on"]))
    return "\n".join(lines)


