# shellcheck shell=bash
# Shared functions of the paper-reproduction launchers (scripts/launch/*.sh); source it, do not run it.
#
# Environment (every launcher):
#   MODEL       SD v1.5 base model: a .safetensors checkpoint or a diffusers folder (required)
#   DATA        split manifest (default data/<dataset>/split.json, written by scripts/prepare_*.py)
#   SEEDS       training seeds, space-separated (dataset launchers: "1337 1338 1339"; ablations: "1337")
#   OUT         output root (default runs/<dataset> or runs/<ablation>/<dataset>)
#   DRY_RUN=1   pass --dry_run to every training call (validates model, manifest and config, trains nothing)
#               and to every evaluation (its flags, on the base model alone where the models do not exist yet);
#               results are not collected
#   EXTRA_ARGS  extra flags appended to every training call, whitespace-separated (e.g. "--resolution 256")
#   EVAL_ARGS   extra flags for evaluate_mia.py, whitespace-separated
#   TOKENIZER   a CLIP tokenizer folder (e.g. the tokenizer/ of a diffusers SD 1.5 copy), passed as --tokenizer_path
#               to training and evaluation: needed when MODEL is a single .safetensors file without one (as
#               v1-5-pruned.safetensors) and open_clip is not installed
#   LAUNCH      how training scripts are started (default: the repository's .venv accelerate, else the one on
#               PATH, as "accelerate launch --quiet --num_processes 1 ...": one process, the paper's batch, even on
#               a box with several GPUs, where accelerate would start one per GPU; --quiet and the defaults given
#               keep a refused run to its one error line, without accelerate's traceback or warning). E.g.
#               "python", or "accelerate launch --quiet --multi_gpu --num_processes 4" (the global batch grows
#               with the processes)
#   PYTHON      the Python interpreter for evaluation and the collector (default: the repository's .venv python,
#               else python on PATH)
#   RETRAIN=1   train and evaluate again what a previous call finished, each run from its first step; by default
#               a rerun skips every run whose <name>.safetensors and <name>.json (naming DATA's split) exist and
#               every evaluation whose report.json is newer than its models and was made by the same command on
#               the same split (its launch_command.txt),
#               so a launcher that died at seed 3 goes on from there. A killed RETRAIN=1 call is continued by
#               the same command without RETRAIN=1 (the retrain's states are the newest)
#   RESUMABLE=0 write no training states. By default every training saves a resumable state with each
#               --save_every_n_epochs checkpoint, keeps only the newest (--save_last_n_epochs_state 1) and the
#               final <name>-state, and starts with --resume latest: a training killed at epoch 320 of 400 goes
#               on from its epoch-300 state, bit for bit, when the launcher is called again
# Relative MODEL / DATA / OUT paths are taken from the directory you call the launcher from; the launcher
# itself runs from the repository root, so the configs' relative paths resolve there.

set -euo pipefail

SMP_CALLER_PWD="$PWD"
SMP_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

smp_die() {
    echo "error: $*" >&2
    exit 2
}

smp_log() {
    echo "[launch] $*" >&2
}

# Absolute, normalised form of a path given relative to the caller's directory (symlinks kept).
smp_abspath() {
    local path="$1"
    [[ "$path" == /* ]] || path="$SMP_CALLER_PWD/$path"
    realpath -m -s -- "$path" 2>/dev/null || printf '%s\n' "$path"
}

# smp_setup <default-OUT relative to the repo> <default SEEDS> [dataset for the default DATA]
# Resolves the environment, checks MODEL / DATA, and cd's to the repository root.
smp_setup() {
    local default_out="$1" default_seeds="$2" dataset="${3:-}"
    [[ -n "${MODEL:-}" ]] || smp_die "set MODEL to the SD v1.5 base model (e.g. MODEL=/models/v1-5-pruned.safetensors)"
    MODEL="$(smp_abspath "$MODEL")"
    [[ -e "$MODEL" ]] || smp_die "MODEL $MODEL does not exist: point it at v1-5-pruned.safetensors or a diffusers folder"
    if [[ -n "${DATA:-}" ]]; then
        DATA="$(smp_abspath "$DATA")"
    else
        [[ -n "$dataset" ]] || smp_die "set DATA to a split manifest"
        DATA="$SMP_REPO_ROOT/data/$dataset/split.json"
    fi
    [[ -f "$DATA" ]] || smp_die "split manifest $DATA not found: write it with scripts/prepare_*.py (see docs/reproducing.md) or set DATA"
    if [[ -n "${OUT:-}" ]]; then OUT="$(smp_abspath "$OUT")"; else OUT="$SMP_REPO_ROOT/$default_out"; fi
    SEEDS="${SEEDS:-$default_seeds}"
    [[ -n "${SEEDS// /}" ]] || smp_die "SEEDS is empty: give at least one seed"
    local seed seen=" "
    for seed in $SEEDS; do  # every seed checked before the first (hours-long) training starts
        [[ "$seed" =~ ^[0-9]+$ ]] || smp_die "SEEDS: '$seed' is not a seed (non-negative integers, space-separated)"
        [[ "$seen" != *" $seed "* ]] || smp_die "SEEDS: $seed is given twice (it would count as two seeds)"
        seen+="$seed "
    done
    RETRAIN="${RETRAIN:-0}"
    RESUMABLE="${RESUMABLE:-1}"
    [[ "$RESUMABLE" == 0 || "$RESUMABLE" == 1 ]] || smp_die "RESUMABLE must be 0 or 1, got '$RESUMABLE'"
    DRY_RUN="${DRY_RUN:-0}"
    local venv="$SMP_REPO_ROOT/.venv/bin"  # scripts/setup.sh's environment, used without being activated
    if [[ -z "${PYTHON:-}" ]]; then
        PYTHON=python
        [[ -x "$venv/python" ]] && PYTHON="$venv/python"
    fi
    local accelerate=accelerate
    [[ -x "$venv/accelerate" ]] && accelerate="$venv/accelerate"
    # --num_machines / --mixed_precision / --dynamo_backend: accelerate's own defaults, given so that it prints no
    # warning about them (the trainer sets its precision from its config, not from accelerate's).
    read -r -a SMP_LAUNCH <<< "${LAUNCH:-$accelerate launch --quiet --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no}"
    command -v "$PYTHON" > /dev/null || smp_die "PYTHON '$PYTHON' not found: run bash scripts/setup.sh (the launchers use its .venv), activate your environment, or set PYTHON"
    command -v "${SMP_LAUNCH[0]}" > /dev/null || smp_die "LAUNCH '${SMP_LAUNCH[*]}' not found: run bash scripts/setup.sh (the launchers use its .venv), activate your environment, or set LAUNCH (e.g. LAUNCH=python)"
    read -r -a SMP_EXTRA <<< "${EXTRA_ARGS:-}"
    read -r -a SMP_EVAL_EXTRA <<< "${EVAL_ARGS:-}"
    if [[ -n "${TOKENIZER:-}" ]]; then
        TOKENIZER="$(smp_abspath "$TOKENIZER")"
        [[ -d "$TOKENIZER" ]] || smp_die "TOKENIZER $TOKENIZER is not a folder: point it at a CLIP tokenizer folder (e.g. the tokenizer/ of a diffusers SD 1.5 copy)"
        SMP_EXTRA=(--tokenizer_path "$TOKENIZER" "${SMP_EXTRA[@]}")
        SMP_EVAL_EXTRA=(--tokenizer_path "$TOKENIZER" "${SMP_EVAL_EXTRA[@]}")
    fi
    cd "$SMP_REPO_ROOT"
    export MODEL DATA OUT SEEDS DRY_RUN RETRAIN RESUMABLE
    smp_log "model $MODEL"
    smp_log "manifest $DATA"
    local mode=""
    [[ "$DRY_RUN" == 1 ]] && mode="; DRY RUN (nothing is trained)"
    smp_log "output $OUT; seeds: $SEEDS$mode"
}

# Print a command (shell-quoted) and run it.
smp_run() {
    local quoted
    quoted="$(printf '%q ' "$@")"
    smp_log "+ ${quoted% }"
    "$@"
}

# The content hash of DATA's split (library.data.manifest.split_sha256: the images and captions of every set, not
# where the dataset lies), into SMP_SPLIT_SHA, once per launch. A finished run or report of another split is not
# skipped: a re-prepared dataset trains and evaluates again; a moved one (same split) does not.
smp_split_sha_init() {
    [[ -z "${SMP_SPLIT_SHA:-}" ]] || return 0
    SMP_SPLIT_SHA="$("$PYTHON" -c 'import sys
from library.data.manifest import read_manifest, split_sha256
print(split_sha256(read_manifest(sys.argv[1], verify=False)))' "$DATA")" && [[ -n "$SMP_SPLIT_SHA" ]] \
        || smp_die "cannot read the split manifest $DATA (see the error above)"
}

# smp_train <method> <config.toml> <seed> <output_dir> <output_name> [flags...]
# One training run of train_<method>.py; the extra flags come before EXTRA_ARGS (which win).
smp_train() {
    local method="$1" config="$2" seed="$3" out_dir="$4" name="$5"
    shift 5
    [[ -f "$config" ]] || smp_die "config $config not found"
    if [[ "$DRY_RUN" != 1 && -e "$out_dir/$name.safetensors" ]]; then
        if [[ "$RETRAIN" != 1 && -f "$out_dir/$name.json" ]]; then
            smp_split_sha_init
            if grep -q "\"split_sha256\": \"$SMP_SPLIT_SHA\"" "$out_dir/$name.json"; then
                smp_log "skip: $out_dir/$name.safetensors is a finished run (RETRAIN=1 trains it again)"
                return 0
            fi
            smp_log "$out_dir/$name.safetensors was trained on another split than $DATA: training again"
        fi
        set -- "$@" --overwrite  # RETRAIN=1, or a run killed between its LoRA and its record: train it again
    fi
    local extra=" ${SMP_EXTRA[*]} "
    if [[ "$RESUMABLE" == 1 && "$extra" == *" --no-save_state "* ]]; then
        smp_log "EXTRA_ARGS has --no-save_state: no resumable states (as RESUMABLE=0)"
    elif [[ "$RESUMABLE" == 1 ]]; then  # in a dry run too: the flags are validated with the config
        local resumable=(--save_state)
        [[ "$RETRAIN" == 1 ]] || resumable+=(--resume latest)  # the newest state of this run, if any
        if grep -Eq '^[[:space:]]*save_every_n_epochs[[:space:]]*=' "$config"; then
            resumable+=(--save_last_n_epochs_state 1)  # one state per run on disk, not one per checkpoint
        fi
        set -- "${resumable[@]}" "$@"
    fi
    local cmd=("${SMP_LAUNCH[@]}" "train_${method}.py" --config_file "$config"
        --pretrained_model_name_or_path "$MODEL" --split_manifest "$DATA"
        --seed "$seed" --output_dir "$out_dir" --output_name "$name" "$@")
    cmd+=("${SMP_EXTRA[@]}")
    [[ "$DRY_RUN" == 1 ]] && cmd+=(--dry_run)
    smp_run "${cmd[@]}"
}

# smp_evaluate <output_dir> <lora.safetensors>...
# One evaluate_mia.py call over several LoRAs (same split, same features), writing <output_dir>/report.json.
# No --clip_skip / --max_token_length: evaluate_mia.py takes them from the LoRA files' metadata, so the attack
# queries the text encoder exactly as each training did (the paper configs: 2 / 225); a value passed here could
# only contradict it (tests/test_launchers.py checks this).
smp_evaluate() {
    local out_dir="$1"
    shift
    smp_evaluate_models "$out_dir" --network_weights "$@"
}

# smp_evaluate_models <output_dir> <--network_weights|--unet_weights> <model>...
# The same for LoRA files or fully fine-tuned UNets (diffusers folders or SD single files; their metadata too
# records the conditioning).
smp_evaluate_models() {
    local out_dir="$1" flag="$2"
    shift 2
    # the models go between the base model and the rest (a dry run without them keeps the rest)
    local base=("$PYTHON" evaluate_mia.py --pretrained_model_name_or_path "$MODEL")
    local rest=(--split_manifest "$DATA" --output_dir "$out_dir" "${SMP_EVAL_EXTRA[@]}")
    local cmd=("${base[@]}" "$flag" "$@" "${rest[@]}")
    local made_by="$out_dir/launch_command.txt" command_text
    command_text="$(printf '%s\n' "${cmd[@]}")"
    if [[ "$DRY_RUN" != 1 ]]; then
        smp_split_sha_init
        command_text+=$'\n'"# split_sha256 $SMP_SPLIT_SHA"  # the same path may hold another split later
    fi
    if [[ "$DRY_RUN" != 1 && "$RETRAIN" != 1 && -f "$out_dir/report.json" ]]; then
        local model fresh=1
        for model in "$@"; do
            [[ "$model" -nt "$out_dir/report.json" ]] && fresh=0
        done
        if [[ "$fresh" == 1 && -f "$made_by" && "$(cat "$made_by")" == "$command_text" ]]; then
            smp_log "skip: $out_dir/report.json is newer than its models and was made by this command (RETRAIN=1 evaluates again)"
            return 0
        elif [[ "$fresh" == 1 ]]; then
            smp_log "$out_dir/report.json was made by another command (other models, EVAL_ARGS or split): evaluating again"
        fi
    fi
    if [[ "$DRY_RUN" == 1 ]]; then
        local model
        for model in "$@"; do
            if [[ ! -e "$model" ]]; then  # a dry run trains nothing: the flags are checked on the base model alone
                smp_log "dry run: $model does not exist yet; checking the evaluation's flags on the base model"
                cmd=("${base[@]}" "${rest[@]}")
                break
            fi
        done
        cmd+=(--dry_run)
    fi
    if [[ -f "$out_dir/report.json" ]]; then
        cmd+=(--overwrite)  # the checks above chose to evaluate again (other models or flags, or RETRAIN=1)
    fi
    smp_run "${cmd[@]}"
    if [[ "$DRY_RUN" != 1 && -d "$out_dir" ]]; then
        printf '%s\n' "$command_text" > "$made_by"  # what the skip above compares
    fi
}

# smp_collect <output_dir> <report.json>...
# Mean ± s.e. over seeds of every metric, per model and attack (paper Table 1 style).
smp_collect() {
    local out_dir="$1"
    shift
    if [[ "$DRY_RUN" == 1 ]]; then
        smp_log "dry run: would collect $# report(s) into $out_dir/summary.{json,md}"
        return 0
    fi
    smp_run "$PYTHON" scripts/collect_results.py --output_dir "$out_dir" "$@"
}

# smp_dataset_main <dataset>: LoRA, MP-LoRA and SMP-LoRA for every seed, evaluation, collection (Table 1/2).
# METHODS (default "lora mp_lora smp_lora") picks a subset of the three.
smp_dataset_main() {
    local dataset="$1" seed method
    smp_setup "runs/$dataset" "1337 1338 1339" "$dataset"
    local methods="${METHODS:-lora mp_lora smp_lora}"
    local reports=()
    for method in $methods; do  # every name checked before the first (hours-long) training starts
        [[ -f "configs/$dataset/$method.toml" ]] || smp_die "unknown method $method (METHODS: lora mp_lora smp_lora)"
    done
    for seed in $SEEDS; do
        local loras=()
        for method in $methods; do
            smp_train "$method" "configs/$dataset/$method.toml" "$seed" "$OUT/seed$seed/$method" "$method"
            loras+=("$OUT/seed$seed/$method/$method.safetensors")
        done
        smp_evaluate "$OUT/seed$seed/eval" "${loras[@]}"
        reports+=("$OUT/seed$seed/eval/report.json")
    done
    smp_collect "$OUT" "${reports[@]}"
    smp_log "done: $dataset ($OUT)"
}

# smp_sweep <name> <method> <values> <name-fn> <flags-fn>: one run per value and seed, then evaluation.
# <name-fn value> prints the run's name; <flags-fn value> prints its extra flags (one per line).
smp_sweep() {
    local sweep="$1" method="$2" values="$3" name_fn="$4" flags_fn="$5"
    local dataset="${DATASET:-pokemon}"
    smp_setup "runs/$sweep/$dataset" "1337" "$dataset"
    local config="configs/$dataset/$method.toml"
    local reports=() seed value
    for seed in $SEEDS; do
        local loras=()
        for value in $values; do
            local name flags=()
            name="$("$name_fn" "$value")"
            mapfile -t flags < <("$flags_fn" "$value")
            smp_train "$method" "$config" "$seed" "$OUT/seed$seed/$name" "$name" "${flags[@]}"
            loras+=("$OUT/seed$seed/$name/$name.safetensors")
        done
        smp_evaluate "$OUT/seed$seed/eval" "${loras[@]}"
        reports+=("$OUT/seed$seed/eval/report.json")
    done
    smp_collect "$OUT" "${reports[@]}"
    smp_log "done: $sweep on $dataset ($OUT)"
}

# smp_table9 <full|dreambooth>: paper Table 9 on Pokemon, plain and SMP (the Pokemon configs' settings, paper
# features, lambda 0.05) training the whole UNet at eta_2 = 5e-6 with gradient checkpointing; "dreambooth" adds
# prior preservation (identifier INSTANCE_TOKEN, default "pokemon": every caption of prepare_pokemon.py starts with
# it, as the authors' kohya folder 1_pokemon; CLASS_PROMPT, default "a cartoon character"; NUM_CLASS_IMAGES,
# default 200, generated once by the base model into $OUT/class_images). Then one evaluation of the UNets.
smp_table9() {
    local kind="$1" seed method
    smp_setup "runs/table9_$kind/pokemon" "1337" pokemon
    local flags=(--train_mode full --learning_rate 5e-6 --unet_lr 5e-6 --gradient_checkpointing)
    if [[ "$kind" == dreambooth ]]; then
        flags+=(--with_prior_preservation --instance_token "${INSTANCE_TOKEN:-pokemon}"
            --class_prompt "${CLASS_PROMPT:-a cartoon character}" --num_class_images "${NUM_CLASS_IMAGES:-200}"
            --class_data_dir "$OUT/class_images")
    fi
    local reports=()
    for seed in $SEEDS; do
        local unets=()
        for method in lora smp_lora; do
            local name="${method%lora}$kind"  # full / smp_full, dreambooth / smp_dreambooth
            smp_train "$method" "configs/pokemon/$method.toml" "$seed" "$OUT/seed$seed/$name" "$name" "${flags[@]}"
            unets+=("$OUT/seed$seed/$name/$name-unet")
        done
        smp_evaluate_models "$OUT/seed$seed/eval" --unet_weights "${unets[@]}"
        reports+=("$OUT/seed$seed/eval/report.json")
    done
    smp_collect "$OUT" "${reports[@]}"
    smp_log "done: Table 9 $kind on pokemon ($OUT)"
}

# Arithmetic on flag values (bash has integers only).
smp_calc() {
    awk -v x="$1" "BEGIN { printf \"%g\", $2 }"
}
