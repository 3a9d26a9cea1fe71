"""enable_s2_attention on real transformers decoders (Llama, Mistral, Qwen2): S2 in training, exact full attention
in eval mode and with a KV cache, packed and padded batches, reversible."""

import statistics

import pytest
import torch
from transformers import (
    DynamicCache,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from longqlora.attention import disable_s2_attention, enable_s2_attention, s2_enabled
from longqlora.attention.integration import IMPLEMENTATION
from longqlora.training.tiny import tiny_llama_config

SMALL = dict(
    vocab_size=320,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def make_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "llama-gqa":
        model = LlamaForCausalLM(tiny_llama_config("gqa", vocab_size=320, max_position_embeddings=256))
    elif arch == "llama-odd":
        model = LlamaForCausalLM(tiny_llama_config("odd", vocab_size=320, max_position_embeddings=256))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**SMALL, sliding_window=None))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**SMALL, use_sliding_window=False))
    return model.float()


ARCHS = ["llama-gqa", "llama-odd", "mistral", "qwen2"]


def ids(b=2, n=64, seed=1):
    return torch.randint(3, 320, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_mode_is_bit_for_bit_the_default_attention(arch):
    ref, model = make_model(arch), make_model(arch)
    enable_s2_attention(model, 16)
    assert model.config._attn_implementation == IMPLEMENTATION
    ref.eval(), model.eval()
    x = ids()
    mask = torch.ones_like(x)
    mask[1, :10] = 0  # left padding, as in batched generation
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)
        assert torch.equal(model(x, attention_mask=mask).logits, ref(x, attention_mask=mask).logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_mode_is_s2(arch):
    """With 2 layers and G=16, token 0 can reach at most position 3G/2 - 1 = 23 through the segments."""
    model = make_model(arch)
    enable_s2_attention(model, 16)
    model.train()
    x = ids(1, 64)
    x2 = x.clone()
    x2[0, 0] = (x[0, 0] + 1) % 320
    with torch.no_grad():
        a, b = model(x).logits, model(x2).logits
        assert torch.equal(a[:, 24:], b[:, 24:])
        assert not torch.allclose(a[:, :8], b[:, :8])
        model.eval()  # full attention: the change reaches the end
        assert not torch.allclose(model(x).logits[:, 24:], model(x2).logits[:, 24:])


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2"])
def test_training_with_one_large_group_equals_full_attention(arch):
    ref, model = make_model(arch), make_model(arch)
    enable_s2_attention(model, 256)  # G/2 = 128 >= N: every head sees the whole causal prefix
    ref.train(), model.train()
    x = ids(2, 64)
    torch.testing.assert_close(model(x).logits, ref(x).logits, atol=1e-5, rtol=1e-4)


def test_kv_cache_uses_full_attention_even_in_training_mode():
    ref, model = make_model("llama-gqa"), make_model("llama-gqa")
    enable_s2_attention(model, 8)
    ref.eval(), model.train()
    x = ids(1, 48)
    with torch.no_grad():
        assert torch.equal(model(x, use_cache=True).logits, ref(x, use_cache=True).logits)
        # a cache object without use_cache=True: the op follows the model's choice of mask (it ran S2 here)
        mine, theirs = DynamicCache(config=model.config), DynamicCache(config=ref.config)
        assert torch.equal(model(x, past_key_values=mine).logits, ref(x, past_key_values=theirs).logits)
        assert torch.equal(mine.layers[0].keys, theirs.layers[0].keys)
    model.eval()
    out = model.generate(x, max_new_tokens=5, do_sample=False)
    want = ref.generate(x, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, want)


def test_packed_batch_documents_do_not_see_each_other():
    model = make_model("llama-gqa")
    enable_s2_attention(model, 16)
    model.train()
    lengths = (20, 30, 14)
    x = ids(1, sum(lengths))
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    with torch.no_grad():
        packed = model(x, position_ids=pos).logits
        start = 0
        for n in lengths:
            alone = model(x[:, start : start + n]).logits
            torch.testing.assert_close(packed[:, start : start + n], alone, atol=1e-5, rtol=1e-4)
            start += n


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_unpadded_rows(side):
    model = make_model("llama-odd")
    enable_s2_attention(model, 16)
    model.train()
    x = ids(2, 40)
    mask = torch.ones_like(x)
    real = 29
    if side == "right":
        mask[1, real:] = 0
        pos = torch.arange(40).expand(2, 40)
        row = x[1:, :real]
    else:
        mask[1, : 40 - real] = 0
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        row = x[1:, 40 - real :]
    with torch.no_grad():
        batched = model(x, attention_mask=mask, position_ids=pos).logits
        alone = model(row).logits
    assert torch.isfinite(batched).all()
    got = batched[1:, :real] if side == "right" else batched[1:, 40 - real :]
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-4)


def test_backward_with_gradient_checkpointing():
    model = make_model("llama-gqa")
    enable_s2_attention(model, 16)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    x = ids(2, 64)
    loss = model(x, labels=x).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == sum(1 for _ in model.parameters())
    assert all(torch.isfinite(g).all() for g in grads)
    # Same gradients as without checkpointing.
    ref = make_model("llama-gqa")
    enable_s2_attention(ref, 16)
    ref.train()
    ref(x, labels=x).loss.backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4)


def test_disable_restores_the_model():
    ref, model = make_model("mistral"), make_model("mistral")
    use_cache = model.config.use_cache
    enable_s2_attention(model, 8)
    enable_s2_attention(model, 16)  # re-enabling changes the group size, nothing else
    assert s2_enabled(model) and model.config.use_cache is False
    disable_s2_attention(model)
    assert not s2_enabled(model)
    assert model.config._attn_implementation == "sdpa" and model.config.use_cache == use_cache
    assert not model._forward_pre_hooks and not model._forward_hooks
    ref.train(), model.train()
    x = ids(1, 64)
    torch.testing.assert_close(model(x).logits, ref(x).logits, atol=0, rtol=0)


def test_peft_wrapped_model():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_model("llama-gqa"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    enable_s2_attention(model, 16)
    model.train()
    x = ids(1, 64)
    x2 = x.clone()
    x2[0, 0] += 1
    with torch.no_grad():
        assert torch.equal(model(x).logits[:, 24:], model(x2).logits[:, 24:])


def test_rejects_models_without_rope():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="rotary"):
        enable_s2_attention(model, 16)
    with pytest.raises(ValueError, match="group size 0: must be a positive number of tokens"):
        enable_s2_attention(make_model("llama-gqa"), 0)


# ------------------------------------------------------------------------------ S2 variants on a real decoder
@pytest.mark.parametrize("arch", ["llama-gqa", "llama-odd"])
def test_variants_train_as_configured_and_eval_stays_full(arch):
    """Token 0 perturbed, 2 layers, G=16: plain S2 cannot reach position >= 24; a sink or a full head can."""
    x = ids(1, 64)
    x2 = x.clone()
    x2[0, 0] = (x[0, 0] + 1) % 320
    reach = {}
    for name, kwargs in (("plain", {}), ("sinks", dict(sink_tokens=1)), ("full", dict(full_heads=0.34))):
        model = make_model(arch)
        enable_s2_attention(model, 16, **kwargs)
        model.train()
        with torch.no_grad():
            reach[name] = (model(x).logits[:, 24:] - model(x2).logits[:, 24:]).abs().max().item()
            model.eval()
            ref = make_model(arch).eval()
            assert torch.equal(model(x).logits, ref(x).logits)  # eval mode: the model's own attention
    assert reach["plain"] == 0 and reach["sinks"] > 1e-4 and reach["full"] > 1e-4


def test_rolled_shift_leaks_the_future_in_a_model_and_leakfree_does_not():
    x = ids(1, 64)
    x2 = x.clone()
    x2[0, -1] = (x[0, -1] + 1) % 320  # change only the last token
    for shift, leaks in (("rolled", True), ("leakfree", False)):
        model = make_model("llama-gqa")
        enable_s2_attention(model, 16, shift=shift)
        model.train()
        with torch.no_grad():
            change = (model(x).logits[:, :8] - model(x2).logits[:, :8]).abs().max().item()
        assert (change > 1e-5) is leaks, shift


def test_all_heads_full_equals_full_attention():
    ref, model = make_model("llama-gqa"), make_model("llama-gqa")
    enable_s2_attention(model, 16, full_heads=1.0)
    ref.train(), model.train()
    x = ids(2, 64)
    torch.testing.assert_close(model(x).logits, ref(x).logits, atol=1e-5, rtol=1e-4)


def test_model_config_validates_the_variant_flags():
    from longqlora.model import ModelConfig

    ok = ModelConfig(model_name_or_path="m", target_context=512, s2_sink_tokens=4, s2_full_heads=0.25)
    assert (ok.s2_shift, ok.s2_sink_tokens, ok.s2_full_heads) == ("leakfree", 4, 0.25)
    assert statistics.fmean(ok.group_schedule) == 1  # the default schedule costs what a fixed group costs
    assert len(ok.group_sizes) > 1 and max(ok.group_sizes) > ok.group_size > min(ok.group_sizes)
    for schedule, sizes in (("none", [128]), ("", [128]), ("0.5, 2,", [64, 256])):
        assert ModelConfig(model_name_or_path="m", target_context=512, s2_group_schedule=schedule).group_sizes == sizes
    for kwargs, message in (
        (dict(s2_sink_tokens=-1), "--s2_sink_tokens -1: must be >= 0"),
        (dict(s2_full_heads=2.0), "--s2_full_heads 2.0: must be"),
        (dict(s2_shift="wrap"), "--s2_shift 'wrap': must be leakfree or rolled"),
        (dict(s2_shift="rolled", s2_sink_tokens=2), "--s2_sink_tokens 2: sinks combine"),
        (dict(s2_full_every=1), "--s2_full_every 1: must be 0 .never. or >= 2"),
        (dict(s2_group_schedule="0.25,x"), "--s2_group_schedule '0.25,x': must be none or"),
        (dict(s2_group_schedule="0.5,-1"), "--s2_group_schedule '0.5,-1': must be none or"),
        (dict(s2_group_schedule="1", group_ratio=0.5), [256]),
        (dict(group_ratio=0.5), [64, 192, 512]),  # the default, its last share capped at 512
        (dict(group_ratio=1.0, s2_group_schedule="none"), [512]),
        (dict(s2_shift="rolled"), "--s2_shift rolled needs groups that divide --target_context"),
        (dict(s2_shift="rolled", s2_group_schedule="0.5,1,2"), [64, 128, 256]),
    ):
        if isinstance(message, list):  # valid: the group sizes it gives
            assert ModelConfig(model_name_or_path="m", target_context=512, **kwargs).group_sizes == message
            continue
        with pytest.raises(ValueError, match=message):
            ModelConfig(model_name_or_path="m", target_context=512, **kwargs)
    with pytest.raises(ValueError, match="--s2_full_heads"):
        enable_s2_attention(make_model("llama-gqa"), 16, full_heads=-0.5)


# ------------------------------------------------------------------------------ S2 schedules (between steps)
def test_step_settings_split_the_steps_and_mark_full_steps():
    from longqlora.attention.schedule import step_settings

    sizes = [step_settings(s, 10, [16, 32, 64])[0] for s in range(10)]
    assert sizes == [16] * 4 + [32] * 3 + [64] * 3  # step * 3 // 10: equal shares, in order
    full = [step_settings(s, 9, [16], full_every=3, full_heads=0.25)[1] for s in range(9)]
    assert full == [0.25, 0.25, 1.0] * 3
    assert step_settings(12, 10, [16, 32]) == (32, 0.0)  # past max_steps (resumed with more steps): the last size


def test_set_step_settings_changes_what_training_computes():
    from longqlora.attention.schedule import set_step_settings

    x = ids(2, 64)
    model, ref32, full = make_model("llama-gqa"), make_model("llama-gqa"), make_model("llama-gqa")
    enable_s2_attention(model, 16)
    enable_s2_attention(ref32, 32)
    for m in (model, ref32, full):
        m.train()
    with torch.no_grad():
        before = model(x).logits
        set_step_settings(model, 32, 0.0)
        assert torch.equal(model(x).logits, ref32(x).logits) and not torch.equal(before, ref32(x).logits)
        set_step_settings(model, 32, 1.0)
        torch.testing.assert_close(model(x).logits, full(x).logits, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="--s2_full_heads"):
        set_step_settings(model, 32, 1.5)


def test_trainer_applies_the_schedule_at_every_step(tmp_path, monkeypatch):
    """A tiny recipe run (4 steps of 2 micro-batches, 256 tokens): groups 1/4 then 1/2, every 2nd step full."""
    from longqlora.attention import integration as attention
    from longqlora.data.text import TextDataConfig
    from longqlora.model import ModelConfig
    from longqlora.training.config import RunConfig, TrainingConfig
    from longqlora.training.run import resolve, train

    seen, real = [], attention.s2_attention

    def recording(*args, **kwargs):
        now = (args[3], kwargs["full_heads"])
        if not seen or seen[-1][0] != now:
            seen.append([now, 0])
        seen[-1][1] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "s2_attention", recording)
    model_cfg = ModelConfig(
        model_name_or_path="unused", target_context=4096, s2_full_every=2, s2_group_schedule="1,2"
    )  # x group_ratio 0.25 of the tiny run's 256 tokens
    train(
        resolve(
            model_cfg,
            TextDataConfig(dataset="unused"),
            RunConfig(tiny=True),
            TrainingConfig(output_dir=str(tmp_path), max_steps=4, save_strategy="no"),
        )
    )
    runs = [now for now, _ in seen]
    assert runs == [(64, 0.0), (64, 1.0), (128, 0.0), (128, 1.0)], seen
    assert len({count for _, count in seen}) == 1  # the same number of attention calls in every step


def test_one_model_runs_in_several_threads_at_once():
    """The hooks keep their reset tokens per thread: four threads forwarding one S2 model (train and eval mode)
    give each the single-thread logits (a token kept on the module was reset by another thread's hook)."""
    import threading

    model = make_model("llama-gqa")
    enable_s2_attention(model, 16)
    x = ids(1, 64)
    with torch.no_grad():
        expected = {mode: model.train(mode)(x).logits for mode in (True, False)}
    problems = []

    def work(mode):
        try:
            for _ in range(10):
                with torch.no_grad():
                    if not torch.equal(model(x).logits, expected[mode]):
                        problems.append(f"mode {mode}: other logits")
        except Exception as err:  # noqa: BLE001 - collected, asserted below
            problems.append(repr(err))

    for mode in (True, False):
        model.train(mode)
        threads = [threading.Thread(target=work, args=(mode,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert problems == []


def test_torch_compile_trains_as_eager():
    """A compiled model (dynamo traces it; the eager backend runs the graph) gives the uncompiled loss and grads in
    training mode (the layout cache on a tensor's __dict__ stopped dynamo before)."""
    plain = make_model("llama-gqa")
    enable_s2_attention(plain, 16)
    compiled_model = make_model("llama-gqa")
    enable_s2_attention(compiled_model, 16)
    x = ids(1, 64)
    losses = []
    for m, call in ((plain, plain), (compiled_model, torch.compile(compiled_model, backend="eager"))):
        m.train()
        loss = call(input_ids=x, labels=x).loss
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    for (name, a), b in zip(plain.named_parameters(), compiled_model.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_library_calls_refuse_bad_arguments_in_one_line():
    from longqlora.attention.schedule import set_step_settings

    model = make_model("llama-gqa")
    for bad, kind in ((64.9, TypeError), (True, TypeError), (None, TypeError), (0, ValueError)):
        with pytest.raises(kind, match="S2-Attn group size"):
            enable_s2_attention(model, bad)
    with pytest.raises(TypeError, match="expected a transformers model or a PEFT wrapper of one, got <class 'str'>"):
        enable_s2_attention("meta-llama/Llama-2-7b-hf", 16)
    with pytest.raises(ValueError, match="S2-Attn is not on for this model; call enable_s2_attention first"):
        set_step_settings(model, 16, 0.0)
    enable_s2_attention(model, 16)
    with pytest.raises(ValueError, match="must be a positive number of tokens"):
        set_step_settings(model, 0, 0.0)


def test_a_model_sharing_the_config_of_an_s2_model_is_told_why_it_fails():
    """LlamaForCausalLM(config) keeps the config object: enabling S2 on one model switches a second built from the
    same object (a frozen reference), whose error says so and how to give each its own."""
    config = tiny_llama_config("gqa", vocab_size=320, max_position_embeddings=256)
    student, teacher = LlamaForCausalLM(config), LlamaForCausalLM(config)
    enable_s2_attention(student, 16)
    with pytest.raises(RuntimeError, match=r"config object is shared .*\(copy\.deepcopy\(config\)\)"):
        teacher.train()(ids(1, 32))


def test_a_forward_whose_pre_hooks_failed_leaves_the_enclosing_forwards_state():
    """Another pre-hook that raises before ours: our post-hook (always called) must not reset the enclosing
    forward's mask choice (it popped that forward's token)."""
    from longqlora.attention import integration

    outer, inner = make_model("llama-gqa"), make_model("llama-gqa", seed=1)
    for m in (outer, inner):
        enable_s2_attention(m, 16)

    def refuse(module, args, kwargs):
        raise RuntimeError("a hook of someone else's")

    inner.register_forward_pre_hook(refuse, prepend=True, with_kwargs=True)
    integration._pre_hook(outer.train(), (), {})  # as the outer forward's own pre-hook
    try:
        with pytest.raises(RuntimeError, match="someone else's"):
            inner.train()(ids(1, 32))
        assert [m for m, _ in integration._S2_FORWARDS.get()] == [outer] and integration._decided()[0] is True
    finally:
        integration._post_hook(outer, (), {}, None)
    assert integration._S2_FORWARDS.get() == () and integration._decided() is None
