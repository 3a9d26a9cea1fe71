"""bench/memory.py's report: the measured points beside the planner, the depth fit (fixed + layers x per-layer,
extrapolated to full depth), the speed table, and the JSON record that several commands build together (the
planner's calibration test reads it). Kept apart from the measurement so that a report can be rendered again from
a JSON with the current planner (`--report_from`) without building any model."""

from __future__ import annotations

import json
import os
import platform

import torch

from longqlora.output import markdown_table
from longqlora.training import plan as planner


def fit_depth(points: list[dict], full_layers: int) -> dict | None:
    """peak = fixed + layers x per_layer from the points of one (model, variant, context) at two or more depths
    (least squares), and the peak extrapolated to `full_layers`."""
    if len({p["layers"] for p in points}) < 2:
        return None
    xs, ys = [p["layers"] for p in points], [p["peak_bytes"] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    per_layer = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    fixed = my - per_layer * mx
    return {
        "fixed_bytes": fixed,
        "per_layer_bytes": per_layer,
        "full_layers": full_layers,
        "extrapolated_bytes": fixed + per_layer * full_layers,
    }


def report(
    points: list[dict],
    argv: list[str],
    device,
    longest: list,
    planned,
    full_depth,
    where: str | None = None,
    gpu: dict | None = None,
) -> tuple[str, list]:
    """The Markdown report of measured `points` and the depth fits (returned too). `planned(name, layers, variant,
    context, device, dtype)` is the current planner's prediction for a point (also for points measured before the
    planner changed); `full_depth(name)` the model's layer count; `where` the machine the points were measured on
    (default: this one); `gpu` a GPU's JSON record (docs/memory_gpu.json), whose full-depth points fill the fits'
    GPU column."""
    gib = planner.GIB
    where = where or machine(device)
    lines = [f"# Training memory: {where}", "", f"`python bench/memory.py {' '.join(argv)}`".replace(" `", "`"), ""]
    rows = []
    for p in points:
        if "error" in p:
            rows.append([p["model"], p["layers"], p["context"], p["variant"], p["error"], "", "", ""])
            continue
        if "peak_superseded" in p:  # kept for its tokens/s; its peak was read by a method found wrong
            speed = f"{p['tokens_per_s']:.0f}" if p.get("timed_steps") else ""
            rows.append([p["model"], p["layers"], p["context"], p["variant"], "superseded", "", speed, ""])
            continue
        split = p.get("plan", {}).get("offload_layers")  # --offload_layers: the first N layers' checkpoints offloaded
        planned_gib = planned(p["model"], p["layers"], p["variant"], p["context"], p["device"], p["dtype"], split)
        p = {**p, "planned_bytes": planned_gib["peak_allocated_gib"] * gib}
        if split is not None:
            p["variant"] += f" (offload: first {split} layers)"
        err = 100 * (p["planned_bytes"] - p["peak_bytes"]) / p["peak_bytes"]
        reserved = "n/a" if p["reserved_bytes"] is None else f"{p['reserved_bytes'] / gib:.3f}"
        rows.append(
            [
                p["model"],
                p["layers"],
                p["context"],
                p["variant"],
                f"{p['peak_bytes'] / gib:.3f}",
                reserved,
                f"{p['tokens_per_s']:.0f}" if p.get("timed_steps") else "(tracked)",
                f"{p['planned_bytes'] / gib:.3f} ({err:+.1f}%)",
            ]
        )
    lines.append(
        markdown_table(
            [
                "model",
                "layers",
                "context",
                "variant",
                "peak allocated GiB",
                "peak reserved GiB",
                "tokens/s",
                "planned GiB (error)",
            ],
            rows,
        )
    )
    fits = []
    groups = {}
    for p in points:
        if "error" not in p and "peak_superseded" not in p:
            groups.setdefault((p["model"], p["variant"], p["context"]), []).append(p)
    for (name, variant, context), group in groups.items():
        full = full_depth(name)
        fit = fit_depth(group, full)
        if fit is None:
            continue
        dtype = group[0]["dtype"]
        plan = planned(name, None, variant, context, group[0]["device"], dtype)["peak_allocated_gib"] * gib
        on_gpu = planned(name, None, variant, context, "cuda", dtype)
        err = 100 * (plan - fit["extrapolated_bytes"]) / fit["extrapolated_bytes"]
        fits.append(
            {
                "model": name,
                "variant": variant,
                "context": context,
                **fit,
                "planned_bytes": plan,
                "planned_gpu_need_gib": on_gpu["device_need_gib"],
            }
        )
        measured = gpu_measured(gpu, name, variant, context, full, dtype)
        fits[-1]["row"] = [
            name,
            context,
            variant,
            f"{fit['fixed_bytes'] / gib:.3f}",
            f"{fit['per_layer_bytes'] / gib:.4f}",
            full,
            f"{fit['extrapolated_bytes'] / gib:.2f}",
            f"{plan / gib:.2f} ({err:+.1f}%)",
            f"{on_gpu['device_need_gib']:.2f}",
            "not yet measured" if measured is None else f"{measured[0] / gib:.2f} / {measured[1] / gib:.2f}",
        ]
    if fits:
        on = (gpu or {}).get("machine") or "a GPU"
        lines += [
            "",
            "Fitted as fixed + layers x per-layer and extrapolated to the model's full depth, beside the "
            "planner for the same step on this device, what it plans a GPU needs for it (CUDA rules, the "
            "variant's offloading, CUDA context and fragmentation included) and, last, the peak allocated / "
            f"reserved measured at full depth on {on} (bench/memory.py's --gpu_from record, docs/memory_gpu.json "
            "by default) for the same model, context and variant where one was:",
            "",
            markdown_table(
                [
                    "model",
                    "context",
                    "variant",
                    "fixed GiB",
                    "per layer GiB",
                    "full depth",
                    "extrapolated GiB",
                    "planned GiB (error)",
                    "planned GPU need GiB",
                    "measured GPU GiB",
                ],
                [f.pop("row") for f in fits],
            ),
        ]
    speed = speed_rows(points)
    if speed:
        lines += [
            "",
            "Speed of the timed steps (the first, measured for memory, not timed where more ran; ratios within one "
            "command's run, the same machine, one after the other):",
            "",
            markdown_table(["model", "layers", "context", "variant", "tokens/s", "time per step vs ours"], speed),
        ]
    if longest:
        lines += [
            "",
            "Longest context ours trains (LoRA+, S2-Attn, every switch):",
            "",
            markdown_table(["model", "tokens"], longest),
        ]
    return "\n".join(lines) + "\n", fits


def gpu_measured(gpu: dict | None, name: str, variant: str, context: int, layers: int, dtype: str):
    """(peak allocated, peak reserved) bytes of the first point of a GPU's record at this model, variant, context
    and full depth (plain rows, every layer's checkpoints handled alike, the same dtype), or None."""
    for p in (gpu or {}).get("points", []):
        if (
            (p["model"], p["variant"], p["context"], p["layers"]) == (name, variant, context, layers)
            and p.get("device") == "cuda"
            and p.get("rows", "plain") == "plain"
            and p.get("dtype") == dtype
            and "error" not in p
            and "peak_superseded" not in p
            and p.get("plan", {}).get("offload_layers") is None
        ):
            return p["peak_bytes"], p["reserved_bytes"]
    return None


def speed_rows(points: list[dict]) -> list[list]:
    """Tokens/s of every timed point, and its step time relative to ours at the same model, depth and context in the
    same command's run (ratios are only meaningful within one run)."""
    timed = [p for p in points if p.get("timed_steps") and "error" not in p]

    def key(p):
        return p.get("command"), p["model"], p["layers"], p["context"]

    ours = {key(p): p["tokens_per_s"] for p in timed if p["variant"] == "ours"}
    rows = []
    for p in timed:
        ref = ours.get(key(p))
        rows.append(
            [
                p["model"],
                p["layers"],
                p["context"],
                p["variant"],
                f"{p['tokens_per_s']:.1f}",
                f"{ref / p['tokens_per_s']:.2f}" if ref else "",
            ]
        )
    return rows


def machine(device) -> str:
    """This machine's device and torch, as the report's title and the JSON record name them."""
    name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    )
    return f"{name}, torch {torch.__version__}"


def rank_point(name: str, layers: int, variant: str, context: int, peaks: list[int]) -> dict:
    """The fields every multi-process bench records of one point (one plain bf16 row; every rank's peak and the
    fuller one's), before its own (bench/cp_memory.py, fsdp_memory.py, zero3_memory.py)."""
    return {
        "model": name,
        "layers": layers,
        "variant": variant,
        "context": context,
        "rows": "plain",
        "dtype": "bfloat16",
        "peak_bytes_by_rank": peaks,
        "peak_bytes": max(peaks),
    }


def read_record(path) -> dict | None:
    """The JSON record a bench wrote at `path`, or None where there is none."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def merge_record(path: str, record: dict) -> dict:
    """`record` added to the JSON at `path` if there is one: several commands (models that need different contexts,
    say) build one calibration file; a point measured again replaces the old one."""
    if not os.path.exists(path):
        return {
            "commands": [record["command"]],
            "points": record["points"],
            "fits": record["fits"],
            "machine": record.get("machine"),
        }
    with open(path, encoding="utf-8") as f:
        old = json.load(f)

    def key(p):  # a point measured again by the same command (or one recorded without its command) is replaced
        split = p.get("plan", {}).get("offload_layers")
        return (p["model"], p["layers"], p["variant"], p["context"], p.get("rows"), p.get("dtype"), split)

    fresh = {key(p) for p in record["points"]}
    fresh_with_command = {(key(p), p.get("command")) for p in record["points"]}

    def replaced(p):
        return (key(p), p.get("command")) in fresh_with_command or (p.get("command") is None and key(p) in fresh)

    fit_key = lambda f: (f["model"], f["variant"], f["context"])  # noqa: E731
    new_fits = {fit_key(f) for f in record["fits"]}
    return {
        "commands": [c for c in old.get("commands", []) if c != record["command"]] + [record["command"]],
        "points": [p for p in old["points"] if not replaced(p)] + record["points"],
        "fits": [f for f in old.get("fits", []) if fit_key(f) not in new_fits] + record["fits"],
        "machine": record.get("machine") or old.get("machine"),
    }
