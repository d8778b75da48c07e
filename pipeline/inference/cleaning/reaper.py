"""The processes of a job's local Ray end with the job, however the job ends (tests/e2e/test_clean_corpus_ray.py).

Ray ties its GCS server and raylet to the driver that started them (the kernel kills them when the driver
dies), but not what those start in turn: after a SIGKILL of the driver, Ray's DashboardAgent, RuntimeEnvAgent and
idle workers were seen alive, re-parented to init. So before a local Ray is started, the driver starts a reaper:

- the reaper runs in a session of its own (a kill of the driver's process group leaves it alone) and holds
  the read end of a pipe whose write end only the driver holds (close-on-exec, so no process the driver
  starts holds it too);
- the driver puts a marker unique to this Ray (``PIPELINE_CLEAN_JOB=<uuid>``) into its environment for the
  time ``ray.init`` takes: every process Ray starts inherits it, and so does whatever those start. The reaper
  is started without it;
- /proc shows the marker only as long as a process leaves its environment block alone, and a process that sets
  a title longer than its command line overwrites it (Ray's agents and busy workers do). So while the driver
  lives, the reaper looks every ``POLL_S`` at the driver's descendants and keeps those carrying the marker
  (the raylet, the GCS, Ray's Python services) and everything below them (the agents, the workers);
- once Ray has started, the driver writes the Ray session's directory into the pipe: every one of Ray's
  processes keeps its log files open there, whatever its title, so at the end those are found too;
- the pipe reaches end of file when the driver closes it (``Reaper.release``, before a new local Ray) or exits
  in any way, SIGKILL included. The reaper then sends SIGTERM to every process it kept that is still alive
  (psutil checks each PID still names the process seen) and to every process carrying the marker, SIGKILL to
  those alive ``GRACE_S`` later, looks again for any started meanwhile, and exits. After a normal
  ``ray.shutdown()`` there is nothing left to end and it exits at once.

    python -m pipeline.inference.cleaning.reaper <marker> <driver PID> <read fd>    (started by ``Reaper.start``)

It imports only the standard library and psutil: it costs the job about 10 MB, not a Ray worker's hundreds.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil

log = logging.getLogger(__name__)

MARKER_ENV = "PIPELINE_CLEAN_JOB"  # in the environment of every process one job's local Ray starts
POLL_S = 1.0  # how often the driver's descendants are looked at while it lives (a few ms of CPU each time)
GRACE_S = 2.0  # between SIGTERM and SIGKILL (a chance to exit cleanly; most of Ray's workers and agents do not take it)
ROUNDS = 3  # looks for marked processes at the end: one started while the others ended is found the next time


def carries(proc: psutil.Process, marker: str) -> bool:
    try:
        return proc.environ().get(MARKER_ENV) == marker
    except psutil.Error:  # gone, a zombie, or another user's process
        return False


def rays_below(driver: int, marker: str, known: dict[int, psutil.Process]) -> dict[int, psutil.Process]:
    """The driver's descendants that carry the marker or are ``known`` already, and all of theirs. One pass over
    /proc for the tree; environments are read only of descendants not known yet."""
    children: dict[int, list[psutil.Process]] = {}
    for proc in psutil.process_iter(["ppid"]):
        children.setdefault(proc.info["ppid"], []).append(proc)
    found: dict[int, psutil.Process] = {}
    todo = [(proc, False) for proc in children.get(driver, [])]
    while todo:
        proc, below_ray = todo.pop()
        is_ray = below_ray or proc.pid in known or carries(proc, marker)
        if is_ray:
            found[proc.pid] = proc
        todo += [(child, is_ray) for child in children.get(proc.pid, [])]
    return found


def marked(marker: str) -> dict[int, psutil.Process]:
    """Every process carrying the marker now, wherever it was re-parented to."""
    return {proc.pid: proc for proc in psutil.process_iter() if proc.pid != os.getpid() and carries(proc, marker)}


def _signal_all(procs: list[psutil.Process], signum: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(signum)  # psutil checks the PID still names the process it listed
        except psutil.Error:
            pass


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return str(proc.pid)


def _alive(proc: psutil.Process) -> bool:
    """Running, and still the process that was seen (psutil compares its start time): not a zombie."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def end(procs: list[psutil.Process], grace_s: float = GRACE_S) -> int:
    """SIGTERM, then SIGKILL after ``grace_s``, to those of ``procs`` still alive; how many were."""
    procs = [proc for proc in procs if _alive(proc)]
    if not procs:
        return 0
    names = sorted({_name(proc) for proc in procs})
    _signal_all(procs, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    _signal_all(alive, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=grace_s)
    log.warning(
        "Ended %d process(es) the job's local Ray left behind (%d of them by SIGKILL): %s",
        len(procs),
        len(alive),
        ", ".join(names),
    )
    return len(procs)


def holding(session_dir: str) -> dict[int, psutil.Process]:
    """Every process with a file open in the Ray session's directory: Ray's daemons, agents and workers write
    their logs there, whatever title they set (a process that started just before the driver died, whose title
    hides the marker, is found this way)."""
    if not session_dir:
        return {}
    prefix = session_dir.rstrip("/") + "/"
    found = {}
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and any(f.path.startswith(prefix) for f in proc.open_files()):
                found[proc.pid] = proc
        except psutil.Error:
            continue
    return found


def follow(fd: int, driver: int, marker: str) -> tuple[dict[int, psutil.Process], str]:
    """Until end of file on ``fd``: the Ray processes seen below the driver (``rays_below``), every ``POLL_S``, and
    the session directory the driver announced (``Reaper.announce``; empty if none)."""
    seen: dict[int, psutil.Process] = {}
    said = b""
    while True:
        readable, _, _ = select.select([fd], [], [], POLL_S)
        if readable:
            data = os.read(fd, 4096)
            if not data:
                return seen, said.decode(errors="replace").strip().splitlines()[-1] if said.strip() else ""
            said += data
        for pid, proc in rays_below(driver, marker, seen).items():
            seen.setdefault(pid, proc)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    marker, driver_pid, fd = argv[0], int(argv[1]), int(argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C at the terminal is for the driver, not for us
    # the driver's PID names its descendants only while it lives; once it is gone, the marker alone finds them
    seen, session_dir = follow(fd, driver_pid, marker) if psutil.pid_exists(driver_pid) else ({}, "")
    spare = {os.getpid(), driver_pid}  # after a release the driver lives on
    candidates = {pid: proc for pid, proc in seen.items() if pid not in spare}
    for _ in range(ROUNDS):
        found = {**marked(marker), **holding(session_dir)}
        candidates.update((pid, proc) for pid, proc in found.items() if pid not in spare)
        if not end(list(candidates.values())):
            break
        candidates = {}
    return 0


@dataclass
class Reaper:
    """The driver's side: the marker, the pipe's write end, and the reaper process."""

    marker: str
    write_fd: int
    process: subprocess.Popen

    @classmethod
    def start(cls) -> Reaper:
        """Start a reaper for a new marker; the caller puts ``MARKER_ENV=marker`` into the environment of the
        processes to reap (``with marking(reaper):``)."""
        marker = uuid.uuid4().hex
        read_fd, write_fd = os.pipe()  # both close-on-exec; the reaper alone gets the read end
        env = {k: v for k, v in os.environ.items() if k != MARKER_ENV}
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", __name__, marker, str(os.getpid()), str(read_fd)],
                env=env,
                pass_fds=(read_fd,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        return cls(marker, write_fd, process)

    def announce(self, session_dir: str) -> None:
        """Tell the reaper the Ray session's directory (``ray.init(...).address_info["session_dir"]``): at the end
        it also ends every process with a file open there."""
        if self.write_fd >= 0:
            os.write(self.write_fd, session_dir.encode() + b"\n")

    def release(self) -> None:
        """Close the driver's end: the reaper ends what is left of the marked processes and exits."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1


@contextmanager
def marking(reaper: Reaper) -> Iterator[None]:
    """The processes started in the block (and those they start) carry the reaper's marker. Only those: the
    marker leaves this process's environment at the end, so nothing it starts later is taken for Ray's."""
    os.environ[MARKER_ENV] = reaper.marker
    try:
        yield
    finally:
        os.environ.pop(MARKER_ENV, None)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
