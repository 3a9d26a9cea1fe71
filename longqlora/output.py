"""What the toolkit writes: atomic files and directories (a killed run never leaves half of one), Markdown tables
and figures."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
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


def _plain_mode(is_dir: bool) -> int:
    """The mode the umask gives a new file or folder (mkstemp/mkdtemp make 0600/0700; results are for others too)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if is_dir else 0o666) & ~umask


def _sync(path: Path) -> None:
    """fsync one file or folder: a rename is durable only once the renamed data and the folder entry are on disk
    (writers such as safetensors and matplotlib do not sync). Folders that cannot be opened for it are skipped."""
    try:  # a file opened for writing (Windows syncs nothing through a read-only handle); a folder read-only
        fd = os.open(path, os.O_RDONLY if path.is_dir() else os.O_RDWR)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        if not path.is_symlink():
            _sync(path)


@contextlib.contextmanager
def atomic_file(path):
    """Yield a temporary path beside `path` to write; when the block ends without an error it becomes `path` by one
    rename (the umask's mode); on an error it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _plain_mode(False))
        _sync(Path(tmp))
        os.replace(tmp, path)
        _sync(path.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text_atomic(path, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder, synced, and an atomic rename."""
    with atomic_file(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def _owner_alive(path: Path) -> bool:
    """Whether the process that made a temporary folder `.<...>-<pid>-<random>` still runs."""
    try:
        pid = int(path.name.rsplit("-", 2)[-2])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return pid != os.getpid()  # a folder of this very process is never a live writer's: it is one we left


def _readable_modes(root: Path) -> None:
    """Give the new tree the umask's modes; symlinks are left as they are (their targets lie outside)."""
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, _plain_mode(path.is_dir()))


@contextlib.contextmanager
def atomic_directory(out, *, into: bool = False, last: tuple[str, ...] = ()):
    """Yield an empty temporary folder to fill; when the block ends without an error its contents become `out`.

    into=False: the folder is a sibling of `out` and replaces it by one rename (an existing `out` is moved aside
    first and removed after; a kill between those two renames is repaired by the next call, which puts the old
    output back). into=True: the folder lies inside `out` (which keeps its other files, e.g. checkpoints) and
    each entry is moved in, the names in `last` after the others and removed from `out` before the first move, so
    that a reader keyed on them never sees a half-moved set. On an error or a kill the temporary folder is all
    that is left; a later call removes it once the process that made it has ended.
    """
    out = Path(os.path.expanduser(str(out)))
    parent = out if into else out.parent
    parent.mkdir(parents=True, exist_ok=True)
    prefix = ".partial-" if into else f".{out.name}.partial-"
    aside_prefix = f".{out.name}.old-"
    for stale in parent.glob(f"{prefix}*"):  # left by a killed writer of the same output
        if not _owner_alive(stale):
            shutil.rmtree(stale, ignore_errors=True)
    if not into:
        for old in parent.glob(f"{aside_prefix}*"):
            if not out.exists() and (old / out.name).exists():  # killed between the two renames below
                os.replace(old / out.name, out)
            if not _owner_alive(old):
                shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
    try:
        yield tmp
        _readable_modes(tmp)
        _sync_tree(tmp)
        if into:
            names = sorted((p.name for p in tmp.iterdir()), key=lambda n: (n in last, n))
            for name in last:
                (out / name).unlink(missing_ok=True)
            for name in names:
                if (out / name).is_dir() and not (out / name).is_symlink():
                    shutil.rmtree(out / name)
                os.replace(tmp / name, out / name)
        else:
            aside = None
            if out.exists():
                aside = Path(tempfile.mkdtemp(prefix=f"{aside_prefix}{os.getpid()}-", dir=parent))
                os.replace(out, aside / out.name)
            os.replace(tmp, out)
            _sync(parent)  # the new output's entry on disk before the old one is deleted
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
        if into:
            _sync(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")  # the temporary name has no .png to go by
    finally:
        plt.close(fig)
    return path


def check_output_dir(output_dir, overwrite: bool = False) -> Path:
    """Fail early, before any work, if `output_dir` exists and may not be replaced, or cannot be written."""
    out = check_output_path(output_dir, "--output_dir")
    if out.exists() and not overwrite:
        raise ValueError(f"--output_dir {out}: already exists; pass --overwrite or another directory")
    return out


def save_dataset_atomic(ds, output_dir, files: dict | None = None, overwrite: bool = False):
    """data_prep's output: a datasets.Dataset's `save_to_disk` into a temporary sibling directory, add `files`
    ({name: JSON data}), then rename it into place, so a killed run never leaves a half-written dataset."""
    out = check_output_dir(output_dir, overwrite)
    with atomic_directory(out) as tmp:
        ds.save_to_disk(str(tmp))
        for name, data in (files or {}).items():
            write_json_atomic(tmp / name, data)
    return out
