"""RoPE position interpolation for transformers-5 configs.

Position Interpolation (Chen et al. 2023, arXiv:2306.15595) extends a RoPE model
from a pre-trained context ``L`` to ``L' = f * L`` by dividing every rotary
frequency by ``f``; position ``f * p`` then sees exactly the rotation position
``p`` saw in pre-training, so fine-tuning only has to adapt to a denser grid.
YaRN (Peng et al. 2023, arXiv:2309.00071, section 3.2 "NTK-by-parts") instead leaves
the fast-rotating dimensions alone and interpolates only the slow ones: a head that
tells the previous token from the current one keeps its resolution, which PI divides
by ``f`` (docs/ablations.md measures what that costs a small base).
LongLoRA (Chen et al. 2023, arXiv:2309.12307, section 3) fine-tunes with PI on
top of S2-Attn and LoRA.

transformers 5 keeps every RoPE setting in ``config.rope_parameters`` (``rope_type``,
``rope_theta``, ``factor``, ``original_max_position_embeddings``...). The functions
here only read and write that dict and ``config.max_position_embeddings``; they
never replace an existing scaling type with plain linear (doing so to Llama-3.1's
``llama3`` scaling silently breaks the model), they only multiply its factor.

Nothing here imports transformers or torch, so importing this module is cheap.
"""

import logging
import numbers
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

_OMP = "original_max_position_embeddings"
# Scaling types whose factor can be multiplied to stretch the context further.
_EXTENDABLE = ("default", "linear", "llama3", "yarn", "longrope")
# What an unscaled (``default``) RoPE can become (``--rope_scaling``), and what reports call it.
UNSCALED_TO = {"linear": "position interpolation", "yarn": "YaRN"}


def check_scaling(unscaled_to: str) -> None:
    """The one check of ``--rope_scaling`` (ModelConfig, LoaderArgs and the interpolation itself call it)."""
    if unscaled_to not in UNSCALED_TO:
        raise ValueError(f"--rope_scaling {unscaled_to!r}: must be one of {', '.join(UNSCALED_TO)}")


class _RopeState(NamedTuple):
    params: dict  # shallow copy of config.rope_parameters, never the live dict
    rope_type: str
    factor: float  # current scaling factor (1.0 when unscaled)
    original: int  # pre-training context
    max_positions: int  # config.max_position_embeddings
    capacity: int  # context the current scaling already covers
    original_recorded: bool  # False when `original` was inferred


def _no_rope(config) -> ValueError:
    return ValueError(
        f"--target_context: {type(config).__name__} has no rotary position embeddings; "
        "position interpolation needs a RoPE model (Llama, Mistral, Qwen2...)"
    )


def _check_target(target_context) -> int:
    if not isinstance(target_context, numbers.Integral) or isinstance(target_context, bool) or target_context < 1:
        raise ValueError(
            f"--target_context must be a positive integer number of tokens (e.g. 16384), got {target_context!r}"
        )
    return int(target_context)


def _rope_params(config) -> dict:
    """Return a flat copy of the config's RoPE parameters, or raise if it has none / per-layer ones."""
    params = getattr(config, "rope_parameters", None)
    if not params:
        theta = getattr(config, "rope_theta", None)
        if theta is None:
            raise _no_rope(config)
        params = {"rope_type": "default", "rope_theta": theta}
    if not isinstance(params, dict):
        raise _no_rope(config)
    nested_fn = getattr(config, "nested_rope_parameter_keys", None)
    nested = list(nested_fn(params)) if callable(nested_fn) else []
    nested += [k for k, v in params.items() if isinstance(v, dict) and k not in nested]
    if nested:
        raise ValueError(
            f"--target_context: {type(config).__name__} has per-layer-type rope_parameters ({', '.join(nested)}); "
            "position interpolation here supports a single global RoPE only (Llama, Mistral, Qwen2...)"
        )
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _positive(value, what: str, config) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or value <= 0:
        raise ValueError(
            f"--target_context: {type(config).__name__}.rope_parameters has an invalid {what} {value!r}; "
            "fix config.json before extending the context"
        )
    return float(value)


def _state(config) -> _RopeState:
    """Read the current scaling: type, factor, pre-training context and covered context."""
    params = _rope_params(config)
    rope_type = params["rope_type"]
    max_pos = getattr(config, "max_position_embeddings", None)
    if not isinstance(max_pos, numbers.Integral) or max_pos < 1:
        raise ValueError(
            f"--target_context: {type(config).__name__} has no valid max_position_embeddings ({max_pos!r}); "
            "set it to the model's pre-trained context in config.json"
        )
    max_pos = int(max_pos)
    # transformers lets a top-level attribute (Phi-3) win over the dict entry for llama3/yarn/longrope.
    recorded = getattr(config, _OMP, None) or params.get(_OMP)
    if recorded is not None:
        recorded = int(_positive(recorded, _OMP, config))

    if rope_type == "default":
        # Unscaled: the whole max_position_embeddings window is the pre-trained one.
        factor, original, is_recorded = 1.0, max_pos, True
    elif rope_type == "linear":
        factor = _positive(params.get("factor"), "factor", config)
        # A linear release without a record (e.g. max 16384, factor 4) means original = max / factor.
        original = recorded or max(1, round(max_pos / factor))
        is_recorded = recorded is not None
    elif rope_type in ("yarn", "longrope"):
        original = recorded or max_pos
        is_recorded = recorded is not None
        # Both fall back to max_position_embeddings / original when no explicit factor is set.
        raw = params.get("factor")
        factor = _positive(raw, "factor", config) if raw is not None else max_pos / original
    else:  # llama3, dynamic and anything else: read-only description
        factor = _positive(params.get("factor", 1.0), "factor", config)
        original = recorded or max_pos
        is_recorded = recorded is not None
    capacity = max(max_pos, round(original * factor)) if rope_type != "dynamic" else max_pos
    return _RopeState(params, rope_type, factor, original, max_pos, capacity, is_recorded)


def original_context(config) -> int:
    """Pre-training context of the model (recorded, or recovered from a linear release's max / factor)."""
    return _state(config).original


def set_original_context(config, original: int) -> None:
    """``--original_context``: the model was pre-trained on fewer tokens than its config.json's
    ``max_position_embeddings`` says (Mistral-7B-v0.1 trained at 8192 tokens, its config says 32768); an unscaled
    RoPE then counts from ``original``, so the interpolation stretches by target / original. A scaled RoPE records
    its own pre-training context and is not overridden; 0 or the config's own value changes nothing."""
    if not original:
        return
    s = _state(config)
    if original == s.original:
        return
    if s.rope_type != "default":
        raise ValueError(
            f"--original_context {original}: the model's RoPE is already scaled ({s.rope_type}, factor "
            f"{_format(s.factor)}, pre-trained context {s.original} as its config records); drop --original_context"
        )
    if original > s.max_positions:
        raise ValueError(
            f"--original_context {original}: above config.json's max_position_embeddings {s.max_positions}, "
            "which an unscaled RoPE already covers; drop --original_context"
        )
    logger.info(
        "RoPE: pre-trained context %d (--original_context), not config.json's max_position_embeddings %d",
        original,
        s.max_positions,
    )
    config.max_position_embeddings = int(original)


def rope_summary(config) -> dict[str, Any]:
    """Describe the config's RoPE scaling for ``--dry_run`` output and the extension JSON."""
    s = _state(config)
    return {
        "rope_type": s.rope_type,
        "factor": s.factor,
        "original_context": s.original,
        "max_position_embeddings": s.max_positions,
    }


def _commit(config, params: dict, max_pos: int) -> None:
    """Install the new RoPE parameters, let transformers validate them, roll back on failure."""
    old_params, old_max = config.rope_parameters, config.max_position_embeddings
    had_ignore = "ignore_keys_at_rope_validation" in vars(config)
    old_ignore = vars(config).get("ignore_keys_at_rope_validation")
    try:
        config.rope_parameters = params
        config.max_position_embeddings = max_pos
        if params["rope_type"] == "linear" and _OMP in params:
            # transformers' linear validator does not list this key; we record it on purpose.
            ignore = set(getattr(config, "ignore_keys_at_rope_validation", None) or ())
            config.ignore_keys_at_rope_validation = ignore | {_OMP}
        validate = getattr(config, "validate_rope", None)
        if callable(validate):
            validate()
    except Exception as err:
        config.rope_parameters = old_params
        config.max_position_embeddings = old_max
        if had_ignore:
            config.ignore_keys_at_rope_validation = old_ignore
        else:
            vars(config).pop("ignore_keys_at_rope_validation", None)
        raise ValueError(
            f"--target_context {max_pos}: transformers rejected the interpolated RoPE parameters {params} ({err}); "
            "check rope_parameters in config.json"
        ) from err


def _format(factor: float) -> str:
    return f"{factor:g}"


def apply_position_interpolation(config, target_context: int, unscaled_to: str = "linear") -> float:
    """Set ``config`` up for ``target_context`` tokens and return the total scaling factor.

    - unscaled (``default``) model: becomes ``unscaled_to`` (``linear``: PI, arXiv:2306.15595,
      or ``yarn``) with factor ``target / original`` (fractional factors kept exactly, never
      rounded up);
    - ``linear``/``llama3``/``yarn``/``longrope``: the type and its other fields are kept and
      the factor is multiplied by ``target / covered context`` (longrope: its per-dimension
      ``long_factor`` too), so a LongLoRA release (linear 4, max 16384) extended to 32768
      becomes linear 8 relative to its 4096-token pre-training context;
    - ``original_max_position_embeddings`` (inside ``rope_parameters``) records the
      pre-training context and ``max_position_embeddings`` becomes the target, so a
      second call with the same target changes nothing and returns the same factor
      (transformers' linear validator does not list that key: a config saved with it warns
      about it when read back, harmlessly; ``merge`` writes plain configs without it);
    - target already covered: nothing changes and the current factor is returned
      (1.0 for an unscaled model);
    - ``dynamic`` (NTK) is unscaled below max_position_embeddings and rescales per batch
      above it, so it cannot carry a fixed factor: 1.0 when the target fits, else an error.

    The returned factor is the scaling type's own ``factor`` (for linear exactly
    ``target / original``). Every error is a one-line ``ValueError`` raised before the
    config is touched.
    """
    target = _check_target(target_context)
    check_scaling(unscaled_to)
    s = _state(config)

    if target <= s.capacity:
        if target < s.original and s.capacity > s.original:
            raise ValueError(
                f"--target_context {target} is shorter than the model's pre-trained context {s.original}; "
                "nothing to extend"
            )
        if target <= s.max_positions:
            logger.debug(
                "RoPE: target %d already covered (%s, factor %s); config unchanged",
                target,
                s.rope_type,
                _format(s.factor),
            )
            return 1.0 if s.rope_type == "dynamic" else s.factor
        # The scaling already covers the target but max_position_embeddings lags (e.g. a yarn
        # block added to Qwen2.5's config): keep the factor, only raise the advertised length.
        params = dict(s.params)
        params[_OMP] = s.original
        _commit(config, params, target)
        logger.info(
            "RoPE: %s factor %s already covers %d tokens; max_position_embeddings %d -> %d",
            s.rope_type,
            _format(s.factor),
            target,
            s.max_positions,
            target,
        )
        return s.factor

    if s.rope_type not in _EXTENDABLE:
        if s.rope_type == "dynamic":
            raise ValueError(
                f"--target_context {target}: rope_type 'dynamic' (dynamic NTK) is unscaled below "
                f"max_position_embeddings ({s.max_positions}) and rescales per batch above it, so it cannot hold "
                "a fixed interpolation factor; "
                "set rope_parameters.rope_type to 'default' in config.json to use position interpolation"
            )
        raise ValueError(
            f"--target_context {target}: rope_type {s.rope_type!r} is not supported for position interpolation; "
            f"supported: {', '.join(_EXTENDABLE)}"
        )

    if s.rope_type == "longrope" and not isinstance(s.params.get("long_factor"), (list, tuple)):
        raise ValueError(
            f"--target_context {target}: longrope rope_parameters lack a long_factor list; fix config.json first"
        )
    ratio = target / s.capacity
    if s.factor * s.original == s.capacity:
        new_factor = target / s.original  # exact PI factor, no float drift across repeated extensions
    else:
        new_factor = s.factor * ratio
    if s.rope_type == "linear" and not s.original_recorded:
        logger.warning(
            "RoPE: pre-training context not recorded; assuming max_position_embeddings / factor = %d / %s = %d "
            "(if max_position_embeddings is still the pre-training context, set "
            "rope_parameters.original_max_position_embeddings in config.json)",
            s.max_positions,
            _format(s.factor),
            s.original,
        )

    params = dict(s.params)
    new_type = unscaled_to if s.rope_type == "default" else s.rope_type
    params["rope_type"] = new_type
    if "type" in params:  # legacy alias kept by transformers' standardisation
        params["type"] = new_type
    if s.rope_type == "longrope":
        params["long_factor"] = [float(x) * ratio for x in params["long_factor"]]
    # yarn/longrope without an explicit factor derive it as max_position_embeddings / original.
    if not (s.rope_type in ("yarn", "longrope") and params.get("factor") is None):
        params["factor"] = new_factor
    params[_OMP] = s.original
    _commit(config, params, target)
    logger.info(
        "RoPE: %s factor %s -> %s %s (pre-trained context %d, max_position_embeddings %d -> %d)",
        s.rope_type,
        _format(s.factor),
        new_type,
        _format(new_factor),
        s.original,
        s.max_positions,
        target,
    )
    return new_factor
