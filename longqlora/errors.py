"""Bad input ends in one line: the one place where an exception caused by the user's input (a flag, a file, a
--config) becomes `error: ...` on stderr and exit status 2, while a genuine bug keeps its traceback.

Every entry point (recipes, `python -m longqlora ...`, data_prep/) runs inside `one_line_errors()`. The library
raises ValueError naming the flag and the fix; file-system errors on a path the user gave (OSError: missing,
not a directory, no permission, not gzip), a truncated compressed file (EOFError), a --config that is not YAML and
a chat template that fails to render are input too. Anything else (TypeError, KeyError, RuntimeError, ...) is a
bug and keeps its traceback. LONGQLORA_TRACEBACK=1 shows the traceback of a one-line error as well.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

INTERRUPTED_EXIT = 130  # the shell's code for a command stopped by Ctrl-C


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


def one_line(err: BaseException) -> str:
    """The error as one line: an OSError names its file, anything else keeps the first line of its message."""
    if isinstance(err, OSError) and err.filename and err.strerror:
        return f"{err.filename}: {err.strerror}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def fail(err: BaseException):
    """Print `error: <one line>` and exit 2; LONGQLORA_TRACEBACK=1 re-raises to show the traceback."""
    if os.environ.get("LONGQLORA_TRACEBACK"):
        raise err
    print(f"error: {one_line(err)}", file=sys.stderr)
    raise SystemExit(2) from None


@contextmanager
def one_line_errors():
    """Run an entry point: input errors end in one line (exit 2), an interruption in one line (exit 130)."""
    try:
        yield
    except Interrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        raise SystemExit(INTERRUPTED_EXIT) from None
    except KeyboardInterrupt:
        if os.environ.get("LONGQLORA_TRACEBACK"):
            raise
        print("interrupted", file=sys.stderr)
        raise SystemExit(INTERRUPTED_EXIT) from None
    except input_error_types() as err:
        fail(err)
