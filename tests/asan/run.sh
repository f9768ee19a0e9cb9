#!/usr/bin/env bash
# Run the test suite against an AddressSanitizer + UBSan build of tbptt_fast._core.
#
#   bash tests/asan/run.sh [pytest args...]
#   bash tests/asan/run.sh --ci     # the bounded subset CI runs (every engine path)
#
# Builds csrc/ with TBPTT_SANITIZE=ON (which also fills fresh native buffers
# with NaN, so a read of uninitialised memory fails a test) into build/asan,
# assembles a package copy in build/asan/pkg, and runs pytest with the
# sanitizer runtimes preloaded. Leaks from CPython itself are suppressed
# (tests/asan/lsan.supp); any leak or error from _core fails the run.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=$(python -c "import sys; print(sys.executable)")   # the real binary, not a shim script
BUILD=build/asan
cmake -S . -B "$BUILD" -G Ninja -DSKBUILD_PROJECT_VERSION=0.1.0 -DCMAKE_BUILD_TYPE=Debug \
  -DTBPTT_SANITIZE=ON -DTBPTT_WERROR=ON -DTBPTT_CUDA=OFF \
  -Dpybind11_DIR="$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  -DPython_EXECUTABLE="$PY" >/dev/null
ninja -C "$BUILD" -j2
rm -rf "$BUILD/pkg" && mkdir -p "$BUILD/pkg"
cp -r python/tbptt_fast "$BUILD/pkg/"
rm -f "$BUILD"/pkg/tbptt_fast/_core*.so
cp "$BUILD"/_core*.so "$BUILD/pkg/tbptt_fast/"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0
export LSAN_OPTIONS=suppressions=$PWD/tests/asan/lsan.supp:print_suppressions=0
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export PYTHONMALLOC=malloc PYTHONPATH="$PWD/$BUILD/pkg" TBPTT_REQUIRE_NATIVE=1
if [[ "${1:-}" == "--ci" ]]; then
  shift
  # Every engine path: all cells, both overlap rules, masks/resets, k2=None,
  # ring wrap and growth, forward-only passes, token inputs, snapshots, the
  # failure paths (non-finite, impossible sizes, interrupts, a busy engine).
  set -- tests/test_native_build.py tests/test_hardening.py tests/test_invariants.py \
    tests/test_gradients.py "$@"
else
  set -- tests "$@"
fi
# An editable install's import hook would shadow PYTHONPATH: drop it so the
# sanitized copy in $BUILD/pkg is the one imported.
exec "$PY" -c '
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-m", "not torch and not gpu and not slow",
                      "-k", "not bench", *sys.argv[1:]]))
' "$@"
