#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv with everything the converter,
# the tests and the ComfyUI integration need. Idempotent: a second run only checks.
#
# torch: ComfyUI 0.3.75 imports torchvision/torchaudio, whose PyPI wheels must pair with the PyPI
# torch build (which runs fine on CPU). We pin that trio here, not in pyproject.toml, so installing
# the pack into an existing ComfyUI environment never moves its torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PINS=${TORCH_PINS:-"torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0"}
STAMP=.venv/.hybridquant-setup-v1

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  echo "[setup] installing $TORCH_PINS and the pack (editable, with test extras)"
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q $TORCH_PINS 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q -e '.[test,bench]' 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch, safetensors, bitsandbytes, comfy_kitchen, hybridquant.converter" \
    2> >(grep -v "gemm_4bit_forward\|kernels" >&2)
  touch "$STAMP"
fi
if [ "${HYBRIDQUANT_SKIP_COMFYUI:-0}" != 1 ]; then
  bash scripts/install_comfyui.sh
fi
echo "[setup] ready: .venv"
