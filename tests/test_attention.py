"""S2-Attn semantics, proved against an explicit-mask reference and by perturbation."""

import pytest
import torch
import torch.nn.functional as F

from longqlora import hardware
from longqlora.attention.op import head_split, s2_attention


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
        allowed = (
            (seg[:, :, None] == seg[:, None, :])
            & (doc[:, :, None] == doc[:, None, :])
            & torch.ones(n, n, dtype=torch.bool).tril()
            & valid[:, None, :]
        )
        scores = q[:, head].double() @ k[:, head].transpose(-1, -2) / d**0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.nan_to_num(scores.softmax(-1))
        out[:, head] = (probs @ v[:, head]) * valid[:, :, None]
    return out


def rand_qkv(b, h, h_kv, n, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, h, n, d, generator=g, dtype=dtype),
        torch.randn(b, h_kv, n, d, generator=g, dtype=dtype),
        torch.randn(b, h_kv, n, d, generator=g, dtype=dtype),
    )


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
    right[0, n - 5 :] = 0
    right[2, n // 2 :] = 0
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
    assert torch.equal(after[:, 1, group // 2 :], base[:, 1, group // 2 :])
    assert torch.equal(after[:, 0, group:], base[:, 0, group:])
    assert not torch.allclose(after[:, 1, : group // 2], base[:, 1, : group // 2])


def test_packed_documents_are_independent():
    lengths = (11, 25, 9)
    q, k, v = rand_qkv(1, 4, 2, sum(lengths), dtype=torch.float32, seed=3)
    packed = s2_attention(q, k, v, 8, position_ids=packed_positions(lengths))
    start = 0
    for n in lengths:
        alone = s2_attention(q[:, :, start : start + n], k[:, :, start : start + n], v[:, :, start : start + n], 8)
        torch.testing.assert_close(packed[:, :, start : start + n], alone, atol=1e-6, rtol=1e-5)
        start += n


def test_layout_is_not_reused_for_a_new_mask_at_a_freed_ones_address():
    """One position-ids tensor, a new padding mask each call (freed in between, so its id can recur): every call
    is the reference for its own mask, never the layout cached for an earlier one."""
    q, k, v = rand_qkv(2, 4, 4, 16)
    pos = packed_positions([8, 8])
    for cut in (16, 12, 9, 5, 14, 3, 11, 7):
        mask = torch.ones(2, 16, dtype=torch.long)
        mask[1, cut:] = 0
        out = s2_attention(q, k, v, 4, position_ids=pos, attention_mask=mask)
        real = mask.bool()[:, None, :, None]
        ref = reference_s2(q, k, v, 4, position_ids=pos, attention_mask=mask)
        torch.testing.assert_close(out * real, ref * real)
        del mask


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


@pytest.mark.parametrize("h,h_kv", [(6, 2), (5, 5), (4, 1)])
def test_one_half_of_the_heads_equals_its_rows_of_all(h, h_kv, monkeypatch):
    """heads="plain" / "shifted" (context parallelism's overlap) compute only those heads, their rows equal to the
    whole op's, packed rows included; anything else is refused."""
    from longqlora.attention import kernels

    computed = []

    def counted(kernel):
        def run(out, *args, **kwargs):
            computed.append(out.shape[1])  # the heads it writes
            return kernel(out, *args, **kwargs)

        return run

    for name in ("sdpa_groups", "sdpa_banded"):
        monkeypatch.setattr(kernels, name, counted(getattr(kernels, name)))
    q, k, v = rand_qkv(1, h, h_kv, 40, seed=7)
    pos = torch.cat([torch.arange(17), torch.arange(23)]).unsqueeze(0)
    split = head_split(h, 0.0)[2][0]
    for positions in (None, pos):
        whole = s2_attention(q, k, v, 8, position_ids=positions)
        plain = s2_attention(q, k, v, 8, position_ids=positions, heads="plain")
        shifted = s2_attention(q, k, v, 8, position_ids=positions, heads="shifted")
        torch.testing.assert_close(plain[:, :split], whole[:, :split], atol=0, rtol=0)
        torch.testing.assert_close(shifted[:, split:], whole[:, split:], atol=0, rtol=0)
        documents = 1 if positions is None else 2  # packed rows run one call per document
        assert computed == ([split] * documents + [h - split] * documents) * 2  # the heads each call ran, no more
        computed.clear()
    with pytest.raises(ValueError, match="heads 'full'"):
        s2_attention(q, k, v, 8, heads="full")


@pytest.mark.parametrize("kernel", [None, ("flash_attn", True)])
def test_rows_of_padding_only_give_zeros_and_zero_gradients(kernel, monkeypatch):
    """A batch of padding only (a context-parallel rank's chunk of short conversations): zeros out, zero gradients
    (not None: DDP reduces every trained parameter's on every rank), no kernel run, on the varlen path too."""
    from longqlora.attention import kernels, layout, op

    def never(*args, **kwargs):
        raise AssertionError("a kernel ran on no tokens")

    for name in ("sdpa_groups", "sdpa_banded", "varlen"):
        monkeypatch.setattr(kernels, name, never)
    monkeypatch.setattr(op, "_varlen_kernel", lambda *args: kernel)  # the CUDA choice in 16 bits
    q, k, v = (t.requires_grad_() for t in rand_qkv(2, 4, 2, 24))
    pos = torch.cat([torch.arange(10), torch.arange(14)]).unsqueeze(0)
    out = s2_attention(q, k, v, 8, position_ids=pos, attention_mask=torch.zeros(2, 24, dtype=torch.long))
    assert out.shape == q.shape and not out.any()
    out.sum().backward()
    assert all(t.grad is not None and not t.grad.any() for t in (q, k, v))
    rows = layout.build(pos, torch.zeros(2, 24, dtype=torch.long), 2, 24, q.device)
    assert rows.empty and rows.varlen(8, 4).max_len == 0 and rows.varlen(8, 4).lengths.numel() == 0


def test_bad_arguments():
    q, k, v = rand_qkv(1, 4, 3, 8)
    with pytest.raises(ValueError, match="multiple"):
        s2_attention(q, k, v, 4)
    q, k, v = rand_qkv(1, 4, 2, 8)
    with pytest.raises(ValueError, match="S2-Attn group size 0: must be a positive number of tokens"):
        s2_attention(q, k, v, 0)
    with pytest.raises(TypeError, match="S2-Attn group size 4.5: must be an int"):
        s2_attention(q, k, v, 4.5)
    with pytest.raises(ValueError, match="--attn_backend"):
        s2_attention(q, k, v, 4, backend="flash_attn")
    with pytest.raises(ValueError, match="--attn_backend"):
        s2_attention(q, k, v, 4, backend="nonsense")


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("backend", ["sdpa", "flash_attn", "xformers", "auto"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("h,h_kv", [(8, 2), (9, 3)])
def test_gpu_backends_agree_with_reference(backend, packed, dtype, h, h_kv):
    if backend != "auto" and hardware.backend_problem(backend):
        pytest.skip(hardware.backend_problem(backend))
    if dtype == torch.bfloat16 and not hardware.supports_bf16():
        pytest.skip("no bf16 on this GPU")
    n, group = 1000, 128
    pos = packed_positions((300, 450, 250)).cuda() if packed else None
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, 900:] = 0
    q, k, v = rand_qkv(2, h, h_kv, n, d=64, dtype=torch.float32, seed=6)
    want = reference_s2(q, k, v, group, None if pos is None else pos.cpu(), mask).float()
    qkv = [t.cuda().to(dtype).requires_grad_() for t in (q, k, v)]
    got = s2_attention(*qkv, group, position_ids=pos, attention_mask=mask.cuda(), backend=backend)
    assert (got.float().cpu() - want).norm() / want.norm() < 2e-2
    got.float().pow(2).sum().backward()  # the backward runs on every backend
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in qkv)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("h,h_kv", [(32, 32), (32, 8)])
def test_gpu_grouped_path_runs_on_the_flash_kernel(h, h_kv):
    """Plain rows: every SDPA call of the grouped path qualifies for the flash kernel (views with unit last
    stride, no mask; GQA broadcast only where flash takes it), so restricting SDPA to flash still runs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if hardware.cuda_capability() < (8, 0):
        pytest.skip("SDPA's flash kernel needs sm_80+")
    shape = lambda heads: (1, 4096, heads, 128)  # noqa: E731  (B, N, H, D) seen as (B, H, N, D)
    q = torch.randn(shape(h), device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    k, v = (
        torch.randn(shape(h_kv), device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_() for _ in range(2)
    )
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        s2_attention(q, k, v, 1024, backend="sdpa").sum().backward()


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("packed", [False, True])
def test_gpu_auto_backend_agrees_with_forced_sdpa(packed):
    """auto takes a varlen kernel for packed rows where one runs (flash-attn, torch's own, xformers) and SDPA's
    grouped path for plain rows; both agree with forced sdpa (banded or torch varlen for the packed rows)."""
    from longqlora.attention.op import varlen_choice

    n = 4096
    pos = packed_positions((1000, 2500, 596)).cuda() if packed else None
    q, k, v = (t.cuda().bfloat16() for t in rand_qkv(1, 8, 2, n, d=64, dtype=torch.float32))
    auto = s2_attention(q, k, v, 512, position_ids=pos)
    sdpa = s2_attention(q, k, v, 512, position_ids=pos, backend="sdpa")
    assert (auto.float() - sdpa.float()).norm() / sdpa.float().norm() < 1e-2
    if hardware.cuda_capability() >= (8, 0) and hardware.torch_varlen() is not None:
        assert varlen_choice("auto", "cuda", torch.bfloat16, 64) is not None


# ------------------------------------------------------------------ variants: rolled shift, sinks, full heads
def variant_mask(b, h, n, group, position_ids=None, attention_mask=None, shift="leakfree", sinks=0, full_heads=0.0):
    """(B, H, N, N) boolean mask written from the definitions (LongLoRA §3.2, SinkLoRA), one head at a time."""
    pos = torch.arange(n).expand(b, n) if position_ids is None else position_ids.expand(b, n)
    doc = torch.zeros(b, n, dtype=torch.long)
    doc[:, 1:] = (pos[:, 1:] != pos[:, :-1] + 1).long().cumsum(1)
    idx = torch.arange(n)
    in_doc = torch.stack([torch.stack([(doc[r, : i + 1] == doc[r, i]).sum() - 1 for i in range(n)]) for r in range(b)])
    valid = torch.ones(b, n, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    causal = idx[None, :, None] >= idx[None, None, :]
    same_doc = doc[:, :, None] == doc[:, None, :]
    masks = torch.zeros(b, h, n, n, dtype=torch.bool)
    for h0, h1, kind in head_split(h, full_heads):
        for head in range(h0, h1):
            if kind == "full":
                allowed = same_doc & causal
            elif kind == "shifted" and shift == "rolled":  # rolled index r = (i - G/2) mod N, causal in r
                r = (idx - group // 2) % n
                allowed = ((r[:, None] // group == r[None, :] // group) & (r[:, None] >= r[None, :])).expand(b, n, n)
            else:
                seg = torch.div(pos + (group // 2 if kind == "shifted" else 0), group, rounding_mode="floor")
                allowed = (seg[:, :, None] == seg[:, None, :]) & same_doc & causal
                allowed = allowed | ((in_doc[:, None, :] < sinks) & same_doc & causal)
            masks[:, head] = allowed & valid[:, None, :]
    return masks


def reference_masked(q, k, v, masks, attention_mask=None):
    b, h, n, d = q.shape
    rep = h // k.shape[1]
    k, v = k.repeat_interleave(rep, 1).double(), v.repeat_interleave(rep, 1).double()
    scores = (q.double() @ k.transpose(-1, -2) / d**0.5).masked_fill(~masks, float("-inf"))
    out = torch.nan_to_num(scores.softmax(-1)) @ v
    return out if attention_mask is None else out * attention_mask.bool()[:, None, :, None]


def rolled_direct(q, k, v, group):
    """LongLoRA's roll written out directly: shifted heads rolled, attention per group of G, rolled back."""
    b, h, n, d = q.shape
    k, v = k.repeat_interleave(h // k.shape[1], 1), v.repeat_interleave(h // k.shape[1], 1)
    out = torch.empty_like(q)
    for head in range(h):
        s = group // 2 if head >= h // 2 else 0
        qh, kh, vh = (x[:, head].roll(-s, 1) for x in (q, k, v))
        for g0 in range(0, n, group):
            o = F.scaled_dot_product_attention(
                qh[:, None, g0 : g0 + group], kh[:, None, g0 : g0 + group], vh[:, None, g0 : g0 + group], is_causal=True
            )
            out[:, head, g0 : g0 + group] = o[:, 0]
        out[:, head] = out[:, head].roll(s, 1)
    return out


VARIANTS = [
    dict(shift="rolled"),
    dict(sinks=1),
    dict(sinks=4),
    dict(full_heads=0.25),
    dict(full_heads=0.5),
    dict(sinks=3, full_heads=0.34),
    dict(full_heads=1.0),
]


def call(q, k, v, group, variant, **kw):
    return s2_attention(
        q,
        k,
        v,
        group,
        shift=variant.get("shift", "leakfree"),
        sink_tokens=variant.get("sinks", 0),
        full_heads=variant.get("full_heads", 0.0),
        **kw,
    )


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("h,h_kv", [(4, 2), (3, 1), (9, 3), (8, 1)])
@pytest.mark.parametrize("n,group", [(32, 8), (48, 16), (24, 6)])
def test_variants_match_masked_reference_plain(variant, h, h_kv, n, group):
    q, k, v = rand_qkv(2, h, h_kv, n, dtype=torch.float32, seed=7)
    want = reference_masked(
        q,
        k,
        v,
        variant_mask(
            2,
            h,
            n,
            group,
            shift=variant.get("shift", "leakfree"),
            sinks=variant.get("sinks", 0),
            full_heads=variant.get("full_heads", 0.0),
        ),
    )
    assert (call(q, k, v, group, variant).double() - want).abs().max() < 1e-5


@pytest.mark.parametrize("variant", [v for v in VARIANTS if "shift" not in v])
@pytest.mark.parametrize("h,h_kv", [(4, 2), (3, 1), (9, 3)])
@pytest.mark.parametrize("lengths,group", [((10, 20, 7), 8), ((3, 3, 3, 30), 6), ((1, 40, 5), 5)])
@pytest.mark.parametrize("padding", [None, "right", "holes"])
def test_variants_match_masked_reference_packed_and_padded(variant, h, h_kv, lengths, group, padding):
    n = sum(lengths)
    q, k, v = rand_qkv(3, h, h_kv, n, dtype=torch.float32, seed=8)
    pos = packed_positions(lengths)
    mask = None if padding is None else padding_masks(n)[padding]
    masks = variant_mask(
        3, h, n, group, pos, mask, sinks=variant.get("sinks", 0), full_heads=variant.get("full_heads", 0.0)
    )
    got = call(q, k, v, group, variant, position_ids=pos, attention_mask=mask)
    assert (got.double() - reference_masked(q, k, v, masks, mask)).abs().max() < 1e-5


def test_rolled_matches_longlora_roll_and_defaults_are_unchanged():
    q, k, v = rand_qkv(2, 4, 2, 64, dtype=torch.float32, seed=9)
    assert (s2_attention(q, k, v, 16, shift="rolled") - rolled_direct(q, k, v, 16)).abs().max() < 1e-5
    # the defaults are the leak-free S2 of reference_s2, bit for bit the same call as before the variants existed
    assert torch.equal(
        s2_attention(q, k, v, 16), s2_attention(q, k, v, 16, shift="leakfree", sink_tokens=0, full_heads=0.0)
    )


def test_rolled_leaks_the_future_and_leakfree_does_not():
    """Perturb only the last G/2 tokens: the rolled variant changes the shifted heads' first G/2 outputs."""
    n, group = 64, 16
    q, k, v = rand_qkv(1, 2, 2, n, dtype=torch.float32, seed=10)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -group // 2 :] += 10.0
    v2[:, :, -group // 2 :] *= -5.0
    for shift, leaks in (("rolled", True), ("leakfree", False)):
        before, after = s2_attention(q, k, v, group, shift=shift), s2_attention(q, k2, v2, group, shift=shift)
        changed = (after[:, 1, : group // 2] - before[:, 1, : group // 2]).abs().max()
        assert bool(changed > 1e-3) is leaks, shift
        assert torch.equal(after[:, 0, : n - group // 2], before[:, 0, : n - group // 2])  # unshifted heads: causal


@pytest.mark.parametrize("variant", [dict(sinks=4), dict(full_heads=0.5), dict(sinks=2, full_heads=0.25)])
def test_variants_causal_by_perturbation(variant):
    q, k, v = rand_qkv(1, 4, 2, 64, dtype=torch.float32)
    base = call(q, k, v, 16, variant)
    for t in (3, 31, 50):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        q2[:, :, t:] += 3.0
        k2[:, :, t:] -= 2.0
        v2[:, :, t:] *= -5.0
        after = call(q2, k2, v2, 16, variant)
        assert torch.equal(after[:, :, :t], base[:, :, :t])
        assert not torch.allclose(after[:, :, t:], base[:, :, t:])


def test_sinks_reach_every_group_and_full_heads_see_everything():
    n, group = 64, 16
    q, k, v = rand_qkv(1, 4, 4, n, dtype=torch.float32, seed=11)
    v2 = v.clone()
    v2[:, :, 2] += 10.0  # token 2: a sink for k=4, not for k=2
    far = slice(3 * group, n)  # queries three groups later
    for sinks, reaches in ((4, True), (2, False), (0, False)):
        diff = s2_attention(q, k, v2, group, sink_tokens=sinks) - s2_attention(q, k, v, group, sink_tokens=sinks)
        assert bool(diff[:, :, far].abs().min() > 1e-4) is reaches if reaches else diff[:, :, far].abs().max() == 0
    diff = s2_attention(q, k, v2, group, full_heads=0.5) - s2_attention(q, k, v, group, full_heads=0.5)
    assert diff[:, :2, far].abs().min() > 1e-4 and diff[:, 2:, far].abs().max() == 0


@pytest.mark.parametrize("variant", [dict(sinks=3), dict(full_heads=0.25)])
def test_variant_fast_path_equals_forced_fallback(variant):
    """Offsetting positions by a multiple of G keeps segments and documents but forces the general path."""
    q, k, v = rand_qkv(2, 4, 2, 40, dtype=torch.float32, seed=12)
    fast = call(q, k, v, 8, variant)
    general = call(q, k, v, 8, variant, position_ids=torch.arange(40).unsqueeze(0) + 16)
    torch.testing.assert_close(general, fast, atol=1e-6, rtol=1e-5)


def test_variant_gradients_match_reference():
    q, k, v = (t.requires_grad_() for t in rand_qkv(1, 3, 1, 24, seed=13))
    masks = variant_mask(1, 3, 24, 6, sinks=2, full_heads=0.34)
    offset = torch.arange(24)[None] + 6  # the general (banded / dense) paths
    s2_attention(q, k, v, 6, sink_tokens=2, full_heads=0.34, position_ids=offset).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    reference_masked(q, k, v, masks).square().sum().backward()
    for got, want in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_bad_variant_arguments():
    q, k, v = rand_qkv(1, 4, 2, 32)
    with pytest.raises(ValueError, match="--s2_shift"):
        s2_attention(q, k, v, 8, shift="wrap")
    with pytest.raises(ValueError, match="--s2_sink_tokens -1"):
        s2_attention(q, k, v, 8, sink_tokens=-1)
    with pytest.raises(ValueError, match="--s2_full_heads 1.5"):
        s2_attention(q, k, v, 8, full_heads=1.5)
    with pytest.raises(ValueError, match="--s2_shift rolled"):
        s2_attention(q, k, v, 8, shift="rolled", position_ids=packed_positions((10, 22)))
    with pytest.raises(ValueError, match="divisible"):
        s2_attention(q[:, :, :30], k[:, :, :30], v[:, :, :30], 8, shift="rolled")


@pytest.mark.parametrize("packed", [False, True])
def test_a_models_own_softmax_scale_is_used(packed):
    """`scale` (a model's own attention scaling, e.g. Granite's attention_multiplier) sets the softmax temperature:
    scale 0.3 equals the default scale on queries multiplied by 0.3 x sqrt(D), and differs from the default."""
    q, k, v = rand_qkv(2, 4, 2, 37, seed=1)
    d = q.shape[-1]
    pos = packed_positions((10, 27)) if packed else None
    scaled = s2_attention(q, k, v, 8, position_ids=pos, scale=0.3)
    assert torch.allclose(scaled, s2_attention(q * (0.3 * d**0.5), k, v, 8, position_ids=pos), atol=1e-10)
    assert not torch.allclose(scaled, s2_attention(q, k, v, 8, position_ids=pos), atol=1e-3)


@pytest.mark.parametrize("full_heads", [0.0, 0.5])
def test_packed_rows_by_document_equal_the_banded_fallback(full_heads, monkeypatch):
    """Packed rows without a varlen kernel run each document through the reshape-into-groups path (a document is
    a plain row: its segments restart with it); past DOCUMENT_CALLS documents, or forced here, the banded masks run:
    the same outputs and gradients, PoSE's forward-skipping ids (one document) included."""
    from longqlora.attention import kernels, layout

    pos = torch.cat([torch.arange(21), torch.arange(30), torch.arange(5, 18)]).view(1, -1).repeat(2, 1)
    pos[1] = torch.cat([torch.arange(40), torch.arange(100, 124)])  # one document whose ids skip ahead
    calls = []

    def run():
        q, k, v = (t.requires_grad_() for t in rand_qkv(2, 6, 2, 64, seed=3))
        out = s2_attention(q, k, v, 8, position_ids=pos.clone(), full_heads=full_heads)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return out, q.grad, k.grad, v.grad

    for name in ("sdpa_groups", "sdpa_banded"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name, **kw: (calls.append(_n), _f(*a, **kw))[1])
    by_document = run()
    assert set(calls) == {"sdpa_groups"}
    calls.clear()
    monkeypatch.setattr(layout, "DOCUMENT_CALLS", 3)  # the batch holds 4 documents: over the limit
    banded = run()
    assert "sdpa_banded" in calls
    for a, b in zip(by_document, banded):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
