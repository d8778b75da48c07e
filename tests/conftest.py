"""Shared test helpers: a private SQLite tracking store per test, tiny configs, subprocess runners."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.ops.soak_clean import CHAIN_STEPS  # the tiny chain's training steps, shared with the cleaning soak

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
VENV_BIN = str(Path(PYTHON).parent)

# A job that runs in seconds on a CPU: tiny random encoder, half-second crops, batch of 4.
TINY = [
    "ssl=tiny",
    "batch_size=4",
    "data.segment_seconds=0.5",
    "adapter.bottleneck=16",
    "trainer.log_interval=1",
    "tracking.system_metrics=false",
    "tracking.flush_seconds=0.2",
    "tracking.stop_poll_seconds=0.5",
]


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """Run in a fresh directory with its own SQLite tracking store; returns the directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return tmp_path


def env_for(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir}/mlflow.db"
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env.pop("MLFLOW_RUN_ID", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_module(workdir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m pipeline.stages.train_adapter ARGS`` in ``workdir``."""
    return subprocess.run(
        [PYTHON, "-m", "pipeline.stages.train_adapter", *args],
        cwd=workdir,
        env=env_for(workdir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def mlflow_run(
    workdir: Path, *params: str, timeout: float = 300, entry: str = "train_adapter"
) -> subprocess.CompletedProcess:
    """``mlflow run <repo> -e <entry> --env-manager local -P ...`` in ``workdir`` (experiment = entry point)."""
    cmd = [
        os.path.join(VENV_BIN, "mlflow"),
        "run",
        str(REPO),
        "-e",
        entry,
        "--env-manager",
        "local",
        "--experiment-name",
        entry,
    ]
    for p in params:
        cmd += ["-P", p]
    return subprocess.run(cmd, cwd=workdir, env=env_for(workdir), capture_output=True, text=True, timeout=timeout)


def stage_runs(client: MlflowClient, stage: str = "train_adapter"):
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, f"tags.stage = '{stage}'", order_by=["attributes.start_time ASC"])


def all_runs(client: MlflowClient):
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, "", run_view_type=3)


def loss_history(client: MlflowClient, run_id: str, key: str = "train/loss") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def wait_for(
    predicate,
    timeout: float,
    interval: float = 0.2,
    what: str = "condition",
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
):
    """Poll ``predicate`` until it returns something truthy. With ``proc``, fail as soon as that process
    has ended; with ``log`` (the file its stderr goes to), a failure shows the log's tail."""

    def fail(why: str):
        tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
        raise AssertionError(f"{why} waiting for {what}" + (f"; its log ends:\n{tail}" if tail else ""))

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            fail(f"the process exited with code {proc.returncode}")
        time.sleep(interval)
    fail(f"timed out after {timeout}s")


def _free_port() -> int:
    from pipeline.ops.localserver import free_port

    return free_port()


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL server on loopback, run as a non-root user; yields a URL prefix.

    ``f"{url}/<db>"`` names a database; databases are created with ``createdb``.
    """
    import glob
    import shutil
    import tempfile

    bindirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bindirs:
        pytest.skip("PostgreSQL server binaries not installed")
    bindir = bindirs[-1]
    root = tempfile.mkdtemp(prefix="pg-", dir="/tmp")
    os.chmod(root, 0o755)
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = os.path.join(root, "data"), _free_port()

    def pg(*cmd: str) -> None:
        subprocess.run(as_user + list(cmd), check=True, capture_output=True, text=True, cwd=root)

    pg(f"{bindir}/initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
    pg(
        f"{bindir}/pg_ctl",
        "-D",
        data,
        "-l",
        os.path.join(root, "log"),
        "-w",
        "-o",
        f"-h 127.0.0.1 -p {port} -k {root} -c max_connections=200",
        "start",
    )
    try:
        yield (
            f"postgresql+psycopg2://postgres@127.0.0.1:{port}",
            (lambda db: pg(f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", db)),
        )
    finally:
        subprocess.run(
            as_user + [f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True, cwd=root
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server over real HTTP on loopback; yields a boto3 client with bucket `test-bucket`."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
    }.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="test-bucket")
    try:
        yield client
    finally:
        server.stop()


@contextmanager
def private_store(root: Path):
    """Work in ``root`` with its own SQLite tracking store while the block runs (module-scoped fixtures;
    ``store`` is the same for one test)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        yield root


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A finished tiny chain (train_adapter -> pretrain_vocoder -> finetune_vocoder) in a tracking store shared by
    the tests of one module: {"dir": its directory, "adapter", "vocoder", "finetune": run IDs}. Tests that use it
    work in that store (do not combine it with ``store``) and put their own files under ``tmp_path``."""
    from pipeline.engine.cli import EXIT_OK
    from pipeline.engine.session import run_stage
    from pipeline.stages.finetune_vocoder import FinetuneVocoder
    from pipeline.stages.pretrain_vocoder import PretrainVocoder
    from pipeline.stages.train_adapter import TrainAdapter

    root = tmp_path_factory.mktemp("chain")
    with private_store(root):
        assert run_stage(TrainAdapter, ["ssl=tiny", "adapter.bottleneck=16", *CHAIN_STEPS]) == EXIT_OK
        assert run_stage(PretrainVocoder, ["ssl=tiny", "vocoder=tiny", *CHAIN_STEPS]) == EXIT_OK
        client = MlflowClient()
        adapter, vocoder = (stage_runs(client, s)[0].info.run_id for s in ("train_adapter", "pretrain_vocoder"))
        assert run_stage(FinetuneVocoder, [f"adapter_run={adapter}", f"vocoder_run={vocoder}", *CHAIN_STEPS]) == EXIT_OK
        yield {
            "dir": root,
            "adapter": adapter,
            "vocoder": vocoder,
            "finetune": stage_runs(client, "finetune_vocoder")[0].info.run_id,
        }


def start_stage(workdir: Path, stage: str, *args: str) -> subprocess.Popen:
    """``python -m pipeline.stages.<stage> ARGS`` in the background, stderr readable line by line."""
    return subprocess.Popen(
        [PYTHON, "-m", f"pipeline.stages.{stage}", *args],
        cwd=workdir,
        env=env_for(workdir),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )


def read_until(proc: subprocess.Popen, needle: str, timeout: float = 120) -> list[str]:
    """Read the process's stderr until a line contains ``needle``; the lines read so far."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} never appeared:\n{''.join(lines[-30:])}")


def artifact_dir(client: MlflowClient, run_id: str) -> Path:
    from urllib.parse import urlparse

    return Path(urlparse(client.get_run(run_id).info.artifact_uri).path)


def snapshot(client: MlflowClient):
    """Runs with their status, tags, metrics and every artifact file: what bad input must not change."""
    out = {}
    for run in all_runs(client):
        art = artifact_dir(client, run.info.run_id)
        files = tuple(sorted(str(p.relative_to(art)) for p in art.rglob("*"))) if art.exists() else ()
        out[run.info.run_id] = (run.info.status, dict(run.data.tags), dict(run.data.metrics), files)
    return out


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests run where CUDA is present and are skipped (with the reason) elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tracking_server(tmp_path):
    """A real ``mlflow server`` on loopback that the test may stop and start again (pipeline/ops/localserver.py)."""
    from pipeline.ops.localserver import TrackingServer

    server = TrackingServer(tmp_path)
    server.start()
    yield server
    server.stop()
