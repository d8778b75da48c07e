"""Stop requests with real signals and a real tracking store."""

import os
import signal
import time

import pytest
from helpers import wait_for
from mlflow import MlflowClient

from pipeline.engine import stopping
from pipeline.engine.stopping import AbortTraining, StopController


@pytest.fixture
def run_id(store):
    client = MlflowClient()
    return client.create_run(client.create_experiment("stop")).info.run_id


def test_first_signal_requests_a_stop_and_a_later_second_one_aborts(run_id):
    with StopController(MlflowClient(), run_id, poll_seconds=60) as stopper:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stopper.requested and stopper.reason == "signal"
        os.kill(os.getpid(), signal.SIGINT)  # within the grace period: `mlflow run` forwarding the same stop
        time.sleep(stopping.SECOND_SIGNAL_GRACE_S + 0.1)
        with pytest.raises(AbortTraining):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


def test_no_abort_while_the_run_is_being_ended(run_id):
    with StopController(MlflowClient(), run_id, poll_seconds=60) as stopper:
        os.kill(os.getpid(), signal.SIGTERM)
        stopper.abortable = False
        time.sleep(stopping.SECOND_SIGNAL_GRACE_S + 0.1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert stopper.reason == "signal"


def test_stop_tag_is_noticed_at_the_next_poll(run_id):
    client = MlflowClient()
    with StopController(client, run_id, poll_seconds=0.2) as stopper:
        time.sleep(0.5)
        assert not stopper.requested
        client.set_tag(run_id, "stop_requested", "true")
        wait_for(lambda: stopper.requested, timeout=60, what="stop request")  # a generous wait
        assert stopper.reason == "tag"


def test_an_abort_in_process_returns_its_exit_code_and_ends_the_run_killed(store, monkeypatch):
    """A second signal aborts the job; run_stage reports it instead of ending the process, so a caller that
    runs trials in its own process (a sweep) stays alive; only the command-line entry exits at once."""
    from helpers import TINY, stage_runs

    from pipeline.engine.cli import EXIT_ABORTED
    from pipeline.engine.session import run_stage
    from pipeline.engine.trainer import Engine
    from pipeline.stages.train_adapter import TrainAdapter

    def abort(self):
        raise AbortTraining()

    monkeypatch.setattr(Engine, "fit", abort)
    assert run_stage(TrainAdapter, [*TINY, "trainer.max_steps=4"]) == EXIT_ABORTED
    client = MlflowClient()
    (run,) = stage_runs(client)
    assert run.info.status == "KILLED"
    assert run.data.tags["stopped_by"] == "signal" and run.data.tags["stop.aborted"] == "true"
