"""The training metrics logged at a coarser interval than every step (``tracking.metric_interval``)."""

from __future__ import annotations

from typing import Any


class MetricWindow:
    """The training metrics of the steps since the last point, for ``tracking.metric_interval`` > 1: a point is
    their mean (the last value for lr, epoch and the counters, which are not averaged quantities), logged at
    every multiple of the interval and at the last step. Its sums are part of the checkpoint, so a resumed job
    logs the same points as one that never stopped."""

    LAST_VALUE = ("lr", "epoch", "train/nonfinite_steps", "throughput/")  # names (or prefixes) not averaged

    def __init__(self, interval: int):
        self.interval = interval
        self.sums: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.count = 0

    def add(self, step: int, metrics: dict[str, float], final: bool) -> dict[str, float] | None:
        """Take the step's metrics; the point to log at ``step``, if one ends here."""
        if self.interval == 1:
            return metrics
        for key, value in metrics.items():
            if key.startswith(self.LAST_VALUE):
                self.last[key] = value
            else:
                self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1
        if step % self.interval and not final:
            return None
        point = {**{k: v / self.count for k, v in self.sums.items()}, **self.last}
        self.sums, self.last, self.count = {}, {}, 0
        return point

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "last": dict(self.last), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums, self.last, self.count = dict(state["sums"]), dict(state["last"]), int(state["count"])
