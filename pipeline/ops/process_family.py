"""A job's process family for the kill soaks: the driver and every descendant seen while it ran (Ray's daemons
and workers, also once they are orphans), killed together or the driver alone, and what is left behind."""

from __future__ import annotations

import signal
import time

import psutil

POLL_S = 0.2  # how often left_behind looks at the processes


class Family:
    """A job's processes: the driver and every descendant seen while it ran (Ray's daemons and workers, also
    once they are orphans)."""

    def __init__(self, pid: int):
        self.driver = psutil.Process(pid)
        self.seen: dict[int, psutil.Process] = {}

    def sample(self) -> None:
        try:
            for child in self.driver.children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass

    def kill(self, whole: bool) -> None:
        self.sample()
        for proc in [self.driver, *(self.seen.values() if whole else ())]:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass

    def left_behind(self, timeout: float) -> list[str]:
        """Wait up to ``timeout`` for the processes seen to end; SIGKILL those still running, return their titles."""
        deadline = time.monotonic() + timeout
        while True:
            alive = [p for p in self.seen.values() if _running(p)]
            if not alive or time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
        titles = [_title(p) for p in alive]
        for proc in alive:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        return titles


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _title(proc: psutil.Process) -> str:
    try:
        return " ".join(" ".join(proc.cmdline()).split())[:100] or proc.name()  # Ray pads its titles with spaces
    except psutil.Error:
        return f"pid {proc.pid}"
