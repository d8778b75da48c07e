"""Secrets that reach a setting through an interpolation or from the environment are written nowhere: not in the
run name, params, tags, description, artifacts, checkpoints or the log (config.to_container, config.redact)."""

import logging
import sys

import pytest
from helpers import TINY, loss_history, stage_runs
from mlflow import MlflowClient
from omegaconf import OmegaConf

from pipeline.config import (
    ConfigError,
    RedactingFilter,
    check_values,
    compose_config,
    config_diff,
    environment_secrets,
    from_container,
    redact,
    to_container,
)
from pipeline.engine.cli import EXIT_OK
from pipeline.engine.session import plan_job, run_stage
from pipeline.stages.train_adapter import TrainAdapter, TrainAdapterConfig

SECRET = "s3cr3t-Value-0f-the-env"  # in a variable named like a secret
PLAIN = "plain-value-of-an-env-var"  # in a variable named like anything else
VAULT = "what-a-custom-resolver-says"


@pytest.fixture
def vault():
    """A custom resolver, as a team's plugin would register one: ``${vault:key}``."""
    OmegaConf.register_new_resolver("vault", lambda key: VAULT)
    yield
    OmegaConf.clear_resolver("vault")


def test_interpolated_secrets_appear_nowhere_in_the_store_or_the_log_and_a_resume_is_unchanged(
    store, capfd, monkeypatch, vault
):
    monkeypatch.setenv("PIPELINE_TEST_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("PIPELINE_TEST_LABEL", PLAIN)
    monkeypatch.setenv("PIPELINE_TEST_SEGMENT", "0.5")
    job = [
        *TINY,
        "trainer.max_steps=4",
        "checkpoint.save_interval=2",
        "validation.interval=0",
        "tracking.run_name=${oc.env:PIPELINE_TEST_SECRET_ACCESS_KEY}",
        "data.segment_seconds=${oc.env:PIPELINE_TEST_SEGMENT}",
    ]  # used resolved, stored as written
    added = [
        "+tracking.tags.note=${oc.env:PIPELINE_TEST_SECRET_ACCESS_KEY}",
        "+tracking.tags.label=run-of-${oc.env:PIPELINE_TEST_LABEL}",
        "+tracking.tags.vault=${vault:db}",
        f"+tracking.tags.pasted=key-{SECRET}",
    ]  # equal to a secret of the environment
    assert run_stage(TrainAdapter, [*job, *added]) == EXIT_OK
    client = MlflowClient()
    (run,) = stage_runs(client)
    run_id = run.info.run_id
    assert run.info.run_name == "${oc.env:PIPELINE_TEST_SECRET_ACCESS_KEY}"  # as written
    assert run.data.tags["label"] == "run-of-${oc.env:PIPELINE_TEST_LABEL}"
    assert run.data.tags["vault"] == "${vault:db}" and run.data.tags["pasted"] == "key-***"
    assert run.data.params["data.segment_seconds"] == "${oc.env:PIPELINE_TEST_SEGMENT}"

    # The same command line resumes unchanged (the stored interpolations resolve again) and bit-identically: a
    # branch from step 2 trains steps 3-4 to the same losses.
    resume = [*job, f"resume_run={run_id}", "resume_step=2"]
    assert plan_job(TrainAdapter, resume, client).changes == {}
    assert run_stage(TrainAdapter, resume) == EXIT_OK
    branch = next(r for r in stage_runs(client) if r.info.run_id != run_id)
    assert branch.data.tags["resume.branch_of"] == run_id
    assert loss_history(client, branch.info.run_id) == loss_history(client, run_id)

    log = capfd.readouterr()
    assert "Configuration changes detected" not in log.err
    texts = {"log": log.out + log.err}
    for r in stage_runs(client):
        texts[f"{r.info.run_id} name, params, tags, description"] = str((r.info.run_name, r.data.params, r.data.tags))
    # every file of the store: the SQLite database (runs, logged models, datasets) and every artifact (config.yaml,
    # attempt records, checkpoints' meta.json and index.csv, model/), and the checkpoints' staging area
    for path in store.rglob("*"):
        if path.is_file():
            texts[str(path.relative_to(store))] = path.read_bytes().decode("latin-1")
    assert any(p.endswith("meta.json") for p in texts) and any(p.endswith("config.yaml") for p in texts)
    leaks = {where: value for where, text in texts.items() for value in (SECRET, PLAIN, VAULT) if value in text}
    assert leaks == {}


def test_a_config_is_stored_as_written_and_read_back_resolving_its_interpolations_again(monkeypatch):
    monkeypatch.setenv("PIPELINE_TEST_ROOT", "/data/a")
    cfg = compose_config(
        "train_adapter",
        [
            "data.root=${oc.env:PIPELINE_TEST_ROOT}/corpus",
            "validation.interval=${trainer.max_steps}",
            r"tracking.run_name='cost \${x}'",
        ],
    )  # an escaped, literal ${
    stored = to_container(cfg)
    assert stored["data"]["root"] == "${oc.env:PIPELINE_TEST_ROOT}/corpus"
    assert stored["validation"]["interval"] == "${trainer.max_steps}"
    back = from_container(TrainAdapterConfig, stored)
    assert config_diff(cfg, back) == {}
    assert (back.data.root, back.validation.interval, back.tracking.run_name) == ("/data/a/corpus", 2000, "cost ${x}")
    monkeypatch.setenv("PIPELINE_TEST_ROOT", "/data/b")  # e.g. another node's scratch directory
    assert back.data.root == "/data/b/corpus"
    # a checkpoint of an earlier release holds its config resolved: a ${ there is literal text
    legacy = from_container(TrainAdapterConfig, {"tracking": {"run_name": "cost ${x}"}}, as_written=False)
    assert legacy.tracking.run_name == "cost ${x}"


def test_values_equal_to_a_secret_of_the_environment_are_masked_but_short_ones_are_not(monkeypatch):
    monkeypatch.setenv("PIPELINE_TEST_API_TOKEN", "tok-1234567890")
    monkeypatch.setenv("PIPELINE_TEST_SIGNING_KEY", "k3y-abcdefgh")
    monkeypatch.setenv("PIPELINE_TEST_DISABLE_TOKEN", "1")  # a flag: "1" must not mask every 1
    monkeypatch.setenv("PIPELINE_TEST_TOKEN_FILE", "/run/secrets/token-file")  # a path, not the secret
    monkeypatch.setenv("PIPELINE_TEST_DB", "postgresql://bob:db-password-99@db/x")
    secrets = environment_secrets()
    assert {"tok-1234567890", "k3y-abcdefgh", "db-password-99"} <= set(secrets)
    assert "1" not in secrets and "/run/secrets/token-file" not in secrets
    assert redact(
        {
            "tracking.run_name": "run tok-1234567890 k3y-abcdefgh",
            "batch_size": 1,
            "seed": "1",
            "note": "pw=db-password-99",
            "path": "/run/secrets/token-file",
        }
    ) == {
        "tracking.run_name": "run *** ***",
        "batch_size": 1,
        "seed": "1",
        "note": "pw=***",
        "path": "/run/secrets/token-file",
    }


def test_log_records_are_masked_tracebacks_included(monkeypatch):
    monkeypatch.setenv("PIPELINE_TEST_PASSWORD", "hunter2-hunter2")
    try:
        raise ValueError("cannot open /data/hunter2-hunter2")
    except ValueError:
        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "run %s: %s", ("a", "hunter2-hunter2"), sys.exc_info()
        )
    assert RedactingFilter().filter(record)
    text = logging.Formatter().format(record)
    assert "run a: ***" in text and "cannot open /data/***" in text and "hunter2" not in text


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "tracking.run_name=${oc.env:PIPELINE_TEST_UNSET}",
            "tracking.run_name=${oc.env:PIPELINE_TEST_UNSET} cannot be resolved: KeyError raised while resolving "
            "interpolation: \"Environment variable 'PIPELINE_TEST_UNSET' not found\"",
        ),
        (
            "tracking.run_name=${nowhere:x}",
            "tracking.run_name=${nowhere:x} cannot be resolved: Unsupported interpolation",
        ),
        (
            "trainer.max_steps=${oc.env:PIPELINE_TEST_API_TOKEN}",
            "trainer.max_steps=${oc.env:PIPELINE_TEST_API_TOKEN} cannot "
            "be resolved: what it resolves to does not fit the setting's type (not shown: it may be a secret)",
        ),
    ],
)
def test_an_interpolation_that_does_not_resolve_is_refused_without_showing_its_value(monkeypatch, override, message):
    monkeypatch.setenv("PIPELINE_TEST_API_TOKEN", "not-a-number-secret")
    monkeypatch.delenv("PIPELINE_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError) as err:
        check_values(TrainAdapterConfig, compose_config("train_adapter", [override]))
    assert message in str(err.value) and "not-a-number-secret" not in str(err.value)
