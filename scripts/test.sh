#!/usr/bin/env bash
# The test command: sets up .venv (pinned) on a fresh machine, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${RECON_VENV:-.venv}/bin/python" -m pytest -q -p no:cacheprovider "$@"
