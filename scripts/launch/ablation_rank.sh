#!/usr/bin/env bash
# Paper Table 8: SMP-LoRA with rank r in {128, 64, 32, 16, 8} (Pokemon in the paper). alpha = r / 2, so the
# LoRA scale alpha / r stays 0.5 as in the default r 64 / alpha 32.
#   MODEL=/models/v1-5-pruned.safetensors bash scripts/launch/ablation_rank.sh
# Also: RANKS, DATASET (pokemon), DATA, SEEDS ("1337"), OUT (runs/ablation_rank/<dataset>), DRY_RUN, ...
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_name() { echo "smp_lora_rank$1"; }
run_flags() { printf '%s\n' --network_dim "$1" --network_alpha "$(smp_calc "$1" 'x / 2')"; }
smp_sweep ablation_rank smp_lora "${RANKS:-128 64 32 16 8}" run_name run_flags
