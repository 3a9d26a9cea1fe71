"""The memory planner (longqlora.plan) against hand-computed cases, and the `plan` command."""

import json

import pytest

from longqlora import cli
from longqlora.model import ModelConfig, count_trainable_without_weights
from longqlora.plan import (
    GIB,
    NF4_BYTES_PER_PARAM,
    PlanConfig,
    Shapes,
    advise,
    longest_context,
    plan,
)
from longqlora.presets import preset_config

LLAMA2_7B = preset_config("llama-2-7b")


def test_llama2_7b_parts_by_hand():
    """Llama-2-7B, 8k, r=8 on q/k/v/o, embeddings and norms trained, bf16: every part recomputed by hand."""
    p = plan(LLAMA2_7B, PlanConfig(model="llama-2-7b", context=8192))
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # q, k, v, o + gate, up, down
    assert linear == 6_476_005_376
    weights = linear * (0.5 + 1 / 64 + 4 / (64 * 256)) + 2 * 32000 * 4096 * 4 + 65 * 4096 * 4
    assert p["parts_gib"]["weights"] == pytest.approx(weights / GIB)
    trainable = 32 * 8 * 4 * (4096 + 4096) + 32000 * 4096 + 65 * 4096
    assert p["trainable_params"] == trainable == 139_726_848
    assert p["parts_gib"]["trainable_state"] == pytest.approx(trainable * 16 / GIB)
    assert p["parts_gib"]["checkpoints"] == pytest.approx(33 * 8192 * 4096 * 2 / GIB)
    assert p["peak_allocated_gib"] == pytest.approx(
        sum(p["parts_gib"][k] for k in ("weights", "trainable_state", "checkpoints"))
        + max(p["parts_gib"]["layer_recompute"], p["parts_gib"]["loss"]))


def test_trainable_count_matches_peft_on_the_meta_device():
    """The planner's trainable parameters equal PEFT's count of the really adapted model (GQA: Llama-3.1-8B)."""
    for name, target in (("llama-2-7b", "attention"), ("llama-3.1-8b", "all-linear")):
        counted = count_trainable_without_weights(ModelConfig(model_name_or_path=name, target_context=16384,
                                                              lora_target=target, load_in_4bit=False))
        planned = plan(preset_config(name), PlanConfig(model=name, context=16384, lora_target=target))
        assert planned["trainable_params"] == counted["trainable_params"]


def test_nf4_bytes_per_parameter():
    # 4-bit code, one 8-bit absmax per 64 values, one fp32 absmax per 256 of those
    assert NF4_BYTES_PER_PARAM * 64 * 256 == pytest.approx(0.5 * 64 * 256 + 256 + 4)


def test_switches_move_the_right_parts():
    base = PlanConfig(model="llama-2-7b", context=32768)
    plain = plan(LLAMA2_7B, base)
    offload = plan(LLAMA2_7B, PlanConfig(model="llama-2-7b", context=32768, offload=True))
    assert offload["parts_gib"]["checkpoints"] == pytest.approx(4 * 32768 * 4096 * 2 / GIB)  # 4 in flight
    assert offload["parts_gib"]["layer_recompute"] == plain["parts_gib"]["layer_recompute"]
    full_logits = plan(LLAMA2_7B, PlanConfig(model="llama-2-7b", context=32768, chunked_loss=False))
    # the plain loss holds (tokens x vocab) logits in bf16 and four fp32 tensors of that size
    assert full_logits["parts_gib"]["loss"] - plain["parts_gib"]["loss"] == pytest.approx(
        (32768 * 32000 * 18 + 32768 * 4096 * 8 - 32768 * 4096 * 12 - 3 * 4096 * 32000 * 4) / GIB)
    tiled = plan(LLAMA2_7B, PlanConfig(model="llama-2-7b", context=32768, tiled_mlp=True, tile_tokens=8192))
    mlp = 6 * 2 * 11008  # bytes per token of MLP intermediates and their gradients
    assert plain["parts_gib"]["layer_recompute"] - tiled["parts_gib"]["layer_recompute"] == pytest.approx(
        ((32768 - 8192) * mlp - 32768 * 2 * 4096) / GIB)
    # batch 2 at 16k has the same token-proportional parts as batch 1 at 32k
    batch2 = plan(LLAMA2_7B, PlanConfig(model="llama-2-7b", context=16384, batch=2))
    assert batch2["parts_gib"]["checkpoints"] == plain["parts_gib"]["checkpoints"]


def test_longest_context_is_the_fitting_boundary():
    cfg = PlanConfig(model="llama-2-13b", context=4096, gpu="v100-32gb")
    config = preset_config("llama-2-13b")
    n = longest_context(config, cfg)
    assert n > 0 and n % 1024 == 0
    assert plan(config, PlanConfig(model="llama-2-13b", context=n, gpu="v100-32gb"))["fits"]
    assert not plan(config, PlanConfig(model="llama-2-13b", context=n + 1024, gpu="v100-32gb"))["fits"]
    more = longest_context(config, PlanConfig(model="llama-2-13b", context=4096, gpu="v100-32gb", offload=True,
                                              tiled_mlp=True))
    assert more > n


def test_advise_names_the_switches_that_make_it_fit():
    config = preset_config("llama-2-7b")
    # find a context that fits only with offloading
    for context in range(16384, 131072, 4096):
        alone = plan(config, PlanConfig(model="m", context=context, gpu="a10-24gb"))
        with_offload = plan(config, PlanConfig(model="m", context=context, gpu="a10-24gb", offload=True))
        if not alone["fits"] and with_offload["fits"]:
            break
    else:
        pytest.fail("no context where offloading makes the difference")
    advice = advise(config, PlanConfig(model="m", context=context, gpu="a10-24gb"))
    assert advice["turn_on"] == ["offload"]
    assert advice["longest_context"] < context <= advice["longest_context_all_switches"]


@pytest.mark.parametrize("flags,flag", [
    (["--context", "0"], "--context"), (["--context", "8192", "--gpu", "h200"], "--gpu"),
    (["--context", "8192", "--lora_target", "mlp"], "--lora_target"),
    (["--context", "8192", "--trainable_params", "embed,head"], "--trainable_params"),
    (["--context", "8192", "--gpu", "v100-32gb", "--gpu_memory", "30"], "--gpu"),
])
def test_plan_command_rejects_bad_flags_in_one_line(flags, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["plan", "--model", "llama-2-7b", *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: " + flag) and "\n" not in err


def test_plan_command_json_and_local_config(tmp_path, capsys):
    LLAMA2_7B.save_pretrained(tmp_path)
    assert cli.main(["plan", "--model", str(tmp_path), "--context", "8192", "--gpu", "v100-32gb", "--json"]) == 0
    local = json.loads(capsys.readouterr().out)
    assert cli.main(["plan", "--model", "llama-2-7b", "--context", "8192", "--gpu", "v100-32gb", "--json"]) == 0
    preset = json.loads(capsys.readouterr().out)
    assert local["peak_allocated_gib"] == preset["peak_allocated_gib"] and local["fits"] is True
    assert local["longest_context"] >= 8192
    assert cli.main(["plan", "--model", "llama-2-7b", "--context", "8192", "--gpu", "v100-32gb"]) == 0
    text = capsys.readouterr().out
    assert "fits" in text and "checkpointed hidden states" in text and f"{local['longest_context']:,}" in text


def test_shapes_read_gqa_and_head_dim():
    s = Shapes.of(preset_config("llama-3.1-8b"))
    assert (s.heads, s.kv_heads, s.head_dim, s.vocab) == (32, 8, 128, 128256)
    assert s.linear_shapes(False) == [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096)]
