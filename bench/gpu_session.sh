#!/usr/bin/env bash
# One lent-GPU session's measurements of the 8-bit paths behind the dispatch switches
# (linear_paths.FP8_ROWWISE_TRITON / FP8_TENSORWISE_TRITON, w8a8_gemm.FP8_FAST_ACCUM, the quantizer's warp
# rule; the switches were decided from its model step at 003e804: bench/RESULTS_TRITON_FP8_H200.md), each
# step time-limited so a cut run still leaves the earlier results.
#
#   COMFY=/path/to/ComfyUI OUT=/path/to/results PYTHONPATH=<dir holding a hybridquant link> \
#       [STEPS="tests tune layers host model"] bash bench/gpu_session.sh
#
# STEPS picks the steps (all by default), e.g. two calls on a device that limits a command to 10 minutes:
# STEPS="tests tune layers host" (~10 min), then STEPS=model (~9 min).
#
# Writes under $OUT: gputests.txt (the GPU-only tests), rowquant.json (bench/tune_rowquant.py),
# layers.json / layers.txt (bench/bench_layers.py with the fp8_row_tr column), host.txt
# (bench/bench_host.py --ops), flux.json / flux.md (bench/bench_model.py: the 8-bit formats at 1024² and
# 512², each FP8 format also as FMT@tri = with FP8_ROWWISE_TRITON on, and tensorwise FP8 as @all = with
# FP8_TENSORWISE_TRITON on too, and row-wise FP8 as @fast = the Triton GEMM with FP8_FAST_ACCUM, in the
# same process; the rel_err column shows what fast accumulation costs in precision).
#
# Not in the default STEPS (each ~5-9 min): STEPS=compile (compile.json: TorchCompileModel rows at 1024²
# for bf16, FP8 and INT8, the issue-11 compile target, last measured at c009feb) and STEPS=full (full.json:
# Flux at full depth, 19/38 blocks, 1024², the main formats; never measured yet).
set -u
cd "$(dirname "$0")/.."
: "${COMFY:?set COMFY to a ComfyUI tree}" "${OUT:?set OUT to a results folder}"
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
STEPS=" ${STEPS:-tests tune layers host model} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
step() { local limit=$1; shift; echo "== $*"; timeout "$limit" "$@"; echo "   rc=$?"; }
want tests && step 300 python3 -m pytest -q -p no:cacheprovider tests/test_ops_gpu.py tests/test_triton_launch.py \
    tests/test_fp8_quant.py tests/test_dequant4.py tests/test_dequant_int.py > "$OUT/gputests.txt" 2>&1
want tests && tail -n 3 "$OUT/gputests.txt"
want tune && step 120 python3 bench/tune_rowquant.py --json "$OUT/rowquant.json" > "$OUT/rowquant.txt" 2>&1
want layers && step 240 python3 bench/bench_layers.py --ms 512,1024,4096 --json "$OUT/layers.json" > "$OUT/layers.txt" 2>&1
want host && step 120 python3 bench/bench_host.py --comfy "$COMFY" --device cuda --rows 1024 \
    --formats float8_e4m3fn,float8_e4m3fn_rowwise,int8_tensorwise+per_row --ops > "$OUT/host.txt" 2>&1
want model && step 540 python3 bench/bench_model.py --comfy "$COMFY" --models flux --sizes 1024,512 \
    --knob tri=linear_paths.FP8_ROWWISE_TRITON=True \
    --knob all=linear_paths.FP8_ROWWISE_TRITON=True --knob all=linear_paths.FP8_TENSORWISE_TRITON=True \
    --knob fast=linear_paths.FP8_ROWWISE_TRITON=True --knob fast=w8a8_gemm.FP8_FAST_ACCUM=True \
    --formats float8_e4m3fn,float8_e4m3fn@tri,float8_e4m3fn@all,float8_e4m3fn_rowwise,float8_e4m3fn_rowwise@tri,float8_e4m3fn_rowwise@fast,hybrid_mxfp8,int8_tensorwise+row \
    --repeats 3 --n 5 --warmup 2 --budget-s 500 --json "$OUT/flux.json" --md "$OUT/flux.md" > "$OUT/model.txt" 2>&1
want model && tail -n 16 "$OUT/flux.md" | cut -c1-200
want compile && step 560 python3 bench/bench_model.py --comfy "$COMFY" --models flux --sizes 1024 --no-stock \
    --eager-models none --compile --compile-formats bf16,float8_e4m3fn,int8_tensorwise+row --compile-sizes 1024 \
    --formats float8_e4m3fn,int8_tensorwise+row --repeats 2 --n 5 --warmup 2 --budget-s 540 \
    --json "$OUT/compile.json" --md "$OUT/compile.md" > "$OUT/compile.txt" 2>&1
want full && step 560 python3 bench/bench_model.py --comfy "$COMFY" --models flux --full --sizes 1024 \
    --formats float8_e4m3fn,hybrid_mxfp8,int8_tensorwise+row,bnb_nf4 --repeats 2 --n 3 --warmup 1 --budget-s 540 \
    --json "$OUT/full.json" --md "$OUT/full.md" > "$OUT/full.txt" 2>&1
true
