"""`{% generation %}` markers, which tell transformers (and TRL's assistant-only loss) which tokens are replies:
added to a ChatML template that renders every turn with one expression, and turned into plain Jinja for a merged
model's users."""

from __future__ import annotations

import re

_GENERATION_TAG = re.compile(r"\{%(-?)\s*(generation|endgeneration)\s*(-?)%\}")

# ChatML's one expression for every turn (SmolLM2's template, and many community chat models'):
#   {{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}
# a newline written as \n or as itself; single or double quotes; either subscript or attribute access.
_PARTS = {
    "q": r"""['"]""",
    "nl": r"""['"](?:\\n|\n)['"]""",
    "role": r"""message(?:\[['"]role['"]\]|\.role)""",
    "content": r"""message(?:\[['"]content['"]\]|\.content)""",
}
_CHATML_TURN = re.compile(
    r"\{{\{{(?P<ltrim>-?)\s*(?P<head>{q}<\|im_start\|>{q}\s*\+\s*{role}\s*\+\s*{nl})\s*\+\s*"
    r"(?P<content>{content})\s*\+\s*(?P<end>{q}<\|im_end\|>{q})"
    r"(?:\s*\+\s*(?P<after>{nl}))?\s*(?P<rtrim>-?)\}}\}}".format(**_PARTS)
)


def without_generation_markers(template: str) -> str:
    """`template` with its `{% generation %}` markers (which only transformers' renderer knows, for the training
    loss) turned into `{% if true %}`...`{% endif %}`, with their whitespace control: it renders the same text, and
    plain Jinja (llama.cpp's, vLLM's and other renderers of a merged model) parses it. Block tags, not comments: a
    marker quoted inside a comment (TRL's training templates name them in their header) stays harmless."""
    return _GENERATION_TAG.sub(
        lambda m: f"{{%{m[1]} {'if true' if m[2] == 'generation' else 'endif'} {m[3]}%}}", template
    )


def with_chatml_markers(template: str) -> str | None:
    """A ChatML template that writes every turn with one expression, with the reply and its <|im_end|> of each
    assistant turn in `{% generation %}` markers (the model learns to end its reply); None for any other
    template. The caller checks that it renders what the original does. TRL patches only the templates it knows
    (Qwen3's, ...): SmolLM2-Instruct's and the community ChatML templates were refused."""
    found = list(_CHATML_TURN.finditer(template))
    if len(found) != 1:
        return None
    m = found[0]
    reply = f"{{{{ {m['content']} + {m['end']} }}}}"
    marked = (
        f"{{{{{m['ltrim']} {m['head']} }}}}{{% if message['role'] == 'assistant' %}}{{% generation %}}{reply}"
        f"{{% endgeneration %}}{{% else %}}{reply}{{% endif %}}"
        + (f"{{{{ {m['after']} {m['rtrim']}}}}}" if m["after"] else "")
    )
    if m["rtrim"] and not m["after"]:
        marked += "{{- '' -}}"  # keep the original's trimming of what follows
    return template[: m.start()] + marked + template[m.end() :]
