"""longqlora.model on tiny random Llamas, 4-bit NF4 on the CPU: checks before loading, LoRA+, save and reload."""

import math
import sys

import pytest
import torch
import transformers
from safetensors import safe_open

from longqlora import hardware
from longqlora import model as lm
from longqlora.adapters import count_trainable, modules_to_save
from longqlora.attention import s2_enabled
from longqlora.model import ModelConfig, check_model, load_base, load_model
from longqlora.training.tiny import TINY_SHAPES, save_tiny_model

TARGET = 512  # 4x the tiny models' 128 positions; S2 group size 128


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {shape: save_tiny_model(root / shape, shape=shape) for shape in ("gqa", "odd")}


def config(path, **kw):
    kw.setdefault("compute_dtype", "float32")  # bitsandbytes' CPU 4-bit matmul is ~4x faster in fp32 than bf16
    return ModelConfig(model_name_or_path=str(path), target_context=kw.pop("target_context", TARGET), **kw)


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if any model weights are loaded."""

    def fail(*args, **kwargs):
        pytest.fail("weights were loaded before the configuration was checked")

    monkeypatch.setattr(lm.AutoModelForCausalLM, "from_pretrained", fail)


def expected_trainable(shape, r=8, vocab=320, targets=("q", "k", "v", "o")):
    """LoRA A+B on each targeted projection, plus the full embedding and every norm (2 per layer + final)."""
    hidden, heads, kv, layers, inter = TINY_SHAPES[shape]
    head_dim = hidden // heads
    dims = {
        "q": (hidden, heads * head_dim),
        "k": (hidden, kv * head_dim),
        "v": (hidden, kv * head_dim),
        "o": (heads * head_dim, hidden),
        "gate": (hidden, inter),
        "up": (hidden, inter),
        "down": (inter, hidden),
    }
    lora = layers * sum(r * (dims[t][0] + dims[t][1]) for t in targets)
    return lora + vocab * hidden + (2 * layers + 1) * hidden


# ---------------------------------------------------------------- ModelConfig


@pytest.mark.parametrize(
    "field,value",
    [
        ("target_context", 0),
        ("group_ratio", 0.0),
        ("group_ratio", 1.5),
        ("lora_r", 0),
        ("lora_alpha", 0),
        ("lora_alpha", -16),
        ("s2_group_schedule", "1,inf"),
        ("s2_group_schedule", "1e308"),
        ("lora_dropout", 1.0),
        ("lora_dropout", -0.1),
        ("compute_dtype", "fp8"),
        ("attn_backend", "triton"),
        ("trainable_params", "embed,head"),
        ("lora_target", " , "),
    ],
)
def test_config_rejects_bad_values(field, value):
    kwargs = {"model_name_or_path": "m", "target_context": 8192, field: value}
    with pytest.raises(ValueError, match=f"--{field}") as err:
        ModelConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_config_group_size_and_flags():
    assert ModelConfig("m", 8192).group_size == 2048
    assert ModelConfig("m", 8192, group_ratio=1.0).group_size == 8192
    assert ModelConfig("m", 10, group_ratio=0.01).group_size == 1
    assert ModelConfig("m", 100, group_ratio=1 / 3).group_size == 33
    assert ModelConfig("m", 8, trainable_params="").trainable_tokens == []
    assert ModelConfig("m", 8, trainable_params=" norm ,embed").trainable_tokens == ["norm", "embed"]

    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(ModelConfig).parse_args_into_dataclasses(
        [
            "--model_name_or_path",
            "m",
            "--target_context",
            "16384",
            "--no_s2_attention",
            "--lora_r",
            "16",
            "--revision",
            "main",
        ]
    )
    assert (cfg.target_context, cfg.s2_attention, cfg.lora_r, cfg.revision, cfg.load_in_4bit) == (
        16384,
        False,
        16,
        "main",
        True,
    )


# ---------------------------------------------------------------- checks before any weight loads


def test_check_model_applies_interpolation(tiny_dirs, no_weights):
    cfg = config(tiny_dirs["gqa"], target_context=1024, group_ratio=0.125)
    hf_config, info = check_model(cfg)
    assert hf_config.max_position_embeddings == 1024
    assert info.original_context == 128 and info.target_context == 1024
    assert info.pi_factor == pytest.approx(8.0)
    assert info.scaling == "YaRN x8"  # the default --rope_scaling, named in every log and report
    assert cfg.group_sizes == [32, 96, 256]  # the default schedule, 0.25, 0.75 and 2 x (0.125 x 1024)
    assert (info.compute_dtype, info.load_in_4bit, info.attn_backend) == ("float32", True, "sdpa")
    assert info.rope_type not in (None, "default")


def test_a_window_shorter_than_the_target_is_cleared(tmp_path, no_weights):
    """Mistral's sliding window would make the model's own attention (evaluation, the merged model) differ from
    what training attends: check_model clears a window shorter than the target, so both attend the whole row."""
    from transformers import MistralConfig, MistralForCausalLM

    from longqlora.attention import enable_s2_attention

    shape = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
    checked = []
    for window in (64, 8):
        base = MistralConfig(**shape, num_hidden_layers=2, vocab_size=128, max_position_embeddings=32)
        base.sliding_window = window
        base.save_pretrained(tmp_path / str(window))
        checked.append(check_model(config(tmp_path / str(window), target_context=64))[0])
    kept, cleared = checked
    assert (kept.sliding_window, cleared.sliding_window) == (64, None)
    torch.manual_seed(0)
    model = MistralForCausalLM(cleared).eval()
    ids = torch.randint(3, 128, (1, 40))
    own = model(input_ids=ids).logits
    enable_s2_attention(model, 40, full_heads=1.0)  # every head full: training attends as the model's own attention
    torch.testing.assert_close(model.train()(input_ids=ids).logits, own)
    windowed = MistralForCausalLM(MistralConfig(**{**cleared.to_dict(), "sliding_window": 8})).eval()
    windowed.load_state_dict(model.state_dict())
    assert (windowed(input_ids=ids).logits - own).abs().max() > 1e-2  # the window did change what is attended


def test_attention_soft_capping_is_refused_before_loading(tmp_path, no_weights):
    """Gemma-2 soft-caps its attention scores; neither S2-Attn nor SDPA computes that (transformers refused SDPA
    only after the checks): refused in one line naming the flag."""
    from transformers import Gemma2Config

    shape = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, head_dim=16)
    Gemma2Config(**shape, num_hidden_layers=2, vocab_size=128, max_position_embeddings=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"^--model_name_or_path: gemma2 soft-caps its attention scores"):
        check_model(config(tmp_path, target_context=128))
    from transformers import Gemma2ForCausalLM

    from longqlora.evaluation.loading import load_for_inference

    Gemma2ForCausalLM(Gemma2Config.from_pretrained(tmp_path)).save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match=r"^--model: gemma2 soft-caps"):  # evaluation's flag, not training's
        load_for_inference(str(tmp_path / "saved"), load_in_4bit=False, compute_dtype="float32")


def test_a_model_with_rope_in_its_windowed_layers_only_is_refused_before_loading(tmp_path, no_weights):
    """Cohere2 (Command R7B) applies RoPE in its sliding-window layers only: with the window cleared no layer has
    any position encoding (it failed at the first step); refused in one line naming the flag."""
    from transformers import Cohere2Config

    shape = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    Cohere2Config(
        **shape, num_hidden_layers=4, vocab_size=128, max_position_embeddings=64, sliding_window=16
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"^--model_name_or_path: cohere2 applies RoPE only in its sliding-window"):
        check_model(config(tmp_path, target_context=128))
    kept, _ = check_model(config(tmp_path, target_context=64), keep_window=True)  # evaluated as released: fine
    assert kept.sliding_window == 16


def test_a_cleared_window_clears_qwen2s_per_layer_kinds():
    """Qwen2 derives per-layer kinds from its window (`layer_types`): clearing the window also makes every layer
    full attention, and the model then attends as one that never had a window (without that its forward fails)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, vocab_size=100)
    windowed = Qwen2Config(**shape, num_hidden_layers=2, use_sliding_window=True, max_window_layers=0,
                           sliding_window=8, max_position_embeddings=64)  # fmt: skip
    assert windowed.layer_types == ["sliding_attention"] * 2
    lm.clear_short_window(windowed, 64)
    assert (windowed.sliding_window, windowed.use_sliding_window) == (None, False)
    assert windowed.layer_types == ["full_attention"] * 2
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(windowed).eval()
    plain = Qwen2ForCausalLM(Qwen2Config(**shape, num_hidden_layers=2, max_position_embeddings=64)).eval()
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, 100, (1, 40))
    torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_forced_flash_attn_refuses_a_head_dim_over_256(tmp_path, monkeypatch, no_weights):
    from transformers import LlamaConfig

    monkeypatch.setattr(lm.hardware, "backend_problem", lambda backend: None)  # as on an Ampere GPU with flash-attn
    monkeypatch.setattr(lm.hardware, "resolve_backend", lambda backend, device: backend)
    for heads, fails in ((2, True), (4, False)):  # head_dim 320, then 160
        LlamaConfig(hidden_size=640, num_attention_heads=heads, num_key_value_heads=heads).save_pretrained(
            tmp_path / str(heads)
        )
        cfg = config(tmp_path / str(heads), target_context=4096, attn_backend="flash_attn")
        if fails:
            with pytest.raises(ValueError, match="^--attn_backend flash_attn: this model's head_dim 320 is over"):
                check_model(cfg)
        else:
            assert check_model(cfg)[1].attn_backend == "flash_attn"


@pytest.mark.parametrize("name", ["/no/such/model/dir", "./missing-model", "~/no-such-model-here"])
def test_missing_local_path(name, no_weights):
    with pytest.raises(ValueError, match="--model_name_or_path .*no such directory"):
        load_model(config(name))


def test_directory_without_config(tmp_path, no_weights):
    with pytest.raises(ValueError, match="--model_name_or_path .*no config.json"):
        load_model(config(tmp_path))


def test_unknown_hub_id_offline(monkeypatch, no_weights):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        ValueError, match="--model_name_or_path nobody-here/no-such-model: could not be found locally or on the hub"
    ) as err:
        load_model(config("nobody-here/no-such-model"))
    assert "\n" not in str(err.value)


def test_target_below_original(tiny_dirs, no_weights):
    with pytest.raises(ValueError, match="--target_context 64 is below the model's pre-trained context 128"):
        load_model(config(tiny_dirs["gqa"], target_context=64))


def test_model_without_rope(tmp_path, no_weights):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=320, n_positions=128)).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match="--target_context") as err:
        load_model(config(tmp_path))
    assert "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.parametrize("backend", ["flash_attn", "xformers"])
def test_gpu_backend_on_cpu(tiny_dirs, backend, no_weights):
    with pytest.raises(ValueError, match=f"--attn_backend {backend}"):
        load_model(config(tiny_dirs["gqa"], attn_backend=backend))


def test_4bit_without_bitsandbytes(tiny_dirs, monkeypatch, no_weights):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(ValueError, match="--load_in_4bit: bitsandbytes does not import"):
        load_model(config(tiny_dirs["gqa"]))


def test_bf16_on_volta(tiny_dirs, monkeypatch, no_weights):
    monkeypatch.setattr(hardware, "cuda_capability", lambda: (7, 0))
    monkeypatch.setattr(hardware, "supports_bf16", lambda: False)
    with pytest.raises(ValueError, match=r"--compute_dtype bfloat16: this GPU \(sm_70\) has no bf16; use float16"):
        load_model(config(tiny_dirs["gqa"], compute_dtype="bfloat16"))


# ---------------------------------------------------------------- loading, training, saving


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_load_4bit_lora_plus(tiny_dirs):
    import bitsandbytes as bnb
    from peft.utils import ModulesToSaveWrapper

    model, tokenizer, info = load_model(config(tiny_dirs["gqa"]))
    base = model.get_base_model()
    for layer in base.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear = getattr(layer.self_attn, name).base_layer
            assert isinstance(linear, bnb.nn.Linear4bit)
            assert linear.weight.quant_state.quant_type == "nf4" and linear.weight.quant_state.nested
        for name in ("gate_proj", "up_proj", "down_proj"):  # quantized, but no LoRA with --lora_target attention
            assert isinstance(getattr(layer.mlp, name), bnb.nn.Linear4bit)
    assert lora_layers(model) == {"q_proj", "k_proj", "v_proj", "o_proj"}

    wrapped = {
        name.removeprefix("base_model.model.")
        for name, m in model.named_modules()
        if isinstance(m, ModulesToSaveWrapper)
    }
    n = len(base.model.layers)
    assert wrapped == {
        "model.embed_tokens",
        "model.norm",
        *(f"model.layers.{i}.{k}" for i in range(n) for k in ("input_layernorm", "post_attention_layernorm")),
    }
    for name, param in model.named_parameters():
        expect = ".lora_A." in name or ".lora_B." in name or ".modules_to_save.default." in name
        assert param.requires_grad == expect, name
        if expect:
            assert param.dtype == torch.float32, name

    trainable, total = count_trainable(model)
    assert trainable == info.trainable_params == expected_trainable("gqa") == 55936
    assert (trainable, total) == model.get_nb_trainable_parameters()
    # the base's 377472 values (4-bit ones unpacked) plus every trained tensor, the modules_to_save copies included
    assert total == 377472 + trainable

    assert model.config.max_position_embeddings == TARGET
    assert info.pi_factor == pytest.approx(4.0)
    assert tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id == 0 and len(tokenizer) == 320
    assert model.config.use_cache is False
    assert base.is_activation_checkpointing
    assert s2_enabled(model)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")  # PEFT reading a deprecated transformers name
def test_train_step_save_and_reload(tiny_dirs, tmp_path):
    from peft import PeftModel

    cfg = config(tiny_dirs["gqa"])
    model, tokenizer, _ = load_model(cfg)
    torch.manual_seed(0)
    ids = torch.randint(3, 320, (2, TARGET))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    assert math.isfinite(loss.item()) and 4.0 < loss.item() < 8.0  # near ln(320) = 5.77 for a random model
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all(), name
        if ".lora_A." not in name:  # B is zero-initialised, so A gets no gradient on the first step
            assert grad.abs().max() > 0, name
    embed0 = model.get_base_model().model.embed_tokens.original_module.weight.detach().clone()

    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    n_layers = TINY_SHAPES["gqa"][3]
    assert sum(".lora_A." in k for k in saved) == sum(".lora_B." in k for k in saved) == 4 * n_layers
    assert sum(k.endswith("layernorm.weight") for k in saved) == 2 * n_layers
    embed = saved["base_model.model.model.embed_tokens.weight"]
    assert embed.shape == (320, 128) and (embed - embed0).abs().max() > 1e-3  # the trained embedding, not the base
    assert (saved["base_model.model.model.norm.weight"] - 1).abs().max() > 1e-3
    assert len(saved) == 8 * n_layers + 2 * n_layers + 2

    base, _, _ = load_base(cfg)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        again = reloaded(input_ids=ids).logits
    assert torch.allclose(trained, again, atol=1e-5, rtol=1e-5), (trained - again).abs().max()
    with reloaded.disable_adapter(), torch.no_grad():
        base_only = reloaded(input_ids=ids).logits
    assert (base_only - again).abs().max() > 1e-3  # the adapter changes the outputs


@pytest.mark.parametrize("shape", ["odd", "gqa"])
def test_shapes_train(tiny_dirs, shape):
    model, _, info = load_model(config(tiny_dirs[shape]))
    assert info.trainable_params == expected_trainable(shape)
    model.train()
    ids = torch.randint(3, 320, (1, TARGET))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert math.isfinite(loss.item())
    lora_b = [p.grad for n, p in model.named_parameters() if ".lora_B." in n]
    assert len(lora_b) == 4 * TINY_SHAPES[shape][3] and all(g is not None and g.abs().max() > 0 for g in lora_b)


def test_all_linear_and_custom_targets(tiny_dirs):
    model, _, info = load_model(config(tiny_dirs["gqa"], lora_target="all-linear", s2_attention=False))
    assert lora_layers(model) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert info.trainable_params == expected_trainable("gqa", targets=("q", "k", "v", "o", "gate", "up", "down"))

    model, _, _ = load_model(config(tiny_dirs["gqa"], lora_target="q_proj,v_proj", s2_attention=False))
    assert lora_layers(model) == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="--lora_target q_proj,query_key_value: .*query_key_value"):
        load_model(config(tiny_dirs["gqa"], lora_target="q_proj,query_key_value"))
    with pytest.raises(ValueError, match=r"--lora_target q_proj,lm_head: the output head \(lm_head\) takes no LoRA"):
        load_model(config(tiny_dirs["gqa"], lora_target="q_proj,lm_head"))  # the head trains whole (TRL refused)


def test_s2_options_with_s2_attention_off_are_refused():
    for option, value in (("s2_shift", "rolled"), ("s2_sink_tokens", 4), ("s2_full_heads", 0.5), ("s2_full_every", 2)):
        with pytest.raises(ValueError, match=rf"^--{option} .*: an S2-Attn option, and --s2_attention is false"):
            ModelConfig(model_name_or_path="m", target_context=256, s2_attention=False, **{option: value})
    ModelConfig(model_name_or_path="m", target_context=256, s2_attention=False)  # the defaults pass


def test_plain_lora_and_no_checkpointing(tiny_dirs):
    model, _, info = load_model(
        config(tiny_dirs["gqa"], trainable_params="", s2_attention=False), gradient_checkpointing=False
    )
    assert info.modules_to_save is None
    assert info.trainable_params == expected_trainable("gqa") - 320 * 128 - 5 * 128
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert not model.get_base_model().is_activation_checkpointing
    assert not s2_enabled(model)


def test_bf16_compute_keeps_fp32_trainables(tiny_dirs):
    model, _, info = load_model(config(tiny_dirs["gqa"], compute_dtype="bfloat16", s2_attention=False))
    assert info.compute_dtype == "bfloat16"
    q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert q.compute_dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    model.train()
    ids = torch.randint(3, 320, (1, 128))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert math.isfinite(loss.item())


@pytest.mark.parametrize("trainable", ["embed,norm", ""])
def test_bf16_stream_qkv_and_checkpoints(tiny_dirs, monkeypatch, trainable):
    """Under bf16 autocast the frozen embedding, head and norms stay bf16, the trained copies fp32, and what reaches
    the attention op (q/k/v) and every checkpointed layer input is bf16, not fp32 (docs/gpu.md, finding 1)."""
    from longqlora.attention import integration as attention

    model, _, _ = load_model(config(tiny_dirs["gqa"], compute_dtype="bfloat16", trainable_params=trainable))
    base = model.get_base_model()
    assert base.lm_head.weight.dtype == torch.bfloat16
    frozen = [
        p
        for n, p in model.named_parameters()
        if not p.requires_grad and "embed" in n or ".norm." in n and "original_module" in n
    ]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    seen, saved = [], []
    original = attention.s2_attention
    monkeypatch.setattr(
        attention,
        "s2_attention",
        lambda q, k, v, *a, **kw: seen.append((q.dtype, k.dtype, v.dtype)) or original(q, k, v, *a, **kw),
    )

    def pack(t):
        if t.dim() == 3 and t.shape[-1] == 128 and t.shape[1] == 256:  # (B, N, hidden): layer inputs and the like
            saved.append(t.dtype)
        return t

    inputs = []
    for layer in base.model.layers:  # a checkpointed layer's input is what checkpointing keeps
        layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0].dtype))
    model.train()
    ids = torch.randint(3, 320, (1, 256))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert len(seen) == 4 and set(seen) == {(torch.bfloat16,) * 3}  # 2 layers, forward and recomputation
    assert inputs == [torch.bfloat16] * 2
    # saved outside the checkpoints: the two layer inputs in bf16, and only the final norm's own fp32 computation
    assert saved.count(torch.bfloat16) >= 2 and saved.count(torch.float32) <= 2, saved


def test_full_precision_base(tiny_dirs):
    model, _, info = load_model(config(tiny_dirs["gqa"], load_in_4bit=False))
    q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(q) is torch.nn.Linear and q.weight.dtype == torch.float32 and not q.weight.requires_grad
    assert info.trainable_params == expected_trainable("gqa")
    assert info.total_params == 377472 + info.trainable_params
    model.train()
    ids = torch.randint(3, 320, (1, TARGET))
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.get_base_model().model.norm.modules_to_save["default"].weight.grad.abs().max() > 0


def test_modules_to_save_falls_back_to_full_names():
    class MyRMSNorm(torch.nn.Module):
        pass

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = torch.nn.Embedding(4, 4)
            self.blocks = torch.nn.ModuleList(
                [torch.nn.ModuleDict({"norm": MyRMSNorm(), "prenorm": MyRMSNorm(), "gate_norm": torch.nn.Linear(4, 4)})]
            )
            self.final_norm = MyRMSNorm()

        def get_input_embeddings(self):
            return self.tok

    net = Net()
    # "norm" would also match the Linear "gate_norm" by suffix, so full names are needed
    assert modules_to_save(net, ["embed", "norm"]) == sorted(["tok", "blocks.0.norm", "blocks.0.prenorm", "final_norm"])
    assert modules_to_save(net, ["embed"]) == ["tok"]
    del net.blocks[0]["gate_norm"]
    assert modules_to_save(net, ["norm"]) == ["final_norm", "norm", "prenorm"]
    assert modules_to_save(net, []) is None


def test_pad_falls_back_to_eos(tiny_dirs, monkeypatch):
    from transformers import AutoTokenizer

    load = AutoTokenizer.from_pretrained

    def without_unk(*args, **kwargs):
        tok = load(*args, **kwargs)
        tok.unk_token = None
        return tok

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", without_unk)
    model, tokenizer, info = load_base(config(tiny_dirs["gqa"], load_in_4bit=False))
    assert tokenizer.pad_token == "</s>" and tokenizer.pad_token_id == 2 == model.config.pad_token_id
    assert info.pad_token == "</s>" and len(tokenizer) == 320


def test_a_relative_base_is_named_absolutely_and_the_tokenizer_takes_the_target(tmp_path, monkeypatch):
    """A local base named relative to where the run starts is loaded by its absolute path, which PEFT then writes
    into adapter_config.json (plain PEFT from another folder would look the relative one up on the hub); a
    tokenizer capped at the base's context (model_max_length 128) is raised to the target, so the tokenizer saved
    beside the adapter or merged model does not truncate the extended context."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    base = save_tiny_model(tmp_path / "models" / "base", shape="gqa")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.model_max_length = 128
    tokenizer.save_pretrained(base)
    monkeypatch.chdir(tmp_path)
    model, tokenizer, _ = load_base(config("models/base", load_in_4bit=False))
    assert model.name_or_path == str(base) and tokenizer.model_max_length == TARGET
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert peft.peft_config["default"].base_model_name_or_path == str(base)
    unlimited = AutoTokenizer.from_pretrained(save_tiny_model(tmp_path / "other", shape="gqa"))
    assert lm.fit_tokenizer_context(unlimited, TARGET).model_max_length == 1 << 30  # "no limit" stays


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside transformers' tokenizer fallbacks
def test_missing_tokenizer(tiny_dirs, tmp_path, no_weights):
    import shutil

    shutil.copy(tiny_dirs["gqa"] / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match="--model_name_or_path .*cannot load its tokenizer"):
        load_model(config(tmp_path))


def test_count_trainable_4bit_packed_and_unpacked():
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(128, 64, bias=True, quant_type="nf4")
    layer.weight.requires_grad_(False)
    assert not layer.weight.bnb_quantized and count_trainable(layer) == (64, 128 * 64 + 64)
    layer = layer.to("cpu")  # packs two 4-bit values per byte
    assert layer.weight.bnb_quantized and layer.weight.numel() == 128 * 64 // 2
    assert count_trainable(layer) == (64, 128 * 64 + 64)


def test_tied_embeddings_stay_tied(tmp_path):
    path = save_tiny_model(tmp_path / "tied", shape="gqa", tie_word_embeddings=True)
    model, _, info = load_model(config(path, s2_attention=False))
    base = model.get_base_model()
    trained = base.model.embed_tokens.modules_to_save["default"].weight
    assert base.get_output_embeddings().weight is trained and trained.requires_grad
    assert info.trainable_params == expected_trainable("gqa")


def test_trainable_count_without_weights_matches_the_loaded_model(tiny_dirs, monkeypatch):
    from longqlora.model import count_trainable_without_weights

    cfg = config(tiny_dirs["odd"])
    _, _, info = load_model(cfg)
    calls = []
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: calls.append(a))
    counted = count_trainable_without_weights(cfg)
    assert not calls
    assert counted["trainable_params"] == info.trainable_params


def test_a_plain_model_evaluated_as_saved_keeps_its_window(tmp_path):
    """perplexity/passkey/chat on a plain Mistral-7B-v0.1 (no adapter, no --target_context) measure the model as
    released: its sliding window stays, and its logits are plain transformers'; stretched, the window is cleared."""
    from transformers import MistralConfig, MistralForCausalLM

    from longqlora.evaluation.loading import load_for_inference

    folder = save_tiny_model(tmp_path / "mistral", vocab_size=320)  # for its tokenizer
    shape = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256)
    torch.manual_seed(0)
    MistralForCausalLM(
        MistralConfig(**shape, num_hidden_layers=2, vocab_size=320, max_position_embeddings=64, sliding_window=8)
    ).save_pretrained(folder)
    ids = torch.randint(3, 320, (1, 40))
    model, _, _ = load_for_inference(str(folder), compute_dtype="float32")
    assert model.config.sliding_window == 8
    plain = MistralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    stretched, _, _ = load_for_inference(str(folder), compute_dtype="float32", target_context=128)
    assert stretched.config.sliding_window is None


def test_the_dry_run_counts_a_tied_model_as_loading_does(tmp_path):
    """SmolLM2, Qwen2.5 and Llama-3.2 tie their head to the embedding: the meta-device count (--dry_run) equals the
    loaded model's (it counted the head twice)."""
    from longqlora.model import count_trainable_without_weights

    folder = save_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    cfg = config(folder, load_in_4bit=False)
    _, _, info = load_model(cfg)
    assert count_trainable_without_weights(cfg) == {
        "trainable_params": info.trainable_params,
        "total_params": info.total_params,
    }
