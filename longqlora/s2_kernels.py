"""Fused-kernel paths of S2-Attn, one function per backend; `attention.s2_attention` picks and drives them.

Every function here computes one *head half* (heads that share one shift) and writes it into `out`:

- `sdpa_groups`: plain positions 0..N-1, no left padding. The sequence is cut into whole groups (plus the half
  group before the first whole shifted group, and the partial group at the end); each piece is a batch of short
  sequences for one causal SDPA call. No mask is built: nothing here is quadratic in N.
- `sdpa_banded`: any positions (packed documents) and any padding. Queries go in blocks of G; each block sees a
  window of the 2G keys before its end, with a (blocks, G, 2G) boolean mask: O(N*G) memory, never N x N.
- `varlen`: flash-attn's varlen kernel or xformers' block-diagonal causal bias over the unpadded token stream, each
  segment one sequence (LongLoRA's flash-attn implementation, §3.2, does the same with cu_seqlens).
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
        return key[:, h0 // n_rep:h1 // n_rep], value[:, h0 // n_rep:h1 // n_rep], True
    index = torch.arange(h0, h1, device=key.device) // n_rep
    return key.index_select(1, index), value.index_select(1, index), False


def _sdpa(q, k, v, *, gqa: bool, scale, dropout: float, mask=None):
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout,
                                              enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout, enable_gqa=gqa)


def _as_groups(x: torch.Tensor, start: int, n_groups: int, size: int) -> torch.Tensor:
    """(B, h, N, D) -> (B * n_groups, h, size, D) for tokens [start, start + n_groups * size)."""
    b, h, _, d = x.shape
    x = x[:, :, start:start + n_groups * size].unflatten(2, (n_groups, size))  # (B, h, n, size, D)
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
        o = _sdpa(_as_groups(q, start, count, size), _as_groups(k, start, count, size),
                  _as_groups(v, start, count, size), gqa=gqa, scale=scale, dropout=dropout)
        out[:, :, start:start + count * size] = o.unflatten(0, (b, count)).transpose(1, 2).flatten(2, 3)


def segment_ids(positions: torch.Tensor, group: int, shift: int) -> torch.Tensor:
    """(B, N) positions -> (B, N) int64 ids, equal exactly for tokens of one S2 segment.

    A document starts wherever positions do not continue by +1 (transformers' packed-sequence rule); a segment is
    a run of one document with the same floor((p + shift) / G).
    """
    bucket = torch.div(positions + shift, group, rounding_mode="floor")
    change = torch.ones_like(positions, dtype=torch.bool)
    change[:, 1:] = (positions[:, 1:] != positions[:, :-1] + 1) | (bucket[:, 1:] != bucket[:, :-1])
    return change.long().cumsum(dim=1)


def sdpa_banded(out, q, k, v, seg: torch.Tensor, valid: torch.Tensor, *, gqa: bool, group: int, scale,
                dropout: float) -> None:
    """Exact S2 for arbitrary segments: query blocks of G against the 2G keys ending with the block.

    `seg`, `valid`: (B, N). A key is visible iff it is valid, not in the future and in the query's segment; segments
    span at most G consecutive tokens, so the window holds every visible key. Padded queries see only themselves
    (finite, and zeroed by the caller).
    """
    b, h, n, d = q.shape
    n_blocks = -(-n // group)
    pad_end = n_blocks * group - n

    def windows(x):  # (B, hx, N, D) -> (B * blocks, hx, 2G, D)
        x = F.pad(x, (0, 0, group, pad_end))
        x = x.unfold(2, 2 * group, group).transpose(-1, -2)  # (B, hx, blocks, 2G, D)
        return x.transpose(1, 2).reshape(b * n_blocks, x.shape[1], 2 * group, d)

    index = torch.arange(n_blocks * group + group, device=q.device)
    seg_p = F.pad(seg, (group, pad_end), value=-1)
    valid_p = F.pad(valid, (group, pad_end), value=False)
    q_idx = index[group:].view(n_blocks, group, 1)  # padded-index of each query
    k_idx = index.unfold(0, 2 * group, group).unsqueeze(1)  # (blocks, 1, 2G)
    q_seg = seg_p[:, group:].view(b, n_blocks, group, 1)
    k_seg = seg_p.unfold(1, 2 * group, group).unsqueeze(2)  # (B, blocks, 1, 2G)
    k_valid = valid_p.unfold(1, 2 * group, group).unsqueeze(2)
    mask = ((q_seg == k_seg) & k_valid & (k_idx <= q_idx)) | (k_idx == q_idx)  # (B, blocks, G, 2G)
    qb = F.pad(q, (0, 0, 0, pad_end)).unflatten(2, (n_blocks, group)).transpose(1, 2).reshape(b * n_blocks, h, group, d)
    o = _sdpa(qb, windows(k), windows(v), gqa=gqa, scale=scale, dropout=dropout,
              mask=mask.reshape(b * n_blocks, 1, group, 2 * group))
    out.copy_(o.unflatten(0, (b, n_blocks)).transpose(1, 2).flatten(2, 3)[:, :, :n])


def varlen(out, q, k, v, seg: torch.Tensor, valid: torch.Tensor, *, backend: str, module, scale,
           dropout: float) -> None:
    """S2 through a varlen kernel: the valid tokens of all rows in one stream, each segment its own sequence.

    `q`, `k`, `v` have the same head count here (the caller repeats KV heads, which also covers a head half that
    splits a KV group). `module` is flash_attn or xformers.ops.
    """
    b, h, n, d = q.shape
    flat_valid = valid.reshape(-1)
    keep = flat_valid.nonzero().squeeze(1)
    # Segment ids restart per row; offset them so that rows never merge.
    seg_flat = (seg + torch.arange(b, device=seg.device).unsqueeze(1) * (n + 1)).reshape(-1)[keep]
    _, lengths = torch.unique_consecutive(seg_flat, return_counts=True)

    def tokens(x):  # (B, hx, N, D) -> (valid tokens, hx, D)
        return x.transpose(1, 2).reshape(b * n, x.shape[1], d)[keep]

    qt, kt, vt = tokens(q), tokens(k), tokens(v)
    if backend == "flash_attn":
        cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        longest = int(lengths.max())
        o = module.flash_attn_varlen_func(qt, kt, vt, cu, cu, longest, longest, dropout_p=dropout,
                                          softmax_scale=scale, causal=True)
    else:  # xformers: (1, tokens, h, D) with a block-diagonal causal bias, one block per segment
        bias = module.fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(lengths.tolist())
        o = module.memory_efficient_attention(qt.unsqueeze(0), kt.unsqueeze(0), vt.unsqueeze(0), attn_bias=bias,
                                              p=dropout, scale=scale).squeeze(0)
    full = o.new_zeros(b * n, h, d)
    full[keep] = o
    out.copy_(full.view(b, n, h, d).transpose(1, 2))
