#!/usr/bin/env bash
# One command: set up everything, lint and type-check, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
EMRDR_SETUP_TEST_TOOLS=1 bash scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check .
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
exec .venv/bin/python -m pytest "$@"
