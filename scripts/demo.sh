#!/usr/bin/env bash
# One command: set up everything, then run the guided tour on the embedded stack.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/emrdr demo "$@"
