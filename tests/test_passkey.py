"""Passkey retrieval: prompts have the requested length, depth and wording; scoring can pass and fail; runs on tiny
models write a well-formed result; bad input fails in one line before weights load."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from longqlora.evaluation import haystack as H
from longqlora.evaluation import passkey as P
from longqlora.evaluation.haystack import build_prompt
from longqlora.evaluation.passkey import PasskeyConfig, evaluate_passkey, is_correct, run_passkey
from longqlora.training.tiny import save_tiny_model

# A corpus made of the prompt's own sentences and digits, so a 512-entry BPE tokenizes the fixed parts compactly
# (about 56 tokens) and a 128-token context still has room for filler.
PROMPT_TEXT = "\n".join(
    [H.TASK, " ".join([H.FILLER] * 20), H.KEY_LINE.format(key=12345), H.QUESTION, " ".join("0123456789") * 3]
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Llama with a 128-token context (no interpolation) and a compact tokenizer."""
    path = save_tiny_model(
        tmp_path_factory.mktemp("passkey") / "tiny",
        shape="gqa",
        texts=[PROMPT_TEXT],
        vocab_size=512,
        max_position_embeddings=128,
    )
    return path, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def adapter(tiny_adapter):
    """The 7B 8k recipe trained for a few steps on the tiny base (context 64, x4 to 256)."""
    return tiny_adapter


def measured_depth(tokenizer, prompt: str, key: str, depth: float) -> float:
    """Filler tokens before the key line over all filler tokens, measured on the prompt text itself."""
    head = H.count_tokens(tokenizer, H.TASK)
    before = H.count_tokens(tokenizer, prompt[: prompt.index(H.KEY_LINE.format(key=key))]) - head
    filler = H.count_tokens(tokenizer, prompt) - H.count_tokens(tokenizer, H.compose(key, 0, depth))
    return before / filler


# ------------------------------------------------------------------------------------------------------ prompts
@pytest.mark.parametrize("target", [119, 247, 500, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_prompt_has_the_length_depth_and_wording(tiny, target, depth):
    _, tok = tiny
    built = build_prompt(tok, "48213", depth, target)
    prompt = built["prompt"]
    assert built["tokens"] == H.count_tokens(tok, prompt)
    assert target - 8 <= built["tokens"] <= target
    assert prompt.startswith(H.TASK + "\n")
    assert prompt.endswith("\nWhat is the pass key? The pass key is")
    assert "\nThe pass key is 48213. Remember it. 48213 is the pass key.\n" in prompt
    assert (
        "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again." in prompt
        or target < 300
    )
    tolerance = 0.15 if target < 300 else 0.05
    assert measured_depth(tok, prompt, "48213", depth) == pytest.approx(depth, abs=tolerance)


def test_plan_fits_every_prompt_and_answer_in_its_context(tiny):
    _, tok = tiny
    cases, max_new = H.plan_trials(tok, [128, 256], [0.0, 1.0], 3, seed=7)
    assert len(cases) == 12 and max_new >= len(tok(" 12345", add_special_tokens=False)["input_ids"])
    for case in cases:
        assert case["tokens"] + max_new <= case["context_length"]
        assert case["tokens"] >= case["context_length"] - max_new - 8
        assert re.fullmatch(r"[1-9]\d{4}", case["key"])


def test_keys_are_reproducible():
    assert H.make_keys(3, 20) == H.make_keys(3, 20)
    assert H.make_keys(3, 20) != H.make_keys(4, 20)
    assert H.make_keys(3, 5) == H.make_keys(3, 20)[:5]


def test_scoring_rule():
    assert is_correct("12345", "12345. Remember")
    assert is_correct("12345", " 12345")
    assert is_correct("12345", " 1 2 3 4 5.")
    assert not is_correct("12345", "123456")
    assert not is_correct("12345", " 1 2 3 4 56")
    assert is_correct("12345", " 12345 12345") and is_correct("12345", "\n12345\n\n1")  # said again: still right
    assert not is_correct("12345", "1234")
    assert not is_correct("12345", "The pass key is 12345")
    assert not is_correct("12345", "")


# ---------------------------------------------------------------------------------------------- a fake model
class OracleModel(torch.nn.Module):
    """Reads the key out of the prompt and answers it (or a wrong number): the scoring has to tell them apart."""

    def __init__(self, tokenizer, wrong: bool = False):
        super().__init__()
        self.tokenizer, self.wrong = tokenizer, wrong
        self.config = type("Config", (), {"max_position_embeddings": 256})()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return self.weight.device

    def generate(self, input_ids, attention_mask=None, **kwargs):
        assert kwargs["do_sample"] is False and kwargs["max_new_tokens"] >= 5
        key = re.search(r"The pass key is (\d+)\.", self.tokenizer.decode(input_ids[0])).group(1)
        answer = str(int(key) + 1) if self.wrong else key
        new = self.tokenizer(" " + answer + ". Remember", add_special_tokens=False, return_tensors="pt").input_ids
        return torch.cat([input_ids, new[:, : kwargs["max_new_tokens"]]], dim=1)


@pytest.mark.parametrize("wrong,expected", [(False, 1.0), (True, 0.0)])
def test_scoring_can_pass_and_fail(tiny, wrong, expected):
    _, tok = tiny
    result = evaluate_passkey(OracleModel(tok, wrong), tok, [128, 256], [0.0, 0.5, 1.0], 2, seed=1, progress=False)
    assert result["accuracy"] == expected
    assert all(row["accuracy"] == expected for row in result["by_length"] + result["cells"])
    assert all(s["correct"] is (not wrong) for s in result["samples"])


# --------------------------------------------------------------------------------------------- tiny real runs
def test_the_answer_is_greedy_whatever_the_generation_config_says(tiny):
    """A model's generation_config.json (Qwen2-Instruct ships repetition_penalty 1.05) fills every generate()
    setting a call leaves unset; the answer is still the argmax at every step (it was not, with a penalty)."""
    path, tok = tiny
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    model.generation_config.update(
        repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=8, max_length=4096, penalty_alpha=0.6
    )
    prompt = build_prompt(tok, "31415", 0.5, 120)["prompt"]
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    argmax = tok.decode(ids[0, -8:], skip_special_tokens=True)
    assert P.generate_answer(model, tok, prompt, 8) == argmax


def test_run_on_a_tiny_model_writes_json_and_png(tiny, tmp_path, caplog, monkeypatch):
    path, _ = tiny
    plans, plan_trials = [], P.plan_trials
    monkeypatch.setattr(P, "plan_trials", lambda *a, **k: plans.append(a) or plan_trials(*a, **k))
    cfg = PasskeyConfig(
        model=str(path),
        context_lengths=[128, 256],
        depths=[0.0, 1.0],
        trials=2,
        seed=5,
        output_dir=str(tmp_path / "out"),
    )
    with caplog.at_level("WARNING"):
        result = run_passkey(cfg)
    assert "--context_lengths 256 is beyond the 128 tokens" in caplog.text
    assert [row["context_length"] for row in result["by_length"]] == [128, 256]
    assert all(row["trials"] == 4 and 0 <= row["accuracy"] <= 1 for row in result["by_length"])
    assert len(result["cells"]) == 4 and all(c["trials"] == 2 for c in result["cells"])
    assert all(
        c["prompt_tokens_max"] <= c["context_length"] - result["protocol"]["max_new_tokens"] for c in result["cells"]
    )
    assert len(result["keys"]) == 8 and len(result["samples"]) == 4
    saved = json.loads((tmp_path / "out" / "passkey.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["protocol"]["question"] == "What is the pass key? The pass key is"
    assert (tmp_path / "out" / "passkey.png").read_bytes()[:4] == b"\x89PNG"
    assert len(plans) == 1  # the prompts are built once, before the weights load


def test_same_seed_same_result_other_seed_other_keys(tiny):
    path, tok = tiny
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    first = evaluate_passkey(model, tok, [128], [0.0, 0.5], 2, seed=11, progress=False)
    again = evaluate_passkey(model, tok, [128], [0.0, 0.5], 2, seed=11, progress=False)
    other = evaluate_passkey(model, tok, [128], [0.0, 0.5], 2, seed=12, progress=False)
    assert first == again
    assert first["keys"] != other["keys"]


def test_run_with_a_trained_adapter_in_4bit(adapter, tmp_path):
    cfg = PasskeyConfig(
        adapter=str(adapter), context_lengths=[256], depths=[0.5], trials=1, load_in_4bit=True, output_dir=str(tmp_path)
    )
    result = run_passkey(cfg)
    assert result["model_context"] == 256 and result["pi_factor"] == pytest.approx(4.0)
    assert result["scaling"] == "YaRN x4"  # the adapter's recorded scaling, followed at inference
    assert result["model"] == str(adapter / "tiny-base") or result["model"].endswith("tiny-base")
    assert result["by_length"][0]["trials"] == 1 and (tmp_path / "passkey.png").is_file()


# -------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,flag",
    [
        ({"context_lengths": [32, 1024]}, "--context_lengths"),
        ({"trials": 0}, "--trials"),
        ({"depths": [0.5, 1.5]}, "--depths"),
        ({"compute_dtype": "int8"}, "--compute_dtype"),
        ({"model": None}, "--model"),
        ({"distractors": -1}, "--distractors"),
        ({"distractors": len(H.LABELS)}, "--distractors"),
        ({"haystack": "no-such-file.txt"}, "--haystack"),
    ],
)
def test_bad_flags_fail_in_one_line(kwargs, flag):
    with pytest.raises(ValueError) as err:
        PasskeyConfig(**{"model": "m", **kwargs})
    assert str(err.value).startswith(flag) and "\n" not in str(err.value)


def test_flags_parse(tmp_path):
    (cfg,) = HfArgumentParser(PasskeyConfig).parse_args_into_dataclasses(
        args=[
            "--model",
            "m",
            "--context_lengths",
            "1024",
            "2048",
            "--depths",
            "0",
            "0.5",
            "--trials",
            "3",
            "--load_in_4bit",
            "--seed",
            "9",
            "--output_dir",
            str(tmp_path),
        ]
    )
    assert cfg.context_lengths == [1024, 2048] and cfg.depths == [0.0, 0.5] and cfg.load_in_4bit and cfg.seed == 9


def test_unbuildable_prompt_or_bad_paths_fail_before_weights_load(tiny, adapter, tmp_path, monkeypatch):
    import longqlora.evaluation.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(longqlora.evaluation.loading, "load_for_inference", no_loading)
    # The tiny recipe's tokenizer (trained on Austen) needs ~170 tokens for the fixed parts of the prompt.
    with pytest.raises(ValueError, match=r"^--context_lengths 128: the passkey prompt needs \d+ tokens") as err:
        run_passkey(PasskeyConfig(adapter=str(adapter), context_lengths=[128, 256], trials=1))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="not a PEFT adapter directory"):
        run_passkey(PasskeyConfig(adapter=str(tmp_path), context_lengths=[128]))
    with pytest.raises(ValueError, match="^--model .*: no such directory"):
        run_passkey(PasskeyConfig(model=str(tmp_path / "missing"), context_lengths=[128]))


# ------------------------------------------------------------------------------------------- harder variants
def test_distractors_are_labelled_keys_at_their_depths_and_the_asked_keys_stay_the_plain_runs(tiny):
    """--distractors 3: four labelled key lines, distinct labels and keys, each after its depth's share of the
    filler, the question naming the asked key's label; the asked keys, depths and lengths are the plain run's
    (paired), the prompts reproducible and within their token budget."""
    _, tok = tiny
    plain, _ = H.plan_trials(tok, [1500], [0.0, 0.5, 1.0], 2, seed=3)
    cases, max_new = H.plan_trials(tok, [1500], [0.0, 0.5, 1.0], 2, seed=3, distractors=3)
    assert cases == H.plan_trials(tok, [1500], [0.0, 0.5, 1.0], 2, seed=3, distractors=3)[0]
    assert [c["key"] for c in cases] == [c["key"] for c in plain] and all(not c["others"] for c in plain)
    hidden = H.hide(3, [c["key"] for c in cases], 3)
    for case in cases:
        prompt = case["prompt"]
        assert case["tokens"] == H.count_tokens(tok, prompt) <= 1500 - max_new
        lines = re.findall(
            r"The pass key of the (\w+) is (\d{5})\. Remember it\. \2 is the pass key of the \1\.", prompt
        )
        labels, keys = [label for label, _ in lines], [key for _, key in lines]
        assert len(lines) == 4 and len(set(labels)) == 4 and len(set(keys)) == 4 and set(labels) <= set(H.LABELS)
        assert sorted(keys) == sorted([case["key"], *case["others"]])
        asked = labels[keys.index(case["key"])]
        assert prompt.endswith(H.LABELED_QUESTION.format(label=asked))
        seen, at = 0, {}  # filler words before each key line
        for part in prompt.split("\n")[1:-1]:  # between the task and the question: filler and key lines
            found = re.search(r"is (\d{5})\. Remember it", part)
            if found:
                at[found.group(1)] = seen
            else:
                seen += len(part.split())
        assert seen == case["filler_words"]
        assert at[case["key"]] == round(case["depth"] * seen)
        assert all(at[key] == round(depth * seen) for _, key, depth in hidden[cases.index(case)].others)
    assert len({h.label for h in hidden}) > 1  # the asked label varies between trials


def test_a_book_or_a_file_is_the_haystack_in_order(tiny, tmp_path):
    """--haystack austen_emma takes the book's words in order (no repeated filler); a file likewise, repeated when
    the context needs more; an empty or non-UTF-8 file is one line naming --haystack."""
    from longqlora.data.corpora import book

    _, tok = tiny
    (case,), _ = H.plan_trials(tok, [600], [1.0], 1, seed=1, haystack="austen_emma")
    filler = case["prompt"].split("\n")[1]
    assert filler == " ".join(book("austen_emma").split()[: case["filler_words"]]) and H.FILLER not in case["prompt"]
    (tmp_path / "hay.txt").write_text("alpha beta\ngamma")
    (case,), _ = H.plan_trials(tok, [300], [0.0], 1, seed=1, haystack=str(tmp_path / "hay.txt"))
    assert case["prompt"].split("\n")[2].startswith("alpha beta gamma alpha beta gamma")
    (tmp_path / "empty.txt").write_text(" \n")
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe")
    for name, problem in (("empty.txt", "has no text"), ("bad.txt", "line 2")):
        with pytest.raises(ValueError, match=f"^--haystack {tmp_path / name}.*{problem}"):
            H.haystack_words(str(tmp_path / name))


@pytest.mark.parametrize("answer,correct,distracted", [("key", 2, 0), ("other", 0, 2), ("none", 0, 0)])
def test_an_answer_that_is_another_hidden_key_is_wrong_and_counted(tiny, monkeypatch, answer, correct, distracted):
    path, tok = tiny
    model = AutoModelForCausalLM.from_pretrained(path)
    cases, max_new = H.plan_trials(tok, [1024], [0.5], 2, seed=4, distractors=2)
    reply = {c["prompt"]: {"key": c["key"], "other": c["others"][1], "none": "12"}[answer] for c in cases}
    monkeypatch.setattr(P, "generate_answer", lambda model, tok, prompt, n: " " + reply[prompt] + ".")
    result = evaluate_passkey(model, tok, [1024], [0.5], 2, seed=4, progress=False, distractors=2)
    (row,) = result["by_length"]
    assert (row["correct"], row["distractor_answers"]) == (correct, distracted)
    assert result["protocol"]["distractors"] == 2 and result["protocol"]["question"] == H.LABELED_QUESTION


def test_variant_flags_parse_and_reach_the_result(tiny, tmp_path):
    path, _ = tiny
    (cfg,) = HfArgumentParser(PasskeyConfig).parse_args_into_dataclasses(
        args=["--model", str(path), "--context_lengths", "1024", "--depths", "0.5", "--trials", "1"]
        + ["--distractors", "2", "--haystack", "kjv_bible", "--output_dir", str(tmp_path / "out")]
    )
    result = run_passkey(cfg)
    saved = json.loads((tmp_path / "out" / "passkey.json").read_text())
    assert saved["protocol"]["haystack"] == "kjv_bible" and saved["protocol"]["distractors"] == 2
    assert result["by_length"][0]["trials"] == 1 and "distractor_answers" in result["cells"][0]


def test_the_variants_bench_runs_every_variant_and_writes_its_table(tiny, tmp_path, monkeypatch, script):
    """bench/passkey_variants.py on the tiny model (its --cache holds a model already, so nothing is converted):
    one row per variant, each of the trials asked, the table and its JSON written."""
    import sys

    path, _ = tiny
    bench = script("bench/passkey_variants.py")
    out = tmp_path / "variants.md"
    argv = ["passkey_variants.py", "--cache", str(path), "--context_lengths", "1024", "--depths", "0.5"]
    monkeypatch.setattr(sys, "argv", argv + ["--trials", "2", "--output", str(out)])
    bench.main()
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "haystack" not in line]
    assert [row.split(" | ")[:2] for row in rows] == [["| repeat", "0"], ["| repeat", "3"], ["| austen_emma", "0"],
                                                       ["| austen_emma", "3"]]  # fmt: skip
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [v["by_length"][0]["trials"] for v in saved["variants"]] == [2, 2, 2, 2]
