"""The varlen kernel paths of S2-Attn (flash-attn, PyTorch's varlen_attn, xformers) driven on the CPU through fakes
that check their calling conventions as the libraries' Python wrappers do, which kernel each backend picks, and that
the row layout is built once per forward."""

import types

import pytest
import torch
import torch.nn.functional as F
from test_attention import HEADS, packed_positions, rand_qkv, reference_s2

from longqlora import hardware
from longqlora.attention import layout as s2_layout
from longqlora.attention import op as attention
from longqlora.attention.op import s2_attention, varlen_choice


def _segments(q, k, v, cu, max_len, scale):
    """Causal attention per segment of (T, H, D) streams, GQA broadcast: the reference every fake computes with."""
    assert cu.dtype == torch.int32 and cu.dim() == 1 and int(cu[0]) == 0 and int(cu[-1]) == q.shape[0]
    assert isinstance(max_len, int) and max_len == int((cu[1:] - cu[:-1]).max())
    assert q.dim() == k.dim() == v.dim() == 3 and q.stride(-1) == 1 and q.shape[1] % k.shape[1] == 0
    out = torch.empty_like(q)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        o = F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1),
            k[a:b].transpose(0, 1),
            v[a:b].transpose(0, 1),
            is_causal=True,
            scale=scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        out[a:b] = o.transpose(0, 1)
    return out


class Calls(list):
    """Records (kernel, query heads, key heads) of each fake call."""


def fake_flash(calls):
    def flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
        **_,
    ):
        assert causal and dropout_p == 0.0 and torch.equal(cu_seqlens_q, cu_seqlens_k)
        calls.append(("flash_attn", q.shape[1], k.shape[1]))
        return _segments(q, k, v, cu_seqlens_q, max_seqlen_q, softmax_scale)

    return types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func)


def fake_torch_varlen(calls, style):
    """The two spellings of torch.nn.attention.varlen.varlen_attn: `is_causal=` (torch 2.9-2.10) and
    `window_size=(-1, 0)` with scale and enable_gqa (later releases)."""
    if style == "is_causal":

        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            assert is_causal and query.shape[1] == key.shape[1]  # no GQA in this version: repeated heads
            calls.append(("torch", query.shape[1], key.shape[1]))
            return _segments(query, key, value, cu_seq_q, max_q, None)
    else:

        def varlen_attn(
            query,
            key,
            value,
            cu_seq_q,
            cu_seq_k,
            max_q,
            max_k,
            *,
            return_aux=None,
            scale=None,
            window_size=(-1, -1),
            enable_gqa=False,
            seqused_k=None,
            block_table=None,
            num_splits=None,
        ):
            assert tuple(window_size) == (-1, 0)
            assert enable_gqa == (query.shape[1] != key.shape[1])
            calls.append(("torch", query.shape[1], key.shape[1]))
            return _segments(query, key, value, cu_seq_q, max_q, scale)

    return varlen_attn


def fake_xformers(calls):
    class BlockDiagonalCausalMask:
        def __init__(self, lengths):
            self.lengths = lengths

        @classmethod
        def from_seqlens(cls, q_seqlen, kv_seqlen=None):
            assert isinstance(q_seqlen, list) and all(isinstance(x, int) for x in q_seqlen)
            return cls(q_seqlen)

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, **_):
        assert query.dim() == 4 and query.shape[0] == 1 and query.shape[2] == key.shape[2]  # (1, T, H, D), no GQA
        calls.append(("xformers", query.shape[2], key.shape[2]))
        cu = F.pad(torch.tensor(attn_bias.lengths).cumsum(0), (1, 0)).to(torch.int32)
        return _segments(query[0], key[0], value[0], cu, max(attn_bias.lengths), scale).unsqueeze(0)

    return types.SimpleNamespace(
        memory_efficient_attention=memory_efficient_attention,
        fmha=types.SimpleNamespace(attn_bias=types.SimpleNamespace(BlockDiagonalCausalMask=BlockDiagonalCausalMask)),
    )


@pytest.fixture
def kernels(monkeypatch):
    """Route s2_attention on the CPU to one fake varlen kernel: kernels(name, gqa[, style]) -> the call log."""

    def use(name, gqa, style="window_size"):
        calls = Calls()
        monkeypatch.setattr(hardware, "flash_attn_module", lambda: fake_flash(calls))
        monkeypatch.setattr(hardware, "xformers_ops", lambda: fake_xformers(calls))
        fn = fake_torch_varlen(calls, style)
        features = {"fn": fn, "causal": style, "scale": style != "is_causal", "enable_gqa": style != "is_causal"}
        monkeypatch.setattr(hardware, "torch_varlen", lambda: features)
        monkeypatch.setattr(attention, "_varlen_kernel", lambda *a: (name, gqa))
        return calls

    return use


CASES = [
    (name, gqa, style)
    for name, gqa, style in [
        ("flash_attn", True, None),
        ("torch", True, "window_size"),
        ("torch", False, "is_causal"),
        ("xformers", False, None),
    ]
]


@pytest.mark.parametrize("name,gqa,style", CASES)
@pytest.mark.parametrize("h,h_kv", HEADS)
@pytest.mark.parametrize("rows", ["plain", "packed", "padded"])
def test_varlen_kernels_match_the_reference(kernels, name, gqa, style, h, h_kv, rows):
    calls = kernels(name, gqa, style or "window_size")
    lengths, group = (10, 23, 7), 8
    n = sum(lengths)
    q, k, v = rand_qkv(2, h, h_kv, n, seed=3)
    pos = packed_positions(lengths) if rows == "packed" else None
    mask = None
    if rows == "padded":
        mask = torch.ones(2, n, dtype=torch.long)
        mask[0, :5] = 0  # left padding
        mask[1, 30:] = 0
    got = s2_attention(q, k, v, group, position_ids=pos, attention_mask=mask)
    want = reference_s2(q, k, v, group, pos, mask)
    if rows == "plain":
        assert calls == []  # plain rows keep SDPA's grouped path, the forced kernels aside
        return
    assert torch.allclose(got, want, atol=1e-10), (got - want).abs().max()
    assert len(calls) == 2  # one call per head half
    # GQA goes to the kernel unrepeated where it takes it and the head halves do not split a KV group
    aligned = h_kv > 1 and (h // 2) % (h // h_kv) == 0 and h % 2 == 0
    expect_kv = [
        h1 // (h // h_kv) - h0 // (h // h_kv) if gqa and aligned else h1 - h0
        for h0, h1, kind in attention.head_split(h, 0.0)
        if h1 > h0
    ]
    assert [c[2] for c in calls] == expect_kv


@pytest.mark.parametrize("name,gqa,style", CASES)
def test_varlen_rows_stay_apart_where_a_row_is_one_segment(kernels, name, gqa, style):
    """Row 0 holds 3 tokens after its padding, under one group: one segment, whose id equals the next row's first
    one. The stream keeps rows apart by offsetting each row's ids (cu_seqlens [0, 3, 11], not [0, 11], where row 1
    would attend row 0); the result equals the reference with its own mask."""
    kernels(name, gqa, style or "window_size")
    q, k, v = rand_qkv(2, 4, 2, 8, seed=5)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :5] = 0
    assert torch.allclose(
        s2_attention(q, k, v, 8, attention_mask=mask), reference_s2(q, k, v, 8, None, mask), atol=1e-10
    )
    rows = s2_layout.build(None, mask, 2, 8, "cpu")
    for group in (8, s2_layout.WHOLE):
        assert rows.varlen(group, 0).cu_seqlens.tolist() == [0, 3, 11]


@pytest.mark.parametrize("name", ["flash_attn", "xformers"])
def test_forced_gpu_kernel_runs_plain_rows_too(kernels, monkeypatch, name):
    calls = kernels(name, name == "flash_attn")
    monkeypatch.setattr(attention, "_check_backend", lambda backend, query: backend)
    q, k, v = rand_qkv(1, 4, 2, 40, seed=4)
    got = s2_attention(q, k, v, 8, backend=name)
    assert torch.allclose(got, reference_s2(q, k, v, 8), atol=1e-10) and len(calls) == 2


def test_gradients_through_the_varlen_path(kernels):
    kernels("torch", True)
    pos = packed_positions((12, 20))
    q, k, v = (t.requires_grad_() for t in rand_qkv(1, 4, 2, 32, seed=5))
    s2_attention(q, k, v, 8, position_ids=pos).pow(2).sum().backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    reference_s2(q2, k2, v2, 8, pos).pow(2).sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert torch.allclose(a.grad, b.grad, atol=1e-10)


@pytest.fixture
def gpu(monkeypatch):
    """Pretend to be a GPU of capability `cap` with the given packages: gpu(cap, flash=, xformers=, torch_varlen=)."""

    def setup(cap, flash=False, xformers=False, torch_varlen=False, enable_gqa=True):
        monkeypatch.setattr(hardware, "cuda_capability", lambda: cap)
        monkeypatch.setattr(hardware, "flash_attn_module", lambda: object() if flash else None)
        monkeypatch.setattr(hardware, "xformers_ops", lambda: object() if xformers else None)
        features = {"fn": None, "causal": "window_size", "scale": True, "enable_gqa": enable_gqa}
        monkeypatch.setattr(hardware, "torch_varlen", lambda: features if torch_varlen else None)

    return setup


def test_auto_prefers_flash_then_torch_then_xformers(gpu):
    bf16 = torch.bfloat16
    gpu((9, 0), flash=True, xformers=True, torch_varlen=True)
    assert varlen_choice("auto", "cuda", bf16, 128) == ("flash_attn", True)
    gpu((9, 0), xformers=True, torch_varlen=True)
    assert varlen_choice("auto", "cuda", bf16, 128) == ("torch", True)
    assert varlen_choice("sdpa", "cuda", bf16, 128) == ("torch", True)
    assert varlen_choice("auto", "cuda", bf16, 128, dropout=0.1) == ("xformers", False)  # torch's has no dropout
    gpu((7, 0), xformers=True)  # a V100
    assert varlen_choice("auto", "cuda", torch.float16, 128) == ("xformers", False)
    assert varlen_choice("sdpa", "cuda", torch.float16, 128) is None  # banded SDPA
    gpu((8, 0), torch_varlen=True, enable_gqa=False)
    assert varlen_choice("auto", "cuda", bf16, 128) == ("torch", False)
    assert varlen_choice("auto", "cuda", bf16, 288) is None  # beyond the flash kernels' head dims
    assert varlen_choice("auto", "cuda", torch.float32, 128) is None  # fp32: SDPA
    assert varlen_choice("auto", "cpu", bf16, 128) is None


def test_sdpa_broadcasts_gqa_only_where_its_flash_kernel_runs(gpu):
    gpu((7, 0))
    assert not hardware.sdpa_gqa_ok("cuda")
    gpu((8, 0))
    assert hardware.sdpa_gqa_ok("cuda") and hardware.sdpa_gqa_ok("cuda", torch.bfloat16)
    assert not hardware.sdpa_gqa_ok("cuda", torch.float32)  # no flash kernel for fp32: the heads are repeated
    assert hardware.sdpa_gqa_ok("cpu") and hardware.sdpa_gqa_ok("cpu", torch.float32)


def test_auto_kernels_describes_the_choice(gpu, monkeypatch):
    monkeypatch.setattr(hardware, "backend_problem", lambda b: None if b == "sdpa" else "missing")
    gpu((9, 0), torch_varlen=True)
    assert hardware.auto_kernels("cuda") == "sdpa (packed rows: torch varlen)"
    assert hardware.resolve_backend("auto", "cuda") == "auto" and hardware.resolve_backend(None, "cpu") == "sdpa"


def test_layout_is_built_once_per_forward_and_backward(monkeypatch):
    """One RowLayout for the whole step of a checkpointed 2-layer model on packed rows: the syncs that decide shapes
    (position check, segment lengths) happen once, not in every layer and every recomputation."""
    from transformers import AutoModelForCausalLM

    from longqlora.attention import enable_s2_attention
    from longqlora.training.tiny import tiny_llama_config

    built = []
    original = s2_layout.RowLayout
    monkeypatch.setattr(s2_layout, "RowLayout", lambda **kw: built.append(1) or original(**kw))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config("gqa"), attn_implementation="sdpa")
    enable_s2_attention(model, 16)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(3, 320, (1, 96))
    pos = packed_positions((40, 56))
    model(input_ids=ids, position_ids=pos, labels=ids).loss.backward()
    assert len(built) == 1
    model(input_ids=ids, position_ids=packed_positions((50, 46)), labels=ids).loss.backward()
    assert len(built) == 2  # a new batch, a new layout


def test_layout_is_not_reused_after_an_in_place_change():
    pos = packed_positions((4, 4))
    first = s2_layout.build(pos, None, 1, 8, "cpu")
    assert s2_layout.build(pos, None, 1, 8, "cpu") is first
    pos[0, 4:] += 4  # now one document 0..7
    again = s2_layout.build(pos, None, 1, 8, "cpu")
    assert again is not first and again.positions is None and again.grouped
