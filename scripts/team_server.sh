#!/usr/bin/env bash
# Start a team's tracking server on this machine to try it out (docs/team-server.md): PostgreSQL,
# a moto S3 endpoint and mlflow server with basic auth; prints what each trainer exports.
#   bash scripts/team_server.sh --dir /tmp/team --user alice:alice-password-1 --user bob:bob-password-22
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pipeline.ops.teamserver "$@"
