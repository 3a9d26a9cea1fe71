"""PoSE, positional skip-wise training (Zhu et al., arXiv 2309.10400, §3): train in rows of a short window whose
position ids skip, so that RoPE meets the positions and relative distances of the whole target context.

Each document of a batch is cut into `chunks` contiguous chunks of random lengths, and chunk i's position ids are
shifted by a skipping bias u_i: u_0 = 0 and u_i is drawn uniformly from {u_(i-1), ..., T - n} (T the target
context, n the document's tokens; PoSE §3). So the ids of a document start at 0, strictly increase, and end at
most at T - 1, and a pair of tokens in different chunks is (j - i) + u_b - u_a apart: every distance up to T - 1
occurs. The text stays contiguous (the paper's content offset v_i is 0 here): only the position ids skip.

Documents are TRL's: in padding-free rows (`--pack documents`) a document starts wherever TRL's collator restarts
the position ids at 0, and each gets its own chunks and skips; a row of `--pack concat` (full, joined rows) or a
padded row is one document, any padding left at position 0. Documents begin at 0 as before, so the collator's
`cu_seq_lens` and its label masking stay right. S2-Attn (attention/layout.py) begins a document only where ids do
not increase, so a skip never splits one, and counts its groups in tokens, not ids (G tokens per group whatever the
skips).

The skips are drawn from a generator seeded by `--seed` and the batch's token ids: reproducible, independent of
dataloader workers, and the same batches get the same skips after `--resume_from_checkpoint`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)


def skip_positions(plain: torch.Tensor, target: int, chunks: int, generator: torch.Generator) -> torch.Tensor:
    """(B, N) position ids restarting at 0 per document (TRL's) -> (B, N) PoSE ids below `target` (PoSE §3)."""
    out = plain.clone()
    for r, row in enumerate(plain):
        starts = (row == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            raise ValueError(
                "PoSE: a row does not begin a document at position 0; the collator's position ids "
                "must restart at 0 for each document"
            )
        for s, e in zip(starts, starts[1:] + [len(row)]):
            if not torch.equal(row[s:e], torch.arange(e - s, dtype=row.dtype)):
                raise ValueError(
                    f"PoSE: position ids {row[s:e].tolist()[:8]}... are not 0, 1, 2, ... inside a "
                    "document; PoSE must see the collator's plain ids"
                )
            out[r, s:e] = _document(e - s, target, chunks, generator)
    return out


def _document(n: int, target: int, chunks: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) ids of one document: `chunks` chunks (fewer when n is shorter) of random lengths, skipping up to
    target - n positions in all; 0, 1, ..., n - 1 when the document leaves no room (n >= target)."""
    k, room = min(chunks, n), target - n
    if k < 2 or room <= 0:
        return torch.arange(n)
    cuts = (torch.randperm(n - 1, generator=generator)[: k - 1] + 1).sort().values  # (k - 1,) chunk starts
    bias = [0]
    for _ in range(k - 1):  # u_i ~ U{u_(i-1), ..., room}: non-decreasing, so ids keep increasing
        bias.append(int(torch.randint(bias[-1], room + 1, (1,), generator=generator)))
    lengths = torch.diff(torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), n)]))  # (k,)
    return torch.arange(n) + torch.tensor(bias).repeat_interleave(lengths)


def batch_generator(seed: int, input_ids: torch.Tensor) -> torch.Generator:
    """A generator seeded by `seed` and the batch's tokens: the same batch always gets the same skips."""
    digest = hashlib.blake2b(
        input_ids.detach().cpu().to(torch.int64).numpy().tobytes(), digest_size=8, key=str(seed).encode()
    )
    return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)


@dataclass
class PoseCollator:
    """The trainer's collator, its batches given PoSE position ids spanning `target_context` (the S2 op and
    its row layout read them as documents and groups; RoPE reads them as positions). Wraps TRL's collator instead of
    replacing it: TRL builds the rows, labels and `cu_seq_lens`, this only rewrites `position_ids`."""

    collator: Callable[[list], dict[str, Any]]
    target_context: int
    chunks: int = 2
    seed: int = 0

    def __call__(self, examples: list) -> dict[str, Any]:
        batch = self.collator(examples)
        ids = batch["input_ids"]  # (B, N); (1, tokens) for TRL's padding-free rows
        if "position_ids" in batch:  # padding-free: TRL's ids, restarting at 0 per document
            plain = batch["position_ids"]
        else:  # padded rows: the real tokens of a row are one document, padding stays at 0
            mask = batch.get("attention_mask", torch.ones_like(ids)).long()
            plain = (mask.cumsum(1) - 1).clamp(min=0) * mask
        batch["position_ids"] = skip_positions(plain, self.target_context, self.chunks, batch_generator(self.seed, ids))
        return batch


def enable_pose(trainer, target_context: int, chunks: int, seed: int) -> None:
    """Give `trainer` (a transformers Trainer) PoSE position ids by wrapping its data collator (TRL refuses a
    custom collator for padding-free rows, so the one it built is wrapped after construction)."""
    trainer.data_collator = PoseCollator(trainer.data_collator, target_context, chunks, seed)
    logger.info(
        "PoSE: rows of %d tokens with position ids skipping up to %d (%d chunks per document)",
        trainer.args.max_length,
        target_context - 1,
        chunks,
    )


def describe(model_cfg) -> list[str]:
    """The dry run's line for PoSE (from the ModelConfig), or none when it is off."""
    if not model_cfg.pose_window:
        return []
    return [
        f"positions          PoSE: rows of {model_cfg.pose_window} tokens, position ids skipping to span "
        f"{model_cfg.target_context} ({model_cfg.pose_chunks} chunks per document; arXiv 2309.10400 §3)"
    ]


def tiny_window(window: int, target: int, tiny_target: int, chunks: int) -> int:
    """The PoSE window of a `--tiny` run: the recipe's window / target ratio at the tiny target, 0 when off."""
    return max(chunks, tiny_target * window // target) if window else 0
