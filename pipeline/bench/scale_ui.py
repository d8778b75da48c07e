"""The MLflow UI against a long run: how long the ``train/loss`` chart takes to draw when the run holds
``steps`` steps x ``metrics`` metrics, at three sizes, in a real browser.

The dashboard of this pipeline is the MLflow UI. A run of a week logs 10^6 steps or more, so the question is whether
the chart a user opens stays as quick at 10^6 steps as at 10^4, or grows with the history. For each size:

- a fresh SQLite store is filled with the run's history in bulk (pipeline.bench.history), and its size on disk is
  reported per 10^6 points (``scale/store_mb_per_million_points/sqlite``);
- a real ``mlflow server`` (pipeline.ops.localserver) serves it on loopback, and Debian's chromium, driven by
  Playwright, opens the run's "Model metrics" tab (the link the pipeline gives), types ``train/loss`` into its
  chart search (with 20 metrics the chart is not on the first screen) and waits until the chart's line is drawn
  (``scale/ui_chart_s/<steps>``: navigation to drawn line, in a fresh browser context each time, so the UI's
  JavaScript is loaded each time as a user's first visit would). Every metric-history call the page makes is
  recorded with its endpoint, ``max_results`` and the points it returned: this shows whether the UI samples the
  history (a flat cost) or fetches all of it. Calls the page drops are counted as ``aborted`` (the charts of the
  first screen, once the search hides them): the browser drops them, the server still runs their queries;
- the two REST calls are timed directly: the whole history of ``train/loss`` through ``metrics/get-history``, paged
  as MlflowClient pages it (``scale/full_history_s/<steps>``), and the sampled history through
  ``metrics/get-history-bulk-interval`` with the UI's ``max_results`` (``scale/sampled_history_s/<steps>``).

``scale/ui_chart_s`` sums it up: the largest size's time and ``largest_over_smallest``. A 10^6 x 20 store is about
5 GB, so each store is deleted before the next size is written.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import requests
from mlflow import MlflowClient
from mlflow.store.tracking import GET_METRIC_HISTORY_MAX_RESULTS

from pipeline.bench import figure, spread
from pipeline.bench.browser import CHROMIUM_ARGS, chromium_path, missing_browser
from pipeline.bench.history import write_history
from pipeline.engine.tracking import ui_url
from pipeline.ops.localserver import TrackingServer

log = logging.getLogger(__name__)

KEY = "train/loss"
UI_MAX_RESULTS = 320  # what the MLflow 3.17 charts ask get-history-bulk-interval for (used if the UI asked nothing)
PAGE_TIMEOUT_MS = 600_000
SERVER_START_S = 300.0
# the line of a chart for `key` is drawn: a Plotly plot holds a trace of that metric with points, and its SVG path
CHART_DRAWN = """key => {
    for (const plot of document.querySelectorAll('.js-plotly-plot')) {
        const traces = (plot.data || []).filter(t => t.metricKey === key && (t.x || []).length > 0);
        const lines = [...plot.querySelectorAll('.scatterlayer path.js-line')];
        const drawn = lines.some(line => (line.getAttribute('d') || '').length > 1);
        if (traces.length && drawn) return Math.max(...traces.map(t => t.x.length));
    }
    return 0;
}"""


def ui_chart_figures(
    steps_sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000), metrics: int = 20, repeats: int = 3
) -> list[dict[str, Any]]:
    """The UI chart, full and sampled history times at each size (median of ``repeats``), the store's size per
    10^6 points and the summary figure; see the module docstring."""
    if why := missing_browser():
        raise RuntimeError(f"the UI benchmark needs a browser: {why}")
    sizes = [_measure_size(steps, metrics, repeats) for steps in steps_sizes]
    figures = [fig for size in sizes for fig in _size_figures(size, metrics, repeats)]
    figures.append(_store_figure(sizes, metrics))
    figures.append(_summary_figure(sizes, metrics))
    return figures


def _size_figures(size: dict[str, Any], metrics: int, repeats: int) -> list[dict[str, Any]]:
    """The chart drawn, the whole history and the sampled history of one size."""
    steps, points = size["steps"], size["points"]
    return [
        figure(
            f"scale/ui_chart_s/{steps}",
            statistics.median(size["ui_s"]),
            "s",
            f"one run of {steps} steps x {metrics} metrics in a SQLite store behind a local mlflow server; "
            f"headless chromium opens the run's Model metrics tab, searches the charts for {KEY} and waits "
            f"until its line is drawn; seconds from navigation, fresh browser context each time, median of "
            f"{repeats}",
            points=points,
            runs=spread(size["ui_s"], 3),
            drawn_points=size["drawn_points"],
            history_calls=size["history_calls"],
            train_loss_calls=size["train_loss_calls"],
            load_1min=round(size["load_1min"], 2),
        ),
        figure(
            f"scale/full_history_s/{steps}",
            statistics.median(size["full_s"]),
            "s",
            f"GET /api/2.0/mlflow/metrics/get-history for {KEY} (all {steps} points), paged by "
            f"{GET_METRIC_HISTORY_MAX_RESULTS} as MlflowClient pages it; median of {repeats}",
            points=size["full_points"],
            pages=size["full_pages"],
            runs=spread(size["full_s"], 3),
        ),
        figure(
            f"scale/sampled_history_s/{steps}",
            statistics.median(size["sampled_s"]),
            "s",
            f"GET /ajax-api/2.0/mlflow/metrics/get-history-bulk-interval for {KEY} with max_results="
            f"{size['max_results']} (what the UI chart asks for); median of {repeats}",
            points=size["sampled_points"],
            runs=spread(size["sampled_s"], 3),
        ),
    ]


def _store_figure(sizes: list[dict[str, Any]], metrics: int) -> dict[str, Any]:
    """``scale/store_mb_per_million_points/sqlite``: the SQLite store's size on disk per 10^6 points."""
    largest = sizes[-1]
    return figure(
        "scale/store_mb_per_million_points/sqlite",
        largest["store_mb"] / (largest["points"] / 1e6),
        "MB",
        f"size on disk of the SQLite store (file and journal) after writing the history, per 10^6 points "
        f"(metric rows with their index); at {largest['steps']} steps x {metrics} metrics",
        per_size={str(s["steps"]): round(s["store_mb"] / (s["points"] / 1e6), 1) for s in sizes},
        store_mb={str(s["steps"]): round(s["store_mb"], 1) for s in sizes},
        write_s={str(s["steps"]): round(s["write_s"], 1) for s in sizes},
    )


def _summary_figure(sizes: list[dict[str, Any]], metrics: int) -> dict[str, Any]:
    """``scale/ui_chart_s``: the chart at the largest size and its ratio to the smallest."""
    largest, smallest = sizes[-1], sizes[0]
    ui = {str(s["steps"]): round(statistics.median(s["ui_s"]), 3) for s in sizes}
    full = {str(s["steps"]): round(statistics.median(s["full_s"]), 3) for s in sizes}
    return figure(
        "scale/ui_chart_s",
        statistics.median(largest["ui_s"]),
        "s",
        f"scale/ui_chart_s at the largest size ({largest['steps']} steps x {metrics} metrics); "
        f"largest_over_smallest: its ratio to the smallest size ({smallest['steps']} steps); "
        "full_history_largest_over_smallest: the same ratio for the whole history through get-history, for "
        "comparison",
        largest_over_smallest=round(statistics.median(largest["ui_s"]) / statistics.median(smallest["ui_s"]), 2),
        per_size_s=ui,
        full_history_per_size_s=full,
        full_history_largest_over_smallest=round(
            statistics.median(largest["full_s"]) / statistics.median(smallest["full_s"]), 2
        ),
    )


def _measure_size(steps: int, metrics: int, repeats: int) -> dict[str, Any]:
    """One fresh store of ``steps`` x ``metrics`` points, served and opened in the browser; deleted afterwards."""
    with tempfile.TemporaryDirectory(prefix="bench-scale-ui-") as tmp:
        root = Path(tmp)
        server = TrackingServer(root)  # serves sqlite:///<root>/server.db, artifacts in <root>/server-artifacts
        uri = f"sqlite:///{root}/server.db"
        client = MlflowClient(uri)
        experiment = client.create_experiment("scale-ui", artifact_location=(root / "server-artifacts").as_uri())
        run_id = client.create_run(experiment, run_name="long-run").info.run_id
        log.info("Writing %d steps x %d metrics into %s", steps, metrics, uri)
        started = time.perf_counter()
        points = write_history(uri, run_id, steps, metrics)
        write_s = time.perf_counter() - started
        client.set_terminated(run_id)  # a finished run: the UI has no reason to poll it
        store_mb = sum(f.stat().st_size for f in root.glob("server.db*")) / 1e6
        log.info("Wrote %d points in %.1f s; the store holds %.1f MB", points, write_s, store_mb)
        server.start(timeout=SERVER_START_S)
        try:
            url = ui_url(experiment, run_id, base=server.uri, page="model-metrics")
            load = os.getloadavg()[0]  # a shared machine: how busy it was when the browser ran
            browser = _browse(url, repeats)
            max_results = _max_results(browser["train_loss_calls"])
            full_s, full_points, full_pages, sampled_s, sampled_points = [], 0, 0, [], 0
            with requests.Session() as http:
                for _ in range(repeats):
                    seconds, full_points, full_pages = _full_history(http, server.uri, run_id)
                    full_s.append(seconds)
                    seconds, sampled_points = _sampled_history(http, server.uri, run_id, max_results)
                    sampled_s.append(seconds)
        finally:
            server.stop()
        log.info(
            "%d steps: chart %.2f s, full history %.2f s (%d points), sampled %.3f s (%d points)",
            steps,
            statistics.median(browser["ui_s"]),
            statistics.median(full_s),
            full_points,
            statistics.median(sampled_s),
            sampled_points,
        )
    return {
        "steps": steps,
        "points": points,
        "write_s": write_s,
        "store_mb": store_mb,
        "load_1min": load,
        **browser,
        "max_results": max_results,
        "full_s": full_s,
        "full_points": full_points,
        "full_pages": full_pages,
        "sampled_s": sampled_s,
        "sampled_points": sampled_points,
    }


def _browse(url: str, repeats: int) -> dict[str, Any]:
    """Open the chart ``repeats`` times, each in a fresh browser context; times and the history calls of the last."""
    from playwright.sync_api import sync_playwright

    times, calls, drawn = [], [], 0
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            for _ in range(repeats):
                seconds, drawn, calls = _open_chart(browser, url)
                times.append(seconds)
        finally:
            browser.close()
    summary: dict[str, dict[str, Any]] = {}
    for call in calls:  # per endpoint: calls answered and aborted, which max_results, the most points in one answer
        entry = summary.setdefault(call["endpoint"], {"calls": 0, "aborted": 0, "max_results": [], "most_points": 0})
        entry["calls" if call["status"] else "aborted"] += 1
        if call["max_results"] not in entry["max_results"]:
            entry["max_results"].append(call["max_results"])
        entry["most_points"] = max(entry["most_points"], call["points"])
    return {
        "ui_s": times,
        "drawn_points": drawn,
        "history_calls": summary,
        "train_loss_calls": [c for c in calls if c["metric_key"] == KEY],
    }


def _open_chart(browser, url: str) -> tuple[float, int, list[dict[str, Any]]]:
    """Navigation to the drawn train/loss line: seconds, points drawn, and every metric-history call made meanwhile."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = context.new_page()
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        calls = _HistoryCalls()  # times from here
        on_finished, on_failed = calls.finished, calls.failed
        page.on("requestfinished", on_finished)
        page.on("requestfailed", on_failed)
        page.goto(url)
        page.get_by_placeholder("Search metric charts").fill(KEY)  # waits until the chart search can be typed into
        drawn = page.wait_for_function(CHART_DRAWN, arg=KEY, polling=50).json_value()
        for _ in range(500):  # the request's finished event may come after the drawing
            if any(c["metric_key"] == KEY and c["status"] for c in calls.calls):
                break
            page.wait_for_timeout(20)
        seconds = time.perf_counter() - calls.started
        page.remove_listener("requestfinished", on_finished)
        page.remove_listener("requestfailed", on_failed)
        return seconds, drawn, calls.calls
    finally:
        context.close()


class _HistoryCalls:
    """The metric-history calls a page makes, recorded as they finish or fail, timed from the recorder's making."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.started = time.perf_counter()

    def finished(self, request) -> None:
        if (call := _history_call(request)) is None:
            return
        response = request.response()
        body = response.json() if response.ok else {}
        self.calls.append(
            {
                **call,
                "points": len(body.get("metrics", [])),
                "status": response.status,
                "request_s": round(request.timing["responseEnd"] / 1000, 3),  # sent to fully received
                "done_at_s": round(time.perf_counter() - self.started, 3),
            }
        )  # since navigation

    def failed(self, request) -> None:  # e.g. the charts of the first screen, dropped when the search hides them
        if (call := _history_call(request)) is not None:
            self.calls.append(
                {
                    **call,
                    "points": 0,
                    "status": None,
                    "failure": request.failure,
                    "done_at_s": round(time.perf_counter() - self.started, 3),
                }
            )


def _history_call(request) -> dict[str, Any] | None:
    """A metric-history request's endpoint, metric and max_results; None for any other request."""
    parsed = urlparse(request.url)
    if "/metrics/get-history" not in parsed.path:
        return None
    query = parse_qs(parsed.query)
    return {
        "endpoint": parsed.path.rsplit("/", 1)[-1],
        "metric_key": query.get("metric_key", [""])[0],
        "max_results": int(query["max_results"][0]) if "max_results" in query else None,
    }


def _max_results(train_loss_calls: list[dict[str, Any]]) -> int:
    asked = [
        c["max_results"] for c in train_loss_calls if c["endpoint"] == "get-history-bulk-interval" and c["max_results"]
    ]
    return asked[-1] if asked else UI_MAX_RESULTS


def _full_history(http: requests.Session, base: str, run_id: str) -> tuple[float, int, int]:
    """The whole history of train/loss through get-history, page by page: seconds, points and pages."""
    params: dict[str, Any] = {"run_id": run_id, "metric_key": KEY, "max_results": GET_METRIC_HISTORY_MAX_RESULTS}
    points = pages = 0
    started = time.perf_counter()
    while True:
        answer = http.get(f"{base}/api/2.0/mlflow/metrics/get-history", params=params, timeout=600)
        answer.raise_for_status()
        body = answer.json()
        points, pages = points + len(body.get("metrics", [])), pages + 1
        if not body.get("next_page_token"):
            return time.perf_counter() - started, points, pages
        params["page_token"] = body["next_page_token"]


def _sampled_history(http: requests.Session, base: str, run_id: str, max_results: int) -> tuple[float, int]:
    """train/loss sampled by get-history-bulk-interval as the UI asks for it: seconds and points."""
    started = time.perf_counter()
    answer = http.get(
        f"{base}/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval",
        params={"run_ids": run_id, "metric_key": KEY, "max_results": max_results},
        timeout=600,
    )
    answer.raise_for_status()
    return time.perf_counter() - started, len(answer.json().get("metrics", []))
