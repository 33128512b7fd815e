#!/usr/bin/env bash
# The README's main job: set up the converter's venv (no ComfyUI needed), then convert the bundled
# example model (examples/hybridquant_example_sd3_tiny.safetensors: an SD3 MMDiT at toy size that
# ComfyUI detects and samples; random weights) and print the summaries. Outputs go to
# artifacts/example/ (override with OUT_DIR=...); --overwrite makes re-runs work.
set -euo pipefail
cd "$(dirname "$0")/.."
HYBRIDQUANT_SKIP_COMFYUI=1 bash scripts/setup_env.sh
OUT=${OUT_DIR:-artifacts/example}
mkdir -p "$OUT"
IN=examples/hybridquant_example_sd3_tiny.safetensors
CQ=.venv/bin/convert_to_quant
# SD3's input/output projections and embedders are the layers quantization hurts most: keep them.
KEEP='^(x_embedder|t_embedder|y_embedder|context_embedder|final_layer)'

echo; echo "== 1. plan only (--dry-run): which layer becomes what, and why"
"$CQ" -i "$IN" --exclude-layers "$KEEP" --dry-run | tail -n 12

echo; echo "== 2. FP8 tensorwise, default rounding -> $OUT/sd3_tiny_fp8.safetensors"
"$CQ" -i "$IN" -o "$OUT/sd3_tiny_fp8.safetensors" --exclude-layers "$KEEP" --overwrite --report "$OUT/fp8_report.json"

echo; echo "== 3. mixed file: bitsandbytes NF4 everywhere, FP8 for the attention projections"
"$CQ" -i "$IN" -o "$OUT/sd3_tiny_nf4_fp8.safetensors" --bnb-4bit --exclude-layers "$KEEP" \
  --custom-layers 'attn\.(qkv|proj)$' --custom-type fp8 --overwrite --report "$OUT/mixed_report.json"

echo; echo "== 4. MXFP8 -> Hybrid MXFP8"
"$CQ" -i "$IN" -o "$OUT/sd3_tiny_mxfp8.safetensors" --mxfp8 --exclude-layers "$KEEP" --overwrite -q
"$CQ" -i "$OUT/sd3_tiny_mxfp8.safetensors" -o "$OUT/sd3_tiny_hybrid_mxfp8.safetensors" \
  --make-hybrid-mxfp8 --overwrite -q

echo; echo "outputs and JSON reports in $OUT/ (copy one into ComfyUI's models/diffusion_models and load it"
echo "with 'Load Diffusion Model (HybridQuant)', or open the pack's example workflows)"
ls -l "$OUT"
