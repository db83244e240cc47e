#!/usr/bin/env bash
# CPU benchmarks of the models with their anchors measured in the same run: llama.cpp through
# llama-cpp-python (PYTHON must have llama-cpp-python==0.3.36; skipped with a note otherwise),
# then the criterion benches, which include plain candle-transformers.
#
#   PYTHON=/path/to/venv/bin/python scripts/bench-cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
models/fetch.sh
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
if "$python" -c "import llama_cpp" 2>/dev/null; then
    echo "== llama.cpp anchor"
    "$python" scripts/bench_llama_cpp.py
else
    echo "== llama.cpp anchor skipped: $python has no llama_cpp (pip install llama-cpp-python==0.3.36)"
fi
echo "== generation (cited quantized / dequantized, plain candle quantized_llama)"
cargo bench --bench generate -- --noplot 2>&1 | grep -E "^smollm2|time:|thrpt:"
echo "== llama.cpp anchor, again after the Rust runs"
"$python" scripts/bench_llama_cpp.py 2>/dev/null || true
echo "== embeddings (cited packed / plain candle-transformers BERT)"
cargo bench --bench embed -- --noplot 2>&1 | grep -E "^embed|time:|thrpt:"
