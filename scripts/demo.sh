#!/usr/bin/env bash
# The main job, end to end on the embedded default (CPU, no download): set up .venv, build the digits data
# and a pre-trained tiny base model, train LoRA / MP-LoRA / SMP-LoRA, attack them, write runs/demo/report.md.
# A second run reuses the cached data, base model and latents. Extra arguments go to scripts/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
