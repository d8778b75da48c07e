#!/usr/bin/env bash
# Install the project and its test tools into .venv at the repository root.
# Versions come from requirements.lock (pip constraints); wheels are cached by pip between installs.
# Needs only python3 (3.11). torch/torchaudio are the registry's CUDA builds (~4.7 GB, run on CPU too).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# pip names each package as it fetches it (a line at least every few seconds while it downloads); the filters hide
# pip's notes about local index folders some machines configure, and the packages that are already installed.
echo "installing the project and its test tools into .venv: about 4.7 GB on a fresh machine (torch's CUDA build is" \
  "most of it), a few minutes; quick when they are installed already"
.venv/bin/python -m pip install --progress-bar off -c requirements.lock -e ".[test]" 2> >(grep -v "is ignored" >&2) \
  | { grep -v "^Requirement already satisfied" || true; }
# The browser tests (tests/e2e/test_browser.py) drive Debian's chromium through Playwright; Playwright's own
# browser download is not used. Installed here when missing and this runs as root; else they are skipped.
if ! command -v chromium > /dev/null; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get > /dev/null; then
    echo "installing Debian's chromium for the browser tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null) \
      || echo "chromium could not be installed: the browser tests will be skipped" >&2
  else
    echo "chromium is not installed (as root: apt-get install chromium): the browser tests will be skipped" >&2
  fi
fi
# The Slurm tests (tests/e2e/test_slurm.py) start a real single-node Slurm on loopback: Debian's slurmctld, slurmd, its
# clients and munge, installed here when missing and this runs as root; else they are skipped.
if ! command -v slurmctld > /dev/null && [ ! -x /usr/sbin/slurmctld ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get > /dev/null; then
    echo "installing Debian's Slurm and munge for the Slurm tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge \
      > /dev/null) || echo "Slurm could not be installed: the Slurm tests will be skipped" >&2
  else
    echo "Slurm is not installed (as root: apt-get install slurmctld slurmd slurm-client munge): the Slurm tests" \
      "will be skipped" >&2
  fi
fi
.venv/bin/python -c "import torch, torchaudio, mlflow; print(f'environment ready: torch {torch.__version__}, torchaudio {torchaudio.__version__}, mlflow {mlflow.__version__}')"
