"""``tracking.metric_interval``: a week-long run logs one point per interval, the mean of its steps, and a job
stopped in the middle of an interval resumes to the very points of a run that never stopped."""

from helpers import TINY, loss_history, stage_runs
from mlflow import MlflowClient

from pipeline.common import faults
from pipeline.engine import tags as tag
from pipeline.engine.cli import EXIT_OK, EXIT_STOPPED
from pipeline.engine.session import run_stage
from pipeline.engine.trainer import MetricWindow
from pipeline.stages.train_adapter import TrainAdapter

ARGS = [*TINY, "trainer.max_steps=12", "checkpoint.save_interval=3", "validation.interval=0"]


def test_a_point_is_the_mean_of_its_steps_and_a_stop_inside_an_interval_resumes_to_the_same_points(store):
    client = MlflowClient()
    interval = [*ARGS, "tracking.metric_interval=4"]
    assert run_stage(TrainAdapter, ARGS) == EXIT_OK
    assert run_stage(TrainAdapter, interval) == EXIT_OK
    every, sparse = (r.info.run_id for r in stage_runs(client))
    per_step = dict(loss_history(client, every))
    assert [s for s, _ in loss_history(client, sparse)] == [4, 8, 12]
    for step, value in loss_history(client, sparse):
        assert abs(value - sum(per_step[s] for s in range(step - 3, step + 1)) / 4) < 1e-12
    assert loss_history(client, sparse, "lr") == [(s, v) for s, v in loss_history(client, every, "lr") if s % 4 == 0]

    faults.arm("checkpoint.snapshot@2=signal:TERM")  # at step 6's checkpoint: stopped at step 6 or 7
    try:
        assert run_stage(TrainAdapter, interval) == EXIT_STOPPED
    finally:
        faults.disarm()
    run = stage_runs(client)[-1]
    stopped_at = int(run.data.tags[tag.CHECKPOINT_LATEST_STEP])
    assert stopped_at % 4 and [s for s, _ in loss_history(client, run.info.run_id)] == [4]
    assert run_stage(TrainAdapter, [f"resume_run={run.info.run_id}"]) == EXIT_OK
    assert loss_history(client, run.info.run_id) == loss_history(client, sparse)  # steps 4, 8, 12, bit for bit


def test_the_last_step_ends_a_short_interval_and_an_interval_of_one_passes_every_step():
    window = MetricWindow(4)
    assert [
        window.add(step, {"train/loss": float(step), "lr": 0.1 * step}, final=step == 6) for step in range(1, 7)
    ] == [None, None, None, {"train/loss": 2.5, "lr": 0.4}, None, {"train/loss": 5.5, "lr": 0.6000000000000001}]
    assert MetricWindow(1).add(3, {"train/loss": 1.0}, final=False) == {"train/loss": 1.0}
