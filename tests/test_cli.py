"""`python -m longqlora`: every subcommand is listed and answers --help; bad input is one line."""

import subprocess
import sys

import pytest

from longqlora.cli import COMMANDS


def longqlora(*args):
    return subprocess.run([sys.executable, "-m", "longqlora", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_subcommand():
    done = longqlora("--help")
    assert done.returncode == 0
    for name in COMMANDS:
        assert name in done.stdout


def test_unknown_subcommand_exits_2():
    assert longqlora("nonsense").returncode == 2


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_subcommand_help(name):
    done = longqlora(name, "--help")
    assert done.returncode == 0, done.stderr
    assert "--model" in done.stdout or "--adapter" in done.stdout


def test_bad_flag_value_is_one_line():
    done = longqlora("passkey", "--model", "/nowhere", "--context_lengths", "32")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: --context_lengths")
