"""Shifted sparse attention (S2-Attn, LongLoRA arXiv 2309.12307 §3.2), leak-free, on transformers' AttentionInterface.

`s2_attention` is the pure op. With group size G, a query at position i sees a key at position j only if j <= i
and both lie in the same segment: floor(p / G) for the first half of the heads, floor((p + G//2) / G) for the
second half (the shifted heads; with an odd head count the second half is the larger one). Nothing wraps around:
LongLoRA's rolled implementation lets the last tokens of the shifted heads attend the first ones; here the first
and last shifted segments are half groups instead, as in LongLoRA's flash-attn varlen code. With `position_ids`
(packed documents) p is the token's index inside its document and no token attends across documents; a document
begins where the ids do not increase, so PoSE's skipping ids (pose.py) keep one document and G-token groups.

`enable_s2_attention` registers the op under the name "longqlora_s2" and switches a model to it: S2 while the
model trains, and the model's own attention, bit for bit, in eval mode or with a KV cache (LongLoRA keeps full
attention at inference). No transformers class is patched.

Variants, for the ablations (bench/ablations.py, docs/ablations.md), all off by default:
- `shift="rolled"`: LongLoRA's original implementation (§3.2: roll the shifted half by -G/2, attend in groups,
  roll back), whose last group mixes the last G/2 tokens with the first G/2: those first tokens attend the future.
- `sink_tokens=k`: attention sinks (SinkLoRA, arXiv 2406.05678): the first k tokens of each document are visible
  to every later query of that document, in every head, whatever its group.
- `full_heads=f`: the first round(f x H) query heads use full causal attention (within each document); S2's two
  halves split the remaining heads.
- schedules, applied between training steps by `set_step_settings` (train.S2ScheduleCallback): a group size that
  changes with training progress, and every Nth step in full attention (all heads full).
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import sys
from dataclasses import dataclass

import torch

from longqlora import hardware, s2_kernels, s2_layout

logger = logging.getLogger(__name__)

IMPLEMENTATION = "longqlora_s2"
SHIFTS = ("leakfree", "rolled")


def check_variant(shift: str = "leakfree", sink_tokens: int = 0, full_heads: float = 0.0) -> None:
    """One-line ValueError naming the flag when an S2 variant setting is invalid."""
    if shift not in SHIFTS:
        raise ValueError(f"--s2_shift {shift!r}: must be one of {', '.join(SHIFTS)}")
    if int(sink_tokens) != sink_tokens or sink_tokens < 0:
        raise ValueError(f"--s2_sink_tokens {sink_tokens}: must be an integer >= 0")
    if not 0 <= full_heads <= 1:
        raise ValueError(f"--s2_full_heads {full_heads}: must be a fraction of the heads in [0, 1]")
    if shift == "rolled" and sink_tokens:
        raise ValueError("--s2_sink_tokens: combine sinks with the leak-free shift only (--s2_shift leakfree)")


def head_split(h: int, full_heads: float) -> list[tuple[int, int, str]]:
    """[(h0, h1, kind)]: kind "full", "plain" (unshifted S2) or "shifted"; the shifted half is the larger one."""
    n_full = int(round(full_heads * h))
    rest = n_full + (h - n_full) // 2
    return [(0, n_full, "full"), (n_full, rest, "plain"), (rest, h, "shifted")]


# --------------------------------------------------------------------------------------------------- the pure op
def s2_attention(query, key, value, group_size: int, *, position_ids=None, attention_mask=None, scale=None,
                 backend: str | None = None, dropout: float = 0.0, shift: str = "leakfree", sink_tokens: int = 0,
                 full_heads: float = 0.0) -> torch.Tensor:
    """Causal S2-Attn. query (B, H, N, D); key/value (B, H_kv, N, D) with H % H_kv == 0; returns (B, H, N, D).

    position_ids: (B, N) or (1, N) token positions; where they do not increase, a new document begins.
    attention_mask: (B, N), 1 = real token, 0 = padding; padding keys are never attended and padded queries
    return zeros. backend: "sdpa", "flash_attn", "xformers", or None/"auto" for the fastest that runs here.
    shift, sink_tokens, full_heads: the variants in the module docstring. Sinks and the rolled shift run on SDPA
    whatever the backend; the rolled shift needs plain positions, no padding and N divisible by G.
    """
    b, h, n, d = query.shape
    if key.shape != value.shape or key.shape[0] != b or key.shape[2] != n or key.shape[3] != d:
        raise ValueError(f"s2_attention: key/value {tuple(key.shape)} do not match query {tuple(query.shape)}")
    h_kv = key.shape[1]
    if h % h_kv:
        raise ValueError(f"s2_attention: {h} query heads are not a multiple of {h_kv} key/value heads")
    group = int(group_size)
    if group < 1:
        raise ValueError(f"s2_attention: group_size must be >= 1, got {group_size}")
    backend = _check_backend(backend, query)
    scale = d ** -0.5 if scale is None else scale
    check_variant(shift, sink_tokens, full_heads)

    rows = s2_layout.build(position_ids, attention_mask, b, n, query.device)  # once per forward, not per layer
    if shift == "rolled" and not (rows.positions is None and rows.valid is None):
        raise ValueError("--s2_shift rolled: LongLoRA's roll knows no documents or padding; use --s2_shift leakfree")
    # (B, N, H, D): the layout transformers' o_proj reads; zeros where padded rows are never written
    out_t = query.new_empty(b, n, h, d) if rows.valid is None else query.new_zeros(b, n, h, d)
    out = out_t.transpose(1, 2)  # (B, H, N, D) view
    n_rep = h // h_kv
    varlen = _varlen_kernel(backend, query, scale, dropout)
    sdpa_gqa = hardware.sdpa_gqa_ok(query.device)
    # With a mask, CUDA's flash kernel is out and its memory-efficient one takes no GQA: repeat the KV heads so that
    # the masked fallbacks do not end on the math kernel (on the CPU SDPA takes both).
    masked_gqa = sdpa_gqa and query.device.type != "cuda"
    for h0, h1, kind in head_split(h, full_heads):
        if h0 == h1:
            continue
        q = query[:, h0:h1]
        step = 0 if kind == "plain" else group // 2
        span = s2_layout.WHOLE if kind == "full" else group  # a full head is one segment per document
        sinks = int(sink_tokens) if kind != "full" else 0
        if kind == "shifted" and shift == "rolled":
            k, v, gqa = s2_kernels.kv_for_heads(key, value, h0, h1, n_rep, allow_gqa=sdpa_gqa)
            s2_kernels.sdpa_rolled(out[:, h0:h1], q, k, v, gqa=gqa, group=group, scale=scale, dropout=dropout)
        elif varlen is not None and not sinks and (backend in ("flash_attn", "xformers") or not rows.grouped):
            # Packed or padded rows (or a forced GPU kernel): every segment one sequence of a varlen kernel, linear
            # in N with no mask and no wasted blocks.
            k, v, gqa = s2_kernels.kv_for_heads(key, value, h0, h1, n_rep, allow_gqa=varlen[1])
            s2_kernels.varlen(out[:, h0:h1], q, k, v, rows.varlen(span, step), kernel=varlen[0], scale=scale,
                              dropout=dropout)
        elif rows.grouped and not sinks:
            k, v, gqa = s2_kernels.kv_for_heads(key, value, h0, h1, n_rep, allow_gqa=sdpa_gqa)
            s2_kernels.sdpa_groups(out[:, h0:h1], q, k, v, gqa=gqa, group=span, shift=step, scale=scale,
                                   dropout=dropout)
        elif kind == "full":
            k, v, gqa = s2_kernels.kv_for_heads(key, value, h0, h1, n_rep, allow_gqa=masked_gqa)
            seg = rows.segments(span, step)  # (B, N)
            same = (seg[:, :, None] == seg[:, None, :]) & rows.mask[:, None, :]
            s2_kernels.sdpa_dense(out[:, h0:h1], q, k, v, same.tril(), gqa=gqa, scale=scale, dropout=dropout)
        else:  # no varlen kernel here (the CPU, or none installed), or attention sinks: O(N x G) masks
            k, v, gqa = s2_kernels.kv_for_heads(key, value, h0, h1, n_rep, allow_gqa=masked_gqa)
            doc, in_doc = rows.documents() if sinks else (None, None)
            s2_kernels.sdpa_banded(out[:, h0:h1], q, k, v, rows.segments(span, step), rows.mask, gqa=gqa,
                                   group=group, scale=scale, dropout=dropout, doc=doc, in_doc=in_doc, sinks=sinks)
    if rows.valid is not None:
        out_t.mul_(rows.valid[:, :, None, None].to(out_t.dtype))
    return out


def _check_backend(backend: str | None, query: torch.Tensor) -> str:
    """The requested backend ("auto" for None), after checking that a forced GPU kernel can take these tensors."""
    if backend in (None, "auto"):
        return "auto"
    choice = hardware.resolve_backend(backend, query.device)
    if choice != "sdpa" and query.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"--attn_backend {choice} needs float16 or bfloat16 tensors, got {query.dtype}; use sdpa")
    return choice


def _varlen_kernel(backend: str, query: torch.Tensor, scale: float, dropout: float) -> tuple[str, bool] | None:
    d = query.shape[-1]
    return varlen_choice(backend, query.device.type, query.dtype, d, abs(scale - d ** -0.5) < 1e-12, dropout)


def varlen_choice(backend: str, device_type: str, dtype: torch.dtype, head_dim: int, default_scale: bool = True,
                  dropout: float = 0.0) -> tuple[str, bool] | None:
    """(kernel, takes GQA natively) for rows that are packed or padded, or None for the SDPA fallbacks.

    auto prefers flash-attn's varlen kernel, then PyTorch's own (torch.nn.attention.varlen: the same flash kernel,
    sm_80+), then xformers (which runs on a V100); sdpa takes PyTorch's own where it runs; a forced flash_attn or
    xformers is used for every row. Needs 16-bit CUDA tensors; head dims up to 256.
    """
    if device_type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return None
    if backend in ("flash_attn", "xformers"):
        return backend, backend == "flash_attn"
    for name in ("flash_attn", "torch", "xformers") if backend == "auto" else ("torch",):
        if name == "flash_attn" and hardware.flash_attn_module() is not None and head_dim <= 256:
            return name, True
        features = hardware.torch_varlen() if name == "torch" else None
        if features is not None and head_dim <= 256 and head_dim % 8 == 0 and not dropout and \
                (features["scale"] or default_scale):
            return name, features["enable_gqa"]
        if name == "xformers" and hardware.xformers_ops() is not None:
            return name, False
    return None


# ------------------------------------------------------------------------------------ transformers integration
@dataclass
class S2Settings:
    """What `enable_s2_attention` attached to each attention module of one model."""

    group_size: int
    backend: str | None
    base: str  # the model's own attention implementation, used in eval mode and with a KV cache
    use_cache: bool | None  # the config's use_cache before enabling, restored by disable
    shift: str = "leakfree"  # the variants of s2_attention
    sink_tokens: int = 0
    full_heads: float = 0.0


# The mask form the current forward needs, set by a pre-hook on the model: True = S2 (2-D padding mask),
# False or unset = the base implementation's own mask.
_S2_MASKS = contextvars.ContextVar("longqlora_s2_masks", default=None)


def _mask_function(*args, **kwargs):
    """Mask interface entry for "longqlora_s2": the 2-D padding mask for S2 forwards, else the base model's mask."""
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        flash_attention_mask,
        sdpa_mask,
    )

    s2, base = _S2_MASKS.get() or (False, "sdpa")
    if s2:
        return flash_attention_mask(*args, **kwargs)
    return ALL_MASK_ATTENTION_FUNCTIONS.get(base, sdpa_mask)(*args, **kwargs)


def _attention_function(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface entry for "longqlora_s2"; returns ((B, N, H, D), None) like transformers' own."""
    settings: S2Settings | None = getattr(module, "_longqlora_s2", None)
    if settings is None:
        raise RuntimeError(f"{type(module).__name__} uses attention '{IMPLEMENTATION}' but was not set up by "
                           "longqlora.attention.enable_s2_attention; call it on the model")
    if module.training and not kwargs.get("use_cache") and query.shape[2] == key.shape[2]:
        out = s2_attention(query, key, value, settings.group_size, position_ids=kwargs.get("position_ids"),
                           attention_mask=_padding_mask(attention_mask), scale=scaling, backend=settings.backend,
                           dropout=dropout, shift=settings.shift, sink_tokens=settings.sink_tokens,
                           full_heads=settings.full_heads)
        return out.transpose(1, 2), None
    if attention_mask is not None and attention_mask.ndim == 2:
        raise RuntimeError("longqlora_s2: full attention got an S2 padding mask; call the model itself (its forward "
                           "hook chooses the mask), not an inner module")
    return _base_function(settings.base, module)(module, query, key, value, attention_mask, scaling=scaling,
                                                 dropout=dropout, **kwargs)


def _padding_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, N) key padding from the mask the model built: 2-D already, or the diagonal of a 4-D causal mask."""
    if mask is None or mask.ndim == 2:
        return mask
    diagonal = torch.diagonal(mask[:, 0], dim1=-2, dim2=-1)  # a real token always sees itself
    return diagonal if diagonal.dtype == torch.bool else diagonal == 0


def _base_function(base: str, module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "eager":  # every modeling file defines its own eager_attention_forward
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, _attention_function)
    AttentionMaskInterface.register(IMPLEMENTATION, _mask_function)


def _hf_model(model):
    """The transformers model inside a PEFT wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _attention_modules(model):
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "is_causal")]


def _pre_hook(module, args, kwargs):
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(module.config, "use_cache", False)
    s2 = module.training and not use_cache and kwargs.get("past_key_values") is None
    module._longqlora_s2_token = _S2_MASKS.set((s2, module._longqlora_s2_base))


def _post_hook(module, args, kwargs, output):
    token = module.__dict__.pop("_longqlora_s2_token", None)
    if token is not None:
        _S2_MASKS.reset(token)


def enable_s2_attention(model, group_size: int, *, backend: str | None = None, shift: str = "leakfree",
                        sink_tokens: int = 0, full_heads: float = 0.0):
    """Switch `model` (a transformers decoder with RoPE, or a PEFT wrapper of one) to S2-Attn for training.

    S2 runs while `model.training` is true and no KV cache is used; otherwise the model's previous attention
    implementation runs unchanged. Sets `config.use_cache = False` (generation still caches), restored by
    `disable_s2_attention`. shift, sink_tokens, full_heads: the variants in the module docstring. Returns the model.
    """
    from transformers import PreTrainedModel

    hf = _hf_model(model)
    if int(group_size) < 1:
        raise ValueError(f"--group_size must be a positive integer, got {group_size}")
    check_variant(shift, sink_tokens, full_heads)
    if backend not in (None, "auto"):
        problem = hardware.backend_problem(backend)
        if problem:
            raise ValueError(problem)
    config = hf.config
    if not (getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None)):
        raise ValueError(f"{type(hf).__name__} has no rotary position embeddings; S2-Attn extends RoPE decoders "
                         "(Llama, Mistral, Qwen2, ...)")
    if not getattr(hf, "_supports_attention_backend", False):
        raise ValueError(f"{type(hf).__name__} does not run its attention through transformers' AttentionInterface;"
                         " S2-Attn cannot be enabled for it")
    modules = _attention_modules(hf)
    if not modules:
        raise ValueError(f"{type(hf).__name__}: no attention modules found (nothing has layer_idx and is_causal)")
    current = modules[0].__dict__.get("_longqlora_s2")
    base = current.base if current else config._attn_implementation
    use_cache = current.use_cache if current else getattr(config, "use_cache", None)
    settings = S2Settings(group_size=int(group_size), backend=backend, base=base, use_cache=use_cache, shift=shift,
                          sink_tokens=int(sink_tokens), full_heads=float(full_heads))
    _register()
    for m in modules:
        m._longqlora_s2 = settings
    if not current:
        for m in hf.modules():
            if isinstance(m, PreTrainedModel):
                m._longqlora_s2_base = base
                m._longqlora_s2_hooks = (m.register_forward_pre_hook(_pre_hook, with_kwargs=True),
                                         m.register_forward_hook(_post_hook, with_kwargs=True, always_call=True))
    hf.set_attn_implementation(IMPLEMENTATION)
    config.use_cache = False
    logger.info("S2-Attn on: group size %d, backend %s, shift %s, %d sink tokens, %.0f%% full heads; full attention "
                "(%s) in eval mode", settings.group_size, backend or "auto", shift, settings.sink_tokens,
                100 * settings.full_heads, base)
    return model


def disable_s2_attention(model):
    """Undo `enable_s2_attention`: the model's previous attention implementation and use_cache come back."""
    hf = _hf_model(model)
    modules = _attention_modules(hf)
    settings = modules[0].__dict__.get("_longqlora_s2") if modules else None
    if settings is None:
        return model
    for m in modules:
        del m._longqlora_s2
    for m in hf.modules():
        hooks = m.__dict__.pop("_longqlora_s2_hooks", None)
        if hooks:
            for handle in hooks:
                handle.remove()
            del m._longqlora_s2_base
    hf.set_attn_implementation(settings.base)
    hf.config.use_cache = settings.use_cache
    return model


def step_settings(step: int, max_steps: int, group_sizes: list[int], full_every: int = 0,
                  full_heads: float = 0.0) -> tuple[int, float]:
    """(group size, full-head share) for 0-based training step `step` of `max_steps`.

    The group sizes share the steps in order, in equal parts; with full_every = N, the last step of every N runs
    all heads in full attention (share 1.0), the others keep `full_heads`.
    """
    part = min(len(group_sizes) - 1, step * len(group_sizes) // max(1, max_steps))
    full = 1.0 if full_every and (step + 1) % full_every == 0 else full_heads
    return group_sizes[part], full


def set_step_settings(model, group_size: int, full_heads: float) -> None:
    """Change the group size and full-head share of an S2-enabled model, e.g. between training steps."""
    check_variant(full_heads=full_heads)
    for m in _attention_modules(_hf_model(model)):
        m._longqlora_s2 = dataclasses.replace(m._longqlora_s2, group_size=int(group_size), full_heads=full_heads)


def s2_enabled(model) -> bool:
    """True when `enable_s2_attention` is in effect on `model`."""
    modules = _attention_modules(_hf_model(model))
    return bool(modules) and "_longqlora_s2" in modules[0].__dict__
