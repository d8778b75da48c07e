"""clean_corpus under faults (docs/cleaning.md, Resume and stop): a restore actor SIGKILLed in the middle of a
batch, and the peak memory of one 30-minute input."""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import soundfile as sf
from helpers import CLEAN_FAST, PYTHON, demo_wave, env_for, wait_for

from pipeline.data.corpus import read_corpus
from pipeline.engine.cli import EXIT_OK, EXIT_STOPPED

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

CLEAN_FAST = ["files_per_batch=2", "commit_seconds=0.2", "scores=false", "listen_random=1", "listen_lowest=1"]
RESTORER = "MapBatches(Restorer)"  # in the actor's process title: ray::MapWorker(MapBatches(Restorer))


def demo_wave(index: int) -> tuple[np.ndarray, int]:
    return sf.read(str(read_corpus("ljspeech", None)[index].path), dtype="float32")


def short_files(root: Path, count: int) -> Path:
    root.mkdir(parents=True)
    clean, rate = demo_wave(2)
    for i in range(count):
        sf.write(root / f"utt{i:02d}.wav", clean[i * 100 : i * 100 + int(1.3 * rate)], rate)
    return root


def start_job(chain, argv: list[str], log_path: Path, faults: str = "") -> subprocess.Popen:
    """``python -m pipeline.clean_corpus ARGV`` in the chain's store, in a session of its own, faults armed in
    the driver and every Ray worker it starts (they inherit its environment)."""
    env = env_for(chain["dir"])
    env.pop("PIPELINE_FAULTS", None)
    if faults:
        env["PIPELINE_FAULTS"] = faults
    with open(log_path, "w") as out:
        return subprocess.Popen(
            [PYTHON, "-m", "pipeline.clean_corpus", *argv],
            cwd=chain["dir"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def family(pid: int) -> list[psutil.Process]:
    """The job's driver and its descendants (Ray's daemons and workers)."""
    try:
        driver = psutil.Process(pid)
        return [driver, *driver.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_family(pid: int) -> None:
    for proc in family(pid):
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def title(proc: psutil.Process) -> str:
    try:
        return " ".join(" ".join(proc.cmdline()).split())  # Ray pads a process title with spaces
    except psutil.Error:
        return ""


def stopped_restorers(pid: int) -> list[psutil.Process]:
    """The job's restore actors stopped at the ``clean.restore`` fault point (SIGSTOP: a batch in hand)."""
    out = []
    for proc in family(pid):
        try:
            if proc.status() == psutil.STATUS_STOPPED and RESTORER in title(proc):
                out.append(proc)
        except psutil.NoSuchProcess:
            pass
    return out


def end_of_job(job: subprocess.Popen, timeout: float = 600) -> int:
    """Wait for the job, letting on every restore actor that stops at the fault point later (a restarted actor
    counts its own visits); the job's exit code."""
    deadline = time.monotonic() + timeout
    while job.poll() is None and time.monotonic() < deadline:
        for proc in stopped_restorers(job.pid):
            log.info("a restarted restore actor stopped at the fault point: let go on (%s)", title(proc))
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.2)
    if job.poll() is None:
        kill_family(job.pid)
        raise AssertionError(f"the job did not end within {timeout} s")
    return job.returncode


def test_a_restore_actor_killed_mid_batch_leaves_every_input_restored_once(chain, tmp_path):
    source, out = short_files(tmp_path / "many", 12), tmp_path / "clean"
    argv = [f"run_id={chain['finetune']}", f"input={source}", f"output={out}", *CLEAN_FAST]
    job_log = tmp_path / "job.log"
    # the restore actor stops itself in its second batch (one batch restored before): SIGKILL it there
    job = start_job(chain, argv, job_log, faults="clean.restore@2=stop")
    actor = wait_for(
        lambda: stopped_restorers(job.pid), timeout=600, what="a restore actor stopped mid-batch", proc=job, log=job_log
    )[0]
    killed = f"{actor.pid}: {title(actor)}"
    actor.send_signal(signal.SIGKILL)
    code = end_of_job(job)
    text = job_log.read_text(errors="replace")
    if code == EXIT_OK:
        outcome = "Ray restarted the actor and retried its batch: the job finished by itself"
    else:  # Ray could not recover: one clear message, and a resume finishes the job
        assert "resume with: python -m pipeline.clean_corpus resume_run=" in text, text[-3000:]
        run_id = text.split("resume_run=")[-1].split()[0]
        resumed = start_job(chain, [f"resume_run={run_id}"], tmp_path / "resume.log")
        assert end_of_job(resumed) == EXIT_OK, (tmp_path / "resume.log").read_text()[-3000:]
        outcome = f"the job failed (exit code {code}) and a resume finished it"

    manifest = pd.read_parquet(out / "manifest.parquet")
    assert sorted(manifest.id) == [f"utt{i:02d}.wav" for i in range(12)]  # every input exactly once
    assert (manifest.status == "restored").all(), manifest.status.tolist()
    assert all(sf.info(path).frames > 0 for path in manifest.output)
    assert not [p for p in out.rglob("*") if p.name.endswith(".partial")]
    log.info("killed restore actor %s; %s; rows restored by %s", killed, outcome, sorted(set(manifest.worker)))


def peak_memory(job: subprocess.Popen, interval: float = 0.25) -> dict[str, float]:
    """Sample the job's processes until it ends: the peak of their summed PSS (shared pages split between the
    processes that map them) and of their summed RSS, in MiB."""
    peak = {"pss_mib": 0.0, "rss_mib": 0.0}
    while job.poll() is None:
        pss = rss = 0
        for proc in family(job.pid):
            try:
                info = proc.memory_full_info()
            except psutil.Error:
                continue
            pss, rss = pss + info.pss, rss + info.rss
        peak = {"pss_mib": max(peak["pss_mib"], pss / 2**20), "rss_mib": max(peak["rss_mib"], rss / 2**20)}
        time.sleep(interval)
    return peak


LONG_SECONDS = 30 * 60
PEAK_PSS_BOUND_MIB = 12 * 1024  # measured: 3.4 GiB PSS summed over the job's processes (2 cores, tiny chain)


def long_input(path: Path, seconds: int, rate: int = 16000) -> None:
    """Demo utterances one after another, with a little noise, as one 16 kHz 16-bit WAV."""
    utterances = [demo_wave(i)[0] for i in range(4)]
    audio = np.concatenate(utterances)
    audio = np.tile(audio, seconds * rate // len(audio) + 1)[: seconds * rate]
    audio = audio + np.random.default_rng(0).normal(0, 1e-3, len(audio)).astype(np.float32)
    sf.write(path, audio, rate, subtype="PCM_16")


def test_a_30_minute_input_is_restored_whole_within_a_loose_memory_bound(chain, tmp_path):
    source, out = tmp_path / "long", tmp_path / "clean"
    source.mkdir()
    long_input(source / "long.wav", LONG_SECONDS)
    argv = [
        f"run_id={chain['finetune']}",
        f"input={source}",
        f"output={out}",
        "scores=false",
        "listen_random=0",
        "listen_lowest=0",
    ]
    started = time.monotonic()
    job = start_job(chain, argv, tmp_path / "job.log")
    peak = peak_memory(job)
    seconds = time.monotonic() - started
    assert job.wait() == EXIT_OK, (tmp_path / "job.log").read_text()[-3000:]

    row = pd.read_parquet(out / "manifest.parquet").iloc[0]
    assert row.status == "restored" and row.seconds == LONG_SECONDS
    frames = sf.info(row.output).frames
    assert frames == LONG_SECONDS * row.output_rate, (frames, row.output_rate)
    log.info(
        "30-minute input: peak %.0f MiB PSS (%.0f MiB RSS summed); the job took %.0f s, %.1f s of it restoring",
        peak["pss_mib"],
        peak["rss_mib"],
        seconds,
        row.restore_seconds,
    )
    assert peak["pss_mib"] < PEAK_PSS_BOUND_MIB


def ray_processes(marker: str) -> list[psutil.Process]:
    """The processes of a cluster started by ``ray start --temp-dir=<marker>``: its daemons (their command lines
    name the directory) and everything they started (workers, agents)."""
    daemons = [p for p in psutil.process_iter() if marker in title(p)]
    found = {p.pid: p for p in daemons}
    for daemon in daemons:
        try:
            found.update({c.pid: c for c in daemon.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def stop_cluster(markers: list[str]) -> None:
    """SIGKILL every process of these clusters (not ``ray stop``: it would stop every Ray on the machine)."""
    for proc in [p for marker in markers for p in ray_processes(marker)]:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


COMMITTED = re.compile(r"\d+/\d+ inputs \(")  # a progress line: rows committed


def stop_if_stalled(job: subprocess.Popen, job_log: Path, patience: float = 180) -> tuple[int, bool]:
    """(exit code, stalled): the job's end, or, when it commits nothing for ``patience`` seconds, SIGTERM (and a
    second one: a job waiting for resources never gets back to its loop, where the first is acted on)."""
    last, seen = time.monotonic(), 0
    while job.poll() is None and time.monotonic() - last < patience:
        commits = len(COMMITTED.findall(job_log.read_text(errors="replace")))
        last, seen = (time.monotonic(), commits) if commits > seen else (last, seen)
        time.sleep(1)
    if job.poll() is not None:
        return job.returncode, False
    log.warning("the job committed nothing for %.0f s: stopping it with SIGTERM", patience)
    for _ in range(2):
        job.send_signal(signal.SIGTERM)
        try:
            return job.wait(timeout=60), True
        except subprocess.TimeoutExpired:
            log.warning("the job did not stop within 60 s of SIGTERM")
    kill_family(job.pid)
    return job.wait(), True


@pytest.fixture
def two_raylets(tmp_path):
    """A head node and a second raylet on this machine, 2 CPUs each (the head alone holds a job with one restore
    actor), each with its own temporary directory and ports, token authentication on; yields {"address", "env",
    "second": the second node's temporary directory}."""
    import secrets
    import shutil
    import tempfile

    from helpers import VENV_BIN, free_port

    env = {**env_for(tmp_path), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    roots = [tempfile.mkdtemp(prefix="rh", dir="/tmp"), tempfile.mkdtemp(prefix="rn", dir="/tmp")]  # short: sockets
    port = free_port()

    def ray_start(*args: str) -> None:
        done = subprocess.run(
            [f"{VENV_BIN}/ray", "start", "--disable-usage-stats", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    try:
        ray_start(
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            f"--temp-dir={roots[0]}",
            "--include-dashboard=false",
            f"--dashboard-agent-listen-port={free_port()}",
        )
        ray_start(
            f"--address=127.0.0.1:{port}",
            "--num-cpus=2",
            f"--temp-dir={roots[1]}",
            f"--dashboard-agent-listen-port={free_port()}",
        )
        yield {"address": f"127.0.0.1:{port}", "env": env, "second": roots[1]}
    finally:
        stop_cluster(roots)
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)


def test_a_second_raylet_killed_mid_job_leaves_every_input_restored_once(chain, tmp_path, two_raylets):
    source, out = short_files(tmp_path / "many", 16), tmp_path / "clean"
    argv = [
        f"run_id={chain['finetune']}",
        f"input={source}",
        f"output={out}",
        f"ray_address={two_raylets['address']}",
        "workers=2",
        *CLEAN_FAST,
    ]  # two restore actors of 1 CPU each and a scorer: the head alone cannot hold them
    job_log = tmp_path / "job.log"
    env = {**two_raylets["env"], "MLFLOW_TRACKING_URI": f"sqlite:///{chain['dir']}/mlflow.db"}
    with open(job_log, "w") as output:
        job = subprocess.Popen(
            [PYTHON, "-m", "pipeline.clean_corpus", *argv],
            cwd=chain["dir"],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def working_on_second():
        restorers = [p for p in ray_processes(two_raylets["second"]) if RESTORER in title(p)]
        return restorers and COMMITTED.search(job_log.read_text(errors="replace"))

    wait_for(
        working_on_second,
        timeout=600,
        what="a first commit with a restore actor on the second node",
        proc=job,
        log=job_log,
    )
    second = ray_processes(two_raylets["second"])
    on_second = sorted({title(p)[:40] for p in second if "raylet" not in title(p)})
    raylet = next(p for p in second if "raylet/raylet" in title(p))
    raylet.send_signal(signal.SIGKILL)
    code, stalled = stop_if_stalled(job, job_log)
    text = job_log.read_text(errors="replace")
    if code == EXIT_OK:
        outcome = "the job finished by itself"
    else:
        run_id = re.search(r"; run ([0-9a-f]{32})", text).group(1)
        done = subprocess.run(
            [PYTHON, "-m", "pipeline.clean_corpus", f"resume_run={run_id}", "workers=1"],
            cwd=chain["dir"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == EXIT_OK, done.stderr[-3000:]
        outcome = (
            f"the job {'stalled, was stopped' if stalled else 'ended'} with exit code {code}, and a resume "
            "on the head node alone (workers=1) finished it"
        )

    manifest = pd.read_parquet(out / "manifest.parquet")
    assert sorted(manifest.id) == [f"utt{i:02d}.wav" for i in range(16)]  # every input exactly once
    assert (manifest.status == "restored").all(), manifest.status.tolist()
    log.info(
        "second raylet killed while it ran %s; %s; restore workers %s", on_second, outcome, sorted(set(manifest.worker))
    )


def test_one_sigterm_stops_a_job_whose_pipeline_delivers_nothing(chain, tmp_path):
    """The stop used to be looked at only when a batch arrived: a job restoring a long file (here: a restore
    actor asleep for 10 minutes) or waiting for a lost node's actor stopped only at a second signal."""
    source, out = short_files(tmp_path / "few", 4), tmp_path / "clean"
    job_log = tmp_path / "job.log"
    job = start_job(
        chain,
        [f"run_id={chain['finetune']}", f"input={source}", f"output={out}", *CLEAN_FAST],
        job_log,
        faults="clean.restore=sleep:600",
    )
    try:
        wait_for(
            lambda: "Cleaning 4 inputs" in job_log.read_text(errors="replace"),
            timeout=600,
            what="the job's pipeline",
            proc=job,
            log=job_log,
        )
        time.sleep(5)  # the restore actor is asleep on its first batch
        job.send_signal(signal.SIGTERM)
        code = job.wait(timeout=120)  # the old loop waited for the batch: 10 minutes
    finally:
        if job.poll() is None:
            kill_family(job.pid)
            job.wait()
    text = job_log.read_text(errors="replace")
    assert code == EXIT_STOPPED, text[-3000:]
    assert "SIGTERM: committing the finished rows and stopping" in text and "Traceback" not in text
