"""The planner's configuration: `python -m longqlora plan`'s flags, checked in one place, and a training run's own
plan from its settings (`memory_plan`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from longqlora.hardware import DTYPES
from longqlora.training.optimizer import OPTIMIZER_ALIASES, optimizer_name, optimizer_names

# Total device memory as CUDA reports it (GiB: torch's total_memory, e.g. a 4090's 23.64 in its out-of-memory
# messages, not the marketed 24 GB), for --gpu.
GPUS = {"v100-32gb": 31.7, "a10-24gb": 22.5, "4090-24gb": 23.6, "a100-40gb": 39.4, "a100-80gb": 79.2, "h100-80gb": 79.1}


@dataclass
class PlanConfig:
    """`python -m longqlora plan`: predicted peak GPU memory of a training step, and the longest context that fits."""

    # A recipe's names are aliases (--model_name_or_path, --target_context, --lora_r, ...): its flags plan as they are
    model: str = field(
        metadata={
            "aliases": ["--model_name_or_path"],
            "help": "Preset (llama-2-7b, llama-2-13b, llama-2-70b, vicuna-13b, llama-3.1-8b, "
            "mistral-7b, or their hub ids) or a local model directory.",
        }
    )
    context: int = field(
        metadata={"aliases": ["--target_context"], "help": "Training sequence length in tokens, e.g. 8192."}
    )
    batch: int = field(
        default=1, metadata={"aliases": ["--per_device_train_batch_size"], "help": "Sequences per device step."}
    )
    context_parallel: int = field(
        default=1,
        metadata={
            "help": "Ranks sharing each row (training's --context_parallel): the plan is one rank's, holding "
            "context / N tokens of every row and borrowing at most that many keys/values from its neighbour."
        },
    )
    processes: int | None = field(
        default=None,
        metadata={
            "help": "Processes of the launch, the context-parallel ranks included; default --context_parallel. "
            "Under DDP (--sharding none) each keeps every trained gradient in DDP's buckets beside .grad; with "
            "--sharding fsdp2 or zero3 they shard the model. 1: one process."
        },
    )
    sharding: str = field(
        default="none",
        metadata={
            "help": "none (one process, DDP), fsdp2 or zero3: --processes processes shard the weights, trained "
            "state and gradients (accelerate's FSDP2 or DeepSpeed ZeRO-3 as configs/accelerate/ launch them); the "
            "plan is one process's."
        },
    )
    zero3_live_values: int = field(
        default=1_000_000_000,
        metadata={
            "help": "With --sharding zero3: DeepSpeed's stage3_max_live_parameters (= stage3_max_reuse_distance), "
            "what it keeps gathered between steps; default DeepSpeed's, which configs/accelerate/ leaves."
        },
    )
    rank: int = field(default=8, metadata={"aliases": ["--lora_r"], "help": "LoRA rank."})
    lora_target: str = field(default="attention", metadata={"help": "attention (q/k/v/o) or all-linear."})
    trainable_params: str = field(
        default="embed,norm", metadata={"help": "Trained in full: comma list of embed, norm; empty for plain LoRA."}
    )
    gpu: str | None = field(default=None, metadata={"help": f"One of {', '.join(GPUS)}."})
    gpu_memory: float | None = field(default=None, metadata={"help": "Device memory in GiB, instead of --gpu."})
    host_memory: float | None = field(
        default=None,
        metadata={
            "help": "Host memory (GiB) that offloaded checkpoints may pin (per rank with --context_parallel); "
            "unlimited if unset."
        },
    )
    offload: bool = field(default=False, metadata={"help": "Checkpointed hidden states offloaded to host memory."})
    offload_layers: int | None = field(
        default=None, metadata={"help": "With --offload: the first N layers' (unset: all, or what --host_memory pins)."}
    )
    chunked_loss: bool = field(default=True, metadata={"help": "TRL's chunked loss (false: full fp32 logits)."})
    tiled_mlp: bool = field(default=False, metadata={"help": "MLPs run in sequence tiles of --tile_tokens."})
    tile_tokens: int = field(
        default=16384, metadata={"aliases": ["--tiled_mlp_tokens"], "help": "Tokens per MLP tile."}
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "The batch as one row of batch x context tokens (TRL's padding-free collation, as --pack "
            "documents collates): the MLP tiles split that one row."
        },
    )
    compute_dtype: str | None = field(
        default=None,
        metadata={"help": "bfloat16, float16 or float32; unset: float16 on a V100 (no bf16), else bfloat16."},
    )
    load_in_4bit: bool = field(default=True, metadata={"help": "NF4 base (false: 16-bit base)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (p > 0 keeps a mask and a copy)."})
    recompute_norms: bool = field(
        default=True, metadata={"help": "Norms recomputed in the backward (--recompute_norms)."}
    )
    recompute_dropout: bool = field(
        default=True,
        metadata={"aliases": ["--recompute_lora_dropout"], "help": "LoRA dropout redrawn in the backward."},
    )
    optim: str = field(
        default="paged_adamw",
        metadata={
            "help": "paged_adamw (bitsandbytes, 32-bit states, the recipes' default), adamw (torch), adamw_8bit, or "
            "any TrainingArguments --optim name (lion_8bit, adafactor, sgd, ...)."
        },
    )
    baseline: bool = field(
        default=False,
        metadata={
            "help": "Plan plain QLoRA (prepare_model_for_kbit_training's fp32 weights, full attention, plain loss)."
        },
    )
    device: str = field(default="cuda", metadata={"help": "cuda, or cpu for the CPU benchmark's step."})
    json: bool = field(default=False, metadata={"help": "Print JSON instead of a table."})

    def __post_init__(self):
        for name, floor, must in (  # the numeric flags, refused at or below `floor`
            ("context", 0, "a positive number of tokens, e.g. 8192"),
            ("batch", 0, "at least 1"),
            ("rank", 0, "at least 1, e.g. 8"),
            ("tile_tokens", 0, "a positive number of tokens"),
            ("gpu_memory", 0, "a positive number of GiB, e.g. 24"),
            ("host_memory", 0, "a positive number of GiB, e.g. 128"),
            ("offload_layers", -1, "0 or more decoder layers (unset: all)"),
            ("context_parallel", 0, "a number of ranks, 1 = off"),
            ("processes", 0, "a number of processes, 1 = one"),
        ):
            if getattr(self, name) is not None and getattr(self, name) <= floor:
                raise ValueError(f"--{name} {getattr(self, name)}: must be {must}")
        if self.baseline and self.context_parallel > 1:
            raise ValueError(
                f"--context_parallel {self.context_parallel}: splits rows for S2-Attn, which the --baseline (full "
                "attention) does not run; drop one of them"
            )
        if self.processes is None:
            self.processes = self.context_parallel
        if self.processes > 1 and self.processes % self.context_parallel:
            raise ValueError(
                f"--processes {self.processes}: a launch with --context_parallel {self.context_parallel} "
                "runs a whole number of replicas of that many ranks; use a multiple of it"
            )
        if self.sharding not in ("none", "fsdp2", "zero3"):
            raise ValueError(f"--sharding {self.sharding!r}: none, fsdp2 or zero3")
        if self.sharding != "none" and self.processes == 1:
            raise ValueError(
                f"--sharding {self.sharding}: shards over --processes N; pass the launch's process count, 2 or more"
            )
        if self.zero3_live_values < 0:
            raise ValueError(
                f"--zero3_live_values {self.zero3_live_values}: a number of parameters, 0 or more (DeepSpeed's 1e9)"
            )
        if self.sharding != "none" and optimizer_name(self.optim).startswith("paged_"):
            self.optim = "adamw"  # what a run under FSDP2 trains with (training/run.py: no paged state on shards)
        if self.context % self.context_parallel:
            raise ValueError(
                f"--context_parallel {self.context_parallel}: each rank holds --context {self.context} / "
                f"{self.context_parallel} tokens, which must be a whole number"
            )
        if self.lora_target not in ("attention", "all-linear"):
            raise ValueError(f"--lora_target {self.lora_target!r}: use attention or all-linear")
        unknown = [t for t in self.trainable if t not in ("embed", "norm")]
        if unknown:
            raise ValueError(
                f"--trainable_params {self.trainable_params!r}: unknown {', '.join(unknown)}; "
                "use a comma list of embed, norm"
            )
        if self.gpu is not None and self.gpu not in GPUS:
            raise ValueError(f"--gpu {self.gpu!r}: use one of {', '.join(GPUS)}, or --gpu_memory GIB")
        if self.gpu is not None and self.gpu_memory is not None:
            raise ValueError("--gpu and --gpu_memory: pass one of them")
        if self.compute_dtype is None:
            self.compute_dtype = "float16" if self.gpu == "v100-32gb" else "bfloat16"
        if self.gpu == "v100-32gb" and self.compute_dtype == "bfloat16":
            raise ValueError("--compute_dtype bfloat16: a V100 has no bfloat16; pass float16 (or leave it unset)")
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"--compute_dtype {self.compute_dtype!r}: use one of {', '.join(DTYPES)}")
        if optimizer_name(self.optim) not in optimizer_names():
            raise ValueError(
                f"--optim {self.optim!r}: use {', '.join(OPTIMIZER_ALIASES)} or a TrainingArguments --optim name "
                "(e.g. adamw_torch, paged_adamw_8bit, adafactor)"
            )
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"--device {self.device!r}: cuda or cpu")
        if self.baseline:
            self.chunked_loss = False  # plain QLoRA computes the model's own loss from the full logits

    @property
    def rank_share(self) -> PlanConfig:
        """The same plan for the tokens one rank holds: its chunk of every row under --context_parallel."""
        if self.context_parallel == 1:
            return self
        return dataclasses.replace(self, context=self.context // self.context_parallel, context_parallel=1)

    @property
    def rows(self) -> tuple[int, int]:
        """(rows, tokens per row) of the batch as the model sees it."""
        return (1, self.batch * self.context) if self.padding_free else (self.batch, self.context)

    @property
    def mlp_tiled(self) -> bool:
        """Whether the MLPs run in tiles: rows of one tile or less run the plain MLP (memory.enable_tiled_mlp),
        whatever the switch says."""
        return self.tiled_mlp and self.rows[1] > self.tile_tokens

    @property
    def trainable(self) -> list[str]:
        return [t.strip() for t in self.trainable_params.split(",") if t.strip()]

    @property
    def device_gib(self) -> float | None:
        return GPUS[self.gpu] if self.gpu else self.gpu_memory


# ------------------------------------------------------------------------------------------------- a run's plan
SHARDING = {"fsdp2": "fsdp2", "deepspeed": "zero3"}  # a launch's engine -> --sharding (check_launch: ZeRO stage 3 only)


def memory_plan(hf_config, model_cfg, training, compute_dtype: str, optim=None) -> dict:
    """The planner's prediction (training/plan.py) for this run's switches, against this GPU when there is one;
    `optim`: the optimizer a GPU would train with, when not the run's own (default)."""
    import torch

    from longqlora.hardware import launch
    from longqlora.training.memory import tiled_mlp_active
    from longqlora.training.plan import plan

    tokens = training.per_device_train_batch_size * model_cfg.train_length // model_cfg.context_parallel  # a rank's
    launched = launch()
    mode = training.offload_activations
    offload = mode == "on" or (mode == "auto" and tokens >= training.offload_min_tokens)
    cfg = PlanConfig(
        model=model_cfg.model_name_or_path,
        context=model_cfg.train_length,
        context_parallel=model_cfg.context_parallel,
        processes=1 if launched.engine in ("none", "fsdp1") else launched.world_size,
        sharding=SHARDING.get(launched.engine, "none") if launched.world_size > 1 else "none",
        zero3_live_values=launched.zero3_live_values,
        batch=training.per_device_train_batch_size,
        rank=model_cfg.lora_r,
        lora_target=plan_lora_target(model_cfg.lora_target),
        trainable_params=model_cfg.trainable_params,
        offload=offload,
        offload_layers=training.offload_layers,
        chunked_loss=training.chunked_loss,
        tile_tokens=training.tiled_mlp_tokens,
        # TRL's rule (SFTTrainer.__init__): bfd packing (--pack documents) collates padding-free
        padding_free=bool(
            training.padding_free or (training.packing and training.packing_strategy in ("bfd", "bfd_split"))
        ),
        tiled_mlp=tiled_mlp_active(training.tiled_mlp, tokens, training.tiled_mlp_min_tokens),
        compute_dtype=compute_dtype,
        load_in_4bit=model_cfg.load_in_4bit,
        lora_dropout=model_cfg.lora_dropout,
        recompute_norms=training.recompute_norms,
        recompute_dropout=training.recompute_lora_dropout,
        optim=optimizer_name(optim or training.optim),
        gpu_memory=torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None,
    )
    planned = plan(hf_config, cfg)
    if not getattr(training, "activation_checkpointing", True):  # the plan is of a checkpointed run: what it lacks
        from longqlora.training.plan import GIB, Shapes, layer_saved_per_token

        shapes = Shapes.of(hf_config)
        saved = layer_saved_per_token(shapes, cfg)[0] * cfg.batch * cfg.context // cfg.context_parallel
        planned["unplanned_gib"] = (shapes.layers - 1) * saved / GIB  # every other layer's saved activations too
        if planned.get("fits") and not offload:  # offloading would move them to the host: not the GPU's
            planned["fits"] = planned["device_need_gib"] + planned["unplanned_gib"] <= planned["device_gib"]
    return planned


def plan_lora_target(spec: str) -> str:
    """The planner's name for --lora_target: all-linear when any MLP projection is adapted, else attention (for a
    comma list, each an upper bound on what the subset keeps)."""
    names = {n.strip() for n in spec.split(",")}
    return "all-linear" if spec == "all-linear" or names & {"gate_proj", "up_proj", "down_proj"} else "attention"
