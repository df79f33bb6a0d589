#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.sh on a GPU machine that has PyTorch but no network: DeepSpeed (a
# pure-Python wheel built here, no ops compiled: they JIT-compile there if ever needed), pydantic and
# the packages DeepSpeed needs that a PyTorch image usually lacks. The versions are this venv's, so
# the check runs what the tests ran. About 5 MiB in .whl/.
#
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION (default 3.12)]
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
PY=.venv/bin/python
[ -x "$PY" ] || { echo "run make venv first" >&2; exit 1; }
mkdir -p .whl
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(version deepspeed)"
pins=()
for pkg in pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson; do
  pins+=("$pkg==$(version "$pkg")")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${pins[@]}"
ls -la .whl
