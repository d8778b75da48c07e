#!/usr/bin/env bash
# Regenerate requirements.lock from a fresh resolution of pyproject.toml (run after changing pins).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install --quiet -e ".[test]"
{
  echo "# Locked versions of every package the project and its tests install (pip constraints)."
  echo "# Regenerate after changing pyproject.toml: bash scripts/lock.sh"
  "$tmp/venv/bin/pip" freeze --exclude-editable | grep -v "^speech-pipeline"
} > requirements.lock
rm -rf "$tmp"
echo "requirements.lock updated"
