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
    done = longqlora("nonsense")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"error: unknown subcommand 'nonsense'; choose one of {', '.join(COMMANDS)}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_subcommand_help(name):
    done = longqlora(name, "--help")
    assert done.returncode == 0, done.stderr
    assert "--model" in done.stdout or "--adapter" in done.stdout
    assert done.stdout.startswith(f"usage: python -m longqlora {name} ")  # not `__main__.py`


def test_a_reader_that_stops_early_is_no_error():
    """`plan ... | head -c 1`: the closed pipe ends the command quietly with the shell's SIGPIPE code (it was
    `error: [Errno 32] Broken pipe`, exit 2, as if the input were wrong)."""
    for flags in (["plan", "--model", "llama-2-7b", "--context", "8192"], ["--help"]):  # the usage list too
        with subprocess.Popen(
            [sys.executable, "-m", "longqlora", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        ) as done:
            done.stdout.close()  # before the output is printed: its first write finds no reader
            err = done.stderr.read().decode()
        assert done.returncode == 141 and err == "", (flags, err)


def test_bad_flag_value_is_one_line():
    done = longqlora("passkey", "--model", "/nowhere", "--context_lengths", "32")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: --context_lengths")


def test_adapter_for_a_different_base_is_one_line(tmp_path, tiny_adapter):
    from longqlora.training.tiny import save_tiny_model

    adapter = tiny_adapter
    other = save_tiny_model(tmp_path / "other", shape="odd", max_position_embeddings=64)  # hidden 192, not 128
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    done = longqlora(
        "perplexity",
        "--model",
        str(other),
        "--adapter",
        str(adapter),
        "--data",
        str(tmp_path / "text.txt"),
        "--context_lengths",
        "32",
    )
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --model {other}: the adapter was trained on") and "hidden 128" in last


def test_a_broken_pipe_that_is_not_stdouts_is_an_error(capsys):
    """Only a reader of our output going away ends quietly (141): a worker's pipe breaking is not silenced."""
    from longqlora.cli import one_line_errors

    with pytest.raises(SystemExit) as ended, one_line_errors():
        raise BrokenPipeError(32, "Broken pipe")
    assert ended.value.code == 2 and capsys.readouterr().err.strip() == "error: [Errno 32] Broken pipe"


def test_a_stray_value_is_named_as_a_value(capsys):
    """`--context_lengths=64 128` leaves 128 to no flag: said as a stray value with the list syntax, not as the
    unknown flag "128"."""
    from longqlora.cli import main

    with pytest.raises(SystemExit) as ended:
        main(["perplexity", "--model", "x", "--context_lengths=64", "128"])
    err = capsys.readouterr().err.strip()
    assert ended.value.code == 2 and err.startswith("error: 128: a value no flag takes (a flag with several values")


def test_a_library_message_of_several_lines_is_joined_into_one():
    """transformers lists the choices below its first line ("... but found\n- Evaluation strategy: ..."): the error
    line keeps them (it stopped at "but found"), capped; an OSError names its file."""
    from longqlora.errors import MAX_LINE, one_line

    assert one_line(ValueError("needs the same strategy, but found\n- eval: no\n- save: steps")) == (
        "needs the same strategy, but found - eval: no - save: steps"
    )
    long = one_line(ValueError("x" * 200 + "\n" + "y" * 200))
    assert len(long) == MAX_LINE and long.endswith("...")
    assert one_line(ValueError("z" * 400)) == "z" * 400  # one line of ours is kept whole
    assert one_line(FileNotFoundError(2, "No such file or directory", "/a/b")) == "/a/b: No such file or directory"
