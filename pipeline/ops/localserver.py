"""A local ``mlflow server`` on loopback (SQLite backend store, artifacts proxied through the server
into a folder), which tests and benchmarks stop and start again on the same port to play an outage
of a team's tracking server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TrackingServer:
    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir, self.port = Path(workdir), port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> float:
        """Start it and wait until /health answers; returns when it did (``time.time()``)."""
        with open(self.workdir / "server.log", "ab") as server_log:
            self.process = subprocess.Popen(
                self.server_command(),
                cwd=self.workdir,
                env=self.server_env(),
                stdout=subprocess.DEVNULL,
                stderr=server_log,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as answer:
                    if answer.status == 200:
                        return time.time()
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server did not start (within {timeout:.0f} s); see {self.workdir / 'server.log'}")

    def server_command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.workdir}/server.db",
            "--artifacts-destination",
            str(self.workdir / "server-artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    def server_env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_TRACKING_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job runner: starts in seconds
        return env

    def stop(self) -> None:
        """Kill the server and its workers at once (an outage, not a clean shutdown)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None
