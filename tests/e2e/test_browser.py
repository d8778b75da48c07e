"""The MLflow UI as the dashboard, in a real browser: Playwright for Python driving Debian's chromium
against ``mlflow server`` on loopback (the same app ``mlflow ui`` serves), after a tiny run that was
stopped with SIGTERM and resumed. Each test saves a screenshot of its page in SCREENSHOTS, for a person
to look at. Skipped, saying why, where chromium or Playwright is missing (scripts/setup.sh installs
chromium with apt-get when it runs as root)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import PYTHON, REPO, TINY, env_for, read_until
from mlflow import MlflowClient

from pipeline.bench.browser import CHROMIUM_ARGS, chromium_path, missing_browser
from pipeline.engine.cli import EXIT_OK, EXIT_STOPPED
from pipeline.engine.tracking import ui_url

pytestmark = pytest.mark.slow

SCREENSHOTS = Path(os.environ.get("BROWSER_SCREENSHOTS", REPO / "test-screenshots" / "browser"))
JOB = [*TINY, "trainer.max_steps=12", "checkpoint.save_interval=4", "validation.interval=4"]
PAGE_TIMEOUT_MS = 30_000


def _chromium() -> str:
    if why := missing_browser():
        pytest.skip(why)
    return chromium_path()


def _job(server, workdir: Path, *args: str) -> subprocess.Popen:
    env = env_for(workdir)
    env["MLFLOW_TRACKING_URI"] = server.uri
    return subprocess.Popen(
        [PYTHON, "-m", "pipeline.stages.train_adapter", *args],
        cwd=workdir,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """A server holding one run stopped by SIGTERM after step 6 and resumed to step 12, and a browser page."""
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    from pipeline.ops.localserver import TrackingServer

    root = tmp_path_factory.mktemp("dashboard")
    server = TrackingServer(root)
    server.start()
    try:
        first = _job(server, root, *JOB)
        read_until(first, "step 6/12")
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == EXIT_STOPPED
        client = MlflowClient(server.uri)
        (run,) = client.search_runs([client.get_experiment_by_name("train_adapter").experiment_id])
        resumed = _job(server, root, f"resume_run={run.info.run_id}")
        _, err = resumed.communicate(timeout=300)
        assert resumed.returncode == EXIT_OK, err
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            yield {
                "server": server,
                "root": root,
                "client": client,
                "run": client.get_run(run.info.run_id),
                "page": page,
            }
            browser.close()
    finally:
        server.stop()


def _shot(page, name: str) -> None:
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def _run_url(d, page: str = "") -> str:
    """The link the pipeline gives to the run's page (or one of its tabs)."""
    run = d["run"]
    return ui_url(run.info.experiment_id, run.info.run_id, base=d["server"].uri, page=page)


def _description_link(d, name: str) -> str:
    """Where a link of the run's description goes."""
    return re.search(rf"\[{re.escape(name)}\]\(([^)]+)\)", d["run"].data.tags["mlflow.note.content"]).group(1)


def test_the_run_page_shows_status_progress_checkpoint_and_resume_command_before_show_more(dashboard):
    page, run = dashboard["page"], dashboard["run"]
    page.goto(_run_url(dashboard))
    page.get_by_text("Resume:", exact=False).first.wait_for()
    page.wait_for_timeout(500)
    _shot(page, "run-page")
    first_line = page.get_by_text("FINISHED · step 12/12", exact=False).first
    assert first_line.is_visible()
    assert f"resumed from {run.data.tags['resume.from']}" in first_line.inner_text()  # the step SIGTERM stopped at
    assert "latest checkpoint checkpoints/step-00000012" in first_line.inner_text()
    resume = page.get_by_text(f"mlflow run . -e train_adapter --env-manager local -P resume_run={run.info.run_id}")
    assert resume.first.is_visible()  # among the lines shown before "Show more"
    assert page.get_by_text("Show more").first.is_visible()
    link = page.get_by_role("link", name="All runs of this experiment")
    assert link.get_attribute("href") == ui_url(run.info.experiment_id, base=dashboard["server"].uri)
    # the checkpoints are not outputs of the run (one output per commit would make every get_run grow; they are
    # in the Models tab, test below); the page shows what the run trained on
    assert page.get_by_text(f"step-00000012-{run.info.run_name}").count() == 0
    # the model-training pages (the GenAI ones list "Agent versions" where these list "Models")
    assert page.get_by_role("link", name="Models", exact=True).first.is_visible()
    assert page.get_by_text("Agent versions").count() == 0
    (dataset,) = run.inputs.dataset_inputs
    assert page.get_by_text(f"demo ({dataset.dataset.digest})").first.is_visible()


def test_the_train_loss_chart_has_one_point_per_step_across_the_resume(dashboard):
    """What the UI fetched to draw the train/loss chart: one point for each of steps 1-12."""
    page = dashboard["page"]
    fetched = []

    def on_response(response):
        if "get-history-bulk-interval" in response.url and "metric_key=train%2Floss" in response.url:
            fetched.append(response.json())

    page.on("response", on_response)
    page.goto(_run_url(dashboard, "model-metrics"))
    page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot, canvas, svg.main-svg').length > 0")
    for _ in range(100):
        if fetched:
            break
        page.wait_for_timeout(100)
    page.wait_for_timeout(1000)
    _shot(page, "charts")
    page.remove_listener("response", on_response)
    assert fetched, "the page did not fetch train/loss"
    points = fetched[-1]["metrics"]
    assert sorted(p["step"] for p in points) == list(range(1, 13))


def test_a_listening_page_plays_and_shows_its_spectrograms_in_the_artifact_viewer(dashboard):
    page = dashboard["page"]
    page.goto(_run_url(dashboard, "artifactPath/samples/step-00000012/index.html"))
    frame = None
    for _ in range(200):
        frame = next((f for f in page.frames if f.url.startswith("blob:")), None)
        if frame is not None and frame.query_selector("audio"):
            break
        page.wait_for_timeout(100)
    assert frame is not None, "the artifact viewer showed no HTML frame"
    frame.wait_for_function(
        "() => [...document.querySelectorAll('audio')].every(a => a.readyState >= 2)"
        " && document.querySelectorAll('audio').length > 0"
    )
    audio = frame.evaluate("() => [...document.querySelectorAll('audio')].map(a => [a.readyState, a.duration])")
    images = frame.evaluate("() => [...document.querySelectorAll('img')].map(i => i.complete && i.naturalWidth)")
    _shot(page, "listening-page")
    assert audio and all(state >= 2 and duration > 0 for state, duration in audio), audio
    assert images and all(width and width > 0 for width in images), images


def test_the_checkpoints_appear_in_the_experiments_models_tab(dashboard):
    page, run, client = dashboard["page"], dashboard["run"], dashboard["client"]
    kept = sorted(m.name for m in client.search_logged_models([run.info.experiment_id]))
    assert f"step-00000012-{run.info.run_name}" in kept
    page.goto(_description_link(dashboard, "checkpoints of every run, by metric"))
    page.get_by_text(kept[0]).first.wait_for()
    _shot(page, "models-tab")
    assert page.get_by_role("heading", name="Models").first.is_visible()  # the model-training page
    for name in kept:
        assert page.get_by_text(name).first.is_visible(), name


def test_the_checkpoint_index_shows_every_column_in_the_artifact_viewer(dashboard):
    """Every kept checkpoint a row, with its created time shown (MLflow's table left ISO times blank)."""
    page = dashboard["page"]
    page.goto(_description_link(dashboard, "checkpoints"))
    page.get_by_text("Previewing the first").wait_for()
    _shot(page, "checkpoint-index")
    header = page.evaluate("() => [...document.querySelectorAll('[role=columnheader], th')].map(h => h.innerText)")
    assert header[:7] == ["name", "step", "epoch", "created", "size", "model", "dataset"], header
    rows = page.evaluate("() => [...document.querySelectorAll('[role=row], tr')].map(r => r.innerText.split('\\t'))")
    rows = [r for r in rows if r[0].startswith("step-")]
    stored = dashboard["client"].list_artifacts(dashboard["run"].info.run_id, "checkpoints")
    assert [r[0] for r in rows] == sorted(Path(f.path).name for f in stored if f.is_dir), rows
    for row in rows:  # the created time is shown, not left blank
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", row[3]), row


def test_the_experiment_link_opens_the_runs_table_with_progress_and_losses(dashboard):
    page, run = dashboard["page"], dashboard["run"]
    page.goto(_description_link(dashboard, "All runs of this experiment"))
    page.get_by_text(run.info.run_name).first.wait_for()
    page.get_by_role("columnheader", name="progress").first.wait_for()
    _shot(page, "runs-table")
    for column in ("progress", "val/loss", "train/loss"):  # the pipeline's view, no column to add by hand
        assert page.get_by_role("columnheader", name=column).first.is_visible(), column
    assert page.get_by_text(run.data.tags["progress"]).first.is_visible()


def test_setting_stop_requested_in_the_tag_editor_stops_a_running_run(dashboard):
    server, root, page, client = dashboard["server"], dashboard["root"], dashboard["page"], dashboard["client"]
    job = _job(
        server,
        root,
        *TINY,
        "trainer.max_steps=100000",
        "checkpoint.save_interval=100000",
        "validation.interval=0",
        "tracking.experiment=stop-from-browser",
    )
    try:
        read_until(job, "step 3/100000")
        (run,) = client.search_runs([client.get_experiment_by_name("stop-from-browser").experiment_id])
        page.goto(ui_url(run.info.experiment_id, run.info.run_id, base=server.uri))
        page.get_by_role("button", name="Edit tags").click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_role("combobox").fill("stop_requested")
        page.keyboard.press("Enter")
        dialog.get_by_label("Value").fill("true")
        dialog.get_by_role("button", name="Add tag").click()
        _shot(page, "tag-editor")
        dialog.get_by_role("button", name="Save tags").click()
        assert job.wait(timeout=60) == EXIT_STOPPED
    finally:
        if job.poll() is None:
            job.kill()
    ended = client.get_run(run.info.run_id)
    assert ended.info.status == "KILLED" and ended.data.tags["stopped_by"] == "tag"
    assert ended.data.tags["checkpoint.latest_step"] == ended.data.tags["progress"].split()[1].split("/")[0]


def test_the_evaluation_run_and_the_registered_chain_explain_themselves(dashboard):
    """The evaluation run's page shows its description (what, test set, verdict, table, listening page) and its
    test set as an input; the registered model's page shows the @champion alias and the version's description.
    The records are written by evaluate's own functions for a chain (the real evaluation is in test_evaluate.py:
    scoring a chain needs three trained stages, which this module's server does not hold)."""
    from pipeline.data.corpus import DEMO_DIR, mlflow_dataset
    from pipeline.engine.tracking import log_dataset_inputs
    from pipeline.inference.registry import record_evaluation
    from pipeline.inference.summary import describe_evaluation

    page, client, trained = dashboard["page"], dashboard["client"], dashboard["run"]
    metrics = {
        "eval/degraded/stoi": 0.71,
        "eval/restored/stoi": 0.52,
        "eval/degraded/pesq_wb": 1.10,
        "eval/restored/pesq_wb": 1.03,
        "eval/degraded/dnsmos_ovrl": 2.08,
        "eval/restored/dnsmos_ovrl": 1.58,
    }
    test_set = "the last 4 utterances of data=demo, degradation=default, seed=1234"
    experiment = client.get_experiment_by_name("evaluate") or client.get_experiment(
        client.create_experiment("evaluate")
    )
    evaluation = client.create_run(experiment.experiment_id, run_name="evaluate-chain").info.run_id
    log_dataset_inputs(client, evaluation, [mlflow_dataset(DEMO_DIR, "demo-test", "0123abcd")], "evaluation")
    client.set_tag(
        evaluation,
        "mlflow.note.content",
        describe_evaluation(
            mode="chain",
            evaluated=[f"vocoder: run `{trained.info.run_id}`"],
            test_set=test_set,
            metrics=metrics,
            listening=ui_url(experiment.experiment_id, evaluation, page="artifactPath/listening/index.html"),
            model_version="models:/speech-restoration/1",
        ),
    )
    client.set_terminated(evaluation, "FINISHED")
    client.create_registered_model("speech-restoration")
    client.create_model_version("speech-restoration", f"runs:/{trained.info.run_id}/checkpoints", trained.info.run_id)
    said = record_evaluation(client, "1", metrics, evaluation, test_set, [f"vocoder: run `{trained.info.run_id}`"])
    assert said.startswith("models:/speech-restoration/1 is now @champion")

    page.goto(ui_url(experiment.experiment_id, evaluation, base=dashboard["server"].uri))
    page.get_by_text("Evaluation · chain", exact=False).first.wait_for()
    page.wait_for_timeout(500)
    _shot(page, "evaluation-run")
    assert page.get_by_text(f"Evaluation · chain · {test_set}", exact=False).first.is_visible()
    assert page.get_by_text(
        "Restored audio is worse than the degraded input on STOI, PESQ-WB, DNSMOS OVRL", exact=False
    ).first.is_visible()
    assert page.get_by_text("demo-test (0123abcd)").first.is_visible()  # the test set, as the run's input

    page.goto(f"{dashboard['server'].uri}/#/models/speech-restoration")
    page.get_by_text("@ champion", exact=False).or_(page.get_by_text("champion")).first.wait_for()
    page.wait_for_timeout(500)
    _shot(page, "registered-model")
    assert page.get_by_text("champion").first.is_visible()
    page.goto(f"{dashboard['server'].uri}/#/models/speech-restoration/versions/1")
    page.get_by_text("Restoration chain:", exact=False).first.wait_for()
    _shot(page, "registered-model-version")
    assert (
        page.get_by_text(f"Evaluated by run {evaluation}", exact=False).first.is_visible()
        or page.get_by_text(evaluation).first.is_visible()
    )
    assert page.get_by_text("champion").first.is_visible()
