"""Shifted sparse attention (S2-Attn, LongLoRA arXiv 2309.12307 §3.2): the op (op.py), its kernels (kernels.py) on
the row layout of packed documents (layout.py), its registration with transformers (integration.py), the group
schedules between steps (schedule.py) and the variants kept for ablations (experimental.py).

The user-facing functions are re-exported here: `from longqlora.attention import enable_s2_attention`.
"""

from longqlora.attention.integration import disable_s2_attention, enable_s2_attention, s2_enabled
from longqlora.attention.op import s2_attention

__all__ = ["disable_s2_attention", "enable_s2_attention", "s2_attention", "s2_enabled"]
