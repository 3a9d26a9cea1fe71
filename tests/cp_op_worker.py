"""Run under `torchrun --nproc_per_node P tests/cp_op_worker.py OUT` (gloo, CPU): every rank computes S2-Attn on the
whole sequence as the reference and context-parallel S2-Attn on its chunk, and writes the largest differences of
the output and of the query/key/value gradients, per case, to OUT/rank<R>.json."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from longqlora.attention.context_parallel import _ATTR, _halo_rows, cp_attention, new_group
from longqlora.attention.op import s2_attention


def packed_positions(n: int, starts: list[int]) -> torch.Tensor:
    pos, begin = torch.empty(n, dtype=torch.long), 0
    for end in [*starts[1:], n]:
        pos[begin:end] = torch.arange(end - begin)
        begin = end
    return pos


def case(name, cp, *, b, h, h_kv, n, d, group, positions=None, mask=None, seed=0, none_when_full=False):
    """One comparison; with `none_when_full` a chunk without padding gets no mask, as transformers' flash-style mask
    function hands it (the previous rank's padding must still be masked)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h_kv, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h_kv, n, d, generator=g, dtype=torch.float64)
    w = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    pos = torch.arange(n).expand(b, n) if positions is None else positions.expand(b, n)

    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = s2_attention(*ref_in, group, position_ids=pos, attention_mask=mask, backend="sdpa")
    (ref * w).sum().backward()

    c = n // cp.size
    part = slice(cp.index * c, (cp.index + 1) * c)
    mine = [t[:, :, part].clone().requires_grad_() for t in (q, k, v)]
    chunk_pos = pos[:, part]
    chunk_mask = None if mask is None else mask[:, part]
    if none_when_full and chunk_mask is not None and bool(chunk_mask.all()):
        chunk_mask = None
    out = cp_attention(*mine, group, cp, position_ids=chunk_pos, attention_mask=chunk_mask, backend="sdpa")
    (out * w[:, :, part]).sum().backward()
    diffs = {"out": (out - ref[:, :, part]).abs().max().item()}
    # The exchange of positions is kept on the ids tensor: the next layer of the same forward reuses it.
    diffs["halo_cached"] = _ATTR in chunk_pos.__dict__
    for label, mine_t, ref_t in zip("qkv", mine, ref_in, strict=True):
        diffs[f"grad_{label}"] = (mine_t.grad - ref_t.grad[:, :, part]).abs().max().item()
    diffs["reference_grad_k"] = ref_in[1].grad[:, :, part].abs().max().item()  # not all zero: the case tests
    # Without the borrowed tokens the chunk is wrong (on every rank but the first): the exchange matters.
    alone = s2_attention(
        q[:, :, part], k[:, :, part], v[:, :, part], group, position_ids=pos[:, part],
        attention_mask=chunk_mask, backend="sdpa", indexed_positions=True,
    )  # fmt: skip
    diffs["without_halo"] = (alone - ref[:, :, part]).abs().max().item()
    tokens, shifted_only = _halo_rows(pos[:, part].clone(), chunk_mask, group, cp, b)[:2]
    diffs["halo_tokens"], diffs["shifted_heads_only"] = tokens, shifted_only
    return name, diffs


class _Mark(torch.autograd.Function):
    """Identity that records `label` when its backward runs: on an op's input, just after that op's backward."""

    @staticmethod
    def forward(ctx, x, events, label):
        ctx.events, ctx.label = events, label
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.events.append(ctx.label)
        return grad, None, None


def order(cp) -> dict:
    """What cp_attention does, in order, on plain rows and on packed ones, forward then backward: which heads it
    computes (`heads`) and their backward, when it posts transfers of the borrowed keys and values (or of their
    gradient) and when it waits for them."""
    import longqlora.attention.context_parallel as module

    events, compute, wait, exchange = [], module.s2_attention, module.finish, module._exchange

    def recorded(query, *args, heads="all", **kwargs):
        events.append(heads)
        return compute(_Mark.apply(query, events, f"{heads} backward"), *args, heads=heads, **kwargs)

    def waited(pending):
        events.append("wait" if any(not isinstance(w, torch.Tensor) for w in pending) else "nothing pending")
        wait(pending)

    def posted(*args, **kwargs):
        if kwargs.get("pending", args[5] if len(args) > 5 else None) is not None:
            events.append("post")
        exchange(*args, **kwargs)

    module.s2_attention, module.finish, module._exchange = recorded, waited, posted
    try:
        got = {}
        for name, positions, group in (("plain", None, 24), ("packed", packed_positions(48 * cp.size, [0, 30]), 24)):
            events.clear()
            case(name, cp, b=1, h=6, h_kv=2, n=48 * cp.size, d=8, group=group, positions=positions)
            got[name] = list(events)
    finally:
        module.s2_attention, module.finish, module._exchange = compute, wait, exchange
    return got


def main(out_dir: str):
    dist.init_process_group("gloo")
    cp = new_group(dist.get_world_size())
    p = cp.size
    n = 48 * p
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, n - 40 :] = 0  # right padding reaching into the previous rank's chunk
    left = torch.ones(1, n, dtype=torch.long)
    left[0, :40] = 0  # the first chunk's tail is padding, the second chunk has none
    results = dict(
        [
            case("plain, GQA 6/2, G = chunk", cp, b=2, h=6, h_kv=2, n=n, d=8, group=48),
            case("plain, odd heads 5/5, G < chunk", cp, b=1, h=5, h_kv=5, n=n, d=8, group=16, seed=1),
            case("plain, odd G 15 (chunk not on a group boundary)", cp, b=1, h=4, h_kv=1, n=n, d=8, group=15),
            case(
                "packed documents, one starting on a chunk boundary",
                cp,
                b=1,
                h=6,
                h_kv=3,
                n=n,
                d=8,
                group=32,
                positions=packed_positions(n, [0, 20, 48, 61, 100]),
                seed=2,
            ),
            case("right padding, 2 rows", cp, b=2, h=4, h_kv=2, n=n, d=8, group=24, mask=mask, seed=3),
            case(
                "left padding into the next chunk's halo, no mask where a chunk has none",
                cp,
                b=1,
                h=4,
                h_kv=2,
                n=n,
                d=8,
                group=24,
                mask=left,
                seed=4,
                none_when_full=True,
            ),  # fmt: skip
        ]
    )
    Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    Path(out_dir, f"order{dist.get_rank()}.json").write_text(json.dumps(order(cp)))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
