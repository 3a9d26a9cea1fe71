"""How chat decodes a reply: where it stops, the generate() settings, and the reply streamed as it is written.

A reply stops at the tokenizer's EOS, at every stop token of the model's generation_config, at the special token
the chat template ends a reply with, and at the plain-text marker with which the template opens the next user
turn (`longqlora.data.formats.turn_marker`: Vicuna's "USER:"), which is cut from the reply and never streamed.
"""

from __future__ import annotations

import torch

from longqlora.evaluation.loading import NEUTRAL_DECODING


def stop_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS, every stop token of the model's generation_config (Llama-3-Instruct ends a turn with
    <|eot_id|>, not its EOS: passing the tokenizer's alone would replace that list) and the token the chat
    template ends a reply with (a base's generation_config does not know the template it was fine-tuned on)."""
    from longqlora.data.formats import turn_end_id

    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    own = [own] if isinstance(own, int) else list(own or [])
    first = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    end = turn_end_id(tokenizer)
    return list(dict.fromkeys(first + own + ([end] if end is not None else [])))


def generation_kwargs(cfg, tokenizer, model=None) -> dict:
    """generate() settings for a `ChatConfig`; greedy at temperature 0, every other knob at its neutral value so a
    model's own generation_config (e.g. Vicuna's do_sample=True, a repetition penalty) neither samples, penalises
    nor warns."""
    from longqlora.data.formats import turn_marker

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = {
        **NEUTRAL_DECODING,
        "max_new_tokens": cfg.max_new_tokens,
        "repetition_penalty": cfg.repetition_penalty,
        "use_cache": True,
        "eos_token_id": stop_ids(model, tokenizer),
        "pad_token_id": pad,
    }
    if (marker := turn_marker(tokenizer)) is not None:
        kwargs.update(stop_strings=[marker], tokenizer=tokenizer)  # generate() finds the marker with it
    if cfg.temperature > 0:
        kwargs.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
    return kwargs


def cut_at_marker(text: str, marker: str | None) -> str:
    """`text` up to the next-turn `marker` (all of it without one), without the whitespace before the marker."""
    if marker is None or marker not in text:
        return text
    return text[: text.index(marker)].rstrip()


class StreamWriter:
    """A generate() streamer writing the reply to `stream` as words complete. It decodes the whole reply each time
    and writes only text that can no longer change: a word once the next begins, never trailing whitespace, never
    what may be the start of the next-turn `marker`; so what is written equals the reply `generate_reply` returns."""

    def __init__(self, tokenizer, stream, marker: str | None = None):
        self.tokenizer, self.stream, self.marker = tokenizer, stream, marker
        self.ids: list[int] = []
        self.prompt_seen = False
        self.written = 0

    def _text(self) -> str:
        return cut_at_marker(self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip(), self.marker)

    def put(self, value):
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        self.ids += value.flatten().tolist()
        text = self._text()
        stable = text if text.endswith("\n") else text[: text.rfind(" ") + 1]
        if self.marker:  # the text may end with the marker's first characters
            held = next((k for k in range(len(self.marker), 0, -1) if text.endswith(self.marker[:k])), 0)
            stable = stable[: len(text) - held]
        stable = stable.rstrip()
        if len(stable) > self.written and "\ufffd" not in stable[self.written :]:
            self._write(stable[self.written :])

    def end(self):
        self._write(self._text().rstrip()[self.written :])

    def _write(self, text: str):
        if text:
            self.stream.write(text)
            self.stream.flush()
            self.written += len(text)


@torch.no_grad()
def generate_reply(cfg, model, tokenizer, ids: list[int], stream=None) -> tuple[str, int]:
    """Generate a reply to prompt token `ids`, streamed to `stream` when given. Returns (reply text, new tokens)."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    kwargs = generation_kwargs(cfg, tokenizer, model)
    marker = (kwargs.get("stop_strings") or [None])[0]
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        streamer=StreamWriter(tokenizer, stream, marker) if stream is not None else None,
        **kwargs,
    )
    new = out[0, len(ids) :]
    return cut_at_marker(tokenizer.decode(new, skip_special_tokens=True).strip(), marker), int(new.numel())
