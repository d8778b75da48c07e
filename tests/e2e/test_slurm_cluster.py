"""Slurm facts the pipeline relies on, checked on a real single-node cluster (tests/slurm_cluster.py) with plain
shell batch scripts: requeue keeps the job ID and counts restarts, RequeueExit=75 requeues by itself, and how
``scancel --signal`` reaches the batch shell and the processes of a step.

The cluster uses proctrack/linuxproc (no cgroups), which finds a job's processes through their parent process
ids: a process whose parent dies is re-parented to init and is no longer part of its job, so neither SIGTERM nor
SIGKILL reaches it any more (the two tests with "escape" in their name). The fixture sets KillWait and the requeue
delay to 10 s (Slurm's defaults: 30 s and 120 s).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from helpers import wait_for
from slurm_cluster import REQUEUE_EXIT, SlurmCluster, slurm_cluster  # noqa: F401 (slurm_cluster: the fixture)

pytestmark = pytest.mark.slow

WAIT = 60  # seconds; the longest wait in this module (KillWait and requeue delay are 10 s each)

# A process that records, one line each in <name>.log, its start (pid, parent, SLURM_RESTART_COUNT) and every
# SIGTERM, SIGCONT, SIGUSR1 and SIGUSR2 it gets. term=exit: it exits on SIGTERM, term=keep: it carries on (only
# SIGKILL ends it). usr1=ignore: SIGUSR1 is ignored (SIG_IGN) and not recorded.
CHILD = r"""
import os, signal, sys, time
name = sys.argv[1]
opts = dict(arg.split("=") for arg in sys.argv[2:])
log = open(f"{name}.log", "a", buffering=1)

def record(signum, frame):
    log.write(f"got {signal.Signals(signum).name}\n")
    if signum == signal.SIGTERM and opts.get("term", "exit") == "exit":
        sys.exit(0)

for signum in (signal.SIGTERM, signal.SIGCONT, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(signum, record)
if opts.get("usr1") == "ignore":
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
log.write(f"start pid={os.getpid()} ppid={os.getppid()} restart={os.environ.get('SLURM_RESTART_COUNT', 'unset')}\n")
while True:
    time.sleep(0.1)
"""


def write_script(path: Path, body: str) -> Path:
    """An executable bash script."""
    path.write_text("#!/bin/bash\n" + body.lstrip())
    path.chmod(0o755)
    return path


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def started(path: Path) -> dict[str, str]:
    """The ``start`` line of a CHILD log as a dict (pid, ppid, restart); empty before the child has started."""
    for line in lines(path):
        if line.startswith("start "):
            return dict(item.split("=") for item in line.split()[1:])
    return {}


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill(pids) -> None:
    """SIGKILL processes that escaped their job, so that they do not outlive the test."""
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


@pytest.fixture
def workdir(tmp_path) -> Path:
    """The test's directory, with child.py (CHILD) in it; the jobs run there."""
    (tmp_path / "child.py").write_text(CHILD)
    return tmp_path


def child(name: str, *opts: str) -> str:
    """The shell command that runs CHILD under this interpreter."""
    return " ".join([sys.executable, "child.py", name, *opts])


def test_a_batch_job_runs_and_completes(slurm_cluster: SlurmCluster, workdir):
    script = write_script(
        workdir / "hello.sh",
        """
echo "hello job=$SLURM_JOB_ID cluster=$SLURM_CLUSTER_NAME restart=${SLURM_RESTART_COUNT:-unset}"
""",
    )
    job = slurm_cluster.sbatch(script, options=["--output=hello.out"])
    info = slurm_cluster.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED"), WAIT)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    # The cluster name and job ID are what auto-resume keys a job on; no restart count on a first start.
    assert lines(workdir / "hello.out") == [f"hello job={job} cluster=pytest restart=unset"]


def test_requeue_sends_sigterm_then_sigkill_and_restarts_the_same_job(slurm_cluster: SlurmCluster, workdir):
    """``scontrol requeue`` of a running job: the batch shell, its children and the processes of its steps all get
    SIGCONT and SIGTERM at once; whoever is still there KillWait later gets SIGKILL. The job then waits
    (PENDING, Reason=BeginTime) for the requeue delay and starts again with the same SLURM_JOB_ID and
    SLURM_RESTART_COUNT=1."""
    script = write_script(
        workdir / "requeue.sh",
        f"""
#SBATCH --requeue
echo "start job=$SLURM_JOB_ID restart=${{SLURM_RESTART_COUNT:-unset}} pid=$$" >> shell.log
[ -n "$SLURM_RESTART_COUNT" ] && exit 0
trap 'echo "got TERM" >> shell.log' TERM
trap 'echo "got CONT" >> shell.log' CONT
{child("batch_child", "term=keep")} &
srun {child("step_child", "term=keep")} &
while true; do wait; done  # a trap runs when it interrupts `wait`; the shell carries on until SIGKILL
""",
    )
    job = slurm_cluster.sbatch(script, options=["--output=requeue.out"])
    wait_for(
        lambda: started(workdir / "batch_child.log") and started(workdir / "step_child.log"),
        WAIT,
        what="the batch child and the step child to start",
    )
    shell_pid = int(lines(workdir / "shell.log")[0].split("pid=")[1])
    child_pids = [int(started(workdir / f"{name}.log")["pid"]) for name in ("batch_child", "step_child")]

    slurm_cluster.run("scontrol", "requeue", str(job))
    # All of them get SIGTERM (and SIGCONT, so that a stopped process can handle it) ...
    wait_for(lambda: "got TERM" in lines(workdir / "shell.log"), WAIT, what="SIGTERM in the batch shell")
    for name in ("batch_child", "step_child"):
        wait_for(
            lambda name=name: {"got SIGTERM", "got SIGCONT"} <= set(lines(workdir / f"{name}.log")),
            WAIT,
            what=f"SIGCONT and SIGTERM in {name}",
        )
    # ... and as none of them exits, SIGKILL after KillWait; then the job waits out the requeue delay.
    info = slurm_cluster.wait_state(job, "PENDING", WAIT)
    assert info["Reason"] == "BeginTime" and info["Restarts"] == "1", info
    assert not [pid for pid in (shell_pid, *child_pids) if alive(pid)], "SIGKILL left a process of the first run"

    info = slurm_cluster.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED"), WAIT)
    assert info["JobState"] == "COMPLETED", info
    starts = [line.rsplit(" pid=", 1)[0] for line in lines(workdir / "shell.log") if line.startswith("start ")]
    assert starts == [f"start job={job} restart=unset", f"start job={job} restart=1"]
    # No SIGKILL can be recorded; every signal a process of the first run could see:
    assert {line for line in lines(workdir / "step_child.log") if line.startswith("got")} == {
        "got SIGCONT",
        "got SIGTERM",
    }


def test_requeue_of_a_shell_that_dies_on_sigterm_lets_its_foreground_child_escape(slurm_cluster: SlurmCluster, workdir):
    """A batch shell without a TERM trap runs a program in the foreground that handles SIGTERM and carries on (to
    write a checkpoint, say). On requeue both get SIGTERM; the shell dies at once, its child is re-parented to
    init, and proctrack/linuxproc no longer counts it to the job: no SIGKILL comes, the job counts as ended and
    its next run starts while the first one is still running. (``exec`` the program, or trap TERM in the shell
    and ``wait``, to keep it inside the job.)"""
    script = write_script(
        workdir / "foreground.sh",
        f"""
#SBATCH --requeue
echo "start job=$SLURM_JOB_ID restart=${{SLURM_RESTART_COUNT:-unset}}" >> shell.log
[ -n "$SLURM_RESTART_COUNT" ] && exit 0
{child("trainer", "term=keep")}
""",
    )
    job = slurm_cluster.sbatch(script, options=["--output=foreground.out"])
    wait_for(lambda: started(workdir / "trainer.log"), WAIT, what="the program to start")
    trainer = int(started(workdir / "trainer.log")["pid"])
    try:
        slurm_cluster.run("scontrol", "requeue", str(job))
        info = slurm_cluster.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED"), WAIT)
        assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
        assert lines(workdir / "shell.log") == [f"start job={job} restart=unset", f"start job={job} restart=1"]
        assert "got SIGTERM" in lines(workdir / "trainer.log")
        assert alive(trainer), "the first run's program was killed after all"
    finally:
        kill([trainer])


def test_requeue_exit_code_requeues_the_job_by_itself(slurm_cluster: SlurmCluster, workdir):
    """With RequeueExit=75 a batch job that exits 75 runs again (same job ID, SLURM_RESTART_COUNT=1): the
    pipeline's EXIT_REQUEUE after a SIGUSR1 stop."""
    script = write_script(
        workdir / "exit75.sh",
        f"""
echo "start job=$SLURM_JOB_ID restart=${{SLURM_RESTART_COUNT:-unset}}" >> runs.log
[ -z "$SLURM_RESTART_COUNT" ] && exit {REQUEUE_EXIT}
exit 0
""",
    )
    job = slurm_cluster.sbatch(script, options=["--output=exit75.out"])
    info = slurm_cluster.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED"), WAIT)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1" and info["ExitCode"] == "0:0", info
    assert lines(workdir / "runs.log") == [f"start job={job} restart=unset", f"start job={job} restart=1"]


def test_scancel_signal_batch_reaches_the_batch_shell_only(slurm_cluster: SlurmCluster, workdir):
    """``scancel --signal=USR1 --batch`` runs the batch shell's USR1 trap (bash runs a trap when it interrupts
    ``wait``, not while a foreground command runs) and reaches neither the shell's children nor the step
    processes; ``--full`` reaches the shell, its children and the step processes (srun forwards it)."""
    script = write_script(
        workdir / "batch.sh",
        f"""
trap 'echo "got USR1" >> shell.log; kill -USR2 $batch_child' USR1
{child("batch_child")} &
batch_child=$!
srun {child("step_child")} &
while true; do wait; done
""",
    )
    job = slurm_cluster.sbatch(script, options=["--output=batch.out"])
    wait_for(
        lambda: started(workdir / "batch_child.log") and started(workdir / "step_child.log"),
        WAIT,
        what="the batch child and the step child to start",
    )

    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    wait_for(lambda: "got USR1" in lines(workdir / "shell.log"), WAIT, what="the USR1 trap of the batch shell")
    # The trap forwards USR2 to the child: had Slurm's USR1 reached the child, it would be recorded before.
    wait_for(lambda: "got SIGUSR2" in lines(workdir / "batch_child.log"), WAIT, what="USR2 from the trap")
    assert "got SIGUSR1" not in lines(workdir / "batch_child.log")
    assert "got SIGUSR1" not in lines(workdir / "step_child.log")

    # --full: the shell, its children, and srun, which forwards USR1 to the processes of its step.
    slurm_cluster.run("scancel", "--signal=USR1", "--full", str(job))
    wait_for(lambda: lines(workdir / "shell.log").count("got USR1") == 2, WAIT, what="a second USR1 trap")
    for name in ("batch_child", "step_child"):
        wait_for(lambda name=name: "got SIGUSR1" in lines(workdir / f"{name}.log"), WAIT, what=f"USR1 in {name}")

    slurm_cluster.run("scancel", str(job))
    slurm_cluster.wait_state(job, "CANCELLED", WAIT)


def test_scancel_signal_reaches_every_step_process_and_a_wrapper_that_dies_lets_them_escape(
    slurm_cluster: SlurmCluster, workdir
):
    """``scancel --signal=USR1 <job>`` (no --batch) sends USR1 to every process of the job's steps, grandchildren
    of srun included, and not to the batch step (the batch shell and its children). A process that ignores
    USR1 carries on. But USR1 kills a ``bash -c`` wrapper that does not trap it (the default action of USR1 is
    to terminate); its children are re-parented to init, so proctrack/linuxproc no longer counts them to the
    job: the step ends at once, and even cancelling the job leaves them running (no SIGTERM, no SIGKILL)."""
    # The grandchildren write to a file, not to the step's output, which srun would wait for (60 s).
    wrapper = (
        "echo $$ > wrapper.pid; "
        f"{child('g1')} >/dev/null 2>&1 & {child('g2')} >/dev/null 2>&1 & "
        f"{child('ignorer', 'usr1=ignore')} >/dev/null 2>&1 & wait"
    )
    script = write_script(
        workdir / "step.sh",
        f"""
trap 'echo "got USR1" >> shell.log' USR1
trap 'echo "got USR2" >> shell.log' USR2
{child("batch_child")} &
(srun bash -c '{wrapper}'; echo "srun exit $?" >> shell.log) &
while true; do wait; done
""",
    )
    job = slurm_cluster.sbatch(script, options=["--output=step.out"])
    names = ("g1", "g2", "ignorer", "batch_child")
    wait_for(lambda: all(started(workdir / f"{name}.log") for name in names), WAIT, what="every child to start")
    pids = {name: int(started(workdir / f"{name}.log")["pid"]) for name in names}
    wrapper_pid = int((workdir / "wrapper.pid").read_text())
    assert {int(started(workdir / f"{name}.log")["ppid"]) for name in ("g1", "g2", "ignorer")} == {wrapper_pid}

    try:
        slurm_cluster.run("scancel", "--signal=USR1", str(job))
        for name in ("g1", "g2"):
            wait_for(lambda name=name: "got SIGUSR1" in lines(workdir / f"{name}.log"), WAIT, what=f"USR1 in {name}")
        # The wrapper died of USR1, which ends the step (srun reports the task's signal) ...
        wait_for(
            lambda: any(line.startswith("srun exit") for line in lines(workdir / "shell.log")), WAIT, what="srun to end"
        )
        assert not alive(wrapper_pid)
        # ... while the grandchildren, the one that ignores USR1 too, carry on outside the job's process tree.
        assert all(alive(pids[name]) for name in ("g1", "g2", "ignorer"))
        assert all(
            Path(f"/proc/{pids[name]}/stat").read_text().rsplit(")", 1)[1].split()[1] != str(wrapper_pid)
            for name in ("g1", "g2", "ignorer")
        )

        # Without --batch nothing reached the batch step: USR2 to the shell shows its traps run, USR1 never did.
        slurm_cluster.run("scancel", "--signal=USR2", "--batch", str(job))
        wait_for(lambda: "got USR2" in lines(workdir / "shell.log"), WAIT, what="the USR2 trap of the batch shell")
        assert "got USR1" not in lines(workdir / "shell.log")
        assert "got SIGUSR1" not in lines(workdir / "batch_child.log")

        # Cancelling the job ends what it still tracks (the batch child exits on SIGTERM) but not the escapees.
        slurm_cluster.run("scancel", str(job))
        slurm_cluster.wait_state(job, "CANCELLED", WAIT)
        wait_for(lambda: not alive(pids["batch_child"]), WAIT, what="the batch child to end")
        assert "got SIGTERM" in lines(workdir / "batch_child.log")
        assert all(alive(pids[name]) for name in ("g1", "g2", "ignorer"))
        assert not any("got SIGTERM" in lines(workdir / f"{name}.log") for name in ("g1", "g2"))
    finally:
        kill(pids.values())


def test_a_wrapper_that_traps_usr1_keeps_the_step_together(slurm_cluster: SlurmCluster, workdir):
    """The same step with a wrapper that traps USR1 (``trap : USR1``; its children get the default action back,
    unlike with ``trap '' USR1``, which they would inherit as SIG_IGN): every process gets USR1, the wrapper lives
    on, and cancelling the job ends them all."""
    wrapper = (
        "trap : USR1; "
        f"{child('g1')} & {child('g2')} & {child('ignorer', 'usr1=ignore')} & "
        "until wait; do :; done"
    )  # `wait` returns >128 when a trap interrupts it
    script = write_script(
        workdir / "trap.sh",
        f"""
srun bash -c '{wrapper}' &
while true; do wait; done
""",
    )
    job = slurm_cluster.sbatch(script, options=["--output=trap.out"])
    names = ("g1", "g2", "ignorer")
    wait_for(lambda: all(started(workdir / f"{name}.log") for name in names), WAIT, what="every child to start")
    pids = {name: int(started(workdir / f"{name}.log")["pid"]) for name in names}
    wrapper_pid = int(started(workdir / "g1.log")["ppid"])
    try:
        slurm_cluster.run("scancel", "--signal=USR1", str(job))
        for name in ("g1", "g2"):
            wait_for(lambda name=name: "got SIGUSR1" in lines(workdir / f"{name}.log"), WAIT, what=f"USR1 in {name}")
        assert alive(wrapper_pid) and alive(pids["ignorer"])

        slurm_cluster.run("scancel", str(job))
        slurm_cluster.wait_state(job, "CANCELLED", WAIT)
        wait_for(
            lambda: not any(alive(pid) for pid in (wrapper_pid, *pids.values())),
            WAIT,
            what="every process of the step to end",
        )
        assert all("got SIGTERM" in lines(workdir / f"{name}.log") for name in ("g1", "g2"))
    finally:
        kill(pids.values())
