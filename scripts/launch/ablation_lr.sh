#!/usr/bin/env bash
# Paper Table 7: SMP-LoRA with LoRA learning rate eta_2 in {1e-4, 1e-5, 1e-6} (Pokemon in the paper).
# The UNet LoRA gets eta_2; the text-encoder LoRA keeps the configs' 1:10 ratio (eta_2 / 10), as the default
# 1e-4 / 1e-5 pair does. (The authors' old 1e-5 launcher set all three rates to 1e-5.)
#   MODEL=/models/v1-5-pruned.safetensors bash scripts/launch/ablation_lr.sh
# Also: LRS, DATASET (pokemon), DATA, SEEDS ("1337"), OUT (runs/ablation_lr/<dataset>), DRY_RUN, EXTRA_ARGS, ...
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_name() { echo "smp_lora_lr$1"; }
run_flags() {
    printf '%s\n' --learning_rate "$1" --unet_lr "$1" --text_encoder_lr "$(smp_calc "$1" 'x / 10')"
}
smp_sweep ablation_lr smp_lora "${LRS:-1e-4 1e-5 1e-6}" run_name run_flags
