#!/usr/bin/env bash
# Builds `oedit --features cuda` on a Linux x86-64 machine that has no CUDA toolkit and no GPU,
# from NVIDIA's CUDA 13.0 wheels on PyPI (nvcc, nvvm, headers, cuBLAS, cuRAND, NVRTC, runtime).
# The binary links the CUDA 13 libraries dynamically; it runs where an NVIDIA driver >= 580 and
# the CUDA 13 runtime libraries are installed (scripts/cuda/env.sh finds them).
#   usage: scripts/cuda/build-without-toolkit.sh [COMPUTE_CAP]   (default 90: H100/H200)
# Output: target/cuda/release/oedit. With a CUDA toolkit installed, plain
# `CUDA_COMPUTE_CAP=NN cargo build --release --features cuda` does the same.
set -euo pipefail
cd "$(dirname "$0")/../.."
cap="${1:-90}"
root="${CUDA_WHEELS_DIR:-$HOME/.cache/oedit/cuda13}"
cu="$root/nvidia/cu13"
if [ ! -x "$cu/bin/nvcc" ]; then
  mkdir -p "$root/wheels"
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$root/wheels" "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
    "nvidia-cublas==13.0.*" "nvidia-curand==10.4.*"
  for w in "$root"/wheels/*.whl; do python3 -m zipfile -e "$w" "$root"; done
  chmod +x "$cu"/bin/* "$cu"/nvvm/bin/*
fi
# Unversioned names for the linker, and a link-time stand-in for the driver library (libcuda is
# part of the driver, not of any wheel): one empty function per entry point of cuda.h.
ln -sfn lib "$cu/lib64"
for l in cublas cublasLt cudart nvrtc; do ln -sf "lib$l.so.13" "$cu/lib/lib$l.so"; done
ln -sf libcurand.so.10 "$cu/lib/libcurand.so"
mkdir -p "$cu/lib/stubs"
gcc -E -I"$cu/include" "$cu/include/cuda.h" | grep -oE '\bcu[A-Z][A-Za-z0-9_]*\s*\(' | sed 's/\s*($//' \
  | sort -u | sed 's/.*/void &(void){}/' > "$cu/lib/stubs/libcuda.c"
gcc -shared -fPIC -o "$cu/lib/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 "$cu/lib/stubs/libcuda.c"
PATH="$cu/bin:$PATH" CUDA_ROOT="$cu" CUDA_COMPUTE_CAP="$cap" CARGO_TARGET_DIR=target/cuda \
  RUSTFLAGS="-L native=$cu/lib/stubs" cargo build --release --locked --features cuda --bin oedit
echo "built target/cuda/release/oedit (sm_$cap)"
