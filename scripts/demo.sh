#!/usr/bin/env bash
# The main job, end to end on the embedded default (CPU, no download): set up .venv, build the digits data
# and a pre-trained tiny base model, train LoRA / MP-LoRA / SMP-LoRA, attack them, write runs/demo/report.md.
# A second run reuses the cached data, base model and latents. Extra arguments go to scripts/demo.py.
# Called from anywhere: a relative --workdir is taken from the current folder (default: runs/demo in the repository).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bash "$repo/scripts/setup.sh"
exec "$repo/.venv/bin/python" "$repo/scripts/demo.py" "$@"
