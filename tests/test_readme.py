"""The README's two commands are the ones CI runs and the ones that work: install + quickstart, install + tests."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL = "pip install torch==2.13.0 && pip install -r requirements.txt && pip install -e ."


def readme_commands():
    """The commands in the README's first bash block (comments dropped)."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_has_the_two_commands():
    quickstart, tests = readme_commands()
    assert quickstart == f"{INSTALL} && python recipes/quickstart.py"
    assert tests == INSTALL.replace("-e .", '-e ".[test]"') + " && python -m pytest -q tests"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci
    assert "python -m pytest -q tests -m slow" in ci  # the default run leaves the slow tests out; CI runs them too


def quickstart(out, *flags):
    done = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "quickstart.py"), "--tiny", "--output_dir", str(out), *flags],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_quickstart_command_runs_and_repeats(tmp_path):
    """The README's quickstart script, end to end, with --tiny so that it takes seconds: a base pre-trained on copy
    rows then the context mix, extended with PI and with YaRN, each by S2-Attn and by full attention, asked for
    passkeys at L, 2L, 4L and repeated passages at four distances. Seeded, so a second run in a fresh directory
    measures the same numbers, and a rerun in the same directory reuses the base."""
    out = tmp_path / "qs"
    done = quickstart(out)
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {
        "base, no interpolation",
        "base + interpolation, untrained",
        "base + YaRN, untrained",
        "base in NF4, no interpolation",
        "extended, S2-Attn (ours)",
        "extended, full attention",
        "extended with YaRN, S2-Attn (ours)",
        "extended with YaRN, full attention",
    }
    for row in results.values():
        assert all(v > 1 for k, v in row.items() if k.startswith("ppl@"))
        assert set(row["passkey"]) == {"128", "256", "512"} and all(0 <= v <= 1 for v in row["passkey"].values())
        assert list(row["repeat"]) == ["first", "64", "112", "256", "496"] and min(row["repeat"].values()) > 1
    assert (out / "context.png").stat().st_size > 1000
    assert "passkey @512" in (out / "report.md").read_text() and "| model |" in done.stdout
    assert f"`python recipes/quickstart.py --tiny --output_dir {out}` reproduces it." in done.stdout
    adapters = {p.name: json.loads((p / "longqlora_extension.json").read_text()) for p in out.glob("extended-*")}
    assert {name: record["rope_type"] for name, record in adapters.items()} == {
        "extended-s2": "linear",
        "extended-full": "linear",
        "extended-s2-yarn": "yarn",
        "extended-full-yarn": "yarn",
    }
    quickstart(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "results.json").read_text())["results"] == results
    rerun = quickstart(out)
    assert "reusing the pre-trained base" in rerun.stderr


@pytest.mark.slow
def test_quickstart_on_the_books_alone_plots_perplexity_by_position(tmp_path):
    """--context_mix false: the base pre-trained on the five novels only, PI only, perplexity by position."""
    quickstart(tmp_path, "--context_mix", "false", "--copy_steps", "0", "--rope_scalings", "linear")
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert len(results) == 5 and "base + YaRN, untrained" not in results
    assert all("passkey" not in row and len(row["by_position"]) == 8 for row in results.values())
    assert (tmp_path / "perplexity.png").stat().st_size > 1000
