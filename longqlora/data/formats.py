"""Conversation formats: instruction records read as role/content messages, written as FastChat's Vicuna v1.1.

Read (`detect_format`, `to_messages`): LongAlpaca, LongQLoRA (single- and multi-turn), ShareGPT and role/content
`messages` records, one format per file (longqlora.data.instructions.load_conversations checks that).

Written: a Jinja chat template with `{% generation %}` markers. The string it renders (FastChat `vicuna_v1.1`,
separator style ADD_COLON_TWO: sep " ", sep2 "</s>"):

    <s>{system} USER: {u1} ASSISTANT: {a1}</s>USER: {u2} ASSISTANT: {a2}</s>

The markers wrap each assistant reply together with the space before it and its end-of-sequence token, so that
TRL's `assistant_only_loss=True` trains exactly what the model writes after the generation prompt `ASSISTANT:` (the
space too, where the tokenizer keeps it a token of its own, as Llama's does before a digit) and the stop token (the
model learns when to stop), and `trl.chat_template_utils.is_chat_template_stop_token_trained` passes; where a
tokenizer's offsets leave that space out of every token, the markers start after it (`apply_vicuna_template`). A
tokenizer without a BOS token renders none.
"""

from __future__ import annotations

import json
import os

VICUNA_V1_1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)

# One statement a line, each trimming the whitespace around it, so the template's own layout never reaches the
# output. The default system prompt is a double-quoted Jinja literal: it holds an apostrophe and no double quote.
VICUNA_V1_1_TEMPLATE = (
    '{%- set default_system = "' + VICUNA_V1_1_SYSTEM + '" -%}\n'
    "{%- if messages and messages[0]['role'] == 'system' -%}\n"
    "{%- set system = messages[0]['content'] -%}\n"
    "{%- set turns = messages[1:] -%}\n"
    "{%- else -%}\n"
    "{%- set system = default_system -%}\n"
    "{%- set turns = messages -%}\n"
    "{%- endif -%}\n"
    "{{- (bos_token or '') + system + ' ' -}}\n"
    "{%- for message in turns -%}\n"
    "{%- set expected = 'user' if loop.index0 % 2 == 0 else 'assistant' -%}\n"
    "{%- if message['role'] != expected -%}\n"
    "{{- raise_exception('Vicuna conversations alternate user and assistant after an optional system message; "
    "message ' ~ loop.index0 ~ ' after the system message is ' ~ message['role'] ~ ', expected ' ~ expected) -}}\n"
    "{%- endif -%}\n"
    "{%- if message['role'] == 'user' -%}\n"
    "{{- 'USER: ' + message['content'] + ' ' -}}\n"
    "{%- else -%}\n"
    "{{- 'ASSISTANT:' -}}\n"
    "{%- generation -%}\n"
    "{{- ' ' + message['content'] + eos_token -}}\n"
    "{%- endgeneration -%}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- 'ASSISTANT:' -}}\n"
    "{%- endif -%}"
)
# The same text with the markers after that space. transformers finds where a reply starts by the token holding
# its first character: a tokenizer whose offsets leave the space out of every token (byte-level BPE with
# trim_offsets) would mask no reply at all with the markers before it.
VICUNA_V1_1_TEMPLATE_SPACE_UNTRAINED = VICUNA_V1_1_TEMPLATE.replace(
    "{{- 'ASSISTANT:' -}}\n{%- generation -%}\n{{- ' ' + message['content']",
    "{{- 'ASSISTANT: ' -}}\n{%- generation -%}\n{{- message['content']",
)


def apply_vicuna_template(tokenizer):
    """Set `tokenizer.chat_template` to Vicuna v1.1 and return the tokenizer (the same object): the markers before
    the space after "ASSISTANT:" where the tokenizer's offsets let transformers mask the replies so, else after it."""
    tokenizer.chat_template = VICUNA_V1_1_TEMPLATE
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "1 ok"}]
    try:
        mask = tokenizer.apply_chat_template(probe, return_dict=True, return_assistant_tokens_mask=True)
    except ValueError:  # a slow tokenizer has no offsets: nothing to mask with (chat renders the same text)
        return tokenizer
    if 1 not in mask["assistant_masks"]:
        tokenizer.chat_template = VICUNA_V1_1_TEMPLATE_SPACE_UNTRAINED
    return tokenizer


def read_template_file(path: str, flag: str = "--chat_template_path") -> str:
    """The chat template in a .jinja/.j2 file, as TRL's SFTTrainer reads `chat_template_path`; any other path (a
    tokenizer TRL would clone the template from, adding its tokens and resizing the embedding that this toolkit
    trains and saves) is refused in one line."""
    if not os.path.exists(os.path.expanduser(path)):
        raise ValueError(f"{flag} {path}: no such file; pass a .jinja or .j2 file holding the chat template")
    path = os.path.expanduser(path)
    if not (os.path.isfile(path) and path.endswith((".jinja", ".j2"))):
        raise ValueError(
            f"{flag} {path}: pass a .jinja or .j2 file holding the template (another tokenizer's template, which TRL "
            "would clone with its tokens into a resized embedding, is not supported: save its chat_template into a "
            ".jinja file)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{flag} {path}: cannot read it as UTF-8 text ({err})") from err


def training_chat_template(tokenizer, flag: str, template_path: str | None = None) -> str:
    """Give `tokenizer` the chat template conversations are trained with and return its name: the one in
    `template_path` (--chat_template_path, a .jinja file, as TRL applies it), else the tokenizer's own when it has
    one (chat renders with that one too), else Vicuna v1.1. data_prep's lengths and training's loss both come from
    here, so they measure the same text. TRL's assistant-only loss needs `{% generation %}` markers around the
    replies: a template without them that TRL cannot patch is refused here, before any weights load, rather than in
    SFTTrainer after they have."""
    if template_path:
        tokenizer.chat_template = read_template_file(template_path)
        whose, flag = "the template in this file", f"--chat_template_path {template_path}"
    elif not getattr(tokenizer, "chat_template", None):
        apply_vicuna_template(tokenizer)
        return "vicuna_v1.1"
    else:
        whose = "the tokenizer's own chat template"
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    try:  # a template that does not render fails here in one line, not in the first batch with Jinja's own words
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], tokenize=False
        )
    except Exception as err:  # jinja2's TemplateError, or the template's own raise_exception
        raise ValueError(f"{flag}: {whose} does not render a user and an assistant turn ({err}); fix it") from None
    if not has_generation_markers(tokenizer.chat_template):
        try:
            get_training_chat_template(tokenizer)
        except ValueError:
            if _mark_chatml(tokenizer):
                return (template_path or "the tokenizer's own") + ", reply markers added"
            raise ValueError(
                f"{flag}: {whose} has no {{% generation %}} markers and TRL cannot add them, so the replies cannot "
                "be told apart for the loss; wrap each assistant reply in {% generation %}...{% endgeneration %} "
                "and pass the template as a .jinja file with --chat_template_path"
                + ("" if template_path else ", or remove the tokenizer's template to train with Vicuna v1.1")
            ) from None
    return template_path or "the tokenizer's own"


def _mark_chatml(tokenizer) -> bool:
    """Give `tokenizer` its ChatML template with `{% generation %}` markers around the replies (data.markers), when
    the template has ChatML's one expression for every turn and the marked one renders the very same text."""
    from longqlora.data.markers import with_chatml_markers

    marked = with_chatml_markers(tokenizer.chat_template)
    if marked is None:
        return False
    turns = [("system", "S"), ("user", "U1"), ("assistant", "A1"), ("user", "U2"), ("assistant", "A2")]
    chat = [{"role": role, "content": content} for role, content in turns]
    for messages in (chat, chat[1:], chat[1:3]):  # with a system message, without, one exchange
        for prompt in (False, True):
            a, b = (
                tokenizer.apply_chat_template(messages, chat_template=t, tokenize=False, add_generation_prompt=prompt)
                for t in (tokenizer.chat_template, marked)
            )
            if a != b:
                return False
    tokenizer.chat_template = marked
    return True


_PROBE_REPLY = "Zq7 probe reply"  # text no template writes by itself
_PROBE_NEXT = "Zq8 probe question"


def _after_probe_reply(tokenizer, then: list[dict]) -> str | None:
    """What the chat template writes after an assistant reply of `_PROBE_REPLY` (followed by the turns `then`),
    or None without a template, or with one that does not render (reported where it is rendered for use)."""
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        return None
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_REPLY}, *then]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:
        return None
    at = text.rfind(_PROBE_REPLY)
    return None if at < 0 else text[at + len(_PROBE_REPLY) :]


def _special_ids(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def turn_end_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant reply (Vicuna's </s>, Llama 3's
    <|eot_id|>, ChatML's <|im_end|>): a model trained on that template ends its replies with it, so generation has
    to stop there, also where it is not the tokenizer's EOS. None without a template or a special token there."""
    after = _after_probe_reply(tokenizer, [])
    if after is None:
        return None
    special = _special_ids(tokenizer)
    for token in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if token in special:
            return token
        if tokenizer.decode([token]).strip():  # plain text follows the reply: no end-of-turn token
            return None
    return None


def turn_marker(tokenizer) -> str | None:
    """The plain text with which the chat template opens the next user turn (Vicuna's "USER:", Llama 2's
    "[INST]", "### Human:"), when it has a sign other than letters and digits. A model that misses its end-of-turn
    token writes that marker and goes on to play the user, so a reply stops there too. A bare role name after a
    special token (ChatML's "user") is no marker: a reply may say it."""
    between = _after_probe_reply(tokenizer, [{"role": "user", "content": _PROBE_NEXT}])
    if between is None or _PROBE_NEXT not in between:
        return None
    raw = between = between[: between.index(_PROBE_NEXT)]
    names = {tokenizer.convert_ids_to_tokens(i) for i in _special_ids(tokenizer)}
    for name in sorted((n for n in names if n), key=len, reverse=True):
        between = between.replace(name, "\n")
    lines = between.strip().splitlines()
    marker = lines[-1].strip() if lines else ""
    if not any(not (c.isalnum() or c.isspace()) for c in marker):
        return None
    # a marker the template opens a line with ("user:") is a marker only there: a reply may say "the user: prompt"
    return "\n" + marker if raw[: raw.rindex(marker)].rstrip(" \t").endswith("\n") else marker


# Detected from the keys that hold a value, in this order (a LongAlpaca record may also have `input`).
FORMATS = {
    "messages": ("messages",),  # [{"role": system|user|assistant, "content"}]
    "sharegpt": ("conversations",),  # [{"from": human|gpt|system, "value"}]
    "longqlora_conversation": ("conversation",),  # LongQLoRA/Firefly multi-turn: [{"human", "assistant"}, ...]
    "longalpaca": ("instruction", "output"),  # user = instruction + "\n\n" + input (when input is non-empty)
    "longqlora": ("input", "output"),  # LongQLoRA's VicunaSFTDataset: one user turn, one reply
    # TRL's prompt-completion: two strings (one user turn, one reply), or two lists of role/content messages
    "prompt_completion": ("prompt", "completion"),
}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}


# The list-of-turns formats: each turn an object with these text fields (LongQLoRA's may omit one of its two).
TURN_FIELDS = {
    "messages": ("role", "content"),
    "sharegpt": ("from", "value"),
    "longqlora_conversation": ("human", "assistant"),
}
EMPTY_REPLY = "an empty assistant reply"
LOSS_SWITCHES = ("weight", "train", "training")  # per-turn "leave this reply untrained" keys (axolotl's)
UNRENDERED = ("tool_calls", "function_call", "reasoning_content", "reasoning", "thinking")
NOT_RENDERED = "which the chat template is not given"


def detect_format(record: dict) -> str:
    """The first of `FORMATS` whose keys all hold a value in `record`, or '' for none."""
    return next((name for name, keys in FORMATS.items() if all(record.get(k) is not None for k in keys)), "")


def json_kind(value) -> str:
    return {str: "a string", list: "a list", dict: "an object", bool: "true/false", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


def record_problem(record: dict) -> str:
    """Why `record` does not have its format's shape ('' when it does, or when it matches no format): turns that
    are not a list of objects (a string, a list of strings), a role that is not text, a flat field not text."""
    fmt = detect_format(record)
    if fmt in TURN_FIELDS:
        name, keys = FORMATS[fmt][0], TURN_FIELDS[fmt]
        shape = "{" + ", ".join(keys) + "} objects"
        turns = record[name]
        if not isinstance(turns, list):
            return f"'{name}' is {json_kind(turns)}, not a list of {shape}"
        for k, turn in enumerate(turns, start=1):
            if not isinstance(turn, dict):
                return f"'{name}' item {k} is {json_kind(turn)}, not one of {shape}"
            role = keys[0]
            if fmt != "longqlora_conversation" and not isinstance(turn.get(role), str):
                return f"'{name}' item {k}: '{role}' is {json_kind(turn.get(role))}, not text"
            off = _untrained(turn, fmt)
            if off:  # a reply the data asks to leave untrained would be trained: refused, never silently
                return (
                    f"'{name}' item {k}: '{off}' {json.dumps(turn[off])} leaves a reply out of the loss, which is not "
                    "supported (every reply trains); remove the key, or end the conversation before that reply"
                )
        return ""
    if fmt == "prompt_completion" and any(isinstance(record[k], list) for k in FORMATS[fmt]):
        for key in FORMATS[fmt]:
            turns = record[key]
            kind = "" if isinstance(turns, list) else json_kind(turns)
            bad = kind and f"'{key}' is {kind}, not a list of messages like the other"
            for k, turn in enumerate(turns if not bad else (), start=1):
                if not (isinstance(turn, dict) and isinstance(turn.get("role"), str)):
                    bad = f"'{key}' item {k} is not a {{role, content}} object"
                    break
            if bad:
                return bad
        return ""
    for key in (*FORMATS[fmt], "input") if fmt else ():
        if record.get(key) is not None and not isinstance(record[key], str):
            return f"'{key}' is {json_kind(record[key])}, not text"
    return ""


def _untrained(turn: dict, fmt: str) -> str:
    """The key of a per-turn loss switch that leaves this assistant turn untrained, or ''. Other turns never train,
    so their switches (axolotl's data sets weight 0 on every system and user turn) change nothing."""
    role = (
        turn.get("role") if fmt == "messages" else SHAREGPT_ROLES.get(turn.get("from")) if fmt == "sharegpt" else None
    )
    if role != "assistant":
        return ""
    return next((key for key in LOSS_SWITCHES if turn.get(key) is not None and not turn[key]), "")


def _text(value) -> str | None:
    """A string, or OpenAI-style content parts that are all text (joined); anything else None, which
    conversation_problem reports."""
    if isinstance(value, list) and value and all(_text_part(part) for part in value):
        return "".join(part["text"] for part in value)
    return value if isinstance(value, str) else None


def _text_part(part) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


def _messages(items: list) -> list[dict]:
    return [{"role": _text(m.get("role")), "content": _text(m.get("content"))} for m in items]


def _turns(record: dict, fmt: str) -> list[dict]:
    if fmt == "messages":
        return _messages(record["messages"])
    if fmt == "sharegpt":
        return [
            {"role": SHAREGPT_ROLES.get(m.get("from"), _text(m.get("from"))), "content": _text(m.get("value"))}
            for m in record["conversations"]
        ]
    if fmt == "longqlora_conversation":
        return [
            {"role": role, "content": _text(turn.get(key))}
            for turn in record["conversation"]
            for role, key in (("user", "human"), ("assistant", "assistant"))
            if turn.get(key) is not None
        ]
    if fmt == "prompt_completion" and isinstance(record["prompt"], list):
        return _messages(record["prompt"]) + _messages(record["completion"])
    user_key, reply_key = FORMATS[fmt]  # one user turn (LongAlpaca's own `input` appended), one reply
    user = _text(record[user_key])
    if fmt == "longalpaca" and record.get("input") and isinstance(user, str):
        user = f"{user}\n\n{record['input']}" if user else record["input"]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": _text(record[reply_key])}]


def to_messages(record: dict, fmt: str, system_prompt: str | None = None) -> list[dict]:
    """`record` of format `fmt` as role/content messages (unchecked). A system message comes from the record (its
    own system turn or a top-level `system` field), else from `system_prompt`, else none (the template's default)."""
    messages = _turns(record, fmt)
    system = record.get("system") if _text(record.get("system")) else system_prompt
    if system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system}] + messages
    return messages


def unrendered(record: dict, fmt: str) -> str:
    """What a record holds that the chat template is not given (the messages' role and content are): tool calls,
    reasoning, the tools offered. Training on the rest would teach the replies without them ('' when none)."""
    name = FORMATS[fmt][0] if fmt in ("messages", "sharegpt") else None
    for k, turn in enumerate(record[name] if name else (), start=1):
        held = [key for key in UNRENDERED if isinstance(turn, dict) and turn.get(key) not in (None, "", [], {})]
        if held:
            return f"message {k} has {held[0]}, {NOT_RENDERED} (only role and content)"
    return f"the record offers tools, {NOT_RENDERED}" if record.get("tools") not in (None, "", [], {}) else ""


def conversation_problem(messages: list[dict]) -> str:
    """Why `messages` is not [system] user assistant ... user assistant (what Vicuna renders), or '' if it is."""
    first = 1 if messages and messages[0]["role"] == "system" else 0
    body = messages[first:]
    if not body:
        return "no user/assistant messages"
    for k, m in enumerate(messages):
        if not isinstance(m["content"], str):
            return f"message {k + 1} has no text content"
    for k, m in enumerate(body):
        expected = "user" if k % 2 == 0 else "assistant"
        if m["role"] != expected:
            return f"message {first + k + 1} is {m['role']}, expected {expected}"  # numbered as in the record
    if body[-1]["role"] != "assistant":
        return "ends with a user message"
    empty = [k for k, m in enumerate(messages, start=1) if m["role"] == "assistant" and not m["content"].strip()]
    return f"message {empty[0]} is {EMPTY_REPLY}" if empty else ""
