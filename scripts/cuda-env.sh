#!/usr/bin/env bash
# Sets up the pinned CUDA 13.0 toolkit from PyPI in a project-local environment (.venv-cuda/,
# git-ignored) so the `cuda` feature builds on machines without a GPU, and prints the environment
# to build with. Idempotent.
#
#   eval "$(scripts/cuda-env.sh)"    # then: cargo build --release --features cuda
#
# Pins (see ../shared/CUDA.md): every part at 13.0, which the driver 580 (CUDA 13.0) of the GPU
# machines loads; newer nvvm emits PTX that this ptxas and that driver refuse.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$root/.venv-cuda
python=${PYTHON:-python3}
log() { echo "cuda-env: $*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
    log "creating $venv"
    "$python" -m venv "$venv"
fi
stamp=$venv/.installed-13.0
if [ ! -f "$stamp" ]; then
    log "installing the CUDA 13.0 toolkit wheels (about 1.2 GB; no pip cache, so the disk holds them once)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir \
        "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-runtime==13.0.*" \
        "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
        "nvidia-cublas==13.0.*" "nvidia-curand" >&2
    touch "$stamp"
fi
cu=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
[ -x "$cu/bin/nvcc" ] || { log "nvcc not found under $cu"; exit 1; }

# Unversioned names for the linker, and a libcuda stub (the real one comes with the driver).
link=$venv/link
mkdir -p "$link"
for lib in cublas cublasLt curand cudart nvrtc; do
    real=$(ls "$cu"/lib/lib$lib.so.* 2>/dev/null | sort | head -n1 || true)
    [ -n "$real" ] || { log "lib$lib missing under $cu/lib"; exit 1; }
    ln -sf "$real" "$link/lib$lib.so"
done
if [ ! -f "$link/libcuda.so" ]; then
    # Every driver entry point cudarc may reference; unused ones cost nothing in a stub. A build
    # without the feature never downloads cudarc, so fetch every locked package first.
    (cd "$root" && cargo fetch --quiet) >&2
    registry=${CARGO_HOME:-$HOME/.cargo}/registry/src
    syms=$(grep -ho 'cu[A-Z][A-Za-z0-9_]*' "$registry"/*/cudarc-*/src/driver/sys/*.rs 2>/dev/null | sort -u)
    [ -n "$syms" ] || { log "cudarc sources not found under $registry"; exit 1; }
    { for s in $syms; do echo "void $s(void) {}"; done; } > "$link/stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$link/libcuda.so" "$link/stub.c"
    ln -sf libcuda.so "$link/libcuda.so.1"
fi

cat <<ENV
export CU=$cu
export PATH=$cu/bin:\$PATH
export CUDA_ROOT=$cu CUDA_PATH=$cu CUDA_HOME=$cu
export CUDA_COMPUTE_CAP=90
export LIBRARY_PATH=$link:$cu/lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}
export RUSTFLAGS="-L $link -L $cu/lib"
ENV
