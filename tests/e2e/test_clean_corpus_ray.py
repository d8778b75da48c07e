"""clean_corpus: the local Ray a job starts ends with the job, SIGKILL of its driver included (issue 40, item 5)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest
import soundfile as sf
from helpers import CLEAN_FAST, PYTHON, demo_wave, env_for, wait_for
from mlflow import MlflowClient

from pipeline.inference.cleaning.reaper import MARKER_ENV

pytestmark = pytest.mark.slow
RAY_NAMES = ("raylet", "gcs_server", "DashboardAgent", "RuntimeEnvAgent", "ray::", "/ray/")
GONE_WITHIN_S = 10.0
# far above what such a job's Ray takes: about 4 GiB of RSS with the driver (python -m pipeline.bench --only
# clean_corpus/tiny, clean_corpus/peak_memory/tiny); it fails when Ray starts a worker per core or so
RSS_LIMIT_GIB = 8.0


def gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline())[:120] or proc.name()}"
    except psutil.Error:
        return str(proc.pid)


def is_ray(proc: psutil.Process) -> bool:
    try:
        words = " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        return False
    return any(name in words for name in RAY_NAMES)


class Family:
    """Every process seen below the driver while the job ran, and the marker its local Ray carries."""

    def __init__(self, driver: int):
        self.driver = driver
        self.seen: dict[int, psutil.Process] = {}
        self.markers: set[str] = set()
        self.peak_rss = 0

    def look(self) -> None:
        try:
            children = psutil.Process(self.driver).children(recursive=True)
        except psutil.Error:
            return
        rss = 0
        for proc in children:
            self.seen.setdefault(proc.pid, proc)
            try:
                rss += proc.memory_info().rss
                if marker := proc.environ().get(MARKER_ENV):
                    self.markers.add(marker)
            except psutil.Error:
                continue
        self.peak_rss = max(self.peak_rss, rss)

    def marked(self) -> list[psutil.Process]:
        """Processes carrying the job's marker now, wherever they were re-parented to."""
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.environ().get(MARKER_ENV) in self.markers:
                    found.append(proc)
            except psutil.Error:
                continue
        return found

    def alive(self) -> list[psutil.Process]:
        procs = {p.pid: p for p in [*self.seen.values(), *(self.marked() if self.markers else [])]}
        return [p for p in procs.values() if not gone(p)]


# A stand-in driver: a reaper, a "Ray service" started with the marker and below it a process whose marker /proc
# does not show (as a Ray agent that set its title), and a plain child. Their PIDs on stdout.
FAKE_DRIVER = """
import subprocess, sys, time
import psutil
from pipeline.inference.cleaning.reaper import MARKER_ENV, POLL_S, Reaper, marking
reaper = Reaper.start()
with marking(reaper):
    service = subprocess.Popen(["sh", "-c", f"env -u {MARKER_ENV} sleep 600 & exec sleep 600"])
plain = subprocess.Popen(["sleep", "600"])
while not (below := psutil.Process(service.pid).children()):
    time.sleep(0.05)
time.sleep(3 * POLL_S)  # the reaper has seen them
print(reaper.process.pid, service.pid, below[0].pid, plain.pid, flush=True)
if sys.argv[1] == "release":
    sys.stdin.readline()  # once the test has looked at the processes
    reaper.release()
time.sleep(600)
"""


@pytest.mark.parametrize("end", ["sigkill", "release"])
def test_the_reaper_ends_only_the_rays_processes_when_its_driver_lets_go(end):
    driver = subprocess.Popen(
        [PYTHON, "-c", FAKE_DRIVER, end],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    itself = psutil.Process(driver.pid)
    reaper, service, below, plain = (psutil.Process(int(pid)) for pid in driver.stdout.readline().split())
    try:
        assert MARKER_ENV not in reaper.environ() and MARKER_ENV not in itself.environ()
        assert MARKER_ENV in service.environ() and MARKER_ENV not in below.environ()
        if end == "sigkill":
            driver.kill()
            driver.wait()
        else:
            driver.stdin.write("release\n")
            driver.stdin.flush()
        wait_for(
            lambda: gone(service) and gone(below) and gone(reaper),
            timeout=GONE_WITHIN_S,
            what="the marked process, the one below it, and the reaper",
        )
        assert not gone(plain)
        assert end == "sigkill" or not gone(itself)
    finally:
        for proc in (plain, below, service, itself):
            if not gone(proc):
                proc.kill()
        driver.wait()


# A stand-in driver killed before its reaper could see a "Ray worker" started last: not its descendant, no marker,
# but with a log file open in the session's directory, as every Ray process has.
LATE_WORKER_DRIVER = """
import subprocess, sys, time
from pipeline.inference.cleaning.reaper import Reaper
session = sys.argv[1]
reaper = Reaper.start()
reaper.announce(session)
worker = subprocess.Popen(["sh", "-c", f"exec sleep 600 > {session}/logs/worker-1.out"], start_new_session=True)
time.sleep(0.3)
print(reaper.process.pid, worker.pid, flush=True)
time.sleep(600)
"""


def test_the_reaper_also_ends_a_process_it_never_saw_that_writes_into_the_ray_session(tmp_path):
    session = tmp_path / "session_x"
    (session / "logs").mkdir(parents=True)
    driver = subprocess.Popen(
        [PYTHON, "-c", LATE_WORKER_DRIVER, str(session)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    reaper, worker = (psutil.Process(int(pid)) for pid in driver.stdout.readline().split())
    outsider = subprocess.Popen(["sleep", "600"])  # nothing open in the session: left alone
    try:
        driver.kill()
        driver.wait()
        wait_for(lambda: gone(worker) and gone(reaper), timeout=GONE_WITHIN_S, what="the late worker and the reaper")
        assert outsider.poll() is None
    finally:
        for proc in (worker, psutil.Process(outsider.pid)):
            if not gone(proc):
                proc.kill()
        outsider.wait()


def test_a_killed_drivers_local_ray_ends_within_seconds(chain, tmp_path):
    source, out = tmp_path / "short", tmp_path / "clean"
    source.mkdir()
    clean, rate = demo_wave(2)
    for i in range(12):  # more batches than the first commit needs: the job is busy when its driver is killed
        sf.write(source / f"utt{i:02d}.wav", clean[i * 100 : i * 100 + int(1.3 * rate)], rate)
    argv = [f"run_id={chain['finetune']}", f"input={source}", f"output={out}", *CLEAN_FAST]
    log = tmp_path / "job.log"
    with open(log, "wb") as job_log:
        job = subprocess.Popen(
            [PYTHON, "-m", "pipeline.clean_corpus", *argv],
            cwd=chain["dir"],
            env=env_for(chain["dir"]),
            stdout=job_log,
            stderr=job_log,
            start_new_session=True,
        )
    family = Family(job.pid)
    client = MlflowClient()

    def committed():
        family.look()
        experiment = client.get_experiment_by_name("clean_corpus")
        runs = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") if experiment else []
        return runs and len(client.list_artifacts(runs[0].info.run_id, "manifest/parts")) >= 1

    try:
        wait_for(committed, timeout=600, what="a first committed part", proc=job, log=log)
        family.look()
        assert any(is_ray(p) for p in family.seen.values()), "no Ray process found below the driver"
        os.kill(job.pid, signal.SIGKILL)  # the driver only: Ray's processes are left to end by themselves
        job.wait()
        deadline = time.monotonic() + GONE_WITHIN_S
        while (alive := family.alive()) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [describe(p) for p in alive if is_ray(p)]
        assert not left, f"{len(left)} Ray process(es) of the killed job alive {GONE_WITHIN_S:g} s later: {left}"
        assert not alive, f"processes of the killed job alive {GONE_WITHIN_S:g} s later: {[describe(p) for p in alive]}"
        assert family.peak_rss / 2**30 < RSS_LIMIT_GIB
    finally:
        for proc in family.alive():  # a failed test leaves nothing behind
            try:
                proc.kill()
            except psutil.Error:
                pass
        if job.poll() is None:
            job.kill()
            job.wait()
