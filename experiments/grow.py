"""Grow a small pre-trained Llama into a wider and deeper one that computes the same function (Net2Net, Chen et al.
2015, arXiv 1511.05641, §3: "function-preserving transformations").

Why: the ablations' larger base (22.5M parameters) formed no induction head in the copy steps that fit in an hour
(docs/ablations.md, "A larger base"), while the 2.75M base forms one near step 1000-1250. Grown from that base, the
larger model copies from its first step and its pre-training on the mix spends the hour on text and recall instead.

The map, for a width ratio r = hidden' / hidden (an integer) and the same head_dim:
- the residual stream is the old one repeated r times: x' = [x, ..., x] (RMSNorm of x' is then [n(x), ...] with the
  norm weight repeated, so every norm output is repeated too);
- a projection that reads the stream reads each copy at 1/r (q/k/v, gate/up, LM head), so the old units see x;
- the old heads and MLP units are the first ones; the new heads and units are drawn at the model's initializer but
  write nothing yet: their columns of o_proj and down_proj are zero, and o_proj/down_proj write each old output
  into every copy of the stream;
- new layers are identities (their o_proj and down_proj are zero), interleaved between the old ones.
The new units' random reads make the gradients of the copies differ, so the copies separate once training starts.
"""

from __future__ import annotations

import torch


def _repeat_cols(weight: torch.Tensor, r: int) -> torch.Tensor:
    """(out, in) -> (out, r x in): reads r copies of the stream at 1/r each."""
    return weight.repeat(1, r) / r


def _write_copies(weight: torch.Tensor, r: int, inner: int) -> torch.Tensor:
    """(hidden, inner_old) -> (r x hidden, inner): writes each old output into every copy; new inputs write 0."""
    out = weight.new_zeros(r * weight.shape[0], inner)
    out[:, : weight.shape[1]] = weight.repeat(r, 1)
    return out


def _grow_layer(old, new, r: int) -> None:
    """Copy decoder layer `old` into the wider layer `new` (in place), keeping its function on repeated streams."""
    attn, mlp = new.self_attn, new.mlp
    heads_dim, kv_dim = old.self_attn.q_proj.weight.shape[0], old.self_attn.k_proj.weight.shape[0]
    for name, rows in (("q_proj", heads_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)):
        getattr(attn, name).weight[:rows] = _repeat_cols(getattr(old.self_attn, name).weight, r)
    attn.o_proj.weight.copy_(_write_copies(old.self_attn.o_proj.weight, r, attn.o_proj.weight.shape[1]))
    inter = old.mlp.gate_proj.weight.shape[0]
    mlp.gate_proj.weight[:inter] = _repeat_cols(old.mlp.gate_proj.weight, r)
    mlp.up_proj.weight[:inter] = _repeat_cols(old.mlp.up_proj.weight, r)
    mlp.down_proj.weight.copy_(_write_copies(old.mlp.down_proj.weight, r, mlp.down_proj.weight.shape[1]))
    new.input_layernorm.weight.copy_(old.input_layernorm.weight.repeat(r))
    new.post_attention_layernorm.weight.copy_(old.post_attention_layernorm.weight.repeat(r))


def _identity_layer(layer) -> None:
    """A layer that adds nothing to the stream until trained: its writes (o_proj, down_proj) are zero."""
    layer.self_attn.o_proj.weight.zero_()
    layer.mlp.down_proj.weight.zero_()


def grow_llama(small, config, seed: int = 0):
    """A LlamaForCausalLM of `config` that computes what `small` computes (same logits, to float rounding).

    `config` must keep the vocabulary and head_dim, multiply hidden_size by an integer r (and the heads with it), and
    have at least as many layers, heads per KV head and MLP units. No bias terms (Llama has none)."""
    from transformers import LlamaForCausalLM

    old = small.config
    r, rest = divmod(config.hidden_size, old.hidden_size)
    problems = [
        rest and "hidden_size must be an integer multiple of the small model's",
        config.vocab_size != old.vocab_size and "vocab_size must equal the small model's (its tokenizer is reused)",
        config.head_dim != old.head_dim and "head_dim must equal the small model's",
        config.num_hidden_layers < old.num_hidden_layers and "num_hidden_layers must not shrink",
        config.intermediate_size < old.intermediate_size and "intermediate_size must not shrink",
        config.num_attention_heads * old.num_key_value_heads != old.num_attention_heads * config.num_key_value_heads
        and "the query heads per KV head must stay the same",
        (config.tie_word_embeddings or old.tie_word_embeddings) and "tied embeddings cannot be grown this way",
    ]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(f"--grow_from: {'; '.join(problems)}")
    torch.manual_seed(seed)
    big = LlamaForCausalLM(config)
    old_layers, new_layers = small.model.layers, big.model.layers
    # old layer i lands at i x L'/L: the new identity layers fall between them
    places = {round(i * len(new_layers) / len(old_layers)): i for i in range(len(old_layers))}
    with torch.no_grad():
        big.model.embed_tokens.weight.copy_(small.model.embed_tokens.weight.repeat(1, r))
        big.model.norm.weight.copy_(small.model.norm.weight.repeat(r))
        big.lm_head.weight.copy_(_repeat_cols(small.lm_head.weight, r))
        for j, layer in enumerate(new_layers):
            if j in places:
                _grow_layer(old_layers[places[j]], layer, r)
            else:
                _identity_layer(layer)
    return big
