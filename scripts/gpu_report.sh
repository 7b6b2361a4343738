#!/usr/bin/env bash
# The README's one-GPU end-to-end figures, in one go (one H200, ~20 minutes): the sweep on Llama-3-8B
# shapes (the prompt compiled; then eager, at 40% and 50%), generate.py itself with the prompt
# compiled, the costs of self-speculative decoding and the tokens/s they project with the committed
# acceptance of the embedded model, and, as a check of tp.py's path, a torchrun sweep at world size 1
# (not in the README).
# The two-GPU, 2000-token, kernel, attention and profile figures have their own commands (README).
# Results (JSON, PNG, logs) go to $OUT (default results/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
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
