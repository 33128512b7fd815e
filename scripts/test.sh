#!/usr/bin/env bash
# The project's test command: sets everything up on a fresh machine (venv, torch, ComfyUI 0.3.75,
# chromium for the browser test), then runs the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
bash scripts/install_browser.sh
export PYTHONUNBUFFERED=1
# Lint first (configured in pyproject.toml): a lint error fails the run like a failing test.
.venv/bin/ruff check .
# pytest's exit code 5 ("no tests collected") is non-zero, so an empty run fails here too.
exec .venv/bin/python -m pytest "$@"
