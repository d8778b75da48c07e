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
# The synthetic multi-voice corpus (data=voices, pipeline/data/voices.py) is spoken by Debian's flite, festival (with
# two diphone voices) and espeak-ng, installed here when missing and this runs as root; else data=voices fails,
# naming the packages, and its tests are skipped.
voice_packages=()
command -v flite > /dev/null || voice_packages+=(flite)
command -v espeak-ng > /dev/null || voice_packages+=(espeak-ng)
command -v text2wave > /dev/null || voice_packages+=(festival)
[ -d /usr/share/festival/voices/english/kal_diphone ] || voice_packages+=(festvox-kallpc16k)
[ -d /usr/share/festival/voices/english/ked_diphone ] || voice_packages+=(festvox-kdlpc16k)
if [ ${#voice_packages[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get > /dev/null; then
    echo "installing Debian's speech synthesisers for the voices corpus: ${voice_packages[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${voice_packages[@]}" > /dev/null) \
      || echo "the speech synthesisers could not be installed: data=voices will not build, its tests are skipped" >&2
  else
    echo "speech synthesisers missing (as root: apt-get install ${voice_packages[*]}): data=voices will not build," \
      "its tests are skipped" >&2
  fi
fi
.venv/bin/python -c "import torch, torchaudio, mlflow; print(f'environment ready: torch {torch.__version__}, torchaudio {torchaudio.__version__}, mlflow {mlflow.__version__}')"
