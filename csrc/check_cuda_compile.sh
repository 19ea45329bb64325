#!/usr/bin/env bash
# Compile-only check of every csrc/cuda/*.cu against the installed torch's
# headers (for machines with nvcc but no GPU, e.g. CI). Exits non-zero on the
# first compile error. Usage: bash csrc/check_cuda_compile.sh [extra nvcc flags]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-python}"
NVCC="${NVCC:-nvcc}"
command -v "$NVCC" >/dev/null 2>&1 || { echo "check_cuda_compile: nvcc not found" >&2; exit 1; }

# Header paths exactly as torch.utils.cpp_extension would pass them.
mapfile -t incs < <("$PY" -c "from torch.utils.cpp_extension import include_paths
for p in include_paths(): print(p)")
[ "${#incs[@]}" -gt 0 ] || { echo "check_cuda_compile: torch include paths not found" >&2; exit 1; }
pyinc="$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
# The C++ standard torch's own extension builder uses for this torch version.
std="$("$PY" - <<'PYEOF'
import inspect
from torch.utils import cpp_extension
print("c++20" if "c++20" in inspect.getsource(cpp_extension) else "c++17")
PYEOF
)"
abi="$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")"

flags=(-arch=sm_90 -c -std="$std" -O3 -Xcompiler -fPIC
       -D_GLIBCXX_USE_CXX11_ABI="$abi" -DFASTCOUNT_WITH_CUDA=1 -DTORCH_EXTENSION_NAME=_C
       --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
       -I"$here" -I"$pyinc")
for p in "${incs[@]}"; do flags+=(-I"$p"); done

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
# A CPU-only torch wheel ships the c10/cuda headers but not the one CMake
# generates for CUDA builds; supply it (same content a CUDA build generates)
# so the compile check also runs against a CPU torch.
if ! ls "${incs[0]}"/c10/cuda/impl/cuda_cmake_macros.h >/dev/null 2>&1; then
    ver="$("$NVCC" --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')"
    read -r major minor <<<"${ver:-0 0}"
    mkdir -p "$out/gen/c10/cuda/impl"
    cat >"$out/gen/c10/cuda/impl/cuda_cmake_macros.h" <<HEOF
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
#define TORCH_CUDA_VERSION_MAJOR ${major}
#define TORCH_CUDA_VERSION_MINOR ${minor}
#define TORCH_CUDA_VERSION_PATCH 0
#define TORCH_CUDA_VERSION_BUILD 0
HEOF
    flags+=(-I"$out/gen")
fi

shopt -s nullglob
files=("$here"/cuda/*.cu)
[ "${#files[@]}" -gt 0 ] || { echo "check_cuda_compile: no csrc/cuda/*.cu files" >&2; exit 1; }
for f in "${files[@]}"; do
    echo "nvcc -arch=sm_90 -c $(basename "$f")"
    "$NVCC" "${flags[@]}" "$@" "$f" -o "$out/$(basename "$f").o"
done
echo "check_cuda_compile: ${#files[@]} file(s) compiled"
