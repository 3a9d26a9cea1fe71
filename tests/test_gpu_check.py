"""bench/gpu_check.py --dry_run: the GPU script's every part runs on the CPU with tiny shapes and reports."""

import ast
import json

import pytest
import torch
from conftest import ROOT


@pytest.mark.slow  # about 20 s: every part of the GPU script on tiny shapes (CI runs the slow tier)
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
    if not torch.cuda.is_available():  # every test marked gpu ran and skipped, and nothing else ran
        assert "skipped" in parts["tests"]["result"]["summary"] and "passed" not in parts["tests"]["result"]["summary"]
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


def test_the_host_pins_whole_rounded_blocks(script):
    """torch's host allocator rounds each pinned block up to a power of two: with 62.5 GiB for pinning, Llama-3.1-8B
    offloads every layer's 1 GiB block at 131,072 tokens, 31 of its 2 GiB blocks at 262,144, and 15 of its 4 GiB
    blocks at 327,680 (2.5 GiB each, rounded)."""
    longest = script("bench/gpu_check.py").longest
    assert [longest.offload_split("llama-3.1-8b", n, 62.5) for n in (131072, 262144, 327680)] == [32, 31, 15]
    assert longest.offload_split("llama-3.1-8b", 327680, None) == 32


@pytest.mark.parametrize("limit", [300_000, 120_000])
def test_the_longest_search_offloads_what_the_host_can_pin_and_fits_the_budget(script, monkeypatch, tmp_path, limit):
    """The search as it runs on a GPU, with a fake one (139.8 GiB, 125 GiB of RAM) that trains up to `limit`
    tokens: every layer's checkpoint offloaded while half the RAM holds them (131,072 tokens at Llama-3.1-8B), beyond
    only the first layers' (--offload_layers), the rest on the GPU; it brackets the limit to one step, and a short
    budget shrinks its first trial."""
    import types

    import psutil
    import torch

    check = script("bench/gpu_check.py")
    longest = check.longest
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=139.8 * gib))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(total=125 * gib))
    tried = []

    def point(name, variant, n, bench, ctx):
        tried.append((variant, n, bench.offload_layers))
        if n > limit:
            return {"model": name, "variant": variant, "context": n, "error": "out of memory", "seconds": 5.0}
        return {"model": name, "variant": variant, "context": n, "peak_bytes": 1, "planned_bytes": 1, "seconds": 60.0}

    monkeypatch.setattr(longest, "measure_point", point)
    cfg = check.CheckConfig(output_dir=str(tmp_path), longest_trials=8)
    ctx = {"device": torch.device("cuda"), "dtype": torch.bfloat16, "left": lambda: 500.0, "results": {}}
    result = longest.part_longest(cfg, ctx)
    assert {v for v, _, _ in tried} == {"ours_lora"}
    assert all((split is None) == (n <= 131072) for _, n, split in tried)
    assert all(split == longest.offload_split("llama-3.1-8b", n, 62.5) < 32 for _, n, split in tried if split)
    assert any(split for *_, split in tried) or limit < 131072
    assert result["longest_trained"] <= limit < result["first_failure"]
    assert result["first_failure"] - result["longest_trained"] == 16384
    assert result["longest_variant"] == "ours_lora"
    tried.clear()
    short = longest.part_longest(cfg, {**ctx, "left": lambda: 120.0})
    assert tried and tried[0][1] < short["planned_longest"]  # the first trial shrank to what 100 s hold
    assert longest._trial_s(tried[0][1], longest._seconds_per_token(ctx)) <= 100


@pytest.mark.parametrize(
    "error, kind",
    [
        (RuntimeError("CUDA error: out of memory (pinned host allocation)"), "host memory: "),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), "failed: RuntimeError: "),
        (ValueError("bad shape"), "failed: ValueError: "),
    ],
)
def test_a_broken_point_is_recorded_and_told_from_a_memory_limit(script, monkeypatch, error, kind):
    """One point's failure is a finding, kept with its traceback, and never taken for a memory limit (an illegal
    memory access would leave a broken CUDA context behind a search that carries on)."""
    import torch

    longest = script("bench/gpu_check.py").longest

    def measure(*a):
        raise error

    monkeypatch.setattr(longest.memory_bench, "measure", measure)
    ctx = {"device": torch.device("cpu"), "dtype": torch.float32}
    point = longest.measure_point("tiny", "ours", 256, None, ctx)
    assert point["error"].startswith(kind) and ("traceback" in point) == kind.startswith("failed")


def _skips_without_cuda(node) -> bool:
    """`pytest.mark.skipif(not torch.cuda.is_available(), ...)`, or an `if not torch.cuda.is_available():` around
    a `pytest.skip`."""
    if isinstance(node, ast.If):
        skips = any("pytest.skip(" in ast.unparse(n) for n in node.body)
        return skips and ast.unparse(node.test).replace(" ", "") == "nottorch.cuda.is_available()"
    return (
        isinstance(node, ast.Call)
        and ast.unparse(node.func) == "pytest.mark.skipif"
        and ast.unparse(node.args[0]).replace(" ", "") == "nottorch.cuda.is_available()"
    )


def test_the_check_runs_every_cuda_only_test(script):
    """Every test that skips without CUDA is marked `gpu`, which the check selects (`-m gpu` over the modules that
    have one), and every test marked `gpu` skips without CUDA (the CPU suite runs it otherwise)."""
    command = script("bench/gpu_check.py").gpu_tests_command()
    assert command[3:7] == ["-q", "-rs", "-m", "gpu"]
    marked, unmarked, unskipped = [], [], []
    for path in sorted((ROOT / "tests").glob("*.py")):
        tree = ast.parse(path.read_text())
        names = {  # module-level skip marks (test_attention.py's CUDA)
            t.id for n in tree.body if isinstance(n, ast.Assign) and _skips_without_cuda(n.value) for t in n.targets
        }
        for test in ast.walk(tree):
            if not (isinstance(test, ast.FunctionDef) and test.name.startswith("test_")):
                continue
            where = f"{path.name}::{test.name}"
            skips = any(_skips_without_cuda(n) for n in ast.walk(test)) or any(
                ast.unparse(d) in names for d in test.decorator_list
            )
            gpu = "pytest.mark.gpu" in map(ast.unparse, test.decorator_list)
            (marked if gpu else unmarked if skips else []).append(where)
            if gpu and not skips:
                unskipped.append(where)
    assert not unmarked and not unskipped, (unmarked, unskipped)
    assert sorted(command[7:]) == sorted({f"tests/{m.split('::')[0]}" for m in marked})
    assert "test_pose.py::test_gpu_kernels_on_pose_rows_match_the_cpu_path" in marked and len(marked) >= 5, marked
