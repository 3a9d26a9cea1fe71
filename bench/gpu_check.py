"""GPU first contact: everything the toolkit has never run on a GPU, measured by one script in at most 9 minutes.

    python bench/gpu_check.py --output_dir $OUT/gpu            # on one GPU (docs/gpu.md: the device command)
    python bench/gpu_check.py --dry_run --output_dir /tmp/gc   # this CPU, tiny shapes, under a minute (tested)

Parts, each with a time estimate; a part that would overrun the budget is skipped and says so, and a part that fails
is recorded (its error and traceback) without stopping the others:
1. tests: every CUDA-only test of tests/, selected by its `gpu` marker (every S2 backend against the explicit-mask
   reference, bf16 and fp16; auto against sdpa; the varlen kernels on PoSE rows; every memory switch at once against
   the plain path);
2. speed: the S2-Attn op against full causal SDPA at 8k, 16k and 32k, plain and packed rows (fwd, fwd+bwd);
3. recipe: recipes/extend_7b_8k.py itself on a random-initialised Llama-2-7B shape at 8k, 3 steps (peak
   allocated and reserved, tokens/s);
4. bench: bench/memory.py's points for Llama-2-7B at 8k, ours and plain QLoRA (with and without LoRA+);
5. longest: the longest context ours trains Llama-3.1-8B at, plain LoRA, a few trials around the planner's answer;
6. planner: the planner's error at every point measured above.
It writes report.md and report.json (and the tests' log) into --output_dir.
"""

from __future__ import annotations

import json
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: a GPU machine reaches no hub
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check_longest as longest  # noqa: E402  (bench/gpu_check_longest.py)
import memory as memory_bench  # noqa: E402  (bench/memory.py)
import s2_speed  # noqa: E402  (bench/s2_speed.py)
from gpu_check_report import render  # noqa: E402  (bench/gpu_check_report.py)

from longqlora.cli import one_line_errors, setup_logging  # noqa: E402
from longqlora.output import write_json_atomic, write_text_atomic  # noqa: E402
from longqlora.presets import preset_or_local_config  # noqa: E402
from longqlora.training import plan as planner  # noqa: E402

logger = logging.getLogger("bench.gpu_check")


@dataclass
class CheckConfig:
    output_dir: str = field(metadata={"help": "Where report.md, report.json and the logs go (at most 8 files)."})
    dry_run: bool = field(default=False, metadata={"help": "Tiny shapes on this CPU: the same parts, seconds."})
    budget_s: float = field(default=540, metadata={"help": "Wall-time budget; parts that would overrun are skipped."})
    parts: list[str] = field(
        default_factory=lambda: ["tests", "speed", "bench", "recipe", "longest", "planner"],
        metadata={"help": "Which parts run, in this order."},
    )
    longest_trials: int = field(default=4, metadata={"help": "Training steps tried by the longest-context search."})
    work_dir: str | None = field(
        default=None,
        metadata={"help": "Scratch space for the random model and the recipe's output (default: the system temp dir)."},
    )

    def __post_init__(self):
        bad = [p for p in self.parts if p not in PARTS]
        if bad:
            raise ValueError(f"--parts {' '.join(bad)}: use {', '.join(PARTS)}")


# ------------------------------------------------------------------------------------------------- the parts
def part_tests(cfg, ctx):
    """Every CUDA-only test of tests/ (marked `gpu`: pyproject.toml), in a subprocess; their log is kept."""
    log = Path(cfg.output_dir) / "gpu_tests.log"
    cmd = gpu_tests_command()
    limit = max(5.0, min(ctx["left"](), TESTS_LIMIT_S))  # its own limit: a hung kernel must not take the budget
    try:
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as err:  # keep what the tests printed before the limit
        text = "".join(x.decode() if isinstance(x, bytes) else x for x in (err.stdout or "", err.stderr or ""))
        log.write_text(text)
        return {"command": " ".join(cmd[1:]), "returncode": None, "summary": f"timed out after {limit:.0f} s"}
    log.write_text(run.stdout + run.stderr)
    last = (run.stdout.strip().splitlines() or ["(no output)"])[-1]
    return {"command": " ".join(cmd[1:]), "returncode": run.returncode, "summary": last}


TESTS_LIMIT_S = 150
GPU_MARK = re.compile(r"^\s*(@pytest\.mark\.gpu\b|pytestmark\b.*\bpytest\.mark\.gpu\b)", re.M)  # a test's, a module's


def gpu_tests_command() -> list[str]:
    """pytest on every test marked `gpu` (pyproject.toml; `-m gpu` replaces its default `-m "not slow"`), collected
    from the modules that have one (collecting all of tests/ takes 10 s more of the dry run)."""
    files = [p for p in sorted((ROOT / "tests").glob("test_*.py")) if GPU_MARK.search(p.read_text())]
    return [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", *(p.relative_to(ROOT).as_posix() for p in files)]


def part_speed(cfg, ctx):
    lengths, heads, dtype = (
        ([256, 512], 4, torch.float32) if cfg.dry_run else ([8192, 16384, 32768], 32, torch.bfloat16)
    )
    out = {}
    for packed in (False, True):
        out["packed" if packed else "plain"] = s2_speed.measure(
            lengths, heads=heads, device=ctx["device"], dtype=dtype, repeats=1 if cfg.dry_run else 3, packed=packed
        )
    return out


def part_recipe(cfg, ctx):
    """The recipe itself (SFTTrainer, packing, the group schedule, paged AdamW where CUDA is): --tiny on a CPU, a
    random Llama-2-7B shape saved to local disk on a GPU."""
    from longqlora.cli import run_recipe

    recipe = _load_recipe("extend_7b_8k")
    work = Path(cfg.work_dir or tempfile.gettempdir()) / "longqlora-gpu-check"
    argv = [
        "--output_dir",
        str(work / "recipe"),
        "--max_steps",
        "3",
        "--save_steps",
        "1000",
        "--gradient_accumulation_steps",
        "1",
    ]
    if cfg.dry_run:
        argv += ["--tiny", "--max_steps", "2"]
    else:
        base = _random_model("llama-2-7b", work / "llama-2-7b-random")
        from longqlora.data import corpora

        argv += ["--model_name_or_path", str(base), "--dataset", corpora.book_path("austen_emma"), "--min_length", "0"]
    start = time.perf_counter()
    try:
        adapter = run_recipe(recipe.Model, recipe.Data, recipe.Training, argv)
        record = json.loads((Path(adapter) / "longqlora_extension.json").read_text())
    except SystemExit as err:  # a refusal ends a recipe in SystemExit(2): record it as this part's failure
        raise RuntimeError(f"the recipe exited with status {err.code} (its last line is in the log above)") from None
    finally:
        if not cfg.dry_run:  # the 13.5 GB random model: the temp dir may be host memory the next part pins
            shutil.rmtree(work, ignore_errors=True)
    train = record["train"]
    plan = record.get("memory_plan", {})
    return {
        "argv": argv,
        "wall_s": time.perf_counter() - start,
        "steps": train["steps"],
        "loss": train["mean_loss"],
        "tokens_per_s": train["tokens"] / max(train["seconds"] or 1e-9, 1e-9),
        "peak_allocated_gib": train.get("peak_allocated_gib"),
        "peak_reserved_gib": train.get("peak_reserved_gib"),
        "planned_gib": plan.get("peak_allocated_gib"),
        "attention": record.get("s2_options"),
    }


def part_bench(cfg, ctx):
    name, contexts = ("tiny", [512]) if cfg.dry_run else ("llama-2-7b", [8192])
    bench = memory_bench.BenchConfig(
        models=[name],
        contexts=contexts,
        steps=2 if cfg.dry_run else 3,
        variants=["ours", "baseline", "baseline_plus", "ours_full_attention"],
        search_longest=False,
        tiny=cfg.dry_run,
    )  # the last: S2's step time at 8k
    points = []
    for context in bench.contexts:
        for variant in bench.variants:
            if ctx["left"]() < (5 if cfg.dry_run else 60):
                points.append({"model": name, "variant": variant, "context": context, "error": "skipped: budget"})
                continue
            points.append(longest.measure_point(name, variant, context, bench, ctx))
    return {"points": points}


def part_planner(cfg, ctx):
    rows = []
    for part in ("bench", "longest"):
        result = ctx["results"].get(part, {}).get("result") or {}
        for p in result.get("points", []) + result.get("trials", []):
            if "error" not in p:
                rows.append(
                    _error_row(
                        part,
                        p["variant"],
                        p["context"],
                        p["peak_bytes"] / planner.GIB,
                        p["planned_bytes"] / planner.GIB,
                    )
                )
    recipe = ctx["results"].get("recipe", {}).get("result") or {}
    if recipe.get("peak_allocated_gib") and recipe.get("planned_gib"):
        rows.append(_error_row("recipe", "recipe", 8192, recipe["peak_allocated_gib"], recipe["planned_gib"]))
    return {"points": rows}


def _error_row(source, variant, context, measured_gib, planned_gib) -> dict:
    return {
        "source": source,
        "variant": variant,
        "context": context,
        "measured_gib": measured_gib,
        "planned_gib": planned_gib,
        "error_pct": 100 * (planned_gib - measured_gib) / measured_gib,
    }


# (function, estimated seconds on a GPU, on a CPU dry run)
PARTS = {
    "tests": (part_tests, 60, 20),
    "speed": (part_speed, 45, 5),
    "recipe": (part_recipe, 150, 15),
    "bench": (part_bench, 120, 10),
    "longest": (longest.part_longest, 150, 10),
    "planner": (part_planner, 1, 1),
}


# --------------------------------------------------------------------------------------------------- helpers
def _load_recipe(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the Trainer pickles the recipe's TrainingConfig into checkpoints
    spec.loader.exec_module(module)
    return module


def _random_model(preset: str, path: Path) -> Path:
    """A random-initialised model of a preset's shape, in bf16 safetensors, with a small BPE tokenizer trained on
    bundled text (its ids cover part of the vocabulary; shapes and memory are the preset's)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from longqlora.data import corpora
    from longqlora.training.tiny import train_tokenizer

    if (path / "config.json").exists():
        return path
    config = preset_or_local_config(preset)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cuda")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config).to("cuda")
    model.save_pretrained(path)  # transformers 5 writes safetensors only
    del model
    torch.cuda.empty_cache()
    tokenizer = train_tokenizer([corpora.book("austen_emma")[:300_000]], vocab_size=4096)
    tokenizer.save_pretrained(path)
    return path


def environment(device) -> dict:
    from longqlora import hardware

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU {platform.machine()}",
        "capability": hardware.cuda_capability(),
        "auto_kernels": hardware.auto_kernels(device),
        "flash_attn": hardware.flash_attn_module() is not None,
        "xformers": hardware.xformers_ops() is not None,
        "torch_varlen": hardware.torch_varlen() is not None,
    }
    for name in (
        "transformers",
        "peft",
        "trl",
        "bitsandbytes",
        "accelerate",
        "datasets",
        "huggingface_hub",
        "tokenizers",
        "pyarrow",
        "fsspec",
        "regex",
    ):
        try:
            env[name] = __import__(name).__version__
        except Exception as err:  # a missing or broken package is a finding, not a crash
            env[name] = f"unavailable ({type(err).__name__})"
    return env


def run(cfg: CheckConfig, argv: list[str]) -> dict:
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.dry_run else "cpu")
    if device.type == "cpu" and not cfg.dry_run:
        raise ValueError("bench/gpu_check.py: no CUDA GPU here; pass --dry_run for the CPU rehearsal")
    from longqlora.hardware import supports_bf16

    dtype = torch.float32 if cfg.dry_run else (torch.bfloat16 if supports_bf16() else torch.float16)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    left = lambda: cfg.budget_s - (time.perf_counter() - start)  # noqa: E731
    record = {
        "command": f"python bench/gpu_check.py {' '.join(argv)}",
        "environment": environment(device),
        "dtype": str(dtype),
        "budget_s": cfg.budget_s,
        "parts": {},
    }
    ctx = {"device": device, "dtype": dtype, "left": left, "results": record["parts"]}
    for name in cfg.parts:
        fn, gpu_s, cpu_s = PARTS[name]
        need = cpu_s if cfg.dry_run else gpu_s
        if left() < need:
            record["parts"][name] = {"status": f"skipped: needs about {need} s, {left():.0f} s left"}
            continue
        t0 = time.perf_counter()
        try:
            result = fn(cfg, ctx)
            record["parts"][name] = {"status": "ok", "result": result}
        except Exception as err:  # every part runs; a failure is a finding, kept with its traceback
            record["parts"][name] = {
                "status": "failed",
                "error": f"{type(err).__name__}: {err}"[:2000],
                "traceback": traceback.format_exc()[-8000:],
            }
        record["parts"][name]["seconds"] = time.perf_counter() - t0
        logger.info("%s: %s (%.0f s)", name, record["parts"][name]["status"], record["parts"][name]["seconds"])
        _write(cfg, record)  # after every part: a run killed at its limit still leaves a report
    record["wall_s"] = time.perf_counter() - start
    _write(cfg, record)
    return record


def _write(cfg, record):
    out = Path(cfg.output_dir)
    write_json_atomic(out / "report.json", json.loads(json.dumps(record, default=str)))
    write_text_atomic(out / "report.md", render(record))


def main(argv=None) -> None:
    from transformers import HfArgumentParser

    setup_logging()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    argv = sys.argv[1:] if argv is None else list(argv)
    with one_line_errors():  # --parts bogus, no GPU without --dry_run: one line, exit 2
        (cfg,) = HfArgumentParser(CheckConfig).parse_args_into_dataclasses(args=argv)
        record = run(cfg, argv)
        print(render(record))


if __name__ == "__main__":
    main()
