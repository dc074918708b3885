#!/usr/bin/env bash
# The demo: generate a scene with known poses, reconstruct it with `recon run`, score it against the ground truth.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
OUT=${1:-out/demo}
.venv/bin/python examples/make_scene.py "$OUT/scene"
.venv/bin/recon run "$OUT/scene/images" "$OUT/recon"
.venv/bin/recon eval "$OUT/recon/sparse/0" --gt "$OUT/scene/gt"
