"""Debian's chromium driven by Playwright for Python: where the browser is and how it is started. Shared by the
browser tests (tests/e2e/test_browser.py) and the MLflow UI benchmark (pipeline/bench/scale_ui.py)."""

from __future__ import annotations

import importlib.util
import shutil

# As root chromium needs --no-sandbox; the rest keep it from calling home on a closed network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    """The chromium executable on PATH, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def missing_browser() -> str | None:
    """Why no browser can be driven here (chromium or Playwright missing), or None when both are there."""
    if chromium_path() is None:
        return (
            "Debian's chromium is not installed (scripts/setup.sh installs it when run as root: "
            "apt-get install chromium)"
        )
    if importlib.util.find_spec("playwright") is None:
        return "Playwright for Python is not installed (pip install -e '.[test]')"
    return None
