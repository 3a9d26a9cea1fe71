"""Chat with an extended model in its chat template (Vicuna v1.1 without one), a document first, streamed replies.

`python -m longqlora chat --model DIR [--adapter DIR] [--context_file FILE] [--prompt TEXT]`. The model loads
through `longqlora.evaluation.loading` (plain/merged directory, or base + PEFT adapter with the adapter's position
interpolation), with the model's own full attention. Every turn is rendered by the tokenizer's chat template
(the Vicuna v1.1 one is set when the tokenizer has none), so the model sees exactly the format it was
fine-tuned on. Output goes to the stream the caller passes, never straight to sys.stdout, so it can be captured.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from longqlora.decoding import generate_reply
from longqlora.evaluation.loading import LoaderArgs

logger = logging.getLogger(__name__)

NEAR_FULL = 0.9  # a note is shown once the conversation uses this share of the context
HELP = "Type a message; /reset starts a new conversation, /exit or Ctrl-D quits."


@dataclass
class ChatConfig(LoaderArgs):
    """`python -m longqlora chat`: the fields are its flags."""

    context_file: str | None = field(
        default=None, metadata={"help": "A UTF-8 text file put before the first question of the conversation."}
    )
    prompt: str | None = field(
        default=None, metadata={"help": "Answer this one message, print the reply and exit (for scripts)."}
    )
    system_prompt: str | None = field(
        default=None,
        metadata={
            "help": "System message (default: the one an adapter's conversations trained with, else the template's)."
        },
    )
    max_new_tokens: int = field(default=512, metadata={"help": "Most tokens per reply."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature; 0 decodes greedily."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling mass, in (0, 1]."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Penalty on repeated tokens; 1 is none."})
    seed: int = field(default=0, metadata={"help": "Random seed for sampling."})

    def __post_init__(self):
        super().__post_init__()
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # NaN too
            raise ValueError(f"--temperature must be >= 0 (0 decodes greedily), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1], e.g. 0.9, got {self.top_p}")
        if not 0 <= self.seed < 2**32:  # transformers' set_seed would refuse it naming no flag
            raise ValueError(f"--seed must be in [0, 2**32), got {self.seed}")
        if not 0 < self.repetition_penalty < math.inf:  # NaN too
            raise ValueError(f"--repetition_penalty must be > 0 (1 is none), got {self.repetition_penalty}")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("--prompt is empty; pass a message, or leave --prompt out to chat interactively")


# ------------------------------------------------------------------------------------------------ loading
def read_document(cfg: ChatConfig) -> str | None:
    """The text of --context_file (None without one), or one ValueError line saying what is wrong with it."""
    if cfg.context_file is None:
        return None
    path = Path(os.path.expanduser(cfg.context_file))
    if not path.is_file():
        raise ValueError(f"--context_file {cfg.context_file}: no such file; pass a UTF-8 text file")
    from longqlora.data.sources import read_text

    text = read_text(f"--context_file {cfg.context_file}", str(path))
    if not text.strip():
        raise ValueError(f"--context_file {cfg.context_file}: the file is empty; pass a document")
    return text.strip()


def check_inputs(cfg: ChatConfig):
    """Every check that needs no weights: --model, --adapter (and its recorded base), --context_file, and whether
    --prompt or the document with a --max_new_tokens reply fits the context (the tokenizer and config decide).
    Returns the tokenizer when a check loaded it (else None), for the model's loader to take."""
    from longqlora.evaluation.loading import inference_context, inference_tokenizer, model_dir, read_extension

    if cfg.adapter:
        read_extension(cfg.adapter)  # raises "--adapter X: not a PEFT adapter directory"
    model_dir(cfg.model, cfg.adapter)
    document = read_document(cfg)
    if document is None and cfg.prompt is None:
        return None
    remote = cfg.trust_remote_code
    tokenizer = ensure_chat_template(inference_tokenizer(cfg.model, cfg.adapter, trust_remote_code=remote))
    limit = cfg.target_context or inference_context(cfg.model, cfg.adapter, trust_remote_code=remote)
    if cfg.prompt is not None:
        ids = prompt_ids(tokenizer, render(tokenizer, build_messages(cfg, [], cfg.prompt, document)))
        check_prompt_fits(cfg, len(ids), limit, document)
    elif full := no_room(cfg, tokenizer, document, limit):  # every first turn would be refused
        raise ValueError(f"--context_file {cfg.context_file}: {full}")
    return tokenizer


def with_trained_system_prompt(cfg: ChatConfig) -> ChatConfig:
    """`cfg` with the system message the adapter's conversations trained with (its record's), unless
    --system_prompt names one: a chat under another system message is not the conversation the model learned."""
    from longqlora.evaluation.loading import read_extension

    record = read_extension(cfg.adapter) if cfg.adapter and cfg.system_prompt is None else None
    trained = (record.data or {}).get("system_prompt") if record else None
    if trained is None:
        return cfg
    logger.info("system prompt: %r, as the adapter trained (--system_prompt to change it)", trained)
    return dataclasses.replace(cfg, system_prompt=trained)


def ensure_chat_template(tokenizer):
    """Give a tokenizer without a chat template the Vicuna v1.1 one (what the SFT recipe trains on)."""
    if not getattr(tokenizer, "chat_template", None):
        from longqlora.data.formats import apply_vicuna_template

        logger.info("the tokenizer has no chat template; using Vicuna v1.1")
        apply_vicuna_template(tokenizer)
    return tokenizer


def load_chat_model(cfg: ChatConfig):
    """Check the inputs, then load (model in eval mode, tokenizer with a chat template) for full-attention chat."""
    # the loader logs the context and scaling; the banner repeats the context
    model, tokenizer, _ = cfg.load(check_inputs(cfg))
    return model, ensure_chat_template(tokenizer)


# --------------------------------------------------------------------------------------------- one turn
def context_limit(model) -> int:
    """The positions the model is set up for (max_position_embeddings after position interpolation)."""
    return int(model.config.max_position_embeddings)


def overflow(cfg: ChatConfig, prompt_tokens: int, limit: int) -> str:
    """Why a prompt of `prompt_tokens` plus a full reply would not fit `limit` positions, or '' when it fits."""
    if prompt_tokens + cfg.max_new_tokens <= limit:
        return ""
    return (
        f"the prompt takes {prompt_tokens} tokens and the reply up to {cfg.max_new_tokens} (--max_new_tokens), "
        f"over the model's context of {limit}"
    )


def check_prompt_fits(cfg: ChatConfig, prompt_tokens: int, limit: int, document: str | None) -> None:
    """One line naming --prompt, or --context_file when there is one, if --prompt and its reply overflow."""
    too_long = overflow(cfg, prompt_tokens, limit)
    if too_long and document is not None:  # the document is what a prompt of a few words overflows with
        raise ValueError(
            f"--context_file {cfg.context_file}: with --prompt {too_long}; shorten the file or lower --max_new_tokens"
        )
    if too_long:
        raise ValueError(f"--prompt: {too_long}; shorten it or lower --max_new_tokens")


def no_room(cfg: ChatConfig, tokenizer, document: str, limit: int) -> str:
    """Why the first turn cannot fit even with an empty question ('' when it can): the document in the template,
    with the system message, plus a --max_new_tokens reply, over the context. The banner warns of it, and an
    interactive chat refuses to start."""
    first = len(prompt_ids(tokenizer, render(tokenizer, build_messages(cfg, [], "", document))))
    if first + cfg.max_new_tokens < limit:
        return ""
    return (
        f"the document's first turn takes {first} tokens; with a {cfg.max_new_tokens}-token reply (--max_new_tokens) "
        f"it does not fit the {limit}-token context; pass a shorter document or a smaller --max_new_tokens"
    )


def build_messages(cfg: ChatConfig, history: list[dict], user_text: str, document: str | None) -> list[dict]:
    """System message (when given), the history, then the new user turn; the document opens the first turn."""
    if document and not history:
        user_text = f"{document}\n\n{user_text}"
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt is not None else []
    return system + history + [{"role": "user", "content": user_text}]


def render(tokenizer, messages: list[dict]) -> str:
    """The prompt string for `messages`, ending with the assistant's generation prompt. The template comes from
    the model or adapter directory; transformers renders it in Jinja's immutable sandbox, and a template that
    fails there (or reaches for Python internals) is one error line naming its directory."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError as err:
        raise ValueError(
            f"the chat template of {tokenizer.name_or_path} failed ({type(err).__name__}: {err}); fix or remove it"
        ) from None


def prompt_ids(tokenizer, rendered: str) -> list[int]:
    # The template writes the BOS token itself, so the tokenizer must not add another.
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def chat_turn(
    cfg: ChatConfig, model, tokenizer, history: list[dict], user_text: str, stdout, document: str | None = None
) -> str | None:
    """Answer `user_text`, streaming to `stdout`, and append the exchange to `history`.

    Returns the reply, or None when the turn is refused because prompt + --max_new_tokens would not fit the context
    (the history is then left unchanged).
    """
    limit = context_limit(model)
    messages = build_messages(cfg, history, user_text, document)
    ids = prompt_ids(tokenizer, render(tokenizer, messages))
    too_long = overflow(cfg, len(ids), limit)
    if too_long:
        fix = "/reset to start a new conversation" if history else "a shorter message or --context_file"
        stdout.write(f"(turn refused: {too_long}; {fix}, or lower --max_new_tokens)\n")
        stdout.flush()
        return None
    stdout.write("ASSISTANT: ")
    stdout.flush()
    reply, new_tokens = generate_reply(cfg, model, tokenizer, ids, stdout)
    stdout.write("\n")
    history[:] = messages[1:] if cfg.system_prompt is not None else messages
    history.append({"role": "assistant", "content": reply})
    used = len(ids) + new_tokens
    if used >= NEAR_FULL * limit:
        stdout.write(f"(note: the conversation takes {used} of the model's {limit} tokens; /reset starts over)\n")
    stdout.flush()
    return reply


# ---------------------------------------------------------------------------------------- the commands
def banner(cfg: ChatConfig, model, tokenizer, document: str | None) -> str:
    """Model, context length and what the document takes, plus a warning when it leaves no room to chat."""
    from longqlora.evaluation.loading import adapter_base

    limit = context_limit(model)
    name = (cfg.model or adapter_base(cfg.adapter)) + (f" + {cfg.adapter}" if cfg.adapter else "")
    lines = [f"longqlora chat: {name} | context {limit} tokens"]
    if document is not None:
        n = len(tokenizer(document, add_special_tokens=False)["input_ids"])
        lines.append(f"document {cfg.context_file}: {n} tokens, put before your first question")
        if full := no_room(cfg, tokenizer, document, limit):
            lines.append(f"warning: {full}")
    lines.append(HELP)
    return "\n".join(lines)


def _read_line(stdin, stdout) -> str | None:
    """One line from the user after a "USER: " prompt, or None at end of input. A piped line is echoed so that
    a transcript reads like a conversation; a terminal echoes by itself (and input() gives line editing)."""
    if stdin is sys.stdin and stdout is sys.stdout and stdin.isatty():
        try:
            return input("USER: ")
        except EOFError:
            return None
    stdout.write("USER: ")
    stdout.flush()
    line = stdin.readline()
    if not line:
        return None
    stdout.write(line if line.endswith("\n") else line + "\n")
    return line.rstrip("\n")


def chat_loop(cfg: ChatConfig, model, tokenizer, stdin, stdout) -> int:
    """Interactive multi-turn chat on `stdin`/`stdout`; returns the exit code (0 on /exit, EOF or Ctrl-C)."""
    from transformers import set_seed

    ensure_chat_template(tokenizer)
    document = read_document(cfg)
    set_seed(cfg.seed)
    stdout.write(banner(cfg, model, tokenizer, document) + "\n")
    history: list[dict] = []
    try:
        while True:
            line = _read_line(stdin, stdout)
            if line is None:
                stdout.write("\n")
                return 0
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                return 0
            if text == "/reset":
                history.clear()
                stdout.write(
                    "(conversation cleared; the document opens the next question)\n"
                    if document
                    else "(conversation cleared)\n"
                )
                continue
            if text == "/help":
                stdout.write(HELP + "\n")
                continue
            chat_turn(cfg, model, tokenizer, history, text, stdout, document)
    except KeyboardInterrupt:
        stdout.write("\n")
        return 0
    finally:
        stdout.flush()


def one_shot(cfg: ChatConfig, model, tokenizer, stdout) -> str:
    """Answer `--prompt` (after --context_file when given), write the reply streamed to `stdout`, return it."""
    from transformers import set_seed

    if cfg.prompt is None:
        raise ValueError("--prompt: pass the message to answer")
    ensure_chat_template(tokenizer)
    document = read_document(cfg)
    set_seed(cfg.seed)
    ids = prompt_ids(tokenizer, render(tokenizer, build_messages(cfg, [], cfg.prompt, document)))
    check_prompt_fits(cfg, len(ids), context_limit(model), document)
    reply, _ = generate_reply(cfg, model, tokenizer, ids, stdout)
    stdout.write("\n")
    stdout.flush()
    return reply
