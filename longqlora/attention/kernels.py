"""Fused-kernel paths of S2-Attn, one function per backend; `attention.s2_attention` picks and drives them.

Every function here computes one *head half* (heads that share one shift) and writes it into `out`:

- `sdpa_groups`: plain positions 0..N-1, no left padding; also each document of packed rows, one call each (a
  document is a plain row: its segments restart with it). The sequence is cut into whole groups (plus the half
  group before the first whole shifted group, and the partial group at the end); each piece is a batch of short
  sequences for one causal SDPA call. No mask is built: nothing here is quadratic in N.
- `sdpa_banded`: any positions (packed documents) and any padding. Queries go in blocks of G; each block sees a
  window of the 2G keys before its end, with a (blocks, G, 2G) boolean mask: O(N*G) memory, never N x N.
- `sdpa_dense`: any boolean (B, N, N) mask, O(N^2) memory: full-attention heads with padded rows (or more packed
  documents than op.py takes one at a time).
- `varlen`: flash-attn's or PyTorch's varlen kernel, or xformers' block-diagonal causal bias, over the unpadded token
  stream, each segment one sequence (LongLoRA's flash-attn implementation, §3.2, does the same with cu_seqlens);
  the stream, its cu_seqlens and the longest segment come from layout.py, computed once per forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kv_for_heads(key: torch.Tensor, value: torch.Tensor, h0: int, h1: int, n_rep: int, *, allow_gqa: bool):
    """Keys/values for query heads [h0, h1) and whether the kernel must broadcast them (enable_gqa).

    Where the half boundary falls inside a KV group (an odd head count with GQA), those KV heads are repeated.
    """
    if n_rep == 1:
        return key[:, h0:h1], value[:, h0:h1], False
    if allow_gqa and h0 % n_rep == 0 and h1 % n_rep == 0:
        return key[:, h0 // n_rep : h1 // n_rep], value[:, h0 // n_rep : h1 // n_rep], True
    index = torch.arange(h0, h1, device=key.device) // n_rep
    return key.index_select(1, index), value.index_select(1, index), False


def _sdpa(q, k, v, *, gqa: bool, scale, dropout: float, mask=None):
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout, enable_gqa=gqa)


def _as_groups(x: torch.Tensor, start: int, n_groups: int, size: int) -> torch.Tensor:
    """(B, h, N, D) -> (B * n_groups, h, size, D) for tokens [start, start + n_groups * size)."""
    b, h, _, d = x.shape
    x = x[:, :, start : start + n_groups * size].unflatten(2, (n_groups, size))  # (B, h, n, size, D)
    return x.transpose(1, 2).reshape(b * n_groups, h, size, d)


def sdpa_groups(out, q, k, v, *, gqa: bool, group: int, shift: int, scale, dropout: float) -> None:
    """Causal attention inside contiguous groups [a + jG, a + (j+1)G), with a = (G - shift) % G.

    `out`, `q`: (B, h, N, D) views; `k`, `v`: (B, h or h_kv, N, D). Tokens before `a` form the first (half)
    segment and the tokens after the last whole group the last (partial) one.
    """
    b, h, n, d = q.shape
    first = min((group - shift) % group, n)
    n_groups = (n - first) // group
    tail = first + n_groups * group
    pieces = [(0, first, 1), (first, group, n_groups), (tail, n - tail, 1)]
    for start, size, count in pieces:
        if size == 0 or count == 0:
            continue
        o = _sdpa(
            _as_groups(q, start, count, size),
            _as_groups(k, start, count, size),
            _as_groups(v, start, count, size),
            gqa=gqa,
            scale=scale,
            dropout=dropout,
        )
        out[:, :, start : start + count * size] = o.unflatten(0, (b, count)).transpose(1, 2).flatten(2, 3)


def sdpa_banded(
    out,
    q,
    k,
    v,
    seg: torch.Tensor,
    valid: torch.Tensor,
    *,
    gqa: bool,
    group: int,
    scale,
    dropout: float,
    doc: torch.Tensor | None = None,
    in_doc: torch.Tensor | None = None,
    sinks: int = 0,
) -> None:
    """Exact S2 for arbitrary segments: query blocks of G against the 2G keys ending with the block.

    `seg`, `valid`: (B, N). A key is visible iff it is valid, not in the future and in the query's segment; segments
    span at most G consecutive tokens, so the window holds every visible key. Every query sees at least itself, so
    a padded query's row is finite (it sees the earlier valid keys of its segment too; the caller zeroes it).

    Attention sinks (SinkLoRA, arXiv 2406.05678): with `sinks` = k > 0, a key whose index inside its document
    (`in_doc`, (B, N)) is below k is visible to every later query of the same document (`doc`, (B, N)) whatever
    its segment. Inside the window that widens the mask; before the window only the document holding the window's
    first key can still have queries in the block, so its first k tokens are gathered as k extra keys per block.
    """
    b, h, n, d = q.shape
    n_blocks = -(-n // group)
    pad_end = n_blocks * group - n

    def windows(x):  # (B, hx, N, D) -> (B * blocks, hx, 2G, D)
        x = F.pad(x, (0, 0, group, pad_end))
        x = x.unfold(2, 2 * group, group).transpose(-1, -2)  # (B, hx, blocks, 2G, D)
        return x.transpose(1, 2).reshape(b * n_blocks, x.shape[1], 2 * group, d)

    def key_windows(x, fill):  # (B, N) -> (B, blocks, 1, 2G)
        return F.pad(x, (group, pad_end), value=fill).unfold(1, 2 * group, group).unsqueeze(2)

    def query_blocks(x, fill):  # (B, N) -> (B, blocks, G, 1)
        return F.pad(x, (0, pad_end), value=fill).view(b, n_blocks, group, 1)

    index = torch.arange(n_blocks * group + group, device=q.device)
    q_idx = index[group:].view(n_blocks, group, 1)  # padded-index of each query
    k_idx = index.unfold(0, 2 * group, group).unsqueeze(1)  # (blocks, 1, 2G)
    visible = query_blocks(seg, -1) == key_windows(seg, -1)  # (B, blocks, G, 2G)
    keys, values = windows(k), windows(v)
    if sinks:
        same_doc = query_blocks(doc, -1) == key_windows(doc, -2)
        visible = visible | (same_doc & (key_windows(in_doc, sinks) < sinks))
    mask = (visible & key_windows(valid, False) & (k_idx <= q_idx)) | (k_idx == q_idx)
    if sinks:  # the first k tokens of the document that holds each window's first key, when they lie before it
        window_start = torch.arange(n_blocks, device=q.device) * group - group  # (blocks,), -G for the first
        first = window_start.clamp(min=0)  # (blocks,) the window's first real key
        start = (first - in_doc[:, first]).unsqueeze(-1)  # (B, blocks, 1): where that document begins
        s_idx = start + torch.arange(sinks, device=q.device)  # (B, blocks, k)
        before = s_idx < window_start.view(1, n_blocks, 1)
        s_idx = s_idx.clamp(max=n - 1)
        s_doc, s_valid = doc.gather(1, s_idx.flatten(1)), valid.gather(1, s_idx.flatten(1))
        ok = before & (s_doc.view_as(s_idx) == doc[:, first].unsqueeze(-1)) & s_valid.view_as(s_idx)
        ext_mask = ok.unsqueeze(2) & (query_blocks(doc, -1) == doc[:, first].view(b, n_blocks, 1, 1))
        mask = torch.cat([ext_mask, mask.expand(b, -1, -1, -1)], dim=-1)  # (B, blocks, G, k + 2G)

        def gathered(x):  # (B, hx, N, D) -> (B * blocks, hx, k, D)
            g = x.gather(2, s_idx.flatten(1)[:, None, :, None].expand(-1, x.shape[1], -1, d))
            return g.unflatten(2, (n_blocks, sinks)).transpose(1, 2).reshape(b * n_blocks, x.shape[1], sinks, d)

        keys, values = torch.cat([gathered(k), keys], dim=2), torch.cat([gathered(v), values], dim=2)
    qb = F.pad(q, (0, 0, 0, pad_end)).unflatten(2, (n_blocks, group)).transpose(1, 2).reshape(b * n_blocks, h, group, d)
    o = _sdpa(
        qb,
        keys,
        values,
        gqa=gqa,
        scale=scale,
        dropout=dropout,
        mask=mask.expand(b, -1, -1, -1).reshape(b * n_blocks, 1, group, mask.shape[-1]),
    )
    out.copy_(o.unflatten(0, (b, n_blocks)).transpose(1, 2).flatten(2, 3)[:, :, :n])


def sdpa_dense(out, q, k, v, allowed: torch.Tensor, *, gqa: bool, scale, dropout: float) -> None:
    """Attention under an explicit (B, N, N) boolean mask (each query also sees itself, so padded rows stay finite)."""
    n = q.shape[2]
    mask = allowed | torch.eye(n, dtype=torch.bool, device=q.device)
    out.copy_(_sdpa(q, k, v, gqa=gqa, scale=scale, dropout=dropout, mask=mask.unsqueeze(1)))


def varlen(out, q, k, v, pack, *, kernel: str, scale, dropout: float) -> None:
    """S2 through a varlen kernel: the valid tokens of all rows in one stream, each segment its own sequence.

    `pack`: layout.Varlen (token indices, int32 cu_seqlens, the longest segment as an int). `kernel`:
    "flash_attn" (flash_attn_varlen_func), "torch" (torch.nn.attention.varlen.varlen_attn) or "xformers"
    (memory_efficient_attention with a block-diagonal causal bias). `k`, `v` may have fewer heads than `q` (GQA)
    for flash_attn and torch; xformers gets them repeated by the caller.
    """
    from longqlora import hardware

    b, h, n, d = q.shape

    def tokens(x):  # (B, hx, N, D) -> (T, hx, D); a view when nothing is padded
        x = x.transpose(1, 2).reshape(b * n, x.shape[1], d)
        return x if pack.keep is None else x.index_select(0, pack.keep)

    qt, kt, vt = tokens(q), tokens(k), tokens(v)
    cu, longest = pack.cu_seqlens, pack.max_len
    if kernel == "flash_attn":
        o = hardware.flash_attn_module().flash_attn_varlen_func(
            qt, kt, vt, cu, cu, longest, longest, dropout_p=dropout, softmax_scale=scale, causal=True
        )
    elif kernel == "torch":
        o = hardware.call_torch_varlen(
            qt.contiguous(), kt.contiguous(), vt.contiguous(), cu, longest, scale=scale, gqa=kt.shape[1] != qt.shape[1]
        )
    else:  # xformers: (1, tokens, h, D) with a block-diagonal causal bias, one block per segment
        ops = hardware.xformers_ops()
        bias = ops.fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(pack.lengths_list())
        o = ops.memory_efficient_attention(
            qt.unsqueeze(0), kt.unsqueeze(0), vt.unsqueeze(0), attn_bias=bias, p=dropout, scale=scale
        ).squeeze(0)
    target = out.transpose(1, 2)  # (B, N, h, D): a head slice of the caller's (B, N, H, D) output
    if pack.keep is None:
        target.copy_(o.view(b, n, h, d))
    else:  # padded tokens keep what the caller put there (zeros); the head slice merges (B, N) into one view
        target.view(b * n, h, d).index_copy_(0, pack.keep, o)
