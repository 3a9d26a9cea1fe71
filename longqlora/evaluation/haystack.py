"""The passkey prompt: a 5-digit key (and, with distractors, other labelled keys) hidden at a depth of a haystack
of words, the whole made as long as fits a context length, counted with the model's tokenizer.

The protocol is described in `longqlora.evaluation.passkey`, which runs and scores it; the prompts are built here,
before any weights load, so that one that cannot fit fails first.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from longqlora.data.corpora import BOOKS, book

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
LABELED_KEY_LINE = "The pass key of the {label} is {key}. Remember it. {key} is the pass key of the {label}."
LABELED_QUESTION = "What is the pass key of the {label}? The pass key of the {label} is"
LABELS = tuple(
    "apple river candle garden violin lantern harbor meadow pencil window basket mirror "
    "ladder castle kettle saddle compass feather anchor blanket bottle hammer orchard tunnel".split()
)  # one word each, so the question names its key in a few tokens
EXTRA_NEW_TOKENS = 3  # generated beyond what the key itself needs
_WORDS = tuple(FILLER.split())


@dataclass(frozen=True)
class Hidden:
    """What a trial hides besides its key: the label its question names (None: LongLoRA's unlabelled key), the
    distractors as (label, key, depth), and the haystack's words (the repeated filler by default)."""

    label: str | None = None
    others: tuple[tuple[str, str, float], ...] = ()
    words: tuple[str, ...] = _WORDS


PLAIN = Hidden()


def make_keys(seed: int, n: int) -> list[str]:
    """`n` random 5-digit keys from `random.Random(seed)`: reproducible, independent of any global RNG."""
    rng = random.Random(seed)
    return [str(rng.randint(10000, 99999)) for _ in range(n)]


def haystack_words(haystack: str) -> tuple[str, ...]:
    """The words of --haystack: the filler block, a bundled book or a file (one line naming a bad or empty one)."""
    if haystack == "repeat":
        return _WORDS
    if haystack in BOOKS:
        return tuple(book(haystack).split())
    from longqlora.data.sources import read_text

    words = tuple(read_text(f"--haystack {haystack}", haystack).split())
    if not words:
        raise ValueError(f"--haystack {haystack}: the file has no text; pass a UTF-8 text file")
    return words


def hide(seed: int, keys: list[str], distractors: int, words: tuple[str, ...] = _WORDS) -> list[Hidden]:
    """Each trial's distractors (labels, keys unlike every other of the trial, depths), seeded apart from `keys`."""
    if not distractors:
        return [Hidden(words=words)] * len(keys)
    rng, hidden = random.Random(f"distractors-{seed}"), []
    for key in keys:
        labels, taken, others = rng.sample(LABELS, distractors + 1), {key}, []
        for label in labels[1:]:
            other = key
            while other in taken:
                other = str(rng.randint(10000, 99999))
            taken.add(other)
            others.append((label, other, rng.random()))
        hidden.append(Hidden(labels[0], tuple(others), words))
    return hidden


def filler_words(start: int, count: int, words: tuple[str, ...] = _WORDS) -> str:
    """Words `start .. start+count` of the endlessly repeated haystack."""
    return " ".join(words[i % len(words)] for i in range(start, start + count))


def key_line(label: str | None, key: str) -> str:
    return KEY_LINE.format(key=key) if label is None else LABELED_KEY_LINE.format(label=label, key=key)


def compose(key: str, words: int, depth: float, hidden: Hidden = PLAIN) -> str:
    """The prompt with `words` haystack words, the key line after `round(depth * words)` of them (and each
    distractor's line after its own share; the key's line first where they meet)."""
    lines = [(round(depth * words), 0, key_line(hidden.label, key))]
    lines += [(round(d * words), i + 1, key_line(label, k)) for i, (label, k, d) in enumerate(hidden.others)]
    parts, at = [TASK], 0
    for position, _, line in sorted(lines):
        parts += [filler_words(at, position - at, hidden.words), line]
        at = position
    question = QUESTION if hidden.label is None else LABELED_QUESTION.format(label=hidden.label)
    parts += [filler_words(at, words - at, hidden.words), question]
    return "\n".join(p for p in parts if p)


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of `text` as the model receives it (special tokens such as BOS included)."""
    return len(tokenizer(text)["input_ids"])


def fit_words(tokenizer, key: str, depth: float, target: int, context_length: int, hidden: Hidden = PLAIN) -> int:
    """The most filler words whose prompt has at most `target` tokens (doubling, then binary search)."""
    least = count_tokens(tokenizer, compose(key, 0, depth, hidden))
    if least > target:
        raise ValueError(
            f"--context_lengths {context_length}: the passkey prompt needs {least} tokens without any "
            f"filler plus {context_length - target} for the answer; pass a context length of at least "
            f"{least + context_length - target}"
        )
    low, high = 0, max(8, target)
    while count_tokens(tokenizer, compose(key, high, depth, hidden)) <= target:  # words may merge into fewer tokens
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        if count_tokens(tokenizer, compose(key, mid, depth, hidden)) <= target:
            low = mid
        else:
            high = mid
    return low


def build_prompt(
    tokenizer,
    key: str,
    depth: float,
    target: int,
    context_length: int | None = None,
    words: int | None = None,
    hidden: Hidden = PLAIN,
) -> dict:
    """{"prompt", "tokens", "filler_words"}: at most `target` tokens, as close as word-level trimming gets, hiding
    `key` at `depth`; `words`, a guess from another key at the same length and depth, shrinks until it fits."""
    context_length = context_length or target
    if words is None:
        words = fit_words(tokenizer, key, depth, target, context_length, hidden)
    while True:  # another key's digits (or labels) may tokenize longer than the guess allowed for
        prompt = compose(key, words, depth, hidden)
        tokens = count_tokens(tokenizer, prompt)
        if tokens <= target or words == 0:
            break
        words -= 1
    if tokens > target:
        fit_words(tokenizer, key, depth, target, context_length, hidden)  # raises the one-line error
    return {"prompt": prompt, "tokens": tokens, "filler_words": words}


def answer_budget(tokenizer, keys) -> int:
    """max_new_tokens: the most tokens any key needs after "is" (with its leading space), plus a few."""
    return max(len(tokenizer(" " + k, add_special_tokens=False)["input_ids"]) for k in keys) + EXTRA_NEW_TOKENS


def plan_trials(
    tokenizer, context_lengths, depths, trials: int, seed: int, distractors: int = 0, haystack: str = "repeat"
) -> tuple[list[dict], int]:
    """Every trial's prompt, built before any weights load so that a prompt that cannot fit fails first.

    Returns (cases, max_new_tokens); each case has context_length, depth, trial, key, others (the distractors'
    keys), prompt, tokens, target.
    """
    keys = make_keys(seed, len(context_lengths) * len(depths) * trials)
    hidden = hide(seed, keys, distractors, haystack_words(haystack))
    max_new = answer_budget(tokenizer, keys)
    cases, k = [], 0
    for n in context_lengths:
        target = n - max_new
        for depth in depths:
            words = None
            for trial in range(trials):
                built = build_prompt(tokenizer, keys[k], depth, target, n, words, hidden[k])
                words = built["filler_words"]
                others = [other for _, other, _ in hidden[k].others]
                case = {"context_length": n, "depth": depth, "trial": trial, "key": keys[k], "others": others}
                cases.append({**case, "target": target, **built})
                k += 1
    return cases, max_new
