#!/usr/bin/env bash
# Set everything up and run the main job on the embedded defaults (configs/demo.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/raybind demo "$@"
