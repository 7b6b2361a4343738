#!/usr/bin/env bash
# The quantized GPU figures in one go (one H200 or H100, about 10 minutes): the kernels' GPU checks for
# every weight format (float, int8, int4 in groups of 32-128), the kernel table with int8/int4 rows
# beside gpt-fast's way of running the same weights, then the end-to-end sweep on Llama-3-8B shapes
# with bf16, int8 and int4 weights in one process (each beside its gpt-fast-way dense anchor).
# Results (JSON, PNG, logs) go to $OUT (default results/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader
python3 scripts/bench_kernels.py --weights float,int8,int4 --rep 10 \
  --table_shapes "8B qkv+norm,8B o+res,8B g+u+norm,8B down+res,8B gate+up,8B down" \
  --out "$OUT/bench_kernels_quant.json" 2>&1 | grep -v -i warn | tee "$OUT/bench_kernels_quant.log"
python3 scripts/bench_sweep.py --config Llama-3-8B --weights bf16,int8,int4 --levels 0.25,0.5,0.7 --anchor \
  --out "$OUT/sweep_llama3_8b_quant.json" 2>&1 | grep -v -i warn | tee "$OUT/sweep_llama3_8b_quant.log"
echo "=== summary"
grep -h "checks:\|GPU checks" "$OUT/bench_kernels_quant.log"
grep -h -A16 "^| Llama" "$OUT/sweep_llama3_8b_quant.log"
