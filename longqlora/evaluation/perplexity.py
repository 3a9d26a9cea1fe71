"""Sliding-window perplexity with an explicit protocol, broken down by position inside the window.

Protocol (printed with every result, because LongLoRA's and LongQLoRA's numbers differ exactly here):
- the text is one token stream; windows of `context_length` tokens start every `stride` tokens;
- score="new" (default): every token is scored once, in the first window that holds it: the whole first window,
  then the last `stride` tokens of each later window, so scored tokens have between context-stride and
  context-1 tokens of context (all of 0..context-1 in the first window); with stride == context_length the
  windows do not overlap and each scores its positions 1..context-1: a window's first token has nothing before it
  to be predicted from, so one token in context_length goes unscored (as in LongLoRA's evaluation);
- score="tail": only tokens with at least context-stride tokens of context, the first window included;
- a last window that would run past the text is dropped (never padded), so every window is full length.
The per-position sums let a caller read the perplexity of positions beyond the original context alone, where
position interpolation and long-context training show their effect.
"""

from __future__ import annotations

import logging
import math
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from longqlora.errors import flags_renamed
from longqlora.evaluation import evaluating
from longqlora.evaluation.loading import LoaderArgs

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
        return (
            f"windows of {self.context_length} tokens every {self.stride} tokens ({self.windows} windows), "
            f"score={self.score}: "
            + (
                "each token once, in the first window holding it"
                + (
                    ", except each window's first token"
                    if self.stride == self.context_length and self.windows > 1
                    else ""
                )
                if self.score == "new"
                else f"only tokens with >= {self.context_length - self.stride} tokens of context"
            )
        )


def scored_positions(window_index: int, context_length: int, stride: int, score: str) -> slice:
    """Which positions of window `window_index` are scored under the protocol above (position 0 never is:
    it has no token before it to predict it from)."""
    if score not in ("new", "tail"):
        raise ValueError(f"--score must be 'new' or 'tail', got {score!r}")
    if score == "new" and window_index == 0:
        return slice(1, context_length)
    return slice(max(1, context_length - stride), context_length)


_HEAD_IS_OUTPUT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> probed once


def _head_is_output(model, base, window: torch.Tensor) -> bool:
    """Whether the model's own logits are its LM head's output unchanged, probed once per model on a few tokens:
    Llama, Mistral and Qwen2 return them as is; Gemma-2/3 soft-cap them, Granite and Cohere scale them (the same
    config name scales up in one model and down in another, so they are compared, not read from the config)."""
    if model not in _HEAD_IS_OUTPUT:
        probe = window[:1, : min(16, window.shape[1])]
        hidden = base.get_decoder()(input_ids=probe, use_cache=False).last_hidden_state
        direct = base.get_output_embeddings()(hidden).float()
        own = model(input_ids=probe, use_cache=False).logits.float()
        same = bool(((direct - own).abs().max() <= 1e-3 * own.abs().max().clamp(min=1.0)).item())
        if not same:
            logger.info("the model transforms its LM head's output: scored with its own forward, whole windows")
        _HEAD_IS_OUTPUT[model] = same
    return _HEAD_IS_OUTPUT[model]


def _token_nll(model, window: torch.Tensor, chunk: int, first: int = 1) -> torch.Tensor:
    """(B, N) token ids -> (B, N) NLL of each token from position `first` on, given the ones before it (earlier
    positions get 0).

    The LM head runs over `chunk` positions at a time so that (N x vocab) logits never exist in fp32 at once, and
    not over the positions no score needs (with --stride < context most of each window: 8% of a SmolLM2 window's
    time); a model whose forward transforms the head's output (`_head_is_output`) is scored through that forward.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    nll = torch.zeros(window.shape, dtype=torch.float64, device=window.device)
    if not _head_is_output(model, base, window):
        logits = model(input_ids=window, use_cache=False).logits[:, :-1]  # (B, N - 1, vocab)
        nll[:, 1:] = _nll(logits.float(), window[:, 1:])
        return nll
    hidden = base.get_decoder()(input_ids=window, use_cache=False).last_hidden_state  # (B, N, hidden)
    head = base.get_output_embeddings()
    for start in range(first - 1, window.shape[1] - 1, chunk):
        end = min(start + chunk, window.shape[1] - 1)
        logits = head(hidden[:, start:end]).float()  # predicts tokens start+1 .. end
        target = window[:, start + 1 : end + 1]
        nll[:, start + 1 : end + 1] = _nll(logits, target)
    return nll


def _nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, M, vocab) logits, (B, M) targets -> (B, M) float64 NLL; over the flat (B*M, vocab) rows, which a CPU
    computes ~7x faster than the (B, vocab, M) layout (measured, one 2047 x 49152 window)."""
    flat = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
    return flat.view_as(target).double()


@torch.no_grad()
def window_scores(
    model,
    token_ids,
    context_length: int,
    stride: int | None = None,
    *,
    score: str = "new",
    batch_size: int = 1,
    chunk: int = 2048,
    max_windows: int | None = None,
    progress: bool = True,
) -> WindowScores:
    """Score a 1-D token stream with the model in eval mode (full attention, no cache)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    stride = context_length if stride is None else stride
    if context_length < 2:
        raise ValueError(f"--context_lengths: {context_length} is too short to score (needs >= 2)")
    if not 1 <= stride <= context_length:
        raise ValueError(f"--stride must be between 1 and the context length {context_length}, got {stride}")
    if ids.numel() < context_length:
        raise ValueError(
            f"--context_lengths {context_length}: the text has only {ids.numel()} tokens; pass a "
            "longer text or a shorter context"
        )
    starts = list(range(0, ids.numel() - context_length + 1, stride))
    if max_windows is not None:
        starts = starts[:max_windows]
    device = next(model.parameters()).device
    nll_sum = torch.zeros(context_length, dtype=torch.float64)
    count = torch.zeros(context_length, dtype=torch.long)
    bar = tqdm(total=len(starts), desc=f"perplexity @{context_length}", disable=not progress, leave=False)
    with evaluating(model):
        for first in range(0, len(starts), batch_size):
            batch_starts = starts[first : first + batch_size]
            windows = torch.stack([ids[s : s + context_length] for s in batch_starts]).to(device)
            keeps = [
                scored_positions(index, context_length, stride, score) for index in range(first, first + len(windows))
            ]
            nll = _token_nll(model, windows, chunk, min(keep.start for keep in keeps)).cpu()
            for row, keep in enumerate(keeps):
                nll_sum[keep] += nll[row, keep]
                count[keep] += 1
            bar.update(len(batch_starts))
    bar.close()
    return WindowScores(context_length, stride, score, len(starts), nll_sum, count)


# ------------------------------------------------------------------------------------------- the command line
@dataclass
class PerplexityConfig(LoaderArgs):
    """`python -m longqlora perplexity`: the fields are its flags."""

    data: str = field(
        default="austen_persuasion",
        metadata={
            "help": "Text to score: a bundled book name (austen_persuasion, kjv_bible, ...), a .txt/.jsonl/.parquet "
            "file, a folder of .txt files, a save_to_disk dataset or a folder data_prep/prepare_text.py wrote (its "
            "token rows, checked against the model's tokenizer); documents are joined with EOS."
        },
    )
    context_lengths: list[int] = field(
        default_factory=lambda: [2048, 4096, 8192], metadata={"help": "Window lengths to evaluate."}
    )
    stride: int | None = field(
        default=None,
        metadata={"help": "Tokens between window starts (default: the window length, non-overlapping windows)."},
    )
    score: str = field(
        default="new",
        metadata={
            "help": "new: every token once, in the first window holding it; "
            "tail: only tokens with >= context-stride tokens before."
        },
    )
    text_field: str = field(default="text", metadata={"help": "Field holding the text in JSON/Parquet data."})
    split: str = field(
        default="train",
        metadata={"help": "Split to score of a save_to_disk DatasetDict or hub dataset (e.g. test, validation)."},
    )
    max_tokens: int | None = field(default=None, metadata={"help": "Score only the first N tokens of the text."})
    batch_size: int = field(default=1, metadata={"help": "Windows per forward pass."})
    output: str | None = field(
        default=None, metadata={"help": "results.json path; a .csv and a .png of the same name go beside it."}
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.context_lengths or min(self.context_lengths) < 2:
            raise ValueError(f"--context_lengths must be window lengths >= 2, got {self.context_lengths}")
        if self.stride is not None and not 1 <= self.stride <= min(self.context_lengths):
            raise ValueError(
                f"--stride must be between 1 and the shortest --context_lengths {min(self.context_lengths)} "
                f"(windows would skip text), got {self.stride}"
            )
        if self.score not in ("new", "tail"):
            raise ValueError(f"--score must be 'new' or 'tail', got {self.score!r}")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, got {self.batch_size}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"--max_tokens must be a positive number of tokens, got {self.max_tokens}")
        if self.output and Path(self.output).suffix.lower() in (".csv", ".png"):  # the JSON would be overwritten
            raise ValueError(
                f"--output {self.output}: names the JSON result, and the .csv and .png are written beside it "
                f"under the same name; pass {Path(self.output).with_suffix('.json')}"
            )


def text_token_ids(
    data: str, tokenizer, *, text_field: str = "text", max_tokens: int | None = None, split: str = "train"
) -> torch.Tensor:
    """The token stream `token_stream` scores, without its description."""
    return token_stream(data, tokenizer, text_field=text_field, max_tokens=max_tokens, split=split)[0]


def token_stream(
    data: str, tokenizer, *, text_field: str = "text", max_tokens: int | None = None, split: str = "train"
) -> tuple[torch.Tensor, str]:
    """(ids, what they are): the documents of `data` tokenized and joined with EOS into one stream (bundled book
    names allowed); a folder that data_prep/prepare_text.py wrote is read as its token rows, joined as they are
    (each its document with the tokenizer's special tokens and EOS, as training read them), once its tokenizer is
    checked to be the model's."""
    import pyarrow.compute as pc

    from longqlora.data import corpora
    from longqlora.data.prepared import check_tokenizer
    from longqlora.data.sources import column, resolve
    from longqlora.data.text import TextDataConfig, load_training_text

    source = corpora.book_path(data) if data in corpora.BOOKS else data
    if data not in corpora.BOOKS and "/" not in data and not os.path.exists(os.path.expanduser(data)):
        raise ValueError(
            f"--data {data}: not a bundled book ({', '.join(sorted(corpora.BOOKS))}), a local file or directory, or "
            "a hub dataset id (org/name)"
        )
    with flags_renamed({"--dataset": "--data"}):  # the data layer names its recipes' flag; this command's is --data
        if split != "train" and resolve(source).kind not in ("disk", "hub"):  # files have one split: it was ignored
            raise ValueError(
                f"--split {split}: --data {data} is a file or folder of text, with no splits; leave it out"
            )
        cfg = TextDataConfig(dataset=source, text_field=text_field, split=split)
        documents = load_training_text(cfg)
        if "input_ids" in documents.column_names:  # prepared rows: one flat Arrow column, no Python list per token
            check_tokenizer(cfg, tokenizer, documents)
            flat = pc.list_flatten(column(documents, "input_ids"))
            flat = flat.slice(0, max_tokens) if max_tokens else flat
            # prepared rows keep the tokenizer's special tokens (a BOS per document); text is joined without them
            return torch.from_numpy(flat.to_numpy(zero_copy_only=False).astype("int64")), "prepared token rows"
    # one int64 array per document, read a few documents at a time: a Python list of every token took ~56 bytes each
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    texts = (text for batch in documents.iter(batch_size=16) for text in batch["text"])
    pieces, total = [], 0
    for text in texts:
        ids, whole = _first_tokens(tokenizer, text, None if max_tokens is None else max_tokens - total)
        pieces.append(np.asarray(ids + (eos if whole else []), dtype=np.int64))
        total += len(pieces[-1])
        if max_tokens is not None and total >= max_tokens:
            break
    ids = torch.from_numpy(np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64))
    return (ids[:max_tokens] if max_tokens else ids), "text joined with EOS"


def _first_tokens(tokenizer, text: str, need: int | None) -> tuple[list[int], bool]:
    """(the first `need` tokens of `text`, or all of them; whether all were read). A prefix of the text, doubled
    until it holds `need` tokens and a margin (a cut word changes only the tokens at the cut): a whole book took
    seconds to tokenize for a few windows (the Bible, 1.2M tokens)."""
    chars = 8 * need + 256 if need is not None else len(text)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if chars >= len(text):
            return ids, True
        if len(ids) >= need + 64:
            return ids[:need], False
        chars *= 2


def run_perplexity(cfg: PerplexityConfig) -> dict:
    """Score `cfg.data` at every context length; writes JSON, CSV and a plot when `cfg.output` is set."""
    from longqlora.evaluation.loading import adapter_base, inference_tokenizer, read_extension
    from longqlora.output import check_output_path, write_json_atomic, write_text_atomic

    extension = read_extension(cfg.adapter) if cfg.adapter else None
    if cfg.output:
        check_output_path(cfg.output, "--output", directory=False)
    tokenizer = inference_tokenizer(cfg.model, cfg.adapter, trust_remote_code=cfg.trust_remote_code)
    ids, stream = token_stream(
        cfg.data, tokenizer, text_field=cfg.text_field, max_tokens=cfg.max_tokens, split=cfg.split
    )
    for n in cfg.context_lengths:  # before any weights load
        if n > ids.numel():
            raise ValueError(
                f"--context_lengths {n}: the text has only {ids.numel()} tokens; pass a longer --data "
                "or a shorter context"
            )
    model, _, info = cfg.load(tokenizer)
    extended, original = info.target_context, info.original_context
    rows = []
    for n in cfg.context_lengths:
        if n > extended:
            logger.warning(
                "--context_lengths %d is beyond the %d tokens the model is set up for (extrapolation)", n, extended
            )
        scores = window_scores(model, ids, n, cfg.stride, score=cfg.score, batch_size=cfg.batch_size)
        rows.append(
            {
                "context_length": n,
                "stride": scores.stride,
                "windows": scores.windows,
                "tokens_scored": scores.tokens(),
                "perplexity": scores.perplexity(),
                f"perplexity_positions_ge_{original}": scores.perplexity(original) if n > original else None,
                "protocol": scores.protocol(),
            }
        )
        logger.info("context %d: perplexity %.3f over %d tokens", n, rows[-1]["perplexity"], rows[-1]["tokens_scored"])
    result = {
        "model": cfg.model or adapter_base(cfg.adapter),
        "adapter": cfg.adapter,
        "data": cfg.data,
        "split": cfg.split,
        "text_tokens": ids.numel(),
        "stream": stream,
        "original_context": original,
        "model_context": extended,
        "pi_factor": info.pi_factor,
        "scaling": info.scaling,
        "load_in_4bit": cfg.load_in_4bit,
        "score": cfg.score,
        "extension": extension.to_dict() if extension else {},
        "results": rows,
    }
    if cfg.output:
        out = Path(cfg.output)
        write_json_atomic(out, result)
        header = ["context_length", "stride", "windows", "tokens_scored", "perplexity"]
        write_text_atomic(
            out.with_suffix(".csv"),
            "\n".join([",".join(header)] + [",".join(str(r[h]) for h in header) for r in rows]) + "\n",
        )
        _plot(rows, out.with_suffix(".png"), result["model"] + (f" + {cfg.adapter}" if cfg.adapter else ""))
    return result


def _plot(rows, path: Path, title: str) -> None:
    from longqlora.output import new_figure, save_figure

    fig, ax = new_figure()
    ax.plot([r["context_length"] for r in rows], [r["perplexity"] for r in rows], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)
