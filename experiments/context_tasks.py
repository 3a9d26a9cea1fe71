"""Material that rewards using the whole context, for the small bases of the quickstart and the ablations, and the
test that shows whether a model does.

A base pre-trained on novels alone barely uses its window (the ablations' first base got 8.6% worse from 128 to
512 tokens without interpolation and found no passkey at any length), so extension methods cannot be told apart
where it matters. The pre-training mix adds two kinds of documents:
- passkey documents: the toolkit's own passkey prompt (longqlora.evaluation.passkey: task line, filler, key line at a
  random depth, question) followed by the answer, with keys never used by the evaluation's seed;
- repeated passages: a passage of the training text, other text, then the same passage again, so that the second
  occurrence is predictable only by attending back to the first (an induction-copy signal).
`repeat_scores` is the matching test on held-out text: perplexity of a passage's second occurrence at a given
distance after its first, against the first occurrence's own.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from longqlora.evaluation import haystack

EVAL_SEED = 42  # PasskeyConfig's default seed: the keys the evaluation draws are never trained on
MIX_VERSION = 2  # raised when the material changes: the cached bases and results built on it are keyed by it


def _eval_keys() -> set[str]:
    return set(haystack.make_keys(EVAL_SEED, 5000))


def tokenizer_sample(n: int = 200, seed: int = 1) -> list[str]:
    """Passkey documents sized by words (no tokenizer yet): text for training the tokenizer, so that digits, the
    task line and the filler have tokens of their own."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        key = str(rng.randint(10000, 99999))
        docs.append(haystack.compose(key, rng.randint(5, 60), rng.random()) + f" {key}.")
    return docs


def _ordinary_ids(tokenizer) -> list[int]:
    """Every token id but the special ones: what random runs are drawn from."""
    special = set(tokenizer.all_special_ids)
    return [i for i in range(len(tokenizer)) if i not in special]


def passkey_lengths(tokenizer, lengths: list[int]) -> list[int]:
    """The context lengths that hold the shortest passkey prompt (a tiny base's L may not), else the longest."""
    least = shortest_passkey(tokenizer)
    return [n for n in lengths if n >= least] or [max(lengths)]


def shortest_passkey(tokenizer) -> int:
    """Tokens of the shortest passkey document (no filler) with its answer: below it the task does not fit."""
    return haystack.count_tokens(tokenizer, haystack.compose("12345", 0, 0.0) + " 12345.") + 8  # keys differ


def passkey_documents(tokenizer, n: int, shortest: int, longest: int, seed: int) -> list[str]:
    """`n` passkey prompts of `shortest`..`longest` tokens (answer included), each followed by its key; none when
    even the shortest prompt is longer than `longest`."""
    rng, banned = random.Random(seed), _eval_keys()
    answer = len(tokenizer(" 12345.", add_special_tokens=False)["input_ids"]) + 1
    shortest = max(shortest, shortest_passkey(tokenizer))
    if shortest > longest:
        return []
    docs, words_at = [], {}
    while len(docs) < n:
        key = str(rng.randint(10000, 99999))
        if key in banned:
            continue
        depth = round(rng.random(), 2)
        target = rng.randint(shortest, longest) - answer
        guess = words_at.get((target, depth))
        built = haystack.build_prompt(tokenizer, key, depth, target, words=guess)
        words_at[(target, depth)] = built["filler_words"]
        docs.append(built["prompt"] + f" {key}.")
    return docs


def repeat_documents(tokenizer, ids: list[int], n: int, shortest: int, longest: int, seed: int) -> list[str]:
    """`n` documents of `shortest`..`longest` tokens: passage P (1/16 to 1/4 of the document), other text, P again,
    cut from the token stream `ids` (decoded back to text)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        length = rng.randint(shortest, longest)
        span = rng.randint(max(4, length // 16), max(5, length // 4))
        p = rng.randrange(len(ids) - span)
        f = rng.randrange(len(ids) - length)
        tokens = ids[p : p + span] + ids[f : f + length - 2 * span] + ids[p : p + span]
        docs.append(tokenizer.decode(tokens))
    return docs


def random_repeat_documents(tokenizer, n: int, shortest: int, longest: int, seed: int) -> list[str]:
    """`n` documents of random tokens, the same run of them twice: the cleanest signal that teaches a small model
    to copy (an induction head) quickly; nothing but the first run predicts the second."""
    rng = random.Random(seed)
    vocab = _ordinary_ids(tokenizer)
    docs = []
    for _ in range(n):
        half = rng.randint(shortest, longest) // 2
        run = tokenizer.decode([rng.choice(vocab) for _ in range(half)])
        docs.append(run + run)
    return docs


def random_repeat_ids(tokenizer, n: int, shortest: int, longest: int, seed: int) -> list[list[int]]:
    """`n` rows of `shortest`..`longest` token ids: a run of random non-special ids, twice. Token ids, not text:
    decoded and tokenized again (`random_repeat_documents`), a run's tokens also repeat within the run (byte-level
    merges), which blurs what an earlier occurrence predicts (docs/ablations.md, "A base that uses its context")."""
    rng = random.Random(seed)
    vocab = _ordinary_ids(tokenizer)
    rows = []
    for _ in range(n):
        run = rng.choices(vocab, k=rng.randint(shortest, longest) // 2)
        rows.append(run + run)
    return rows


def varied_repeat_ids(tokenizer, n: int, length: int, seed: int) -> list[list[int]]:
    """`n` rows of `length` random ordinary ids in which a run of 5/16 to 1/2 of the row recurs, with random filler
    before, between and after, so that the offset varies from row to row: only attending to the token after an
    earlier occurrence of the current one (an induction head) predicts the second run. Half-and-half rows teach a
    positional shortcut instead, and shorter runs too weak a signal to learn in budget (bench/copy_probe.py)."""
    rng = random.Random(seed)
    vocab = _ordinary_ids(tokenizer)
    rows = []
    for _ in range(n):
        run = rng.randint(5 * length // 16, length // 2)
        before = rng.randint(0, length - 2 * run)
        gap = rng.randint(0, length - 2 * run - before)
        tokens = rng.choices(vocab, k=run)
        row = rng.choices(vocab, k=before) + tokens + rng.choices(vocab, k=gap) + tokens
        rows.append(row + rng.choices(vocab, k=length - len(row)))
    return rows


def context_mix(
    tokenizer, books: list[str], rows: int, length: int, seed: int, shortest: int | None = None, as_ids: bool = False
) -> list:
    """Documents for `rows` training rows of `length` tokens, each `shortest`..`length` tokens: 3/8 natural text
    (the books, cut to that many tokens), 1/4 passkey documents, 1/8 repeated passages of the books and 1/4 runs
    of random tokens repeated. `as_ids`: token ids (the runs drawn as ids, `random_repeat_ids`), else text."""
    shortest = shortest or length // 2
    ids = tokenizer("\n\n".join(books), add_special_tokens=False)["input_ids"]
    eighth = max(1, rows // 8)
    stride = max(length, (len(ids) - length) // (3 * eighth))  # spread over every book, not the first ones
    natural = [tokenizer.decode(ids[i : i + length]) for i in range(0, len(ids) - length, stride)][: 3 * eighth]
    texts = (
        natural
        + passkey_documents(tokenizer, 2 * eighth, shortest, length, seed)
        + repeat_documents(tokenizer, ids, eighth, shortest, length, seed + 1)
    )
    if as_ids:
        encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return encoded + random_repeat_ids(tokenizer, 2 * eighth, shortest, length, seed + 2)
    return texts + random_repeat_documents(tokenizer, 2 * eighth, shortest, length, seed + 2)


def write_mix(path: Path, tokenizer, books: list[str], rows: int, length: int, shortest: int) -> Path:
    """The mix as one JSONL of {"text": document} for an extension at `length` tokens (documents of `shortest`
    tokens and more), written atomically; a fixed seed, so every variant and the quickstart read the same file."""
    from longqlora.output import write_text_atomic

    docs = context_mix(tokenizer, books, rows, length, 1, shortest=shortest)
    return write_text_atomic(path, "".join(json.dumps({"text": d}) + "\n" for d in docs))


def repeat_distances(short: int, long: int) -> list[int]:
    """Distances between a passage's two occurrences for `repeat_scores`: half of the pre-trained context L, just
    under L, 2L and just under the target (spans of L/8 tokens)."""
    span = short // 8
    return [short // 2, short - span, 2 * short, long - span]


@torch.no_grad()
def repeat_scores(model, ids: torch.Tensor, distances: list[int], span: int, samples: int, seed: int = 0) -> dict:
    """Perplexity of a `span`-token passage of held-out `ids` where it occurs again `d` tokens after its first
    start (other held-out text in between), for each d in `distances`, and of its first occurrence ("first").

    Each of `samples` rows per distance is [P][filler][P] with fresh passages; the second P is predictable from
    the first only if the model attends d tokens back. Returns {"first": ppl, str(d): ppl}. The first P is scored
    on its tokens 1..span-1 (its token 0 starts the row), the second on all `span` tokens, whose first follows the
    filler and cannot be copied: a second occurrence's perplexity therefore includes one unpredictable token in
    `span`, which makes copying look worse (every published table scores it so). The filler's start is drawn apart
    from the passage's, so in about d / len(ids) of the rows the filler holds the passage too, a nearer copy source
    that makes copying look better; kept, as every published table was measured with it."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    first, second = {}, {}
    for d in distances:
        starts = torch.randint(0, len(ids) - d - span, (samples, 2), generator=gen)
        rows = torch.stack(
            [torch.cat([ids[p : p + span], ids[f : f + d - span], ids[p : p + span]]) for p, f in starts.tolist()]
        ).to(device)
        logits = model(input_ids=rows).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), rows[:, 1:], reduction="none")
        first[d] = nll[:, : span - 1].mean().item()  # tokens 1..span-1 of the first P
        second[d] = nll[:, d - 1 : d + span - 1].mean().item()  # all span tokens of the second P
    out = {"first": float(torch.tensor(list(first.values())).mean().exp())}
    out.update({str(d): float(torch.tensor(v).exp()) for d, v in second.items()})
    return out
