"""The S2-Attn op (LongLoRA arXiv 2309.12307 §3.2), leak-free, and the choice of kernel for each head group.

`s2_attention` is the pure op. With group size G, a query at position i sees a key at position j only if j <= i
and both lie in the same segment: floor(p / G) for the first half of the heads, floor((p + G//2) / G) for the
second half (the shifted heads; with an odd head count the second half is the larger one). Nothing wraps around:
LongLoRA's rolled implementation puts the row's last G/2 tokens in the shifted heads' first group, so its first
tokens attend them (the future); here the first and last shifted segments are half groups instead, as in
LongLoRA's flash-attn varlen code. With `position_ids`
(packed documents) p is the token's index inside its document and no token attends across documents; a document
begins where the ids do not increase, so PoSE's skipping ids (data/pose.py) keep one document and G-token groups.

The variants (sinks, full heads, LongLoRA's rolled shift) are validated and explained in experimental.py, which
also holds the rolled shift's kernel.
"""

from __future__ import annotations

import torch

from longqlora import hardware
from longqlora.attention import kernels as s2_kernels
from longqlora.attention import layout as s2_layout
from longqlora.attention.experimental import check_group_size, check_variant, sdpa_rolled


def head_split(h: int, full_heads: float) -> list[tuple[int, int, str]]:
    """[(h0, h1, kind)]: kind "full", "plain" (unshifted S2) or "shifted"; the shifted half is the larger one."""
    n_full = int(round(full_heads * h))
    rest = n_full + (h - n_full) // 2
    return [(0, n_full, "full"), (n_full, rest, "plain"), (rest, h, "shifted")]


# --------------------------------------------------------------------------------------------------- the pure op
def s2_attention(
    query,
    key,
    value,
    group_size: int,
    *,
    position_ids=None,
    attention_mask=None,
    scale=None,
    backend: str | None = None,
    dropout: float = 0.0,
    shift: str = "leakfree",
    sink_tokens: int = 0,
    full_heads: float = 0.0,
    indexed_positions: bool = False,
    heads: str = "all",
) -> torch.Tensor:
    """Causal S2-Attn. query (B, H, N, D); key/value (B, H_kv, N, D) with H % H_kv == 0; returns (B, H, N, D).

    position_ids: (B, N) or (1, N) token positions; where they do not increase, a new document begins.
    attention_mask: (B, N), 1 = real token, 0 = padding; padding keys are never attended and padded queries
    return zeros. backend: "sdpa", "flash_attn", "xformers", or None/"auto" for the fastest that runs here.
    shift, sink_tokens, full_heads: the variants in the module docstring. Sinks and the rolled shift run on SDPA
    whatever the backend; the rolled shift needs plain positions, no padding and N divisible by G.
    indexed_positions: position_ids are each token's index in its document and a row may begin inside one
    (context_parallel.py); sinks and the rolled shift do not take it.
    heads: "all", or only the "plain" or the "shifted" heads (context_parallel.py computes the first while the
    second's borrowed keys are in flight); the other heads' rows of the output are left unwritten.
    """
    b, h, n, d = query.shape
    if key.shape != value.shape or key.shape[0] != b or key.shape[2] != n or key.shape[3] != d:
        raise ValueError(f"s2_attention: key/value {tuple(key.shape)} do not match query {tuple(query.shape)}")
    h_kv = key.shape[1]
    if h % h_kv:
        raise ValueError(f"s2_attention: {h} query heads are not a multiple of {h_kv} key/value heads")
    group = check_group_size(group_size)
    backend = _check_backend(backend, query)
    scale = d**-0.5 if scale is None else scale
    check_variant(shift, sink_tokens, full_heads)
    if heads not in ("all", "plain", "shifted"):
        raise ValueError(f"s2_attention: heads {heads!r}: all, plain or shifted")

    # once per forward, not per layer
    rows = s2_layout.build(position_ids, attention_mask, b, n, query.device, indexed=indexed_positions)
    if indexed_positions and (sink_tokens or shift == "rolled"):
        raise ValueError("s2_attention: indexed_positions takes neither attention sinks nor the rolled shift")
    if shift == "rolled" and not (rows.positions is None and rows.valid is None):
        raise ValueError("--s2_shift rolled: LongLoRA's roll knows no documents or padding; use --s2_shift leakfree")
    # (B, N, H, D): the layout transformers' o_proj reads; zeros where padded rows are never written
    out_t = query.new_empty(b, n, h, d) if rows.valid is None else query.new_zeros(b, n, h, d)
    out = out_t.transpose(1, 2)  # (B, H, N, D) view
    if rows.empty:
        # Only padding (a context-parallel rank's chunk of short conversations): zeros, with zero gradients for
        # q/k/v (DDP expects a gradient for every trained parameter on every rank), and no kernel for no tokens.
        return out + 0.0 * (query.sum() + key.sum() + value.sum())
    n_rep = h // h_kv
    varlen = _varlen_kernel(backend, query, scale, dropout)
    sdpa_gqa = hardware.sdpa_gqa_ok(query.device, query.dtype)
    # With a mask, CUDA's flash kernel is out and its memory-efficient one takes no GQA: repeat the KV heads so that
    # the masked fallbacks do not end on the math kernel (on the CPU SDPA takes both).
    masked_gqa = sdpa_gqa and query.device.type != "cuda"
    for h0, h1, kind in head_split(h, full_heads):
        if h0 == h1 or heads not in ("all", kind):
            continue
        q = query[:, h0:h1]
        step = 0 if kind == "plain" else group // 2
        span = s2_layout.WHOLE if kind == "full" else group  # a full head is one segment per document
        sinks = int(sink_tokens) if kind != "full" else 0
        if kind == "shifted" and shift == "rolled":
            k, v, gqa = s2_kernels.kv_for_heads(key, value, h0, h1, n_rep, allow_gqa=sdpa_gqa)
            sdpa_rolled(out[:, h0:h1], q, k, v, gqa=gqa, group=group, scale=scale, dropout=dropout)
        elif varlen is not None and not sinks and (backend in ("flash_attn", "xformers") or not rows.grouped):
            # Packed or padded rows (or a forced GPU kernel): every segment one sequence of a varlen kernel, linear
            # in N with no mask and no wasted blocks.
            k, v, gqa = s2_kernels.kv_for_heads(key, value, h0, h1, n_rep, allow_gqa=varlen[1])
            s2_kernels.varlen(
                out[:, h0:h1], q, k, v, rows.varlen(span, step), kernel=varlen[0], scale=scale, dropout=dropout
            )
        elif rows.grouped and not sinks:
            k, v, gqa = s2_kernels.kv_for_heads(key, value, h0, h1, n_rep, allow_gqa=sdpa_gqa)
            s2_kernels.sdpa_groups(
                out[:, h0:h1], q, k, v, gqa=gqa, group=span, shift=step, scale=scale, dropout=dropout
            )
        elif not sinks and (documents := rows.document_spans()) is not None:
            # Packed rows, no varlen kernel (the CPU, a V100 without xformers): segments restart with each document,
            # so a document is a plain row and takes the reshape-into-groups path, O(L x G) with no mask (the banded
            # mask computed each G-block against 2G keys: ~4x the work). A full head is one causal call per document.
            k, v, gqa = s2_kernels.kv_for_heads(key, value, h0, h1, n_rep, allow_gqa=sdpa_gqa)
            for r, spans in enumerate(documents):
                for s, e in spans:  # views of `out`: written in place
                    s2_kernels.sdpa_groups(
                        out[r : r + 1, h0:h1, s:e], q[r : r + 1, :, s:e], k[r : r + 1, :, s:e], v[r : r + 1, :, s:e],
                        gqa=gqa, group=span, shift=step, scale=scale, dropout=dropout,
                    )  # fmt: skip
        elif kind == "full":
            k, v, gqa = s2_kernels.kv_for_heads(key, value, h0, h1, n_rep, allow_gqa=masked_gqa)
            seg = rows.segments(span, step)  # (B, N)
            same = (seg[:, :, None] == seg[:, None, :]) & rows.mask[:, None, :]
            s2_kernels.sdpa_dense(out[:, h0:h1], q, k, v, same.tril(), gqa=gqa, scale=scale, dropout=dropout)
        else:  # no varlen kernel here (the CPU, or none installed), or attention sinks: O(N x G) masks
            k, v, gqa = s2_kernels.kv_for_heads(key, value, h0, h1, n_rep, allow_gqa=masked_gqa)
            doc, in_doc = rows.documents() if sinks else (None, None)
            s2_kernels.sdpa_banded(
                out[:, h0:h1],
                q,
                k,
                v,
                rows.segments(span, step),
                rows.mask,
                gqa=gqa,
                group=group,
                scale=scale,
                dropout=dropout,
                doc=doc,
                in_doc=in_doc,
                sinks=sinks,
            )
    if rows.valid is not None:
        out_t.mul_(rows.valid[:, :, None, None].to(out_t.dtype))
    return out


def _check_backend(backend: str | None, query: torch.Tensor) -> str:
    """The requested backend ("auto" for None), after checking that a forced GPU kernel can take these tensors."""
    if backend in (None, "auto"):
        return "auto"
    choice = hardware.resolve_backend(backend, query.device)
    if choice != "sdpa" and query.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"--attn_backend {choice} needs float16 or bfloat16 tensors, got {query.dtype}; use sdpa")
    return choice


def _varlen_kernel(backend: str, query: torch.Tensor, scale: float, dropout: float) -> tuple[str, bool] | None:
    d = query.shape[-1]
    return varlen_choice(backend, query.device.type, query.dtype, d, abs(scale - d**-0.5) < 1e-12, dropout)


def varlen_choice(
    backend: str, device_type: str, dtype: torch.dtype, head_dim: int, default_scale: bool = True, dropout: float = 0.0
) -> tuple[str, bool] | None:
    """(kernel, takes GQA natively) for rows that are packed or padded, or None for the SDPA fallbacks.

    auto prefers flash-attn's varlen kernel, then PyTorch's own (torch.nn.attention.varlen: the same flash kernel,
    sm_80+), then xformers (which runs on a V100); sdpa takes PyTorch's own where it runs; a forced flash_attn or
    xformers is used for every row. Needs 16-bit CUDA tensors; head dims up to 256.
    """
    if device_type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return None
    if backend in ("flash_attn", "xformers"):
        return backend, backend == "flash_attn"
    for name in ("flash_attn", "torch", "xformers") if backend == "auto" else ("torch",):
        if name == "flash_attn" and hardware.flash_attn_module() is not None and head_dim <= 256:
            return name, True
        features = hardware.torch_varlen() if name == "torch" else None
        if (
            features is not None
            and head_dim <= 256
            and head_dim % 8 == 0
            and not dropout
            and (features["scale"] or default_scale)
        ):
            return name, features["enable_gqa"]
        if name == "xformers" and hardware.xformers_ops() is not None:
            return name, False
    return None
