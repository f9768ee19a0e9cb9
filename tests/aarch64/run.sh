#!/usr/bin/env bash
# Cross-compile the CPU engine's sources for aarch64 (-Werror) and run the
# standalone kernel/pool check under qemu-user. Needs Debian's
# g++-aarch64-linux-gnu and qemu-user:
#   apt-get install g++-aarch64-linux-gnu qemu-user
#   bash tests/aarch64/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
CXX=${CXX:-aarch64-linux-gnu-g++}
INC=$(python -c "import scipy_openblas32; print(scipy_openblas32.get_include_dir())")
OUT=$(mktemp -d)
FLAGS=(-std=c++17 -O3 -Wall -Wextra -Werror -Wno-psabi -fno-math-errno -fno-trapping-math
  -DBLAS_SYMBOL_PREFIX=scipy_ -Icsrc -I"$INC")
for f in csrc/cpu/*.cpp; do
  "$CXX" "${FLAGS[@]}" -c "$f" -o "$OUT/$(basename "$f").o"
done
echo "compiled for aarch64: $(ls csrc/cpu/*.cpp | tr '\n' ' ')"
"$CXX" "${FLAGS[@]}" -static -pthread tests/aarch64/own_gemm_check.cpp csrc/cpu/own_gemm.cpp \
  csrc/cpu/pool.cpp -o "$OUT/own_gemm_check"
qemu-aarch64 "$OUT/own_gemm_check"
