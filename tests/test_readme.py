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
    """The README's quickstart script, end to end, with --tiny so that it takes seconds; seeded, so a second run
    in a fresh directory measures the same numbers, and a rerun in the same directory reuses the base."""
    out = tmp_path / "qs"
    done = quickstart(out)
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {
        "base, no interpolation",
        "base + interpolation, untrained",
        "base in NF4, no interpolation",
        "extended, S2-Attn (ours)",
        "extended, full attention",
    }
    for row in results.values():
        assert all(v > 1 for k, v in row.items() if k.startswith("ppl@"))
    assert (out / "perplexity.png").stat().st_size > 1000
    assert "| model |" in (out / "report.md").read_text() and "| model |" in done.stdout
    quickstart(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "results.json").read_text())["results"] == results
    rerun = quickstart(out)
    assert "reusing the pre-trained base" in rerun.stderr


@pytest.mark.slow
def test_quickstart_with_the_context_mix_measures_retrieval_and_repeats(tmp_path):
    """--context_mix: a base pre-trained on copy rows then the mix, extended on the mix at 4L, and asked for
    passkeys at L, 2L, 4L and repeated passages at four distances; the plot shows both."""
    quickstart(tmp_path, "--context_mix", "true", "--copy_steps", "2")
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert len(results) == 5
    for row in results.values():
        assert set(row["passkey"]) == {"128", "256", "512"} and all(0 <= v <= 1 for v in row["passkey"].values())
        assert list(row["repeat"]) == ["first", "64", "112", "256", "496"] and min(row["repeat"].values()) > 1
    assert (tmp_path / "context.png").stat().st_size > 1000
    assert "passkey @512" in (tmp_path / "report.md").read_text()
