"""A model's files, read before any weights load: is a name a local path (else a hub id's cached snapshot), its
config.json (or a preset's), the headers of its safetensors, its tokenizer. Each problem is one line naming the flag
and the fix."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

logger = logging.getLogger(__name__)


def first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def is_local_path(name: str) -> bool:
    """A local path rather than a hub id (org/name): starts with / . ~ or ends with /, has no slash or more than one,
    or its first part exists. A bare name is a path (a typo is "no such directory", not a hub lookup)."""
    pathlike = name.startswith(("/", ".", "~")) or name.endswith("/") or name.count("/") != 1
    return pathlike or os.path.exists(name.split("/")[0])


def _why(err: Exception) -> str:
    """One line for a transformers loading error; a directory with its own Python code gets the flag it needs."""
    if "custom code" in str(err):
        return "it ships its own Python code, which is never run without --trust_remote_code true"
    return first_line(err)


HEADER_LIMIT = 100_000_000  # safetensors' own bound on the header's length


def _data_end(path: Path) -> int | None:
    """The byte where a safetensors file's data ends by its header (8 + header + data), or None when no header
    parses."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8).ljust(8, b"\xff"), "little")  # a file under 8 bytes: past the limit
        text = f.read(n) if n <= HEADER_LIMIT else b""
    try:
        ends = [t["data_offsets"][1] for k, t in json.loads(text).items() if k != "__metadata__"]
        return 8 + n + max(ends, default=0) if len(text) == n else None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):  # not JSON, or not a tensor table
        return None


def safetensors_problem(file) -> str:
    """Why the safetensors `file` cannot load ('' when it can): its header must parse and the file must hold exactly
    the bytes the header places (a copy or download cut short is shorter), and safetensors must open it. Reads the
    header only, so a damaged file is refused in one line before any weights load (checkpoints use it too)."""
    from safetensors import safe_open

    path = Path(file)
    expected, size = _data_end(path), path.stat().st_size
    if expected is None:
        return "its header does not parse: not a safetensors file, or cut short"
    if size != expected:
        return f"{size} bytes where its header places {expected}" + (": cut short" if size < expected else "")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as err:  # safetensors raises its own error types for a damaged header
        return first_line(err)
    return ""


def check_safetensors(name: str, flag: str, local: str | None = None, *, required: bool = True) -> None:
    """Weights load from safetensors only: refuse a local model or adapter directory (`local`, else `name`) that
    holds none when `required` (pickle .bin files could run code when loaded, so they are never read), or one
    whose .safetensors file is damaged (`safetensors_problem`)."""
    path = Path(os.path.expanduser(local or name))
    if not path.is_dir():
        return
    files = sorted(path.glob("*.safetensors"))
    if required and not files:
        raise ValueError(
            f"{flag} {name}: no .safetensors weights (pickle .bin files are never loaded); save the "
            "model with safe_serialization=True"
        )
    for file in files:
        problem = safetensors_problem(file)
        if problem:
            raise ValueError(f"{flag} {name}: {file.name} is damaged ({problem}); copy or download it again")


def check_config_json(flag: str, path: str) -> None:
    """One line when a local model directory's config.json is not JSON (transformers' own error names no flag)."""
    file = os.path.join(path, "config.json")
    try:
        json.loads(Path(file).read_bytes())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(
            f"{flag}: {file} is not valid JSON ({first_line(err)}); fix it or save the model again"
        ) from err


def not_a_directory(path, what: str = "a model directory") -> str:
    """Why `path`, which is not a directory, cannot be one: it is a file, or nothing."""
    return f"is a file, not {what}" if os.path.exists(path) else "no such directory"


def load_tokenizer(
    name: str, flag: str = "--tokenizer", fix: str = "pass a tokenizer or model directory, or a hub id", **kwargs
):
    """`AutoTokenizer.from_pretrained(name, **kwargs)`, or one ValueError line naming `flag` and the `fix`; a local
    path that does not exist is refused here rather than looked up on the hub."""
    name = str(name)  # Python callers pass Path objects
    path = os.path.expanduser(name)
    if is_local_path(name) and not os.path.isdir(path):
        raise ValueError(f"{flag} {name}: {not_a_directory(path)}; {fix}")
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"{flag} {name}: cannot load its tokenizer ({_why(err)}); {fix}") from err


def load_config(
    name: str, flag: str, *, revision: str | None = None, trust_remote_code: bool = False, prefer_preset: bool = False
):
    """The transformers config of model `name` (a directory or hub id), or one ValueError line naming `flag` and
    what to pass instead. With `prefer_preset`, a model the toolkit knows (presets.py) uses its built-in config."""
    from longqlora.presets import preset_config

    name = str(name)
    flag = f"{flag} {name}"
    path = os.path.expanduser(name)
    local = is_local_path(name)
    # a preset's name ("llama-2-7b", a bare name: local in form) unless a directory of that name is here
    preset = preset_config(name) if prefer_preset and not os.path.exists(path) else None
    if preset is not None:
        return preset
    if local and not os.path.isdir(path):
        raise ValueError(f"{flag}: {not_a_directory(path)}; pass a local model directory or a hub id")
    if local and not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{flag}: the directory has no config.json; pass a directory saved with save_pretrained")
    if local:
        check_config_json(flag, path)
    try:
        return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as err:
        if local:
            raise ValueError(f"{flag}: cannot read its config ({first_line(err)})") from err
        raise ValueError(
            f"{flag}: could not be found locally or on the hub (offline?); pass a local model directory"
        ) from err
    except ValueError as err:
        raise ValueError(f"{flag}: {_why(err)}") from err


# What from_pretrained reads of a hub model: configs, safetensors weights, tokenizer files (never pickle .bin)
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def local_model(name: str, flag: str) -> str:
    """A local directory for model `name`: the path itself, or for a hub id (org/name) its snapshot in the Hugging
    Face cache, fetched (HUB_FILES only) when it is not there yet. The recipes train from hub ids and PEFT records
    the id as the adapter's base, so evaluation, chat and merge resolve it once and then read local files only."""
    if is_local_path(name):  # a bare name is a path: no hub lookup of a typo
        return os.path.expanduser(name)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(name, local_files_only=True, allow_patterns=HUB_FILES)
    except LocalEntryNotFoundError:
        pass
    try:
        logger.info("%s %s: not in the Hugging Face cache; downloading %s", flag, name, ", ".join(HUB_FILES))
        return snapshot_download(name, allow_patterns=HUB_FILES)
    except (HfHubHTTPError, OSError, ValueError) as err:
        why = "offline or unreachable" if isinstance(err, LocalEntryNotFoundError) else type(err).__name__
        raise ValueError(
            f"{flag} {name}: not in the local Hugging Face cache and not fetched from the hub ({why}); run "
            f"`hf download {name}` where the hub is reachable, or pass a local model directory"
        ) from err
