#!/usr/bin/env bash
# Paper Table 9 (Pokemon): DreamBooth (full fine-tuning with prior preservation), plain and SMP, at eta_2 = 5e-6; membership inference on the fine-tuned UNets.
#   MODEL=/models/v1-5-pruned.safetensors bash scripts/launch/pokemon_dreambooth.sh
#   DRY_RUN=1 MODEL=... bash scripts/launch/pokemon_dreambooth.sh          # validate everything, train nothing
# Also: DATA (data/pokemon/split.json), SEEDS ("1337"), OUT (runs/table9_dreambooth/pokemon), INSTANCE_TOKEN, CLASS_PROMPT, NUM_CLASS_IMAGES,
# LAUNCH, EXTRA_ARGS (e.g. "--optimizer_type AdamW8bit" on a small GPU), EVAL_ARGS, PYTHON: see scripts/launch/common.sh.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
smp_table9 dreambooth
