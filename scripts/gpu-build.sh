#!/usr/bin/env bash
# First half of the GPU check, on a machine without a GPU: builds the stripped `gpu-check` binary
# with the `cuda` feature and collects it into gpu-check/ (git-ignored), which the device call
# carries. cuBLAS alone is far over the 64 MiB that may travel, so the CUDA libraries are not
# collected: scripts/gpu-check.sh takes them from the GPU machine's PyTorch (CUDA 13), and
# gpu-check/NEEDED lists the ones it must find. The libcuda stub never travels. The binary is
# mostly embedded PTX text and travels gzipped (about a quarter of its size); gpu-check.sh
# unpacks it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# Assigned first: a failed setup stops here (an eval of a failed substitution would not).
cuda_env=$(scripts/cuda-env.sh)
eval "$cuda_env"
start=$(date +%s)
cargo build --release --features cuda --bin gpu-check
echo "gpu-build: cargo build took $(($(date +%s) - start)) s"
out=$root/gpu-check
rm -rf "$out"
mkdir -p "$out"
strip -o "$out/gpu-check" target/release/gpu-check
readelf -d "$out/gpu-check" | awk '/NEEDED/ {gsub(/[\[\]]/, "", $5); print $5}' > "$out/NEEDED"
du -b "$out/gpu-check" | awk '{printf "gpu-build: the stripped binary is %.1f MiB\n", $1 / 1048576}'
gzip -6 "$out/gpu-check"
if grep -q stub "$out/NEEDED"; then
    echo "gpu-build: the binary names a stub library" >&2
    exit 1
fi
# The commit built, marked -dirty when the working tree had changes on top of it.
git describe --always --dirty --abbrev=7 > "$out/COMMIT" 2>/dev/null || true
du -b "$out/gpu-check.gz" | awk '{printf "gpu-build: gpu-check/gpu-check.gz is %.1f MiB\n", $1 / 1048576}'
echo "gpu-build: needs $(tr '\n' ' ' < "$out/NEEDED")"
