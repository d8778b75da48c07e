"""Fixtures the tests share: a private SQLite tracking store per test, PostgreSQL, S3 (moto), a tracking server and
the trained tiny chain. Helpers (tiny configs, subprocess runners, store readers) live in helpers.py."""

from __future__ import annotations

import os

# One intra-op thread per test process, set before torch is imported here or in any job a test starts (they inherit
# it). pytest-xdist already runs one worker per core; torch's default of one thread per core in each worker, and in
# each training subprocess, oversubscribes the cores, and its idle threads spin: the unit/stages tests took 232 s
# (405 s of CPU) with the default and 142 s (208 s of CPU) with one thread, on the 2-core machine. A user who
# wants another count exports it before pytest.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import subprocess
from pathlib import Path

import pytest
from helpers import (
    CHAINS,
    PREPARE_SMALL,
    STORE_TEMPLATE_ENV,
    built_once,
    cached_store,
    free_port,
    private_store,
    seed_store,
    stage_runs,
)
from mlflow import MlflowClient


@pytest.fixture(scope="session", autouse=True)
def empty_store_template(tmp_path_factory):
    """An empty SQLite tracking store made once per test session, which ``seed_store`` copies into every test's
    store directory (``store``, ``private_store``, ``env_for``)."""
    import mlflow

    built, _ = built_once(
        tmp_path_factory, "empty", mlflow.__version__, lambda: MlflowClient().search_experiments() and {}
    )
    os.environ[STORE_TEMPLATE_ENV] = str(built)
    yield built
    os.environ.pop(STORE_TEMPLATE_ENV, None)


@pytest.fixture(autouse=True)
def environment_kept():
    """A test that leaves a variable naming a store, a server, a run or credentials changed in this process fails,
    naming it: the next test in the same worker would otherwise talk to a store or server that is gone (use
    ``monkeypatch.setenv``). The defaults a job sets for its own process (``MLFLOW_HTTP_REQUEST_*``, …) may stay."""
    watched = ("MLFLOW_TRACKING_", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_", "MLFLOW_S3_", "MLFLOW_REGISTRY_", "AWS_")
    before = {key: value for key, value in os.environ.items() if key.startswith(watched)}
    yield
    after = {key: value for key, value in os.environ.items() if key.startswith(watched)}
    changed = sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
    assert not changed, f"the test left these environment variables changed: {changed}"


@pytest.fixture(autouse=True)
def torch_threads_kept():
    """Code run in the test's process may set torch's thread count for that process (the cleaning benchmark does,
    ``bench/cleaning_measure.py``, and a restore worker where it runs in-process); put it back, or a later test in
    the same worker computes its in-process reference run with another count than the subprocess it compares with
    bit for bit (the sums differ in the last bit: 0.07803687 against 0.07803686 at step 1)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """Run in a fresh directory with its own SQLite tracking store; returns the directory."""
    seed_store(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return tmp_path


@pytest.fixture
def armed():
    """Arm fault points (pipeline/common/faults.py) for one in-process job; always disarmed afterwards."""
    from pipeline.common import faults

    yield faults.arm
    faults.disarm()


@pytest.fixture
def shards(store) -> Path:
    """A small prepare_data job's shards in the test's store (helpers.PREPARE_SMALL)."""
    from pipeline.engine.cli import EXIT_OK
    from pipeline.prepare_data import run_prepare

    assert run_prepare([f"output={store}/shards", *PREPARE_SMALL]) == EXIT_OK
    return store / "shards"


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
    data, port = os.path.join(root, "data"), free_port()

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

    port = free_port()
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


def train_chain(steps: dict[str, list[str]]) -> dict[str, str]:
    """train_adapter -> pretrain_vocoder -> finetune_vocoder with ``steps``' arguments in the current store; their
    run IDs."""
    from pipeline.engine.cli import EXIT_OK
    from pipeline.engine.session import run_stage
    from pipeline.stages.finetune_vocoder import FinetuneVocoder
    from pipeline.stages.pretrain_vocoder import PretrainVocoder
    from pipeline.stages.train_adapter import TrainAdapter

    assert run_stage(TrainAdapter, steps["train_adapter"]) == EXIT_OK
    assert run_stage(PretrainVocoder, steps["pretrain_vocoder"]) == EXIT_OK
    client = MlflowClient()
    adapter, vocoder = (stage_runs(client, s)[0].info.run_id for s in ("train_adapter", "pretrain_vocoder"))
    finetune = [f"adapter_run={adapter}", f"vocoder_run={vocoder}", *steps["finetune_vocoder"]]
    assert run_stage(FinetuneVocoder, finetune) == EXIT_OK
    return {"adapter": adapter, "vocoder": vocoder, "finetune": stage_runs(client, "finetune_vocoder")[0].info.run_id}


def chain_store(tmp_path_factory, kind: str):
    """A copy of the finished chain ``kind`` (``CHAINS``), trained once per test session, to work in."""
    name = "chain" if kind == "tiny" else f"chain-{kind}"
    root, runs = cached_store(tmp_path_factory, name, CHAINS[kind], lambda: train_chain(CHAINS[kind]))
    with private_store(root):
        yield {"dir": root, "kind": kind, **runs}


@pytest.fixture(scope="module")
def chain(request, tmp_path_factory):
    """A finished chain (train_adapter -> pretrain_vocoder -> finetune_vocoder) in a tracking store of the tests of
    one module: {"dir": its directory, "kind", "adapter", "vocoder", "finetune": run IDs}. The tiny one (tiny SSL
    encoder with adapters, HiFi-GAN), or with ``@pytest.mark.parametrize("chain", list(CHAINS), indirect=True)``
    each kind of ``CHAINS`` in turn (the log-mel front end with its cleaner and the Vocos-style generator too). A
    chain is trained once per test session and each module gets its own copy of the store (helpers.cached_store).
    Tests that use it work in that store (do not combine it with ``store``) and put their own files under
    ``tmp_path``."""
    yield from chain_store(tmp_path_factory, getattr(request, "param", "tiny"))


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
