"""`--config my.yaml`: the recipes' YAML file of flag defaults, read and checked before any default changes.

TRL's `TrlParser` reads the file with `yaml.safe_load` and sets each value as a parser default as it is: argparse
converts only string defaults, so `lora_r: 8.5`, `lora_r: null` or `max_steps: true` reach the dataclasses
unconverted and fail later with a TypeError, and a missing file or bad YAML is a traceback. Here each value goes
through its flag's own argparse conversion (the same `type` and `choices` as on the command line) and the
converted values go to TrlParser's `set_defaults_with_config`; every problem is one line naming the file, the
key and the fix. Command-line flags still override the file.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import types
import typing
from pathlib import Path


def parse_with_config(parser, argv: list[str] | None):
    """`parser.parse_args_and_config` (a TrlParser) with a checked --config file; returns the dataclasses."""
    import sys

    parser.epilog = (  # the flag is read here, not by the parser: --help names it all the same
        "--config FILE.yaml: flag defaults from a YAML file, keys named as the flags; a flag given here wins"
    )
    args = [
        part
        for arg in (sys.argv[1:] if argv is None else argv)
        for part in (["--config", arg.removeprefix("--config=")] if arg.startswith("--config=") else [arg])
    ]
    if "--config" not in args:
        return parse_flags(parser, args)
    if args.count("--config") > 1:
        raise ValueError("--config: given twice; pass one YAML file (a flag given on the command line wins over it)")
    i = args.index("--config")
    if i + 1 >= len(args) or args[i + 1].startswith("--"):
        raise ValueError("--config: pass a YAML file, e.g. --config my.yaml")
    path = args[i + 1]
    del args[i : i + 2]
    config = read_config(path)
    for key, value in config.pop("env", {}).items():  # TrlParser's `env:` section
        os.environ[key] = str(value)
        if key == "OMP_NUM_THREADS" and str(value).isdigit() and int(value) > 0:
            import torch  # read its thread count at import, before this file: set as the variable would have

            torch.set_num_threads(int(value))
    parser.set_defaults_with_config(**checked_values(parser, config, path))
    try:
        return parse_flags(parser, args)
    except ValueError as err:  # a dataclass refusing a value: say so when the value came from the file
        if any(str(err).startswith((f"--{k} ", f"--{k}:")) and f"--{k}" not in args for k in config):
            raise ValueError(f"--config {path}: {err}") from None
        raise


def parse_flags(parser, args: list[str]):
    """The dataclasses from `args` (an HfArgumentParser's; every entry point parses here), flags spelled out in full
    (argparse would take `--max_step` for --max_steps); an unknown flag is one line with the nearest known one (not
    HfArgumentParser's list of leftovers, nor argparse's "required: --context" when the typo was --contxt), and
    argparse's own errors are one line too, without its usage of every flag before them."""
    parser.allow_abbrev = False
    parser.error = _argparse_error
    known = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    for arg in args:  # a flag-shaped word argparse would not take as a value either
        if arg.startswith("--") and arg != "--" and " " not in arg and arg.split("=", 1)[0] not in known:
            _unknown(arg.split("=", 1)[0], known)
    *parsed, left = parser.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
    if left:  # what argparse did not take, as it decided: a value like "--a b" is no flag
        flag = next((x.split("=", 1)[0] for x in left if x.startswith("--")), None)
        if flag is None:  # a word after a flag that took one value: `--x=1 2` for a list flag
            raise ValueError(
                f"{left[0]}: a value no flag takes (a flag with several values takes them after a space: "
                "--context_lengths 64 128, not --context_lengths=64 128)"
            )
        _unknown(flag, known)
    return tuple(parsed)


# Flags of older transformers and TRL releases that tutorials still use: what replaced them (a spelling match would
# suggest an unrelated flag, --min_length for --group_by_length)
RETIRED = {
    "evaluation_strategy": "--eval_strategy replaced it",
    "max_seq_length": "TRL's --max_length replaced it, and a recipe sets that from --target_context",
    "group_by_length": "transformers 5 removed it; a recipe's packed rows are all --target_context tokens",
    "per_gpu_train_batch_size": "--per_device_train_batch_size replaced it",
    "no_cuda": "--use_cpu replaced it",
}


def _refuse_retired(flag: str) -> None:
    """One line for a flag (or --config key) of an older release: what replaced it."""
    bare = flag.lstrip("-").replace("-", "_")
    if bare in RETIRED:
        raise ValueError(f"{flag}: not a flag of this command ({RETIRED[bare]})")


def _unknown(flag: str, known: list[str]):
    _refuse_retired(flag)
    near = nearest(flag, known)
    raise ValueError(f"{flag}: not a flag of this command" + (f"; did you mean {near}?" if near else ""))


def nearest(name: str, known: list[str]) -> str | None:
    """The known flag a typo most likely meant: one that begins the other (lora_rank and lora_r, --dtyp and
    --dtype), the closest in length, else difflib's closest spelling (which takes lora_rank for local_rank)."""
    bare = name.lstrip("-")
    related = [
        k
        for k in known
        if min(len(bare), len(k.lstrip("-"))) >= 3
        and (k.lstrip("-").startswith(bare) or bare.startswith(k.lstrip("-")))
    ]
    if related:
        return min(related, key=lambda k: abs(len(k) - len(name)))
    near = difflib.get_close_matches(name, known, n=1)
    return near[0] if near else None


def _argparse_error(message: str):
    raise ValueError(f"{message} (--help lists the flags)")


def read_config(path: str) -> dict:
    """The YAML mapping in `path`, or one ValueError line saying what is wrong with the file."""
    import yaml

    from longqlora.data.sources import read_text

    file = Path(os.path.expanduser(path))
    flag = f"--config {path}"
    if not file.exists():
        raise ValueError(f"{flag}: no such file; pass a YAML file of flag: value lines")
    if not file.is_file():
        raise ValueError(f"{flag}: is a directory, not a file; pass a YAML file")
    text = read_text(flag, str(file))
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{flag}{where}: not valid YAML ({problem})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ValueError(f"{flag}: must be a mapping of flag: value lines, found a {type(config).__name__}")
    env = config.get("env", {})
    if not isinstance(env, dict):
        raise ValueError(f"{flag}: env must be a mapping of NAME: value")
    for name, value in env.items():  # os.environ takes strings: a list or a date would be set as its repr
        if not isinstance(name, str) or not name or "=" in name:
            raise ValueError(f"{flag}: env: {name!r} is not a variable name; e.g. OMP_NUM_THREADS: 4")
        if not isinstance(value, str | int | float | bool):
            raise ValueError(f'{flag}: env: {name}: {value!r} is not a string or a number; e.g. {name}: "1"')
    return config


def _hints(parser) -> dict:
    hints = {}
    for dtype in getattr(parser, "dataclass_types", ()):
        try:
            hints.update(typing.get_type_hints(dtype))
        except Exception:  # an unresolvable annotation: that dataclass's values are checked by argparse alone
            continue
    return hints


def _admits(hint, kind) -> bool:
    """Whether the annotation `hint` admits values of `kind` (NoneType, dict, list)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = typing.get_args(hint) if union else (hint,)
    return any(o is kind or typing.get_origin(o) is kind for o in options)


def _convert(action, value, key: str):
    help_text = action.help or ""
    if isinstance(value, list) and "comma list" in help_text and all(isinstance(v, str | int | float) for v in value):
        value = ",".join(map(str, value))  # [q_proj, v_proj] for the flag's q_proj,v_proj
    if isinstance(value, (dict, list)):
        raise ValueError(f"{key}: {value!r} is a {type(value).__name__}; give one value")
    if isinstance(value, bool) and (action.type is str or action.choices is not None):  # YAML 1.1: on/off/yes/no
        if re.search(r"\bon\b", help_text) and re.search(r"\boff\b", help_text):
            value = "on" if value else "off"
        else:
            raise ValueError(f"{key}: YAML read the word as {str(value).lower()}; quote it, e.g. {key}: 'no'")
    if action.type is None:
        return value
    try:
        converted = action.type(value if isinstance(value, str) else str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        name = getattr(action.type, "__name__", "value")
        kind = {"int": "an integer", "float": "a number", "string_to_bool": "true or false"}.get(name, f"a {name}")
        raise ValueError(f"{key}: {value!r} is not {kind}") from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"{key}: {value!r} must be one of {', '.join(map(str, action.choices))}")
    return converted


def checked_values(parser, config: dict, path: str) -> dict:
    """The config's values converted as their flags would be; ValueError naming file and key on the first bad one."""
    actions = {}
    for action in parser._actions:  # argparse keeps no public index of its actions
        if action.dest not in actions or f"--{action.dest}" in action.option_strings:
            actions[action.dest] = action
    hints = _hints(parser)
    values = {}
    for key, value in config.items():
        try:
            action = actions.get(key)
            if action is None and isinstance(value, dict):
                raise ValueError(f"{key}: not a flag; the keys are the flags themselves, with no sections but env:")
            if action is None:
                _refuse_retired(key)
                near = nearest(key, list(actions))
                hint = f"did you mean {near}?" if near else "--help lists them"
                raise ValueError(f"{key}: not a flag of this command ({hint})")
            hint = hints.get(key)
            if value is None:
                if hint is not None and not _admits(hint, type(None)):
                    raise ValueError(f"{key}: null; give a value, or leave the key out for the default")
                values[key] = None
            elif isinstance(value, dict) and hint is not None and _admits(hint, dict):
                values[key] = value
            elif action.nargs in ("+", "*"):
                values[key] = [_convert(action, v, key) for v in (value if isinstance(value, list) else [value])]
            elif isinstance(value, list) and hint is not None and _admits(hint, list):
                values[key] = [str(v) for v in value]
            else:
                values[key] = _convert(action, value, key)
        except ValueError as err:
            raise ValueError(f"--config {path}: {err}") from None
    return values
