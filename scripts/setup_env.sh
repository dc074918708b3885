#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv with pinned dependencies, then install recon.
# Idempotent: re-running with unchanged requirements only checks a stamp.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RECON_VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp_value=$(cat requirements/ci.txt requirements/nodeps.txt pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$VENV/.recon-stamp" ] && [ "$(cat "$VENV/.recon-stamp")" = "$stamp_value" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements/ci.txt
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r requirements/nodeps.txt
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
echo "$stamp_value" > "$VENV/.recon-stamp"
