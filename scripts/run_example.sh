#!/usr/bin/env bash
# The README's main job: set up the converter's venv (no ComfyUI needed), then convert the bundled
# example checkpoint (examples/flux_like_tiny.safetensors, a toy-width Flux.1 layout) and print the
# summaries. Outputs go to artifacts/example/ (override with OUT_DIR=...); --overwrite makes re-runs work.
set -euo pipefail
cd "$(dirname "$0")/.."
HYBRIDQUANT_SKIP_COMFYUI=1 bash scripts/setup_env.sh
OUT=${OUT_DIR:-artifacts/example}
mkdir -p "$OUT"
IN=examples/flux_like_tiny.safetensors
CQ=.venv/bin/convert_to_quant

echo; echo "== 1. plan only (--dry-run): which layer becomes what, and why"
"$CQ" -i "$IN" --flux1 --dry-run | tail -n 12

echo; echo "== 2. FP8 tensorwise, Flux.1 preset, default rounding -> $OUT/flux_like_tiny_fp8.safetensors"
"$CQ" -i "$IN" -o "$OUT/flux_like_tiny_fp8.safetensors" --flux1 --overwrite --report "$OUT/fp8_report.json"

echo; echo "== 3. mixed file: bitsandbytes NF4 everywhere, FP8 for the attention projections"
"$CQ" -i "$IN" -o "$OUT/flux_like_tiny_nf4_fp8.safetensors" --bnb-4bit --flux1 \
  --custom-layers 'attn\.(qkv|proj)$' --custom-type fp8 --overwrite --report "$OUT/mixed_report.json"

echo; echo "== 4. MXFP8 -> Hybrid MXFP8"
"$CQ" -i "$IN" -o "$OUT/flux_like_tiny_mxfp8.safetensors" --mxfp8 --flux1 --overwrite -q
"$CQ" -i "$OUT/flux_like_tiny_mxfp8.safetensors" -o "$OUT/flux_like_tiny_hybrid_mxfp8.safetensors" \
  --make-hybrid-mxfp8 --overwrite -q

echo; echo "outputs and JSON reports in $OUT/"
ls -l "$OUT"
