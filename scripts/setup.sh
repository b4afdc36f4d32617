#!/usr/bin/env bash
# Create ./.venv with the pinned dependencies and the project itself, editable (idempotent: a no-op when
# requirements and pyproject.toml are unchanged).
# torch is installed first and alone so that nothing later can pull a CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
stamp=.venv/.smp-lora-requirements
wanted=$(cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "setting up .venv (first run takes a few minutes)..."
  .venv/bin/python -m pip install -q --disable-pip-version-check "torch==$(grep -E '^torch==' requirements.txt | cut -d= -f3)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
  # The project itself (library/, networks/), editable: scripts, bench and tests import it without sys.path edits.
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
  echo "$wanted" > "$stamp"
fi
