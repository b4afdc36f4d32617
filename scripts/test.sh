#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on the CPU. Extra arguments go to pytest.
# Tests run in SMP_LORA_TEST_WORKERS processes (default: min(2, cores)), one module per worker at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cores=$(nproc 2>/dev/null || echo 1)
workers=${SMP_LORA_TEST_WORKERS:-$(( cores < 2 ? 1 : 2 ))}
exec .venv/bin/python -m pytest -q -n "$workers" --dist loadfile "$@" tests
