"""Chat: scripted conversations on tiny models; the prompts the model sees, streaming, history, exits, errors."""

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longqlora.chat import (
    ChatConfig,
    build_messages,
    chat_loop,
    chat_turn,
    load_chat_model,
    one_shot,
    prompt_ids,
    render,
)
from longqlora.data.formats import VICUNA_V1_1_TEMPLATE
from longqlora.decoding import generate_reply, generation_kwargs, stop_ids
from longqlora.training.tiny import save_tiny_model

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
NEW = 6  # tokens per reply: enough to see text, short enough to stay fast


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory):
    """A tiny random Llama whose tokenizer has no chat template (the chat sets Vicuna v1.1)."""
    return save_tiny_model(tmp_path_factory.mktemp("chat") / "tiny", max_position_embeddings=512)


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory):
    """The SFT recipe's tiny chat adapter (trained once for this file; one step is enough to test the plumbing)."""
    from conftest import load_script

    from longqlora.cli import run_recipe

    mod = load_script("recipes/sft_vicuna_13b_8k.py")

    return run_recipe(
        mod.Model,
        mod.Data,
        mod.Training,
        argv=["--tiny", "--output_dir", str(tmp_path_factory.mktemp("chat-sft") / "a"), "--max_steps", "1"],
    )


def _cfg(source, **kw):
    kw.setdefault("max_new_tokens", NEW)
    kw.setdefault("temperature", 0.0)
    return ChatConfig(model=str(source), **kw) if source.name == "tiny" else ChatConfig(adapter=str(source), **kw)


@pytest.fixture(scope="module", params=["random", "sft"])
def chat(request):
    """(source dir, model, tokenizer) for the random model and for the SFT adapter on its base."""
    source = request.getfixturevalue("random_dir" if request.param == "random" else "sft_adapter")
    model, tokenizer = load_chat_model(_cfg(source))
    return source, model, tokenizer


def record(model, monkeypatch):
    """Record the prompt ids and the reply of every generate() call."""
    calls = []
    original = model.generate

    def generate(**kwargs):
        out = original(**kwargs)
        prompt = kwargs["input_ids"][0].tolist()
        calls.append({"prompt": prompt, "new": out[0, len(prompt) :].tolist()})
        return out

    monkeypatch.setattr(model, "generate", generate)
    return calls


def run_chat(cfg, model, tokenizer, script):
    out = io.StringIO()
    code = chat_loop(cfg, model, tokenizer, io.StringIO(script), out)
    return code, out.getvalue()


def test_scripted_conversation_keeps_history(chat, monkeypatch):
    source, model, tokenizer = chat
    assert tokenizer.chat_template  # the adapter's own, or Vicuna set on load
    if source.name == "tiny":
        assert tokenizer.chat_template == VICUNA_V1_1_TEMPLATE
    calls = record(model, monkeypatch)
    code, out = run_chat(_cfg(source), model, tokenizer, "hello\nwhat next?\n")
    assert code == 0
    assert len(calls) == 2 and out.count("ASSISTANT: ") == 2
    replies = [tokenizer.decode(c["new"], skip_special_tokens=True).strip() for c in calls]
    for reply in replies:
        assert f"ASSISTANT: {reply}" in out  # the streamed text is the reply
    assert "context 512 tokens" in out if source.name == "tiny" else "context 256 tokens" in out
    second = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": replies[0]},
        {"role": "user", "content": "what next?"},
    ]
    assert calls[1]["prompt"] == prompt_ids(tokenizer, render(tokenizer, second))
    text = tokenizer.decode(calls[1]["prompt"])
    assert f"USER: hello ASSISTANT: {replies[0]}</s>USER: what next? ASSISTANT:" in text


def test_greedy_reply_is_deterministic_and_equals_direct_generate(chat):
    source, model, tokenizer = chat
    cfg = _cfg(source, prompt="hello")
    outs = [io.StringIO(), io.StringIO()]
    replies = [one_shot(cfg, model, tokenizer, out) for out in outs]
    assert replies[0] == replies[1]
    assert outs[0].getvalue() == outs[1].getvalue()
    assert outs[0].getvalue().strip() == replies[0]  # streaming writes exactly the reply
    ids = torch.tensor([prompt_ids(tokenizer, render(tokenizer, [{"role": "user", "content": "hello"}]))])
    with torch.no_grad():
        direct = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=NEW,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    assert tokenizer.decode(direct[0, ids.shape[1] :], skip_special_tokens=True).strip() == replies[0]


def test_sampling_is_seeded(random_dir):
    cfg = _cfg(random_dir, prompt="hello", temperature=0.9, top_p=0.95, seed=3, max_new_tokens=12)
    model, tokenizer = load_chat_model(cfg)
    assert one_shot(cfg, model, tokenizer, io.StringIO()) == one_shot(cfg, model, tokenizer, io.StringIO())


def test_context_file_opens_the_first_turn(chat, tmp_path, monkeypatch):
    source, model, tokenizer = chat
    doc = tmp_path / "doc.txt"
    doc.write_text("The pass key is 4821. Remember it.\n")
    calls = record(model, monkeypatch)
    cfg = _cfg(source, context_file=str(doc))
    code, out = run_chat(cfg, model, tokenizer, "what is the pass key?\nagain?\n/reset\nand now?\n")
    assert code == 0 and len(calls) == 3
    n = len(tokenizer("The pass key is 4821. Remember it.", add_special_tokens=False)["input_ids"])
    assert f"document {doc}: {n} tokens" in out
    prompts = [tokenizer.decode(c["prompt"]) for c in calls]
    assert "USER: The pass key is 4821. Remember it.\n\nwhat is the pass key? ASSISTANT:" in prompts[0]
    assert prompts[1].count("The pass key is 4821.") == 1  # kept in the history, not repeated
    assert "The pass key is 4821. Remember it.\n\nand now?" in prompts[2]  # a new conversation opens with it
    assert "again?" not in prompts[2]
    assert (
        one_shot(_cfg(source, context_file=str(doc), prompt="key?"), model, tokenizer, io.StringIO())
        == tokenizer.decode(calls[-1]["new"], skip_special_tokens=True).strip()
    )
    assert "4821. Remember it.\n\nkey? ASSISTANT:" in tokenizer.decode(calls[-1]["prompt"])


def test_reset_clears_history_and_exit_stops(chat, monkeypatch):
    source, model, tokenizer = chat
    calls = record(model, monkeypatch)
    code, out = run_chat(_cfg(source), model, tokenizer, "hello\n/reset\nwhat next?\n/exit\nnever sent\n")
    assert code == 0 and len(calls) == 2 and "(conversation cleared)" in out
    fresh = [{"role": "user", "content": "what next?"}]
    assert calls[1]["prompt"] == prompt_ids(tokenizer, render(tokenizer, fresh))
    assert "never sent" not in out


def test_system_prompt_and_history_list(random_dir):
    cfg = _cfg(random_dir, system_prompt="You answer briefly.")
    model, tokenizer = load_chat_model(cfg)
    history = []
    reply = chat_turn(cfg, model, tokenizer, history, "hello", io.StringIO())
    assert history == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": reply}]
    rendered = render(tokenizer, build_messages(cfg, history, "more", None))
    assert rendered.startswith("<s>You answer briefly. USER: hello ASSISTANT: ")


def test_ctrl_c_and_eof_exit_zero(random_dir, monkeypatch):
    cfg = _cfg(random_dir)
    model, tokenizer = load_chat_model(cfg)

    class Interrupting:
        def readline(self):
            raise KeyboardInterrupt

    out = io.StringIO()
    assert chat_loop(cfg, model, tokenizer, Interrupting(), out) == 0
    assert out.getvalue().endswith("USER: \n")

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "generate", interrupted)  # Ctrl-C while a reply is being generated
    code, out = run_chat(cfg, model, tokenizer, "hello\n")
    assert code == 0 and out.endswith("\n")
    monkeypatch.undo()
    code, out = run_chat(cfg, model, tokenizer, "")  # Ctrl-D at the first prompt
    assert code == 0 and out.endswith("USER: \n")


def test_turn_over_the_context_is_refused(random_dir, tmp_path, monkeypatch):
    cfg = _cfg(random_dir, max_new_tokens=500)  # the prompt alone takes > 12 of the 512 positions
    model, tokenizer = load_chat_model(cfg)
    calls = record(model, monkeypatch)
    code, out = run_chat(cfg, model, tokenizer, "hello\n")
    assert code == 0 and not calls
    assert "turn refused" in out and "context of 512" in out
    assert "a shorter message or --context_file" in out and "/reset" not in out.split("turn refused")[1]
    with pytest.raises(ValueError, match="^--prompt: the prompt takes"):
        one_shot(_cfg(random_dir, max_new_tokens=500, prompt="hello"), model, tokenizer, io.StringIO())
    document = tmp_path / "long.txt"  # a document that fills the context: the file is named, not --prompt
    document.write_text("word " * 2000)
    with pytest.raises(ValueError, match=f"^--context_file {document}: with --prompt the prompt takes"):
        cfg = _cfg(random_dir, max_new_tokens=8, prompt="hello", context_file=str(document))
        one_shot(cfg, model, tokenizer, io.StringIO())


def _one_line(err):
    text = str(err.value)
    assert "\n" not in text
    return text


def test_bad_inputs_fail_in_one_line_before_loading(random_dir, tmp_path, monkeypatch):
    import longqlora.evaluation.loading

    def never(*args, **kwargs):
        raise AssertionError("weights loaded before the inputs were checked")

    monkeypatch.setattr(longqlora.evaluation.loading, "load_for_inference", never)
    with pytest.raises(ValueError) as err:
        load_chat_model(ChatConfig(model=str(tmp_path / "missing")))
    assert _one_line(err).startswith(f"--model {tmp_path / 'missing'}: no such directory")
    with pytest.raises(ValueError) as err:
        load_chat_model(ChatConfig(model=str(random_dir), context_file=str(tmp_path / "none.txt")))
    assert _one_line(err).startswith(f"--context_file {tmp_path / 'none.txt'}: no such file")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="the file is empty"):
        load_chat_model(ChatConfig(model=str(random_dir), context_file=str(tmp_path / "empty.txt")))
    with pytest.raises(ValueError) as err:
        load_chat_model(ChatConfig(adapter=str(tmp_path)))
    assert _one_line(err).startswith(f"--adapter {tmp_path}: not a PEFT adapter directory")
    with pytest.raises(ValueError, match="^--prompt: the prompt takes .* over the model's context of 512"):
        load_chat_model(_cfg(random_dir, max_new_tokens=500, prompt="hello"))
    (tmp_path / "long.txt").write_text("word " * 2000)  # no room for the reply: chat refuses every first turn
    with pytest.raises(ValueError) as err:
        load_chat_model(_cfg(random_dir, context_file=str(tmp_path / "long.txt")))
    assert _one_line(err).startswith(f"--context_file {tmp_path / 'long.txt'}: ")
    assert "does not fit the 512-token context" in str(err.value)
    # the template and system message count too: a document that fits alone may leave no room once rendered
    from transformers import AutoTokenizer

    from longqlora.chat import ensure_chat_template

    tokenizer = ensure_chat_template(AutoTokenizer.from_pretrained(random_dir))
    (tmp_path / "mid.txt").write_text("word " * 100)
    alone = len(tokenizer("word " * 99 + "word", add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match="the document's first turn takes"):
        load_chat_model(_cfg(random_dir, context_file=str(tmp_path / "mid.txt"), max_new_tokens=512 - alone - 1))
    (tmp_path / "short.txt").write_text("word " * 20)
    with pytest.raises(AssertionError, match="weights loaded"):  # a document that fits passes the checks
        load_chat_model(_cfg(random_dir, context_file=str(tmp_path / "short.txt")))
    for kwargs, flag in [
        ({}, "--model"),
        ({"model": "x", "temperature": -1}, "--temperature"),
        ({"model": "x", "temperature": float("nan")}, "--temperature"),
        ({"model": "x", "repetition_penalty": float("nan")}, "--repetition_penalty"),
        ({"model": "x", "top_p": 0}, "--top_p"),
        ({"model": "x", "max_new_tokens": 0}, "--max_new_tokens"),
        ({"model": "x", "seed": -1}, "--seed"),
        ({"model": "x", "prompt": " "}, "--prompt"),
    ]:
        with pytest.raises(ValueError) as err:
            ChatConfig(**kwargs)
        assert _one_line(err).startswith(flag)


def test_4bit_adapter_answers(sft_adapter):
    cfg = ChatConfig(adapter=str(sft_adapter), load_in_4bit=True, temperature=0, max_new_tokens=4, prompt="hi")
    model, tokenizer = load_chat_model(cfg)
    assert type(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    out = io.StringIO()
    reply = one_shot(cfg, model, tokenizer, out)
    assert out.getvalue() == reply + "\n" or out.getvalue().strip() == reply


def _cli_has_chat() -> bool:
    from longqlora.cli import COMMANDS

    return "chat" in COMMANDS


@pytest.mark.skipif(not _cli_has_chat(), reason="longqlora/cli.py does not wire the chat subcommand yet")
def test_command_line_one_shot(random_dir, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "longqlora",
            "chat",
            "--model",
            str(random_dir),
            "--prompt",
            "hi",
            "--max_new_tokens",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n")
    missing = subprocess.run(
        [sys.executable, "-m", "longqlora", "chat", "--model", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith(f"error: --model {tmp_path / 'nope'}")


def test_the_models_own_stop_tokens_end_a_reply(chat):
    """A model whose generation_config lists a second stop token (Llama-3-Instruct's <|eot_id|>) stops there: the
    tokenizer's EOS is added to that list, not put in its place."""
    source, model, tokenizer = chat
    cfg = _cfg(source, prompt="hello")
    ids = prompt_ids(tokenizer, render(tokenizer, [{"role": "user", "content": "hello"}]))
    kept = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = None
        _, free = generate_reply(cfg, model, tokenizer, ids)
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), **generation_kwargs(cfg, tokenizer, model))
        stop = int(out[0, len(ids) + 2])  # the reply's third token becomes a stop token
        model.generation_config.eos_token_id = [stop]
        assert stop_ids(model, tokenizer) == [tokenizer.eos_token_id, stop]
        _, stopped = generate_reply(cfg, model, tokenizer, ids)
        assert free > 3 and stopped == out[0, len(ids) :].tolist().index(stop) + 1, (free, stopped)
    finally:
        model.generation_config.eos_token_id = kept


LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
    "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PLAIN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"


def test_the_templates_end_of_turn_token_stops_chat_and_the_merged_model():
    """A model fine-tuned on a template that ends each reply with its own token (Llama 3's <|eot_id|>, ChatML's
    <|im_end|>), not the tokenizer's EOS, stops there: chat adds it to the stop tokens and merge to the saved
    generation_config (a base's lists its EOS only); Vicuna's is the EOS itself; plain text after a reply is none."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from longqlora.data.formats import turn_end_id
    from longqlora.merge import stop_at_turn_end
    from longqlora.training.tiny import train_tokenizer

    tokenizer = train_tokenizer(["hello there, a reply"], vocab_size=300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|eot_id|>", "<|im_end|>"]})
    eot, im_end = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|im_end|>"])
    found = {}
    for name, template in (("llama3", LLAMA3), ("chatml", CHATML), ("vicuna", VICUNA_V1_1_TEMPLATE), ("plain", PLAIN)):
        tokenizer.chat_template = template
        found[name] = turn_end_id(tokenizer)
    assert found == {"llama3": eot, "chatml": im_end, "vicuna": tokenizer.eos_token_id, "plain": None}
    tokenizer.chat_template = LLAMA3
    model = SimpleNamespace(generation_config=GenerationConfig(eos_token_id=tokenizer.eos_token_id))
    assert stop_ids(model, tokenizer) == [tokenizer.eos_token_id, eot]
    stop_at_turn_end(model, tokenizer)
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id, eot]
    stop_at_turn_end(model, tokenizer)  # once only
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id, eot]


LLAMA2 = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
)


def test_the_templates_next_turn_marker_is_found_where_it_is_plain_text():
    """The text a template opens the next user turn with is a stop marker when it is plain text with a sign
    (Vicuna's "USER:", Llama 2's "[INST]"; "user:" where the template opens a line with it, there only); a role
    name behind special tokens (ChatML, Llama 3) is not."""
    from longqlora.data.formats import turn_marker
    from longqlora.training.tiny import train_tokenizer

    tokenizer = train_tokenizer(["hello there, a reply"], vocab_size=300)
    specials = ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|im_end|>", "<|im_start|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    found = {}
    for name, template in (
        ("vicuna", VICUNA_V1_1_TEMPLATE),
        ("llama2", LLAMA2),
        ("plain", PLAIN),
        ("chatml", CHATML),
        ("llama3", LLAMA3),
    ):
        tokenizer.chat_template = template
        found[name] = turn_marker(tokenizer)
    assert found == {"vicuna": "USER:", "llama2": "[INST]", "plain": "\nuser:", "chatml": None, "llama3": None}


def test_a_reply_stops_at_the_next_turn_marker_and_never_shows_it(chat, monkeypatch):
    """A model that misses its end-of-turn token and writes the next turn's marker stops there: generation ends
    early, the marker and the whitespace before it are cut from the reply, and the stream shows exactly the reply.
    The marker is taken from the model's own greedy reply, so that it does write it."""
    import longqlora.data.formats as formats

    source, model, tokenizer = chat
    cfg = _cfg(source, prompt="hello", max_new_tokens=16)
    ids = prompt_ids(tokenizer, render(tokenizer, [{"role": "user", "content": "hello"}]))
    monkeypatch.setattr(formats, "turn_marker", lambda tokenizer: None)
    free, n_free = generate_reply(cfg, model, tokenizer, ids)
    with torch.no_grad():
        new = model.generate(input_ids=torch.tensor([ids]), **generation_kwargs(cfg, tokenizer, model))[0, len(ids) :]
    pieces = [tokenizer.decode(new[i : i + 2], skip_special_tokens=True).strip() for i in range(6, 12)]
    marker = next(p for p in pieces if p and "\ufffd" not in p and p in free)  # two tokens from the middle
    assert n_free == 16, free
    monkeypatch.setattr(formats, "turn_marker", lambda tokenizer: marker)
    out = io.StringIO()
    reply, n_stopped = generate_reply(cfg, model, tokenizer, ids, out)
    assert reply == free[: free.index(marker)].rstrip()
    assert out.getvalue() == reply and marker not in reply
    assert n_stopped < n_free


def test_the_stream_holds_back_what_may_begin_the_marker():
    """Streamed text is final: no trailing whitespace, nothing that may turn out to be the start of the next-turn
    marker (a marker with a space in it, "### Human:", would otherwise show its first word)."""
    from types import SimpleNamespace

    from longqlora.decoding import StreamWriter

    pieces = ["Hi", " there", "\n", "###", " Human", ":"]
    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens: "".join(pieces[i] for i in ids))
    out = io.StringIO()
    writer = StreamWriter(tokenizer, out, marker="### Human:")
    writer.put(torch.tensor([[0]]))  # the prompt
    shown = []
    for i in range(len(pieces)):
        writer.put(torch.tensor([i]))
        shown.append(out.getvalue())
    writer.end()
    assert shown == ["", "Hi", "Hi there", "Hi there", "Hi there", "Hi there"]
    assert out.getvalue() == "Hi there"


def test_chat_takes_the_system_prompt_the_adapter_trained_with(sft_adapter):
    """The SFT run's --system_prompt (the tiny run's "A chat.") is in the adapter's record, and chat renders it
    unless --system_prompt names another: the first turn's prompt is what training rendered."""
    import json

    from longqlora.chat import with_trained_system_prompt

    record = json.loads((sft_adapter / "longqlora_extension.json").read_text())
    assert record["data"]["system_prompt"] == "A chat."
    assert with_trained_system_prompt(ChatConfig(adapter=str(sft_adapter))).system_prompt == "A chat."
    assert with_trained_system_prompt(
        ChatConfig(adapter=str(sft_adapter), system_prompt="Be brief.")
    ).system_prompt == ("Be brief.")
    assert with_trained_system_prompt(ChatConfig(model=str(sft_adapter / "tiny-base"))).system_prompt is None
