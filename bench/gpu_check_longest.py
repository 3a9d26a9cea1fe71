"""bench/gpu_check.py's longest-context part and the one bench point it and the bench part measure (apart so that
each file stays readable; the parts and their report are gpu_check.py's)."""

from __future__ import annotations

import dataclasses
import time
import traceback

import memory as memory_bench  # bench/memory.py (gpu_check.py puts bench/ on the path)
import torch

from longqlora.training import plan as planner
from longqlora.training.advice import advise


def measure_point(name, variant, context, bench, ctx) -> dict:
    """One bench/memory.py point; out of memory is a result, not a failure."""
    device, dtype = ctx["device"], ctx["dtype"]
    failure, trace = None, None
    start = time.perf_counter()
    try:
        point = memory_bench.measure(name, None, variant, context, bench, device, dtype)
    except torch.cuda.OutOfMemoryError:
        failure = "out of memory"
    except Exception as err:  # a broken point is a finding; the part's other points still run
        first = (str(err).splitlines() or [""])[0][:200]
        low = first.lower()
        if isinstance(err, RuntimeError) and ("pin" in low or "host" in low or "out of memory" in low):
            failure = f"host memory: {first}"  # a pinned host allocation that failed (not "illegal memory access")
        else:
            failure, trace = f"failed: {type(err).__name__}: {first}", traceback.format_exc()[-3000:]
    memory_bench._free(device)  # outside the except block: the traceback's frames no longer hold tensors
    seconds = time.perf_counter() - start
    if failure:
        out = {"model": name, "variant": variant, "context": context, "error": failure, "seconds": seconds}
        return out | ({"traceback": trace} if trace else {})
    return point | {"seconds": seconds}


def offload_split(name: str, tokens: int, host_gib: float | None) -> int:
    """How many layers' checkpoints the host can pin at `tokens` tokens (the planner's rule: one block per layer,
    rounded up to a power of two by torch's caching host allocator); the rest stay on the GPU."""
    pc = planner.PlanConfig(model=name, context=tokens, offload=True, host_memory=host_gib)
    return planner.offloaded_layers(planner.Shapes.of(memory_bench.model_config(name)), pc)


def part_longest(cfg, ctx):
    """A few trials around the planner's longest context for Llama-3.1-8B, plain LoRA, every switch: the first
    layers' checkpoints offloaded as far as the host can pin them (half the RAM, each layer's block rounded up to a
    power of two), the rest kept on the GPU (--offload_layers). The first H200 run spent 3 of its 4 trials on
    lengths over that host cap and trained 114,688 tokens with 19 GiB of its GPU in use: the GPU was never the
    limit."""
    if cfg.dry_run:
        name, step, limit = "tiny", 256, 4096
    else:
        name, step, limit = "llama-3.1-8b", 16384, 1 << 21
    bench = memory_bench.BenchConfig(
        models=[name], contexts=[step], variants=["ours_lora"], steps=1, search_longest=False, tiny=cfg.dry_run
    )
    device = ctx["device"]
    guess, host = step * 2, None
    if device.type == "cuda":
        import psutil

        total = torch.cuda.get_device_properties(0).total_memory / planner.GIB
        host = 0.5 * psutil.virtual_memory().total / planner.GIB  # TRL warns above 60% of the RAM in use
        pc = planner.PlanConfig(
            model=name, context=step, trainable_params="", optim="adamw", gpu_memory=total, host_memory=host
        )  # advise: the longer of offloaded (within the host) and kept on the GPU, every other switch on
        longest = advise(memory_bench.model_config(name), pc)["longest_context_all_switches"]
        guess = max(step, longest // step * step)
    lo, hi, trials, variant = 0, None, [], None
    n, layers = guess, memory_bench.model_config(name).num_hidden_layers
    seconds = _seconds_per_token(ctx)  # (seconds per token at 8k, setup seconds) from the points measured so far
    for _ in range(cfg.longest_trials):
        margin = 5 if cfg.dry_run else 20
        while n >= step and not trials and not cfg.dry_run and _trial_s(n, seconds) > ctx["left"]() - margin:
            n = n // 2 // step * step  # the first trial shrinks to what the budget holds; later ones stop instead
        if n < step or n > limit or _trial_s(n, seconds) > ctx["left"]() - margin:
            break
        moved = offload_split(name, n, host)
        at = dataclasses.replace(bench, offload_layers=moved if 0 < moved < layers else None)
        point = measure_point(name, "ours_lora" if moved else "ours_lora_no_offload", n, at, ctx)
        point["offload_layers"] = moved
        trials.append(point)
        if "traceback" in point:  # not a memory limit: the search cannot say more
            break
        if "seconds" in point and "error" not in point:
            seconds = (max(point["seconds"] - seconds[1], 1.0) / n / _growth(n), seconds[1])
        ok = "error" not in point
        if ok and n > lo:
            variant = point["variant"]
        lo, hi = (max(lo, n), hi) if ok else (lo, n if hi is None else min(hi, n))
        n = max(n + step, n * 5 // 4) // step * step if hi is None else (lo + hi) // 2 // step * step
        if hi is not None and hi - lo <= step:
            break
    return {
        "model": name,
        "planned_longest": guess,
        "longest_trained": lo,
        "longest_variant": variant,  # ours_lora (the first offload_layers offloaded) or ours_lora_no_offload
        "first_failure": hi,
        "trials": trials,
    }


def _growth(n: int) -> float:
    """A training step's time per token against 8k: S2's attention (group n/4) grows with n; about 5% of a 7B
    step's work at 8k (attention FLOPs per token against the projections' and MLP's)."""
    return 0.95 + 0.05 * n / 8192


def _seconds_per_token(ctx) -> tuple[float, float]:
    """(seconds per token at 8k, a point's setup seconds) from the bench part's ours point; a guess without it."""
    bench = (ctx["results"].get("bench", {}).get("result") or {}).get("points", [])
    ours = [p for p in bench if p.get("variant") == "ours" and p.get("tokens_per_s")]
    if not ours:
        return 1 / 3000, 60.0
    p = ours[0]
    step = p["context"] / p["tokens_per_s"]
    setup = max(10.0, p["seconds"] - (p["timed_steps"] + 1) * step)
    return 1.3 / p["tokens_per_s"], setup  # 1.3: Llama-3.1-8B's step against Llama-2-7B's (MLP, vocabulary)


def _trial_s(n: int, seconds: tuple[float, float]) -> float:
    per_token, setup = seconds
    return setup + n * per_token * _growth(n)
