"""What an optimizer keeps per trained parameter, for the memory planner (training/plan.py): any TrainingArguments
--optim name, or the planner's short aliases."""

from __future__ import annotations

# The planner's short optimizer names (bench/memory.py's, `longqlora plan`'s default); any TrainingArguments --optim
# name is planned too (optimizer_state_bytes).
OPTIMIZER_ALIASES = {"paged_adamw": "paged_adamw_32bit", "adamw": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit"}
# torch's foreach optimizers, whose step allocates one fp32 copy of every trained tensor (seen on an H200, AdamW)
FOREACH_TEMPORARIES = {"adamw_torch", "adamw_torch_fused", "rmsprop", "adagrad"}


def optimizer_name(optim) -> str:
    """The TrainingArguments name of --optim (an OptimizerNames member, a name, or one of the short aliases)."""
    name = str(getattr(optim, "value", optim))
    return OPTIMIZER_ALIASES.get(name, name)


def optimizer_names() -> set[str]:
    from transformers.training_args import OptimizerNames  # imported late: `longqlora plan` needs no model code

    return {o.value for o in OptimizerNames}


def optimizer_state_bytes(optim) -> float:
    """Optimizer state per trained parameter: the moments it keeps (AdamW 2, AdEMAMix 3, Lion, RMSprop, Adagrad and
    schedule-free SGD 1; SGD without momentum, LOMO and Adafactor's factored moments about 0) times the bytes of
    each (32-bit 4; blockwise 8-bit 1 + an fp32 absmax per 256 values; torchao's 4-bit 0.5 + one per 128). GaLore and
    APOLLO keep less than AdamW's (projected states): planned as AdamW, an upper bound."""
    name = optimizer_name(optim)
    if name in ("sgd", "lomo", "adalomo") or "adafactor" in name:
        moments = 0
    elif "ademamix" in name:
        moments = 3
    elif any(k in name for k in ("lion", "rmsprop", "adagrad", "schedule_free_sgd")):
        moments = 1
    else:
        moments = 2
    per_moment = 0.5 + 4 / 128 if "4bit" in name else 1 + 4 / 256 if "8bit" in name else 4
    return moments * per_moment
