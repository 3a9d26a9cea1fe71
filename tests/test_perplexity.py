"""Perplexity: the protocol's numbers equal a direct computation, and the command writes what it says."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from longqlora.evaluation.perplexity import PerplexityConfig, run_perplexity, scored_positions, window_scores
from longqlora.training.tiny import save_tiny_model

TEXT = (
    "It was a bright cold day in April, and the clocks were striking thirteen. " * 3
    + "The pass key is 4821. Remember it. "
    + "In the beginning was the word. " * 8
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_tiny_model(
        tmp_path_factory.mktemp("ppl") / "tiny", shape="odd", texts=[TEXT], max_position_embeddings=64
    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(path)(TEXT, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return path, model, ids


def direct_nll(model, ids, context, stride, score):
    """Token by token: each scored token's NLL given exactly the window the protocol assigns it."""
    total, count = 0.0, 0
    starts = range(0, len(ids) - context + 1, stride)
    for k, start in enumerate(starts):
        window = ids[start : start + context].unsqueeze(0)
        with torch.no_grad():
            logp = F.log_softmax(model(window).logits.double(), -1)[0]
        for pos in range(*scored_positions(k, context, stride, score).indices(context)):
            total -= float(logp[pos - 1, window[0, pos]])
            count += 1
    return total, count


@pytest.mark.parametrize("context,stride,score", [(32, 32, "new"), (32, 8, "new"), (48, 16, "tail"), (16, 5, "new")])
def test_window_scores_equal_a_direct_computation(tiny, context, stride, score):
    _, model, ids = tiny
    got = window_scores(model, ids, context, stride, score=score, batch_size=3, chunk=7, progress=False)
    total, count = direct_nll(model, ids, context, stride, score)
    assert got.tokens() == count
    assert got.perplexity() == pytest.approx(math.exp(total / count), rel=1e-6)


def test_non_overlapping_windows_equal_the_model_loss(tiny):
    _, model, ids = tiny
    windows = ids[: (len(ids) // 32) * 32].view(-1, 32)
    with torch.no_grad():
        loss = model(windows, labels=windows).loss  # mean over the 31 predicted tokens of every window
    got = window_scores(model, ids, 32, progress=False)
    assert got.perplexity() == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert got.tokens() == 31 * windows.shape[0]


def test_each_token_is_scored_once_with_stride(tiny):
    _, model, ids = tiny
    got = window_scores(model, ids, 32, 8, progress=False)
    last_start = (len(ids) - 32) // 8 * 8
    assert got.tokens() == last_start + 32 - 1  # every token of the covered span but the very first


def test_the_head_scores_only_the_positions_a_stride_needs(tiny):
    """With --stride < context the LM head skips the positions no window scores: after the first window only the
    last `stride` predictions of each window (the result is the direct computation's, above)."""
    _, model, ids = tiny
    window_scores(model, ids, 32, max_windows=1, progress=False)  # the probe of `_head_is_output`, once per model
    rows = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: rows.append(a[0].shape[1]))
    try:
        got = window_scores(model, ids, 32, 8, score="tail", chunk=64, progress=False)
    finally:
        handle.remove()
    assert sum(rows) == 8 * got.windows


def test_bad_protocol_arguments(tiny):
    _, model, ids = tiny
    with pytest.raises(ValueError, match="--stride"):
        window_scores(model, ids, 32, 40)
    with pytest.raises(ValueError, match="--context_lengths 4096: the text has only"):
        window_scores(model, ids, 4096)
    with pytest.raises(ValueError, match="--context_lengths"):
        PerplexityConfig(model="x", context_lengths=[1])
    with pytest.raises(ValueError, match="--stride must be between 1 and the shortest --context_lengths 16"):
        PerplexityConfig(model="x", context_lengths=[32, 16], stride=20)  # refused before any weights load


def test_command_writes_json_csv_and_plot(tiny, tmp_path, caplog, monkeypatch):
    path, model, ids = tiny
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT)
    out = tmp_path / "results.json"
    loads, load = [], AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: loads.append(a) or load(*a, **k))
    result = run_perplexity(
        PerplexityConfig(model=str(path), data=str(text), context_lengths=[32, 96], output=str(out))
    )
    assert len(loads) == 1  # the tokenizer that checked the data before the weights is the model's
    saved = json.loads(out.read_text())
    assert saved["results"] == result["results"]
    direct = window_scores(model, ids.tolist() + [2], 32, progress=False)  # the command appends EOS per document
    assert saved["results"][0]["perplexity"] == pytest.approx(direct.perplexity(), rel=1e-6)
    assert (
        out.with_suffix(".csv").read_text().splitlines()[0] == "context_length,stride,windows,tokens_scored,perplexity"
    )
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "beyond the 64 tokens" in caplog.text  # 96 > the model's 64: a warning, not an error


def test_the_command_prints_the_positions_beyond_the_original_context_and_its_files(tiny, tmp_path, capsys):
    """`python -m longqlora perplexity` shows perplexity over the positions the base never trained on (where an
    extension shows; it was in the JSON only), the protocol once, and the three files it wrote."""
    from longqlora.cli import main

    path, _, _ = tiny
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT)
    out = tmp_path / "r.json"
    args = ["--model", str(path), "--data", str(text), "--context_lengths", "32", "128", "--output", str(out)]
    assert main(["perplexity", "--target_context", "128", *args]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    original = saved["original_context"]
    row = saved["results"][1]
    assert f"positions >= {original}" in printed.splitlines()[1]
    assert f"| {row[f'perplexity_positions_ge_{original}']:.4g} |" in printed
    assert printed.count("protocol") == 1
    assert printed.strip().endswith(f"wrote {out}, {out.with_suffix('.csv')} and {out.with_suffix('.png')}")


def test_a_split_of_a_dataset_dict_is_chosen_and_recorded(tiny, tmp_path):
    """--split picks the DatasetDict's split to score (it always scored train) and the result names it; --output
    naming a .csv or .png (where the JSON would be overwritten by the side files) is refused."""
    import datasets

    path, model, ids = tiny
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["zzzz qqqq " * 200]}),
            "test": datasets.Dataset.from_dict({"text": [TEXT]}),
        }
    ).save_to_disk(str(tmp_path / "dd"))
    result = run_perplexity(
        PerplexityConfig(model=str(path), data=str(tmp_path / "dd"), split="test", context_lengths=[32])
    )
    direct = window_scores(model, ids.tolist() + [2], 32, progress=False)
    assert result["results"][0]["perplexity"] == pytest.approx(direct.perplexity(), rel=1e-6)
    assert result["split"] == "test"
    with pytest.raises(ValueError, match="^--split test: --data austen_emma is a file or folder of text, with no"):
        run_perplexity(PerplexityConfig(model=str(path), data="austen_emma", split="test", context_lengths=[32]))
    for bad in ("r.csv", "r.PNG"):
        with pytest.raises(ValueError, match=f"^--output {bad}: names the JSON result"):
            PerplexityConfig(model=str(path), output=bad)


def test_command_line_errors_are_one_line(tiny, tmp_path):
    path, _, _ = tiny
    text = tmp_path / "short.txt"
    text.write_text("Too short.")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "longqlora",
            "perplexity",
            "--model",
            str(path),
            "--data",
            str(text),
            "--context_lengths",
            "512",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: --context_lengths 512: the text has only")


def test_a_prepared_folder_is_scored_as_its_token_rows(tiny, tmp_path):
    """data_prep/prepare_text.py's folder as --data: its rows joined as they are (the tokenizer's special tokens and
    EOS per document, as training read them), and the command's perplexity is the protocol's on that stream; a folder
    another tokenizer made is refused in one line."""
    from conftest import load_script
    from transformers import AutoTokenizer

    from longqlora.data.text import TextDataConfig
    from longqlora.evaluation.perplexity import text_token_ids
    from longqlora.training.tiny import train_tokenizer

    path, model, _ = tiny
    tok = AutoTokenizer.from_pretrained(path)
    docs = tmp_path / "docs"
    docs.mkdir()
    halves = [TEXT[: len(TEXT) // 2], TEXT[len(TEXT) // 2 :]]
    for i, half in enumerate(halves):
        (docs / f"{i}.txt").write_text(half)
    prepare = load_script("data_prep/prepare_text.py")
    out = tmp_path / "prepared"
    prepare.run(TextDataConfig(str(docs)), prepare.ScriptArguments(tokenizer=str(path), output_dir=str(out)))
    expected = [t for half in halves for t in tok(half)["input_ids"] + [tok.eos_token_id]]
    assert text_token_ids(str(out), tok).tolist() == expected
    assert text_token_ids(str(out), tok, max_tokens=50).tolist() == expected[:50]
    result = run_perplexity(PerplexityConfig(model=str(path), data=str(out), context_lengths=[32]))
    direct = window_scores(model, expected, 32, progress=False)
    assert result["results"][0]["perplexity"] == pytest.approx(direct.perplexity(), rel=1e-6)
    assert result["stream"] == "prepared token rows"
    with pytest.raises(ValueError, match="^--data "):  # the data layer's errors name this command's flag
        text_token_ids(" ", tok)
    with pytest.raises(ValueError, match="--max_tokens must be a positive"):
        PerplexityConfig(model=str(path), max_tokens=0)
    other = train_tokenizer([TEXT * 4], vocab_size=300)
    with pytest.raises(ValueError, match=f"^--data {out}: tokenized by"):
        text_token_ids(str(out), other)


@pytest.mark.parametrize(
    "config",
    [
        ("gemma2", {"final_logit_softcapping": 2.0, "head_dim": 32}),  # tanh(logits / 2) x 2 after the head
        ("granite", {"logits_scaling": 8.0}),  # the head's logits divided by 8
        ("llama", {}),  # the head's output as is: scored in chunks of the head
    ],
)
def test_a_model_that_transforms_its_logits_is_scored_by_its_own_forward(config):
    """A model whose forward transforms the LM head's output is scored through that forward: the perplexity of one
    whole window equals exp of the model's own loss; a Llama keeps the chunked head, whose figure is the same."""
    from transformers import AutoConfig

    from longqlora.evaluation import perplexity

    model_type, extra = config
    hf = AutoConfig.for_model(
        model_type, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf).eval()
    torch.nn.init.normal_(model.get_output_embeddings().weight, std=2.0)  # logits large enough for the cap to bite
    ids = torch.randint(0, 128, (48,))
    with torch.no_grad():
        own = model(input_ids=ids[None], labels=ids[None]).loss.item()
    got = window_scores(model, ids, 48, progress=False, chunk=7).perplexity()
    assert got == pytest.approx(math.exp(own), rel=1e-4)
    assert perplexity._HEAD_IS_OUTPUT[model] == (model_type == "llama")
    if model_type != "llama":  # the head read directly would be another figure: the probe is what makes it right
        perplexity._HEAD_IS_OUTPUT[model] = True
        assert abs(window_scores(model, ids, 48, progress=False).perplexity() / math.exp(own) - 1) > 0.05


def test_scoring_gives_the_model_back_in_its_own_mode_after_an_error():
    """A caught error inside scoring must not leave a training loop's model in eval mode (full attention)."""
    from transformers import LlamaForCausalLM

    from longqlora.evaluation import evaluating
    from longqlora.training.tiny import tiny_llama_config

    failing = LlamaForCausalLM(tiny_llama_config("gqa", vocab_size=320)).train()

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory, say")

    failing.model.forward = out_of_memory
    with pytest.raises(RuntimeError, match="out of memory"):
        window_scores(failing, torch.arange(16), 8, progress=False)
    assert failing.training
    model = torch.nn.Linear(2, 2).train()
    with pytest.raises(RuntimeError, match="inside"), evaluating(model):
        assert not model.training
        raise RuntimeError("inside")
    assert model.training
    with evaluating(model.eval()):
        pass
    assert not model.training


def test_a_few_tokens_of_a_long_book_are_its_first_tokens(tiny, monkeypatch):
    """--max_tokens reads a prefix of a one-document book, doubled until it holds enough (the whole Bible was
    tokenized for a few windows): the same ids as the whole book's first tokens."""
    from longqlora.data.corpora import book
    from longqlora.evaluation.perplexity import text_token_ids

    path, _, _ = tiny
    tok = AutoTokenizer.from_pretrained(path)
    whole = tok(book("austen_persuasion"), add_special_tokens=False)["input_ids"]
    read = []
    real = type(tok).__call__
    monkeypatch.setattr(
        type(tok), "__call__", lambda self, text, **kw: (read.append(len(text)), real(self, text, **kw))[1]
    )
    for n in (1, 700, 5000):
        assert text_token_ids("austen_persuasion", tok, max_tokens=n).tolist() == whole[:n]
    assert max(read) < len(book("austen_persuasion")) // 4  # prefixes only


def test_an_adapters_tokenizer_is_loaded_once(tiny_adapter, monkeypatch):
    """With an adapter that saved its tokenizer, loading for inference reads that one only, not the base's too."""
    from longqlora.evaluation.loading import load_for_inference

    assert (tiny_adapter / "tokenizer_config.json").is_file()
    loads, load = [], AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: loads.append(a[0]) or load(*a, **k))
    _, tokenizer, info = load_for_inference(None, adapter=str(tiny_adapter))
    assert [str(p) for p in loads] == [str(tiny_adapter)]
    assert tokenizer.model_max_length >= info.target_context and tokenizer.pad_token is not None
