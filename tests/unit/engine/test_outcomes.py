"""The table of outcomes (pipeline/engine/outcomes.py): each way a job ends, its run status, tags and exit code;
which outcome each of the engine's errors means; the exit code of a requeued job (docs/architecture.md, Outcomes).
Pure functions: no tracking store, no training."""

import os
import stat

import pytest

from pipeline.config import ConfigError
from pipeline.config.compose import GrammarError
from pipeline.engine import outcomes
from pipeline.engine import tags as tag
from pipeline.engine.checkpoint_files import CheckpointError
from pipeline.engine.cli import (
    EXIT_ABORTED,
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REQUEUE,
    EXIT_STOPPED,
    EXIT_STORAGE,
)
from pipeline.engine.lease import LeaseHeld, LeaseLost
from pipeline.engine.outage import StorageError
from pipeline.engine.outcomes import (
    ABORTED,
    BAD_INPUT,
    DATA_FAILED,
    DIVERGED,
    FAILED,
    FINISHED,
    LEASE_LOST,
    REFUSED_WHILE_BUILDING,
    REFUSED_WHILE_OPENING,
    REFUSED_WHILE_PLANNING,
    REQUEUED,
    STOPPED,
    STORAGE_FAILED,
    Outcome,
    exit_code,
    outcome_of,
    outcome_of_stop,
    refusal_of,
)
from pipeline.engine.resume import ResumeError
from pipeline.engine.stopping import REQUEUE, AbortTraining
from pipeline.engine.tracking import AccessError
from pipeline.engine.trainer import DataWorkerDied, NonFiniteTraining


@pytest.mark.parametrize(
    "outcome, status, code, tags, stopped_by",
    [
        (FINISHED, "FINISHED", EXIT_OK, {}, None),
        (STOPPED, "KILLED", EXIT_STOPPED, {}, None),  # stopped_by: the request's reason, set when the run ends
        (REQUEUED, "KILLED", EXIT_REQUEUE, {}, REQUEUE),
        (ABORTED, "KILLED", EXIT_ABORTED, {tag.STOP_ABORTED: "true"}, "signal"),
        (BAD_INPUT, None, EXIT_BAD_INPUT, {}, None),  # refused before any run was written
        (DIVERGED, "FAILED", EXIT_FAILED, {}, None),
        (DATA_FAILED, "FAILED", EXIT_FAILED, {}, None),
        (STORAGE_FAILED, "FAILED", EXIT_STORAGE, {}, None),
        (LEASE_LOST, None, EXIT_FAILED, {}, None),  # the run is the other job's: its status is left to it
        (FAILED, "FAILED", EXIT_FAILED, {}, None),
    ],
    ids=lambda v: v.name if isinstance(v, Outcome) else None,
)
def test_each_outcome_has_its_status_exit_code_and_tags(outcome, status, code, tags, stopped_by):
    assert (outcome.status, outcome.code, dict(outcome.tags), outcome.stopped_by) == (status, code, tags, stopped_by)


def test_the_table_names_every_outcome_once_and_every_exit_code_has_one():
    table = [v for v in vars(outcomes).values() if isinstance(v, Outcome)]
    assert len({o.name for o in table}) == len(table) == 10
    codes = {EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED, EXIT_STORAGE, EXIT_REQUEUE, EXIT_ABORTED}
    assert {o.code for o in table} == codes
    assert {o.status for o in table} == {"FINISHED", "KILLED", "FAILED", None}


@pytest.mark.parametrize(
    "err, outcome",
    [
        (AbortTraining("SIGTERM"), ABORTED),
        (NonFiniteTraining("3 steps in a row had a non-finite loss"), DIVERGED),
        (DataWorkerDied("DataLoader worker (pid 1) is killed"), DATA_FAILED),
        (StorageError("writing checkpoint step-00000004 failed"), STORAGE_FAILED),
        (LeaseLost("another job took over run r"), LEASE_LOST),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_each_engine_error_while_training_means_its_outcome(err, outcome):
    assert outcome_of(err) is outcome


def test_a_subclass_of_an_engine_error_means_the_outcome_of_its_base():
    class DiskFull(StorageError):
        pass

    assert outcome_of(DiskFull("no space left")) is STORAGE_FAILED


@pytest.mark.parametrize("err", [RuntimeError("a bug"), KeyError("x"), KeyboardInterrupt(), ConfigError("late")])
def test_any_other_error_while_training_is_a_failure(err):
    assert outcome_of(err) is FAILED


@pytest.mark.parametrize(
    "stopped_by, outcome",
    [(None, FINISHED), ("signal", STOPPED), ("tag", STOPPED), ("pruned", STOPPED), ("lease lost", STOPPED)]
    + [(REQUEUE, REQUEUED)],
)
def test_a_loop_that_ran_out_finished_and_one_that_stopped_was_stopped_or_requeued(stopped_by, outcome):
    assert outcome_of_stop(stopped_by) is outcome


@pytest.mark.parametrize(
    "err, refusals, outcome",
    [
        (ConfigError("unknown key"), REFUSED_WHILE_PLANNING, BAD_INPUT),
        (GrammarError("a word that is no key=value"), REFUSED_WHILE_PLANNING, BAD_INPUT),
        (ResumeError("no such run"), REFUSED_WHILE_PLANNING, BAD_INPUT),
        (CheckpointError("unreadable"), REFUSED_WHILE_PLANNING, BAD_INPUT),
        (ValueError("out of range"), REFUSED_WHILE_PLANNING, BAD_INPUT),
        (AccessError("no permission"), REFUSED_WHILE_PLANNING, BAD_INPUT),
        (LeaseHeld("held by host pid 1"), REFUSED_WHILE_PLANNING, BAD_INPUT),
        (ValueError("batch larger than the training set"), REFUSED_WHILE_BUILDING, BAD_INPUT),
        (FileNotFoundError("no corpus"), REFUSED_WHILE_BUILDING, BAD_INPUT),
        (LeaseHeld("held by host pid 1"), REFUSED_WHILE_OPENING, BAD_INPUT),
        (AccessError("no permission to write runs"), REFUSED_WHILE_OPENING, BAD_INPUT),
        (CheckpointError("the checkpoint to branch from is gone"), REFUSED_WHILE_OPENING, FAILED),
        (OSError(28, "No space left on device"), REFUSED_WHILE_OPENING, STORAGE_FAILED),
    ],
)
def test_the_errors_that_refuse_a_job_before_it_trains_mean_their_outcome_at_each_step(err, refusals, outcome):
    assert refusal_of(err, refusals) is outcome


@pytest.mark.parametrize("refusals", [REFUSED_WHILE_PLANNING, REFUSED_WHILE_BUILDING, REFUSED_WHILE_OPENING])
def test_an_error_that_is_no_refusal_is_left_to_be_raised(refusals):
    assert refusal_of(RuntimeError("a bug"), refusals) is None
    assert refusal_of(KeyboardInterrupt(), refusals) is None


@pytest.mark.parametrize("outcome", [FINISHED, STOPPED, ABORTED, STORAGE_FAILED, LEASE_LOST, FAILED])
@pytest.mark.parametrize("requeue", ["exit", "scontrol"])
def test_the_exit_code_is_the_outcomes_but_for_a_requeue_by_scontrol(outcome, requeue):
    assert exit_code(outcome, requeue) == exit_code(outcome, requeue, rank0=False) == outcome.code


def test_a_requeued_job_exits_75_unless_it_asks_slurm_and_other_ranks_leave_that_to_rank_0():
    assert exit_code(REQUEUED, "exit") == exit_code(REQUEUED, "exit", rank0=False) == EXIT_REQUEUE
    assert exit_code(REQUEUED, "scontrol", rank0=False) == EXIT_OK


def fake_scontrol(folder, code: int) -> None:
    script = folder / "scontrol"
    script.write_text(f"#!/bin/sh\necho \"$@\" > {folder / 'called'}\necho 'refused' >&2\nexit {code}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("answer, code", [(0, EXIT_OK), (1, EXIT_REQUEUE)])
def test_rank_0_of_a_requeued_job_asks_slurm_and_exits_0_once_it_took_the_request(
    tmp_path, monkeypatch, caplog, answer, code
):
    fake_scontrol(tmp_path, answer)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    assert exit_code(REQUEUED, "scontrol") == code
    assert (tmp_path / "called").read_text().split() == ["requeue", "1234"]
    if answer:
        assert "`scontrol requeue 1234` failed (refused)" in caplog.text
    else:
        assert "Asked Slurm to requeue job 1234" in caplog.text


def test_rank_0_outside_slurm_exits_75_and_says_why(monkeypatch, caplog):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert exit_code(REQUEUED, "scontrol") == EXIT_REQUEUE
    assert "SLURM_JOB_ID is not set" in caplog.text
