#!/usr/bin/env bash
# Peak resident memory of `cited ingest` on large plain-text files (issue target: <= 1 GiB for a
# 200 MB file). Embedding 200 MB with MiniLM takes hours on 2 cores, so the large runs use the
# same model with its encoder layers removed (config `num_hidden_layers: 0`: the real tokenizer,
# embedding table, 384-wide vectors and batches; no attention): what is measured is everything
# that grows with the file (reading, chunking, batching, the store). The encoder's own working
# memory is per batch, not per file; MINILM_MB runs the full model on a small file for that.
#
#   SIZES_MB="3 200" MINILM_MB=3 bash scripts/bench-ingest-rss.sh
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=${SIZES_MB:-"3 200"}
minilm_mb=${MINILM_MB:-}
model=models/all-minilm-l6-v2
[ -f "$model/model.safetensors" ] || { echo "run models/fetch.sh first" >&2; exit 1; }
cargo build --release --quiet
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The layerless embedder: the MiniLM files, with no encoder layer in the config.
mkdir -p "$tmp/layerless"
for f in "$model"/*; do ln -s "$PWD/$f" "$tmp/layerless/"; done
rm "$tmp/layerless/config.json"
python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); c["num_hidden_layers"]=0; json.dump(c,open(sys.argv[2],"w"))' \
    "$model/config.json" "$tmp/layerless/config.json"

# Text files of MedQuAD passages, numbered so no two passages are alike.
text_file() {
    python3 - "$1" "$2" <<'PY'
import json, sys
mb, out = int(sys.argv[1]), sys.argv[2]
rows = [json.loads(l)["text"] for l in open("../shared/data/medquad-cancergov/medquad_cancergov_answer_corpus.jsonl")]
target, n = mb << 20, 0
with open(out, "w") as f:
    while f.tell() < target:
        f.write(f"Passage {n}. {rows[n % len(rows)]}\n\n")
        n += 1
PY
}

run() {
    local label=$1 embedder=$2 file=$3
    local data=$tmp/data-$label
    rm -rf "$data"
    local start
    start=$(date +%s)
    /usr/bin/time -v target/release/cited --data-dir "$data" --embedder "$embedder" ingest "$file" \
        > "$tmp/out" 2> "$tmp/time"
    local wall=$(($(date +%s) - start))
    local rss
    rss=$(awk -F: '/Maximum resident/ {gsub(/ /, "", $2); printf "%.1f", $2 / 1024}' "$tmp/time")
    local chunks
    chunks=$(grep -ho '[0-9]* chunks' "$tmp/out" "$tmp/time" | head -n1 | grep -o '[0-9]*' || echo "?")
    local store
    store=$(du -sm "$data" | cut -f1)
    printf "%-28s %6s MiB text  %8s chunks  peak RSS %8s MB  %5s s  store %s MB\n" \
        "$label" "$(($(stat -c %s "$file") >> 20))" "$chunks" "$rss" "$wall" "$store"
    rm -rf "$data"
}

echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
if [ -n "$minilm_mb" ]; then
    text_file "$minilm_mb" "$tmp/minilm.txt"
    run "minilm-${minilm_mb}MiB" "$model" "$tmp/minilm.txt"
    rm -f "$tmp/minilm.txt"
fi
for mb in $sizes; do
    text_file "$mb" "$tmp/text.txt"
    run "layerless-${mb}MiB" "$tmp/layerless" "$tmp/text.txt"
    rm -f "$tmp/text.txt"
done
