#!/usr/bin/env bash
# The README's one-GPU end-to-end figures, in one go (one H200, ~20 minutes): the sweep on Llama-3-8B
# shapes (the prompt compiled; then eager, at 40% and 50%), generate.py itself with the prompt
# compiled, the costs of self-speculative decoding and the tokens/s they project with the committed
# acceptance of the embedded model, and, as a check of tp.py's path, a torchrun sweep at world size 1
# (not in the README).
# The two-GPU, 2000-token, kernel, attention and profile figures have their own commands (README).
# With --quantized instead (about 10 minutes): the kernels' GPU checks for every weight format (float,
# int8, int4 in groups of 32-128), the kernel table's int8/int4 rows beside gpt-fast's way of running
# the same weights, then the sweep with bf16, int8 and int4 weights in one process (the prompt compiled,
# as in the bf16 sweep), each beside its gpt-fast-way dense anchor.
# Results (JSON, PNG, logs) go to $OUT (default results/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ "${1:-}" = "--quantized" ]; then
  python3 scripts/bench_kernels.py --weights float,int8,int4 --rep 10 \
    --table_shapes "8B qkv+norm,8B o+res,8B g+u+norm,8B down+res,8B gate+up,8B down" \
    --out "$OUT/bench_kernels_quant.json" 2>&1 | grep -v -i warn | tee "$OUT/bench_kernels_quant.log"
  python3 scripts/bench_sweep.py --config Llama-3-8B --weights bf16,int8,int4 --levels 0.25,0.5,0.7 --anchor --compile_prefill \
    --out "$OUT/sweep_llama3_8b_quant.json" 2>&1 | grep -v -i warn | tee "$OUT/sweep_llama3_8b_quant.log"
  echo "=== summary"
  grep -h "checks:\|GPU checks" "$OUT/bench_kernels_quant.log"
  grep -h -A16 "^| Llama" "$OUT/sweep_llama3_8b_quant.log"
  exit 0
fi
python3 scripts/bench_sweep.py --config Llama-3-8B --compile_prefill --prefill_check --levels 0.25,0.4,0.5,0.6,0.7,0.8,0.9 \
  --out "$OUT/sweep_llama3_8b.json" 2>&1 | grep -v -i warn | tee "$OUT/sweep_llama3_8b.log"
python3 scripts/bench_sweep.py --config Llama-3-8B --levels 0.4,0.5 --out "$OUT/sweep_llama3_8b_eager_prefill.json" \
  2>&1 | grep -v -i warn | tee "$OUT/sweep_llama3_8b_eager_prefill.log"
python3 generate.py --random_weights Llama-3-8B --compile --compile_prefill --ignore_eos --max_new_tokens 200 \
  --num_samples 2 --sparsity 0.5 --sparsity_mode uniform 2>&1 | grep -v -i warn | tee "$OUT/generate_llama3_8b_compile_prefill.log"
python3 scripts/bench_speculative.py --device cuda --config Llama-3-8B --out "$OUT/speculative_llama_3_8b.json" \
  2>&1 | grep -v -i warn | tee "$OUT/speculative_llama_3_8b.log"
torchrun --nproc_per_node 1 scripts/bench_sweep.py --config Llama-3-8B --levels 0.5 --runs 3 \
  --out "$OUT/sweep_llama3_8b_tp1.json" 2>&1 | grep -v -i warn | tee "$OUT/sweep_llama3_8b_tp1.log"
echo "=== summary"
grep -h -A14 "^| Llama" "$OUT"/sweep_llama3_8b.log "$OUT"/sweep_llama3_8b_eager_prefill.log "$OUT"/sweep_llama3_8b_tp1.log
grep -h "Average tokens/s\|Compilation time" "$OUT/generate_llama3_8b_compile_prefill.log"
grep -h "best PROJECTION\|plain decoding\|recompilations" "$OUT/speculative_llama_3_8b.log"
