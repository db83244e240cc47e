#!/usr/bin/env bash
# Compiles every kernels/*.cu to PTX and assembles it for sm_90 with ptxas: seconds, no GPU.
# CI runs it on every change; `-v` output shows registers, shared memory and spills.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# Assigned first: a failed setup stops here (an eval of a failed substitution would not).
cuda_env=$(scripts/cuda-env.sh)
eval "$cuda_env"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for cu in kernels/*.cu; do
    name=$(basename "$cu" .cu)
    nvcc -O3 -std=c++17 --ptx -arch=sm_90 -Werror all-warnings "$cu" -o "$tmp/$name.ptx"
    ptxas -arch=sm_90 -v "$tmp/$name.ptx" -o "$tmp/$name.cubin" 2>&1 |
        grep -E "Compiling entry|registers|spill" | sed "s/^/$name: /"
    if ptxas -arch=sm_90 -v "$tmp/$name.ptx" -o /dev/null 2>&1 | grep -E "[1-9][0-9]* bytes spill" >/dev/null; then
        echo "check-kernels: $name spills registers" >&2
        exit 1
    fi
done
echo "check-kernels: all kernels compile for sm_90"
