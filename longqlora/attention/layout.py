"""The row layout S2-Attn needs, computed once per forward instead of once per layer: which rows are packed or padded,
the S2 segments of each head half, and the unpadded token stream (indices, cu_seqlens, longest segment) that the
varlen kernels take.

Everything here that decides a shape reads values from the device (`nonzero`, `.all()`, `max()`): a host-device sync.
Computed per layer, that was about 450 syncs per step on packed rows; here each layout is built once per tensor of
position ids (or padding mask) and kept on that tensor, so every layer of the forward and every recomputed layer of
the backward (gradient checkpointing passes the same tensors again) reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

WHOLE = 1 << 62  # a "group size" no document reaches: segment ids then number documents
# Packed rows without a varlen kernel run one reshape-into-groups call per document while a batch holds at most this
# many; beyond, the calls cost what the banded masks waste. `python bench/s2_speed.py --packed --documents D
# --lengths 4096` on this CPU (fwd+bwd, 8 heads, G 1024), per document / banded: 0.35 at D=4, 0.54 at 64, 0.99 at 256.
DOCUMENT_CALLS = 128
_ATTR = "_longqlora_s2_layout"


def document_starts(positions: torch.Tensor) -> torch.Tensor:
    """(B, N) positions -> (B, N) bool, True where a document begins: the first token and wherever the positions
    do not increase (packed documents restart at 0). Positions that jump forward stay in one document: PoSE's
    skipping ids (pose.py) are one document, not a document per chunk as transformers' +1 rule would read them."""
    start = torch.ones_like(positions, dtype=torch.bool)
    start[:, 1:] = positions[:, 1:] <= positions[:, :-1]
    return start


def token_index(start: torch.Tensor) -> torch.Tensor:
    """(B, N) document starts -> (B, N) int64 index of each token inside its document (0 at its first token)."""
    idx = torch.arange(start.shape[1], device=start.device).expand_as(start)
    return idx - torch.where(start, idx, 0).cummax(dim=1).values


def segment_ids(positions: torch.Tensor, group: int, shift: int, indexed: bool = False) -> torch.Tensor:
    """(B, N) positions -> (B, N) int64 ids, equal exactly for tokens of one S2 segment.

    A segment is a run of one document (`document_starts`) whose tokens share floor((t + shift) / G), t the token's
    index inside its document. Groups count tokens, not position ids: for plain or restarting ids the two agree;
    with PoSE's skips a group still holds G tokens (S2's cost) and attends across a skip that falls inside it.
    indexed: the position ids are t itself, and a row may begin inside a document (a context-parallel chunk).
    """
    start = document_starts(positions)
    index = positions if indexed else token_index(start)
    bucket = torch.div(index + shift, group, rounding_mode="floor")
    change = start.clone()
    change[:, 1:] |= bucket[:, 1:] != bucket[:, :-1]
    return change.long().cumsum(dim=1)


@dataclass
class Varlen:
    """The valid tokens of all rows as one stream, each S2 segment its own sequence (the varlen kernels' input)."""

    keep: torch.Tensor | None  # (T,) flat indices of the valid tokens into B * N, None when every token is valid
    cu_seqlens: torch.Tensor  # (segments + 1,) int32 offsets of each segment in the stream
    max_len: int  # the longest segment (a Python int: the kernels take it on the host)
    lengths: torch.Tensor  # (segments,) int64
    lengths_host: list[int]  # the same on the host, read once per forward (xformers takes a list)

    def lengths_list(self) -> list[int]:
        return self.lengths_host


@dataclass
class RowLayout:
    """What the rows of one batch look like to S2-Attn. positions: (B, N) or None for 0..N-1 in every row; valid:
    (B, N) bool or None when nothing is padded; grouped: the reshape-into-groups fast path applies (plain positions,
    at most right padding)."""

    b: int
    n: int
    device: torch.device
    positions: torch.Tensor | None
    valid: torch.Tensor | None
    grouped: bool
    indexed: bool = False  # positions are each token's index in its document (build's `indexed`)
    empty: bool = False  # every token is padding (a context-parallel rank's chunk of short conversations)
    _segments: dict = field(default_factory=dict, repr=False)
    _varlen: dict = field(default_factory=dict, repr=False)
    _documents: dict = field(default_factory=dict, repr=False)

    @property
    def mask(self) -> torch.Tensor:
        """(B, N) bool, True for real tokens."""
        if self.valid is not None:
            return self.valid
        return torch.ones(self.b, self.n, dtype=torch.bool, device=self.device)

    def plain(self) -> torch.Tensor:
        return torch.arange(self.n, device=self.device).expand(self.b, self.n)

    def segments(self, group: int, shift: int) -> torch.Tensor:
        """(B, N) S2 segment ids for group size `group` shifted by `shift` (WHOLE: one segment per document)."""
        key = (group, shift)
        if key not in self._segments:
            pos = self.plain() if self.positions is None else self.positions
            self._segments[key] = segment_ids(pos, group, shift, self.indexed)
        return self._segments[key]

    def documents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(doc ids, index inside the document), both (B, N): for attention sinks."""
        if "doc" not in self._documents:
            start = document_starts(self.plain() if self.positions is None else self.positions)
            self._documents["doc"] = (start.long().cumsum(dim=1), token_index(start))
        return self._documents["doc"]

    def document_spans(self) -> list[list[tuple[int, int]]] | None:
        """Each row's documents as (start, end) token ranges, read to the host once per forward; None where some
        token is padding or a row begins inside a document (context parallel), or past DOCUMENT_CALLS documents."""
        if "spans" not in self._documents:
            spans = None
            if self.valid is None and not self.indexed:
                start = document_starts(self.plain() if self.positions is None else self.positions)
                rows, cols = start.nonzero(as_tuple=True)  # the one host read
                if len(cols) <= DOCUMENT_CALLS:
                    spans = [[] for _ in range(self.b)]
                    for r, c in zip(rows.tolist(), cols.tolist()):
                        if spans[r]:
                            spans[r][-1] = (spans[r][-1][0], c)
                        spans[r].append((c, self.n))
            self._documents["spans"] = spans
        return self._documents["spans"]

    def varlen(self, group: int, shift: int) -> Varlen:
        """The unpadded token stream with one sequence per segment, for group `group` shifted by `shift`."""
        key = (group, shift)
        if key not in self._varlen:
            seg = self.segments(group, shift)
            # Segment ids restart in every row; offset them so that rows never merge.
            flat = (seg + torch.arange(self.b, device=self.device).unsqueeze(1) * (self.n + 1)).reshape(-1)
            keep = None
            if self.valid is not None:
                keep = self.valid.reshape(-1).nonzero().squeeze(1)
                flat = flat[keep]
            _, lengths = torch.unique_consecutive(flat, return_counts=True)
            cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
            host = lengths.tolist()  # the one host read, for max_len and xformers' list: not one per layer
            longest = max(host, default=0)  # no token at all: rows of padding only
            self._varlen[key] = Varlen(keep=keep, cu_seqlens=cu, max_len=longest, lengths=lengths, lengths_host=host)
        return self._varlen[key]


def _is_right_padded(valid: torch.Tensor) -> bool:
    as_int = valid.to(torch.uint8)
    return bool((as_int.cummin(dim=1).values == as_int).all())


def build(
    position_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    b: int,
    n: int,
    device,
    *,
    indexed: bool = False,
) -> RowLayout:
    """The layout of (B, N) rows from their position ids ((B, N) or (1, N), or None) and padding mask ((B, N),
    1 = real token, or None), reused from the position-ids (else mask) tensor when it was built for it before.
    indexed: the ids are each token's index in its document and the rows may begin inside one (context parallel:
    a chunk with the previous rank's tokens before it), so segments are counted from the ids, not the row start."""
    holder = position_ids if position_ids is not None else attention_mask
    key = (
        b,
        n,
        str(device),
        None if attention_mask is None else attention_mask._version,
        None if position_ids is None else position_ids._version,
        indexed,
    )
    # The entry holds the mask it was built with and is reused only for that very object: an id() alone can be
    # a new mask's, once the old one is freed (the holder's own mask is not stored: no cycle through its __dict__).
    mask = attention_mask if holder is not attention_mask else None
    if torch.compiler.is_compiling():  # dynamo cannot trace a tensor's __dict__: the compiled graph keeps it anyway
        holder = None
    if holder is not None:
        cached = holder.__dict__.get(_ATTR)
        if cached is not None and cached[0] == key and cached[2] is mask:
            return cached[1]
    valid = None if attention_mask is None else attention_mask.to(device=device, dtype=torch.bool)
    if valid is not None and bool(valid.all()):
        valid = None
    positions = None
    if position_ids is not None:
        pos = position_ids.to(device=device).expand(b, n)
        if indexed or not bool((pos == torch.arange(n, device=device)).all()):
            positions = pos.long()
    grouped = positions is None and (valid is None or _is_right_padded(valid))
    empty = valid is not None and not bool(valid.any())
    layout = RowLayout(
        b=b, n=n, device=torch.device(device), positions=positions, valid=valid, grouped=grouped, indexed=indexed,
        empty=empty,
    )  # fmt: skip
    if holder is not None:
        holder.__dict__[_ATTR] = (key, layout, mask)
    return layout
