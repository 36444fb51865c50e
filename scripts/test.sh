#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check heron tests
.venv/bin/python -m mypy  # heron/, configured in pyproject.toml
exec .venv/bin/python -m pytest -q "$@"
