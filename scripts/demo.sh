#!/usr/bin/env bash
# The main job: a short train_adapter run on the embedded demo corpus through `mlflow run`,
# tracked in ./mlflow.db (SQLite) with artifacts in ./mlartifacts... then how to look and resume.
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}
OVERRIDES=${OVERRIDES:-"ssl=tiny trainer.max_steps=200 checkpoint.save_interval=50 validation.interval=50 batch_size=4"}
mlflow run . -e train_adapter --env-manager local --experiment-name train_adapter -P overrides="$OVERRIDES"
run_id=$(python - <<'PY'
from mlflow import MlflowClient
runs = MlflowClient().search_runs(
    [MlflowClient().get_experiment_by_name("train_adapter").experiment_id],
    "tags.stage = 'train_adapter'", order_by=["attributes.start_time DESC"], max_results=1)
print(runs[0].info.run_id)
PY
)
cat <<MSG

Done. Run ID: $run_id
  Dashboard:  .venv/bin/mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI   (then open http://127.0.0.1:5000)
  Checkpoints: .venv/bin/python -m pipeline.checkpoints --model tiny --dataset demo
  Resume (e.g. with more steps), logging into the same run:
    source .venv/bin/activate && mlflow run . -e train_adapter --env-manager local --experiment-name train_adapter \\
        -P resume_run=$run_id -P overrides="trainer.max_steps=300"
MSG
