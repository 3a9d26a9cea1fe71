"""experiments/grow.py: a small Llama grown wider and deeper computes the same logits, separates its copies once
trained, refuses shapes it cannot grow into, and pretrain_base caches and records a grown base."""

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from experiments.grow import grow_llama
from experiments.small_base import SmallLlamaConfig, pretrain_base
from longqlora.training.tiny import tiny_llama_config, train_tokenizer


def llama(hidden, layers, inter, heads, kv_heads, vocab=128, seed=0):
    config = tiny_llama_config(
        "gqa",
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=32,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a trained-looking model: norms away from 1, weights larger than the initializer's
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize(
    "small_shape, big_shape",
    [
        ((64, 2, 192, 2, 2), (128, 5, 384, 4, 4)),  # x2 wide, 2 -> 5 layers (odd: identities between and after)
        ((64, 2, 192, 2, 1), (192, 3, 256, 6, 3)),  # GQA 2:1 kept, x3 wide, MLP units not a multiple
    ],
)
def test_grown_model_computes_the_same_logits(small_shape, big_shape):
    small = llama(*small_shape).eval()
    big = grow_llama(small, llama(*big_shape).config).eval()
    assert big.num_parameters() > 2 * small.num_parameters()
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        want, got = small(ids).logits, big(ids).logits
    assert want.abs().max() > 1  # not a trivially flat model
    assert (want - got).abs().max() < 1e-4


def test_the_copies_separate_once_trained():
    small = llama(64, 2, 192, 2, 2)
    big = grow_llama(small, llama(128, 3, 384, 4, 4).config)
    emb = big.model.embed_tokens.weight
    assert torch.equal(emb[:, :64], emb[:, 64:])
    optimizer = torch.optim.SGD(big.parameters(), lr=0.1)
    ids = torch.randint(0, 128, (2, 40))
    for _ in range(2):  # step 1 lets the new heads write; step 2 sends different gradients to the two copies
        big(ids, labels=ids).loss.backward()
        optimizer.step(), optimizer.zero_grad()
    assert (emb[:, :64] - emb[:, 64:]).abs().max() > 1e-6


@pytest.mark.parametrize(
    "big_shape, vocab, message",
    [
        ((96, 2, 192, 3, 3), 128, "integer multiple"),
        ((128, 2, 192, 4, 4), 256, "vocab_size"),
        ((128, 1, 192, 4, 4), 128, "must not shrink"),
        ((128, 2, 192, 4, 1), 128, "per KV head"),
    ],
)
def test_shapes_it_cannot_grow_into_are_refused(big_shape, vocab, message):
    small = llama(64, 2, 192, 2, 2)
    with pytest.raises(ValueError, match=f"--grow_from: .*{message}"):
        grow_llama(small, llama(*big_shape, vocab=vocab).config)


def test_pretrain_base_grows_caches_and_records(tmp_path):
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 200
    source = tmp_path / "small"
    llama(64, 2, 192, 2, 2, vocab=512).save_pretrained(source)
    train_tokenizer([text], vocab_size=512).save_pretrained(source)  # byte-level: 259 ids before any merge
    (source / "pretrain.json").write_text("{}")
    with pytest.raises(ValueError, match="--grow_from .*pretrain.json"):
        SmallLlamaConfig(grow_from=str(tmp_path))
    cfg = SmallLlamaConfig(
        short_context=32, vocab_size=512, hidden_size=128, num_layers=3, intermediate_size=384, num_heads=4,
        pretrain_steps=1, grow_from=str(source),
    )  # fmt: skip
    cfg.output_dir = str(tmp_path / "cache")
    out = pretrain_base(cfg, {"book": text})
    record = json.loads((out / "pretrain.json").read_text())
    assert (
        record["grown_from"] == "small"
        and record["grown_from_parameters"] == LlamaForCausalLM.from_pretrained(source).num_parameters()
    )
    grown = LlamaForCausalLM.from_pretrained(out)
    assert grown.config.hidden_size == 128 and grown.config.num_hidden_layers == 3
    assert record["parameters"] == grown.num_parameters()
    assert pretrain_base(cfg, {"book": text}) == out  # cached by its settings, the source included


def test_the_report_names_the_source_of_a_grown_base():
    from experiments.ablation_report import _grown_text

    text = _grown_text({"grown_from": "base-5eafb088", "grown_from_parameters": 2753792})
    assert text.startswith("grown from the 2,753,792-parameter base `base-5eafb088`")
    assert _grown_text({"copy_steps": 1600}) == ""  # a base trained from scratch says nothing of growth
