#!/usr/bin/env bash
# Create (or reuse) .venv and install the package with the pins the CPU environment uses.
# torch/torchvision are pinned so pip takes the build that lies on this machine's disk instead of downloading one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}" -e ".[dev]" \
  2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, transformers, videollama3_train; print('torch', torch.__version__, '| transformers', transformers.__version__)"
