#!/usr/bin/env bash
# Second half of the GPU check, on the GPU machine (Python with PyTorch, no Rust, no network):
# parity tests, compute-sanitizer memcheck on small sizes, the similarity variant sweep, the
# sampling and decode-attention benches, the embedding bench, the generator's greedy parity and
# generation rates (SmolLM2 and Llama-3.2-1B shapes, dummy weights) and the PyTorch anchors
# (transformers' generate among them), then a short table last. Full log: $OUT/gpu-check.log
# (or ./gpu-check.log without $OUT).
#
#   scripts/gpu-check.sh            # on the GPU machine, after scripts/gpu-build.sh here
#   scripts/gpu-check.sh --dry-run  # anywhere: library resolution, arguments, anchors on CPU
#   scripts/gpu-check.sh --quick    # parity and memcheck only
#   scripts/gpu-check.sh --decode   # parity, memcheck, then the sampling, attention,
#                                   # embedding and generator benches with their anchors (no
#                                   # similarity sweep)
#   scripts/gpu-check.sh --sweep    # parity, then only the similarity sweep and its anchors
#                                   # (a second call after --decode)
#
# Each step has a time limit (STEP_LIMIT seconds, default 150; the generation steps GEN_LIMIT,
# default 400) so one hung step cannot spend the whole device call; what it printed stays in
# the log.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
mode=full
case "${1:-}" in
    --dry-run) mode=dry ;;
    --quick) mode=quick ;;
    --decode) mode=decode ;;
    --sweep) mode=sweep ;;
    "") ;;
    *) echo "usage: $0 [--dry-run|--quick|--decode|--sweep]" >&2; exit 2 ;;
esac
out=${OUT:-$root}
log=$out/gpu-check.log
: > "$log"
python=${PYTHON:-python3}
limit=${STEP_LIMIT:-150}
say() { echo "$*" | tee -a "$log"; }
run() {
    say "== $*"
    local start=$(date +%s)
    local cmd=("$@")
    # `check ARGS` runs the check binary with the CUDA library folders.
    [ "$1" = check ] && cmd=(env "LD_LIBRARY_PATH=$cuda_ld" "$bin" "${@:2}")
    timeout --kill-after=10 "$limit" "${cmd[@]}" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    say "== exit $rc after $(($(date +%s) - start)) s"
    return $rc
}

# gpu-build.sh leaves the binary gzipped; it is unpacked outside the carried folder (which would
# otherwise grow past what may travel).
packed=$root/gpu-check/gpu-check.gz
[ -f "$packed" ] || { say "missing $packed: run scripts/gpu-build.sh first and carry gpu-check/"; exit 1; }
unpacked=$(mktemp -d)
trap 'rm -rf "$unpacked"' EXIT
bin=$unpacked/gpu-check
gunzip -c "$packed" > "$bin" && chmod +x "$bin" || { say "cannot unpack $packed"; exit 1; }

# CUDA libraries: PyTorch's nvidia wheels, then the driver's folder.
libdirs=$("$python" - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except Exception:
    roots = []
dirs = set()
for r in roots:
    for lib in glob.glob(os.path.join(r, "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(lib))
try:
    import torch
    dirs.add(os.path.join(os.path.dirname(torch.__file__), "lib"))
except Exception:
    pass
print(":".join(sorted(dirs)))
PY
)
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu; do
    [ -d "$d" ] && libdirs=$libdirs:$d
done
# Only the check binary gets these folders: Python keeps its own library path.
cuda_ld=${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
say "== gpu-check $(cat gpu-check/COMMIT 2>/dev/null) on $(hostname), $(date -u +%FT%TZ)"
missing=$(LD_LIBRARY_PATH=$cuda_ld ldd "$bin" | awk '/not found/ {print $1}' | tr '\n' ' ')
if [ -n "$missing" ]; then
    say "unresolved libraries: $missing"
    [ "$mode" = dry ] && say "(dry run: expected where no CUDA 13 libraries are installed)" || exit 1
else
    say "all libraries resolve: $(tr '\n' ' ' < gpu-check/NEEDED)"
fi

if [ "$mode" = dry ]; then
    if [ -z "$missing" ]; then
        run check --help || exit 1
    fi
    run "$python" scripts/gpu_anchors.py --device cpu --n 20000 --nq 1,4 --k 10 --batch 1,2 \
        --sample-batch 4 --vocab 1000 --gen-models smollm2-135m --gen-batch 1,2 --gen-prompt 8 \
        --gen-out 4
    rc=$?
    # 3: arguments accepted, no PyTorch on this machine (the GPU machine has it).
    [ $rc -eq 3 ] && say "(dry run: PyTorch not installed here, anchors not run)"
    [ $rc -eq 0 ] || [ $rc -eq 3 ] || exit 1
    say "dry run finished"
    exit 0
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$log"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
case "$gpu" in
    *H200*) peak=4.8 ;;
    *H100*) peak=3.35 ;;
    *) peak=3.35 ;;
esac
status=0
run check parity || status=1
if [ "$mode" = sweep ]; then
    run check sweep --peak-tbs "$peak" || status=1
    run "$python" scripts/gpu_anchors.py --device cuda --peak-tbs "$peak" --only similarity || status=1
elif command -v compute-sanitizer >/dev/null; then
    run env LD_LIBRARY_PATH="$cuda_ld" compute-sanitizer --tool memcheck --error-exitcode 9 "$bin" memcheck || status=1
    race_from=$(($(wc -l < "$log") + 1))
    run env LD_LIBRARY_PATH="$cuda_ld" compute-sanitizer --tool racecheck "$bin" memcheck --only embeddings,sampling,paged,decoder || status=1
    # cuBLAS's Hopper GEMMs (nvjet_*) synchronise through hardware barriers racecheck does not
    # follow, and it reports them as hazards; only hazards in our kernels (cited_*) count.
    ours=$(tail -n +"$race_from" "$log" | grep -A1 "Race reported" | grep -c "cited_" || true)
    if [ "$ours" -gt 0 ]; then
        say "racecheck: $ours hazard lines in our kernels"
        status=1
    else
        say "racecheck: no hazards in our kernels"
    fi
else
    say "compute-sanitizer not found: memcheck skipped"
fi
if [ "$mode" = full ]; then
    run check sweep --peak-tbs "$peak" || status=1
fi
if [ "$mode" = full ] || [ "$mode" = decode ]; then
    run check sampling --peak-tbs "$peak" || status=1
    run check attention --peak-tbs "$peak" || status=1
    run check embed || status=1
    run check profile || status=1
    # Building Llama-3.2-1B's random weights takes CPU time: this step gets a longer limit.
    # Forward-pass loop and the engine's scheduler (ENGINE lines) on the same weights.
    limit=${GEN_LIMIT:-400} run check generate --peak-tbs "$peak" || status=1
fi
if [ "$mode" = full ]; then
    limit=${GEN_LIMIT:-400} run "$python" scripts/gpu_anchors.py --device cuda --peak-tbs "$peak" || status=1
elif [ "$mode" = decode ]; then
    limit=${GEN_LIMIT:-400} run "$python" scripts/gpu_anchors.py --device cuda --peak-tbs "$peak" --only sampling,bert,generate || status=1
fi

say ""
say "== summary ($gpu, peak $peak TB/s)"
grep -E "^PARITY" "$log" | awk -F'\t' '{print $5}' | sort | uniq -c | sed 's/^/parity results: /' | tee -a "$log"
grep -E "^PARITY.*FAIL" "$log" | head -n 20 | tee -a "$log"
# Best variant per shape, then the anchors.
grep -E "^SWEEP" "$log" | awk -F'\t' '$7 ~ / ms$/ {
    key=$2" "$3" "$4; ms=$7+0
    if (!(key in best) || ms < best[key]) { best[key]=ms; line[key]=$0 }
} END { for (k in line) print line[k] }' | sort -t$'\t' -k2,2V -k3,3V -k4,4V | tee -a "$log"
grep -E "^(SAMPLE|ATTN|EMBED|PROFILE|GENERATE|ENGINE|GRAPH|ANCHOR)" "$log" | tee -a "$log"
exit $status
