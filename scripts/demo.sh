#!/usr/bin/env bash
# The main job: the whole restoration chain (train_adapter -> pretrain_vocoder -> finetune_vocoder) on
# the embedded demo corpus with tiny presets, through `mlflow run -e main`, tracked in ./mlflow.db
# (SQLite) with artifacts in ./mlruns. Each step is its own MLflow run, linked by run IDs; running
# the demo again reuses the finished steps (same entry point, parameters and code version).
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}
OVERRIDES=${OVERRIDES:-""}   # e.g. OVERRIDES="pretrain_vocoder.trainer.max_steps=600" or "main.reuse=false"
mlflow run . -e main --env-manager local --experiment-name main -P overrides="$OVERRIDES"
cat <<MSG
  Checkpoints: .venv/bin/python -m pipeline.checkpoint_table --model hifigan --dataset demo
  Listening pages: the vocoder runs' artifacts samples/step-*/index.html (clean, degraded, generated),
    and the evaluate run's listening/index.html (clean, degraded, restored, copy synthesis)
  Restore your own audio with the best chain registered (the one just registered is the "model" above):
    .venv/bin/python -m pipeline.restore model_uri=models:/speech-restoration@champion \\
        input=<file or directory> output=<directory>
  Resume a step with more steps, logging into the same run:
    source .venv/bin/activate && mlflow run . -e pretrain_vocoder --env-manager local \\
        --experiment-name pretrain_vocoder -P resume_run=<pretrain_vocoder run ID above> \\
        -P overrides="trainer.max_steps=600"
MSG
