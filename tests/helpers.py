"""Helpers the tests share: tiny configs, subprocess runners, readers of a tracking store, and trained stores built
once per test session (``cached_store``). Fixtures live in conftest.py."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from pipeline.engine.checkpointing import RetentionPolicy
from pipeline.ops.soak_clean import CHAIN_STEPS  # the tiny chain's training steps, shared with the cleaning soak

REPO = Path(__file__).resolve().parents[1]
STORE_TEMPLATE_ENV = "PIPELINE_TEST_STORE_TEMPLATE"  # the directory of an empty tracking store to copy
PYTHON = sys.executable
VENV_BIN = str(Path(PYTHON).parent)

# The chains the ``chain`` fixture trains (tests/conftest.py), by kind: each step's arguments.
TINY_CHAIN = {
    "train_adapter": ["ssl=tiny", "adapter.bottleneck=16", *CHAIN_STEPS],
    "pretrain_vocoder": ["ssl=tiny", "vocoder=tiny", *CHAIN_STEPS],
    "finetune_vocoder": CHAIN_STEPS,
}
# the chain of the log-mel front end with its feature cleaner and the Vocos-style generator (main.preset=quality's)
LOGMEL_CHAIN = {
    "train_adapter": ["ssl=logmel", "adapter.cleaner_blocks=2", "adapter.cleaner_dim=32", *CHAIN_STEPS],
    "pretrain_vocoder": ["ssl=logmel", "vocoder=vocos_tiny", "vocoder.vocos_dim=32", *CHAIN_STEPS],
    "finetune_vocoder": CHAIN_STEPS,
}
CHAINS = {"tiny": TINY_CHAIN, "logmel_vocos": LOGMEL_CHAIN}


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


# The vocoder stages' tiny job: the tiny encoder and HiFi-GAN, half-second crops (finetune_vocoder takes the
# encoder from its adapter run: VOCODER_COMMON alone).
VOCODER_COMMON = [
    "batch_size=4",
    "data.segment_seconds=0.5",
    "trainer.log_interval=1",
    "tracking.system_metrics=false",
    "tracking.flush_seconds=0.2",
    "tracking.stop_poll_seconds=0.5",
]
TINY_VOCODER = ["ssl=tiny", *VOCODER_COMMON, "vocoder=tiny", "optim.lr=1e-3"]
VOCODER_TRAIN_KEYS = (
    "train/loss",
    "train/adv",
    "train/fm",
    "train/mel",
    "train/d_loss",
    "train/d_real",
    "train/d_fake",
)
# train_asr in seconds on a CPU: tiny Conformer, 8 training utterances, 2 batches of 4 per epoch.
TINY_ASR = [
    "asr=tiny",
    "batch_size=4",
    "max_samples=8",
    "optim.warmup_steps=2",
    "trainer.log_interval=1",
    "tracking.system_metrics=false",
    "tracking.flush_seconds=0.2",
    "tracking.stop_poll_seconds=0.5",
]
# the stage a tiny sweep tunes: 9 steps, validated every 3
SWEEP_STAGE = [*TINY, "trainer.max_steps=9", "validation.interval=3", "checkpoint.save_interval=9"]
# clean_corpus in small, quick batches with a small listening page
CLEAN_FAST = ["files_per_batch=2", "commit_seconds=0.2", "listen_random=1", "listen_lowest=1"]
# prepare_data's small job: two variants of two examples, shards of 10
PREPARE_SMALL = ["variants=2", "shard_size=10", "data.val_size=4", "examples=2"]
DEMO_WAV = REPO / "pipeline" / "data" / "demo" / "wavs" / "DEMO-0001.wav"  # one file of the embedded corpus
FAKE_RUN_ID = "0123456789abcdef0123456789abcdef"  # well-formed, in no store


def env_for(workdir: Path) -> dict[str, str]:
    """The environment of a process that tracks into ``workdir``'s SQLite store (seeded: ``seed_store``)."""
    seed_store(workdir)
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


def mlflow_command(entry: str, *params: str, experiment: str | None = None) -> list[str]:
    """``mlflow run <repo> -e <entry> --env-manager local -P ...``, tracked into the experiment named after the
    entry point unless ``experiment`` names another."""
    cmd = [os.path.join(VENV_BIN, "mlflow"), "run", str(REPO), "-e", entry, "--env-manager", "local"]
    cmd += ["--experiment-name", experiment or entry]
    for p in params:
        cmd += ["-P", p]
    return cmd


def mlflow_run(
    workdir: Path, *params: str, timeout: float = 300, entry: str = "train_adapter", experiment: str | None = None
) -> subprocess.CompletedProcess:
    """``mlflow_command`` run to its end in ``workdir`` with that directory's store."""
    cmd = mlflow_command(entry, *params, experiment=experiment)
    return subprocess.run(cmd, cwd=workdir, env=env_for(workdir), capture_output=True, text=True, timeout=timeout)


def stage_runs(client: MlflowClient, stage: str = "train_adapter"):
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, f"tags.stage = '{stage}'", order_by=["attributes.start_time ASC"])


def one_run(client: MlflowClient, stage: str = "train_adapter"):
    """The one run of ``stage`` in the store (one job, one run: more is a failure)."""
    runs = stage_runs(client, stage)
    assert len(runs) == 1, f"one job, one run: {len(runs)} runs of {stage}"
    return client.get_run(runs[0].info.run_id)


def only_run(client: MlflowClient, stage: str) -> str:
    """The ID of the one run of ``stage`` in the store."""
    return one_run(client, stage).info.run_id


def finished_run(client: MlflowClient) -> str:
    """A finished two-step tiny train_adapter run in the current store, its lease released at the end: its ID."""
    from pipeline.engine.cli import EXIT_OK
    from pipeline.engine.session import run_stage
    from pipeline.stages.train_adapter import TrainAdapter

    job = [*TINY, "trainer.max_steps=2", "checkpoint.save_interval=2", "validation.interval=0"]
    assert run_stage(TrainAdapter, job) == EXIT_OK
    run_id = stage_runs(client)[0].info.run_id
    assert not any(key.startswith("lease.") for key in client.get_run(run_id).data.tags)  # released at the end
    return run_id


def attempt_files(client: MlflowClient, run_id: str) -> list[str]:
    """The attempt records of a run (config/attempt-<n>.yaml), sorted."""
    return sorted(a.path for a in client.list_artifacts(run_id, "config") if "attempt-" in a.path)


def all_runs(client: MlflowClient):
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, "", run_view_type=3)


def untrained_val_loss(stage_cls, args: list[str]) -> tuple[float, dict[str, float]]:
    """The validation loss (total, parts) of ``stage_cls`` with ``args`` as a run initialises it (same seed, same
    build, before any step), over its whole validation set."""
    from pipeline.config import compose_config
    from pipeline.engine.session import seed_everything
    from pipeline.engine.stage import Precision

    cfg = stage_cls.resolve_config(compose_config(stage_cls.name, args))
    seed_everything(int(cfg.seed))
    stage = stage_cls(cfg, Precision.from_config("cpu", "32"))
    stage.build()
    for module in stage.modules.values():
        module.eval()
    batch = stage.collate([stage.val_set[i] for i in range(len(stage.val_set))])
    with torch.no_grad():
        total, parts = stage.compute_loss(batch)
    return float(total), {key: float(value) for key, value in parts.items()}


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


def free_port() -> int:
    from pipeline.ops.localserver import free_port

    return free_port()


@contextmanager
def private_store(root: Path):
    """Work in ``root`` with its own SQLite tracking store while the block runs (module-scoped fixtures;
    ``store`` is the same for one test)."""
    seed_store(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        yield root


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


def _shared_dir(tmp_path_factory) -> Path:
    """A directory every worker of this test session sees: pytest-xdist's workers share their base's parent."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, name: str, key: object, build: Callable[[], dict]) -> tuple[Path, dict]:
    """The directory where ``build()`` made a tracking store once per test session, and ``build``'s answer (what
    the callers need to know of the store, e.g. run IDs: JSON). ``build()`` runs in an empty directory with its
    own SQLite store (see ``private_store``). The first caller of a ``(name, key)`` builds it under a file lock
    while pytest-xdist's other workers wait; ``key`` holds everything the build depends on (its overrides).
    Callers must not write into the directory: ``cached_store`` gives each its own copy."""
    digest = hashlib.sha256(json.dumps([name, key], sort_keys=True, default=str).encode()).hexdigest()[:12]
    built = _shared_dir(tmp_path_factory) / f"store-{name}-{digest}"
    answer = built / "answer.json"
    with open(f"{built}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not answer.exists():
            shutil.rmtree(built, ignore_errors=True)
            built.mkdir()
            with private_store(built):
                info = build()
            answer.write_text(json.dumps(info))
    return built, json.loads(answer.read_text())


def cached_store(tmp_path_factory, name: str, key: object, build: Callable[[], dict]) -> tuple[Path, dict]:
    """A tracking store built once per test session (``built_once``) and copied for each caller: a directory of
    its own and ``build``'s answer, so what one test module writes into its store is not seen by another."""
    copy = tmp_path_factory.mktemp(name)
    return copy, copied_store(tmp_path_factory, copy, name, key, build)


def copied_store(tmp_path_factory, directory: Path, name: str, key: object, build: Callable[[], dict]) -> dict:
    """``built_once``'s store copied into ``directory`` (a test's ``store``: its empty store is replaced, its runs,
    artifacts and staged checkpoints are the copy's); returns ``build``'s answer. For a function-scoped fixture
    that would otherwise train the same runs again for every test that asks for it."""
    built, answer = built_once(tmp_path_factory, name, key, build)
    shutil.copytree(built, directory, symlinks=True, dirs_exist_ok=True)
    _move_store(Path(directory) / "mlflow.db", str(built), str(directory))
    forget_artifact_repositories()
    return answer


def forget_artifact_repositories() -> None:
    """Drop MLflow's cache of artifact repositories. MLflow keeps one per run in the process, keyed by the run's ID
    alone, whatever the store: a copied store's runs have the original's IDs, so without this a test writing an
    artifact to its copy writes it into the store it was copied from (the build's, shared by every test). A private
    name: this fails with an AttributeError when MLflow renames it."""
    from mlflow.tracking._tracking_service import utils

    utils._artifact_repos_cache.clear()


def seed_store(directory: Path) -> None:
    """Give ``directory`` an empty tracking store (``mlflow.db``) copied from the test session's template (conftest's
    ``empty_store_template``) unless it has one: MLflow creates a new SQLite store's tables with 40-odd schema
    migrations, seconds per store, where a copy opens in a fraction of a second."""
    template, db = os.environ.get(STORE_TEMPLATE_ENV), Path(directory) / "mlflow.db"
    if template and not db.exists():
        shutil.copy(Path(template) / "mlflow.db", db)
        _move_store(db, template, str(directory))


def _move_store(db: Path, old: str, new: str) -> None:
    """Point a copied SQLite tracking store at its new place: every text that names the old directory (artifact
    locations of experiments, runs and logged models) names the new one."""
    with sqlite3.connect(db) as con:
        tables = [row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for column in con.execute(f'PRAGMA table_info("{table}")').fetchall():
                if column[2].upper() in ("", "TEXT") or "CHAR" in column[2].upper():
                    name = column[1]
                    con.execute(
                        f'UPDATE "{table}" SET "{name}" = REPLACE("{name}", ?, ?) WHERE "{name}" LIKE ?',
                        (old, new, f"%{old}%"),
                    )


def demo_wave(index: int = 0):
    """One file of the embedded demo corpus: (float32 samples, sample rate)."""
    import soundfile as sf

    from pipeline.data.corpus import read_corpus

    return sf.read(str(read_corpus("ljspeech", None)[index].path), dtype="float32")


def peak_rss(pid: int) -> int:
    """A process's peak resident memory so far (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))


def http_status(url: str) -> int:
    """The status of a GET of ``url``; 0 when nothing answers."""
    import urllib.error
    import urllib.request

    try:
        return urllib.request.urlopen(url, timeout=5).status
    except (urllib.error.URLError, OSError):
        return 0


def post_json(url: str, request, timeout: float = 120) -> tuple[int, object]:
    """POST ``request`` (JSON, or a string sent as it is) to ``url``: the status and the decoded answer."""
    import urllib.error
    import urllib.request

    data = request if isinstance(request, str) else json.dumps(request)
    req = urllib.request.Request(url, data=data.encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        text = err.read().decode()
        try:
            return err.code, json.loads(text)
        except ValueError:
            return err.code, text


def checkpoint_models(client: MlflowClient, run_id: str, status: str | None = None) -> dict[int, object]:
    """The run's models by step (MLflow's ``status = ...`` filter compares its integer column with the name)."""
    run = client.get_run(run_id)
    found = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run_id}'")
    return {int(m.tags["checkpoint.step"]): m for m in found if status in (None, m.status.name)}


# A run whose checkpoints retention reads back (tests of the index and of damaged ones)
def committed_run(steps_and_losses, policy):
    """A run whose CheckpointStore committed a checkpoint at each step with that val/loss."""
    from mlflow import MlflowClient

    from pipeline.engine.checkpointing import CheckpointStore

    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("retention")).info.run_id
    store = CheckpointStore(client, run_id, Path(".checkpoints"), policy)
    for step, loss in steps_and_losses:
        meta = {
            "format_version": 1,
            "stage": "x",
            "step": step,
            "epoch": 0,
            "created": "2026-01-01T00:00:00",
            "metrics": {"val/loss": loss},
        }
        store.save(
            step,
            {"w": torch.full((4,), float(step))},
            meta,
            {"name": f"step-{step:08d}", "step": step, "val/loss": loss},
        )
    store.close()
    return client, run_id


def resume_and_commit(client, run_id, policy, step):
    """What a resumed job does: read the index back, then commit one more checkpoint."""
    from pipeline.engine.checkpointing import CheckpointStore, list_checkpoints, read_index

    store = CheckpointStore(client, run_id, Path(".checkpoints"), policy, read_index(client, run_id))
    store.save(
        step,
        {"w": torch.zeros(4)},
        {"format_version": 1, "step": step, "metrics": {"val/loss": 0.9}},
        {"name": f"step-{step:08d}", "step": step, "val/loss": 0.9},
    )
    store.close()
    return list_checkpoints(client, run_id)


POLICY = RetentionPolicy(keep_last_n=1, keep_best_k=2, monitor="val/loss", mode="min")


HISTORY = [(10, 0.5), (20, 0.1), (25, 0.2)]  # best: 20, then 25
