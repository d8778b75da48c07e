"""A real single-node Slurm cluster on loopback, for tests.

``SlurmCluster(root).start()`` writes a minimal ``slurm.conf`` under ``root``, starts a private ``munged``, then
``slurmctld`` and ``slurmd`` in the foreground mode (``-D``) as background processes, and waits until the node is
idle. Everything the daemons write (state, spool, logs, pid files) stays under ``root``; the ports are picked free
at start. ``stop()`` cancels what is still queued, shuts the daemons down and kills whatever process of this
cluster is left (daemons, ``slurmstepd``, job processes), so that nothing outlives the tests.

The node is configured for a container without systemd or cgroups: ``proctrack/linuxproc`` (job processes are
found through their parent process ids in /proc), ``task/none``, no accounting. The daemons run as root.

The ``slurm_cluster`` fixture (module scope) yields a started cluster and skips, saying why, where one cannot start:
not root, a binary missing, or daemons that do not come up in time (the reason carries the tail of their logs).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

log = logging.getLogger(__name__)

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue")
# The system binary directories are not on every PATH (the daemons live in /usr/sbin).
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])

START_TIMEOUT = 60.0
# Exit code of a batch job that Slurm requeues by itself (RequeueExit); 75 is EX_TEMPFAIL.
REQUEUE_EXIT = 75


class SlurmStartError(RuntimeError):
    """The cluster could not be started; the message says why (with the tail of the daemon logs)."""


def find_binaries() -> dict[str, str]:
    """Absolute paths of the daemons and client commands; ``SlurmStartError`` names the first one missing."""
    paths = {}
    for name in DAEMONS + CLIENTS:
        path = shutil.which(name, path=SEARCH_PATH)
        if path is None:
            raise SlurmStartError(f"{name} is not installed (apt-get install slurm-wlm munge)")
        paths[name] = path
    return paths


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def memory_mb() -> int:
    """The machine's memory in MiB, from /proc/meminfo."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


def tail(path: Path, lines: int = 25) -> str:
    """The last lines of a text file, or a note that it does not exist."""
    if not path.exists():
        return f"({path.name} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def parse_scontrol_line(line: str) -> dict[str, str]:
    """``Key=Value Key2=Value with spaces ...`` (``scontrol show ... -o``) as a dict."""
    return dict(re.findall(r"(\S+?)=(.*?)(?= \S+?=|$)", line.strip()))


class SlurmCluster:
    """A single-node Slurm cluster (controller and node on 127.0.0.1) whose files all live under ``root``."""

    def __init__(self, root: Path, kill_wait: int = 30, requeue_delay: int = 120):
        """``kill_wait``: seconds between SIGTERM and SIGKILL when a job ends (Slurm's KillWait, default 30).
        ``requeue_delay``: seconds a requeued job waits before it may start again; Slurm takes it from the job
        credential lifetime (AuthInfo=cred_expire, default 120).
        """
        self.root = Path(root)
        self.kill_wait = kill_wait
        self.requeue_delay = requeue_delay
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.env["PATH"] = SEARCH_PATH
        self.bin: dict[str, str] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.munge_dir: Path | None = None

    # ---------------------------------------------------------------- start / stop

    def start(self, timeout: float = START_TIMEOUT) -> SlurmCluster:
        """Start munged, slurmctld and slurmd; return once the node is idle, else raise ``SlurmStartError``."""
        if os.geteuid() != 0:
            raise SlurmStartError(f"the daemons need root (SlurmUser=root); this process runs as uid {os.geteuid()}")
        self.bin = find_binaries()
        started = time.monotonic()
        try:
            self._start_munged()
            self.write_conf()
            self._spawn("slurmctld", [self.bin["slurmctld"], "-D", "-f", str(self.conf)])
            self._spawn("slurmd", [self.bin["slurmd"], "-D", "-f", str(self.conf), "-N", self.node])
            self._wait_idle(started + timeout)
        except BaseException:
            self.stop()
            raise
        log.info("Slurm cluster up in %.1f s (%s)", time.monotonic() - started, self.conf)
        return self

    def write_conf(self) -> Path:
        """Write ``slurm.conf`` (free ports, everything under ``root``) and an empty plugin stack file."""
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        plugstack = self.root / "plugstack.conf"
        plugstack.write_text("")
        cpus = os.cpu_count() or 1
        memory = max(1, min(1024, memory_mb() // 2))
        settings = {
            "ClusterName": "pytest",
            "SlurmctldHost": f"{self.node}(127.0.0.1)",
            "SlurmctldPort": free_port(),
            "SlurmdPort": free_port(),
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.munge_socket},cred_expire={self.requeue_delay}",
            "StateSaveLocation": self.root / "state",
            "SlurmdSpoolDir": self.root / "spool",
            "SlurmctldPidFile": self.root / "slurmctld.pid",
            "SlurmdPidFile": self.root / "slurmd.pid",
            "SlurmctldLogFile": self.root / "log" / "slurmctld.log",
            "SlurmdLogFile": self.root / "log" / "slurmd.log",
            "SlurmctldDebug": "info",
            "SlurmdDebug": "info",
            "PlugStackConfig": plugstack,
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/none",
            "MpiDefault": "none",
            "MailProg": shutil.which("true") or "/bin/true",
            "SwitchType": "switch/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_CPU",
            "SchedulerType": "sched/backfill",
            # Run the main scheduler every second (default 60 s), so requeued jobs start again soon.
            "SchedulerParameters": "sched_interval=1,bf_interval=1",
            "ReturnToService": 2,
            "JobRequeue": 1,
            "RequeueExit": REQUEUE_EXIT,
            "KillWait": self.kill_wait,
            "MinJobAge": 600,
        }
        lines = [f"{key}={value}" for key, value in settings.items()]
        lines.append(f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        return self.conf

    @property
    def munge_socket(self) -> Path:
        """The private munged's socket."""
        assert self.munge_dir is not None, "munged is not started"
        return self.munge_dir / "munge.sock"

    def _start_munged(self) -> None:
        """A private munged with its own key; it does not touch a munged the machine may already run.

        munged wants every directory above its socket to be searchable by everyone, and pytest's temporary
        directories are private (0700), so the socket lives in a short directory of its own under /tmp.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self.munge_dir = Path(tempfile.mkdtemp(prefix="munge-", dir="/tmp"))
        self.munge_dir.chmod(0o755)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        self._spawn(
            "munged",
            [
                self.bin["munged"],
                "--foreground",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self.root / 'munged.pid'}",
                f"--seed-file={self.root / 'munged.seed'}",
            ],
        )
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            if self.procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise SlurmStartError(f"munged did not start:\n{tail(self.root / 'log' / 'munged.out')}")
            time.sleep(0.1)

    def _spawn(self, name: str, argv: list[str]) -> None:
        """Start a daemon in the background, its stdout and stderr in ``log/<name>.out``."""
        (self.root / "log").mkdir(parents=True, exist_ok=True)
        with open(self.root / "log" / f"{name}.out", "wb") as out:
            # A session of its own: a Ctrl-C meant for pytest does not reach the daemons before stop() does.
            self.procs[name] = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.root, start_new_session=True
            )
        log.info("started %s (pid %d)", name, self.procs[name].pid)

    def _wait_idle(self, deadline: float) -> None:
        """Poll ``sinfo`` until the node is idle; fail early when a daemon exits."""
        state = ""
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmStartError(f"{name} exited with {proc.returncode} during start\n{self.logs()}")
            result = self.run("sinfo", "--noheader", "--Node", "--format=%T", check=False)
            state = result.stdout.strip()
            if state == "idle":
                return
            time.sleep(0.3)
        raise SlurmStartError(f"node not idle after the start timeout (sinfo says {state!r})\n{self.logs()}")

    def logs(self, lines: int = 20) -> str:
        """The tail of each daemon's log (its stdout and stderr where it wrote no log file), for error messages."""
        parts = []
        for name in DAEMONS:
            path = self.root / "log" / f"{name}.log"
            if not path.exists():
                path = path.with_suffix(".out")
            parts.append(f"--- {path.name}\n{tail(path, lines)}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel remaining jobs, shut the daemons down and kill any process of this cluster that is left."""
        shut_down = False
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self.run("scancel", "--user=root", check=False)
                self._wait(lambda: not self.run("squeue", "--noheader", check=False).stdout.strip(), 5)
                # Job processes that ignore SIGTERM would hold slurmd for KillWait; those that escaped their
                # job (see _kill_leftovers) would stay forever.
                self._kill_leftovers(jobs_only=True)
                shut_down = self.run("scontrol", "shutdown", check=False).returncode == 0
            except subprocess.TimeoutExpired:
                log.warning("slurmctld does not answer; terminating the daemons")
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None:
                continue
            if name == "munged" or not shut_down:
                proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop, killing it", name)
                proc.kill()
                proc.wait()
        self.procs.clear()
        self._kill_leftovers()
        if self.munge_dir is not None:
            shutil.rmtree(self.munge_dir, ignore_errors=True)
            self.munge_dir = None

    def _kill_leftovers(self, jobs_only: bool = False) -> None:
        """SIGKILL every process whose environment names this cluster's ``slurm.conf``; with ``jobs_only``, only
        job processes (those with a ``SLURM_JOB_ID``), not the daemons and ``slurmstepd``.

        The daemons get ``SLURM_CONF`` from ``self.env``; ``slurmstepd`` inherits it from slurmd and the job
        processes from the submitting command, so this finds all of them and nothing of another cluster, also
        job processes that escaped their job (proctrack/linuxproc loses a process whose parent died).
        """
        for _ in range(3):
            pids = [pid for pid in self._cluster_pids(jobs_only) if pid != os.getpid()]
            if not pids:
                return
            for pid in pids:
                log.info("killing leftover process %d", pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)

    def _cluster_pids(self, jobs_only: bool) -> list[int]:
        """Ids of the live processes whose environment has this cluster's ``SLURM_CONF`` (and, with
        ``jobs_only``, a ``SLURM_JOB_ID``)."""
        conf_variable = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                variables = (entry / "environ").read_bytes().split(b"\0")
                state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
            except (OSError, IndexError):
                continue
            job = any(v.startswith(b"SLURM_JOB_ID=") for v in variables)
            if state != "Z" and conf_variable in variables and (job or not jobs_only):
                pids.append(int(entry.name))
        return pids

    # ---------------------------------------------------------------- commands and jobs

    def run(self, command: str, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster; output as text."""
        argv = [self.bin.get(command, command), *args]
        result = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def sbatch(self, script_path: str | os.PathLike, *args: str, options: tuple[str, ...] | list[str] = ()) -> int:
        """Submit a batch script (``args`` go to the script, ``options`` to sbatch); return the job id.

        The job runs in the script's directory unless ``options`` say otherwise.
        """
        script = Path(script_path).resolve()
        result = self.run("sbatch", "--parsable", f"--chdir={script.parent}", *options, str(script), *args)
        return int(result.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o <id>`` as a dict (JobState, Reason, Restarts, ExitCode, ...)."""
        result = self.run("scontrol", "show", "job", "-o", str(job_id))
        return parse_scontrol_line(result.stdout)

    def squeue_state(self, job_id: int) -> str:
        """The job's state: PENDING, RUNNING, COMPLETING, COMPLETED, FAILED, CANCELLED, REQUEUED, ..."""
        return self.job_info(job_id)["JobState"]

    def wait_state(self, job_id: int, states: str | tuple[str, ...] | list[str], timeout: float = 60) -> dict:
        """Poll until the job is in one of ``states``; its info then. ``AssertionError`` on timeout."""
        wanted = (states,) if isinstance(states, str) else tuple(states)
        info: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in wanted:
                return info
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} not in {wanted} after {timeout} s: {info}\n{self.logs(10)}")

    @staticmethod
    def _wait(condition, timeout: float) -> bool:
        """Poll ``condition()`` up to ``timeout`` seconds; whether it came true."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.2)
        return False


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A started single-node Slurm cluster for the module's tests; skipped, with the reason, where none can start.

    KillWait and the requeue delay are 10 s instead of Slurm's 30 s and 120 s, so that a test that waits for a
    SIGKILL or for a requeued job to start again takes seconds, not minutes.
    """
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), kill_wait=10, requeue_delay=10)
    try:
        cluster.start()
    except SlurmStartError as err:
        pytest.skip(f"no Slurm cluster: {err}")
    try:
        yield cluster
    finally:
        cluster.stop()
