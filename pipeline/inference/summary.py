"""An evaluation's summary in words: the table of conditions, one sentence on whether restoring helped, and the
evaluation run's description (what was evaluated, on which test set, the table, the listening page).

Used by ``evaluate`` (the printed summary and the run description) and by the Model Registry record of a chain
(pipeline/inference/registry.py).
"""

from __future__ import annotations

import math

from pipeline.inference.metrics import HIGHER_IS_BETTER

ORDER = ("clean", "input", "degraded", "restored", "copy_synthesis", "delta")
HEADLINE = {"stoi": "STOI", "pesq_wb": "PESQ-WB", "dnsmos_ovrl": "DNSMOS OVRL"}  # what the sentence compares


def conditions(metrics: dict[str, float]) -> list[str]:
    """The conditions scored (``eval/<condition>/<metric>``), in reading order."""
    return sorted({k.split("/")[1] for k in metrics if k.count("/") == 2 and k.split("/")[1] in ORDER}, key=ORDER.index)


def metric_names(metrics: dict[str, float]) -> list[str]:
    return [m for m in HIGHER_IS_BETTER if any(k.endswith(f"/{m}") for k in metrics)]


def text_table(metrics: dict[str, float]) -> list[str]:
    """The summary table as fixed-width lines (the terminal)."""
    shown = conditions(metrics)
    lines = [f"{'metric':<12}" + "".join(f"{c:>16}" for c in shown)]
    for name in metric_names(metrics):
        lines.append(f"{name:<12}" + "".join(f"{metrics.get(f'eval/{c}/{name}', math.nan):>16.3f}" for c in shown))
    return lines


def markdown_table(metrics: dict[str, float]) -> list[str]:
    """The summary table in Markdown (a run or model version description)."""
    shown = conditions(metrics)
    lines = ["| metric | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for name in metric_names(metrics):
        cells = [metrics.get(f"eval/{c}/{name}") for c in shown]
        lines.append(f"| {name} | " + " | ".join("—" if v is None else f"{v:.3f}" for v in cells) + " |")
    return lines


def verdict(metrics: dict[str, float]) -> str:
    """One sentence: is the restored audio better than what went in (the degraded test set, or the recordings
    of noisy_dir) on the headline metrics? "" when nothing restored was scored against an input."""
    before = "degraded" if any(k.startswith("eval/degraded/") for k in metrics) else "input"
    compared = [m for m in HEADLINE if f"eval/restored/{m}" in metrics and f"eval/{before}/{m}" in metrics]
    if not compared:
        return ""
    better = [m for m in compared if metrics[f"eval/restored/{m}"] > metrics[f"eval/{before}/{m}"]]
    worse = [m for m in compared if m not in better]
    names = lambda ms: ", ".join(HEADLINE[m] for m in ms)  # noqa: E731
    what = "the degraded input" if before == "degraded" else "the recordings given"
    if not worse:
        return f"Restored audio is better than {what} on {names(better)}."
    if not better:
        return f"Restored audio is worse than {what} on {names(worse)}: this chain does not improve its input yet."
    if "stoi" in worse:  # intelligibility comes first: a clean-sounding buzz can score high on DNSMOS
        return (
            f"Restored audio scores higher than {what} on {names(better)} but lower on {names(worse)}: its words "
            "are harder to understand (STOI), so this chain does not improve its input yet."
        )
    return f"Restored audio is better than {what} on {names(better)} and worse on {names(worse)}."


def describe_evaluation(
    *,
    mode: str,
    evaluated: list[str],
    test_set: str,
    metrics: dict[str, float],
    listening: str,
    model_version: str = "",
) -> str:
    """The evaluation run's Markdown description: what was evaluated (``evaluated``: Markdown items, links to
    the runs), the test set, the verdict, the table and the listening page."""
    lines = [f"**Evaluation** · {mode} · {test_set}", ""]
    if sentence := verdict(metrics):
        lines += [sentence, ""]
    lines += ["Evaluated:", *[f"- {item}" for item in evaluated], ""]
    if model_version:
        lines += [f"Registered model: `{model_version}`", ""]
    lines += [
        *markdown_table(metrics),
        "",
        f"[Listening page]({listening}) (clean, degraded, restored and copy synthesis side by side)",
    ]
    return "\n".join(lines)
