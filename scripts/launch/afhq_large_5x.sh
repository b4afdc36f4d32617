#!/usr/bin/env bash
# AFHQ Large 5X (paper Table 2): LoRA, MP-LoRA and SMP-LoRA for each seed, membership-inference evaluation, mean ± s.e. over seeds.
#   MODEL=/models/v1-5-pruned.safetensors bash scripts/launch/afhq_large_5x.sh
#   DRY_RUN=1 MODEL=... bash scripts/launch/afhq_large_5x.sh          # validate everything, train nothing
# Also: DATA (default data/afhq_large_5x/split.json), SEEDS ("1337 1338 1339"), OUT (runs/afhq_large_5x), METHODS, EXTRA_ARGS,
# EVAL_ARGS, LAUNCH, PYTHON: see scripts/launch/common.sh.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
smp_dataset_main afhq_large_5x
