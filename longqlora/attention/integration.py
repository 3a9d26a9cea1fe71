"""S2-Attn on transformers' AttentionInterface.

`enable_s2_attention` registers the op under the name "longqlora_s2" and switches a model to it: S2 while the
model trains, and the model's own attention, bit for bit, in eval mode or with a KV cache (LongLoRA keeps full
attention at inference). No transformers class is patched.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from dataclasses import dataclass

import torch

from longqlora import hardware
from longqlora.attention.experimental import check_group_size, check_variant
from longqlora.attention.op import s2_attention

logger = logging.getLogger(__name__)

IMPLEMENTATION = "longqlora_s2"


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
    context_parallel: object = None  # context_parallel.CPGroup when each rank holds a chunk of every row


# The model forwards in flight, innermost last, each (model, (s2, base)) as its pre-hook chose its mask form: s2 =
# S2's 2-D padding mask, else the base implementation `base`'s own. Per context (thread): one model may run in
# several threads at once.
_S2_FORWARDS = contextvars.ContextVar("longqlora_s2_forwards", default=())


def _decided() -> tuple[bool, str] | None:
    """The innermost forward's (s2, base), None outside a hooked forward."""
    forwards = _S2_FORWARDS.get()
    return forwards[-1][1] if forwards else None


def _mask_function(*args, **kwargs):
    """Mask interface entry for "longqlora_s2": the 2-D padding mask for S2 forwards, else the base model's mask."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask, sdpa_mask

    s2, base = _decided() or (False, "sdpa")
    if s2:
        return flash_attention_mask(*args, **kwargs)
    return ALL_MASK_ATTENTION_FUNCTIONS.get(base, sdpa_mask)(*args, **kwargs)


def _attention_function(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface entry for "longqlora_s2"; returns ((B, N, H, D), None) like transformers' own."""
    settings: S2Settings | None = getattr(module, "_longqlora_s2", None)
    if settings is None:
        raise RuntimeError(
            f"{type(module).__name__} uses attention '{IMPLEMENTATION}' but was not set up by "
            "longqlora.attention.enable_s2_attention: call it on this model, or, if its config object is shared with "
            "a model it was called on, give each model its own (copy.deepcopy(config))"
        )
    cp = settings.context_parallel
    s2 = module.training and not kwargs.get("use_cache") and query.shape[2] == key.shape[2]
    decided = _decided()  # the model's pre-hook chose this forward's mask; the op follows the same choice
    if decided is not None:  # (it also sees a cache object passed without use_cache, which never reaches here)
        s2 = s2 and decided[0]
    if cp is not None:
        if not s2:
            raise RuntimeError(
                "context parallel: this model holds one chunk of each row and trains with S2-Attn only; evaluate "
                "or generate with a model loaded in one process"
            )
        from longqlora.attention.context_parallel import cp_attention

        out = cp_attention(
            query,
            key,
            value,
            settings.group_size,
            cp,
            position_ids=kwargs.get("position_ids"),
            attention_mask=_padding_mask(attention_mask),
            scale=scaling,
            backend=settings.backend,
            dropout=dropout,
        )
        return out.transpose(1, 2), None
    if s2:
        out = s2_attention(
            query,
            key,
            value,
            settings.group_size,
            position_ids=kwargs.get("position_ids"),
            attention_mask=_padding_mask(attention_mask),
            scale=scaling,
            backend=settings.backend,
            dropout=dropout,
            shift=settings.shift,
            sink_tokens=settings.sink_tokens,
            full_heads=settings.full_heads,
        )
        return out.transpose(1, 2), None
    if attention_mask is not None and attention_mask.ndim == 2:
        raise RuntimeError(
            "longqlora_s2: full attention got an S2 padding mask; call the model itself (its forward "
            "hook chooses the mask), not an inner module"
        )
    return _base_function(settings.base, module)(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )


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
    _S2_FORWARDS.set((*_S2_FORWARDS.get(), (module, (s2, module._longqlora_s2_base))))


def _post_hook(module, args, kwargs, output):
    forwards = _S2_FORWARDS.get()  # the hooks of one context nest: this forward is the innermost
    if forwards and forwards[-1][0] is module:  # else its pre-hook never ran (another pre-hook raised before it)
        _S2_FORWARDS.set(forwards[:-1])


def enable_s2_attention(
    model,
    group_size: int,
    *,
    backend: str | None = None,
    shift: str = "leakfree",
    sink_tokens: int = 0,
    full_heads: float = 0.0,
    context_parallel=None,
):
    """Switch `model` (a transformers decoder with RoPE, or a PEFT wrapper of one) to S2-Attn for training.

    S2 runs while `model.training` is true and no KV cache is used; otherwise the model's previous attention
    implementation runs unchanged. Sets `config.use_cache = False` (generation still caches) and the config's
    attention implementation, restored by `disable_s2_attention` (call it before `save_pretrained`, whose config.json
    would keep use_cache false; a model that shares this config object is switched too). shift, sink_tokens,
    full_heads: the variants in the module docstring. context_parallel: a `context_parallel.CPGroup` when every row
    is split over its ranks (training only). Returns the model.
    """
    from transformers import PretrainedConfig, PreTrainedModel

    hf = _hf_model(model)
    if not isinstance(getattr(hf, "config", None), PretrainedConfig):
        raise TypeError(f"enable_s2_attention: expected a transformers model or a PEFT wrapper of one, got {type(hf)}")
    group_size = check_group_size(group_size)
    check_variant(shift, sink_tokens, full_heads)
    if backend not in (None, "auto"):
        problem = hardware.backend_problem(backend)
        if problem:
            raise ValueError(problem)
    config = hf.config
    if not (getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None)):
        raise ValueError(
            f"{type(hf).__name__} has no rotary position embeddings; S2-Attn extends RoPE decoders "
            "(Llama, Mistral, Qwen2, ...)"
        )
    if not getattr(hf, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(hf).__name__} does not run its attention through transformers' AttentionInterface;"
            " S2-Attn cannot be enabled for it"
        )
    modules = _attention_modules(hf)
    if not modules:
        raise ValueError(f"{type(hf).__name__}: no attention modules found (nothing has layer_idx and is_causal)")
    current = modules[0].__dict__.get("_longqlora_s2")
    base = current.base if current else config._attn_implementation
    use_cache = current.use_cache if current else getattr(config, "use_cache", None)
    settings = S2Settings(
        group_size=group_size,
        backend=backend,
        base=base,
        use_cache=use_cache,
        shift=shift,
        sink_tokens=int(sink_tokens),
        full_heads=float(full_heads),
        context_parallel=context_parallel,
    )
    _register()
    for m in modules:
        m._longqlora_s2 = settings
    if not current:
        for m in hf.modules():
            if isinstance(m, PreTrainedModel):
                m._longqlora_s2_base = base
                m._longqlora_s2_hooks = (
                    m.register_forward_pre_hook(_pre_hook, with_kwargs=True),
                    m.register_forward_hook(_post_hook, with_kwargs=True, always_call=True),
                )
    hf.set_attn_implementation(IMPLEMENTATION)
    config.use_cache = False
    logger.info(
        "S2-Attn on: group size %d to start, backend %s, shift %s, %d sink tokens, %.0f%% full heads%s; full attention "
        "(%s) in eval mode",
        settings.group_size,
        backend or "auto",
        shift,
        settings.sink_tokens,
        100 * settings.full_heads,
        f", rows split over {context_parallel.size} ranks" if context_parallel else "",
        base,
    )
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


def s2_enabled(model) -> bool:
    """True when `enable_s2_attention` is in effect on `model`."""
    modules = _attention_modules(_hf_model(model))
    return bool(modules) and "_longqlora_s2" in modules[0].__dict__
