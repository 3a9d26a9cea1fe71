"""The training flags of a recipe: TRL's SFTConfig with this toolkit's defaults and memory switches, and the run
switches (--tiny, --dry_run)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from transformers.trainer_utils import IntervalStrategy
from trl import SFTConfig

from longqlora.data.formats import read_template_file
from longqlora.training import memory


def refuse_trainer_engine(training) -> None:
    """The Trainer's own --deepspeed/--fsdp: refused in one line; the engine comes from `accelerate launch`, whose
    config this toolkit reads before the model loads (hardware.launch)."""
    for flag in ("deepspeed", "fsdp"):
        if getattr(training, flag, None):
            raise ValueError(
                f"--{flag}: set the engine with accelerate launch instead (configs/accelerate/fsdp2_qlora.yaml or "
                "deepspeed_zero3.yaml), which this toolkit reads before it loads the model"
            )


@dataclass
class TrainingConfig(SFTConfig):
    """TRL's SFTConfig with this toolkit's defaults: packed rows of the target context, non-reentrant gradient
    checkpointing, a checkpoint every `save_steps`, and a log line every step. Precision (fp16/bf16) follows
    `--compute_dtype`; `max_length` follows `--target_context` (`--pose_window` with PoSE)."""

    # The annotations repeat TrainingArguments' exactly: HfArgumentParser builds the flags from them.
    output_dir: str | None = field(default="out/run", metadata={"help": "Where checkpoints and the final adapter go."})
    packing: bool = True
    # set by the run; None tells an explicit false from the default (nargs/const: a bare flag, as for any bool)
    assistant_only_loss: bool | None = field(default=None, metadata={"nargs": "?", "const": True})
    # On by default and non-reentrant, under transformers 5's names; the deprecated names still turn it off or set
    # its kwargs (__post_init__), without the warning transformers gives whenever only an old name is set.
    activation_checkpointing: bool | None = True
    activation_checkpointing_kwargs: dict[str, Any] | str | None = field(
        default_factory=lambda: {"use_reentrant": False}
    )
    gradient_checkpointing: bool | None = True
    gradient_checkpointing_kwargs: dict[str, Any] | str | None = None
    logging_steps: float = 1
    chat_template_path: str | None = field(
        default=None,
        metadata={
            "help": "A .jinja or .j2 file holding the chat template conversations train with, each reply in "
            "{%% generation %%}...{%% endgeneration %%} (a tokenizer's path, TRL's other form, is not taken)."
        },
    )
    # --eval_dataset rows are as long as the training rows: one at a time, and only their loss is kept (the Trainer
    # would gather every batch's tokens x vocabulary logits)
    per_device_eval_batch_size: int = 1
    eval_max_rows: int | None = field(
        default=None,
        metadata={
            "help": "Score the first N packed rows (each --target_context tokens) of --eval_dataset at each "
            "evaluation (default: every row)."
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "auto: continue from the last complete checkpoint in --output_dir (half-written ones are skipped "
            "with a warning), or a checkpoint-N folder; the run's settings must be those it was started with."
        },
    )
    # None: the run decides (held_out.evaluation_settings): an explicit `--eval_strategy no` is told from the default
    eval_strategy: IntervalStrategy | str | None = field(
        default=None,
        metadata={
            "help": "When to evaluate --eval_dataset: steps (every --eval_steps), epoch, or no; default steps with "
            "--eval_dataset, else no."
        },
    )
    eval_steps: float | None = field(
        default=None,
        metadata={
            "help": "Evaluate --eval_dataset every this many steps (a ratio of the run below 1); default --save_steps."
        },
    )
    prediction_loss_only: bool = True
    save_steps: float = 100
    save_total_limit: int | None = 3
    report_to: None | str | list[str] = "none"
    include_num_input_tokens_seen: str | bool = True  # "all"; the parser reads this union as a bool
    bf16: bool | None = False  # set from --compute_dtype (TRL would default it on, failing on machines without)
    # Long-context memory switches (longqlora.training.memory); `python -m longqlora plan` shows what each one saves.
    offload_activations: str = field(
        default="auto",
        metadata={
            "help": "Checkpointed hidden states to pinned host memory, copied on a side stream (TRL's offloading): "
            "auto (only tensors of at least --offload_min_tokens tokens, so short batches keep plain "
            "checkpointing), on, or off."
        },
    )
    offload_min_tokens: int = field(
        default=8192,
        metadata={"help": "Smallest batch (tokens) whose checkpoints --offload_activations auto moves to the host."},
    )
    offload_layers: int | None = field(
        default=None,
        metadata={
            "help": "Offload only the first N decoder layers' checkpoints; the rest stay on the GPU (for when the "
            "host cannot pin them all: `python -m longqlora plan --host_memory GIB` says N). Default: all."
        },
    )
    chunked_loss: bool = field(
        default=True,
        metadata={
            "help": "TRL's fused LM head: the loss in tiles, never the "
            "(tokens x vocab) logits; false computes it from "
            "full fp32 logits (comparison only)."
        },
    )
    tiled_mlp: str = field(
        default="auto",
        metadata={
            "help": "Run the MLPs in sequence tiles of --tiled_mlp_tokens "
            "(one tile's intermediates at a time): auto (batches "
            "of 4 tiles or more), on, or off."
        },
    )
    tiled_mlp_tokens: int = field(default=16384, metadata={"help": "Tokens per MLP tile."})
    recompute_norms: bool = field(
        default=True,
        metadata={
            "help": "Norms keep only their input for the backward "
            "and recompute themselves there (not an fp32 "
            "copy and their output); false: Llama's own."
        },
    )
    recompute_lora_dropout: bool = field(
        default=True,
        metadata={
            "help": "LoRA's dropout is redrawn in the backward "
            "instead of keeping a dropped copy and "
            "mask of every adapted input."
        },
    )

    def __post_init__(self):
        refuse_trainer_engine(self)  # before TrainingArguments reads the file (its error named no fix)
        if self.gradient_checkpointing is False:  # --no_gradient_checkpointing (deprecated name)
            self.activation_checkpointing = False
        if self.gradient_checkpointing_kwargs is not None:
            self.activation_checkpointing_kwargs = self.gradient_checkpointing_kwargs
        if getattr(self.eval_strategy, "value", self.eval_strategy) == "steps" and self.eval_steps is None:
            self.eval_steps = self.save_steps  # transformers would fill it with --logging_steps
        asked, self.eval_strategy = self.eval_strategy, self.eval_strategy or "no"
        super().__post_init__()
        if asked is None:
            self.eval_strategy = None  # until the run knows whether there is an --eval_dataset
        kwargs = self.activation_checkpointing_kwargs
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ValueError(
                f"--activation_checkpointing_kwargs (--gradient_checkpointing_kwargs) {kwargs!r}: must be a JSON "
                "object, e.g. '{\"use_reentrant\": false}'"
            )
        _check_reporting(self.report_to)
        memory.offload_threshold_bytes(self.offload_activations, 1, 1, 1)  # raises naming the flag
        memory.tiled_mlp_active(self.tiled_mlp, 0, 1)
        for flag in ("offload_min_tokens", "tiled_mlp_tokens"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag} {getattr(self, flag)}: must be a positive number of tokens")
        check_offload_layers(self.offload_layers)
        if self.offload_layers is not None and self.offload_activations == "off":  # as `plan` refuses it
            raise ValueError(
                f"--offload_layers {self.offload_layers}: splits the offloaded checkpoints, and --offload_activations "
                "is off; drop one of them"
            )
        _check_numbers(self)
        if self.use_liger_kernel:  # it replaces the model's forward and loss, which S2-Attn and the chunked loss own
            raise ValueError("--use_liger_kernel: not supported with S2-Attn and the chunked loss; drop it")
        if self.chat_template_path:  # a file TRL reads, checked before the data (its markers: prepare_dataset)
            read_template_file(self.chat_template_path)

    @property
    def optim_name(self) -> str:
        """--optim as typed (TrainingArguments turns it into an enum whose str() is the enum's name)."""
        return str(getattr(self.optim, "value", self.optim))

    @property
    def tiled_mlp_min_tokens(self) -> int:
        """Smallest batch (tokens) whose MLPs run tiled: any with --tiled_mlp on, 4 tiles or more with auto."""
        return 0 if self.tiled_mlp == "on" else 4 * self.tiled_mlp_tokens


@dataclass
class RunConfig:
    """Switches of a recipe run that are neither model, data nor optimiser settings."""

    tiny: bool = field(
        default=False,
        metadata={
            "help": "Run this very recipe end to end on CPU on a tiny random "
            "Llama (kept under <output_dir>/tiny-base) and bundled text."
        },
    )
    dry_run: bool = field(
        default=False,
        metadata={
            "help": "Print the resolved configuration and exit before loading weights (with --tiny, after writing "
            "the tiny model it plans)."
        },
    )


def recipe_default(config, name: str):
    """The default of `config`'s field `name`: the recipe's value (its dataclass defaults are the recipe), which a
    value that differs from was set by the user."""
    (found,) = [f for f in dataclasses.fields(config) if f.name == name]
    return found.default


def check_offload_layers(value: int | None) -> None:
    """--offload_layers: unset (every layer) or a number of decoder layers (training and the memory bench)."""
    if value is not None and value < 0:
        raise ValueError(f"--offload_layers {value}: must be 0 or more decoder layers (unset: all)")


def _check_numbers(training) -> None:
    """TrainingArguments' numbers that transformers takes without a check, to fail later (a division by zero, a
    seed refused after the data loaded) or to train wrong (a negative learning rate ascends the loss, a negative
    weight decay grows the weights, --save_steps 0 saves no checkpoint to resume from)."""
    rules = [
        ("learning_rate", training.learning_rate >= 0, "must be 0 or more (0 measures without training), e.g. 2e-4"),
        ("per_device_train_batch_size", training.per_device_train_batch_size >= 1, "must be at least 1"),
        ("gradient_accumulation_steps", training.gradient_accumulation_steps >= 1, "must be at least 1"),
        ("weight_decay", training.weight_decay >= 0, "must be 0 or more"),
        ("seed", 0 <= training.seed < 2**32, "must be in [0, 2**32)"),
        ("eval_max_rows", training.eval_max_rows is None or training.eval_max_rows >= 1, "must be at least 1"),
    ]
    if str(getattr(training.save_strategy, "value", training.save_strategy)) == "steps":
        rules.append(("save_steps", training.save_steps > 0, "must be positive (or --save_strategy no)"))
    for flag, ok, fix in rules:
        if not ok:
            raise ValueError(f"--{flag} {getattr(training, flag)}: {fix}")


def _check_reporting(report_to) -> None:
    """Every --report_to integration is installed: the Trainer would fail only after the weights load."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    available = set(get_available_reporting_integrations())
    for name in report_to or ():
        if name in INTEGRATION_TO_CALLBACK and name not in available:
            raise ValueError(f"--report_to {name}: its package is not installed; pip install it, or --report_to none")


# SFTConfig and TrainingArguments flags a run sets itself, or that would do other than the run says: refused
# explicit (a recipe's parser takes every SFTConfig flag)
_RUN_SETS = {
    "packing": "a run sets it from --pack",
    "packing_strategy": "a run sets it from --pack",
    "padding_free": "a run sets it from --pack (documents and conversations pack without padding)",
    "assistant_only_loss": "conversations train on the replies only, text on every token",
    "completion_only_loss": "conversations train on the replies only, text on every token",
    "dataset_kwargs": "a run prepares its data itself, cut and packed to --target_context",
    "dataset_text_field": "a text --dataset names its field with --text_field",
    "activation_offloading": "the toolkit offloads with --offload_activations (auto, on or off)",
    "load_best_model_at_end": "the adapter a run writes, and its record, are of the last step; evaluate or merge the "
    "checkpoint-N whose trainer_state.json shows the best eval_loss",
    "model_init_kwargs": "the model loads from the recipe's flags (--compute_dtype, --load_in_4bit, --attn_backend)",
    "push_to_hub": "the Trainer would push its checkpoints, not the adapter and record the run writes itself; upload "
    "--output_dir when it is done (hf upload)",
}


# What a recipe's --help says of each SFTConfig flag it refuses (cli.group_the_help): the reasons above, and those
# of the flags refused elsewhere (refuse_trainer_engine, __post_init__, run.resolve)
REFUSED_HELP = {
    **_RUN_SETS,
    "deepspeed": "the engine comes from accelerate launch (configs/accelerate/)",
    "fsdp": "the engine comes from accelerate launch (configs/accelerate/)",
    "use_liger_kernel": "it replaces the forward and loss that S2-Attn and the chunked loss own",
    "max_length": "a run trains rows of --target_context tokens (--pose_window with PoSE)",
    "bf16": "the precision follows --compute_dtype (taken only when it agrees with it)",
    "fp16": "the precision follows --compute_dtype (taken only when it agrees with it)",
}


def refuse_flags_the_run_sets(training: TrainingConfig, text_data: bool, compute_dtype: str) -> None:
    """One line for an SFTConfig flag set on the command line that the run would overrule or that would train
    other than the run reports, before any weights load (several were refused by TRL after loading, or not at all)."""
    for name, why in _RUN_SETS.items():
        if getattr(training, name) != recipe_default(training, name):
            raise ValueError(f"--{name} {getattr(training, name)}: {why}; drop --{name}")
    if training.include_num_input_tokens_seen in ("no", False):
        raise ValueError(
            "--include_num_input_tokens_seen no: the run's tokens/s and its record count the tokens with it; drop it"
        )
    for flag, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        if getattr(training, flag) and compute_dtype != dtype:
            raise ValueError(
                f"--{flag} true: the precision follows --compute_dtype ({compute_dtype} here); pass --compute_dtype "
                f"{dtype} and drop --{flag}"
            )
    if text_data and training.chat_template_path:
        raise ValueError(
            f"--chat_template_path {training.chat_template_path}: text data trains no conversations; drop it"
        )
