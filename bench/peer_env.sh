#!/usr/bin/env bash
# Create .cache/peer-venv with the peer converter convert-to-quant==1.3.4 (the measuring stick of
# bench/bench_convert.py). It installs a console script named `convert_to_quant`, the same name as
# ours, so it must live in a venv of its own. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.cache/peer-venv
PEER_PINS=${PEER_PINS:-"torch==2.13.0 convert-to-quant==1.3.4"}
# convert-to-quant 1.3.4 imports these at start-up without declaring them as dependencies.
PEER_UNDECLARED=${PEER_UNDECLARED:-"safetensors tqdm numpy"}
STAMP=$VENV/.peer-setup-v1
if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p .cache
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ]; then
  echo "[peer_env] installing $PEER_PINS into $VENV (CPU torch wheel)" >&2
  # torch==2.13.0 also matches a local CPU build (2.13.0+cpu) from pip's find-links, if configured.
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q $PEER_PINS $PEER_UNDECLARED 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$VENV/bin/convert_to_quant" --help >/dev/null
  touch "$STAMP"
fi
echo "$VENV/bin/convert_to_quant"
