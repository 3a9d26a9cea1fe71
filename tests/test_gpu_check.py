"""bench/gpu_check.py --dry_run: the GPU script's every part runs on the CPU with tiny shapes and reports."""

import json


def test_dry_run_runs_every_part_and_writes_the_report(tmp_path, script):
    check = script("bench/gpu_check.py")
    out = tmp_path / "out"
    check.main(["--dry_run", "--output_dir", str(out), "--work_dir", str(tmp_path / "work")])
    record = json.loads((out / "report.json").read_text())
    assert {name: part["status"] for name, part in record["parts"].items()} == dict.fromkeys(check.PARTS, "ok")
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back
    parts = record["parts"]
    assert parts["recipe"]["result"]["steps"] == 2 and parts["recipe"]["result"]["loss"] > 0
    assert {p["variant"] for p in parts["bench"]["result"]["points"]} == {
        "ours",
        "baseline",
        "baseline_plus",
        "ours_full_attention",
    }
    assert all(p["peak_bytes"] > 0 and p["tokens_per_s"] > 0 for p in parts["bench"]["result"]["points"])
    assert parts["longest"]["result"]["longest_trained"] > 0
    errors = parts["planner"]["result"]["points"]
    assert len(errors) >= 4 and all(abs(e["error_pct"]) < 100 for e in errors)
    text = (out / "report.md").read_text()
    assert "bench/gpu_check.py --dry_run" in text and "## Planner error" in text and "packed rows" in text


def test_a_refused_recipe_is_recorded_and_the_other_parts_still_run(tmp_path, script, monkeypatch):
    """A recipe's one-line refusal ends it in SystemExit(2): the check records it as that part's failure and goes on
    (else the one GPU run would stop there, with no report)."""
    import longqlora.training.run as run

    def refuse(resolved):
        raise ValueError("--dataset x: simulated refusal on the GPU path")

    monkeypatch.setattr(run, "train", refuse)
    check = script("bench/gpu_check.py")
    out = tmp_path / "out"
    check.main(["--dry_run", "--parts", "recipe", "planner", "--output_dir", str(out), "--work_dir", str(tmp_path)])
    parts = json.loads((out / "report.json").read_text())["parts"]
    assert parts["recipe"]["status"] != "ok" and "status 2" in json.dumps(parts["recipe"])
    assert parts["planner"]["status"] == "ok"


def test_pinned_host_memory_is_rounded_up_per_layer(script):
    """torch's host allocator rounds each pinned block up to a power of two: 327,680 tokens of Llama-3.1-8B pin
    32 blocks of 4 GiB (2.5 GiB each, rounded), not 80 GiB."""
    check = script("bench/gpu_check.py")
    assert check.pinned_gib("llama-3.1-8b", 262144) == 64.0 and check.pinned_gib("llama-3.1-8b", 327680) == 128.0
