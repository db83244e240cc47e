#!/usr/bin/env bash
# Search latency with the faiss-cpu anchor in the same run (PYTHON must have faiss-cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
unset OPENBLAS_NUM_THREADS OPENBLAS_CORETYPE || true
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
"$python" scripts/bench_faiss.py || echo "faiss anchor skipped: $python has no faiss (pip install faiss-cpu)"
cargo bench --bench search 2>&1 | grep -E "^(store|open|dense|bm25|hybrid|update|reopen)"
"$python" scripts/bench_faiss.py 2>/dev/null || true
