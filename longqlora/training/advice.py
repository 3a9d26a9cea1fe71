"""What `python -m longqlora plan` says from the planner's arithmetic (plan.py): the longest context that fits a
GPU, as asked and with every memory switch on, and the switches that make a run fit."""

from __future__ import annotations

import math
import os
from dataclasses import replace

from longqlora.training.plan import PlanConfig, plan


def longest_context(config, cfg: PlanConfig, step: int = 1024, limit: int = 1 << 23) -> int:
    """The longest context (a multiple of `step`, and of --context_parallel) whose plan fits `cfg`'s device, 0 if
    none does."""
    if cfg.device_gib is None:
        raise ValueError("--gpu or --gpu_memory: needed to find the longest context that fits")
    step = math.lcm(step, cfg.context_parallel)

    def fits(n):
        return plan(config, replace(cfg, context=n))["fits"]

    lo, hi = 0, limit // step
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid * step) else (lo, mid - 1)
    return lo * step


def advise(config, cfg: PlanConfig) -> dict:
    """The plan, the longest context that fits as asked and with every switch on, and the switches to turn on. With
    --host_memory, offloading moves only the checkpoints the host can pin and keeps the rest on the GPU
    (--offload_layers): the host, not the GPU, can be what is short (measured on an H200, docs/memory.md)."""
    result = plan(config, cfg)
    if cfg.device_gib is None:
        return result
    # every switch on, the checkpoints split as the host allows (a split of the user's can only offload fewer)
    everything = replace(cfg, offload=True, chunked_loss=True, tiled_mlp=True, offload_layers=None)
    result["longest_context"] = longest_context(config, cfg)
    offloaded, kept = longest_context(config, everything), longest_context(config, replace(everything, offload=False))
    result["longest_context_all_switches"] = max(offloaded, kept)
    result["longest_offloads"] = offloaded > kept  # a tie keeps the checkpoints on the GPU: no copies, no pinning
    longest = max(result["longest_context_all_switches"], cfg.context_parallel)  # a context the ranks can split
    at_longest = plan(config, replace(everything, context=longest, offload=result["longest_offloads"]))
    result["host_offload_gib_at_longest"] = at_longest["host_offload_gib"]
    result["offload_layers_at_longest"] = at_longest["offload_layers"]
    advice, chosen = [], result
    if not result["fits"]:
        candidates = [
            {"chunked_loss": True},
            {"chunked_loss": True, "offload": True},
            {"chunked_loss": True, "offload": True, "tiled_mlp": True},
            {"chunked_loss": True, "offload": False, "tiled_mlp": True},
        ]
        if cfg.offload_layers is not None:  # the user's split, then the one the host allows
            candidates.insert(3, {**candidates[2], "offload_layers": None})
        for switches in candidates:
            chosen = plan(config, replace(cfg, **switches))
            if chosen["fits"]:
                advice = [name for name, on in switches.items() if on and not getattr(cfg, name)]
                break
        else:
            chosen, every = None, plan(config, replace(everything, host_memory=None, offload_layers=None))
            # every offloaded fits the GPU only where --host_memory is short (else the host's split above fit)
            if every["device_need_gib"] <= cfg.device_gib and cfg.host_memory is not None:
                advice = [
                    f"none fits: offloading fits the GPU but pins {every['host_offload_gib']:.0f} GiB of host "
                    f"memory, more than --host_memory {cfg.host_memory:g}; lower --context or add host memory"
                ]
            else:
                advice = ["none fits: lower --context or --batch, or use a larger GPU"]
    split = chosen is not None and chosen["switches"]["offload"] and chosen["config"]["offload_layers"] is None
    if split and chosen["offload_layers"] == 0:
        advice = [a for a in advice if a != "offload"]
        if cfg.offload:
            advice.append(
                "offload off: the host cannot pin enough checkpoints to save GPU memory, the GPU can hold them"
            )
    elif split and chosen["offload_layers"] < chosen["layers"]:
        advice.append(
            f"offload_layers {chosen['offload_layers']}: the host can pin {chosen['offload_layers']} of the "
            f"{chosen['layers']} layers' checkpoints, the rest stay on the GPU"
        )
    elif split and cfg.offload_layers is not None:  # the user's split kept too many on the GPU
        advice.append(f"offload_layers unset: all {chosen['layers']} layers' checkpoints offloaded")
    result["turn_on"] = advice
    return result


# The planner's switches as a recipe's flags (the plan command's own --offload and --tiled_mlp are booleans)
RECIPE_FLAGS = {
    "chunked_loss": "--chunked_loss true",
    "offload": "--offload_activations on",
    "tiled_mlp": "--tiled_mlp on",
}


SWITCHES = (*RECIPE_FLAGS, "offload_layers")  # the advice items that name a switch, first word


def as_recipe_flags(turn_on: list[str]) -> str:
    """`advise`'s "turn_on" in a recipe's terms: its flags, or the advice's own words where it is not a switch."""
    said = []
    for item in turn_on:
        if item in RECIPE_FLAGS:
            said.append(RECIPE_FLAGS[item])
        elif item.startswith("offload_layers unset"):
            said.append("drop --offload_layers")
        elif item.startswith("offload_layers "):
            said.append("--offload_layers " + item.split()[1].rstrip(":"))
        elif item.startswith("offload off"):
            said.append("--offload_activations off")
        else:
            said.append(item.replace("--context or --batch", "--target_context or --per_device_train_batch_size"))
    return ", ".join(said)


def out_of_memory_warning(config, planned: dict) -> str | None:
    """One line before a run predicted not to fit its GPU: the need, the recipe flags that fit it and a plan command
    with the run's own rank and batch; None when it fits (or there is no GPU to fit). With activation checkpointing
    off, the plan (of a checkpointed run) leaves every other layer's activations out (`unplanned_gib`)."""
    if planned.get("fits") is not False:
        return None
    cfg = PlanConfig(**planned["config"])
    unplanned = 0.0 if planned["switches"]["offload"] else planned.get("unplanned_gib", 0.0)
    checkpointed_fits = bool(unplanned) and planned["device_need_gib"] <= planned["device_gib"]
    fits = [] if checkpointed_fits else [as_recipe_flags(advise(config, cfg)["turn_on"])]
    fits = (["--activation_checkpointing true"] if unplanned else []) + fits
    return (
        f"this run is predicted to need {planned['device_need_gib'] + unplanned:.1f} GiB of this GPU's "
        f"{planned['device_gib']:.1f} GiB and will likely run out of memory; what fits: {', '.join(fits)} (`python "
        f"-m longqlora plan --model {cfg.model} --context {cfg.context} --rank {cfg.rank} --batch {cfg.batch} "
        f"--gpu_memory {planned['device_gib']:.0f}` shows the parts)"
    )


HOST_SHARE = 0.6  # of the RAM that offloaded checkpoints may pin: TRL's offloading warns above 60% in use


def host_memory_warning(config, planned: dict, ram_gib: float | None = None, ranks: int | None = None) -> str | None:
    """One line when a run's offloaded checkpoints, in each of the `ranks` processes on this machine, would pin more
    than 60% of its RAM together (a host that runs out kills the run mid-step; the H200's first run found the host,
    not the GPU, to be the limit), naming the --offload_layers that keeps the rest on the GPU; None when they fit."""
    if ram_gib is None:
        import psutil

        ram_gib = psutil.virtual_memory().total / 2**30
    ranks = ranks or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    pinned = (planned.get("host_offload_gib") or 0.0) * ranks
    if pinned <= HOST_SHARE * ram_gib:
        return None
    cfg = replace(PlanConfig(**planned["config"]), offload_layers=None, host_memory=HOST_SHARE * ram_gib / ranks)
    fits = plan(config, cfg)["offload_layers"]
    who = f"{ranks} processes offloading" if ranks > 1 else "offloading"
    return (
        f"{who} {planned['offload_layers']} layers' checkpoints pin {pinned:.0f} GiB of host memory, more than "
        f"{HOST_SHARE:.0%} of this machine's {ram_gib:.0f} GiB: pass --offload_layers {fits} to keep the other "
        "layers' checkpoints on the GPU"
        + (" (--offload_activations off: the host cannot pin enough to save GPU memory)" if fits == 0 else "")
    )


def render(result: dict) -> str:
    """The plan as a short human-readable report."""
    names = {
        "weights": "frozen weights (NF4 + embedding/head)",
        "trainable_state": "trainable: fp32 params + optimizer state",
        "checkpoints": "checkpointed hidden states",
        "layer_recompute": "one layer's recomputation",
        "loss": "loss and its backward",
        "gradients_and_step": "gradients + optimizer step",
        "ddp_buckets": "DDP's gradient buckets",
        "zero3_bucket": "ZeRO-3's gradient bucket",
    }
    paged = result.get("paged_optimizer_gib") or 0.0  # CUDA managed memory: outside the allocator and the need
    if paged:
        names["trainable_state"] = "trainable: fp32 params + state not paged"
    on = [k for k, v in result["switches"].items() if v]
    cp = result["context_parallel"]
    share = f", per rank of {cp} sharing each row ({result['context'] // cp:,} tokens each)" if cp > 1 else ""
    if result.get("sharding", "none") != "none":
        engine = {"fsdp2": "FSDP2", "zero3": "ZeRO-3"}[result["sharding"]]
        share += f", one of {result['processes']} processes sharding the model ({engine})"
    lines = [
        f"{result['model']} at {result['context']:,} tokens x batch {result['batch']}{share} "
        f"(switches on: {', '.join(on) or 'none'}); {result['trainable_params']:,} trainable parameters"
    ]
    lines += [f"  {names[k]:<46} {v:8.2f} GiB" for k, v in result["parts_gib"].items()]
    lines.append(f"  {'peak allocated (backward start or end)':<46} {result['peak_allocated_gib']:8.2f} GiB")
    lines.append(f"  {'+ CUDA context and fragmentation':<46} {result['overhead_gib']:8.2f} GiB")
    if result.get("host_offload_gib"):
        moved = result["offload_layers"]
        which = "offloaded checkpoints" if moved == result["layers"] else f"layers 0-{moved - 1}"
        name = f"pinned host memory ({which}{', per process' if result.get('processes', 1) > 1 else ''})"
        lines.append(f"  {name:<46} {result['host_offload_gib']:8.2f} GiB")
    if paged:
        lines.append(f"  {'paged optimizer state (managed, evictable)':<46} {paged:8.2f} GiB")
    if result.get("device_gib") is not None:
        verdict = "fits" if result["fits"] else "does NOT fit"
        if not result["fits"] and result["device_need_gib"] <= result["device_gib"]:
            verdict += f" (the host: {result['host_offload_gib']:.0f} GiB pinned, over --host_memory)"
        if result["fits"] and result["device_need_gib"] + paged > result["device_gib"]:
            verdict += "; the paged optimizer state pages through host memory (slower steps)"
        aside = f" ({result['device_need_gib'] + paged:.2f} with the paged optimizer state resident)" if paged else ""
        lines.append(f"needs {result['device_need_gib']:.2f} of {result['device_gib']:.1f} GiB{aside}: {verdict}")
    if "longest_context" in result:
        moved = result["offload_layers_at_longest"]
        every = (
            f"with offload ({'all' if moved == result['layers'] else f'the first {moved} of'} {result['layers']} "
            f"layers, {result['host_offload_gib_at_longest']:.0f} GiB of pinned host memory"
            f"{' a process' if result.get('processes', 1) > 1 else ''}) + chunked loss + tiled MLP"
            if result["longest_offloads"]
            else "with chunked loss + tiled MLP, the checkpoints kept on the GPU ("
            + ("the host cannot pin them)" if result["config"]["host_memory"] else "offloading them gains nothing)")
        )
        lines.append(
            f"longest context that fits: {result['longest_context']:,} tokens as asked, "
            f"{result['longest_context_all_switches']:,} {every}"
        )
    if result.get("turn_on"):
        said = [
            f"{item} (a recipe's {as_recipe_flags([item])})" if item.split()[0].rstrip(":") in SWITCHES else item
            for item in result["turn_on"]
        ]
        lines.append("turn on: " + ", ".join(said))
    return "\n".join(lines)
