"""Tests for longqlora.rope: position interpolation on transformers-5 configs (CPU, no downloads)."""

import copy
import math

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from longqlora.rope import apply_position_interpolation, original_context, rope_summary

# Small models whose head_dim (128) matches real Llama/Qwen so every frequency band exists.
_SMALL = dict(
    hidden_size=256,
    num_attention_heads=2,
    num_key_value_heads=2,
    intermediate_size=64,
    num_hidden_layers=1,
    vocab_size=32,
)
LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}


def llama(**kw):
    return transformers.LlamaConfig(**{**_SMALL, **kw})


def llama31():
    return llama(rope_parameters=dict(LLAMA31_ROPE), max_position_embeddings=131072)


def qwen25_yarn():
    # Qwen2.5's model-card recipe: yarn block added, max_position_embeddings left at 32768.
    return transformers.Qwen2Config(
        **_SMALL,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 32768,
            "rope_theta": 1e6,
        },
    )


def longlora_release():
    # Linear factor 4 with max_position_embeddings 16384: pre-trained 4096, nothing recorded.
    return llama(rope_parameters={"rope_type": "linear", "factor": 4.0}, max_position_embeddings=16384)


def default_inv_freq(theta, dim=128):
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


# ---------------------------------------------------------------- default -> linear


def test_default_becomes_linear_with_exact_factor():
    cfg = llama(max_position_embeddings=4096)
    assert apply_position_interpolation(cfg, 16384) == 4.0
    rp = cfg.rope_parameters
    assert rp["rope_type"] == "linear" and rp["factor"] == 4.0
    assert rp["original_max_position_embeddings"] == 4096
    assert cfg.max_position_embeddings == 16384
    assert rp["rope_theta"] == 10000.0


def test_fractional_factor_is_not_rounded_up():
    cfg = llama(max_position_embeddings=4096)
    assert apply_position_interpolation(cfg, 10000) == 2.44140625
    assert cfg.rope_parameters["factor"] == 2.44140625


@pytest.mark.parametrize(
    "make, target, factor",
    [
        (lambda: transformers.MistralConfig(**_SMALL, max_position_embeddings=32768), 65536, 2.0),
        (lambda: transformers.Qwen2Config(**_SMALL), 50000, 50000 / 32768),
    ],
)
def test_mistral_and_qwen2_default(make, target, factor):
    cfg = make()
    assert apply_position_interpolation(cfg, target) == factor
    assert rope_summary(cfg) == {
        "rope_type": "linear",
        "factor": factor,
        "original_context": target / factor,
        "max_position_embeddings": target,
    }


def test_idempotent_second_call_changes_nothing():
    cfg = llama(max_position_embeddings=4096)
    first = apply_position_interpolation(cfg, 10000)
    before = cfg.to_dict()
    assert apply_position_interpolation(cfg, 10000) == first == 2.44140625
    assert cfg.to_dict() == before


@pytest.mark.parametrize("target", [1, 2048, 4096])
def test_target_that_fits_returns_one_and_changes_nothing(target):
    cfg = llama(max_position_embeddings=4096)
    before = cfg.to_dict()
    assert apply_position_interpolation(cfg, target) == 1.0
    assert cfg.to_dict() == before


def test_repeated_extension_is_relative_to_true_original():
    cfg = llama(max_position_embeddings=4096)
    apply_position_interpolation(cfg, 10000)
    assert apply_position_interpolation(cfg, 20000) == 20000 / 4096
    assert original_context(cfg) == 4096
    assert cfg.rope_parameters["rope_type"] == "linear"


def test_survives_save_and_reload():
    cfg = llama(max_position_embeddings=4096)
    apply_position_interpolation(cfg, 16384)
    again = transformers.LlamaConfig.from_dict(cfg.to_dict())
    assert (
        rope_summary(again)
        == rope_summary(cfg)
        == {"rope_type": "linear", "factor": 4.0, "original_context": 4096, "max_position_embeddings": 16384}
    )
    before = again.to_dict()
    assert apply_position_interpolation(again, 16384) == 4.0
    assert again.to_dict() == before
    LlamaRotaryEmbedding(again)


# ---------------------------------------------------------------- key numerical property (PI)


@pytest.mark.parametrize("factor", [4.0, 2.5])
def test_interpolated_position_fp_matches_original_position_p(factor):
    base = llama(max_position_embeddings=4096)
    cfg = copy.deepcopy(base)
    assert apply_position_interpolation(cfg, int(4096 * factor)) == factor
    rot0, rot1 = LlamaRotaryEmbedding(base), LlamaRotaryEmbedding(cfg)
    x = torch.zeros(1, dtype=torch.float32)
    # Small positions: angles stay small, so float32 rounding stays under 1e-5.
    p = torch.arange(64, dtype=torch.float64)[None]
    cos0, sin0 = rot0(x, p)
    cos1, sin1 = rot1(x, p * factor)
    assert cos0.dtype == torch.float32
    torch.testing.assert_close(cos1, cos0, atol=1e-5, rtol=0)
    torch.testing.assert_close(sin1, sin0, atol=1e-5, rtol=0)
    # Whole pre-trained window: error grows with the angle (~4096 rad * float32 eps).
    p = torch.arange(4096, dtype=torch.float64)[None]
    cos0, sin0 = rot0(x, p)
    cos1, sin1 = rot1(x, p * factor)
    torch.testing.assert_close(cos1, cos0, atol=5e-4, rtol=0)
    torch.testing.assert_close(sin1, sin0, atol=5e-4, rtol=0)
    # Without interpolation position f*p is a different rotation: the check above can fail.
    cos_extrap, _ = rot0(x, p * factor)
    assert (cos_extrap - cos0).abs().max() > 0.5
    torch.testing.assert_close(rot1.inv_freq.double() * factor, rot0.inv_freq.double(), rtol=2e-7, atol=0)


# ---------------------------------------------------------------- default -> yarn (--rope_scaling yarn)


def test_default_becomes_yarn_keeping_fast_dimensions_and_interpolating_slow_ones():
    """YaRN §3.2: dimensions that turn many times within the pre-trained context keep their frequency, those that
    turn less than once are divided by the factor (as PI divides all), with a ramp between."""
    cfg = llama(max_position_embeddings=4096)
    assert apply_position_interpolation(cfg, 16384, "yarn") == 4.0
    rp = cfg.rope_parameters
    assert (rp["rope_type"], rp["factor"], rp["original_max_position_embeddings"]) == ("yarn", 4.0, 4096)
    assert cfg.max_position_embeddings == 16384
    after = LlamaRotaryEmbedding(cfg).inv_freq.double()
    base = default_inv_freq(10000.0)
    turns = 4096 * base / (2 * math.pi)  # rotations within the pre-trained context
    fast, slow = turns > 32, turns < 1  # YaRN's beta_fast 32 and beta_slow 1
    assert fast.sum() > 0 and slow.sum() > 0 and (~fast & ~slow).sum() > 0
    torch.testing.assert_close(after[fast], base[fast], rtol=1e-6, atol=0)
    torch.testing.assert_close(after[slow], base[slow] / 4, rtol=1e-6, atol=0)
    middle = after[~fast & ~slow] / base[~fast & ~slow]
    assert ((middle >= 0.25 - 1e-9) & (middle <= 1 + 1e-9)).all()
    # Linear PI divides the fastest dimension too: the previous token's rotation shrinks 4x.
    linear = llama(max_position_embeddings=4096)
    apply_position_interpolation(linear, 16384)
    assert LlamaRotaryEmbedding(linear).inv_freq.double()[0] == pytest.approx(base[0] / 4)


def test_rope_scaling_yarn_leaves_an_already_scaled_model_its_type():
    cfg = longlora_release()
    assert apply_position_interpolation(cfg, 32768, "yarn") == 8.0
    assert cfg.rope_parameters["rope_type"] == "linear"


def test_unknown_rope_scaling_is_refused_naming_the_flag_before_the_config_changes():
    cfg = llama(max_position_embeddings=4096)
    before = cfg.to_dict()
    with pytest.raises(ValueError, match="--rope_scaling 'ntk': must be one of linear, yarn"):
        apply_position_interpolation(cfg, 16384, "ntk")
    assert cfg.to_dict() == before


# ---------------------------------------------------------------- existing scaling types keep their type


def test_llama31_stays_llama3_with_factor_16():
    cfg = llama31()
    assert apply_position_interpolation(cfg, 262144) == 16.0
    rp = cfg.rope_parameters
    assert rp["rope_type"] == "llama3" and rp["factor"] == 16.0
    assert rp["original_max_position_embeddings"] == 8192
    assert (rp["low_freq_factor"], rp["high_freq_factor"], rp["rope_theta"]) == (1.0, 4.0, 500000.0)
    assert cfg.max_position_embeddings == 262144
    assert original_context(cfg) == 8192


def test_llama3_low_frequencies_rescaled_high_frequencies_untouched():
    before_cfg = llama31()
    after_cfg = llama31()
    apply_position_interpolation(after_cfg, 262144)
    before = LlamaRotaryEmbedding(before_cfg).inv_freq.double()
    after = LlamaRotaryEmbedding(after_cfg).inv_freq.double()
    base = default_inv_freq(500000.0)
    wavelen = 2 * math.pi / base
    low, high = wavelen > 8192, wavelen < 2048  # old_context / low_freq_factor, / high_freq_factor
    mid = ~low & ~high
    assert low.sum() > 0 and high.sum() > 0 and mid.sum() > 0
    torch.testing.assert_close(after[low], base[low] / 16, rtol=1e-6, atol=0)
    torch.testing.assert_close(after[low], before[low] / 2, rtol=1e-6, atol=0)
    torch.testing.assert_close(after[high], before[high], rtol=0, atol=0)
    torch.testing.assert_close(after[high], base[high], rtol=1e-6, atol=0)
    smooth = (8192 / wavelen[mid] - 1.0) / (4.0 - 1.0)
    expected_mid = (1 - smooth) * base[mid] / 16 + smooth * base[mid]
    torch.testing.assert_close(after[mid], expected_mid, rtol=1e-5, atol=0)


def test_llama3_target_within_max_changes_nothing():
    cfg = llama31()
    before = cfg.to_dict()
    assert apply_position_interpolation(cfg, 100000) == 8.0
    assert cfg.to_dict() == before


def test_yarn_keeps_type_and_factor_relative_to_covered_context():
    cfg = qwen25_yarn()
    assert rope_summary(cfg) == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_context": 32768,
        "max_position_embeddings": 32768,
    }
    rot_before = transformers.models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding(copy.deepcopy(cfg))
    # yarn 4 x 32768 already covers 131072 tokens: factor 4 doubles to 8 for 262144.
    assert apply_position_interpolation(cfg, 262144) == 8.0
    rp = cfg.rope_parameters
    assert (rp["rope_type"], rp["factor"], rp["original_max_position_embeddings"]) == ("yarn", 8.0, 32768)
    assert cfg.max_position_embeddings == 262144
    rot = transformers.models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding(cfg)
    base = default_inv_freq(1e6)
    assert rot.attention_scaling == pytest.approx(0.1 * math.log(8.0) + 1.0)
    torch.testing.assert_close(rot.inv_freq[-1].double(), base[-1] / 8, rtol=1e-6, atol=0)  # interpolated
    torch.testing.assert_close(rot_before.inv_freq[-1].double(), base[-1] / 4, rtol=1e-6, atol=0)
    torch.testing.assert_close(rot.inv_freq[0].double(), base[0], rtol=1e-6, atol=0)  # extrapolated


def test_yarn_within_covered_context_keeps_factor_raises_max():
    cfg = qwen25_yarn()
    assert apply_position_interpolation(cfg, 65536) == 4.0
    assert cfg.rope_parameters["factor"] == 4.0 and cfg.max_position_embeddings == 65536
    before = cfg.to_dict()
    assert apply_position_interpolation(cfg, 65536) == 4.0
    assert cfg.to_dict() == before


def test_longlora_release_recognised_and_extended_relative_to_4096():
    cfg = longlora_release()
    assert original_context(cfg) == 4096
    assert rope_summary(cfg)["factor"] == 4.0
    assert apply_position_interpolation(cfg, 32768) == 8.0
    rp = cfg.rope_parameters
    assert (rp["rope_type"], rp["factor"], rp["original_max_position_embeddings"]) == ("linear", 8.0, 4096)
    assert cfg.max_position_embeddings == 32768
    rot, ref = LlamaRotaryEmbedding(cfg), LlamaRotaryEmbedding(llama(max_position_embeddings=4096))
    torch.testing.assert_close(rot.inv_freq * 8, ref.inv_freq, rtol=1e-6, atol=0)


def test_longlora_release_target_between_original_and_max_is_a_no_op():
    cfg = longlora_release()
    before = cfg.to_dict()
    assert apply_position_interpolation(cfg, 8192) == 4.0
    assert cfg.to_dict() == before


def test_legacy_rope_scaling_type_key_kept_consistent():
    cfg = llama(rope_scaling={"type": "linear", "factor": 2.0}, max_position_embeddings=8192)
    assert apply_position_interpolation(cfg, 16384) == 4.0
    assert cfg.rope_parameters["type"] == cfg.rope_parameters["rope_type"] == "linear"


def test_longrope_long_factors_scaled():
    dim_half = 64
    cfg = transformers.Phi3Config(
        **_SMALL,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 1e4,
            "short_factor": [1.0] * dim_half,
            "long_factor": [float(i % 7 + 1) for i in range(dim_half)],
        },
    )
    long_before, _ = ROPE_INIT_FUNCTIONS["longrope"](copy.deepcopy(cfg), None, seq_len=4097)
    assert apply_position_interpolation(cfg, 262144) == 64.0
    rp = cfg.rope_parameters
    assert rp["rope_type"] == "longrope" and rp["short_factor"] == [1.0] * dim_half
    long_after, attn = ROPE_INIT_FUNCTIONS["longrope"](cfg, None, seq_len=4097)
    short_after, _ = ROPE_INIT_FUNCTIONS["longrope"](cfg, None, seq_len=100)
    torch.testing.assert_close(long_after * 2, long_before, rtol=1e-6, atol=0)
    torch.testing.assert_close(short_after.double(), default_inv_freq(1e4), rtol=1e-6, atol=0)
    assert attn == pytest.approx(math.sqrt(1 + math.log(64) / math.log(4096)))


# ---------------------------------------------------------------- dynamic NTK


def test_dynamic_fits_returns_one_extension_refused_unchanged():
    cfg = llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=4096)
    before = cfg.to_dict()
    assert apply_position_interpolation(cfg, 4096) == 1.0
    with pytest.raises(ValueError, match="--target_context.*dynamic"):
        apply_position_interpolation(cfg, 8192)
    assert cfg.to_dict() == before


# ---------------------------------------------------------------- errors, all before any change


@pytest.mark.parametrize("bad", [0, -5, 2.5, 16384.0, "16384", True, None])
def test_bad_target_rejected(bad):
    cfg = llama(max_position_embeddings=4096)
    before = cfg.to_dict()
    with pytest.raises(ValueError, match="^--target_context must be a positive integer"):
        apply_position_interpolation(cfg, bad)
    assert cfg.to_dict() == before


@pytest.mark.parametrize("make", [transformers.GPT2Config, transformers.BertConfig])
def test_non_rope_config_rejected(make):
    cfg = make()
    for call in (lambda: apply_position_interpolation(cfg, 8192), lambda: rope_summary(cfg)):
        with pytest.raises(ValueError, match="--target_context.*has no rotary position embeddings"):
            call()


def test_target_below_pretrained_context_of_extended_model_rejected():
    cfg = longlora_release()
    before = cfg.to_dict()
    with pytest.raises(ValueError, match="--target_context 2048 is shorter than the model's pre-trained context 4096"):
        apply_position_interpolation(cfg, 2048)
    assert cfg.to_dict() == before


def test_per_layer_rope_parameters_rejected():
    cfg = transformers.Gemma3TextConfig()
    before = cfg.to_dict()
    with pytest.raises(ValueError, match="--target_context.*per-layer-type rope_parameters"):
        apply_position_interpolation(cfg, 1 << 20)
    assert cfg.to_dict() == before


def test_invalid_result_rolled_back():
    cfg = llama31()
    del cfg.rope_parameters["low_freq_factor"]  # transformers' llama3 validator requires it
    before = cfg.to_dict()
    with pytest.raises(ValueError, match="--target_context 262144: transformers rejected"):
        apply_position_interpolation(cfg, 262144)
    assert cfg.to_dict() == before
    assert cfg.max_position_embeddings == 131072


def test_error_messages_are_one_line():
    for cfg, target in ((llama(), 0), (transformers.GPT2Config(), 8), (longlora_release(), 1024)):
        with pytest.raises(ValueError) as info:
            apply_position_interpolation(cfg, target)
        assert "\n" not in str(info.value)


def test_rope_scaling_flag_is_checked_in_the_model_and_loader_flags():
    from longqlora.evaluation.loading import LoaderArgs
    from longqlora.model import ModelConfig

    with pytest.raises(ValueError, match="--rope_scaling 'ntk'"):
        ModelConfig(model_name_or_path="m", target_context=8192, rope_scaling="ntk")
    with pytest.raises(ValueError, match="--rope_scaling 'ntk'"):
        LoaderArgs(model="m", rope_scaling="ntk")
    assert ModelConfig(model_name_or_path="m", target_context=8192).rope_scaling == "yarn"  # the default
    assert LoaderArgs(model="m").rope_scaling is None  # the adapter's recorded type


def test_original_context_overrides_an_overstated_max_position_embeddings():
    """--original_context: Mistral-7B-v0.1 says 32768 in config.json but was pre-trained at 8192; extended to
    32768 from 8192 its RoPE is stretched x4 (without the flag nothing is stretched at all), the same scaling as a
    config that said 8192; a scaled RoPE keeps its recorded context, and a value above the config's is refused."""
    from longqlora.rope import set_original_context

    def mistral(max_positions):
        return transformers.MistralConfig(**_SMALL, max_position_embeddings=max_positions, sliding_window=None)

    plain = mistral(32768)
    assert apply_position_interpolation(plain, 32768, "yarn") == 1.0 and plain.rope_parameters["rope_type"] == "default"
    told, honest = mistral(32768), mistral(8192)
    set_original_context(told, 8192)
    assert original_context(told) == 8192
    assert apply_position_interpolation(told, 32768, "yarn") == apply_position_interpolation(honest, 32768, "yarn") == 4
    assert told.rope_parameters == honest.rope_parameters and told.max_position_embeddings == 32768
    assert told.rope_parameters["original_max_position_embeddings"] == 8192
    set_original_context(told, 8192)  # the extended config records it: nothing changes
    assert apply_position_interpolation(told, 32768, "yarn") == 4 and told.rope_parameters == honest.rope_parameters
    with pytest.raises(ValueError, match=r"^--original_context 4096: the model's RoPE is already scaled \(llama3"):
        set_original_context(llama31(), 4096)
    with pytest.raises(ValueError, match=r"^--original_context 65536: above config.json's max_position_embeddings"):
        set_original_context(mistral(32768), 65536)


def test_a_scaling_ahead_of_max_position_embeddings_is_extended_from_what_it_covers():
    """A scaled RoPE whose max_position_embeddings lags what its factor covers (Phi-3-style longrope 32 x 4096 with
    max 4096; a linear 2.5 over a recorded 4097) is stretched by target / covered context, not target / max:
    longrope's long factors x2 (x64 over the max), linear 2.5 x 262144 / 10242 (80 over the max)."""
    from types import SimpleNamespace

    longrope = SimpleNamespace(
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 1e4,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "long_factor": [1.0, 2.0],
            "short_factor": [1.0, 1.0],
        },
    )
    assert apply_position_interpolation(longrope, 262144) == 64.0
    assert longrope.rope_parameters["long_factor"] == [2.0, 4.0]
    linear = SimpleNamespace(
        max_position_embeddings=8192,
        rope_parameters={
            "rope_type": "linear",
            "rope_theta": 1e4,
            "factor": 2.5,
            "original_max_position_embeddings": 4097,
        },
    )
    assert apply_position_interpolation(linear, 262144) == pytest.approx(2.5 * 262144 / 10242)
