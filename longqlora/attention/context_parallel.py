"""S2-Attn context parallelism: one sequence split over ranks, each holding a contiguous chunk of it.

A query of S2-Attn (LongLoRA arXiv 2309.12307 §3.2) sees only keys of its own segment, at most G tokens, so a rank
whose chunk starts on a group boundary needs from other ranks only what lies in the segment that crosses its first
token: for plain rows the last G/2 keys and values of the previous rank, and only for the shifted heads (the
unshifted heads' segments end where the chunk ends). Packed documents put segment starts anywhere, so there the
previous rank's last G tokens of every head come over. Ring attention moves every chunk's keys and values to every
rank, and Ulysses all-to-alls the whole sequence per layer; this moves one half group to one neighbour
(docs/distributed.md has the arithmetic).

How: `halo` (two autograd functions, post and wait) sends a rank's last tokens of K/V to the next rank and, in the
backward, their gradient back; `cp_attention` puts the received tokens before the local ones, zero queries in front
of the local queries, and runs the ordinary `s2_attention` on that with the position ids counted as document
indices; the outputs of the borrowed tokens are dropped (their gradients are zero, so nothing flows back through
them twice). Both transfers overlap compute: the forward's is posted, the heads that need nothing borrowed (on plain
rows the unshifted half; on the first rank all) run on the chunk alone, and only then does the rank wait for it; in
the backward the gradient of the borrowed tokens is posted as soon as it is known, and waited for only after the
backward of those heads. Every rank of a group runs the same layers in the same order (recomputed layers too), so
the point-to-point pairs always match.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from longqlora.attention.op import head_split, s2_attention

_ATTR = "_longqlora_cp_halo"


@dataclass(frozen=True)
class CPGroup:
    """The ranks that share one sequence: `size` consecutive global ranks, this one the `index`-th of them."""

    group: object  # torch.distributed ProcessGroup of these ranks (the launch's backend: NCCL on GPUs)
    index: int
    size: int
    first_rank: int  # global rank of index 0
    cpu_group: object = None  # the same ranks on gloo, for checks on host tensors (the data collator's)

    @property
    def prev(self) -> int | None:
        return self.first_rank + self.index - 1 if self.index > 0 else None

    @property
    def next(self) -> int | None:
        return self.first_rank + self.index + 1 if self.index < self.size - 1 else None


def new_group(size: int) -> CPGroup:
    """Split the launched processes into context-parallel groups of `size` consecutive ranks (the data-parallel
    replicas are the groups). Every process must call this, in the same order: torch.distributed.new_group is
    collective."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    if world % size:
        raise ValueError(f"--context_parallel {size}: does not divide the {world} launched processes")
    mine = None
    for start in range(0, world, size):
        ranks = list(range(start, start + size))
        group, cpu_group = dist.new_group(ranks), dist.new_group(ranks, backend="gloo")
        if start <= rank < start + size:
            mine = CPGroup(group=group, index=rank - start, size=size, first_rank=start, cpu_group=cpu_group)
    return mine


def _exchange(
    cp: CPGroup, send: torch.Tensor | None, to: int | None, recv: torch.Tensor, frm: int | None, pending=None
) -> None:
    """Send `send` to global rank `to` and receive `recv` from `frm` (either may be None), as one batch so that
    neighbours never wait on each other in the wrong order. With a `pending` list the transfers are only posted:
    their works (and the tensors they read) go into it for `finish`."""
    import torch.distributed as dist

    ops = []
    if to is not None:
        ops.append(dist.P2POp(dist.isend, send, to, group=cp.group))
    if frm is not None:
        ops.append(dist.P2POp(dist.irecv, recv, frm, group=cp.group))
    works = dist.batch_isend_irecv(ops) if ops else []
    if pending is not None:
        pending.extend([*works, send, recv])
        return
    for work in works:
        work.wait()


def finish(pending: list) -> None:
    """Wait for the transfers that `_exchange` posted into `pending`."""
    for work in pending:
        if not isinstance(work, torch.Tensor):
            work.wait()
    pending.clear()


class _HaloPost(torch.autograd.Function):
    """tail (this rank's last T tokens, any shape) -> a buffer for the previous rank's tail, the transfers only
    posted (`_HaloWait` waits). Backward: waits for the gradient of the tail that `_HaloWait`'s backward asked the
    next rank for, and returns it."""

    @staticmethod
    def forward(ctx, tail, cp, state):
        ctx.state = state
        tail = tail.contiguous()
        received = torch.zeros_like(tail)
        _exchange(cp, tail, cp.next, received, cp.prev, state["forward"])
        return received

    @staticmethod
    def backward(ctx, _):
        state = ctx.state
        finish(state["backward"])
        return state.pop("grad"), None, None


class _HaloWait(torch.autograd.Function):
    """Waits for what `_HaloPost` posted and passes the received tokens on. Backward: posts the gradient of the
    received tokens to the previous rank and a receive of this rank's from the next, and returns at once: autograd
    orders nodes by creation, newest first, so the compute made between the two nodes (the heads that needed
    nothing borrowed) runs its backward before `_HaloPost`'s backward waits."""

    @staticmethod
    def forward(ctx, received, cp, state):
        ctx.cp, ctx.state = cp, state
        finish(state["forward"])
        return received.view_as(received)

    @staticmethod
    def backward(ctx, grad):
        cp, state = ctx.cp, ctx.state
        state["grad"] = torch.zeros_like(grad)
        _exchange(cp, grad.contiguous(), cp.prev, state["grad"], cp.next, state["backward"])
        return grad, None, None


def halo(tail: torch.Tensor, cp: CPGroup) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """The previous rank's `tail` (zeros on the first rank of the group), in flight, and the function that waits
    for it and returns it differentiably. What runs between the two overlaps the transfer, in the forward and (in
    reverse) in the backward, where the tail's gradient goes back the other way."""
    state = {"forward": [], "backward": []}
    in_flight = _HaloPost.apply(tail, cp, state)
    return in_flight, lambda received: _HaloWait.apply(received, cp, state)


def _halo_rows(position_ids: torch.Tensor, attention_mask: torch.Tensor | None, group: int, cp: CPGroup, b: int):
    """(halo tokens, whether only the shifted heads need them, extended positions, extended mask) for the chunk
    whose (B, C) or (1, C) position ids are `position_ids`: computed once per forward and kept on that tensor (the
    model hands the same one to every layer, and to every layer recomputed in the backward; the exchange is
    collective, and every rank caches alike, so all ranks exchange alike)."""
    import torch.distributed as dist

    key = (group, b, position_ids._version, None if attention_mask is None else attention_mask._version)
    cached = position_ids.__dict__.get(_ATTR)
    if cached is not None and cached[0] == key and cached[2] is attention_mask:  # that very mask (not its id)
        return cached[1]
    pos = position_ids.expand(b, -1).long()
    c = pos.shape[1]
    if group > c:
        raise ValueError(
            f"--context_parallel {cp.size}: S2 group of {group} tokens is longer than one rank's chunk of {c}; "
            "use fewer ranks or smaller groups (--group_ratio, --s2_group_schedule)"
        )
    mask = torch.ones_like(pos) if attention_mask is None else attention_mask.long()
    prev = torch.zeros(2, b, group, dtype=torch.long, device=pos.device)
    _exchange(cp, torch.stack([pos[:, -group:], mask[:, -group:]]).contiguous(), cp.next, prev, cp.prev)
    # Plain rows whose chunk starts on a group boundary: the unshifted segments never cross into this chunk.
    plain = bool((pos[:, 1:] == pos[:, :-1] + 1).all()) and bool((pos[:, 0] % group == 0).all())
    if cp.prev is not None:
        plain = plain and bool((pos[:, 0] == prev[0, :, -1] + 1).all())
    flag = torch.tensor([int(plain)], device=pos.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=cp.group)
    tokens = group // 2 if flag.item() else group
    if cp.prev is None:
        result = (tokens, bool(flag.item()), pos, attention_mask)
    else:
        ext_pos = torch.cat([prev[0, :, group - tokens :], pos], dim=1)
        borrowed = prev[1, :, group - tokens :]
        ext_mask = None
        # A chunk without padding may come with no mask (transformers' flash-style mask function gives None) while
        # the tail it borrows is padding: that padding is masked all the same.
        if attention_mask is not None or not bool(borrowed.all()):
            ext_mask = torch.cat([borrowed, mask], dim=1).to((mask if attention_mask is None else attention_mask).dtype)
        result = (tokens, bool(flag.item()), ext_pos, ext_mask)
    position_ids.__dict__[_ATTR] = (key, result, attention_mask)
    return result


def cp_attention(
    query, key, value, group_size: int, cp: CPGroup, *, position_ids, attention_mask=None, **options
) -> torch.Tensor:
    """S2-Attn over a sequence split across the ranks of `cp`: query (B, H, C, D), key/value (B, H_kv, C, D) this
    rank's chunk; position_ids (B, C) each token's index in its document (the chunk's slice of the whole row's
    ids); attention_mask (B, C) or None. Returns (B, H, C, D), equal to the rows of `s2_attention` over the whole
    sequence that fall in this chunk. `options` go to `s2_attention` (scale, backend, dropout)."""
    if position_ids is None:
        raise ValueError("context parallel S2-Attn needs the chunk's position ids (the data collator adds them)")
    b, h, c, d = query.shape
    h_kv = key.shape[1]
    tokens, shifted_only, ext_pos, ext_mask = _halo_rows(position_ids, attention_mask, int(group_size), cp, b)
    # Plain rows: only the key/value heads that the shifted query heads read come over.
    kv0 = head_split(h, 0.0)[2][0] // (h // h_kv) if shifted_only else 0
    tail = torch.stack([key[:, kv0:, c - tokens :], value[:, kv0:, c - tokens :]])  # (2, B, H_kv - kv0, T, D)
    received, wait = halo(tail, cp)  # the previous rank's last T tokens, in flight
    if cp.prev is None or shifted_only:
        # What needs nothing borrowed runs while the halo is in flight: the first rank's every head; on plain rows
        # every rank's unshifted heads, whose segments end inside the chunk.
        local = s2_attention(
            query, key, value, group_size, position_ids=position_ids, attention_mask=attention_mask,
            indexed_positions=True, heads="all" if cp.prev is None else "plain", **options,
        )  # fmt: skip
    received = wait(received)
    if cp.prev is None:
        # The first rank uses nothing it received, but its backward must still take the next rank's gradient
        # for its tail: tie the halo into the graph with weight zero.
        return local + 0.0 * received.sum()
    if kv0:
        received = torch.cat([received.new_zeros(2, b, kv0, tokens, d), received], dim=2)
    k_ext = torch.cat([received[0], key], dim=2)  # (B, H_kv, T + C, D)
    v_ext = torch.cat([received[1], value], dim=2)
    q_ext = torch.cat([query.new_zeros(b, h, tokens, d), query], dim=2)  # (B, H, T + C, D); borrowed rows dropped
    out = s2_attention(
        q_ext, k_ext, v_ext, group_size, position_ids=ext_pos, attention_mask=ext_mask, indexed_positions=True,
        heads="shifted" if shifted_only else "all", **options,
    )[:, :, tokens:]  # fmt: skip
    if not shifted_only:
        return out
    split = head_split(h, 0.0)[2][0]  # the first shifted head
    local[:, split:] = out[:, split:]  # into the rows the unshifted call left unwritten: no third (B, C, H, D) buffer
    return local
