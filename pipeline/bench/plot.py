"""The cost-growth curves of ``python -m pipeline.bench --only scale`` as one PNG (docs/cost-growth.png).

    python -m pipeline.bench --only scale > scale.jsonl
    python -m pipeline.bench.plot scale.jsonl --out docs/cost-growth.png

One panel per curve found in the JSON lines, the size on a log axis; a flat line is the target.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# summary figure -> (its key holding {size: value}, x label, y label)
CURVES = {
    "scale/resume_vs_history/sqlite": (
        "medians",
        "steps of history (x 20 metrics), SQLite",
        "resume: store phases (s)",
    ),
    "scale/resume_vs_history/postgresql": (
        "medians",
        "steps of history (x 20 metrics), PostgreSQL",
        "resume: store phases (s)",
    ),
    "scale/resume_vs_checkpoints": ("medians", "checkpoints committed (3 kept)", "resume: store phases (s)"),
    "scale/commit_vs_checkpoints": ("medians", "checkpoints committed before (3 kept)", "one commit (s)"),
    "scale/commit_vs_history/sqlite": ("medians", "steps of history (x 20 metrics), SQLite", "one commit (s)"),
    "scale/commit_vs_history/postgresql": ("medians", "steps of history (x 20 metrics), PostgreSQL", "one commit (s)"),
    "scale/metric_ingest": (
        "slowest_step_ratio",
        "jobs logging every step on one team server",
        "slowest job's step / alone",
    ),
    "scale/ui_chart_s": ("per_size_s", "steps (x 20 metrics) in the run", "UI: train/loss chart drawn (s)"),
}

# a second line drawn in the same panel: summary figure -> (its key holding {size: {"median": value}}, legend)
COMPARED = {
    name: ("relinked_s", "linked again at the commit (before the fix)")
    for name in ("scale/commit_vs_history/sqlite", "scale/commit_vs_history/postgresql")
}


def _points(table: dict) -> tuple[list[float], list[float]]:
    points = {float(size): value["median"] if isinstance(value, dict) else value for size, value in table.items()}
    points = {size: value for size, value in points.items() if isinstance(value, (int, float))}
    sizes = sorted(points)
    return sizes, [points[s] for s in sizes]


def curves(lines: list[str]) -> dict[str, tuple[list[float], list[float]]]:
    """name -> (sizes, values) of every known curve in the JSON lines; ``<name> (compared)`` for the second lines."""
    found = {}
    for line in lines:
        if not line.strip().startswith("{"):
            continue
        fig = json.loads(line)
        if fig["name"] in CURVES:
            found[fig["name"]] = _points(fig[CURVES[fig["name"]][0]])
        if fig["name"] in COMPARED and COMPARED[fig["name"]][0] in fig:
            found[f"{fig['name']} (compared)"] = _points(fig[COMPARED[fig["name"]][0]])
    return found


def plot(found: dict[str, tuple[list[float], list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [name for name in found if name in CURVES]
    columns = 3
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, panels):
        sizes, values = found[name]
        _, xlabel, ylabel = CURVES[name]
        ax.plot(sizes, values, marker="o", label="now")
        top = max(values)
        if f"{name} (compared)" in found:
            other_sizes, other = found[f"{name} (compared)"]
            ax.plot(other_sizes, other, marker="s", linestyle="--", color="tab:red", label=COMPARED[name][1])
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        else:
            ax.set_ylim(0, top * 1.25)
        ax.set_xscale("log")
        ax.set_title(f"{name.removeprefix('scale/')}: x{values[-1] / values[0]:.2f}", fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figures", type=Path, nargs="+", help="JSON-lines files printed by python -m pipeline.bench")
    parser.add_argument("--out", type=Path, default=Path("docs/cost-growth.png"))
    args = parser.parse_args()
    found = {}
    for path in args.figures:
        found.update(curves(path.read_text().splitlines()))
    if not found:
        parser.error(f"no cost-growth curve ({', '.join(CURVES)}) in {', '.join(map(str, args.figures))}")
    plot(found, args.out)


if __name__ == "__main__":
    main()
