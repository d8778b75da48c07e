"""Benchmarks: what the engine costs next to a bare PyTorch loop, and how fast data and restoration are.

``python -m pipeline.bench`` prints one JSON object per figure (docs/benchmarks.md). Every ratio is
measured side by side, in one process or in interleaved runs, against a bare loop built from the same
stage parts, so noise from a shared machine falls on both sides alike.
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any


def spread(values: list[float], digits: int = 4) -> dict[str, Any]:
    """Median, min and max of measured values, and the values themselves."""
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "n": len(values),
        "values": [round(v, digits) for v in values],
    }


def figure(
    name: str, value: float, unit: str, how: str, *, target: str | None = None, met: bool | None = None, **extra: Any
) -> dict[str, Any]:
    """One benchmark figure; ``target``/``met`` say what it must reach and whether it did."""
    out: dict[str, Any] = {"name": name, "value": round(value, 4), "unit": unit, "how": how}
    if target is not None:  # a figure without a target has neither key
        out["target"], out["met"] = target, met
    out.update(extra)
    return out


def emit(fig: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(fig) + "\n")  # the command's output, as the other entry points write theirs
    sys.stdout.flush()
