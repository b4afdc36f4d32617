#!/usr/bin/env bash
# The toolkit on a GPU box, in one command: does the same code work there, and what does the defence cost at the
# paper's scale? Needs an environment with the requirements and a CUDA build of torch (PYTHON, default .venv's
# python or python3). Writes its logs to OUT_DIR (default runs/gpu_check):
#
#   1. tests/test_cuda.py: the first step's objective, a bf16 run, the evaluation's AUCs and the benches' CUDA path
#      on the GPU against the CPU;
#   2. bench/real_scale.py --device cuda: SD v1.5's architecture at 512 px, bf16 autocast, every method, with MFU
#      (PEAK_TFLOPS: the GPU's dense bf16 peak, default 989 as for an H100/H200 SXM);
#   3. bench/step_overhead.py on the GPU: the tiny stack's interleaved step ratios, CUDA peak memory;
#   4. with FULL_SUITE=1, the whole test suite with the GPU visible (the trainer and evaluate_mia take it).
#
#   bash scripts/gpu_check.sh [OUT_DIR]
set -uo pipefail
out=${1:-$(dirname "$0")/../runs/gpu_check}
case $out in /*) ;; *) out=$PWD/$out ;; esac  # a relative OUT_DIR is the caller's, as the launchers' paths
cd "$(dirname "$0")/.."
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'scripts/gpu_check.sh: torch sees no CUDA device')" || exit 2
mkdir -p "$out"  # after the check: a refused run writes nothing
status=0
step() {  # step NAME COMMAND...: run, log to $out/NAME.log, remember a failure and go on
  local name=$1; shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc"
  [ "$rc" -eq 0 ] || status=1
}
step test_cuda "$python" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
step real_scale "$python" bench/real_scale.py --device cuda --steps "${STEPS:-5}" --peak_tflops "${PEAK_TFLOPS:-989}" \
  --methods lora mp_lora smp_lora smp_lora_every2 smp_calibrated smp_t_band
step step_overhead "$python" bench/step_overhead.py --steps 10 --rounds 3
if [ "${FULL_SUITE:-0}" = 1 ]; then
  step full_suite "$python" -m pytest -q -p no:cacheprovider -n "${SMP_LORA_TEST_WORKERS:-4}" --dist loadfile tests
fi
exit $status
