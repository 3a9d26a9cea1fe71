"""Writing results: atomic text/JSON files and Markdown tables, so a killed run never leaves half a file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def check_output_path(path, flag: str, *, directory: bool = True) -> Path:
    """Refuse, before any work, an output that cannot be written: a directory path that is an existing file (or a
    file path that is a directory), or a path under a file. Returns the expanded path; creates nothing."""
    out = Path(os.path.expanduser(str(path)))
    if directory and out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {path}: is a file, not a directory; choose a directory")
    if not directory and out.is_dir():
        raise ValueError(f"{flag} {path}: is a directory; pass a file name")
    ancestor = next(p for p in (out if directory else out.parent, *out.parents) if p.exists())
    if not ancestor.is_dir():
        raise ValueError(f"{flag} {path}: {ancestor} is a file, not a directory; choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {ancestor} is not writable; choose another directory")
    return out


def write_text_atomic(path, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path, data) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub Markdown table; numbers right-aligned."""
    def cell(x):
        return f"{x:.4g}" if isinstance(x, float) else str(x)

    align = ["---:" if rows and isinstance(rows[0][i], (int, float)) else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def new_figure(figsize=(6, 4)):
    """(fig, ax) from matplotlib's file-only backend: plots are written on machines without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def save_figure(fig, path) -> Path:
    """Save a PNG through a temporary file and an atomic rename, then free the figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
