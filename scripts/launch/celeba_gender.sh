#!/usr/bin/env bash
# CelebA Gender (paper Table 1): LoRA, MP-LoRA and SMP-LoRA for each seed, membership-inference evaluation, mean ± s.e. over seeds.
#   MODEL=/models/v1-5-pruned.safetensors bash scripts/launch/celeba_gender.sh
#   DRY_RUN=1 MODEL=... bash scripts/launch/celeba_gender.sh          # validate everything, train nothing
# Also: DATA (default data/celeba_gender/split.json), SEEDS ("1337 1338 1339"), OUT (runs/celeba_gender), METHODS, EXTRA_ARGS,
# EVAL_ARGS, LAUNCH, PYTHON: see scripts/launch/common.sh.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
smp_dataset_main celeba_gender
