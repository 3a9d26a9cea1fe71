"""The model flags of every recipe (`ModelConfig`): which base, the target context, S2-Attn and its schedule, PoSE,
the kernel, the precision and LoRA. Each value is checked in `__post_init__`, one line naming the flag; what needs
the model's own config is checked by `model.check_model`. `longqlora.model` re-exports it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from longqlora import hardware
from longqlora.attention.experimental import check_variant
from longqlora.hardware import DTYPES
from longqlora.rope import check_scaling

TRAINABLE_TOKENS = ("embed", "norm")


# S2-Attn's default group-size schedule, as multiples of --group_ratio (mean 1: a fixed group's attention cost).
# docs/ablations.md ("Default"): better than a fixed group on every seed in fp32, and at 120 steps on NF4.
DEFAULT_SCHEDULE = "0.25,0.75,2"


@dataclass
class ModelConfig:
    """Which model to load and how to adapt it; the fields become command-line flags through HfArgumentParser."""

    model_name_or_path: str = field(
        metadata={"help": "Local model directory or hub id of a RoPE decoder (Llama, Mistral, Qwen2)."}
    )
    target_context: int = field(
        metadata={
            "help": "Context length to extend to, e.g. 8192; RoPE is "
            "stretched (--rope_scaling) by target / pre-trained context."
        }
    )
    original_context: int = field(
        default=0,
        metadata={
            "help": "The context the model was pre-trained at, when its config.json's max_position_embeddings "
            "says more (Mistral-7B-v0.1: 8192, its config says 32768); 0 = config.json's own."
        },
    )
    # YaRN by default: on a base that copies from its context, linear PI broke the copy and YaRN kept it, at the
    # same cost, on every seed (docs/ablations.md, "A base that uses its context").
    rope_scaling: str = field(
        default="yarn",
        metadata={
            "help": "How an unscaled RoPE is stretched to --target_context: yarn (YaRN, arXiv 2309.00071: the "
            "fast-rotating dimensions kept) or linear (position interpolation, LongLoRA's and LongQLoRA's choice). "
            "A model whose RoPE is already scaled (linear, llama3, yarn, longrope) keeps its own type."
        },
    )
    group_ratio: float = field(
        default=0.25,
        metadata={
            "help": "S2-Attn group size as a fraction of the training "
            "length (--target_context, or --pose_window), in "
            "(0, 1] (LongLoRA §3.2 uses 1/4)."
        },
    )
    s2_attention: bool = field(
        default=True,
        metadata={"help": "Train with shifted sparse attention; false trains with full attention (ablation)."},
    )
    s2_shift: str = field(
        default="leakfree",
        metadata={
            "help": "S2-Attn shift: leakfree (ours: half groups at "
            "the ends) or rolled (LongLoRA's original roll, "
            "which wraps around; ablation)."
        },
    )
    s2_sink_tokens: int = field(
        default=0,
        metadata={
            "help": "S2-Attn attention sinks (SinkLoRA): the first N tokens of each document visible to every query."
        },
    )
    s2_full_heads: float = field(
        default=0.0,
        metadata={"help": "Share of attention heads in full causal attention during S2 training, in [0, 1]."},
    )
    s2_full_every: int = field(
        default=0,
        metadata={
            "help": "Train every Nth step with full attention in all heads "
            "and the others with S2-Attn (N >= 2); 0 = never."
        },
    )
    s2_group_schedule: str = field(
        default=DEFAULT_SCHEDULE,
        metadata={
            "help": "S2-Attn group-size schedule: a comma list of multiples of --group_ratio (capped at the training "
            "length) that share the training steps in order; their mean is the attention cost relative to a fixed "
            "group (docs/ablations.md); none = --group_ratio throughout."
        },
    )
    context_parallel: int = field(
        default=1,
        metadata={
            "help": "Split each row over this many launched processes (torchrun/accelerate launch), each holding a "
            "contiguous chunk; S2-Attn's shifted heads borrow half a group of keys/values from the previous rank "
            "(docs/distributed.md). 1 = off."
        },
    )
    # PoSE lives with the model, not the data: it decides which positions RoPE (interpolated to --target_context)
    # sees and how long the rows whose S2 groups are set here are; the data config only says what is packed.
    pose_window: int = field(
        default=0,
        metadata={
            "help": "PoSE (arXiv 2309.10400): train in rows of this many "
            "tokens whose position ids skip so that they span "
            "--target_context; 0 = off (rows of --target_context)."
        },
    )
    pose_chunks: int = field(
        default=2,
        metadata={
            "help": "PoSE: chunks per document; each after the first skips "
            "a random number of positions (the paper uses 2)."
        },
    )
    attn_backend: str = field(
        default="auto", metadata={"help": "Attention kernel: auto, sdpa, flash_attn or xformers."}
    )
    load_in_4bit: bool = field(
        default=True,
        metadata={"help": "Quantize the frozen base to 4-bit NF4 with double quantization (bitsandbytes)."},
    )
    compute_dtype: str = field(
        default="auto",
        metadata={
            "help": "Dtype of activations and 4-bit matmuls: auto (bf16 on an Ampere or newer GPU, fp16 on older "
            "ones, fp32 on a CPU), bfloat16, float16 or float32."
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    lora_target: str = field(
        default="attention",
        metadata={
            "help": "Modules that get LoRA: attention (q/k/v/o "
            "projections), all-linear, or a comma list "
            "of module names."
        },
    )
    trainable_params: str = field(
        default="embed,norm",
        metadata={
            "help": "Modules trained in full and saved with "
            "the adapter (LongLoRA §3.3): comma list "
            "of embed, norm; empty for plain LoRA."
        },
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit) to load."})

    def __post_init__(self):
        def bad(flag, value, fix):
            raise ValueError(f"--{flag} {value!r}: {fix}")

        if self.target_context < 1:
            bad("target_context", self.target_context, "must be a positive number of tokens, e.g. 8192")
        if self.original_context < 0:
            bad("original_context", self.original_context, "must be 0 (config.json's own) or a number of tokens")
        check_scaling(self.rope_scaling)
        if not 0 < self.group_ratio <= 1:
            bad("group_ratio", self.group_ratio, "must be in (0, 1]; LongLoRA uses 0.25")
        check_variant(self.s2_shift, self.s2_sink_tokens, self.s2_full_heads)
        if not self.s2_attention:  # they would be dropped without a word (and recorded as off)
            for option in ("s2_shift", "s2_sink_tokens", "s2_full_heads", "s2_full_every"):
                if getattr(self, option) != self.__dataclass_fields__[option].default:
                    bad(option, getattr(self, option), "an S2-Attn option, and --s2_attention is false; drop one")
        if self.s2_full_every < 0 or self.s2_full_every == 1:
            bad(
                "s2_full_every",
                self.s2_full_every,
                "must be 0 (never) or >= 2; every step in full attention is --s2_attention false",
            )
        try:
            multiples = self.group_schedule
        except ValueError:
            multiples = [0.0]
        if not multiples or not all(m > 0 and math.isfinite(m * self.target_context) for m in multiples):
            bad(
                "s2_group_schedule",
                self.s2_group_schedule,
                f"must be none or a comma list of positive multiples of --group_ratio, e.g. {DEFAULT_SCHEDULE}",
            )
        if self.pose_window < 0 or self.pose_window >= self.target_context:
            bad(
                "pose_window",
                self.pose_window,
                f"must be 0 (off) or a row length below --target_context "
                f"{self.target_context}, e.g. {self.target_context // 4}",
            )
        if self.pose_chunks < 2:
            bad(
                "pose_chunks",
                self.pose_chunks,
                "must be at least 2: the first chunk keeps positions from 0, the others skip",
            )
        if self.pose_window and self.pose_chunks > self.pose_window:
            bad("pose_chunks", self.pose_chunks, f"must be at most --pose_window {self.pose_window}")
        if self.pose_window and self.s2_shift == "rolled":
            bad("s2_shift", self.s2_shift, "LongLoRA's roll knows no position ids; PoSE takes --s2_shift leakfree")
        if self.s2_shift == "rolled" and any(self.target_context % g for g in self.group_sizes):
            bad(
                "s2_group_schedule",
                self.s2_group_schedule,
                f"--s2_shift rolled needs groups that divide "
                f"--target_context {self.target_context}, got {self.group_sizes}; use --s2_group_schedule none",
            )
        self._check_context_parallel(bad)
        if self.lora_r < 1:
            bad("lora_r", self.lora_r, "must be at least 1, e.g. 8")
        if self.lora_alpha <= 0:
            bad(
                "lora_alpha", self.lora_alpha, "must be positive (LoRA's scale is alpha / r; 0 trains nothing), e.g. 16"
            )
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", self.lora_dropout, "must be in [0, 1), e.g. 0.05")
        if self.compute_dtype not in ("auto", *DTYPES):
            bad("compute_dtype", self.compute_dtype, f"must be one of auto, {', '.join(DTYPES)}")
        if self.attn_backend not in ("auto", *hardware.BACKENDS):
            bad("attn_backend", self.attn_backend, f"must be one of auto, {', '.join(hardware.BACKENDS)}")
        unknown = [t for t in self.trainable_tokens if t not in TRAINABLE_TOKENS]
        if unknown:
            bad(
                "trainable_params",
                self.trainable_params,
                f"unknown {', '.join(unknown)}; use a comma list of {', '.join(TRAINABLE_TOKENS)}, or '' for none",
            )
        if not self.lora_target.strip(" ,"):
            bad("lora_target", self.lora_target, "use attention, all-linear or a comma list of module names")

    def _check_context_parallel(self, bad) -> None:
        cp = self.context_parallel
        if cp < 1:
            bad("context_parallel", cp, "must be a number of processes, 1 = off")
        if cp == 1:
            return
        if not self.s2_attention:
            bad("context_parallel", cp, "splits rows for S2-Attn only; drop it or keep --s2_attention true")
        for flag, value in (
            ("pose_window", self.pose_window),
            ("s2_full_every", self.s2_full_every),
            ("s2_full_heads", self.s2_full_heads),
            ("s2_sink_tokens", self.s2_sink_tokens),
        ):
            if value:
                bad(flag, value, f"does not run with --context_parallel {cp} (it needs more than a neighbour's "
                    "keys); set it to 0 or --context_parallel 1")  # fmt: skip
        if self.s2_shift != "leakfree":
            bad("s2_shift", self.s2_shift, f"--context_parallel {cp} takes --s2_shift leakfree")
        chunk, rest = divmod(self.target_context, cp)
        if rest or max(self.group_sizes) > chunk:
            bad(
                "context_parallel",
                cp,
                f"each rank holds --target_context {self.target_context} / {cp} tokens, which must be a whole "
                f"number at least the largest S2 group ({max(self.group_sizes)}); use fewer processes, or "
                "--s2_group_schedule none",
            )

    @property
    def train_length(self) -> int:
        """Tokens per training row: --pose_window with PoSE, else --target_context."""
        return self.pose_window or self.target_context

    @property
    def group_size(self) -> int:
        """The unit the schedule multiplies: group_ratio x the training length, at least 1 (the one group trained
        with --s2_group_schedule none; otherwise `group_sizes` says what trains)."""
        return max(1, int(round(self.group_ratio * self.train_length)))

    @property
    def group_schedule(self) -> list[float]:
        """The parsed `s2_group_schedule`, multiples of group_ratio ([1.0] for none); ValueError on a non-number."""
        if self.s2_group_schedule.strip().lower() in ("", "none"):
            return [1.0]
        return [float(m) for m in self.s2_group_schedule.split(",") if m.strip()]

    @property
    def group_sizes(self) -> list[int]:
        """S2-Attn group sizes in tokens, one per equal share of the training steps (at most the training length:
        with --group_ratio above 1/2 the default schedule's last share is one whole-row group)."""
        return [
            max(1, min(self.train_length, int(round(m * self.group_ratio * self.train_length))))
            for m in self.group_schedule
        ]

    @property
    def trainable_tokens(self) -> list[str]:
        """The parsed `trainable_params` list, e.g. ["embed", "norm"]."""
        return [t.strip() for t in self.trainable_params.split(",") if t.strip()]
