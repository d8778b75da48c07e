"""Settings that could only fail later or act silently (a batch larger than the training set, a crop of no samples, a
poll loop that never waits) are refused at start-up, on a fresh start and on resume: exit code 2, one message naming
the key and what to do, and nothing written (session.check_settings with config.check_values, Stage.check_data)."""

import pytest
from helpers import TINY, all_runs, snapshot, stage_runs
from mlflow import MlflowClient

from pipeline.config import ConfigError, check_values, compose_config
from pipeline.engine.cli import EXIT_BAD_INPUT, EXIT_OK
from pipeline.engine.session import run_stage
from pipeline.stages.train_adapter import TrainAdapter, TrainAdapterConfig
from pipeline.stages.train_asr import TrainAsrConfig

BAD = [
    ("batch_size=100000", "batch_size=100000 is larger than the training set (32 examples); lower batch_size"),
    (
        "data.segment_seconds=0",
        "data.segment_seconds=0.0 must be positive; pass data.segment_seconds=<a value above 0> (the default is 1.0)",
    ),
    ("data.segment_seconds=-1", "data.segment_seconds=-1.0 must be positive"),
    ("degradation.packet_ms=0", "degradation.packet_ms=0.0 must be positive"),
    ("tracking.stop_poll_seconds=0", "tracking.stop_poll_seconds=0.0 must be positive"),
    (
        "data.num_workers=-1",
        "data.num_workers=-1 must be zero or more; pass data.num_workers=<a value of 0 or more> (the default is 0)",
    ),
    (
        "tracking.lease_timeout_seconds=5",
        "tracking.lease_timeout_seconds=5.0 must be longer than tracking.lease_heartbeat_seconds=10.0",
    ),
]


@pytest.mark.parametrize("override, message", BAD)
def test_a_setting_that_would_fail_later_is_refused_before_a_run_is_created(store, capfd, override, message):
    assert run_stage(TrainAdapter, [*TINY, "trainer.max_steps=2", override]) == EXIT_BAD_INPUT
    err = capfd.readouterr().err
    assert message in err and "Traceback" not in err
    assert not all_runs(MlflowClient())


def test_a_resume_with_such_a_setting_leaves_a_finished_run_as_it_was(store, capfd):
    assert run_stage(TrainAdapter, [*TINY, "trainer.max_steps=2", "validation.interval=0"]) == EXIT_OK
    client = MlflowClient()
    (run,) = stage_runs(client)
    before = snapshot(client)
    for override, message in BAD:
        capfd.readouterr()
        assert (
            run_stage(TrainAdapter, [f"resume_run={run.info.run_id}", "trainer.max_steps=4", override])
            == EXIT_BAD_INPUT
        ), override
        err = capfd.readouterr().err
        assert message in err and "Traceback" not in err, override
    assert snapshot(client) == before
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_the_lengths_of_other_stages_are_checked_too():
    with pytest.raises(ConfigError, match=r"light_max_seconds=0.0 must be positive"):
        check_values(TrainAsrConfig, compose_config("train_asr", ["light_max_seconds=0"]))
    with pytest.raises(ConfigError, match=r"max_seconds=0.0 must be positive; .* or leave it unset"):
        check_values(TrainAsrConfig, compose_config("train_asr", ["max_seconds=0"]))  # 0 meant "no limit"
    check_values(TrainAdapterConfig, compose_config("train_adapter", []))  # the defaults pass
