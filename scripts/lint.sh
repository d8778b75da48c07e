#!/usr/bin/env bash
# The lint gate: ruff's lint rules and its formatter over the whole tree (rules: [tool.ruff] in pyproject.toml).
# Fix what it finds with `.venv/bin/ruff check --fix .` and `.venv/bin/ruff format .`.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
