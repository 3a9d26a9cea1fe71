"""bench/gpu_check.py's report: report.md rendered from the run's record, apart from the run so that a record
(report.json, brought back from a GPU) renders again without a GPU."""

from __future__ import annotations

import s2_speed  # bench/s2_speed.py (its table); bench/ is on the path of the script that imports this module

from longqlora.output import markdown_table
from longqlora.training import plan as planner


def render(record: dict) -> str:
    """report.md from the run's record (report.json): the environment, each part's status and its tables."""
    gib = lambda x: "" if x is None else f"{x:.2f}"  # noqa: E731
    lines = [
        f"# GPU check: {record['environment']['device']}",
        "",
        f"`{record['command']}`",
        "",
        markdown_table(["package", "version"], [[k, str(v)] for k, v in record["environment"].items()]),
        "",
        markdown_table(
            ["part", "status", "seconds"],
            [[name, r["status"], f"{r.get('seconds', 0):.0f}"] for name, r in record["parts"].items()],
        ),
    ]
    parts = record["parts"]
    for name, r in parts.items():
        if r["status"] == "failed":
            lines += ["", f"## {name}: failed", "", "```", r["error"], "```"]
    if parts.get("tests", {}).get("result"):
        lines += ["", "## GPU tests", "", f"`{parts['tests']['result']['summary']}`"]
    if parts.get("speed", {}).get("result"):
        for rows_kind, rows in parts["speed"]["result"].items():
            lines += ["", s2_speed.table(rows, f"## S2-Attn op against full attention, {rows_kind} rows")]
    recipe = parts.get("recipe", {}).get("result")
    if recipe:
        lines += [
            "",
            "## The recipe (extend_7b_8k.py)",
            "",
            markdown_table(
                ["steps", "loss", "tokens/s", "peak allocated GiB", "peak reserved GiB", "planned GiB"],
                [
                    [
                        recipe["steps"],
                        f"{recipe['loss']:.3f}",
                        f"{recipe['tokens_per_s']:.0f}",
                        gib(recipe["peak_allocated_gib"]),
                        gib(recipe["peak_reserved_gib"]),
                        gib(recipe["planned_gib"]),
                    ]
                ],
            ),
        ]
    for name in ("bench", "longest"):
        result = parts.get(name, {}).get("result") or {}
        points = result.get("points", []) + result.get("trials", [])
        if points:
            lines += ["", f"## {name}", ""]
            if name == "longest":
                lines += [
                    f"planned longest {result['planned_longest']:,}; trained {result['longest_trained']:,}"
                    f"{' (' + result['longest_variant'] + ')' if result.get('longest_variant') else ''}; "
                    f"first failure {result['first_failure']}",
                    "",
                ]
            lines.append(
                markdown_table(
                    ["variant", "context", "peak allocated GiB", "peak reserved GiB", "tokens/s", "planned GiB"],
                    [
                        [
                            p["variant"] + (f", {p['offload_layers']} offloaded" if p.get("offload_layers") else ""),
                            p["context"],
                            p.get("error") or gib(p["peak_bytes"] / planner.GIB),
                            gib(p["reserved_bytes"] / planner.GIB) if p.get("reserved_bytes") else "",
                            f"{p['tokens_per_s']:.0f}" if "tokens_per_s" in p else "",
                            gib(p["planned_bytes"] / planner.GIB) if "planned_bytes" in p else "",
                        ]
                        for p in points
                    ],
                )
            )
    errors = (parts.get("planner", {}).get("result") or {}).get("points", [])
    if errors:
        lines += [
            "",
            "## Planner error",
            "",
            markdown_table(
                ["source", "variant", "context", "measured GiB", "planned GiB", "error"],
                [
                    [
                        e["source"],
                        e["variant"],
                        e["context"],
                        gib(e["measured_gib"]),
                        gib(e["planned_gib"]),
                        f"{e['error_pct']:+.1f}%",
                    ]
                    for e in errors
                ],
            ),
        ]
    return "\n".join(lines) + "\n"
