"""Sliding-window perplexity with an explicit protocol, broken down by position inside the window.

Protocol (printed with every result, because LongLoRA's and LongQLoRA's numbers differ exactly here):
- the text is one token stream; windows of `context_length` tokens start every `stride` tokens;
- score="new" (default): every token is scored once, in the first window that holds it: the whole first window,
  then the last `stride` tokens of each later window, so scored tokens have between context-stride and context
  tokens of context (all of 0..context-1 in the first window); with stride == context_length the windows do not
  overlap and every position 0..context-1 is scored equally often;
- score="tail": only tokens with at least context-stride tokens of context, the first window included;
- a last window that would run past the text is dropped (never padded), so every window is full length.
The per-position sums let a caller read the perplexity of positions beyond the original context alone, where
position interpolation and long-context training show their effect.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


@dataclass
class WindowScores:
    """NLL sums and token counts per position inside the window (index = tokens of context before it)."""

    context_length: int
    stride: int
    score: str
    windows: int
    nll_sum: torch.Tensor  # (context_length,) float64
    count: torch.Tensor  # (context_length,) int64

    def perplexity(self, start: int = 0, end: int | None = None) -> float:
        """exp(mean NLL) over scored tokens at window positions [start, end)."""
        n = int(self.count[start:end].sum())
        if n == 0:
            return float("nan")
        return math.exp(float(self.nll_sum[start:end].sum()) / n)

    def tokens(self, start: int = 0, end: int | None = None) -> int:
        return int(self.count[start:end].sum())

    def protocol(self) -> str:
        return (f"windows of {self.context_length} tokens every {self.stride} tokens ({self.windows} windows), "
                f"score={self.score}: " + ("each token once, in the first window holding it" if self.score == "new"
                                           else f"only tokens with >= {self.context_length - self.stride} tokens "
                                                "of context"))


def scored_positions(window_index: int, context_length: int, stride: int, score: str) -> slice:
    """Which positions of window `window_index` are scored under the protocol above (position 0 never is:
    it has no token before it to predict it from)."""
    if score not in ("new", "tail"):
        raise ValueError(f"--score must be 'new' or 'tail', got {score!r}")
    if score == "new" and window_index == 0:
        return slice(1, context_length)
    return slice(max(1, context_length - stride), context_length)


def _token_nll(model, window: torch.Tensor, chunk: int) -> torch.Tensor:
    """(B, N) token ids -> (B, N) NLL of each token given the ones before it (position 0 gets 0).

    The LM head runs over `chunk` positions at a time so that (N x vocab) logits never exist in fp32 at once.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=window, use_cache=False).last_hidden_state  # (B, N, hidden)
    head = base.get_output_embeddings()
    nll = torch.zeros(window.shape, dtype=torch.float64, device=window.device)
    for start in range(0, window.shape[1] - 1, chunk):
        end = min(start + chunk, window.shape[1] - 1)
        logits = head(hidden[:, start:end]).float()  # predicts tokens start+1 .. end
        target = window[:, start + 1:end + 1]
        nll[:, start + 1:end + 1] = F.cross_entropy(logits.transpose(1, 2), target, reduction="none").double()
    return nll


@torch.no_grad()
def window_scores(model, token_ids, context_length: int, stride: int | None = None, *, score: str = "new",
                  batch_size: int = 1, chunk: int = 2048, max_windows: int | None = None,
                  progress: bool = True) -> WindowScores:
    """Score a 1-D token stream with the model in eval mode (full attention, no cache)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    stride = context_length if stride is None else stride
    if context_length < 2:
        raise ValueError(f"--context_lengths: {context_length} is too short to score (needs >= 2)")
    if not 1 <= stride <= context_length:
        raise ValueError(f"--stride must be between 1 and the context length {context_length}, got {stride}")
    if ids.numel() < context_length:
        raise ValueError(f"--context_lengths {context_length}: the text has only {ids.numel()} tokens; pass a "
                         "longer text or a shorter context")
    starts = list(range(0, ids.numel() - context_length + 1, stride))
    if max_windows is not None:
        starts = starts[:max_windows]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll_sum = torch.zeros(context_length, dtype=torch.float64)
    count = torch.zeros(context_length, dtype=torch.long)
    bar = tqdm(total=len(starts), desc=f"perplexity @{context_length}", disable=not progress, leave=False)
    for first in range(0, len(starts), batch_size):
        batch_starts = starts[first:first + batch_size]
        windows = torch.stack([ids[s:s + context_length] for s in batch_starts]).to(device)
        nll = _token_nll(model, windows, chunk).cpu()
        for row, index in enumerate(range(first, first + len(batch_starts))):
            keep = scored_positions(index, context_length, stride, score)
            nll_sum[keep] += nll[row, keep]
            count[keep] += 1
        bar.update(len(batch_starts))
    bar.close()
    model.train(was_training)
    return WindowScores(context_length, stride, score, len(starts), nll_sum, count)
