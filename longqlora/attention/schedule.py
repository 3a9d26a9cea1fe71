"""S2-Attn schedules between training steps (--s2_group_schedule, --s2_full_every; docs/ablations.md "Default"):
a group size that changes with training progress, and every Nth step in full attention."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from transformers import TrainerCallback

from longqlora.attention.experimental import check_group_size, check_variant
from longqlora.attention.integration import _attention_modules, _hf_model

if TYPE_CHECKING:
    from longqlora.model import ModelConfig

logger = logging.getLogger(__name__)


def step_settings(
    step: int, max_steps: int, group_sizes: list[int], full_every: int = 0, full_heads: float = 0.0
) -> tuple[int, float]:
    """(group size, full-head share) for 0-based training step `step` of `max_steps`.

    The group sizes share the steps in order, in equal parts; with full_every = N, the last step of every N runs
    all heads in full attention (share 1.0), the others keep `full_heads`.
    """
    part = min(len(group_sizes) - 1, step * len(group_sizes) // max(1, max_steps))
    full = 1.0 if full_every and (step + 1) % full_every == 0 else full_heads
    return group_sizes[part], full


def set_step_settings(model, group_size: int, full_heads: float) -> None:
    """Change the group size and full-head share of an S2-enabled model, e.g. between training steps."""
    group_size = check_group_size(group_size)
    check_variant(full_heads=full_heads)
    modules = _attention_modules(_hf_model(model))
    if not modules or any(getattr(m, "_longqlora_s2", None) is None for m in modules):
        raise ValueError("set_step_settings: S2-Attn is not on for this model; call enable_s2_attention first")
    for m in modules:
        m._longqlora_s2 = dataclasses.replace(m._longqlora_s2, group_size=group_size, full_heads=full_heads)


def s2_schedule_callbacks(model_cfg: ModelConfig) -> list:
    """[S2ScheduleCallback] when S2-Attn trains with a group schedule or full-attention steps, else []."""
    scheduled = len(model_cfg.group_sizes) > 1 or model_cfg.s2_full_every
    return [S2ScheduleCallback(model_cfg)] if model_cfg.s2_attention and scheduled else []


class S2ScheduleCallback(TrainerCallback):
    """S2-Attn schedules (--s2_group_schedule, --s2_full_every; ablations in docs/ablations.md): sets each step's
    group size and full-attention share before its forward, from the step count, so a resumed run continues them."""

    def __init__(self, model_cfg: ModelConfig):
        self.cfg, self._current = model_cfg, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        now = step_settings(
            state.global_step, state.max_steps, self.cfg.group_sizes, self.cfg.s2_full_every, self.cfg.s2_full_heads
        )
        if now != self._current:
            set_step_settings(model, *now)
            # a new group size is news (a few per run); --s2_full_every alternates the heads every step
            log = logger.info if self._current is None or now[0] != self._current[0] else logger.debug
            log("step %d: S2 group size %d, %.0f%% of heads full", state.global_step, now[0], 100 * now[1])
            self._current = now
