"""Where and when something was made: the current UTC time and the code's git commit, written into
checkpoints, prepared data sets and run tags."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path


def utc_now() -> str:
    """The current time in UTC, ISO 8601 to the second (e.g. "2026-11-27T12:08:19+00:00")."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def code_version() -> str | None:
    """The git commit of the code, when it runs from a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
