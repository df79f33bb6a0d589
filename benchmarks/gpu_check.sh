#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): one GPU, a few minutes; on a machine without one it runs
# small on the CPU. Needs PyTorch; DeepSpeed, pydantic and their few dependencies come from the
# project's venv, or from wheels in .whl/ (made by benchmarks/gpu_wheels.sh) on a machine that has
# only PyTorch and no network. Ray is not needed.
#
#   bash benchmarks/gpu_check.sh [--steps N] [--skip loop] ...
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
# DeepSpeed imported as mmpt imports it (models/deepspeed_import.py: without MLflow, seconds less)
if ! "$PY" -c "from models.deepspeed_import import import_deepspeed; import_deepspeed(); import pydantic, yaml, tokenizers, PIL, pyarrow" >/dev/null 2>&1; then
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    site=${TMPDIR:-/tmp}/mmpt-gpu-check-site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu check FAILED: $PY lacks DeepSpeed/pydantic (or pyyaml, tokenizers, pillow, pyarrow); fix: make venv, or bash benchmarks/gpu_wheels.sh on a machine with pip access and copy .whl/ here" >&2
    exit 1
  fi
fi
export PYTHONUNBUFFERED=1
exec "$PY" -m benchmarks.gpu_check "$@"
