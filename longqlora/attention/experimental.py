"""S2-Attn variants kept for the ablations and for comparison with LongLoRA, off by default; all validated here,
and the rolled shift's kernel (sinks and full heads are options of the banded kernel and of the op's head split).

- `shift="rolled"`: LongLoRA's original implementation (§3.2: roll the shifted half by -G/2, attend in groups,
  roll back), whose last group mixes the last G/2 tokens with the first G/2: those first tokens attend the future.
- `sink_tokens=k`: attention sinks (SinkLoRA, arXiv 2406.05678): the first k tokens of each document are visible
  to every later query of that document, in every head, whatever its group.
- `full_heads=f`: the first round(f x H) query heads use full causal attention (within each document); S2's two
  halves split the remaining heads.

What the ablations measured (docs/ablations.md, "What does not close it"): 4 attention sinks and a quarter of
the heads in full attention are inside the seed spread of plain S2-Attn; LongLoRA's rolled shift is within the
spread of the leak-free one (which also never lets a token see the future). None of them is a default; the
schedules (schedule.py) are what pays.
"""

from __future__ import annotations

from longqlora.attention.kernels import sdpa_groups

SHIFTS = ("leakfree", "rolled")


def check_variant(shift: str = "leakfree", sink_tokens: int = 0, full_heads: float = 0.0) -> None:
    """The one check of the variant settings (ModelConfig, enable_s2_attention, the schedule and the op call it):
    a ValueError line naming the flag and the fix."""
    if shift not in SHIFTS:
        raise ValueError(f"--s2_shift {shift!r}: must be leakfree or rolled")
    if int(sink_tokens) != sink_tokens or sink_tokens < 0:
        raise ValueError(f"--s2_sink_tokens {sink_tokens}: must be >= 0 (a whole number of tokens)")
    if not 0 <= full_heads <= 1:
        raise ValueError(f"--s2_full_heads {full_heads}: must be a share of the heads in [0, 1]")
    if shift == "rolled" and sink_tokens:
        raise ValueError(f"--s2_sink_tokens {sink_tokens}: sinks combine with --s2_shift leakfree only")


def check_group_size(group_size) -> int:
    """The S2-Attn group size as an int (enable_s2_attention, the schedule and the op call it): a whole number of
    tokens, at least 1; a float or bool is refused, not truncated (64.9 ran as 64 before)."""
    if isinstance(group_size, bool) or not hasattr(group_size, "__index__"):
        raise TypeError(f"S2-Attn group size {group_size!r}: must be an int, a number of tokens (--group_ratio)")
    if group_size < 1:
        raise ValueError(f"S2-Attn group size {group_size}: must be a positive number of tokens (--group_ratio)")
    return int(group_size)


def sdpa_rolled(out, q, k, v, *, gqa: bool, group: int, scale, dropout: float) -> None:
    """LongLoRA's rolled shift: roll by -G/2 along N, causal attention in groups of G, roll back by +G/2.

    Needs N % G == 0 (as LongLoRA does). The tokens rolled to the end (the first G/2) share the last group with the
    last G/2 tokens, come after them in rolled order and therefore attend them: the future leaks into the start.
    """
    n = q.shape[2]
    if n % group:
        raise ValueError(f"--s2_shift rolled needs a sequence length divisible by the group size {group}, got {n}")
    shift = group // 2
    rolled = q.new_empty(q.shape)
    sdpa_groups(
        rolled,
        q.roll(-shift, 2),
        k.roll(-shift, 2),
        v.roll(-shift, 2),
        gqa=gqa,
        group=group,
        shift=0,
        scale=scale,
        dropout=dropout,
    )
    out.copy_(rolled.roll(shift, 2))
