#!/usr/bin/env bash
# Serving throughput, ours against llama.cpp's server on the same GGUF, in one run, with the
# load generator (benches/loadgen.rs): raw prompts of about 128 tokens on /v1/completions (each
# request's prompt starts with its own number, so no prefix is shared), 128 output tokens with
# ignore_eos, at 1 / 4 / 16 / 64 concurrent streams.
#
#   LLAMA_SERVER=/path/to/llama-server scripts/bench-serving.sh [levels...]
#
# llama-server builds from the vendor/llama.cpp folder of the llama-cpp-python source
# distribution (cmake --build build --target llama-server), outside this repository. Without
# LLAMA_SERVER only cited is measured.
set -euo pipefail
cd "$(dirname "$0")/.."
levels=("${@:-1 4 16 64}")
read -r -a levels <<<"${levels[*]}"
model=models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
models/fetch.sh >/dev/null
cargo build --release --quiet
cargo bench --bench loadgen --no-run --quiet 2>/dev/null
loadgen=$(ls -t target/release/deps/loadgen-* | grep -v '\.d$' | head -1)
data=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$data"; }
trap cleanup EXIT

wait_ready() { # url
    for _ in $(seq 1 120); do
        curl -sf "$1" >/dev/null 2>&1 && return 0
        sleep 1
    done
    echo "server at $1 never became ready" >&2
    return 1
}

run_levels() { # name url
    for c in "${levels[@]}"; do
        local n=$((c < 4 ? 4 : (c < 16 ? 2 * c : c)))
        [ "$c" -ge 64 ] && n=$c
        echo "== $1, concurrency $c, $n requests"
        "$loadgen" --url "$2" --endpoint completions --concurrency "$c" --requests "$n" \
            --max-tokens 128 --prompt-words 72 --ignore-eos --json "$data/$1-$c.json"
    done
}

echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
./target/release/cited --data-dir "$data" serve --port 8091 --completions --max-running 64 \
    >"$data/cited.log" 2>&1 &
pids+=($!)
wait_ready http://127.0.0.1:8091/ready
run_levels cited http://127.0.0.1:8091
kill "${pids[0]}"
wait "${pids[0]}" 2>/dev/null || true

if [ -n "${LLAMA_SERVER:-}" ]; then
    "$LLAMA_SERVER" -m "$model" -np 64 -cb -t 2 -c 20480 --port 8092 >"$data/llama.log" 2>&1 &
    pids+=($!)
    wait_ready http://127.0.0.1:8092/health
    run_levels llama.cpp http://127.0.0.1:8092
else
    echo "== llama.cpp skipped: set LLAMA_SERVER to a llama-server binary"
fi
