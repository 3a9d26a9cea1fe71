"""The long-context training material and test of the small bases (experiments/context_tasks.py)."""

from __future__ import annotations

import math

import torch

from experiments.context_tasks import (
    context_mix,
    passkey_documents,
    random_repeat_ids,
    repeat_documents,
    repeat_scores,
    shortest_passkey,
    tokenizer_sample,
    varied_repeat_ids,
)
from longqlora.data import corpora
from longqlora.evaluation import haystack
from longqlora.training.tiny import train_tokenizer

BOOK = corpora.book("austen_emma")[:200_000]


def _tokenizer():
    return train_tokenizer([BOOK, *tokenizer_sample()], vocab_size=512)


def test_passkey_documents_fit_and_end_with_their_key():
    tok = _tokenizer()
    least = shortest_passkey(tok)
    docs = passkey_documents(tok, 20, 10, 3 * least, seed=0)
    eval_keys = set(haystack.make_keys(42, 5000))
    for doc in docs:
        n = len(tok(doc)["input_ids"])
        assert least - 8 <= n <= 3 * least
        key = doc.rsplit(" ", 1)[1].rstrip(".")
        assert haystack.KEY_LINE.format(key=key) in doc and doc.endswith(f"{haystack.QUESTION} {key}.")
        assert key not in eval_keys  # the evaluation's keys are never trained on
    assert passkey_documents(tok, 5, 10, least - 9, seed=0) == []  # too short for the prompt: none


def test_repeat_documents_repeat_their_opening_passage():
    tok = _tokenizer()
    ids = tok(BOOK, add_special_tokens=False)["input_ids"]
    for doc in repeat_documents(tok, ids, 10, 64, 128, seed=0):
        tokens = tok(doc, add_special_tokens=False)["input_ids"]
        assert 56 <= len(tokens) <= 136
        head = tok.decode(tokens[:4])
        assert doc.count(head) >= 2  # the passage comes back


def test_context_mix_proportions():
    tok = _tokenizer()
    docs = context_mix(tok, [BOOK], rows=80, length=128, seed=0)
    keys = sum(haystack.QUESTION in d for d in docs)
    doubled = sum(len(d) % 2 == 0 and d[: len(d) // 2] == d[len(d) // 2 :] for d in docs)
    assert len(docs) == 80 and keys == 20 and doubled >= 20


def test_random_repeat_ids_are_one_run_twice_of_ordinary_tokens():
    tok = _tokenizer()
    rows = random_repeat_ids(tok, 50, 128, 128, seed=3)
    special = set(tok.all_special_ids)
    assert len(rows) == 50 and all(len(r) == 128 and r[:64] == r[64:] for r in rows)
    assert not special & {i for r in rows for i in r} and max(max(r) for r in rows) < len(tok)
    assert len({tuple(r) for r in rows}) == 50  # fresh runs
    assert random_repeat_ids(tok, 50, 128, 128, seed=3) == rows and random_repeat_ids(tok, 50, 128, 128, seed=4) != rows


class _Copier(torch.nn.Module):
    """Predicts, for each token, the token that followed its previous occurrence in the row (an ideal induction
    head), else a uniform guess: a repeated passage is then near-certain, a first occurrence is not."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        b, n = input_ids.shape
        logits = torch.zeros(b, n, self.vocab)
        for row in range(b):  # a plain loop: a test oracle, not a model
            seen = {}
            for t in range(n):
                tok = int(input_ids[row, t])
                if tok in seen and seen[tok] + 1 < n:
                    logits[row, t, int(input_ids[row, seen[tok] + 1])] = 30.0
                seen[tok] = t
        return type("Out", (), {"logits": logits})()


def test_repeat_scores_see_copying_only_where_the_passage_comes_back():
    vocab = 4000
    ids = torch.randperm(vocab)  # every token once: only the repeated passage can be copied
    scores = repeat_scores(_Copier(vocab), ids, distances=[40, 100], span=8, samples=3)
    assert scores["first"] > 0.5 * vocab  # about uniform
    for d in ("40", "100"):
        # 7 of the 8 tokens copied; the first is a guess (its predecessor is filler): vocab ** (1/8) = 2.8
        assert abs(scores[d] - vocab ** (1 / 8)) < 0.1
    assert math.isfinite(scores["first"])


def test_copy_probe_marks_exactly_the_tokens_an_earlier_occurrence_predicts(script):
    """bench/copy_probe.py's rows: a marked target repeats the token one offset back (L/2 in fixed rows, varying
    from row to row in varied rows), and the token before each marked run does too."""
    import random as stdlib_random

    probe = script("bench/copy_probe.py")
    for kind in ("fixed", "varied"):
        ids, mask = probe.batch(kind, stdlib_random.Random(0))
        offsets = set()
        for row, marks in zip(ids.tolist(), mask.tolist()):
            marked = [j + 1 for j, m in enumerate(marks) if m]  # positions of the predictable tokens
            assert marked == list(range(marked[0], marked[-1] + 1)) and len(marked) >= 7
            run = [marked[0] - 1, *marked]
            offsets.add(next(d for d in range(1, marked[0]) if all(row[t] == row[t - d] for t in run)))  # else none
        assert offsets == {probe.L // 2} if kind == "fixed" else len(offsets) > 10


def test_varied_repeat_ids_recur_at_offsets_that_vary():
    """varied_repeat_ids: rows of L ordinary ids in which a run of 5L/16..L/2 recurs once, at many offsets."""
    tok = _tokenizer()
    rows = varied_repeat_ids(tok, 40, 128, seed=0)
    assert varied_repeat_ids(tok, 40, 128, seed=0) == rows and all(len(r) == 128 for r in rows)
    assert not set(tok.all_special_ids) & {i for r in rows for i in r}
    offsets = set()
    for row in rows:  # the longest stretch that equals the one `offset` tokens earlier
        best = max((_run_at(row, d), d) for d in range(40, 128))
        assert best[0] >= 40
        offsets.add(best[1])
    assert len(offsets) > 10


def _run_at(row: list[int], offset: int) -> int:
    longest = current = 0
    for t in range(offset, len(row)):
        current = current + 1 if row[t] == row[t - offset] else 0
        longest = max(longest, current)
    return longest


def test_copy_steps_need_the_context_mix():
    import pytest

    from experiments.small_base import SmallLlamaConfig

    for bad in (dict(copy_steps=5), dict(copy_steps=-1, context_mix=True)):
        with pytest.raises(ValueError, match="--copy_steps"):
            SmallLlamaConfig(**bad)
    assert SmallLlamaConfig(copy_steps=5, context_mix=True).copy_steps == 5


def test_copy_pretrain_steps_through_its_rows_and_lowers_the_loss():
    """The plain copy loop reads 32 new rows a step, in order, and learns: after its steps, the loss on the rows it
    trained on is below the loss of the same model before."""
    from transformers import LlamaForCausalLM

    from experiments.small_base import SmallLlamaConfig, _copy_pretrain
    from longqlora.training.tiny import tiny_llama_config

    torch.manual_seed(0)
    shape = dict(hidden_size=64, num_hidden_layers=1, intermediate_size=128, num_attention_heads=2)
    model = LlamaForCausalLM(tiny_llama_config("gqa", vocab_size=64, max_position_embeddings=16, **shape))
    rows = [[3 + (i + j) % 8 for j in range(16)] for i in range(32 * 6)]  # a learnable cycle
    ids = torch.tensor(rows)
    with torch.no_grad():
        before = model(input_ids=ids, labels=ids).loss.item()
    cfg = SmallLlamaConfig(short_context=16, context_mix=True, copy_steps=6, pretrain_lr=1e-2)
    mean = _copy_pretrain(cfg, model, rows)
    with torch.no_grad():
        after = model(input_ids=ids, labels=ids).loss.item()
    assert after < 0.7 * before and math.isfinite(mean) and mean < before


def test_the_passkey_footnote_counts_each_variants_trials():
    from experiments.ablation_report import context_table
    from experiments.ablations import AblationConfig

    def run(trials):
        return {"passkey_by_length": {"128": 1.0}, "repeat": {"first": 300.0, "64": 20.0}, "passkey_trials": trials}

    results = {"base": [run(10)], "loraplus-s2": [run(10)] * 3, "loraplus-full": [run(10)] * 3}
    text = context_table(AblationConfig(tiny=True), results)
    assert text.endswith("(passkey trials per length, over each variant's seeds: 30 per variant; 10 for `base`)")
