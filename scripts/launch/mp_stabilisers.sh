#!/usr/bin/env bash
# Paper Table 10: can gradient stabilisers rescue MP-LoRA? MP-LoRA with gradient clipping (--max_grad_norm
# CLIP_NORM, default 1.0) and MP-LoRA with gradient normalisation (--grad_normalize, no clipping). The SMP-LoRA
# row of the table comes from scripts/launch/pokemon.sh.
#   MODEL=/models/v1-5-pruned.safetensors bash scripts/launch/mp_stabilisers.sh
# Also: CLIP_NORM, DATASET (pokemon), DATA, SEEDS ("1337"), OUT (runs/mp_stabilisers/<dataset>), DRY_RUN, ...
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_name() { echo "mp_lora_$1"; }
run_flags() {
    case "$1" in
        clip) printf '%s\n' --max_grad_norm "${CLIP_NORM:-1.0}" --no-grad_normalize ;;
        gradnorm) printf '%s\n' --grad_normalize --max_grad_norm 0 ;;
        *) smp_die "unknown stabiliser $1 (clip, gradnorm)" ;;
    esac
}
smp_sweep mp_stabilisers mp_lora "clip gradnorm" run_name run_flags
