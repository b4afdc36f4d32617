#!/usr/bin/env bash
# Paper Table 6: SMP-LoRA with lambda in {1, 0.5, 0.1, 0.05, 0.01} (the paper's main results use 0.05; the
# authors' launchers pass 1). DATASET picks the configs (pokemon, celeba_small or celeba_large in the paper).
#   MODEL=/models/v1-5-pruned.safetensors DATASET=pokemon bash scripts/launch/ablation_lambda.sh
# Also: LAMBDAS, DATA, SEEDS (default "1337"), OUT (runs/ablation_lambda/<dataset>), DRY_RUN, EXTRA_ARGS, ...
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_name() { echo "smp_lora_lambda$1"; }
run_flags() { printf '%s\n' --privacy_lambda "$1"; }
smp_sweep ablation_lambda smp_lora "${LAMBDAS:-1 0.5 0.1 0.05 0.01}" run_name run_flags
