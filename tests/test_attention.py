"""S2-Attn semantics, proved against an explicit-mask reference and by perturbation."""

import pytest
import torch
import torch.nn.functional as F

from longqlora import hardware
from longqlora.attention import s2_attention


def reference_s2(q, k, v, group, position_ids=None, attention_mask=None):
    """The specification written out with an explicit N x N mask per head, in float64."""
    b, h, n, d = q.shape
    rep = h // k.shape[1]
    k, v = k.repeat_interleave(rep, 1).double(), v.repeat_interleave(rep, 1).double()
    pos = torch.arange(n).expand(b, n) if position_ids is None else position_ids.expand(b, n)
    doc = torch.zeros(b, n, dtype=torch.long)
    doc[:, 1:] = (pos[:, 1:] != pos[:, :-1] + 1).long().cumsum(1)
    valid = torch.ones(b, n, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    out = torch.zeros(b, h, n, d, dtype=torch.float64)
    for head in range(h):
        shift = 0 if head < h // 2 else group // 2
        seg = torch.div(pos + shift, group, rounding_mode="floor")
        allowed = ((seg[:, :, None] == seg[:, None, :]) & (doc[:, :, None] == doc[:, None, :])
                   & torch.ones(n, n, dtype=torch.bool).tril() & valid[:, None, :])
        scores = q[:, head].double() @ k[:, head].transpose(-1, -2) / d ** 0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.nan_to_num(scores.softmax(-1))
        out[:, head] = (probs @ v[:, head]) * valid[:, :, None]
    return out


def rand_qkv(b, h, h_kv, n, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g, dtype=dtype), torch.randn(b, h_kv, n, d, generator=g, dtype=dtype),
            torch.randn(b, h_kv, n, d, generator=g, dtype=dtype))


HEADS = [(4, 4), (4, 2), (3, 1), (9, 3), (5, 5), (8, 1)]


@pytest.mark.parametrize("h,h_kv", HEADS)
@pytest.mark.parametrize("n,group", [(16, 4), (37, 8), (37, 5), (7, 64), (1, 4), (20, 1), (33, 16)])
def test_matches_reference_plain(h, h_kv, n, group):
    q, k, v = rand_qkv(2, h, h_kv, n)
    got = s2_attention(q, k, v, group)
    torch.testing.assert_close(got, reference_s2(q, k, v, group), atol=1e-10, rtol=1e-10)


def packed_positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)


@pytest.mark.parametrize("h,h_kv", HEADS)
@pytest.mark.parametrize("lengths,group", [((10, 20, 7), 8), ((3, 3, 3, 30), 6), ((40,), 8), ((1, 12, 5), 5)])
def test_matches_reference_packed(h, h_kv, lengths, group):
    n = sum(lengths)
    q, k, v = rand_qkv(2, h, h_kv, n, seed=1)
    pos = packed_positions(lengths)
    got = s2_attention(q, k, v, group, position_ids=pos)
    torch.testing.assert_close(got, reference_s2(q, k, v, group, position_ids=pos), atol=1e-10, rtol=1e-10)


def padding_masks(n):
    right = torch.ones(3, n, dtype=torch.long)
    right[0, n - 5:] = 0
    right[2, n // 2:] = 0
    left = right.flip(1)
    holes = torch.ones(3, n, dtype=torch.long)
    holes[0, ::3] = 0
    holes[1, 4:9] = 0
    holes[2] = 0  # an all-padding row must stay finite
    return {"right": right, "left": left, "holes": holes}


@pytest.mark.parametrize("kind", ["right", "left", "holes"])
@pytest.mark.parametrize("h,h_kv", [(4, 2), (3, 1), (9, 3)])
@pytest.mark.parametrize("packed", [False, True])
def test_matches_reference_padded(kind, h, h_kv, packed):
    n, group = 30, 8
    mask = padding_masks(n)[kind]
    pos = packed_positions((13, 17)) if packed else None
    q, k, v = rand_qkv(3, h, h_kv, n, seed=2)
    got = s2_attention(q, k, v, group, position_ids=pos, attention_mask=mask)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, reference_s2(q, k, v, group, pos, mask), atol=1e-10, rtol=1e-10)
    # Padding keys are never attended: changing them moves no real output.
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :][~mask.bool()[:, None, :].expand_as(k2[..., 0])] = 100.0
    v2[~mask.bool()[:, None, :].expand_as(v2[..., 0])] = -100.0
    again = s2_attention(q, k2, v2, group, position_ids=pos, attention_mask=mask)
    torch.testing.assert_close(again, got, atol=1e-10, rtol=1e-10)


def test_one_group_unshifted_heads_equal_causal_sdpa():
    q, k, v = rand_qkv(2, 6, 3, 48, dtype=torch.float32)
    got = s2_attention(q, k, v, 48)
    full = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(got[:, :3], full[:, :3], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got[:, 3:], full[:, 3:], atol=1e-3)  # shifted heads split at G/2


def test_causal_by_perturbation():
    q, k, v = rand_qkv(1, 4, 2, 64, dtype=torch.float32)
    base = s2_attention(q, k, v, 16)
    for t in (5, 31, 50):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        q2[:, :, t:] += 3.0
        k2[:, :, t:] -= 2.0
        v2[:, :, t:] *= -5.0
        after = s2_attention(q2, k2, v2, 16)
        assert torch.equal(after[:, :, :t], base[:, :, :t])
        assert not torch.allclose(after[:, :, t:], base[:, :, t:])


def test_no_wrap_around():
    """LongLoRA's rolled shift lets the last shifted group see the first tokens; ours must not."""
    n, group = 64, 16
    q, k, v = rand_qkv(1, 2, 2, n, dtype=torch.float32)
    base = s2_attention(q, k, v, group)
    k2, v2 = k.clone(), v.clone()
    v2[:, :, : group // 2] += 10.0
    k2[:, :, : group // 2] += 10.0
    after = s2_attention(q, k2, v2, group)
    # Shifted head 1: only its first half group [0, 8) may change; unshifted head 0: only [0, 16).
    assert torch.equal(after[:, 1, group // 2:], base[:, 1, group // 2:])
    assert torch.equal(after[:, 0, group:], base[:, 0, group:])
    assert not torch.allclose(after[:, 1, : group // 2], base[:, 1, : group // 2])


def test_packed_documents_are_independent():
    lengths = (11, 25, 9)
    q, k, v = rand_qkv(1, 4, 2, sum(lengths), dtype=torch.float32, seed=3)
    packed = s2_attention(q, k, v, 8, position_ids=packed_positions(lengths))
    start = 0
    for n in lengths:
        alone = s2_attention(q[:, :, start:start + n], k[:, :, start:start + n], v[:, :, start:start + n], 8)
        torch.testing.assert_close(packed[:, :, start:start + n], alone, atol=1e-6, rtol=1e-5)
        start += n


def test_grouped_and_banded_paths_agree():
    """Offsetting all positions by a multiple of G keeps the segments but forces the general (banded) path."""
    q, k, v = rand_qkv(2, 4, 2, 40, dtype=torch.float32, seed=4)
    fast = s2_attention(q, k, v, 8)
    banded = s2_attention(q, k, v, 8, position_ids=torch.arange(40).unsqueeze(0) + 16)
    torch.testing.assert_close(banded, fast, atol=1e-6, rtol=1e-5)


def test_gradients_flow_and_match_reference():
    q, k, v = (t.requires_grad_() for t in rand_qkv(1, 3, 1, 21, seed=5))
    s2_attention(q, k, v, 6).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    reference_s2(q, k, v, 6).square().sum().backward()
    for got, want in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_bad_arguments():
    q, k, v = rand_qkv(1, 4, 3, 8)
    with pytest.raises(ValueError, match="multiple"):
        s2_attention(q, k, v, 4)
    q, k, v = rand_qkv(1, 4, 2, 8)
    with pytest.raises(ValueError, match="group_size"):
        s2_attention(q, k, v, 0)
    with pytest.raises(ValueError, match="--attn_backend"):
        s2_attention(q, k, v, 4, backend="flash_attn")
    with pytest.raises(ValueError, match="--attn_backend"):
        s2_attention(q, k, v, 4, backend="nonsense")


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@CUDA
@pytest.mark.parametrize("backend", ["sdpa", "flash_attn", "xformers"])
@pytest.mark.parametrize("packed", [False, True])
def test_gpu_backends_agree_with_reference(backend, packed):
    if hardware.backend_problem(backend):
        pytest.skip(hardware.backend_problem(backend))
    n, group = 1000, 128
    pos = packed_positions((300, 450, 250)) if packed else None
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, 900:] = 0
    q, k, v = rand_qkv(2, 8, 2, n, d=64, dtype=torch.float32, seed=6)
    want = reference_s2(q, k, v, group, pos, mask).float()
    got = s2_attention(*(t.cuda().bfloat16() for t in (q, k, v)), group, position_ids=pos, attention_mask=mask,
                       backend=backend)
    assert (got.float().cpu() - want).norm() / want.norm() < 2e-2


@CUDA
def test_gpu_auto_backend_equals_forced_sdpa():
    q, k, v = (t.cuda().bfloat16() for t in rand_qkv(1, 8, 8, 2048, d=64, dtype=torch.float32))
    auto = s2_attention(q, k, v, 512)
    sdpa = s2_attention(q, k, v, 512, backend="sdpa")
    assert (auto.float() - sdpa.float()).norm() / sdpa.float().norm() < 1e-2
