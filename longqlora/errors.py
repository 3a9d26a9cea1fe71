"""Which exceptions are the user's input, and how each reads as one line; `cli.one_line_errors` (every entry point:
recipes, `python -m longqlora ...`, data_prep/) turns them into `error: ...` on stderr and exit status 2, while a
genuine bug keeps its traceback. The library
raises ValueError naming the flag and the fix; file-system errors on a path the user gave (OSError: missing,
not a directory, no permission, not gzip), a truncated compressed file (EOFError), a --config that is not YAML and
a chat template that fails to render are input too. Anything else (TypeError, KeyError, RuntimeError, ...) is a
bug and keeps its traceback. LONGQLORA_TRACEBACK=1 shows the traceback of a one-line error as well.
"""

from __future__ import annotations

import contextlib
import re

INTERRUPTED_EXIT = 130  # the shell's code for a command stopped by Ctrl-C
BROKEN_PIPE_EXIT = 141  # the shell's code for a command whose reader went away (SIGPIPE), e.g. `| head -1`


class Interrupted(Exception):
    """A run stopped by Ctrl-C or SIGTERM after saving what it had (the message says where and how to resume)."""


def input_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that come from the user's input rather than from a bug in this toolkit."""
    types: list[type[BaseException]] = [ValueError, OSError, EOFError]
    try:
        import yaml

        types.append(yaml.YAMLError)
    except ImportError:
        pass
    try:
        import jinja2

        types.append(jinja2.TemplateError)  # a chat template from a model or adapter directory
    except ImportError:
        pass
    return tuple(types)


@contextlib.contextmanager
def flags_renamed(names: dict[str, str]):
    """Within the block, a ValueError's line calls each flag of `names` by the caller's name for it: a lower layer
    names the flags of the command it serves most (the data layer --dataset, the model loader
    --model_name_or_path), which are --data, --eval_dataset or --model elsewhere."""
    try:
        yield
    except ValueError as err:
        message = str(err)
        for old, new in names.items():  # the whole flag only: --dataset, not --dataset_text_field
            message = re.sub(rf"(?<![\w-]){re.escape(old)}(?![\w-])", new, message)
        raise ValueError(message) from None


MAX_LINE = 280  # characters of an error line


def one_line(err: BaseException) -> str:
    """The error as one line: an OSError names its file; a message of several lines is joined (capped at
    MAX_LINE characters)."""
    if isinstance(err, OSError) and err.filename and err.strerror:
        return f"{err.filename}: {err.strerror}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) < 2:
        return lines[0] if lines else type(err).__name__
    # a library's message that goes on below its first line (transformers lists the choices there): joined, capped
    joined = " ".join(lines)
    return joined if len(joined) <= MAX_LINE else joined[: MAX_LINE - 3].rstrip() + "..."
