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
# (the filter only hides pip's notes about local index folders some machines configure)
.venv/bin/python -m pip install --quiet -c requirements.lock -e ".[test]" 2> >(grep -v "is ignored" >&2)
.venv/bin/python -c "import torch, torchaudio, mlflow; print(f'environment ready: torch {torch.__version__}, torchaudio {torchaudio.__version__}, mlflow {mlflow.__version__}')"
